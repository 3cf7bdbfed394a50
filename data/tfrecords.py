"""TFRecord shards of an identity dataset: writer (library + CLI) and in-memory reader.

Write::

    python -m data.tfrecords --input_dir ALIGNED --output_dir SHARDS --shards 16

gives ``SHARDS/train-00000-of-00016.tfrecord`` ... and ``SHARDS/classes.json``, and prints a JSON
summary. Each record is a ``tf.train.Example`` with

=====================  =======  ===========================================================
``image/encoded``      bytes    the file's own bytes when TensorFlow decodes them exactly as
                                ``data.image_io`` does (JPEG without EXIF anywhere, BMP, PNG
                                without alpha/palette); otherwise (PGM/PPM, WebP, GIF, TIFF, PNG
                                with alpha, EXIF JPEG...) the
                                image decoded by ``data.image_io.read_image`` re-encoded as
                                lossless RGB PNG
``image/format``       bytes    ``jpeg`` / ``png`` / ``bmp``
``image/class/label``  int64    class index (the scan's label; ``classes.json`` names it)
``image/class/name``   bytes    identity name, UTF-8
``image/filename``     bytes    path relative to the input folder, UTF-8
``image/height``/``width``  int64  decoded size in pixels
``image/index``        int64    position in the source IdentityDataset (the reader restores it)
=====================  =======  ===========================================================

Bad files (zero bytes, not an image, truncated, declaring more than
``data.image_io.DEFAULT_MAX_PIXELS``...) are skipped, counted and listed in the summary and in
``classes.json``. Images are spread over shards in a seeded random order, so every shard
mixes identities.

Read: :func:`load_tfrecords` loads **all records into memory** (encoded bytes, not pixels) so that
:func:`data.pipeline.balanced_dataset` can draw exact P x K batches in-graph with random access.
Trade-off: memory = total shard size (aligned 160 px JPEG faces are ~5-10 kB, so CASIA-WebFace's
0.5 M images take ~3-5 GB; a 1 M-image set ~10 GB). The loader refuses more than ``max_bytes``
(default 16 GiB, or $FACENET_TFRECORD_MAX_BYTES); for larger sets train from the folder, where
only paths are held in memory and files are read on demand. Streaming readers (shuffle buffers,
per-identity interleaves) cannot guarantee exact P x K identity balance, which the triplet mining
(FaceNet Section 3.2) depends on. A truncated or corrupt shard raises :class:`DamagedShardError`
naming it; ``load_tfrecords(..., skip_damaged=True)`` keeps the records before the damage instead
and logs one warning per damaged shard counting the records kept and lost.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import re
import struct
import sys
import threading
import time
from typing import List, Sequence

import numpy as np
from absl import logging

from data.dataset import EmptyDatasetError, IdentityDataset

CLASSES_FILE = "classes.json"
FORMAT_NAME = "facenet-tfrecords/1"
DEFAULT_MAX_BYTES = 16 << 30

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def native_format(contents: bytes, max_pixels: int = None):
    """'jpeg'/'bmp'/'png' when TensorFlow's decoder matches data.image_io on these bytes, else None.

    ``contents``: the whole file (or at least its first data.image_io.ORIENTATION_WINDOW bytes).
    Mirrors data.decode's routing (``_tf_decodable`` and decode_image's JPEG size check): JPEG
    without EXIF/XMP orientation data in that window, BMP, PNG of colour type 0 (grey) or 2 (RGB);
    each only when its header declares at most ``max_pixels`` (default
    data.image_io.DEFAULT_MAX_PIXELS).
    """
    from data.image_io import (DEFAULT_MAX_PIXELS, ORIENTATION_TAGS, ORIENTATION_WINDOW,
                               jpeg_frame_size)

    if max_pixels is None:
        max_pixels = DEFAULT_MAX_PIXELS
    contents = bytes(contents)
    size = len(contents)
    head = contents[:64].ljust(64, b"\0")
    if head[:3] == b"\xff\xd8\xff":
        window = contents[:ORIENTATION_WINDOW]
        if any(tag in window for tag in ORIENTATION_TAGS):
            return None
        height, width = jpeg_frame_size(contents)
        return "jpeg" if height * width <= max_pixels else None
    if head[:2] == b"BM":
        width, height = struct.unpack_from("<ii", head, 18)
        return "bmp" if abs(width) * abs(height) <= max_pixels else None
    if head[:8] == _PNG_SIGNATURE and size > 25 and head[25] in (0, 2):
        width, height = struct.unpack_from(">II", head, 16)
        return "png" if width * height <= max_pixels else None
    return None


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def _encode_one(path: str):
    """-> (encoded bytes, format, height, width, reencoded) or raises with a reason."""
    import cv2

    from data.image_io import read_image

    image = read_image(path)  # validates (raises UnreadableImageError with .reason)
    with open(path, "rb") as f:
        contents = f.read()
    fmt = native_format(contents)
    if fmt is not None:
        return contents, fmt, image.shape[0], image.shape[1], False
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not ok:
        raise ValueError("PNG re-encoding failed")
    return buf.tobytes(), "png", image.shape[0], image.shape[1], True


def _example(contents, fmt, label, name, relpath, height, width, index):
    import tensorflow as tf

    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))

    return tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": b(contents),
        "image/format": b(fmt.encode()),
        "image/class/label": i(label),
        "image/class/name": b(name.encode("utf-8")),
        "image/filename": b(relpath.encode("utf-8")),
        "image/height": i(height),
        "image/width": i(width),
        "image/index": i(index),
    })).SerializeToString()


def shard_name(prefix: str, index: int, num_shards: int) -> str:
    return f"{prefix}-{index:05d}-of-{num_shards:05d}.tfrecord"


def write_tfrecords(dataset: IdentityDataset, output_dir, num_shards: int, prefix: str = "train",
                    root=None, seed: int = 0, num_threads: int = None, progress: bool = True
                    ) -> dict:
    """Writes ``dataset`` into ``num_shards`` TFRecord files plus ``classes.json``.

    Args:
      dataset: images to write (labels and class names are kept as they are).
      output_dir: any tf.io.gfile folder; created if needed.
      num_shards: number of files (>= 1; shards may be empty when there are fewer images).
      prefix: shard file name prefix.
      root: folder that ``image/filename`` is relative to (default: common parent of the paths).
      seed: order in which images are spread over shards.
      num_threads: decode/encode threads (default: CPU count).
      progress: report progress on stderr (data.progress: a live bar on a terminal, a plain line
        every 10 s otherwise).
    Returns:
      JSON-serialisable summary: images_written, skipped (count), skipped_files [(path, reason)],
      reencoded, identities, shards, output_dir, seconds.
    """
    import tensorflow as tf

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if len(dataset) == 0:
        raise EmptyDatasetError("write_tfrecords: the dataset holds no images")
    start = time.time()
    output_dir = os.fspath(output_dir)
    tf.io.gfile.makedirs(output_dir)
    if root is None:
        root = os.path.commonpath([os.path.dirname(os.path.dirname(os.path.abspath(p)))
                                   for p in dataset.paths])
    order = np.random.default_rng(seed).permutation(len(dataset))
    shard_of = np.empty(len(dataset), np.int64)
    shard_of[order] = np.arange(len(dataset)) % num_shards
    names = [shard_name(prefix, s, num_shards) for s in range(num_shards)]
    tmp_paths = [os.path.join(output_dir, n + ".tmp") for n in names]
    writers = [tf.io.TFRecordWriter(p) for p in tmp_paths]
    from data.progress import progress as make_progress

    bar = make_progress(len(dataset), unit="image", label="writing shards", enabled=progress,
                        stateful_metrics=["skipped"])
    skipped, reencoded, written = [], 0, 0
    per_class = np.zeros(dataset.num_classes, np.int64)
    shard_counts = np.zeros(num_shards, np.int64)
    workers = num_threads or max(1, os.cpu_count() or 1)
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            # A bounded window of decodes in flight keeps memory flat on large datasets.
            window = 8 * workers
            pending = collections.deque()
            submitted = 0
            for n_done, i in enumerate(order):
                while submitted < len(order) and len(pending) < window:
                    pending.append(pool.submit(_encode_one, dataset.paths[order[submitted]]))
                    submitted += 1
                fut = pending.popleft()
                path = dataset.paths[i]
                try:
                    contents, fmt, h, w, re = fut.result()
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                    skipped.append((path, reason))
                else:
                    label = int(dataset.labels[i])
                    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
                    writers[shard_of[i]].write(_example(
                        contents, fmt, label, dataset.class_names[label], rel, h, w, int(i)))
                    written += 1
                    reencoded += int(re)
                    per_class[label] += 1
                    shard_counts[shard_of[i]] += 1
                bar.update(n_done + 1, values=[("skipped", len(skipped))],
                           finalize=n_done + 1 == len(order))
    finally:
        for writer in writers:
            writer.close()
    for tmp, name in zip(tmp_paths, names):
        tf.io.gfile.rename(tmp, os.path.join(output_dir, name), overwrite=True)
    meta = {
        "format": FORMAT_NAME,
        "class_names": list(dataset.class_names),
        "images_per_class": per_class.tolist(),
        "num_images": written,
        "shards": names,
        "images_per_shard": shard_counts.tolist(),
        "skipped": [list(s) for s in skipped],
    }
    with tf.io.gfile.GFile(os.path.join(output_dir, CLASSES_FILE), "w") as f:
        f.write(json.dumps(meta, ensure_ascii=False, indent=1))
    if skipped:
        from absl import logging

        for path, reason in skipped[:20]:
            logging.warning("write_tfrecords: skipped %s (%s)", path, reason)
    if written == 0:
        raise EmptyDatasetError(f"write_tfrecords: none of the {len(dataset)} images could be read "
                                f"(first: {skipped[0][0]}: {skipped[0][1]})")
    return {
        "images_written": written,
        "skipped": len(skipped),
        "skipped_files": [list(s) for s in skipped[:100]],
        "reencoded": reencoded,
        "identities": int((per_class > 0).sum()),
        "shards": num_shards,
        "output_dir": output_dir,
        "seconds": round(time.time() - start, 3),
    }


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

class DamagedShardError(ValueError):
    """A TFRecord shard that cannot be read to its end: truncated, corrupt, or holding fewer
    records than ``classes.json`` lists for it.

    Attributes:
      path: the shard file.
      records_read: records read intact before the damage.
      records_expected: records the writer put in the shard (from classes.json), or None.
      detail: what went wrong (TensorFlow's reason, one line).
    """

    def __init__(self, path, records_read, records_expected=None, detail=""):
        self.path = os.fspath(path)
        self.records_read = int(records_read)
        self.records_expected = records_expected
        self.detail = detail
        super().__init__(
            f"damaged TFRecord shard {self.path}: {detail}; {_kept_lost(self)}. Rewrite it with "
            "python -m data.tfrecords, or skip the damaged part (skip_damaged=True; train.py "
            "--skip_damaged_shards)")


def _kept_lost(damage):
    """'N records readable before the damage, M lost' (M unknown without classes.json)."""
    text = f"{damage.records_read:,} records readable before the damage"
    if damage.records_expected is not None:
        lost = max(0, damage.records_expected - damage.records_read)
        return text + f", {lost:,} of {damage.records_expected:,} lost"
    return text + ", an unknown number after it lost (no classes.json lists the shard)"


@dataclasses.dataclass
class TFRecordTable:
    """All records of a set of shards, in memory.

    Attributes:
      encoded: object array [N] of encoded image bytes.
      labels: int32 [N].
      class_names: tuple [C] (from classes.json when present, else from the records).
      filenames: list [N] of the source paths relative to the input folder.
      files: the shard files read.
      num_bytes: total size of the encoded images.
      damaged: one :class:`DamagedShardError` per damaged shard whose intact records were kept
        (only with ``skip_damaged``); empty when every shard was read to its end.
    """

    encoded: np.ndarray
    labels: np.ndarray
    class_names: tuple
    filenames: List[str]
    files: List[str]
    num_bytes: int = 0
    damaged: list = dataclasses.field(default_factory=list)

    def __len__(self):
        return len(self.labels)


def expand_tfrecord_source(source) -> List[str]:
    """A glob, a folder, a file or a list of those -> sorted list of TFRecord files."""
    import tensorflow as tf

    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files = []
    for item in items:
        item = os.fspath(item)
        if any(c in item for c in "*?["):
            files.extend(tf.io.gfile.glob(item))
        elif tf.io.gfile.isdir(item):
            files.extend(tf.io.gfile.glob(os.path.join(item, "*.tfrecord")))
        elif tf.io.gfile.exists(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"TFRecord source {item!r} does not exist")
    files = sorted(set(files))
    if not files:
        raise EmptyDatasetError(f"no TFRecord files match {source!r}")
    return files


def _parse_fn():
    import tensorflow as tf

    spec = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        "image/class/name": tf.io.FixedLenFeature([], tf.string, default_value=b""),
        "image/filename": tf.io.FixedLenFeature([], tf.string, default_value=b""),
        "image/index": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    }

    def parse(serialized):
        f = tf.io.parse_example(serialized, spec)
        return (f["image/encoded"], f["image/class/label"], f["image/class/name"],
                f["image/filename"], f["image/index"])

    return parse


_CACHE = {}


def _fingerprint(files):
    import tensorflow as tf

    out = []
    for f in files:
        st = tf.io.gfile.stat(f)
        out.append((f, st.length, st.mtime_nsec))
    return tuple(out)


class _ByteBudget:
    """Thread-safe running total of encoded bytes; raises _OverBudget past ``limit``."""

    def __init__(self, limit):
        self.limit, self.total = limit, 0
        self._lock = threading.Lock()

    def add(self, n):
        with self._lock:
            self.total += n
            if self.total > self.limit:
                raise _OverBudget()


class _OverBudget(Exception):
    pass


def _tf_error_text(exc):
    """TensorFlow's error message as one short line, without the op and function names."""
    text = " ".join(str(getattr(exc, "message", exc)).split())
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)
    return text[:200]


