"""Checking image files before training: decode each once, drop and report the bad ones, cache verdicts.

:func:`validate_files` decodes every image exactly as the training pipeline will
(:func:`data.decode.load_image`), so a corrupt file is dropped with a reason up front instead of
failing the input pipeline mid-run; files whose header declares more than ``max_pixels`` are
refused from the header alone. Verdicts can be cached in a JSON file keyed by path and
:func:`file_key` (size and mtime), so a later run decodes only new or changed files.

Importing this module does not load TensorFlow (:func:`file_key` serves TF-free callers);
:func:`validate_files` loads it when called.
"""
from __future__ import annotations

import json
import os
from typing import List, Tuple

import numpy as np
from absl import logging

from data.atomic import write_text_atomically
from data.dataset import EmptyDatasetError, IdentityDataset

_AUTOTUNE = -1  # tf.data.AUTOTUNE, spelled out so that the module imports without TensorFlow


def _failure_reason(path: str) -> str:
    import tensorflow as tf

    from data.decode import load_image

    if not os.path.exists(path):
        return "missing"
    try:
        from data.image_io import failure_reason, read_image

        image = read_image(path)
    except Exception as exc:  # noqa: BLE001 - the reason is what we want
        return failure_reason(exc)
    try:
        load_image(tf.constant(path)).numpy()
    except tf.errors.OpError as exc:
        return f"tensorflow decode failed: {exc.message.splitlines()[0][:200]}"
    del image
    return "unknown decode failure"


def file_key(path):
    """'size:mtime_ns' of a file, or None when it cannot be stat'ed.

    Two reads of an unchanged file give the same key; a rewrite changes its size or mtime, so a
    verdict (or anything else computed from the file) stored under the old key is stale.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def _load_validation_cache(cache_path):
    if not cache_path or not os.path.exists(cache_path):
        return {}
    try:
        with open(cache_path, encoding="utf-8") as f:
            return dict(json.load(f)["files"])
    except (OSError, ValueError, KeyError, TypeError):
        logging.warning("validate_files: ignoring unreadable cache %s", cache_path)
        return {}


def _save_validation_cache(cache_path, entries):
    write_text_atomically(cache_path, json.dumps({"format": 1, "files": entries}))


def _too_large(paths, max_pixels):
    """Indices (into ``paths``) of files whose header declares more than ``max_pixels``.

    Reads headers only (``data.image_io.declared_pixels``, no pixel data), so a decompression bomb
    is caught before any decoder sees it. Files whose header cannot be read are left to the full
    decode, which reports them.
    """
    from data.image_io import declared_pixels

    found = []
    for i, path in enumerate(paths):
        try:
            pixels = declared_pixels(path)
        except Exception:  # noqa: BLE001 - missing/unreadable: the decode pass reports it
            continue
        if pixels > max_pixels:
            found.append(i)
    return found


def validate_files(dataset: IdentityDataset, num_parallel_calls=_AUTOTUNE, cache_path=None,
                   max_pixels=None) -> Tuple[IdentityDataset, List[Tuple[str, str]]]:
    """Decodes every image once, exactly as the training pipeline will, and drops bad ones.

    Cost: one full decode per image, in parallel (a 250 px JPEG takes ~1-2 ms per core, so 0.5 M
    images take several minutes on 2 cores). With ``cache_path`` (a JSON file; train.py keeps one
    in its model_dir) the verdicts are stored per path with the file's size and mtime, and a later
    call decodes only new or changed files. Bad files (missing, zero-byte, not an image,
    truncated, unsupported, too_large) are logged and returned with a reason; identities left
    without any image are dropped (logged) and the rest keep their order but are relabelled
    0..C'-1 if any identity disappears. Files whose header declares more than ``max_pixels`` are
    refused from the header alone (reason "too_large") and never reach a decoder.

    Args:
      dataset: the scanned dataset.
      num_parallel_calls: decodes in parallel (default ``tf.data.AUTOTUNE``).
      cache_path: JSON file of verdicts (None: no cache).
      max_pixels: declared width x height above which a file is refused (default
        ``data.image_io.DEFAULT_MAX_PIXELS``, as on every other decoding path).
    Returns:
      ``(clean, skipped)`` with ``skipped`` a list of ``(path, reason)``.
    Raises:
      EmptyDatasetError: no image decodes.
    """
    import tensorflow as tf

    from data.decode import load_image

    n = len(dataset)
    if n == 0:
        raise EmptyDatasetError("validate_files: the dataset holds no images")
    keys = [file_key(p) for p in dataset.paths]
    cache = _load_validation_cache(cache_path)
    good = np.zeros([n], dtype=bool)
    todo = []
    for i, (path, key) in enumerate(zip(dataset.paths, keys)):
        hit = cache.get(path)
        if key is not None and hit is not None and hit[0] == key:
            good[i] = bool(hit[1])
        else:
            todo.append(i)
    if max_pixels is None:
        from data.image_io import DEFAULT_MAX_PIXELS as max_pixels
    reasons = {}
    if todo:
        bombs = set(_too_large([dataset.paths[i] for i in todo], max_pixels))
        for j in sorted(bombs):
            reasons[dataset.paths[todo[j]]] = "too_large"
        todo = [i for j, i in enumerate(todo) if j not in bombs]
    if todo:
        paths = tf.constant([dataset.paths[i] for i in todo], tf.string)
        index = tf.constant(todo, tf.int64)

        def check(j):
            image = load_image(paths[j])
            ok = tf.logical_and(tf.shape(image)[0] > 0, tf.shape(image)[1] > 0)
            return index[j], ok

        ds = tf.data.Dataset.range(len(todo)).map(check, num_parallel_calls=num_parallel_calls,
                                                  deterministic=False)
        ds = ds.ignore_errors()
        for i, ok in ds.as_numpy_iterator():
            good[i] = ok
    if cache_path:
        cache.update({p: [k, bool(g)] for p, k, g in zip(dataset.paths, keys, good) if k is not None})
        _save_validation_cache(cache_path, cache)
    logging.info("validate_files: decoded %d of %d images (%d verdicts from the cache, %d "
                 "refused from their header)", len(todo), n, n - len(todo) - len(reasons),
                 len(reasons))
    skipped = [(dataset.paths[i], reasons.get(dataset.paths[i])
                or _failure_reason(dataset.paths[i])) for i in np.flatnonzero(~good)]
    for path, reason in skipped[:20]:
        logging.warning("validate_files: skipping %s (%s)", path, reason)
    if len(skipped) > 20:
        logging.warning("validate_files: ... and %d more bad files", len(skipped) - 20)
    if not good.any():
        raise EmptyDatasetError(f"validate_files: none of the {n} images could be decoded "
                                f"(first: {skipped[0][0]}: {skipped[0][1]})")
    clean = dataset.subset_images(np.flatnonzero(good))
    counts = clean.images_per_class()
    if (counts == 0).any():
        emptied = [dataset.class_names[c] for c in np.flatnonzero(counts == 0)]
        logging.warning("validate_files: %d identities lost all their images (e.g. %r)",
                        len(emptied), emptied[0])
        clean = clean.subset(np.flatnonzero(counts > 0))
    logging.info("validate_files: %d of %d images usable, %d skipped", len(clean), n, len(skipped))
    return clean, skipped
