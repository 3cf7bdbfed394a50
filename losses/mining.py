"""Online triplet mining inside a mini-batch (FaceNet Section 3.2), one function per strategy.

Mining is kept apart from the loss: each function takes a distance matrix `dist` (float32 [B, B],
from `losses.pairwise_distances`) and labels [B], and returns *which* triplets to use as indices
(or, for batch-all, per-pair sums). The loss in `losses.triplet` turns them into a scalar; it uses
the `*_triplets` variants (and `batch_all_totals`), which return the same choices as 1-D tensors
over the anchor-positive pairs only, so that the loss and its gradient touch O(#pairs) entries
instead of B^2.

Memory is O(B^2) everywhere; no [B, B, B] tensor is ever built.

The negative-based strategies do not sort the B x B distance matrix. Each anchor has few
positives (K - 1 of them with K images per identity), so its positive distances are the
*thresholds*: they are gathered into a [B, K] table and sorted per row (O(B K log K)), every
negative is placed in the bucket between two consecutive thresholds with one `searchsorted`
(O(B^2 log K)), and per-bucket reductions (minimum, count, sum) over the negatives, followed by a
suffix minimum or a prefix sum over the K buckets, answer "which negatives lie beyond / below
this positive" for every pair at once. Memory: a few [B, B] intermediates plus [B, K] bucket
tables (K <= B). Everything compiles with XLA (Keras jit-compiles train steps on GPUs).

* semi-hard (paper Eq. 4 and Section 3.2, tfa's rule): for each anchor-positive pair the
  *closest negative farther than the positive*, d_an > d_ap (lowest column on ties); if none
  exists, the farthest negative (highest column on ties). Buckets hold the closest negative.
* semi-hard, paper window: a uniformly random negative with d_ap < d_an < d_ap + margin ("these
  negatives lie inside the margin"); if the window is empty, the semi-hard rule above. The window
  is a rank range [lo, hi) among the anchor's negatives sorted by (d_an, column); lo and hi are
  bucket counts, and only this strategy sorts each row's negatives (O(B^2 log B)) to read the
  negative at the drawn rank.
* hard (batch-hard, Hermans et al. 2017): per anchor the farthest positive and closest negative
  ("hardest"; Section 3.2 reports it collapses training when used from the start). O(B^2).
* all (batch-all): every (a, p, n) triplet with a positive hinge, summed in closed form with
  per-bucket prefix sums over the thresholds d_ap + margin:
  sum_n [d_ap - d_an + m]_+ = c (d_ap + m) - (sum of those d_an), c = #{n: d_an < d_ap + m}.
  No triplet tensor and no loop: O(B^2 log K) time, O(B^2) memory, whatever the batch size.
* distance-weighted sampling (Wu et al. 2017, Section 4; used by
  `losses.pair_losses.distance_weighted_loss`): per anchor-positive pair a random negative drawn
  with probability proportional to the inverse density of distances on the unit hypersphere
  (`distance_weighted_log_weights`, `distance_weighted_sampling`); a PairMining. O(B^2).

Random draws (paper window, distance-weighted sampling) take `seed`: None for a fresh draw, or an
int / int tensor [2] for a reproducible stateless one (see `losses.seeding`).
"""
from typing import NamedTuple

import tensorflow as tf

from choices import MINING_STRATEGIES
from losses import empty_batch, masks
from losses.seeding import stateless_seed

STRATEGIES = MINING_STRATEGIES  # the names, defined once in choices.py (TF-free; flags.py offers them)


class PairMining(NamedTuple):
    """One negative per anchor-positive pair (all [B, B], row = anchor, column = positive).

    negative_index: int32, column of the chosen negative for pair (a, p); only meaningful where
      `valid` (it is 0 elsewhere).
    valid: bool, (a, p) is an anchor-positive pair (same label, a != p) whose anchor has >= 1
      negative in the batch, i.e. a triplet exists.
    found: bool, the strategy's preferred negative existed (semi-hard: some d_an > d_ap; paper
      window: some d_ap < d_an < d_ap + margin); where `valid & ~found` the fallback was used.
    """
    negative_index: tf.Tensor
    valid: tf.Tensor
    found: tf.Tensor