def _expected_counts(files):
    """{shard path: records the writer put there} from each folder's classes.json (if any)."""
    import tensorflow as tf

    expected = {}
    for folder in sorted({os.path.dirname(f) for f in files}):
        meta_path = os.path.join(folder, CLASSES_FILE)
        try:
            with tf.io.gfile.GFile(meta_path, "r") as f:
                meta = json.loads(f.read())
            counts = dict(zip(meta["shards"], meta["images_per_shard"]))
        except (OSError, ValueError, KeyError, TypeError, tf.errors.OpError):
            continue  # no or foreign metadata: counts unknown
        for path in files:
            if os.path.dirname(path) == folder and os.path.basename(path) in counts:
                expected[path] = int(counts[os.path.basename(path)])
    return expected


def _read_shard(path, expected, budget):
    """Every intact record of one shard -> (columns, damage or None).

    ``columns``: lists of encoded bytes, label arrays, names, filenames and index arrays. Records
    before a damaged one are kept; ``damage`` is a :class:`DamagedShardError` (not raised).
    """
    import tensorflow as tf

    parse = _parse_fn()
    encoded, labels, names, filenames, indices = [], [], [], [], []
    count, detail = 0, None

    def take(batch):
        enc, lab, name, fname, index = batch
        budget.add(sum(len(e) for e in enc))
        encoded.extend(enc)
        labels.append(lab)
        indices.append(index)
        names.extend(name)
        filenames.extend(f.decode("utf-8") for f in fname)
        return len(lab)

    try:
        for batch in tf.data.TFRecordDataset(path).batch(1024).map(parse).as_numpy_iterator():
            count += take(batch)
    except tf.errors.DataLossError as exc:
        detail = _tf_error_text(exc)
        try:  # the failed batch held intact records before the damaged one: read them singly
            for batch in (tf.data.TFRecordDataset(path).skip(count).batch(1).map(parse)
                          .as_numpy_iterator()):
                count += take(batch)
        except tf.errors.DataLossError:
            pass
    if detail is None and expected is not None and count < expected:
        # TensorFlow ends a shard cut inside a record header without an error.
        detail = f"it ends after {count:,} records but classes.json lists {expected:,}"
    damage = None if detail is None else DamagedShardError(path, count, expected, detail)
    return (encoded, labels, names, filenames, indices), damage


