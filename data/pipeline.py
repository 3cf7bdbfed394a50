"""tf.data input pipelines: identity-balanced training batches and ordered evaluation batches.

FaceNet mines triplets inside each mini-batch, so every batch must hold several images of each of
its identities (Section 3.2: "around 40 faces are selected per identity per mini-batch"; Section 4:
batches of ~1,800 images). :func:`balanced_dataset` yields batches of exactly P distinct identities x
exactly K images, sampled in-graph:

1. an infinite stream of epochs; each epoch is a seeded permutation of the usable identities, cut
   into groups of P (so every identity appears once per epoch, none twice in a batch);
2. per group, K image indices per identity from a per-class index table (a random permutation of
   the identity's images; identities with fewer than K images cycle through that permutation, i.e.
   sampling with replacement that uses every image as evenly as possible);
3. unbatch, decode + augment in parallel (order kept), batch P*K, prefetch.

All randomness is stateless and derived from ``(seed, batch number, position)``, so the same seed
gives the same batches (pixels included) whatever the parallelism.

Decoding: JPEG (without EXIF), BMP and PNG without alpha/palette are decoded in-graph by TensorFlow;
anything else (PGM/PPM, GIF, WebP, TIFF, PNG with alpha or palette, JPEGs with an EXIF block
anywhere among their segments, whose orientation TensorFlow would ignore) goes through
:func:`data.image_io.read_image` (grey -> 3 channels, alpha composited on white, EXIF orientation
applied), so both routes give the same, upright pixels. Size limit: a file whose header declares
more than ``data.image_io.DEFAULT_MAX_PIXELS`` is never given to TensorFlow's decoders; image_io
refuses it (reason "too_large") before decoding, so a decompression bomb fails fast instead of
exhausting memory. The pipeline expects **validated** data: a corrupt file fails the input pipeline
with an error naming the file. Run :func:`validate_files` once (train.py does) to drop and report
bad files up front (too-large files are refused there from their header alone).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from typing import List, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from data import augment as augment_lib
from data.atomic import write_text_atomically
from data.dataset import EmptyDatasetError, IdentityDataset
from data.preprocess import preprocess

SMALL_IDENTITY_POLICIES = ("replace", "drop")


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------

_HEADER_BYTES = 64


def _tf_decodable(contents, max_pixels=None):
    """bool scalar: TensorFlow's decoder gives the same pixels as data.image_io for these bytes.

    See :func:`_routing`, which also says whether the bytes are a JPEG.
    """
    return _routing(contents, max_pixels)[0]


def _routing(contents, max_pixels=None):
    """-> (tf_decodable bool scalar, is_jpeg bool scalar) for encoded image bytes.

    ``tf_decodable`` is True for JPEG without EXIF/XMP orientation data (TensorFlow ignores
    orientation, image_io applies it; aligned crops carry none; see
    :data:`data.image_io.ORIENTATION_WINDOW`),
    BMP, and PNG whose IHDR colour type is 0 (grey) or 2 (RGB); BMP and PNG only when the size
    their header declares is at most ``max_pixels`` (default data.image_io.DEFAULT_MAX_PIXELS;
    larger ones go to image_io, which refuses them, reason "too_large", before decoding anything;
    a JPEG's size is checked by :func:`decode_image`). Everything else (PGM/PPM, GIF, WebP, TIFF,
    PNG with alpha or a palette, EXIF JPEGs, empty or garbage files) goes to data.image_io.
    Mirrored by data.tfrecords.native_format.
    """
    from data.image_io import DEFAULT_MAX_PIXELS, ORIENTATION_TAGS, ORIENTATION_WINDOW

    if max_pixels is None:
        max_pixels = DEFAULT_MAX_PIXELS
    # A fixed-size, zero-padded header: substr fails past the end of short files.
    head = tf.strings.substr(tf.strings.substr(contents, 0, _HEADER_BYTES) + b"\0" * _HEADER_BYTES,
                             0, _HEADER_BYTES)
    b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)  # [64]

    def at(i, values):
        return tf.reduce_all(tf.equal(tf.gather(b, i + tf.range(len(values))),
                                      tf.constant(list(values), tf.int64)))

    def be32(i):
        return b[i] * 2**24 + b[i + 1] * 2**16 + b[i + 2] * 2**8 + b[i + 3]

    def le32_signed(i):
        u = b[i] + b[i + 1] * 2**8 + b[i + 2] * 2**16 + b[i + 3] * 2**24
        return tf.where(u >= 2**31, u - 2**32, u)

    window = tf.strings.substr(contents, 0, ORIENTATION_WINDOW)
    pattern = "|".join(re.escape(tag.decode("latin-1")) for tag in ORIENTATION_TAGS)
    oriented = tf.strings.length(tf.strings.regex_replace(
        window, pattern, "", replace_global=False)) < tf.strings.length(window)
    is_jpeg = at(0, b"\xff\xd8\xff")
    plain_jpeg = tf.logical_and(is_jpeg, tf.logical_not(oriented))
    bmp = tf.logical_and(at(0, b"BM"),
                         tf.abs(le32_signed(18)) * tf.abs(le32_signed(22)) <= max_pixels)
    png_plain = tf.logical_and(
        tf.logical_and(at(0, b"\x89PNG\r\n\x1a\n"), tf.strings.length(contents) > 25),
        tf.logical_or(tf.equal(b[25], 0), tf.equal(b[25], 2)))
    png_plain = tf.logical_and(png_plain, be32(16) * be32(20) <= max_pixels)
    return tf.logical_or(tf.logical_or(plain_jpeg, bmp), png_plain), is_jpeg


def _jpeg_small_enough(contents, max_pixels=None):
    """bool scalar for a JPEG: the frame size in its header is at most ``max_pixels``.

    Reads the header only (``tf.image.extract_jpeg_shape``); fails, like the decoder would, on a
    JPEG whose header is unreadable.
    """
    if max_pixels is None:
        from data.image_io import DEFAULT_MAX_PIXELS as max_pixels
    shape = tf.cast(tf.image.extract_jpeg_shape(contents), tf.int64)
    return shape[0] * shape[1] <= max_pixels


def _read_with_image_io(path: str) -> np.ndarray:
    from data.image_io import read_image  # imported lazily: Pillow only when needed

    return read_image(path)


def _as_bytes(value) -> bytes:
    if isinstance(value, np.ndarray):
        value = value.item()
    return bytes(value)


def _py_decode_path(path) -> np.ndarray:
    return _read_with_image_io(_as_bytes(path).decode("utf-8"))


def _py_decode_bytes(contents) -> np.ndarray:
    from data.image_io import UnreadableImageError

    contents = _as_bytes(contents)
    if len(contents) == 0:
        raise ValueError("empty image bytes")
    fd, tmp = tempfile.mkstemp(prefix="facenet_decode_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(contents)
        try:
            return _read_with_image_io(tmp)
        except UnreadableImageError as exc:  # name the bytes, not the temporary file
            raise ValueError(f"encoded image ({len(contents):,} bytes): "
                             f"{str(exc).replace(tmp, '').lstrip(': ')}") from None
    finally:
        os.unlink(tmp)


def decode_image(contents, path=None):
    """Encoded image bytes (string scalar) -> uint8 [h, w, 3] RGB, in graph mode.

    TF-native formats are decoded in-graph; others through ``data.image_io.read_image`` (reading
    ``path`` when given, else the bytes). Grey is repeated to 3 channels, alpha composited on
    white, EXIF orientation applied (see data.image_io). Both routes give the same pixels. Files
    declaring more than ``data.image_io.DEFAULT_MAX_PIXELS`` fail (reason "too_large") without
    being decoded.
    """
    contents = tf.convert_to_tensor(contents, tf.string)

    def tf_decode():
        return tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)

    def py_decode():
        if path is not None:
            img = tf.numpy_function(_py_decode_path, [path], tf.uint8, stateful=False)
        else:
            img = tf.numpy_function(_py_decode_bytes, [contents], tf.uint8, stateful=False)
        return tf.ensure_shape(img, [None, None, 3])

    native, is_jpeg = _routing(contents)
    # A JPEG's frame size is not at a fixed offset: read its header before letting TF decode it.
    native = tf.cond(tf.logical_and(native, is_jpeg),
                     lambda: _jpeg_small_enough(contents), lambda: native)
    image = tf.cond(native, tf_decode, py_decode)
    return tf.ensure_shape(image, [None, None, 3])


def load_image(path):
    """Reads and decodes one file: path string scalar -> uint8 [h, w, 3] RGB."""
    path = tf.convert_to_tensor(path, tf.string)
    return decode_image(tf.io.read_file(path), path)


def load_and_resize(path_or_contents, image_size, is_contents=False):
    """File (or encoded bytes) -> float32 [H, W, 3], 0..255, resized to image_size = (H, W)."""
    image = decode_image(path_or_contents) if is_contents else load_image(path_or_contents)
    return tf.clip_by_value(augment_lib.resize(image, image_size), 0.0, 255.0)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

def _failure_reason(path: str) -> str:
    if not os.path.exists(path):
        return "missing"
    try:
        image = _read_with_image_io(path)
    except Exception as exc:  # noqa: BLE001 - the reason is what we want
        return getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
    try:
        load_image(tf.constant(path)).numpy()
    except tf.errors.OpError as exc:
        return f"tensorflow decode failed: {exc.message.splitlines()[0][:200]}"
    del image
    return "unknown decode failure"


def _file_key(path):
    """'size:mtime_ns' of a file, or None when it cannot be stat'ed."""
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


