"""Folder-per-identity image datasets: scanning, filtering and identity-disjoint splits.

The layout is the one used by LFW, CASIA-WebFace, VGGFace2 and davidsandberg/facenet's aligned
output: ``root/<identity>/<image>``. Everything here is plain Python/NumPy (no TensorFlow), so it is
cheap to import; :mod:`data.pipeline` turns an :class:`IdentityDataset` into batches.
"""
from __future__ import annotations

import dataclasses
import os
import unicodedata
from typing import Iterable, Sequence

import numpy as np
from absl import logging

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp")


class EmptyDatasetError(ValueError):
    """No usable image is left (root missing or empty, or every identity filtered out)."""


@dataclasses.dataclass(frozen=True)
class IdentityDataset:
    """Images labelled by identity.

    Attributes:
      paths: image file paths, [N], grouped by identity and sorted within it.
      labels: int32 [N], class index of each path, in 0..num_classes-1.
      class_names: identity names, [num_classes]; ``class_names[labels[i]]`` names image i.
    """

    paths: tuple
    labels: np.ndarray
    class_names: tuple

    def __post_init__(self):
        paths = tuple(str(p) for p in self.paths)
        labels = np.asarray(self.labels, dtype=np.int32).reshape(-1)
        labels.setflags(write=False)
        names = tuple(str(n) for n in self.class_names)
        if len(paths) != labels.shape[0]:
            raise ValueError(f"{len(paths)} paths but {labels.shape[0]} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise ValueError(
                f"labels must lie in 0..{len(names) - 1}, got {labels.min()}..{labels.max()}")
        object.__setattr__(self, "paths", paths)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "class_names", names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __eq__(self, other):
        if not isinstance(other, IdentityDataset):
            return NotImplemented
        return (self.paths == other.paths and self.class_names == other.class_names
                and np.array_equal(self.labels, other.labels))

    __hash__ = None

    def images_per_class(self) -> np.ndarray:
        """int64 [num_classes]: number of images of each identity."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, class_indices: Iterable[int]) -> "IdentityDataset":
        """The images of the given classes, relabelled 0..k-1 in the order given."""
        class_indices = [int(c) for c in class_indices]
        if len(set(class_indices)) != len(class_indices):
            raise ValueError("subset: class indices must be distinct")
        for c in class_indices:
            if not 0 <= c < self.num_classes:
                raise IndexError(f"class index {c} out of range 0..{self.num_classes - 1}")
        new_label = {c: i for i, c in enumerate(class_indices)}
        keep = [i for i, lab in enumerate(self.labels) if int(lab) in new_label]
        keep.sort(key=lambda i: (new_label[int(self.labels[i])], i))
        return IdentityDataset(
            paths=tuple(self.paths[i] for i in keep),
            labels=np.array([new_label[int(self.labels[i])] for i in keep], dtype=np.int32),
            class_names=tuple(self.class_names[c] for c in class_indices),
        )

    def subset_images(self, image_indices: Sequence[int]) -> "IdentityDataset":
        """The given images (e.g. those that passed validation), keeping every class and label."""
        idx = np.asarray(sorted(set(int(i) for i in image_indices)), dtype=np.int64)
        return IdentityDataset(
            paths=tuple(self.paths[i] for i in idx),
            labels=self.labels[idx] if idx.size else np.zeros([0], np.int32),
            class_names=self.class_names,
        )

    def describe(self) -> dict:
        """Summary counts, JSON-serialisable."""
        counts = self.images_per_class()
        return {
            "images": len(self),
            "identities": self.num_classes,
            "min_images_per_identity": int(counts.min()) if counts.size else 0,
            "max_images_per_identity": int(counts.max()) if counts.size else 0,
            "mean_images_per_identity": float(counts.mean()) if counts.size else 0.0,
            "identities_with_one_image": int((counts == 1).sum()),
        }


def _sort_key(name: str):
    # NFC so that the same name written by macOS (NFD) and Linux sorts identically.
    return unicodedata.normalize("NFC", name)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("~$") or name == "Thumbs.db"


def scan_identity_folder(root, min_images_per_identity: int = 1,
                         extensions: Sequence[str] = IMAGE_EXTENSIONS) -> IdentityDataset:
    """Scans ``root/<identity>/<image>`` into an :class:`IdentityDataset`.

    Identities and images are sorted by name (Unicode NFC order), so the result is deterministic.
    Hidden files and folders (leading '.') are ignored silently; files whose extension is not in
    ``extensions`` (case-insensitive) and loose files directly under ``root`` are logged and
    counted; identities with fewer than ``min_images_per_identity`` images are logged and dropped.
    Labels are assigned 0..C-1 over the identities that are kept.

    Raises:
      EmptyDatasetError: root is missing/not a folder, or no identity with enough images is left.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise EmptyDatasetError(f"dataset root {root!r} does not exist or is not a directory")
    extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    skipped_files = []
    loose_files = 0
    dropped = []
    class_names, paths, labels = [], [], []
    with os.scandir(root) as it:
        entries = sorted((e for e in it if not _is_hidden(e.name)), key=lambda e: _sort_key(e.name))
    for entry in entries:
        if not entry.is_dir():
            loose_files += 1
            continue
        images = []
        with os.scandir(entry.path) as it:
            files = sorted((f for f in it if not _is_hidden(f.name)), key=lambda f: _sort_key(f.name))
        for f in files:
            if not f.is_file():
                continue
            if os.path.splitext(f.name)[1].lower() in extensions:
                images.append(f.path)
            else:
                skipped_files.append(f.path)
        if len(images) < max(1, min_images_per_identity):
            dropped.append((entry.name, len(images)))
            continue
        label = len(class_names)
        class_names.append(entry.name)
        paths.extend(images)
        labels.extend([label] * len(images))
    if skipped_files:
        logging.warning("scan %s: skipped %d files with a non-image extension (e.g. %s)",
                        root, len(skipped_files), skipped_files[0])
    if loose_files:
        logging.warning("scan %s: ignored %d files directly under the root (expected "
                        "root/<identity>/<image>)", root, loose_files)
    if dropped:
        logging.info("scan %s: dropped %d identities with fewer than %d images (e.g. %r with %d)",
                     root, len(dropped), max(1, min_images_per_identity), dropped[0][0],
                     dropped[0][1])
    if not class_names:
        raise EmptyDatasetError(
            f"no usable images under {root!r}: expected root/<identity>/<image> with extensions "
            f"{', '.join(extensions)}; found {len(entries) - loose_files} identity folders, "
            f"{len(skipped_files)} non-image files, {len(dropped)} identities below "
            f"min_images_per_identity={min_images_per_identity}")
    dataset = IdentityDataset(tuple(paths), np.asarray(labels, np.int32), tuple(class_names))
    logging.info("scan %s: %d images of %d identities", root, len(dataset), dataset.num_classes)
    return dataset