def load_tfrecords(source, max_bytes: int = None, cache: bool = True,
                   skip_damaged: bool = False) -> TFRecordTable:
    """Reads every record of ``source`` (glob / folder / file / list; any tf.io.gfile path).

    With ``cache`` the last table read is kept in memory and returned again while the files are
    unchanged (same names, sizes and modification times), so re-creating the input pipeline (e.g.
    once per epoch) does not re-read the shards.

    A shard is damaged when TensorFlow cannot read it to its end (truncated or corrupt record) or
    when it holds fewer records than the writer's ``classes.json`` lists for it (a cut at a record
    boundary reads as a clean end). With ``skip_damaged`` the records read before the damage are
    kept and one warning per damaged shard names it and counts the records kept and lost
    (``table.damaged`` lists them); without it, :class:`DamagedShardError` is raised.

    Raises:
      EmptyDatasetError: no files or no records.
      DamagedShardError: a damaged shard (a ValueError naming it), unless ``skip_damaged``.
      ValueError: records exceed ``max_bytes`` of encoded images, or inconsistent label names.
    """
    files = expand_tfrecord_source(source)
    if max_bytes is None:
        max_bytes = int(os.environ.get("FACENET_TFRECORD_MAX_BYTES", DEFAULT_MAX_BYTES))
    key = _fingerprint(files) if cache else None
    if cache and key in _CACHE and _CACHE[key].num_bytes <= max_bytes:
        table = _CACHE[key]
        if table.damaged and not skip_damaged:
            first = table.damaged[0]
            raise DamagedShardError(first.path, first.records_read, first.records_expected,
                                    first.detail)
        return table
    expected = _expected_counts(files)
    budget = _ByteBudget(max_bytes)
    try:
        with concurrent.futures.ThreadPoolExecutor(min(8, len(files))) as pool:
            shards = list(pool.map(lambda f: _read_shard(f, expected.get(f), budget), files))
    except _OverBudget:
        raise ValueError(
            f"TFRecords {source!r} hold more than {max_bytes / 2**30:.1f} GiB of encoded images; "
            "the balanced reader keeps them in memory. Train from the image folder instead, "
            "or raise max_bytes / $FACENET_TFRECORD_MAX_BYTES") from None
    damaged = [damage for _, damage in shards if damage is not None]
    if damaged and not skip_damaged:
        raise damaged[0]
    for damage in damaged:
        logging.warning("load_tfrecords: damaged shard %s (%s): keeping %s", damage.path,
                        damage.detail, _kept_lost(damage))
    encoded, labels, names, filenames, indices = [], [], [], [], []
    for (enc, lab, name, fname, index), _ in shards:
        encoded.extend(enc)
        labels.extend(lab)
        names.extend(name)
        filenames.extend(fname)
        indices.extend(index)
    total = budget.total
    if not encoded:
        raise EmptyDatasetError(f"TFRecords {source!r} hold no records")
    labels = np.concatenate(labels).astype(np.int64)
    if labels.min() < 0:
        raise ValueError(f"TFRecords {source!r}: negative label {labels.min()}")
    # A deterministic order regardless of read interleaving: the writer's source order (label,
    # then position in the scanned dataset), filename for records without an index.
    indices = np.concatenate(indices)
    order = np.lexsort((np.array(filenames, dtype=str), indices, labels))
    encoded_arr = np.empty(len(encoded), dtype=object)
    encoded_arr[:] = encoded
    encoded_arr = encoded_arr[order]
    labels = labels[order]
    names = [names[i] for i in order]
    filenames = [filenames[i] for i in order]
    class_names = _class_names(files, labels, names)
    table = TFRecordTable(encoded=encoded_arr, labels=labels.astype(np.int32),
                          class_names=class_names, filenames=filenames, files=files,
                          num_bytes=total, damaged=damaged)
    if cache:
        _CACHE.clear()  # one table at a time: they can be large
        _CACHE[key] = table
    return table


