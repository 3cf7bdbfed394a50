"""Harmonic triplet loss: new embeddings compatible with an old, frozen model's (FaceNet appendix).

FaceNet (Schroff et al. 2015, arXiv 1503.03832, Section 7 "Appendix: Harmonic Embedding",
Figure 11) trains a new model v2 whose embeddings can be compared directly with those of an older
model v1 (no re-embedding of a gallery when the model is upgraded), by mixing v1 and v2 embeddings
inside the triplet loss.

Mixing rule. The batch's B images are embedded by both models. The 2B embeddings

    [new_embeddings; old_embeddings]  with labels  [labels; labels]

form one set, and the triplets are mined over it with the usual `--mining` strategy ("semi_hard",
"semi_hard_paper", "hard", "all"; see `losses.mining`), so the anchor, the positive and the
negative may each come from either model:
  * new-new-new triplets keep the new space a good embedding on its own;
  * mixed triplets make the distances between new and old embeddings respect the margin, so that a
    new embedding is closer to the old embeddings of its identity than to those of others. This
    includes the pair (image i embedded by v2, the same image embedded by v1), a positive pair whose
    distance is pulled towards 0.
The old model is frozen: its embeddings are constants (`tf.stop_gradient`), so a triplet made
only of old embeddings contributes to the loss value (and to the statistics) but carries no
gradient, and nothing flows back into the old model.

    harmonic_triplet_loss_with_stats(labels, new, old, ...)
        == triplet_loss_with_stats(concat(labels, labels), concat(new, stop_gradient(old)), ...)

so the normalisation, statistics (`losses.STAT_KEYS`, counted over the 2B set: `num_pairs` is
that of the doubled batch), empty-batch handling and seeding are those of `losses.triplet`. The
distance matrix is [2B, 2B]; nothing is [B, B, B] (batch-all uses the O(B^2)-memory sums of
`losses.mining`, as the plain loss does).

Under a tf.distribute strategy, `HarmonicTripletLossLayer(mining_scope="global")` (default)
all-gathers the new embeddings (with their gradient), the old embeddings and the labels of every
replica, in the same replica order, and mixes the global batch (`losses.global_batch`); with
"replica" each replica mixes and mines its own slice.
"""
import keras
import tensorflow as tf

from losses import masks
from losses.global_batch import gather_constant, gather_global
from losses.layer import TripletLossLayer
from losses.triplet import _check_args, triplet_loss_with_stats


def _size_message(old_size, new_size):
    return (f"the old model's embeddings are {old_size}-D, the new model's {new_size}-D: "
            "--compatible_with needs the same --embedding_size")


def _static_dim(tensor, axis):
    shape = tensor.shape
    if shape.rank is None or shape.rank <= axis:
        return None
    return tf.compat.dimension_value(shape[axis])


def mixed_batch(labels, new_embeddings, old_embeddings):
    """The mixed set of the harmonic loss: (labels [2B], embeddings float32 [2B, D]).

    Returns `concat(labels, labels)` and `concat(new, stop_gradient(old))` (both cast to float32,
    as the triplet loss computes in float32 anyway; the gradient reaches `new_embeddings` in its
    own dtype). Raises ValueError when the embedding sizes or batch sizes differ and are known
    while tracing; otherwise the check runs with the graph (InvalidArgumentError, same message).
    """
    labels = masks.flatten_labels(labels)
    new = tf.convert_to_tensor(new_embeddings)
    old = tf.convert_to_tensor(old_embeddings)
    for name, tensor in (("new_embeddings", new), ("old_embeddings", old)):
        if tensor.shape.rank is not None and tensor.shape.rank != 2:
            raise ValueError(f"{name} must be [B, D], got shape {tensor.shape}.")
    if not new.dtype.is_floating or not old.dtype.is_floating:
        raise TypeError(f"Embeddings must be floating point, got new {new.dtype.name} and old "
                        f"{old.dtype.name}.")

    checks = []
    d_new, d_old = _static_dim(new, 1), _static_dim(old, 1)
    if d_new is not None and d_old is not None:
        if d_new != d_old:
            raise ValueError(_size_message(d_old, d_new))
    else:
        checks.append(tf.debugging.assert_equal(
            tf.shape(old)[1], tf.shape(new)[1], message=_size_message("D_old", "D_new")))
    b_new, b_old, b_labels = _static_dim(new, 0), _static_dim(old, 0), _static_dim(labels, 0)
    if b_new is not None and b_old is not None:
        if b_new != b_old:
            raise ValueError(f"The new and old models embedded different batches: {b_new} new "
                             f"and {b_old} old embeddings (they must embed the same images).")
    else:
        checks.append(tf.debugging.assert_equal(
            tf.shape(old)[0], tf.shape(new)[0],
            message="The new and old models embedded different batches (batch sizes differ)."))
    if b_new is not None and b_labels is not None:
        if b_new != b_labels:
            raise ValueError(f"{b_labels} labels for {b_new} embeddings.")
    else:
        checks.append(tf.debugging.assert_equal(
            tf.shape(labels)[0], tf.shape(new)[0],
            message="The number of labels differs from the number of embeddings."))

    with tf.control_dependencies(checks):
        new = tf.identity(tf.cast(new, tf.float32)) if checks else tf.cast(new, tf.float32)
    old = tf.stop_gradient(tf.cast(old, tf.float32))
    return tf.concat([labels, labels], axis=0), tf.concat([new, old], axis=0)


