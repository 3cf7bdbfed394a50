"""FaceNet's triplet loss with online mining (Schroff et al. 2015, Section 3.1, Eq. 1-3).

    L = sum over mined (a, p, n) of [ d(a, p) - d(a, n) + alpha ]_+ ,  alpha = 0.2,

with d the squared L2 distance between unit embeddings, and the triplets mined inside the
mini-batch (Section 3.2): all anchor-positive pairs, each with a semi-hard negative.

Normalisation (the paper sums; we average so the scale does not depend on batch size):
  * "semi_hard", "semi_hard_paper": mean over anchor-positive pairs whose anchor has a negative;
  * "hard": mean over anchors with at least one positive and one negative;
  * "all": mean over the triplets with a positive hinge (0 if there is none).
A batch without any triplet (no positive pair, a single identity, one image, or no image at all:
B = 0, also with a batch size unknown until run time) gives loss 0 with a zero gradient, never NaN.

`soft=True` replaces the hinge by softplus(d_ap - d_an) (margin unused, as tfa's soft hard loss);
it is not available with mining="all".
"""
import keras
import tensorflow as tf

from losses import empty_batch, masks, seeding
from losses import mining as mining_lib
from losses.distances import DISTANCES, pairwise_distances
from losses.wrapper import LossFunctionWrapper

STAT_KEYS = ("active_fraction", "mean_d_ap", "mean_d_an", "num_pairs", "num_no_semi_hard")


def _check_args(mining_name, soft, distance):
    if mining_name not in mining_lib.STRATEGIES:
        raise ValueError(f"Unknown mining {mining_name!r}; expected one of {mining_lib.STRATEGIES}.")
    if soft and mining_name == "all":
        raise ValueError("soft=True is not supported with mining='all' (batch-all averages the "
                         "triplets with a positive hinge; softplus has no such set).")
    if not callable(distance) and distance not in DISTANCES:
        raise ValueError(f"Unknown distance {distance!r}; expected one of {DISTANCES}.")


def _per_triplet_loss(d_ap, d_an, margin, soft):
    if soft:
        return tf.math.softplus(d_ap - d_an)
    return tf.maximum(d_ap - d_an + margin, 0.0)


def _mean(values):
    """Mean of a 1-D float32 tensor; 0 when it is empty."""
    return tf.math.divide_no_nan(tf.reduce_sum(values), tf.cast(tf.size(values), tf.float32))


def _selected_triplets_loss(d_ap, d_an, margin, soft):
    """Loss and statistics of one mined triplet per entry of the 1-D d_ap, d_an [T]."""
    per = _per_triplet_loss(d_ap, d_an, margin, soft)
    active = tf.cast(d_ap - d_an + margin > 0.0, tf.float32)
    return _mean(per), {"active_fraction": _mean(active), "mean_d_ap": _mean(d_ap),
                        "mean_d_an": _mean(d_an)}


def triplet_loss_with_stats(labels, embeddings, margin=0.2, distance="squared_l2",
                            mining="semi_hard", soft=False, seed=None):
    """Triplet loss of a batch and its mining statistics.

    Args:
      labels: int [B] (or [B, 1]) identities; float labels holding integers are accepted.
      embeddings: float [B, D] (float16/bfloat16 are computed in float32).
      margin: alpha, in units of `distance` (paper: 0.2 with squared L2 on the unit sphere).
      distance: "squared_l2" | "l2" | "cosine" | callable [B, D] -> [B, B].
      mining: "semi_hard" | "semi_hard_paper" | "hard" | "all" (see `losses.mining`).
      soft: softplus instead of hinge (not with "all").
      seed: for "semi_hard_paper": None draws fresh randomness; an int or int tensor [2] is a
        stateless seed (the same seed draws the same [B, B] uniforms).
    Returns:
      (loss, stats): float32 scalar and a dict of float32 scalars:
        active_fraction: fraction of mined triplets with d_ap - d_an + margin > 0 (for "all": of
          all valid triplets);
        mean_d_ap, mean_d_an: mean distances over the mined triplets (for "all": over all valid
          triplets);
        num_pairs: number of anchor-positive pairs (same label, i != j);
        num_no_semi_hard: anchor-positive pairs (whose anchor has a negative) without any negative
          farther than the positive; for "semi_hard_paper", pairs whose window
          d_ap < d_an < d_ap + margin was empty (they fall back to the semi-hard rule).
    """
    _check_args(mining, soft, distance)
    labels = masks.flatten_labels(labels)
    embeddings = tf.convert_to_tensor(embeddings)
    margin_t = tf.cast(margin, tf.float32)

    def compute():
        dist = pairwise_distances(embeddings, distance)
        if mining == "all":
            loss, stats = _batch_all_loss(dist, labels, margin_t)
        else:
            anchors, positives, negatives, num_no_semi_hard = _mine_triplets(
                dist, labels, mining, margin_t, seed)
            # Only the mined entries of `dist` are read: the gradient is a sparse scatter.
            d_ap, d_an = mining_lib.triplet_distances(dist, anchors, positives, negatives)
            loss, stats = _selected_triplets_loss(d_ap, d_an, margin_t, soft)
            stats["num_no_semi_hard"] = num_no_semi_hard
        stats["num_pairs"] = _num_positive_pairs(labels)
        return tf.cast(loss, tf.float32), {k: tf.cast(stats[k], tf.float32) for k in STAT_KEYS}

    def empty():  # B = 0: no triplet, loss 0 with a zero gradient (mining ops reject [0, 0])
        return empty_batch.zero_loss(embeddings), {k: tf.zeros([], tf.float32) for k in STAT_KEYS}

    loss, stats = empty_batch.if_nonempty(embeddings, compute, empty)
    return loss, {k: tf.stop_gradient(stats[k]) for k in STAT_KEYS}