class Triplets(NamedTuple):
    """Mined triplets as 1-D int32 / bool tensors of one entry per selected anchor-positive pair.

    anchor, positive, negative: int32 [P] row / column indices into the batch.
    found: bool [P], as `PairMining.found`.
    """
    anchor: tf.Tensor
    positive: tf.Tensor
    negative: tf.Tensor
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
# Order keys. Distances are compared through int32 keys with the same order as the float32
# values, so that "strictly less" becomes "<= key - 1" and one searchsorted(side="right") serves
# both strict and non-strict comparisons. Candidate negatives are packed as int64
#     key << 32 | column
# so that a minimum over them picks by distance, then by lowest column.
_INT32_MAX = (1 << 31) - 1
_INT32_MIN = -(1 << 31)
_INT64_MAX = (1 << 63) - 1
_NO_CANDIDATE = _INT32_MAX << 32  # packed keys >= this are not negatives (or empty buckets)


def _order_keys(values):
    """int32 with the same order as float32 `values`: +0.0 and -0.0 both give 0."""
    bits = tf.bitcast(values, tf.int32)
    # Non-negative floats keep their bit order. A negative one has bits = INT32_MIN + magnitude;
    # its key is -magnitude = INT32_MIN - bits (never overflows).
    return tf.where(bits < 0, _INT32_MIN - bits, bits)


def _packed(keys):
    """int64 key << 32 | column of int32 keys [B, B]: ordered by key, then column."""
    columns = tf.range(tf.shape(keys)[1], dtype=tf.int64)[None, :]
    return tf.bitwise.bitwise_or(tf.bitwise.left_shift(tf.cast(keys, tf.int64), 32), columns)


def _column(packed):
    return tf.cast(tf.bitwise.bitwise_and(packed, (1 << 32) - 1), tf.int32)


def _last_argmax(values):
    """Column of each row's maximum, the highest one on ties. int32 [B]."""
    width = tf.shape(values)[1]
    return width - 1 - tf.argmax(tf.reverse(values, axis=[1]), axis=1, output_type=tf.int32)


class _Pairs(NamedTuple):
    """The True entries of a bool [B, B] pair mask, row-major, as int32 [P] tensors."""
    flat: tf.Tensor  # row * B + column
    row: tf.Tensor
    column: tf.Tensor
    per_row: tf.Tensor  # int32 [B]: pairs in each row


def _pairs(mask):
    # 1-D gathers at flat indices are much cheaper on CPU than gather_nd at (row, column).
    width = tf.shape(mask)[1]
    flat = tf.cast(tf.where(tf.reshape(mask, [-1]))[:, 0], tf.int32)
    return _Pairs(flat, flat // width, flat % width,
                  tf.reduce_sum(tf.cast(mask, tf.int32), axis=1))


def _at_pairs(matrix, pairs):
    """matrix[a, p] for every pair: [P]."""
    return tf.gather(tf.reshape(matrix, [-1]), pairs.flat)


def _bucketize(threshold_keys, query_keys, pairs):
    """Sorts each row's thresholds and counts, for every entry, the thresholds <= its query key.

    threshold_keys: int32 [B, B] whose entries at `pairs` (at most k per row) are the
    thresholds; query_keys: int32 [B, B].
    Returns (bucket int32 [B, B] in [0, k], num_buckets = k + 1), k = max(1, most pairs in a
    row). O(B^2 log k) time: each row's thresholds are placed in a [B, k] table (padded with
    INT32_MAX) by a segment op over the P pairs, sorted, and every entry is located in its row's
    table with one searchsorted. (A ragged tensor would build the table too, but does not compile
    with XLA; a top-k over the [B, B] rows costs more.)
    """
    rows = tf.shape(query_keys)[0]
    k = tf.maximum(tf.reduce_max(pairs.per_row), 1)
    # Pairs are row-major: a pair's slot in its row is its index minus the row's first index.
    first = tf.cumsum(pairs.per_row, exclusive=True)
    slot = tf.range(tf.shape(pairs.flat)[0]) - tf.gather(first, pairs.row)
    table = tf.math.unsorted_segment_min(_at_pairs(threshold_keys, pairs),
                                         pairs.row * k + slot, rows * k)  # empty: INT32_MAX
    table = tf.sort(tf.reshape(table, [rows, k]), axis=1)
    bucket = tf.searchsorted(table, query_keys, side="right", out_type=tf.int32)
    return bucket, k + 1


