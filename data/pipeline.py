"""tf.data input pipelines: identity-balanced training batches and ordered evaluation batches.

:func:`balanced_dataset` turns a source (an :class:`IdentityDataset` or TFRecord shards, see
:func:`resolve_source`) into batches of exactly P distinct identities x exactly K images (FaceNet
Section 3.2): the P x K item indices come from :mod:`data.sampler`, then the items are decoded
(:mod:`data.decode`) and augmented in parallel (order kept), batched P*K and prefetched. All
randomness is stateless and derived from the seed, so the same seed gives the same batches
(pixels included) whatever the parallelism. :func:`eval_dataset` gives ordered, un-augmented
batches for validation and embedding.

The pipeline expects **validated** data: a corrupt file fails the input pipeline with an error
naming the file. Run :func:`data.file_check.validate_files` once (train.py does) to drop and report
bad files up front (too-large files are refused there from their header alone).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from data import augment as augment_lib
from data.dataset import EmptyDatasetError, IdentityDataset
from data.decode import decode_image, load_and_resize, load_image
from data.preprocess import preprocess
from data.sampler import balanced_index_batches, check_sampling_args


# ----------------------------------------------------------------------------------------------
# Balanced batches
# ----------------------------------------------------------------------------------------------

def resolve_source(source, skip_damaged_shards=False):
    """-> (items: np.ndarray of str/bytes [N], labels int32 [N], class_names, items_are_bytes).

    ``skip_damaged_shards`` (TFRecord sources only): keep the records read before the damage in a
    truncated or corrupt shard, with a warning per shard, instead of raising
    :class:`data.tfrecords.DamagedShardError` (see :func:`data.tfrecords.load_tfrecords`).
    """
    if isinstance(source, IdentityDataset):
        if len(source) == 0:
            raise EmptyDatasetError("balanced_dataset: the dataset holds no images")
        return (np.asarray(source.paths, dtype=object), source.labels, source.class_names, False)
    if isinstance(source, (str, os.PathLike)) or (
            isinstance(source, (list, tuple)) and all(isinstance(s, (str, os.PathLike))
                                                      for s in source)):
        from data.tfrecords import load_tfrecords

        table = load_tfrecords(source, skip_damaged=skip_damaged_shards)
        return table.encoded, table.labels, table.class_names, True
    raise TypeError("source must be an IdentityDataset or a TFRecord glob / list of files, got "
                    f"{type(source).__name__}")


def balanced_dataset(source, identities_per_batch: int, images_per_identity: int, image_size,
                     augment: bool = True, seed=None, small_identities: str = "replace",
                     crop_fraction: float = 0.875, flip: bool = True, photometric: bool = False,
                     num_parallel_calls=tf.data.AUTOTUNE, prefetch=tf.data.AUTOTUNE, images=None,
                     skip_damaged_shards=False, rows=None):
    """Infinite dataset of identity-balanced batches (FaceNet Section 3.2).

    Args:
      source: an :class:`IdentityDataset` (preferably validated, see
        :func:`data.file_check.validate_files`) or a TFRecord glob / list of files written by
        :mod:`data.tfrecords` (any tf.io.gfile path; the records are loaded into memory once, see
        :func:`data.tfrecords.load_tfrecords`).
      identities_per_batch: P, distinct identities per batch.
      images_per_identity: K, images per identity per batch.
      image_size: (H, W) in pixels (or an int for a square).
      augment: random crop (scale in [crop_fraction, 1]) + resize, flip, optional photometric;
        False gives plain resizes.
      seed: int; same seed -> same batches. None draws a random seed.
      small_identities: identities with fewer than K images: "replace" samples them with
        replacement (every image used as evenly as possible, single-image identities included),
        "drop" leaves them out.
      crop_fraction: smallest random-crop side as a fraction of the image side.
      flip: random horizontal flips (when augment).
      photometric: random brightness/contrast (when augment).
      images: optional uint8 [N, h, w, 3], every item of ``source`` already decoded (in its item
        order; see :mod:`data.memory_cache`). Batches are then gathered from it instead of
        decoding files; sampling and augmentation are unchanged.
      skip_damaged_shards: TFRecord sources: train on the records before the damage of a
        truncated/corrupt shard (one warning per shard, counting what was lost) instead of raising
        :class:`data.tfrecords.DamagedShardError` naming it.
      rows: optional (start, stop): keep only these rows of every P x K batch, selected before
        any decoding (one worker's share of the global batch, data/distributed.py); the rows
        kept are exactly those of the full batch, pixels included.
    Returns:
      tf.data.Dataset of ``(images float32 [P*K, H, W, 3] preprocessed as data.preprocess,
      labels int32 [P*K])``; labels are the source's class indices; images of one identity are
      contiguous (identity p occupies rows p*K .. p*K+K-1). With ``rows``, [stop - start, ...].
    Raises:
      ValueError: fewer than P usable identities, bad arguments.
      data.tfrecords.DamagedShardError (a ValueError): a damaged shard, unless skip_damaged_shards.
    """
    check_sampling_args(identities_per_batch, images_per_identity, small_identities)
    p = int(identities_per_batch)
    k = int(images_per_identity)
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    image_size = (int(image_size[0]), int(image_size[1]))
    items, labels, class_names, items_are_bytes = resolve_source(
        source, skip_damaged_shards=skip_damaged_shards)
    index_batches = balanced_index_batches(labels, len(class_names), p, k, seed=seed,
                                           small_identities=small_identities)
    n_rows = p * k
    if rows is not None:
        start, stop = int(rows[0]), int(rows[1])
        if not 0 <= start < stop <= p * k:
            raise ValueError(f"rows must be (start, stop) with 0 <= start < stop <= P*K = {p * k}, "
                             f"got {tuple(rows)}")
        n_rows = stop - start
        index_batches = index_batches.map(
            lambda idx, lab, seeds: (idx[start:stop], lab[start:stop], seeds[start:stop]))
    if items_are_bytes:
        table = tf.constant(items.tolist(), tf.string)
    else:
        table = tf.constant([os.fspath(x) for x in items], tf.string)

    if images is not None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(items) or \
                images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [{len(items)}, h, w, 3] (one per item of the "
                             f"source), got {images.dtype} {images.shape}")
        cached_shape = list(images.shape[1:])

        def gather(items_idx, batch_labels, seeds):
            """One NumPy gather per batch from the in-memory array (no copy into the graph)."""
            pixels = tf.numpy_function(lambda i: images[i], [items_idx], tf.uint8, stateful=False)
            return tf.ensure_shape(pixels, [n_rows] + cached_shape), batch_labels, seeds

    def load(item, label, image_seed):
        if images is not None:
            image = item  # already decoded pixels
        else:
            entry = table[item]
            image = decode_image(entry) if items_are_bytes else load_image(entry)
        if augment:
            image = augment_lib.augment_image(image, image_size, image_seed,
                                              crop_fraction=crop_fraction, flip=flip,
                                              photometric=photometric)
        else:
            image = tf.clip_by_value(augment_lib.resize(image, image_size), 0.0, 255.0)
        return preprocess(image), label

    ds = index_batches
    if images is not None:
        ds = ds.map(gather)
    ds = ds.unbatch()
    ds = ds.map(load, num_parallel_calls=num_parallel_calls, deterministic=True)
    ds = ds.batch(n_rows, drop_remainder=True)
    if prefetch:
        ds = ds.prefetch(prefetch)
    return ds


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def eval_dataset(paths, image_size, batch_size: int, num_parallel_calls=tf.data.AUTOTUNE):
    """Ordered, un-augmented batches for validation and embedding.

    Args:
      paths: image paths (sequence of str) or an :class:`IdentityDataset`.
      image_size: (H, W) pixels, or an int.
      batch_size: images per batch; the last batch may be smaller.
    Returns:
      tf.data.Dataset of float32 [<=batch_size, H, W, 3], preprocessed, in the order of ``paths``.
    """
    if isinstance(paths, IdentityDataset):
        paths = paths.paths
    paths = [os.fspath(x) for x in paths]
    if not paths:
        raise EmptyDatasetError("eval_dataset: no paths")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    image_size = (int(image_size[0]), int(image_size[1]))
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
    ds = ds.map(lambda path: preprocess(load_and_resize(path, image_size)),
                num_parallel_calls=num_parallel_calls, deterministic=True)
    return ds.batch(int(batch_size)).prefetch(tf.data.AUTOTUNE)


def iterate_batches(dataset: tf.data.Dataset, num_batches: int) -> Sequence:
    """The first ``num_batches`` (images, labels) of a dataset as NumPy arrays (tests, tools)."""
    return [(x.numpy(), y.numpy()) for x, y in dataset.take(num_batches)]


