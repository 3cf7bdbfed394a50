"""Online triplet mining inside a mini-batch (FaceNet Section 3.2), one function per strategy.

Mining is kept apart from the loss: each function takes a distance matrix `dist` (float32 [B, B],
from `losses.pairwise_distances`) and labels [B], and returns *which* triplets to use as indices
(or, for batch-all, per-pair sums). The loss in `losses.triplet` turns them into a scalar.

Memory is O(B^2) everywhere; no [B, B, B] tensor is ever built. The negative-based strategies sort
each anchor's row of distances once (O(B^2 log B)) and locate every positive distance among the
sorted negatives (a searchsorted done as a cumulative count, see `_sort_rows`):

* semi-hard (paper Eq. 4 and Section 3.2, tfa's rule): for each anchor-positive pair the
  *closest negative farther than the positive*, d_an > d_ap; if none exists, the farthest negative.
* semi-hard, paper window: a uniformly random negative with d_ap < d_an < d_ap + margin ("these
  negatives lie inside the margin"); if the window is empty, the semi-hard rule above.
* hard (batch-hard, Hermans et al. 2017): per anchor the farthest positive and closest negative
  ("hardest"; Section 3.2 reports it collapses training when used from the start).
* all (batch-all): every (a, p, n) triplet with a positive hinge, summed with sorted prefix sums:
  sum_n [d_ap - d_an + m]_+ = c (d_ap + m) - (sum of the c smallest d_an), c = #{n: d_an < d_ap + m}.
"""
from typing import NamedTuple

import tensorflow as tf

from losses import masks

STRATEGIES = ("semi_hard", "semi_hard_paper", "hard", "all")


class PairMining(NamedTuple):
    """One negative per anchor-positive pair (all [B, B], row = anchor, column = positive).

    negative_index: int32, column of the chosen negative for pair (a, p); only meaningful where
      `valid` (it is a clamped, arbitrary index elsewhere).
    valid: bool, (a, p) is an anchor-positive pair (same label, a != p) whose anchor has >= 1
      negative in the batch, i.e. a triplet exists.
    found: bool, the strategy's preferred negative existed (semi-hard: some d_an > d_ap; paper
      window: some d_ap < d_an < d_ap + margin); where `valid & ~found` the fallback was used.
    """
    negative_index: tf.Tensor
    valid: tf.Tensor
    found: tf.Tensor


class AnchorMining(NamedTuple):
    """One triplet per anchor (all [B]): hardest positive and hardest negative.

    positive_index / negative_index: int32 column indices, meaningful only where `valid`.
    valid: bool, the anchor has >= 1 positive and >= 1 negative in the batch.
    """
    positive_index: tf.Tensor
    negative_index: tf.Tensor
    valid: tf.Tensor


class AllMining(NamedTuple):
    """Batch-all sums per anchor-positive pair ([B, B]) and per anchor ([B]).

    valid: bool [B, B], as in PairMining.
    active_count: float32 [B, B], #negatives n of anchor a with d_an < d_ap + margin (positive hinge).
    active_loss_sum: float32 [B, B], sum over those n of (d_ap - d_an + margin); differentiable.
    active_negative_sum: float32 [B, B], sum over those n of d_an; differentiable.
    negative_count: float32 [B], #negatives of each anchor.
    negative_sum: float32 [B], sum of d_an over all negatives of each anchor.
    """
    valid: tf.Tensor
    active_count: tf.Tensor
    active_loss_sum: tf.Tensor
    active_negative_sum: tf.Tensor
    negative_count: tf.Tensor
    negative_sum: tf.Tensor


# ---------------------------------------------------------------------------------------------
# One row-wise sort of packed int64 keys replaces sort + searchsorted (TF's searchsorted kernel
# is single-threaded and was the slowest step). Key of entry (a, j):
#     order-preserving bits of the float value (32) | tie type (2) | column j (21)
# so sorting a row orders its entries by value, then type, then column. Counting the negatives
# before each entry (a cumulative sum) then answers "how many negatives are <= (or <) this value"
# for every entry at once, i.e. searchsorted for all anchor-positive pairs in one pass.
_COLUMN_BITS = 21
_TYPE_FIRST, _TYPE_MIDDLE, _TYPE_LAST = 0, 1, 2
_MAX_BATCH = 1 << _COLUMN_BITS


def _sortable_bits(values):
    """int64 >= 0 with the same order as float32 `values` (-0.0 counted as +0.0)."""
    values = tf.where(tf.equal(values, 0.0), tf.zeros_like(values), values)
    bits = tf.cast(tf.bitcast(values, tf.int32), tf.int64)  # signed
    # Non-negative floats keep their bit order, shifted to [2^31, 2^32); negative floats have
    # bits -2^31 + magnitude and go, order reversed, to [0, 2^31): -bits - 1.
    return tf.where(bits >= 0, bits + (1 << 31), -bits - 1)


