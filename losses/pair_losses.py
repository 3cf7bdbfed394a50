"""Pair and metric losses that followed FaceNet's triplet loss, each over a whole mini-batch.

    contrastive_loss          DeepID2 (Sun et al. 2014, Eq. 5): pulls positive pairs together,
                              pushes negative pairs apart up to a margin; every pair in the batch.
    lifted_structured_loss    Song et al. 2016 ("Deep Metric Learning via Lifted Structured
                              Feature Embedding", Eq. 4): smooth log-sum-exp over all negatives of
                              both ends of every positive pair.
    trihard_loss              Batch-hard with the soft margin, Hermans et al. 2017 ("In Defense of
                              the Triplet Loss for Person Re-Identification", Section 2):
                              log(1 + exp(max_p d_ap - min_n d_an)) per anchor.
    distance_weighted_loss    Wu et al. 2017 ("Sampling Matters in Deep Embedding Learning",
                              Section 4): one negative per anchor-positive pair, drawn with
                              probability proportional to the inverse density of distances on the
                              unit hypersphere (the sampler is in `losses.mining`), then the
                              margin loss (Eq. 3) or the triplet loss.

Conventions (as in `losses.triplet`): labels int [B] (or [B, 1], or floats holding integers);
embeddings float [B, D], computed in float32 (float16 / bfloat16 are cast up); the loss is a
float32 scalar, averaged rather than summed so its scale does not depend on the batch size; a batch
without any usable pair (one image, one identity, no positive pair, or no image at all: B = 0)
gives 0 with a zero gradient, never NaN. Distances are between the embeddings as given: the
unit-sphere margins quoted below assume L2-normalised embeddings. Memory is O(B^2) everywhere, no
[B, B, B] tensor is built, and all randomness is in-graph and seedable (stateless ops).

Each function has a Keras form (ContrastiveLoss, LiftedStructuredLoss, TriHardLoss,
DistanceWeightedLoss), a thin `losses.wrapper.LossFunctionWrapper` subclass; its `mining_scope`
("global", default, or "replica") says whether, under a tf.distribute strategy, the pairs are
formed over the global batch or inside each replica's slice (`losses.global_batch`).
"""
import keras
import tensorflow as tf

from losses import masks
from losses.distances import (DISTANCES, _to_float32, pairwise_distances, safe_sqrt,
                              squared_l2_distances)
from losses.mining import distance_weighted_sampling
from losses.seeding import next_seed, seed_generator
from losses.wrapper import LossFunctionWrapper

SAMPLED_LOSSES = ("margin", "triplet")


def _check_distance(distance):
    if distance not in DISTANCES:
        raise ValueError(f"Unknown distance {distance!r}; expected one of {DISTANCES}.")


def _masked_mean(values, mask):
    """Mean of `values` where `mask` (bool, same shape); 0 if the mask is empty. float32 scalar."""
    total = tf.reduce_sum(tf.where(mask, values, tf.zeros_like(values)))
    return tf.math.divide_no_nan(total, tf.reduce_sum(tf.cast(mask, values.dtype)))


# ---------------------------------------------------------------------------------------------
# Contrastive loss (DeepID2)
def contrastive_loss(labels, embeddings, margin=1.0, distance="l2"):
    """DeepID2's verification (contrastive) loss over every pair of the batch.

    Sun et al. 2014, "Deep Learning Face Representation by Joint Identification-Verification",
    Eq. 5 (after Hadsell et al. 2006):

        l(i, j) = 1/2 d(i, j)^2                   if labels[i] == labels[j]
                  1/2 max(0, margin - d(i, j))^2  otherwise,

    averaged over all unordered pairs i < j (same value as over ordered pairs i != j).

    Args:
      labels: int [B] identities.
      embeddings: float [B, D].
      margin: m, in units of `distance` (DeepID2: L2 distance; 1.0 is half the diameter of the unit
        sphere).
      distance: "l2" (the paper's), "squared_l2" or "cosine"; d above.
    Returns:
      float32 scalar; 0 for a batch of one image.
    """
    _check_distance(distance)
    labels = masks.flatten_labels(labels)
    if distance == "l2":
        squared = squared_l2_distances(embeddings)
        d = safe_sqrt(squared)
    else:
        d = pairwise_distances(embeddings, distance)
        squared = tf.square(d)
    margin = tf.cast(margin, tf.float32)
    same = masks.same_label_mask(labels)
    per_pair = 0.5 * tf.where(same, squared, tf.square(tf.nn.relu(margin - d)))
    off_diagonal = tf.logical_not(tf.eye(tf.shape(d)[0], dtype=tf.bool))
    return _masked_mean(per_pair, off_diagonal)


