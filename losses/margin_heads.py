"""Classification heads over the embedding, and center loss: the softmax family after FaceNet.

Each head is a Keras layer called on `[embeddings [B, D], labels [B]]` that owns its class-weight
matrix W ("kernel", [D, C]) and returns float32 logits [B, C], to be trained with
`keras.losses.SparseCategoricalCrossentropy(from_logits=True)` against the same labels. The
embedding model itself is unchanged: after training the head is dropped.

    softmax      x W + b                                    (plain linear classifier)
    normface     s cos(theta_j)                             Wang et al. 2017, NormFace, Eq. 5
    sphereface   s psi(theta_y) for the target, else s cos  Liu et al. 2017, SphereFace, Eq. 6-7
    cosface      s (cos(theta_y) - m) for the target        Wang et al. 2018, CosFace, Eq. 4
    arcface      s cos(theta_y + m) for the target          Deng et al. 2019, ArcFace, Eq. 3
    softmax_center  softmax, plus lambda * center loss      Wen et al. 2016, Eq. 2-5

with cos(theta_j) = <x / |x|, W_j / |W_j|> the cosine between the embedding and class j's weight
column, and y the label. Margins apply to the target logit only, whenever labels are given.

Numerics: everything is computed in float32, also for float16 / bfloat16 inputs (float64 inputs
stay float64, for finite-difference checks); heads default to a float32 dtype policy, so under
mixed precision they still take and return float32. cos(theta) is clipped into [-1, 1] and the
angle is never formed: no acos, whose gradient is infinite at +-1. cos(theta + m) is expanded as
cos(theta) cos(m) - sin(theta) sin(m) with sin(theta) = sqrt(max(1 - cos^2, eps)), and SphereFace's
cos(m theta) is the Chebyshev polynomial T_m(cos theta); gradients stay finite at cos = +-1.
"""
import math

import keras
import tensorflow as tf

from choices import HEADS  # the names, defined once (TF-free; flags.py offers them)
from losses import masks
from losses.global_batch import gather_constant

_SIN_EPS = 1e-7  # floor of 1 - cos^2 under the sqrt: only hit within ~1 float32 ulp of cos = +-1


# ---------------------------------------------------------------------------------------------
# Pure functions
def _compute_dtype(x):
    """float64 stays float64; anything else (float16, bfloat16, float32, ints) -> float32."""
    return tf.float64 if x.dtype == tf.float64 else tf.float32


def _cast_pair(embeddings, kernel):
    embeddings = tf.convert_to_tensor(embeddings)
    dtype = _compute_dtype(embeddings)
    return tf.cast(embeddings, dtype), tf.cast(kernel, dtype)


def _int_labels(labels):
    labels = masks.flatten_labels(labels)
    return labels if labels.dtype == tf.int32 else tf.cast(labels, tf.int32)


def softmax_logits(embeddings, kernel, bias=None):
    """Plain linear classifier x W + b: embeddings [B, D], kernel [D, C], bias [C] -> [B, C]."""
    x, w = _cast_pair(embeddings, kernel)
    logits = tf.matmul(x, w)
    if bias is not None:
        logits = logits + tf.cast(bias, logits.dtype)
    return logits


def cosine_logits(embeddings, kernel):
    """cos(theta) between each embedding and each class column, in [-1, 1]. float32 [B, C].

    Both x (rows) and W (columns) are L2-normalised here (epsilon 1e-12, so a zero vector gives 0
    and a finite gradient); the result is clipped into [-1, 1] against rounding.
    """
    x, w = _cast_pair(embeddings, kernel)
    x = tf.math.l2_normalize(x, axis=1)
    w = tf.math.l2_normalize(w, axis=0)
    return tf.clip_by_value(tf.matmul(x, w), -1.0, 1.0)


def safe_sin(cos):
    """sin(theta) = sqrt(max(1 - cos^2, eps)) >= 0 for theta in [0, pi]; finite gradient at +-1."""
    one_minus_sq = (1.0 - cos) * (1.0 + cos)
    return tf.sqrt(tf.maximum(one_minus_sq, tf.cast(_SIN_EPS, cos.dtype)))