def _sort_rows(values, types):
    """Sorts each row of `values` (float32 [B, B]) by (value, type, column).

    Returns (columns, types): int32 [B, B] each, the original column and tie type of the entry
    at each sorted position.
    """
    n = tf.shape(values)[1]
    tf.debugging.assert_less(n, _MAX_BATCH, message="batch too large for packed sort keys")
    columns = tf.range(n, dtype=tf.int64)[None, :]
    keys = (tf.bitwise.left_shift(_sortable_bits(values), _COLUMN_BITS + 2)
            + tf.bitwise.left_shift(tf.cast(types, tf.int64), _COLUMN_BITS) + columns)
    keys = tf.sort(keys, axis=1)
    sorted_columns = tf.cast(tf.bitwise.bitwise_and(keys, _MAX_BATCH - 1), tf.int32)
    sorted_types = tf.cast(
        tf.bitwise.bitwise_and(tf.bitwise.right_shift(keys, _COLUMN_BITS), 3), tf.int32)
    return sorted_columns, sorted_types


def _flat_row_offsets(shape):
    """int32 [B, 1]: a * B, to turn row-local column indices into flat [B * B] indices."""
    return tf.range(shape[0])[:, None] * shape[1]


def _to_original_layout(sorted_values, sorted_columns):
    """Moves per-entry values from sorted positions back to their original columns. [B, B]."""
    shape = tf.shape(sorted_columns)
    flat_perm = tf.reshape(sorted_columns + _flat_row_offsets(shape), [-1])
    position_of = tf.math.invert_permutation(flat_perm)  # flat original -> flat sorted
    return tf.reshape(tf.gather(tf.reshape(sorted_values, [-1]), position_of), shape)


def _compact_negatives(sorted_columns, is_negative, negatives_before):
    """Columns of each row's negatives in increasing distance, first `count` entries. int32 [B, B].

    negatives_before: inclusive cumulative count of negatives along the sorted row.
    """
    shape = tf.shape(sorted_columns)
    count = negatives_before[:, -1:]
    position = tf.range(shape[1])[None, :]
    # Rank of each sorted entry: negatives first (in order), then the others (in order).
    rank = tf.where(is_negative, negatives_before - 1, count + position - negatives_before)
    flat_rank = tf.reshape(rank + _flat_row_offsets(shape), [-1])
    entry_of_rank = tf.math.invert_permutation(flat_rank)
    return tf.reshape(tf.gather(tf.reshape(sorted_columns, [-1]), entry_of_rank), shape)


class _NegativeRanks(NamedTuple):
    negative_columns: tf.Tensor  # int32 [B, B]: row a's negatives by increasing d_an (first count)
    count: tf.Tensor  # int32 [B]: negatives of each anchor
    at_most: tf.Tensor  # int32 [B, B] original layout: #negatives n with d_an <= dist[a, j]


def _negative_ranks(dist, neg_mask):
    """For every (a, j): how many negatives of a are at distance <= d(a, j); O(B^2 log B)."""
    d = tf.stop_gradient(dist)
    # Ties: a negative sorts before a non-negative of equal distance, so it counts as "<=".
    types = tf.where(neg_mask, _TYPE_FIRST, _TYPE_MIDDLE)
    columns, sorted_types = _sort_rows(d, types)
    is_negative = tf.equal(sorted_types, _TYPE_FIRST)
    before = tf.cumsum(tf.cast(is_negative, tf.int32), axis=1)
    return _NegativeRanks(
        negative_columns=_compact_negatives(columns, is_negative, before),
        count=before[:, -1],
        at_most=_to_original_layout(before, columns),
    )


def _valid_pairs(labels):
    pos = masks.positive_mask(labels)
    neg = masks.negative_mask(labels)
    has_negative = tf.reduce_any(neg, axis=1)
    return tf.logical_and(pos, has_negative[:, None]), neg


def _semi_hard_rank(ranks):
    """Rank among the sorted negatives of the closest negative with d_an > d_ap, or the farthest.

    int32 [B, B] rank and bool [B, B] found.
    """
    count = ranks.count[:, None]
    found = ranks.at_most < count
    return tf.where(found, ranks.at_most, tf.maximum(count - 1, 0)), found


def mine_semi_hard(dist, labels):
    """Semi-hard negative for every anchor-positive pair (tfa / FaceNet rule).

    For pair (a, p): argmin over negatives n with d(a, n) > d(a, p) of d(a, n) (lowest column on
    ties); if no negative is farther than the positive, the farthest negative (tfa's fallback).

    Args:
      dist: float32 [B, B] distances. labels: int [B].
    Returns:
      PairMining.
    """
    valid, neg = _valid_pairs(labels)
    ranks = _negative_ranks(dist, neg)
    rank, found = _semi_hard_rank(ranks)
    negative_index = tf.gather(ranks.negative_columns, rank, batch_dims=1)
    return PairMining(negative_index, valid, tf.logical_and(found, valid))


def _uniform(shape, seed):
    if seed is None:
        return tf.random.uniform(shape, dtype=tf.float32)
    return tf.random.stateless_uniform(shape, seed=[int(seed), 0], dtype=tf.float32)