def _mine_triplets(dist, labels, mining, margin, seed):
    """One triplet per valid pair (semi-hard) or per valid anchor (hard).

    Returns (anchors, positives, negatives, num_no_semi_hard): int32 [T] indices of the T
    triplets, and the float32 statistic.
    """
    if mining == "hard":
        mined = mining_lib.mine_hard(dist, labels)
        anchors = tf.cast(tf.where(mined.valid)[:, 0], tf.int32)
        positives = tf.gather(mined.positive_index, anchors)
        negatives = tf.gather(mined.negative_index, anchors)
        num_no_semi_hard = _count_no_semi_hard(dist, labels)
    else:
        if mining == "semi_hard":
            mined = mining_lib.semi_hard_triplets(dist, labels)
        else:
            mined = mining_lib.semi_hard_paper_triplets(dist, labels, margin, seed)
        anchors, positives, negatives = mined.anchor, mined.positive, mined.negative
        num_no_semi_hard = tf.reduce_sum(tf.cast(tf.logical_not(mined.found), tf.float32))
    return anchors, positives, negatives, num_no_semi_hard


def _batch_all_loss(dist, labels, margin):
    """Batch-all loss (mean over triplets with a positive hinge) and its statistics."""
    totals = mining_lib.batch_all_totals(dist, labels, margin)
    loss = tf.math.divide_no_nan(totals.active_loss_sum, totals.active_count)
    return loss, {
        "active_fraction": tf.math.divide_no_nan(totals.active_count, totals.num_triplets),
        "mean_d_ap": tf.math.divide_no_nan(totals.sum_d_ap, totals.num_triplets),
        "mean_d_an": tf.math.divide_no_nan(totals.sum_d_an, totals.num_triplets),
        "num_no_semi_hard": _count_no_semi_hard(dist, labels),
    }


def _num_positive_pairs(labels):
    """Number of (a, p) with the same label, a != p: sum over images of (images of its identity
    - 1), counted in the sorted labels, O(B log B)."""
    sorted_labels = tf.sort(labels)
    same = (tf.searchsorted(sorted_labels, labels, side="right")
            - tf.searchsorted(sorted_labels, labels, side="left"))
    return tf.cast(tf.reduce_sum(same - 1), tf.float32)


def _count_no_semi_hard(dist, labels):
    """Anchor-positive pairs (anchor with >= 1 negative) with no negative farther than d_ap: O(B^2)."""
    pos = masks.positive_mask(labels)
    neg = masks.negative_mask(labels)
    max_neg, has_neg = masks.masked_maximum(tf.stop_gradient(dist), neg)
    none = tf.logical_and(tf.logical_and(pos, has_neg[:, None]),
                          tf.stop_gradient(dist) >= max_neg[:, None])
    return tf.reduce_sum(tf.cast(none, tf.float32))


def triplet_loss(labels, embeddings, margin=0.2, distance="squared_l2", mining="semi_hard",
                 soft=False, seed=None):
    """Triplet loss of a batch, float32 scalar; see `triplet_loss_with_stats` for the arguments."""
    loss, _ = triplet_loss_with_stats(labels, embeddings, margin=margin, distance=distance,
                                      mining=mining, soft=soft, seed=seed)
    return loss


@keras.saving.register_keras_serializable(package="facenet")
class TripletLoss(LossFunctionWrapper):
    """Keras loss: `loss(y_true=labels [B] int, y_pred=embeddings [B, D])` -> float32 scalar.

    The triplet loss is a batch-level scalar; `call` returns it as a scalar, which Keras' reductions
    leave unchanged, so the result equals `triplet_loss(...)` exactly. Sample weights scale it.
    `mining_scope` ("global" | "replica") and the division by the number of replicas under a
    tf.distribute strategy: see `losses.wrapper`.
    """

    def __init__(self, margin=0.2, distance="squared_l2", mining="semi_hard", soft=False,
                 seed=None, name="triplet_loss", reduction="sum_over_batch_size", dtype=None,
                 mining_scope="global"):
        _check_args(mining, soft, distance)
        if callable(distance):
            raise ValueError("TripletLoss needs a named distance to be serialisable; use "
                             "losses.TripletSemiHardLoss for a callable distance.")
        super().__init__(triplet_loss, name=name, reduction=reduction, dtype=dtype,
                         mining_scope=mining_scope, margin=float(margin), distance=distance,
                         mining=mining, soft=bool(soft), seed=None if seed is None else int(seed))
        # Only the paper window draws at random: a new seed per call, the sequence from `seed`.
        self._seed_generator = seeding.seed_generator(
            self.seed if mining == "semi_hard_paper" else None)

    def _call_kwargs(self):
        return dict(super()._call_kwargs(), seed=seeding.next_seed(self._seed_generator))

    def _draws_at_random(self):
        return self.mining == "semi_hard_paper"
