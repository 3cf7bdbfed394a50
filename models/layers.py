"""Custom Keras layers used by the FaceNet networks (Section 3.3, Tables 1-2).

All layers are registered as serialisable under the package ``"facenet"`` so that a ``.keras`` file
reloads without ``custom_objects`` once :mod:`models` is imported. None of them is a Lambda layer.

- :class:`L2Pooling2D`: "L2" pooling of Table 2, ``sqrt(sum of squares over the window)``.
- :class:`L2Normalization`: the final embedding normalisation ``||f(x)||_2 = 1`` (Section 3); always
  computes in float32, also under the ``mixed_float16`` policy.
- :class:`Maxout`: the maxout non-linearity of NN1's fully connected layers (Table 1, ``p=2``).
- :class:`LocalResponseNormalization`: the paper's "norm"/"rnorm" (local response normalisation).
"""
import numpy as np
import keras
import tensorflow as tf

PACKAGE = "facenet"


def _same_padding_counts(size, pool, stride):
    """Number of valid (non-padded) input cells in each SAME-padded window along one axis.

    Returns int array [ceil(size / stride)]: for output i the window covers input rows
    ``[i * stride - pad_before, i * stride - pad_before + pool)`` intersected with ``[0, size)``.
    """
    out = -(-size // stride)
    pad_total = max((out - 1) * stride + pool - size, 0)
    start = np.arange(out) * stride - pad_total // 2
    lo = np.maximum(start, 0)
    hi = np.minimum(start + pool, size)
    return (hi - lo).astype(np.float32)


def _safe_sqrt(s):
    """sqrt(s) for s >= 0 with a finite gradient everywhere: the gradient is 0 where s == 0.

    Uses the "double where" so that neither the value nor the gradient ever sees sqrt(0)'s
    infinite derivative: value exactly sqrt(s), gradient exactly 0.5 / sqrt(s) where s > 0.
    """
    positive = s > 0
    safe = tf.where(positive, s, tf.ones_like(s))
    return tf.where(positive, tf.sqrt(safe), tf.zeros_like(s))


@keras.saving.register_keras_serializable(package=PACKAGE)
class L2Pooling2D(keras.layers.Layer):
    """L2 pooling: ``y = sqrt(sum_{window} x^2)`` per channel (FaceNet Table 2, "L2").

    Input [N, H, W, C] (channels last); output [N, H', W', C] with H' = ceil(H / stride) for
    ``padding="same"`` and ``floor((H - pool) / stride) + 1`` for ``"valid"``.

    With SAME padding the padded cells contribute nothing: the sum over the window is computed as
    ``avg_pool(x^2) * (number of valid cells in the window)`` (TF's average pooling already
    excludes padding from its divisor), so windows on the border are not over-counted. The square
    root has a finite gradient when a whole window is zero (common after a ReLU). Squares are
    summed in float32 also under mixed precision (float16 overflows above 65504).
    """

    def __init__(self, pool_size=3, strides=1, padding="same", **kwargs):
        super().__init__(**kwargs)
        self.pool_size = tuple(pool_size) if isinstance(pool_size, (list, tuple)) else (
            int(pool_size), int(pool_size))
        self.strides = tuple(strides) if isinstance(strides, (list, tuple)) else (
            int(strides), int(strides))
        padding = padding.lower()
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        self.padding = padding

    def _window_counts(self, height, width, dtype):
        """Valid cells per window, [H', W', 1] (static sizes) or computed in-graph (dynamic)."""
        ph, pw = self.pool_size
        sh, sw = self.strides
        if self.padding == "valid":
            return tf.constant(float(ph * pw), dtype=dtype)
        if isinstance(height, int) and isinstance(width, int):
            counts = np.outer(_same_padding_counts(height, ph, sh),
                              _same_padding_counts(width, pw, sw))
            return tf.constant(counts[:, :, None], dtype=dtype)
        # Unknown spatial size: the count map is avg_pool's divisor, recovered from a ones image.
        ones = tf.ones([1, height, width, 1], dtype=tf.float32)
        summed = tf.nn.depthwise_conv2d(ones, tf.ones([ph, pw, 1, 1], tf.float32),
                                        strides=[1, sh, sw, 1], padding="SAME")
        return tf.cast(summed[0], dtype)

    def call(self, inputs):
        ph, pw = self.pool_size
        sh, sw = self.strides
        # Sums of squares overflow float16 (max 65504) for activations of a few tens: always
        # square and sum in float32, and cast the result back to the layer's compute dtype.
        squared = tf.square(tf.cast(inputs, tf.float32))
        mean = tf.nn.avg_pool2d(squared, ksize=[ph, pw], strides=[sh, sw],
                                padding=self.padding.upper())
        static = inputs.shape
        height = static[1] if static[1] is not None else tf.shape(inputs)[1]
        width = static[2] if static[2] is not None else tf.shape(inputs)[2]
        summed = mean * self._window_counts(height, width, mean.dtype)
        return tf.cast(_safe_sqrt(summed), inputs.dtype)

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape

        def out(size, pool, stride):
            if size is None:
                return None
            if self.padding == "same":
                return -(-size // stride)
            return (size - pool) // stride + 1

        return (n, out(h, self.pool_size[0], self.strides[0]),
                out(w, self.pool_size[1], self.strides[1]), c)

    def get_config(self):
        config = super().get_config()
        config.update(pool_size=self.pool_size, strides=self.strides, padding=self.padding)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class L2Normalization(keras.layers.Layer):
    """Rows scaled to unit L2 norm, ``y = x / max(||x||_2, sqrt(epsilon))`` along ``axis``.

    Input [N, D] (any float dtype); output [N, D] float32 with ``||y_i||_2 = 1`` (FaceNet Section 3:
    the embedding lives on the unit hypersphere). The layer's dtype policy is forced to float32 so
    the norm is computed in full precision even under ``mixed_float16``.
    """

    def __init__(self, axis=-1, epsilon=1e-12, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.axis = axis
        self.epsilon = float(epsilon)

    def call(self, inputs):
        inputs = tf.cast(inputs, tf.float32)
        return tf.math.l2_normalize(inputs, axis=self.axis, epsilon=self.epsilon)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.update(axis=self.axis, epsilon=self.epsilon)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class Maxout(keras.layers.Layer):
    """Maxout over groups of ``C / num_units`` consecutive channels (Goodfellow et al. 2013).

    Input [..., C] with C divisible by ``num_units``; output [..., num_units] where
    ``y[..., u] = max_k x[..., u * p + k]`` and ``p = C / num_units``. NN1 (Table 1) uses ``p = 2``
    after fc1 and fc2.
    """

    def __init__(self, num_units, **kwargs):
        super().__init__(**kwargs)
        self.num_units = int(num_units)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None or channels % self.num_units:
            raise ValueError(
                f"Maxout: {channels} input channels are not divisible by num_units={self.num_units}")
        self.pieces = channels // self.num_units

    def call(self, inputs):
        shape = tf.shape(inputs)
        grouped = tf.reshape(inputs, tf.concat([shape[:-1], [self.num_units, self.pieces]], 0))
        return tf.reduce_max(grouped, axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_units,)

    def get_config(self):
        config = super().get_config()
        config.update(num_units=self.num_units)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class LocalResponseNormalization(keras.layers.Layer):
    """Local response normalisation across channels (the paper's "norm"/"rnorm").

    ``y_c = x_c / (bias + alpha * sum_{|c' - c| <= depth_radius} x_{c'}^2) ** beta`` on [N, H, W, C],
    output the same shape. Defaults follow the usual Inception/GoogLeNet setting (radius 5,
    alpha 1e-4, beta 0.75, bias 1). Computed in float32 (also under mixed precision) and cast back.
    """

    def __init__(self, depth_radius=5, bias=1.0, alpha=1e-4, beta=0.75, **kwargs):
        super().__init__(**kwargs)
        self.depth_radius = int(depth_radius)
        self.bias = float(bias)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def call(self, inputs):
        out = tf.nn.local_response_normalization(
            tf.cast(inputs, tf.float32), depth_radius=self.depth_radius, bias=self.bias,
            alpha=self.alpha, beta=self.beta)
        return tf.cast(out, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(depth_radius=self.depth_radius, bias=self.bias, alpha=self.alpha,
                      beta=self.beta)
        return config
