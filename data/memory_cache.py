"""Decoded training images held in memory, so that the model, not JPEG decoding, bounds training.

A 2-core machine decodes about 1,000 160-px JPEGs a second (``bench/pipeline.py``), which is most of
the CPU a small network needs to train at the same rate. The balanced pipeline can instead draw its
batches from a uint8 array of every training image, decoded once and resized to a little more
than the training input (so that random crops keep full resolution):

    images = decode_to_memory(dataset, cache_image_size((64, 64), crop_fraction=0.875))
    ds = balanced_dataset(dataset, P, K, (64, 64), images=images)

The array takes ``N * h * w * 3`` bytes (11,562 crops at 74x74: 190 MB); :func:`cache_fits` decides
whether that is reasonable on this machine. Decoding uses the same routes as the file pipeline
(:func:`data.decode.decode_image`), so the pixels are the same as a plain resize from the file.
"""
from __future__ import annotations

import math
import os

import numpy as np
import tensorflow as tf
from absl import logging

from data import augment as augment_lib

#: Default ceiling on the cache, as a fraction of the machine's physical memory.
DEFAULT_MEMORY_FRACTION = 0.25


def cache_image_size(image_size, crop_fraction=1.0):
    """(h, w) to cache at: the training size divided by the smallest crop fraction, rounded up,
    so that the smallest random crop is still at least ``image_size`` pixels."""
    f = float(crop_fraction) if crop_fraction else 1.0
    return tuple(int(math.ceil(s / f)) for s in image_size)


def cache_bytes(num_images, size):
    """Bytes of a uint8 cache of ``num_images`` RGB images of ``size`` = (h, w)."""
    return int(num_images) * int(size[0]) * int(size[1]) * 3


def physical_memory_bytes():
    """Total physical memory in bytes, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def cache_fits(num_images, size, fraction=DEFAULT_MEMORY_FRACTION):
    """True when the cache would take at most ``fraction`` of physical memory (False if unknown)."""
    total = physical_memory_bytes()
    return total is not None and cache_bytes(num_images, size) <= fraction * total


def decode_to_memory(source, size, batch_size=256, progress=True,
                     num_parallel_calls=tf.data.AUTOTUNE, skip_damaged_shards=False):
    """Every image of ``source``, decoded and resized to ``size``: uint8 [N, h, w, 3].

    Args:
      source: an :class:`~data.dataset.IdentityDataset` (validated: a corrupt file fails here
        with an error naming it) or a TFRecord source as for ``balanced_dataset``.
      size: (h, w) in pixels.
      progress: report progress on stderr (data.progress: a live bar on a terminal, a plain
        line every 10 s otherwise).
      skip_damaged_shards: TFRecord sources, as for ``balanced_dataset``.
    Returns:
      uint8 [N, h, w, 3] in the source's item order (the order ``balanced_dataset`` indexes).
    Raises:
      ValueError: an image that cannot be decoded, named; a file whose header declares more than
        ``data.image_io.DEFAULT_MAX_PIXELS`` fails here (reason "too_large") without being decoded.
    """
    from data.decode import decode_image, load_image
    from data.pipeline import resolve_source
    from data.progress import progress as make_progress

    items, _, _, items_are_bytes = resolve_source(source, skip_damaged_shards=skip_damaged_shards)
    n = len(items)
    size = (int(size[0]), int(size[1]))
    table = tf.constant(list(items) if items_are_bytes else [os.fspath(x) for x in items],
                        tf.string)

    def load(i):
        entry = table[i]
        image = decode_image(entry) if items_are_bytes else load_image(entry)
        image = tf.clip_by_value(tf.round(augment_lib.resize(image, size)), 0.0, 255.0)
        return tf.cast(image, tf.uint8)

    ds = tf.data.Dataset.range(n).map(load, num_parallel_calls=num_parallel_calls,
                                      deterministic=True)
    ds = ds.batch(batch_size).prefetch(2)
    out = np.empty([n, size[0], size[1], 3], np.uint8)
    bar = make_progress(n, unit="image", label="decoding into memory", enabled=progress)
    done = 0
    try:
        for batch in ds.as_numpy_iterator():
            out[done:done + len(batch)] = batch
            done += len(batch)
            bar.update(done)
    except tf.errors.OpError as exc:
        # The failing image is in the next batch: name it (validate_files drops such files).
        for i in range(done, min(done + batch_size, n)):
            try:
                load(tf.constant(i, tf.int64))
            except tf.errors.OpError:
                what = f"record {i}" if items_are_bytes else os.fspath(items[i])
                raise ValueError(f"decode_to_memory: cannot decode {what}: "
                                 f"{exc.message.splitlines()[0][:200]} (data.file_check."
                                 "validate_files drops unreadable files)") from exc
        raise
    logging.info("decode_to_memory: %d images at %dx%d in memory (%.0f MB)", n, size[0], size[1],
                 out.nbytes / 2**20)
    return out