def _class_names(files: Sequence[str], labels: np.ndarray, names: Sequence[bytes]) -> tuple:
    import tensorflow as tf

    meta_path = os.path.join(os.path.dirname(files[0]), CLASSES_FILE)
    from_records = {}
    for lab, name in zip(labels.tolist(), names):
        prev = from_records.setdefault(lab, name)
        if prev != name:
            raise ValueError(f"TFRecords: label {lab} is named both {prev!r} and {name!r}")
    if tf.io.gfile.exists(meta_path):
        with tf.io.gfile.GFile(meta_path, "r") as f:
            meta = json.loads(f.read())
        class_names = tuple(meta["class_names"])
        if labels.max() >= len(class_names):
            raise ValueError(f"{meta_path} names {len(class_names)} classes but records use "
                             f"label {labels.max()}")
        for lab, name in from_records.items():
            if name and name.decode("utf-8") != class_names[lab]:
                raise ValueError(f"{meta_path}: class {lab} is {class_names[lab]!r} but records "
                                 f"say {name.decode('utf-8')!r}")
        return class_names
    num = int(labels.max()) + 1
    return tuple(from_records[c].decode("utf-8") if c in from_records else f"class_{c}"
                 for c in range(num))


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def _define_flags():
    from absl import flags

    flags.DEFINE_string("input_dir", None, "Folder-per-identity image tree (aligned faces).")
    flags.DEFINE_string("output_dir", None, "Where shards and classes.json are written.")
    flags.DEFINE_integer("shards", 8, "Number of TFRecord files.")
    flags.DEFINE_string("prefix", "train", "Shard file name prefix.")
    flags.DEFINE_integer("min_images_per_identity", 1, "Drop identities with fewer images.")
    flags.DEFINE_integer("seed", 0, "Order in which images are spread over shards.")
    flags.DEFINE_integer("threads", 0, "Decode/encode threads (0: CPU count).")
    flags.mark_flags_as_required(["input_dir", "output_dir"])


def main(argv):
    del argv
    from absl import flags

    from data.dataset import scan_identity_folder

    f = flags.FLAGS
    dataset = scan_identity_folder(f.input_dir, min_images_per_identity=f.min_images_per_identity)
    summary = write_tfrecords(dataset, f.output_dir, f.shards, prefix=f.prefix,
                              root=f.input_dir, seed=f.seed, num_threads=f.threads or None,
                              progress=True)
    summary["input_dir"] = f.input_dir
    print(json.dumps(summary, ensure_ascii=False))
    sys.stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    _define_flags()
    app.run(main)