def filter_min_images(dataset: IdentityDataset, k: int) -> IdentityDataset:
    """Keeps the identities with at least ``k`` images, relabelled 0..C'-1 in their original order.

    Raises EmptyDatasetError when none is left.
    """
    counts = dataset.images_per_class()
    keep = np.flatnonzero(counts >= k)
    if keep.size == 0:
        raise EmptyDatasetError(
            f"no identity has at least {k} images (largest has {int(counts.max(initial=0))})")
    if keep.size < dataset.num_classes:
        logging.info("filter_min_images(%d): kept %d of %d identities", k, keep.size,
                     dataset.num_classes)
    return dataset.subset(keep)


def split_identities(dataset: IdentityDataset, val_fraction: float, seed: int = 0):
    """Splits identities (not images) into (train, val); deterministic for a seed.

    ``round(val_fraction * C)`` identities go to validation (at least 1 when val_fraction > 0 and
    at most C-1), chosen by a seeded permutation. Both parts are relabelled 0..k-1 in the original
    class order, so the split depends only on (class names, seed, fraction).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    c = dataset.num_classes
    n_val = int(round(val_fraction * c))
    if val_fraction > 0:
        if c < 2:
            raise EmptyDatasetError(f"cannot split {c} identity into train and validation")
        n_val = min(max(n_val, 1), c - 1)
    perm = np.random.default_rng(seed).permutation(c)
    val_classes = np.sort(perm[:n_val])
    train_classes = np.sort(perm[n_val:])
    return dataset.subset(train_classes), (
        dataset.subset(val_classes) if n_val else IdentityDataset((), np.zeros([0], np.int32), ()))