def _per_bucket(reduce, data, bucket, num_buckets):
    """`reduce` (an unsorted segment op) of data [B, B] per (row, bucket): [B * num_buckets]."""
    rows = tf.shape(bucket)[0]
    segment = tf.range(rows)[:, None] * num_buckets + bucket
    return reduce(data, segment, rows * num_buckets)


def _suffix_min(table, num_buckets):
    """Minimum over buckets j, j+1, ... of every bucket j of a flat int64 [B * W] table (W =
    num_buckets): log2(W) doubling steps. Flat [B * W]."""
    table = tf.reshape(table, [-1, num_buckets])
    column = tf.range(num_buckets)[None, :]
    none = tf.constant(_INT64_MAX, tf.int64)

    def step(shift, x):
        # x[:, j] = min(x[:, j], x[:, j + shift]); roll keeps shapes static for XLA.
        shifted = tf.where(column < num_buckets - shift, tf.roll(x, shift=-shift, axis=1), none)
        return shift * 2, tf.minimum(x, shifted)

    _, table = tf.while_loop(lambda shift, _: shift < num_buckets, step, (tf.constant(1), table))
    return tf.reshape(table, [-1])


def _read(table, bucket, num_buckets, pairs):
    """Flat per-bucket table [B * num_buckets] read at every pair's own bucket: [P]."""
    return tf.gather(table, pairs.row * num_buckets + _at_pairs(bucket, pairs))


def _valid_pairs(labels):
    pos = masks.positive_mask(labels)
    neg = masks.negative_mask(labels)
    has_negative = tf.reduce_any(neg, axis=1)
    return tf.logical_and(pos, has_negative[:, None]), neg


def _scatter_pairs(pairs, values, shape):
    """[B, B] tensor holding `values` [P] at `pairs` and 0 (False) elsewhere."""
    flat_size = [shape[0] * shape[1]]
    if values.dtype == tf.bool:
        dense = tf.cast(tf.scatter_nd(pairs.flat[:, None], tf.cast(values, tf.int32), flat_size),
                        tf.bool)
    else:
        dense = tf.scatter_nd(pairs.flat[:, None], values, flat_size)
    return tf.reshape(dense, shape)


# ---------------------------------------------------------------------------------------------
class _SemiHard(NamedTuple):
    negative: tf.Tensor  # int32 [P]: chosen negative (0 if the anchor has none)
    found: tf.Tensor  # bool [P]: some negative is farther than the positive
    rank: tf.Tensor  # int32 [P]: #negatives with d_an <= d_ap (only if ranks were asked for)


def _semi_hard(keys, neg, pairs, with_rank=False):
    """Semi-hard negative of every pair (a, p) of `pairs`.

    keys: int32 [B, B] order keys of the distances (`_order_keys`). neg: bool [B, B].
    Thresholds are the pairs' distances d_ap; a negative with exactly b thresholds strictly below
    it is farther than the positive of every pair with <= b thresholds at or below d_ap (the pair's
    bucket c). The closest such negative is a suffix minimum over the buckets, read at c.
    """
    # Negative n: #thresholds < d_an (= <= key - 1). Positive p: #thresholds <= d_ap.
    bucket, num_buckets = _bucketize(keys, tf.where(neg, keys - 1, keys), pairs)
    closest = _per_bucket(tf.math.unsorted_segment_min,
                          _packed(tf.where(neg, keys, _INT32_MAX)), bucket, num_buckets)
    best = _read(_suffix_min(closest, num_buckets), bucket, num_buckets, pairs)
    found = best < _NO_CANDIDATE
    has_negative = tf.gather(tf.reduce_any(neg, axis=1), pairs.row)
    farthest = tf.gather(_last_argmax(tf.where(neg, keys, _INT32_MIN)), pairs.row)
    fallback = tf.where(has_negative, farthest, tf.zeros_like(farthest))
    negative = tf.where(found, _column(best), fallback)
    rank = None
    if with_rank:
        # Negatives in buckets below the pair's own bucket are those with d_an <= d_ap.
        count = _per_bucket(tf.math.unsorted_segment_sum, tf.cast(neg, tf.int32), bucket,
                            num_buckets)
        below = tf.reshape(tf.cumsum(tf.reshape(count, [-1, num_buckets]), axis=1,
                                     exclusive=True), [-1])
        rank = _read(below, bucket, num_buckets, pairs)
    return _SemiHard(negative, found, rank)


