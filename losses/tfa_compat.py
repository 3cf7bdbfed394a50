"""Drop-in replacements for tensorflow_addons' triplet losses (tfa 0.23, now unmaintained).

Same names, arguments, defaults and results (loss and gradient) as
`tfa.losses.TripletSemiHardLoss` / `tfa.losses.TripletHardLoss` and the functions
`triplet_semihard_loss` / `triplet_hard_loss`, but in O(B^2) memory (tfa tiles a [B*B, B] tensor,
5 GB at B = 720), without tfa's NaN when a batch has no positive pair and without its failure
on an empty batch (we return 0 in both cases).

tfa's rules, reproduced exactly (also in degenerate batches):
  * semi-hard: per anchor-positive pair, the closest negative farther than the positive, else the
    farthest negative (an anchor without negatives uses the smallest entry of its distance row);
    loss = sum of hinges over positive pairs / number of positive pairs;
  * hard: per anchor, farthest positive (without positives: the row minimum, 0 for the named
    metrics) and closest negative (without negatives: the row maximum);
    loss = mean over *all* anchors of the hinge, or of log1p(exp(d_ap - d_an)) when soft.
distance_metric: "L2" (Euclidean, tfa's default), "squared-L2", "angular" (1 - cosine), or a
callable [B, D] float32 -> [B, B] (the Keras classes then cannot be serialised: get_config
raises TypeError).
Output is float32 (tfa returns the embeddings' dtype for float16/bfloat16 input).
"""
import keras
import tensorflow as tf

from losses import empty_batch, masks, mining
from losses.distances import cosine_distances, l2_distances, squared_l2_distances
from losses.wrapper import LossFunctionWrapper

_METRICS = {"L2": l2_distances, "squared-L2": squared_l2_distances, "angular": cosine_distances}


def _distance_matrix(embeddings, distance_metric):
    embeddings = tf.cast(tf.convert_to_tensor(embeddings), tf.float32)
    if callable(distance_metric):
        return tf.cast(distance_metric(embeddings), tf.float32)
    if distance_metric not in _METRICS:
        raise ValueError(f"Unknown distance_metric {distance_metric!r}; expected one of "
                         f"{tuple(_METRICS)} or a callable.")
    return _METRICS[distance_metric](embeddings)


def _unless_empty(y_pred, compute):
    """compute(y_pred) as a tensor, or 0 with a zero gradient for an empty batch (B = 0)."""
    y_pred = tf.convert_to_tensor(y_pred)
    return empty_batch.if_nonempty(y_pred, lambda: compute(y_pred),
                                   lambda: empty_batch.zero_loss(y_pred))


def triplet_semihard_loss(y_true, y_pred, margin=1.0, distance_metric="L2"):
    """tfa's semi-hard triplet loss: float32 scalar.

    y_true: int [B] or [B, 1]; y_pred: float [B, D]. 0 for an empty batch (B = 0), where tfa fails.
    """
    return _unless_empty(y_pred, lambda x: _semihard(y_true, x, margin, distance_metric))


def _semihard(y_true, y_pred, margin, distance_metric):
    labels = masks.flatten_labels(y_true)
    dist = _distance_matrix(y_pred, distance_metric)
    # Every positive pair counts; its anchor has no negative only in a single-identity batch.
    mined = mining.semi_hard_triplets(dist, labels, pair_mask=masks.positive_mask(labels))
    d_ap, d_an = mining.triplet_distances(dist, mined.anchor, mined.positive, mined.negative)
    # No negative at all: tfa's masked maximum over an empty mask is the row minimum.
    has_negative = tf.reduce_any(masks.negative_mask(labels), axis=1)
    row_min = tf.gather(dist, tf.argmin(dist, axis=1, output_type=tf.int32), batch_dims=1)
    d_an = tf.where(tf.gather(has_negative, mined.anchor), d_an, tf.gather(row_min, mined.anchor))
    hinge = tf.maximum(d_ap - d_an + tf.cast(margin, tf.float32), 0.0)
    return tf.math.divide_no_nan(tf.reduce_sum(hinge), tf.cast(tf.size(hinge), tf.float32))


def triplet_hard_loss(y_true, y_pred, margin=1.0, soft=False, distance_metric="L2"):
    """tfa's batch-hard triplet loss: float32 scalar.

    y_true: int [B] or [B, 1]; y_pred: float [B, D]. 0 for an empty batch (B = 0), where tfa fails.
    """
    return _unless_empty(y_pred, lambda x: _hard(y_true, x, margin, soft, distance_metric))


def _hard(y_true, y_pred, margin, soft, distance_metric):
    labels = masks.flatten_labels(y_true)
    dist = _distance_matrix(y_pred, distance_metric)
    pos = masks.positive_mask(labels)
    neg = masks.negative_mask(labels)
    d = tf.stop_gradient(dist)
    d_ap = tf.gather(dist, masks.masked_argmax(d, pos), batch_dims=1)
    d_an = tf.gather(dist, masks.masked_argmin(d, neg), batch_dims=1)
    row_min = tf.gather(dist, tf.argmin(d, axis=1, output_type=tf.int32), batch_dims=1)
    row_max = tf.gather(dist, tf.argmax(d, axis=1, output_type=tf.int32), batch_dims=1)
    d_ap = tf.where(tf.reduce_any(pos, axis=1), d_ap, row_min)
    d_an = tf.where(tf.reduce_any(neg, axis=1), d_an, row_max)
    if soft:
        per_anchor = tf.math.softplus(d_ap - d_an)
    else:
        per_anchor = tf.maximum(d_ap - d_an + tf.cast(margin, tf.float32), 0.0)
    return tf.math.divide_no_nan(tf.reduce_sum(per_anchor),
                                 tf.cast(tf.size(per_anchor), tf.float32))


def _check_metric(distance_metric):
    if not callable(distance_metric) and distance_metric not in _METRICS:
        raise ValueError(f"Unknown distance_metric {distance_metric!r}.")


@keras.saving.register_keras_serializable(package="facenet")
class TripletSemiHardLoss(LossFunctionWrapper):
    """Drop-in for `tfa.losses.TripletSemiHardLoss(margin=1.0, distance_metric="L2")`.

    Called as loss(y_true=labels [B], y_pred=embeddings [B, D]) -> float32 scalar.
    """

    def __init__(self, margin=1.0, distance_metric="L2", name="triplet_semihard_loss",
                 reduction="none", dtype=None, mining_scope="global", **kwargs):
        _check_metric(distance_metric)
        super().__init__(triplet_semihard_loss, name=name, reduction=reduction or "none",
                         dtype=dtype, mining_scope=mining_scope, margin=float(margin),
                         distance_metric=distance_metric)


@keras.saving.register_keras_serializable(package="facenet")
class TripletHardLoss(LossFunctionWrapper):
    """Drop-in for `tfa.losses.TripletHardLoss(margin=1.0, soft=False, distance_metric="L2")`."""

    def __init__(self, margin=1.0, soft=False, distance_metric="L2", name="triplet_hard_loss",
                 reduction="none", dtype=None, mining_scope="global", **kwargs):
        _check_metric(distance_metric)
        super().__init__(triplet_hard_loss, name=name, reduction=reduction or "none",
                         dtype=dtype, mining_scope=mining_scope, margin=float(margin), soft=bool(soft),
                         distance_metric=distance_metric)