def _with_target(cos, labels, target_fn):
    """cos [B, C] with the label column replaced by target_fn(cos of that column)."""
    labels = _int_labels(labels)
    target_cos = tf.gather(cos, labels, batch_dims=1)  # [B]
    is_target = tf.cast(tf.one_hot(labels, tf.shape(cos)[1], dtype=tf.int32), tf.bool)
    return tf.where(is_target, target_fn(target_cos)[:, None], cos)


def arcface_target(cos, margin=0.5, easy_margin=False):
    """ArcFace's target term cos(theta + m) with the handling that keeps it decreasing in theta.

    Deng et al. 2019, Eq. 3, and its reference implementation: theta + m passes pi once
    theta > pi - m, where cos(theta + m) would start increasing again, so

        easy_margin=False: cos(theta + m)  if cos(theta) > cos(pi - m),  else cos(theta) - m sin(m)
                           (m sin(m) = m sin(pi - m); the fallback is below cos(theta + m) at the
                           switch, so the function stays monotonically decreasing);
        easy_margin=True:  cos(theta + m)  if cos(theta) > 0,            else cos(theta).

    Args:
      cos: float tensor of cos(theta) in [-1, 1] (any shape).
      margin: m in radians (paper: 0.5), 0 <= m < pi.
    Returns:
      Tensor like `cos`.
    """
    m = float(margin)
    cos_m = cos * math.cos(m) - safe_sin(cos) * math.sin(m)
    if easy_margin:
        return tf.where(cos > 0.0, cos_m, cos)
    return tf.where(cos > math.cos(math.pi - m), cos_m, cos - m * math.sin(m))


def chebyshev(cos, degree):
    """cos(degree * theta) as the Chebyshev polynomial T_degree(cos theta); degree an int >= 0."""
    previous, current = tf.ones_like(cos), cos
    if degree == 0:
        return previous
    for _ in range(degree - 1):
        previous, current = current, 2.0 * cos * current - previous
    return current


def sphereface_target(cos, margin=4):
    """SphereFace's psi(theta) = (-1)^k cos(m theta) - 2k, theta in [k pi/m, (k+1) pi/m].

    Liu et al. 2017, Eq. 6-7: the monotonically decreasing extension of cos(m theta) to [0, pi]
    (continuous at the joints). k counts the joints j pi / m (j = 1 .. m-1) below theta, i.e. the
    thresholds cos(j pi / m) that cos(theta) is <=; it is piecewise constant and has no gradient.

    Args:
      cos: float tensor of cos(theta) in [-1, 1].
      margin: m, a positive integer (paper: 4).
    Returns:
      Tensor like `cos`, in [-2m + 1, 1].
    """
    m = int(margin)
    if m < 1 or m != margin:
        raise ValueError(f"SphereFace's margin must be a positive integer, got {margin!r}.")
    k = tf.zeros_like(cos)
    for j in range(1, m):
        k += tf.cast(cos <= math.cos(j * math.pi / m), cos.dtype)
    sign = 1.0 - 2.0 * tf.math.floormod(k, 2.0)
    return sign * chebyshev(cos, m) - 2.0 * k


def normface_logits(embeddings, kernel, scale=30.0):
    """NormFace: s cos(theta_j) (Wang et al. 2017). float32 [B, C]."""
    return scale * cosine_logits(embeddings, kernel)


def cosface_logits(labels, embeddings, kernel, scale=64.0, margin=0.35):
    """CosFace / AM-softmax: s (cos(theta_y) - m) for the target, s cos(theta_j) otherwise.

    Wang et al. 2018, Eq. 4 (paper: s = 64, m = 0.35). labels int [B] in [0, C) -> float32 [B, C].
    """
    cos = cosine_logits(embeddings, kernel)
    return scale * _with_target(cos, labels, lambda c: c - margin)