class _BelowThreshold(NamedTuple):
    count: tf.Tensor  # float32 [P]: #negatives with d_an < d_ap + margin
    sum: tf.Tensor  # float32 [P]: sum of those d_an (differentiable)
    negative_sum: tf.Tensor  # float32 [B]: sum of all negatives' d_an (differentiable)


def _below_threshold(dist, keys, neg, pairs, margin, with_sum=True):
    """For every pair (a, p) of `pairs`: count (and sum) of a's negatives with d_an < d_ap + margin.

    dist: float32 [B, B] (the sums are differentiable); keys: its `_order_keys`; neg: bool [B, B].
    Thresholds are d_ap + margin (float32, as the hinge computes them); a negative with b
    thresholds at or below it is below the threshold of every pair with >= b thresholds strictly
    below its own (the pair's bucket c), so the answer is an inclusive prefix sum read at c.
    """
    threshold_keys = _order_keys(tf.stop_gradient(dist) + margin)
    # Negative n: #thresholds <= d_an. Pair p: #thresholds < d_ap + margin (= <= key - 1).
    bucket, num_buckets = _bucketize(threshold_keys, tf.where(neg, keys, threshold_keys - 1),
                                     pairs)

    def prefix_sums(data):
        table = _per_bucket(tf.math.unsorted_segment_sum, data, bucket, num_buckets)
        return tf.cumsum(tf.reshape(table, [-1, num_buckets]), axis=1)  # [B, num_buckets]

    count = _read(tf.reshape(prefix_sums(tf.cast(neg, tf.float32)), [-1]), bucket, num_buckets,
                  pairs)
    if not with_sum:
        return _BelowThreshold(count, None, None)
    sums = prefix_sums(tf.where(neg, dist, tf.zeros_like(dist)))
    return _BelowThreshold(count, _read(tf.reshape(sums, [-1]), bucket, num_buckets, pairs),
                           sums[:, -1])


def _dense(triplets, pairs, valid):
    shape = tf.shape(valid)
    return PairMining(_scatter_pairs(pairs, triplets.negative, shape), valid,
                      _scatter_pairs(pairs, triplets.found, shape))


def _semi_hard_triplets(dist, labels, pair_mask):
    labels = masks.flatten_labels(labels)
    valid, neg = _valid_pairs(labels)
    if pair_mask is None:
        pair_mask = valid
    pairs = _pairs(pair_mask)
    chosen = _semi_hard(_order_keys(tf.stop_gradient(dist)), neg, pairs)
    return Triplets(pairs.row, pairs.column, chosen.negative, chosen.found), pairs, valid


def semi_hard_triplets(dist, labels, pair_mask=None):
    """`mine_semi_hard` in sparse form, one entry per pair: what the loss uses.

    Args:
      dist: float32 [B, B]. labels: int [B].
      pair_mask: bool [B, B], the anchor-positive pairs to mine for (a subset of the positive
        mask); by default the valid pairs (`PairMining.valid`). A pair whose anchor has no
        negative gets negative 0 and found False.
    Returns:
      Triplets over the True entries of `pair_mask`, in row-major order.
    """
    return _semi_hard_triplets(dist, labels, pair_mask)[0]


def mine_semi_hard(dist, labels):
    """Semi-hard negative for every anchor-positive pair (tfa / FaceNet rule).

    For pair (a, p): argmin over negatives n with d(a, n) > d(a, p) of d(a, n) (lowest column on
    ties); if no negative is farther than the positive, the farthest negative (tfa's fallback;
    highest column on ties). O(B^2 log K) time, O(B^2) memory.

    Args:
      dist: float32 [B, B] distances. labels: int [B].
    Returns:
      PairMining.
    """
    return _dense(*_semi_hard_triplets(dist, labels, None))


