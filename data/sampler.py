"""P x K sampling: which images form each identity-balanced batch, as a stream of item indices.

FaceNet mines triplets inside each mini-batch, so every batch must hold several images of each of
its identities (Section 3.2: "around 40 faces are selected per identity per mini-batch"; Section 4:
batches of ~1,800 images). :func:`balanced_index_batches` picks exactly P distinct identities x
exactly K images per batch, in-graph:

1. an infinite stream of epochs; each epoch is a seeded permutation of the usable identities, cut
   into groups of P (so every identity appears once per epoch, none twice in a batch);
2. per group, K image indices per identity from a per-class index table (a random permutation of
   the identity's images; identities with fewer than K images cycle through that permutation, i.e.
   sampling with replacement that uses every image as evenly as possible).

All randomness is stateless and derived from ``(seed, batch number, position)``, so the same seed
gives the same batches whatever the parallelism. :func:`data.pipeline.balanced_dataset` turns the
indices into decoded, augmented images.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
from absl import logging

from choices import SMALL_IDENTITY_POLICIES


def check_sampling_args(identities_per_batch: int, images_per_identity: int, small_identities: str):
    """Raises ValueError unless P >= 1, K >= 1 and ``small_identities`` is a known policy."""
    p, k = int(identities_per_batch), int(images_per_identity)
    if p < 1 or k < 1:
        raise ValueError(f"identities_per_batch and images_per_identity must be >= 1, got {p}, {k}")
    if small_identities not in SMALL_IDENTITY_POLICIES:
        raise ValueError(f"small_identities must be one of {SMALL_IDENTITY_POLICIES}, "
                         f"got {small_identities!r}")


def _class_table(labels: np.ndarray, num_classes: int):
    """Per-class index table: (order int64 [N] item indices grouped by class, starts [C], counts [C])."""
    order = np.argsort(labels, kind="stable").astype(np.int64)
    counts = np.bincount(labels, minlength=num_classes).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return order, starts, counts


def usable_identities(counts: np.ndarray, images_per_identity: int, small_identities: str):
    """int64 [C']: class indices that balanced batches may draw, under the small-identity policy."""
    if small_identities == "drop":
        return np.flatnonzero(counts >= images_per_identity).astype(np.int64)
    return np.flatnonzero(counts >= 1).astype(np.int64)


def balanced_index_batches(labels, num_classes: int, identities_per_batch: int,
                           images_per_identity: int, seed=None, small_identities: str = "replace"):
    """Infinite tf.data.Dataset of the P x K batches of a labelled set of items.

    Args:
      labels: int [N], the class of each item (0..num_classes-1).
      num_classes: C (classes without items are never drawn).
      identities_per_batch: P, distinct identities per batch.
      images_per_identity: K, items per identity per batch.
      seed: int; same seed -> same batches. None draws a random seed.
      small_identities: identities with fewer than K items: "replace" samples them with
        replacement, "drop" leaves them out.
    Returns:
      tf.data.Dataset of ``(item indices int64 [P*K], labels int32 [P*K], augmentation seeds
      int64 [P*K, 2])``; identity p occupies rows p*K .. p*K+K-1.
    Raises:
      ValueError: fewer than P usable identities, bad arguments.
    """
    check_sampling_args(identities_per_batch, images_per_identity, small_identities)
    p = int(identities_per_batch)
    k = int(images_per_identity)
    order, starts, counts = _class_table(np.asarray(labels, np.int32), num_classes)
    usable = usable_identities(counts, k, small_identities)
    small = int(((counts > 0) & (counts < k)).sum())
    if small:
        if small_identities == "drop":
            logging.info("balanced_dataset: dropping %d identities with fewer than K=%d images",
                         small, k)
        else:
            logging.info("balanced_dataset: %d identities have fewer than K=%d images and are "
                         "sampled with replacement (%d have a single image)", small, k,
                         int((counts == 1).sum()))
    if usable.size < p:
        remedies = "lower identities_per_batch"
        if small_identities != "replace":
            remedies += ", lower images_per_identity or use small_identities='replace'"
        else:
            remedies += " or add identities"
        raise ValueError(
            f"balanced_dataset: only {usable.size} identities are usable (small_identities="
            f"{small_identities!r}, K={k}) but a batch needs P={p} distinct identities; "
            f"{remedies}")
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    base_seed = tf.constant([int(seed) & 0x7FFFFFFF, 0x5EED], tf.int64)
    groups_per_epoch = usable.size // p

    usable_t = tf.constant(usable, tf.int64)
    order_t = tf.constant(order, tf.int64)
    starts_t = tf.constant(starts, tf.int64)
    counts_t = tf.constant(counts, tf.int64)

    def epoch_groups(epoch):
        epoch_seed = tf.random.experimental.stateless_fold_in(base_seed, epoch)
        noise = tf.random.stateless_uniform(tf.shape(usable_t), epoch_seed)
        perm = tf.gather(usable_t, tf.argsort(noise))
        groups = tf.reshape(perm[:groups_per_epoch * p], [groups_per_epoch, p])
        return tf.data.Dataset.from_tensor_slices(groups)

    def sample_batch(step, classes):
        """classes int64 [P] -> item indices [P*K], labels int32 [P*K], seeds int64 [P*K, 2]."""
        batch_seed = tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(base_seed, 1 << 30), step)
        pick_seed, aug_seed = tf.unstack(tf.random.experimental.stateless_split(batch_seed, 2))
        n = tf.gather(counts_t, classes)                     # [P]
        first = tf.gather(starts_t, classes)                 # [P]
        width = tf.reduce_max(n)
        noise = tf.random.stateless_uniform(tf.stack([p, width]), pick_seed)  # [P, width], 0..1
        valid = tf.range(width, dtype=tf.int64)[None, :] < n[:, None]
        noise = tf.where(valid, noise, -1.0)
        # top-k of masked noise: the first min(n, K) entries of a uniform random permutation.
        _, perm = tf.math.top_k(noise, k=tf.cast(tf.minimum(width, k), tf.int32))
        slot = tf.math.floormod(tf.range(k, dtype=tf.int64)[None, :], n[:, None])  # [P, K]
        local = tf.gather(tf.cast(perm, tf.int64), slot, batch_dims=1)             # [P, K]
        items_idx = tf.gather(order_t, first[:, None] + local)                      # [P, K]
        batch_labels = tf.repeat(tf.cast(classes, tf.int32), k)
        seeds = tf.random.stateless_uniform([p * k, 2], aug_seed, minval=None, maxval=None,
                                            dtype=tf.int64)
        return tf.reshape(items_idx, [-1]), batch_labels, seeds

    return tf.data.Dataset.counter().flat_map(epoch_groups).enumerate().map(sample_batch)