# ---------------------------------------------------------------------------------------------
# Lifted structured loss (Song et al. 2016)
def lifted_structured_loss(labels, embeddings, margin=1.0, distance="l2"):
    """Smooth lifted structured loss over every positive pair of the batch.

    Song et al. 2016, Eq. 4: for a positive pair (i, j), with N(i) the negatives of i,

        J_ij = log( sum_{k in N(i)} exp(margin - D_ik) + sum_{l in N(j)} exp(margin - D_jl) ) + D_ij
        L = 1 / (2 |P|) sum_{(i, j) in P} max(0, J_ij)^2 ,   P = positive pairs i < j.

    The log-sum-exp is computed stably by shifting each row by its largest term.
    Positive pairs whose identity has no negative in the batch are left out.

    Args:
      labels: int [B]. embeddings: float [B, D].
      margin: alpha, in units of `distance` (paper: 1.0 with the Euclidean distance).
      distance: "l2" (the paper's D), "squared_l2" or "cosine".
    Returns:
      float32 scalar; 0 when there is no positive pair with a negative.
    """
    _check_distance(distance)
    labels = masks.flatten_labels(labels)
    d = pairwise_distances(embeddings, distance)
    neg = masks.negative_mask(labels)
    has_negative = tf.reduce_any(neg, axis=1)
    valid = tf.logical_and(masks.positive_mask(labels), has_negative[:, None])

    x = tf.cast(margin, tf.float32) - d  # exponents, [B, B]
    row_max, _ = masks.masked_maximum(tf.stop_gradient(x), neg)  # [B], 0 for rows without negatives
    # exp of masked entries only (the double where keeps unmasked entries out of exp and its grad).
    shifted = tf.where(neg, x - row_max[:, None], tf.zeros_like(x))
    row_sum = tf.reduce_sum(tf.where(neg, tf.exp(shifted), tf.zeros_like(x)), axis=1)  # >= 1 if any
    # log(row_sum[i] e^{m_i} + row_sum[j] e^{m_j}) with M = max(m_i, m_j) factored out.
    top = tf.maximum(row_max[:, None], row_max[None, :])
    inner = (row_sum[:, None] * tf.exp(row_max[:, None] - top)
             + row_sum[None, :] * tf.exp(row_max[None, :] - top))
    inner = tf.where(valid, inner, tf.ones_like(inner))
    j = tf.math.log(inner) + top + d
    per_pair = tf.square(tf.nn.relu(j))
    # Mean over ordered pairs of max(0, J)^2 / 2 equals the paper's 1/(2|P|) sum over i < j.
    return 0.5 * _masked_mean(per_pair, valid)


# ---------------------------------------------------------------------------------------------
# TriHard with a soft margin (Hermans et al. 2017)
def trihard_loss(labels, embeddings, distance="l2"):
    """Batch-hard triplet loss with the soft margin ("TriHard"), averaged over anchors.

    Hermans et al. 2017, Eq. 5 with the soft margin of Section 2:

        L = mean_a log(1 + exp( max_{p: y_p = y_a, p != a} D_ap - min_{n: y_n != y_a} D_an )),

    over the anchors that have at least one positive and one negative. The gradient flows through
    the hardest positive and negative (split equally on exact ties, as `tf.reduce_max` does).
    `losses.triplet_loss(mining="hard", soft=True)` gives the same value; this is the stand-alone
    form with the paper's Euclidean distance as default.

    Args:
      labels: int [B]. embeddings: float [B, D].
      distance: "l2" (the paper's), "squared_l2" or "cosine".
    Returns:
      float32 scalar; 0 when no anchor has both a positive and a negative.
    """
    _check_distance(distance)
    labels = masks.flatten_labels(labels)
    d = pairwise_distances(embeddings, distance)
    hardest_positive, has_positive = masks.masked_maximum(d, masks.positive_mask(labels))
    hardest_negative, has_negative = masks.masked_minimum(d, masks.negative_mask(labels))
    valid = tf.logical_and(has_positive, has_negative)
    return _masked_mean(tf.math.softplus(hardest_positive - hardest_negative), valid)


def _check_sampled_loss(loss):
    if loss not in SAMPLED_LOSSES:
        raise ValueError(f"Unknown loss {loss!r}; expected one of {SAMPLED_LOSSES}.")