def arcface_logits(labels, embeddings, kernel, scale=64.0, margin=0.5, easy_margin=False):
    """ArcFace: s cos(theta_y + m) for the target (see `arcface_target`), s cos(theta_j) otherwise.

    Deng et al. 2019, Eq. 3 (paper: s = 64, m = 0.5). labels int [B] in [0, C) -> float32 [B, C].
    """
    cos = cosine_logits(embeddings, kernel)
    return scale * _with_target(cos, labels,
                                lambda c: arcface_target(c, margin, easy_margin))


def sphereface_logits(labels, embeddings, kernel, scale=30.0, margin=4, lambda_blend=0.0):
    """SphereFace (A-softmax) on normalised embeddings: s psi(theta_y) for the target, s cos else.

    Liu et al. 2017, Eq. 7 with |x| replaced by a fixed scale s (the embedding is L2-normalised
    here). lambda_blend is the paper's training-stability blend (Section 3.4 / its code):
    the target becomes (lambda cos(theta_y) + psi(theta_y)) / (1 + lambda); 0 is pure SphereFace.
    labels int [B] in [0, C) -> float32 [B, C].
    """
    cos = cosine_logits(embeddings, kernel)
    lam = float(lambda_blend)

    def target(c):
        return (lam * c + sphereface_target(c, margin)) / (1.0 + lam)

    return scale * _with_target(cos, labels, target)


def center_loss(labels, embeddings, centers):
    """Center loss (Wen et al. 2016, Eq. 2), averaged over the batch: mean_i 1/2 |x_i - c_{y_i}|^2.

    Args:
      labels: int [B] in [0, C). embeddings: float [B, D]. centers: [C, D] (no gradient flows into
        them; they are updated by `center_update`).
    Returns:
      float32 scalar (0 for an empty batch).
    """
    x, c = _cast_pair(embeddings, centers)
    c = tf.stop_gradient(tf.gather(c, _int_labels(labels)))
    per_example = 0.5 * tf.reduce_sum(tf.square(x - c), axis=1)
    return tf.math.divide_no_nan(tf.reduce_sum(per_example),
                                 tf.cast(tf.shape(x)[0], per_example.dtype))


def center_update(labels, embeddings, centers, alpha=0.5):
    """New centers after one mini-batch (Wen et al. 2016, Eq. 4 and Algorithm 1).

        delta_j = sum_{i: y_i = j} (c_j - x_i) / (1 + #{i: y_i = j}),   c_j <- c_j - alpha delta_j

    Classes absent from the batch keep their center. No gradient.

    Args:
      labels: int [B] in [0, C). embeddings: float [B, D]. centers: float [C, D]. alpha: rate.
    Returns:
      [C, D], the dtype of `centers`.
    """
    centers = tf.convert_to_tensor(centers)
    x, c = _cast_pair(tf.stop_gradient(embeddings), tf.stop_gradient(centers))
    labels = _int_labels(labels)
    num_classes = tf.shape(c)[0]
    diff = tf.gather(c, labels) - x
    delta_sum = tf.math.unsorted_segment_sum(diff, labels, num_classes)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(labels, c.dtype), labels, num_classes)
    new = c - tf.cast(alpha, c.dtype) * delta_sum / (1.0 + counts)[:, None]
    return tf.cast(new, centers.dtype)


# ---------------------------------------------------------------------------------------------
# Layers
class _ClassifierHead(keras.layers.Layer):
    """Base: `[embeddings [B, D], labels [B]]` -> float32 logits [B, C]; owns kernel W [D, C]."""

    def __init__(self, num_classes, kernel_initializer="glorot_uniform", kernel_regularizer=None,
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}.")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

    def build(self, input_shape):
        dim = input_shape[0][-1]
        if dim is None:
            raise ValueError("The embedding dimension must be known to build a classifier head.")
        self.kernel = self.add_weight(name="kernel", shape=(int(dim), self.num_classes),
                                      initializer=self.kernel_initializer,
                                      regularizer=self.kernel_regularizer)

    def call(self, inputs, training=None):
        embeddings, labels = inputs
        return self.logits(labels, embeddings)

    def logits(self, labels, embeddings):
        raise NotImplementedError

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.num_classes)

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor((inputs[0].shape[0], self.num_classes), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes,
                      kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
                      kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer))
        return config


