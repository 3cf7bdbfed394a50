"""Label masks over a batch and masked reductions: which (i, j) pairs are positives or negatives.

Labels are [B] (or [B, 1]) integer identities. Masks are bool [B, B].
"""
import tensorflow as tf


def flatten_labels(labels):
    """Labels as a rank-1 tensor [B] (accepts [B] or [B, 1])."""
    labels = tf.convert_to_tensor(labels)
    return tf.reshape(labels, [-1])


def same_label_mask(labels):
    """bool [B, B]: labels[i] == labels[j] (diagonal included)."""
    labels = flatten_labels(labels)
    return tf.equal(labels[:, None], labels[None, :])


def positive_mask(labels):
    """bool [B, B]: (i, j) is an anchor-positive pair, same label and i != j."""
    same = same_label_mask(labels)
    return tf.logical_and(same, tf.logical_not(tf.eye(tf.shape(same)[0], dtype=tf.bool)))


def negative_mask(labels):
    """bool [B, B]: (i, j) is an anchor-negative pair, different labels."""
    return tf.logical_not(same_label_mask(labels))


def masked_maximum(values, mask, axis=-1):
    """Maximum of `values` where `mask` is True along `axis`.

    Returns (maximum, any): float32 with `axis` removed (0 where the mask is empty, never -inf)
    and bool telling whether the mask had any True entry.
    """
    any_true = tf.reduce_any(mask, axis=axis)
    lowest = tf.constant(float("-inf"), values.dtype)
    m = tf.reduce_max(tf.where(mask, values, lowest), axis=axis)
    return tf.where(any_true, m, tf.zeros_like(m)), any_true


def masked_minimum(values, mask, axis=-1):
    """Minimum of `values` where `mask` is True along `axis`; (minimum or 0 if empty, any)."""
    any_true = tf.reduce_any(mask, axis=axis)
    highest = tf.constant(float("inf"), values.dtype)
    m = tf.reduce_min(tf.where(mask, values, highest), axis=axis)
    return tf.where(any_true, m, tf.zeros_like(m)), any_true


def masked_argmax(values, mask, axis=-1):
    """Index of the maximum where `mask` is True (first one on ties); int32, arbitrary if empty."""
    lowest = tf.constant(float("-inf"), values.dtype)
    return tf.argmax(tf.where(mask, values, lowest), axis=axis, output_type=tf.int32)


def masked_argmin(values, mask, axis=-1):
    """Index of the minimum where `mask` is True (first one on ties); int32, arbitrary if empty."""
    highest = tf.constant(float("inf"), values.dtype)
    return tf.argmin(tf.where(mask, values, highest), axis=axis, output_type=tf.int32)