class _BelowThreshold(NamedTuple):
    count: tf.Tensor  # int32 [B, B] original layout: #negatives with d_an < dist[a, j] + margin
    sum: tf.Tensor  # float32 [B, B]: sum of those d_an (differentiable)
    negative_sum: tf.Tensor  # float32 [B]: sum of all negatives' d_an (differentiable)


def _negatives_below_threshold(dist, neg_mask, margin):
    """For every non-negative (a, j): count and sum of negatives with d_an < d(a, j) + margin.

    One sorted row holds negatives (value d_an) and thresholds (d_ap + margin) of the other columns;
    a threshold sorts before a negative of equal value, so the count is strict. O(B^2 log B).
    """
    d = tf.stop_gradient(dist)
    values = tf.where(neg_mask, d, d + margin)
    types = tf.where(neg_mask, _TYPE_LAST, _TYPE_FIRST)
    columns, sorted_types = _sort_rows(values, types)
    is_negative = tf.equal(sorted_types, _TYPE_LAST)
    shape = tf.shape(columns)
    flat_index = tf.reshape(columns + _flat_row_offsets(shape), [-1])
    sorted_dist = tf.reshape(tf.gather(tf.reshape(dist, [-1]), flat_index), shape)
    prefix = tf.cumsum(tf.where(is_negative, sorted_dist, tf.zeros_like(sorted_dist)), axis=1)
    before = tf.cumsum(tf.cast(is_negative, tf.int32), axis=1)
    return _BelowThreshold(
        count=_to_original_layout(before, columns),
        sum=_to_original_layout(prefix, columns),
        negative_sum=prefix[:, -1],
    )


def mine_semi_hard_paper(dist, labels, margin=0.2, seed=None):
    """The paper's semi-hard window, Section 3.2: a random negative with d_ap < d_an < d_ap + margin.

    The window of pair (a, p) is a rank range [lo, hi) in a's sorted negatives (lo = #negatives
    <= d_ap, hi = #negatives < d_ap + margin); a uniform rank is drawn inside it. When the window
    is empty (found = False), the semi-hard rule of `mine_semi_hard` is used instead (closest
    farther negative, else farthest).

    Args:
      dist: float32 [B, B]. labels: int [B]. margin: float alpha, window width.
      seed: None for a fresh draw each call, or an int for a reproducible (stateless) draw.
    Returns:
      PairMining; `found` marks pairs whose window was non-empty.
    """
    valid, neg = _valid_pairs(labels)
    ranks = _negative_ranks(dist, neg)
    fallback, _ = _semi_hard_rank(ranks)
    lo = ranks.at_most
    hi = _negatives_below_threshold(dist, neg, tf.cast(margin, dist.dtype)).count
    width = hi - lo
    found = width > 0
    u = _uniform(tf.shape(dist), seed)
    offset = tf.cast(tf.floor(u * tf.cast(tf.maximum(width, 1), tf.float32)), tf.int32)
    offset = tf.minimum(offset, tf.maximum(width - 1, 0))
    rank = tf.where(found, lo + offset, fallback)
    negative_index = tf.gather(ranks.negative_columns, rank, batch_dims=1)
    return PairMining(negative_index, valid, tf.logical_and(found, valid))


def mine_hard(dist, labels):
    """Batch-hard: per anchor the farthest positive and the closest negative (first index on ties).

    Args:
      dist: float32 [B, B]. labels: int [B].
    Returns:
      AnchorMining.
    """
    pos = masks.positive_mask(labels)
    neg = masks.negative_mask(labels)
    valid = tf.logical_and(tf.reduce_any(pos, axis=1), tf.reduce_any(neg, axis=1))
    d = tf.stop_gradient(dist)
    return AnchorMining(masks.masked_argmax(d, pos), masks.masked_argmin(d, neg), valid)


def mine_all(dist, labels, margin=0.2):
    """Batch-all sums over every triplet with a positive hinge, in O(B^2 log B) time, O(B^2) memory.

    For pair (a, p) with c = #{n : d_an < d_ap + margin}:
    sum_n [d_ap - d_an + margin]_+ = c (d_ap + margin) - (sum of the c smallest d_an).

    Args:
      dist: float32 [B, B] (gradients flow through the returned sums). labels: int [B].
      margin: float.
    Returns:
      AllMining.
    """
    valid, neg = _valid_pairs(labels)
    margin = tf.cast(margin, dist.dtype)
    below = _negatives_below_threshold(dist, neg, margin)
    count_f = tf.cast(below.count, dist.dtype)
    active_loss_sum = count_f * (dist + margin) - below.sum
    zero = tf.zeros_like(dist)
    return AllMining(
        valid=valid,
        active_count=tf.where(valid, count_f, zero),
        active_loss_sum=tf.where(valid, active_loss_sum, zero),
        active_negative_sum=tf.where(valid, below.sum, zero),
        negative_count=tf.reduce_sum(tf.cast(neg, dist.dtype), axis=1),
        negative_sum=below.negative_sum,
    )