def validate_files(dataset: IdentityDataset, num_parallel_calls=tf.data.AUTOTUNE, cache_path=None,
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
      max_pixels: declared width x height above which a file is refused (default
        ``data.image_io.DEFAULT_MAX_PIXELS``, as on every other decoding path).
    Returns:
      ``(clean, skipped)`` with ``skipped`` a list of ``(path, reason)``.
    Raises:
      EmptyDatasetError: no image decodes.
    """
    n = len(dataset)
    if n == 0:
        raise EmptyDatasetError("validate_files: the dataset holds no images")
    keys = [_file_key(p) for p in dataset.paths]
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


# ----------------------------------------------------------------------------------------------
# Balanced sampling
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


def balanced_dataset(source, identities_per_batch: int, images_per_identity: int, image_size,
                     augment: bool = True, seed=None, small_identities: str = "replace",
                     crop_fraction: float = 0.875, flip: bool = True, photometric: bool = False,
                     num_parallel_calls=tf.data.AUTOTUNE, prefetch=tf.data.AUTOTUNE, images=None,
                     skip_damaged_shards=False):
    """Infinite dataset of identity-balanced batches (FaceNet Section 3.2).

    Args:
      source: an :class:`IdentityDataset` (preferably validated, see :func:`validate_files`) or
        a TFRecord glob / list of files written by :mod:`data.tfrecords` (any tf.io.gfile path;
        the records are loaded into memory once, see :func:`data.tfrecords.load_tfrecords`).
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
    Returns:
      tf.data.Dataset of ``(images float32 [P*K, H, W, 3] preprocessed as data.preprocess,
      labels int32 [P*K])``; labels are the source's class indices; images of one identity are
      contiguous (identity p occupies rows p*K .. p*K+K-1).
    Raises:
      ValueError: fewer than P usable identities, bad arguments.
      data.tfrecords.DamagedShardError (a ValueError): a damaged shard, unless skip_damaged_shards.
    """
    p = int(identities_per_batch)
    k = int(images_per_identity)
    if p < 1 or k < 1:
        raise ValueError(f"identities_per_batch and images_per_identity must be >= 1, got {p}, {k}")
    if small_identities not in SMALL_IDENTITY_POLICIES:
        raise ValueError(f"small_identities must be one of {SMALL_IDENTITY_POLICIES}, "
                         f"got {small_identities!r}")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    image_size = (int(image_size[0]), int(image_size[1]))
    items, labels, class_names, items_are_bytes = resolve_source(
        source, skip_damaged_shards=skip_damaged_shards)
    num_classes = len(class_names)
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
    if items_are_bytes:
        table = tf.constant(items.tolist(), tf.string)
    else:
        table = tf.constant([os.fspath(x) for x in items], tf.string)

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
            return tf.ensure_shape(pixels, [p * k] + cached_shape), batch_labels, seeds

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

    ds = tf.data.Dataset.counter().flat_map(epoch_groups).enumerate()
    ds = ds.map(sample_batch)
    if images is not None:
        ds = ds.map(gather)
    ds = ds.unbatch()
    ds = ds.map(load, num_parallel_calls=num_parallel_calls, deterministic=True)
    ds = ds.batch(p * k, drop_remainder=True)
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
