"""Pairwise distances between embeddings, the quantity FaceNet's loss is built on (Section 3.1).

All functions take embeddings of shape [B, D] (any float dtype; computed in float32) and return a
float32 [B, B] matrix whose diagonal is exactly 0.
"""
import tensorflow as tf

from choices import DISTANCES  # the names, defined once (TF-free; flags.py offers them)


def _to_float32(embeddings):
    embeddings = tf.convert_to_tensor(embeddings)
    if embeddings.dtype != tf.float32:
        embeddings = tf.cast(embeddings, tf.float32)
    return embeddings


def _zero_diagonal(matrix):
    """Sets the diagonal of a [B, B] matrix to exactly 0 (and stops its gradient)."""
    return tf.linalg.set_diag(matrix, tf.zeros_like(tf.linalg.diag_part(matrix)))


def squared_l2_distances(embeddings):
    """Squared Euclidean distance ||f(i) - f(j)||^2, float32 [B, B], clipped at 0.

    Uses ||a||^2 + ||b||^2 - 2 a.b (one matmul, O(B^2 D)); rounding can make it slightly negative,
    hence the clip.
    """
    x = _to_float32(embeddings)
    sq = tf.reduce_sum(tf.square(x), axis=1, keepdims=True)  # [B, 1]
    d = sq + tf.transpose(sq) - 2.0 * tf.matmul(x, x, transpose_b=True)
    return _zero_diagonal(tf.maximum(d, 0.0))


def safe_sqrt(squared):
    """sqrt for non-negative input with a finite gradient: exactly 0 value and 0 gradient at 0.

    Same rule as tfa's pairwise_distance: sqrt(x + 1e-16 [x <= 0]) * [x > 0].
    """
    is_zero = tf.cast(tf.less_equal(squared, 0.0), squared.dtype)
    return tf.sqrt(squared + is_zero * 1e-16) * (1.0 - is_zero)


def l2_distances(embeddings):
    """Euclidean distance ||f(i) - f(j)||, float32 [B, B], finite gradient at 0 (safe sqrt)."""
    return _zero_diagonal(safe_sqrt(squared_l2_distances(embeddings)))


def cosine_distances(embeddings):
    """Cosine distance 1 - cos(f(i), f(j)) in [0, 2], float32 [B, B], clipped at 0.

    Rows are L2-normalised first (tfa's "angular" distance). A zero row has distance 1 to all others.
    """
    x = tf.math.l2_normalize(_to_float32(embeddings), axis=1)
    d = 1.0 - tf.matmul(x, x, transpose_b=True)
    return _zero_diagonal(tf.maximum(d, 0.0))


_BY_NAME = {
    "squared_l2": squared_l2_distances,
    "l2": l2_distances,
    "cosine": cosine_distances,
}


def pairwise_distances(embeddings, distance="squared_l2"):
    """Distance matrix of a batch of embeddings.

    Args:
      embeddings: [B, D] float tensor (float16/bfloat16 are computed in float32).
      distance: "squared_l2" (the paper's, Section 3.1), "l2", "cosine", or a callable
        mapping [B, D] float32 to [B, B].
    Returns:
      float32 [B, B]; the diagonal is exactly 0 for the named distances.
    """
    if callable(distance):
        return tf.cast(distance(_to_float32(embeddings)), tf.float32)
    try:
        fn = _BY_NAME[distance]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown distance {distance!r}; expected one of {DISTANCES} or a callable.") from None
    return fn(embeddings)