def triplet_distances(dist, anchor, positive, negative):
    """(d_ap, d_an): float32 [T] entries of `dist` for int32 [T] triplet indices.

    One 1-D gather of the flattened matrix, so the gradient is a single sparse scatter.
    """
    width = tf.shape(dist)[1]
    index = tf.stack([anchor * width + positive, anchor * width + negative], axis=1)
    d = tf.gather(tf.reshape(dist, [-1]), index)  # [T, 2]
    return d[:, 0], d[:, 1]


def _uniform(shape, seed):
    if seed is None:
        return tf.random.uniform(shape, dtype=tf.float32)
    return tf.random.stateless_uniform(shape, seed=stateless_seed(seed), dtype=tf.float32)


def _semi_hard_paper_triplets(dist, labels, margin, seed):
    labels = masks.flatten_labels(labels)
    valid, neg = _valid_pairs(labels)
    pairs = _pairs(valid)
    keys = _order_keys(tf.stop_gradient(dist))
    semi = _semi_hard(keys, neg, pairs, with_rank=True)
    lo = semi.rank
    hi = tf.cast(_below_threshold(dist, keys, neg, pairs, tf.cast(margin, dist.dtype),
                                  with_sum=False).count, tf.int32)
    width = hi - lo
    found = width > 0
    # The draw is a [B, B] matrix so that a pair's draw does not depend on the other pairs.
    u = _at_pairs(_uniform(tf.shape(dist), seed), pairs)
    offset = tf.cast(tf.floor(u * tf.cast(tf.maximum(width, 1), tf.float32)), tf.int32)
    offset = tf.minimum(offset, tf.maximum(width - 1, 0))
    # Negatives of each row by increasing (d_an, column); non-negatives sort last.
    sorted_negatives = tf.sort(_packed(tf.where(neg, keys, _INT32_MAX)), axis=1)
    in_window = _column(tf.gather(tf.reshape(sorted_negatives, [-1]),
                                  pairs.row * tf.shape(dist)[1] + lo + offset))
    negative = tf.where(found, in_window, semi.negative)
    return Triplets(pairs.row, pairs.column, negative, found), pairs, valid


def semi_hard_paper_triplets(dist, labels, margin=0.2, seed=None):
    """`mine_semi_hard_paper` in sparse form over the valid pairs (row-major): Triplets."""
    return _semi_hard_paper_triplets(dist, labels, margin, seed)[0]


def mine_semi_hard_paper(dist, labels, margin=0.2, seed=None):
    """The paper's semi-hard window, Section 3.2: a random negative with d_ap < d_an < d_ap + margin.

    The window of pair (a, p) is a rank range [lo, hi) in a's negatives sorted by (d_an, column)
    (lo = #negatives <= d_ap, hi = #negatives < d_ap + margin); a uniform rank is drawn inside it.
    When the window is empty (found = False), the semi-hard rule of `mine_semi_hard` is used
    instead (closest farther negative, else farthest).

    Args:
      dist: float32 [B, B]. labels: int [B]. margin: float alpha, window width.
      seed: None for a fresh draw each call, or an int (or int tensor [2]) for a reproducible
        (stateless) draw; the draw of pair (a, p) is u[a, p] of one uniform [B, B] matrix. The
        same seed gives the same matrix: to draw afresh each step, pass a new seed each step
        (`TripletLoss(seed=...)` does, with a `keras.random.SeedGenerator`).
    Returns:
      PairMining; `found` marks pairs whose window was non-empty.
    """
    return _dense(*_semi_hard_paper_triplets(dist, labels, margin, seed))


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


class AllTotals(NamedTuple):
    """Batch-all totals over the valid pairs (float32 scalars); sums are differentiable."""
    active_count: tf.Tensor  # triplets with a positive hinge
    active_loss_sum: tf.Tensor  # sum of their hinges
    num_triplets: tf.Tensor  # all valid triplets (pair x negative of its anchor)
    sum_d_ap: tf.Tensor  # sum of d_ap over all valid triplets
    sum_d_an: tf.Tensor  # sum of d_an over all valid triplets