def distance_weighted_loss(labels, embeddings, loss="margin", margin=0.2, beta=1.2, cutoff=0.5,
                           nonzero_loss_cutoff=1.4, seed=None):
    """Distance-weighted sampling with the margin loss or the triplet loss (Wu et al. 2017).

    Every anchor-positive pair (a, p) draws a negative n by
    `losses.mining.distance_weighted_sampling`, on the Euclidean distances D of the embeddings
    (sampling is not differentiated; the loss is).

    * loss="margin" (Eq. 3): l(a, p) = [margin + D_ap - beta]_+ and
      l(a, n) = [margin + beta - D_an]_+
      for each sampled pair; the sum over all these terms divided by the number of non-zero terms
      (0 if none), as in the authors' implementation. beta is the boundary (paper: learnable,
      initialised at 1.2; pass a tensor or variable here to learn it).
    * loss="triplet" (Eq. 2): [D_ap^2 - D_an^2 + margin]_+ on the sampled triplets, averaged over
      them.

    Args:
      labels: int [B]. embeddings: float [B, D], L2-normalised (the sampling density assumes the
        unit sphere in R^D).
      loss: "margin" | "triplet".
      margin: alpha (paper: 0.2), in units of D (margin loss) or D^2 (triplet loss).
      beta: margin-loss boundary, float or scalar tensor (unused by the triplet loss).
      cutoff: lambda, lower clip of the distance in the weights (paper: 0.5).
      nonzero_loss_cutoff: negatives at D >= this are not sampled (1.4); None keeps all.
      seed: None (fresh draws), an int or an int tensor of shape [2] (stateless, reproducible).
    Returns:
      float32 scalar.
    """
    _check_sampled_loss(loss)
    labels = masks.flatten_labels(labels)
    embeddings = _to_float32(embeddings)
    squared = squared_l2_distances(embeddings)
    d = safe_sqrt(squared)
    dim = tf.shape(embeddings)[1]
    sampled = distance_weighted_sampling(d, labels, dim, cutoff, nonzero_loss_cutoff, seed)
    margin = tf.cast(margin, tf.float32)
    valid = sampled.valid
    if loss == "triplet":
        squared_an = tf.gather(squared, sampled.negative_index, batch_dims=1)
        return _masked_mean(tf.nn.relu(squared - squared_an + margin), valid)
    beta = tf.cast(beta, tf.float32)
    d_an = tf.gather(d, sampled.negative_index, batch_dims=1)
    zero = tf.zeros_like(d)
    positive_term = tf.where(valid, tf.nn.relu(margin + d - beta), zero)
    negative_term = tf.where(valid, tf.nn.relu(margin + beta - d_an), zero)
    active = (tf.reduce_sum(tf.cast(positive_term > 0.0, tf.float32))
              + tf.reduce_sum(tf.cast(negative_term > 0.0, tf.float32)))
    return tf.math.divide_no_nan(tf.reduce_sum(positive_term + negative_term), active)


# ---------------------------------------------------------------------------------------------
# Keras losses: `loss(y_true=labels [B], y_pred=embeddings [B, D])` -> the function's scalar.
@keras.saving.register_keras_serializable(package="facenet")
class ContrastiveLoss(LossFunctionWrapper):
    """Keras form of `contrastive_loss`: `loss(y_true=labels, y_pred=embeddings)` -> scalar."""

    def __init__(self, margin=1.0, distance="l2", name=None, reduction="sum_over_batch_size",
                 dtype=None, mining_scope="global"):
        _check_distance(distance)
        super().__init__(contrastive_loss, name=name or "contrastive_loss", reduction=reduction,
                         dtype=dtype, mining_scope=mining_scope, margin=float(margin),
                         distance=distance)


@keras.saving.register_keras_serializable(package="facenet")
class LiftedStructuredLoss(LossFunctionWrapper):
    """Keras form of `lifted_structured_loss`."""

    def __init__(self, margin=1.0, distance="l2", name=None, reduction="sum_over_batch_size",
                 dtype=None, mining_scope="global"):
        _check_distance(distance)
        super().__init__(lifted_structured_loss, name=name or "lifted_structured_loss",
                         reduction=reduction, dtype=dtype, mining_scope=mining_scope,
                         margin=float(margin), distance=distance)


@keras.saving.register_keras_serializable(package="facenet")
class TriHardLoss(LossFunctionWrapper):
    """Keras form of `trihard_loss` (batch-hard, soft margin)."""

    def __init__(self, distance="l2", name="trihard_loss", reduction="sum_over_batch_size",
                 dtype=None, mining_scope="global"):
        _check_distance(distance)
        super().__init__(trihard_loss, name=name, reduction=reduction, dtype=dtype,
                         mining_scope=mining_scope, distance=distance)


@keras.saving.register_keras_serializable(package="facenet")
class DistanceWeightedLoss(LossFunctionWrapper):
    """Keras form of `distance_weighted_loss`.

    With an int `seed`, the loss owns a `keras.random.SeedGenerator(seed)` and each call draws with
    the generator's next stateless seed: successive batches get fresh samples, and the whole
    sequence is reproducible from `seed`. With seed=None each call draws fresh (stateful) samples.
    beta is a fixed hyperparameter here (use the function with a variable to learn it).
    """

    def __init__(self, loss="margin", margin=0.2, beta=1.2, cutoff=0.5, nonzero_loss_cutoff=1.4,
                 seed=None, name="distance_weighted_loss", reduction="sum_over_batch_size",
                 dtype=None, mining_scope="global"):
        _check_sampled_loss(loss)
        super().__init__(
            distance_weighted_loss, name=name, reduction=reduction, dtype=dtype,
            mining_scope=mining_scope, loss=loss,
            margin=float(margin), beta=float(beta), cutoff=float(cutoff),
            nonzero_loss_cutoff=None if nonzero_loss_cutoff is None else float(nonzero_loss_cutoff),
            seed=None if seed is None else int(seed))
        self._seed_generator = seed_generator(self.seed)

    def _call_kwargs(self):
        return dict(super()._call_kwargs(), seed=next_seed(self._seed_generator))

    def _draws_at_random(self):
        return True