@keras.saving.register_keras_serializable(package="facenet")
class SoftmaxHead(_ClassifierHead):
    """Plain softmax classifier: logits x W + b (labels are accepted and unused)."""

    def __init__(self, num_classes, use_bias=True, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.use_bias = bool(use_bias)

    def build(self, input_shape):
        super().build(input_shape)
        self.bias = (self.add_weight(name="bias", shape=(self.num_classes,), initializer="zeros")
                     if self.use_bias else None)

    def logits(self, labels, embeddings):
        return softmax_logits(embeddings, self.kernel, self.bias)

    def get_config(self):
        config = super().get_config()
        config.update(use_bias=self.use_bias)
        return config


@keras.saving.register_keras_serializable(package="facenet")
class NormFaceHead(_ClassifierHead):
    """NormFace: s cos(theta_j) (labels accepted, unused). See `normface_logits`."""

    def __init__(self, num_classes, scale=30.0, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.scale = float(scale)

    def logits(self, labels, embeddings):
        return normface_logits(embeddings, self.kernel, self.scale)

    def get_config(self):
        config = super().get_config()
        config.update(scale=self.scale)
        return config


@keras.saving.register_keras_serializable(package="facenet")
class SphereFaceHead(_ClassifierHead):
    """SphereFace: s psi(theta_y) on the target. See `sphereface_logits`."""

    def __init__(self, num_classes, margin=4, scale=30.0, lambda_blend=0.0, **kwargs):
        super().__init__(num_classes, **kwargs)
        if int(margin) != margin or int(margin) < 1:
            raise ValueError(f"SphereFace's margin must be a positive integer, got {margin!r}.")
        self.margin = int(margin)
        self.scale = float(scale)
        self.lambda_blend = float(lambda_blend)

    def logits(self, labels, embeddings):
        return sphereface_logits(labels, embeddings, self.kernel, self.scale, self.margin,
                                 self.lambda_blend)

    def get_config(self):
        config = super().get_config()
        config.update(margin=self.margin, scale=self.scale, lambda_blend=self.lambda_blend)
        return config


@keras.saving.register_keras_serializable(package="facenet")
class CosFaceHead(_ClassifierHead):
    """CosFace: s (cos(theta_y) - m) on the target. See `cosface_logits`."""

    def __init__(self, num_classes, scale=64.0, margin=0.35, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.scale = float(scale)
        self.margin = float(margin)

    def logits(self, labels, embeddings):
        return cosface_logits(labels, embeddings, self.kernel, self.scale, self.margin)

    def get_config(self):
        config = super().get_config()
        config.update(scale=self.scale, margin=self.margin)
        return config


@keras.saving.register_keras_serializable(package="facenet")
class ArcFaceHead(_ClassifierHead):
    """ArcFace: s cos(theta_y + m) on the target, easy-margin or threshold handling.

    See `arcface_logits` and `arcface_target`.
    """

    def __init__(self, num_classes, scale=64.0, margin=0.5, easy_margin=False, **kwargs):
        super().__init__(num_classes, **kwargs)
        if not 0.0 <= margin < math.pi:
            raise ValueError(f"ArcFace's margin must be in [0, pi), got {margin!r}.")
        self.scale = float(scale)
        self.margin = float(margin)
        self.easy_margin = bool(easy_margin)

    def logits(self, labels, embeddings):
        return arcface_logits(labels, embeddings, self.kernel, self.scale, self.margin,
                              self.easy_margin)

    def get_config(self):
        config = super().get_config()
        config.update(scale=self.scale, margin=self.margin, easy_margin=self.easy_margin)
        return config


class _CenterMixin:
    """Non-trainable centers [C, D], the weighted center loss via add_loss, the alpha update
    (from the global batch under a tf.distribute strategy)."""

    def _build_centers(self, dim):
        self.centers = self.add_weight(name="centers", shape=(self.num_classes, int(dim)),
                                       initializer="zeros", trainable=False)

    def _add_center_loss(self, embeddings, labels, training):
        if training:
            # Under a strategy every replica moves the centers with the whole global batch
            # (losses/global_batch.py), so their copies stay equal (the single-device update).
            # Gathered before add_loss: the replicas' threads switch at each collective, and the
            # layer's loss list is shared between them (losses.global_batch.ReplicaLocalLosses).
            all_labels, all_embeddings = gather_constant(labels), gather_constant(embeddings)
        centers = tf.convert_to_tensor(self.centers)
        loss = center_loss(labels, embeddings, centers)
        self.add_loss(self.center_weight * loss)
        self.center_tracker.update_state(loss)
        if training:
            self.centers.assign(center_update(all_labels, all_embeddings, centers,
                                              self.center_alpha))


@keras.saving.register_keras_serializable(package="facenet")
class CenterLoss(_CenterMixin, keras.layers.Layer):
    """Center loss as a layer: `[embeddings [B, D], labels [B]]` -> embeddings, unchanged.

    Adds `weight * center_loss(labels, embeddings, centers)` with `add_loss` (Wen et al. 2016:
    L = L_softmax + lambda L_C, paper lambda = 0.003 and alpha = 0.5), tracks the unweighted L_C
    as the metric "center_loss", and in training (training=True) moves the centers by
    `center_update` with rate `alpha`, after the loss has used the current centers. The centers are
    non-trainable weights, zero-initialised. Put a `SoftmaxHead` after it (or use
    `SoftmaxCenterHead`) for the paper's joint supervision.
    """

    def __init__(self, num_classes, alpha=0.5, weight=0.003, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.center_alpha = float(alpha)
        self.center_weight = float(weight)
        self.center_tracker = keras.metrics.Mean(name="center_loss")

    def build(self, input_shape):
        self._build_centers(input_shape[0][-1])

    def call(self, inputs, training=None):
        embeddings, labels = inputs
        self._add_center_loss(embeddings, labels, training)
        return embeddings

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor(inputs[0].shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, alpha=self.center_alpha,
                      weight=self.center_weight)
        return config


@keras.saving.register_keras_serializable(package="facenet")
class SoftmaxCenterHead(_CenterMixin, SoftmaxHead):
    """Softmax head plus center loss (Wen et al. 2016): returns x W + b and adds lambda L_C.

    Trained with sparse softmax cross-entropy on the logits, the total loss is
    softmax + center_weight * center loss. See `CenterLoss` for the centers and their update.
    """

    def __init__(self, num_classes, center_weight=0.003, center_alpha=0.5, use_bias=True,
                 **kwargs):
        super().__init__(num_classes, use_bias=use_bias, **kwargs)
        self.center_weight = float(center_weight)
        self.center_alpha = float(center_alpha)
        self.center_tracker = keras.metrics.Mean(name="center_loss")

    def build(self, input_shape):
        super().build(input_shape)
        self._build_centers(input_shape[0][-1])

    def call(self, inputs, training=None):
        embeddings, labels = inputs
        self._add_center_loss(embeddings, labels, training)
        return self.logits(labels, embeddings)

    def get_config(self):
        config = super().get_config()
        config.update(center_weight=self.center_weight, center_alpha=self.center_alpha)
        return config


_HEAD_CLASSES = {
    "softmax": SoftmaxHead,
    "softmax_center": SoftmaxCenterHead,
    "normface": NormFaceHead,
    "sphereface": SphereFaceHead,
    "cosface": CosFaceHead,
    "arcface": ArcFaceHead,
}


def make_head(name, num_classes, **kwargs):
    """The head layer `name` (one of HEADS) for `num_classes` classes; kwargs go to its class."""
    try:
        cls = _HEAD_CLASSES[name]
    except KeyError:
        raise ValueError(f"Unknown head {name!r}; expected one of {HEADS}.") from None
    return cls(num_classes, **kwargs)