class _AllPairs(NamedTuple):
    valid: tf.Tensor  # bool [B, B]
    neg: tf.Tensor  # bool [B, B]
    pairs: _Pairs  # the valid pairs
    d_ap: tf.Tensor  # float32 [P]
    below: _BelowThreshold
    loss_sum: tf.Tensor  # float32 [P]: sum over the pair's negatives of the positive hinges


def _all_pairs(dist, labels, margin):
    labels = masks.flatten_labels(labels)
    valid, neg = _valid_pairs(labels)
    pairs = _pairs(valid)
    margin = tf.cast(margin, dist.dtype)
    below = _below_threshold(dist, _order_keys(tf.stop_gradient(dist)), neg, pairs, margin)
    d_ap = _at_pairs(dist, pairs)
    return _AllPairs(valid, neg, pairs, d_ap, below, below.count * (d_ap + margin) - below.sum)


def batch_all_totals(dist, labels, margin=0.2):
    """`mine_all` summed over the valid pairs, without any [B, B] output: AllTotals."""
    mined = _all_pairs(dist, labels, margin)
    negative_count = tf.reduce_sum(tf.cast(mined.neg, tf.float32), axis=1)
    per_pair_negatives = tf.gather(negative_count, mined.pairs.row)
    return AllTotals(
        active_count=tf.reduce_sum(mined.below.count),
        active_loss_sum=tf.reduce_sum(mined.loss_sum),
        num_triplets=tf.reduce_sum(per_pair_negatives),
        sum_d_ap=tf.reduce_sum(mined.d_ap * per_pair_negatives),
        sum_d_an=tf.reduce_sum(tf.gather(mined.below.negative_sum, mined.pairs.row)),
    )


def mine_all(dist, labels, margin=0.2):
    """Batch-all sums over every triplet with a positive hinge, in O(B^2 log K) time, O(B^2) memory.

    For pair (a, p) with c = #{n : d_an < d_ap + margin}:
    sum_n [d_ap - d_an + margin]_+ = c (d_ap + margin) - (sum of those d_an),
    with c and the sum read from per-anchor prefix sums over the sorted thresholds d_ap + margin
    (see the module docstring); memory is the [B, B] intermediates and [B, K] prefix tables, for
    any batch size, with no chunking needed.

    Args:
      dist: float32 [B, B] (gradients flow through the returned sums). labels: int [B].
      margin: float.
    Returns:
      AllMining.
    """
    mined = _all_pairs(dist, labels, margin)
    shape = tf.shape(mined.valid)
    return AllMining(
        valid=mined.valid,
        active_count=_scatter_pairs(mined.pairs, mined.below.count, shape),
        active_loss_sum=_scatter_pairs(mined.pairs, mined.loss_sum, shape),
        active_negative_sum=_scatter_pairs(mined.pairs, mined.below.sum, shape),
        negative_count=tf.reduce_sum(tf.cast(mined.neg, dist.dtype), axis=1),
        negative_sum=mined.below.negative_sum,
    )


# ---------------------------------------------------------------------------------------------
# Distance-weighted sampling (Wu et al. 2017)
def distance_weighted_log_weights(dist, labels, dim, cutoff=0.5, nonzero_loss_cutoff=1.4):
    """Log sampling weights of every (anchor, negative), Wu et al. 2017, Section 4.

    For points uniform on the unit sphere in R^n the pairwise distance has density (Eq. 4)

        q(d) ∝ d^(n-2) (1 - d^2 / 4)^((n-3)/2),   0 < d <= 2,

    and negatives are drawn with probability ∝ 1 / q(d). The distance is first clipped from below
    at `cutoff` (the paper's lambda; it caps the weight of near-duplicate negatives, whose 1/q
    explodes), so

        log w(a, n) = -(n-2) log d' - (n-3)/2 log(max(1 - d'^2 / 4, 1e-8)),  d' = max(d, cutoff).

    Negatives with d >= `nonzero_loss_cutoff` get weight 0 (Wu et al.'s margin loss is zero there
    with its defaults alpha = 0.2, beta = 1.2; it also removes the far tail, where 1/q explodes
    again). Each row is shifted so its largest allowed log-weight is 0: exp never overflows,
    whatever n.

    Args:
      dist: float32 [B, B] Euclidean distances of L2-normalised embeddings (the density assumes
        the unit sphere).
      labels: int [B].
      dim: n, the embedding dimension (int or scalar tensor, >= 2).
      cutoff: lower clip of the distance, same units as `dist`.
      nonzero_loss_cutoff: float, or None to keep every negative.
    Returns:
      float32 [B, B]: log weights (max 0 per row over allowed entries), -inf where the entry is
      not an allowed negative (same label, or too far). A row may be all -inf.
    """
    dist = tf.cast(dist, tf.float32)
    n = tf.cast(dim, tf.float32)
    d = tf.maximum(tf.stop_gradient(dist), tf.cast(cutoff, tf.float32))
    log_w = (-(n - 2.0) * tf.math.log(d)
             - 0.5 * (n - 3.0) * tf.math.log(tf.maximum(1.0 - 0.25 * tf.square(d), 1e-8)))
    allowed = masks.negative_mask(labels)
    if nonzero_loss_cutoff is not None:
        allowed = tf.logical_and(allowed, dist < tf.cast(nonzero_loss_cutoff, tf.float32))
    row_max, _ = masks.masked_maximum(log_w, allowed)
    neg_inf = tf.fill(tf.shape(log_w), tf.constant(float("-inf"), tf.float32))
    return tf.where(allowed, log_w - row_max[:, None], neg_inf)