def harmonic_triplet_loss_with_stats(labels, new_embeddings, old_embeddings, margin=0.2,
                                     distance="squared_l2", mining="semi_hard", soft=False,
                                     seed=None):
    """Harmonic triplet loss of a batch embedded by a new and an old (frozen) model, with stats.

    Args:
      labels: int [B] (or [B, 1]) identities of the batch's images.
      new_embeddings: float [B, D], the model being trained (gets the gradient).
      old_embeddings: float [B, D], the old model's embeddings of the same images (constants:
        their gradient is None / zero). Any float dtype (computed in float32).
      margin, distance, mining, soft, seed: as `losses.triplet_loss_with_stats`.
    Returns:
      (loss, stats): exactly `triplet_loss_with_stats(concat(labels, labels),
      concat(new_embeddings, stop_gradient(old_embeddings)), ...)`, a float32 scalar and the
      `losses.STAT_KEYS` statistics over the mixed set of 2B embeddings. B = 0 gives 0 with a zero
      gradient.
    Raises:
      ValueError: unknown mining / distance, or the two embedding sizes (or batch sizes) differ.
    """
    _check_args(mining, soft, distance)
    mixed_labels, mixed = mixed_batch(labels, new_embeddings, old_embeddings)
    return triplet_loss_with_stats(mixed_labels, mixed, margin=margin, distance=distance,
                                   mining=mining, soft=soft, seed=seed)


def harmonic_triplet_loss(labels, new_embeddings, old_embeddings, margin=0.2,
                          distance="squared_l2", mining="semi_hard", soft=False, seed=None):
    """Harmonic triplet loss, float32 scalar; see `harmonic_triplet_loss_with_stats`."""
    loss, _ = harmonic_triplet_loss_with_stats(
        labels, new_embeddings, old_embeddings, margin=margin, distance=distance, mining=mining,
        soft=soft, seed=seed)
    return loss


@keras.saving.register_keras_serializable(package="facenet")
class HarmonicTripletLossLayer(TripletLossLayer):
    """Adds the harmonic triplet loss of `[new_embeddings [B, D], old_embeddings [B, D],
    labels [B]]`; returns new_embeddings [B, D] unchanged.

    Same arguments (`mining_scope` included), statistics (Mean metrics named as
    `losses.STAT_KEYS`), seeding and config as `TripletLossLayer`, which it runs on the mixed set
    (`mixed_batch`) of the batch of its `mining_scope`.

        new = backbone(images); old = frozen_old_model(images)
        new = HarmonicTripletLossLayer(margin=0.2)([new, old, labels])
    """

    def call(self, inputs):
        new_embeddings, old_embeddings, labels = inputs
        new, labels = gather_global(new_embeddings, labels, self.mining_scope)
        old = gather_constant(old_embeddings, self.mining_scope)  # frozen: no gradient
        mixed_labels, mixed = mixed_batch(labels, new, old)
        self._add_triplet_loss(mixed, mixed_labels)  # adds the loss and updates the statistics
        return new_embeddings

    def compute_output_spec(self, inputs):
        # Building a functional model already rejects embeddings of different sizes.
        d_new, d_old = inputs[0].shape[-1], inputs[1].shape[-1]
        if d_new is not None and d_old is not None and d_new != d_old:
            raise ValueError(_size_message(d_old, d_new))
        return super().compute_output_spec(inputs)