def distance_weighted_sampling(dist, labels, dim, cutoff=0.5, nonzero_loss_cutoff=1.4, seed=None):
    """Draws one negative per anchor-positive pair by distance-weighted sampling (Wu et al. 2017).

    Pair (a, p) gets negative n with probability exp(log_w[a, n]) / sum_k exp(log_w[a, k]), the
    weights of `distance_weighted_log_weights`; draws are independent across pairs. An anchor all
    of whose negatives lie beyond `nonzero_loss_cutoff` draws uniformly among its negatives
    (found = False). Never returns a same-label negative for a valid pair.

    Args:
      dist: float32 [B, B] Euclidean distances (unit embeddings). labels: int [B].
      dim: embedding dimension n. cutoff, nonzero_loss_cutoff: see `distance_weighted_log_weights`.
      seed: None for a fresh (stateful) draw on each call; an int, or an int tensor of shape [2]
        (e.g. from `keras.random.SeedGenerator.next()`), for a reproducible stateless draw.
    Returns:
      PairMining: negative_index int32 [B, B] (meaningful where valid), valid
      (anchor-positive pair whose anchor has a negative), found (the weighted draw was possible).
    """
    labels = masks.flatten_labels(labels)
    dist = tf.convert_to_tensor(dist)

    def empty():  # B = 0: categorical draws over 0 classes would fail
        none = tf.zeros([0, 0], tf.bool)
        return PairMining(tf.zeros([0, 0], tf.int32), none, none)

    return empty_batch.if_nonempty(
        dist, lambda: _sample(dist, labels, dim, cutoff, nonzero_loss_cutoff, seed), empty)


def _sample(dist, labels, dim, cutoff, nonzero_loss_cutoff, seed):
    log_w = distance_weighted_log_weights(dist, labels, dim, cutoff, nonzero_loss_cutoff)
    neg = masks.negative_mask(labels)
    has_weight = tf.reduce_any(tf.math.is_finite(log_w), axis=1)
    has_negative = tf.reduce_any(neg, axis=1)
    # Fallback: uniform over the negatives; rows with no negative at all get dummy zeros (the
    # categorical op returns an out-of-range index for an all -inf row).
    uniform = tf.where(neg, tf.zeros_like(log_w), tf.fill(tf.shape(log_w), float("-inf")))
    logits = tf.where(has_weight[:, None], log_w,
                      tf.where(has_negative[:, None], uniform, tf.zeros_like(log_w)))
    num = tf.shape(logits)[1]
    if seed is None:
        draws = tf.random.categorical(logits, num, dtype=tf.int32)
    else:
        draws = tf.random.stateless_categorical(logits, num, seed=stateless_seed(seed),
                                                dtype=tf.int32)
    valid = tf.logical_and(masks.positive_mask(labels), has_negative[:, None])
    found = tf.logical_and(valid, has_weight[:, None])
    return PairMining(tf.minimum(draws, num - 1), valid, found)
