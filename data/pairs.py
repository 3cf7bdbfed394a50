"""LFW verification pairs: reading and writing ``pairs.txt`` files (Huang et al. 2007 protocol).

FaceNet reports LFW accuracy with the standard unrestricted protocol (Section 5.6): ten folds of 300
matched and 300 mismatched pairs, threshold chosen on nine folds and tested on the tenth.

Formats (fields separated by tabs; runs of spaces are accepted too):

* View 2 ``pairs.txt``: first line ``<folds>\\t<n>``; then, for every fold, ``n`` matched lines
  ``name\\tn1\\tn2`` followed by ``n`` mismatched lines ``name1\\tn1\\tname2\\tn2``.
* View 1 ``pairsDevTrain.txt`` / ``pairsDevTest.txt``: first line ``<n>``; then ``n`` matched and
  ``n`` mismatched lines; a single fold.

Image ``k`` of identity ``name`` is ``<lfw_dir>/name/name_%04d.<ext>``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from data.atomic import write_text_atomically

_SEARCH_EXTENSIONS = ("jpg", "png", "jpeg", "bmp", "webp", "pgm", "ppm", "JPG", "PNG", "JPEG")


@dataclasses.dataclass(frozen=True)
class Pair:
    """One verification pair. ``fold`` is 0-based."""

    path_a: str
    path_b: str
    issame: bool
    fold: int


@dataclasses.dataclass
class PairSet:
    """The pairs of a protocol file, in file order.

    Attributes:
      pairs: every pair of the file, including those with a missing image (their path does not
        exist on disk), so that evaluation can count them.
      num_folds: number of cross-validation folds (10 for View 2, 1 for View 1).
      missing: sorted unique image paths referenced by the file that do not exist.
    """

    pairs: List[Pair]
    num_folds: int
    missing: List[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def issame(self) -> np.ndarray:
        """bool [num_pairs]: True for a matched (same identity) pair."""
        return np.array([p.issame for p in self.pairs], dtype=bool)

    @property
    def folds(self) -> np.ndarray:
        """int32 [num_pairs]: 0-based fold of each pair."""
        return np.array([p.fold for p in self.pairs], dtype=np.int32)

    @property
    def paths_a(self) -> List[str]:
        return [p.path_a for p in self.pairs]

    @property
    def paths_b(self) -> List[str]:
        return [p.path_b for p in self.pairs]

    def unique_paths(self) -> List[str]:
        """Every distinct image path referenced, in first-use order (embed each image once)."""
        seen = {}
        for p in self.pairs:
            seen.setdefault(p.path_a, None)
            seen.setdefault(p.path_b, None)
        return list(seen)

    def present_mask(self) -> np.ndarray:
        """bool [num_pairs]: True when both images of the pair exist."""
        missing = set(self.missing)
        return np.array([p.path_a not in missing and p.path_b not in missing for p in self.pairs],
                        dtype=bool)


def _split(line: str) -> List[str]:
    return line.split("\t") if "\t" in line else line.split()


def _parse_int(text: str, lineno: int, what: str, path: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: {what} must be an integer, got {text!r}") from None
    if value < 0:
        raise ValueError(f"{path}:{lineno}: {what} must be >= 0, got {value}")
    return value


class _ImageLocator:
    """Maps (name, number) to a path, finding the extension that exists when none is given."""

    def __init__(self, lfw_dir: str, ext: Optional[str]):
        self.lfw_dir = lfw_dir
        self.fixed = ext.lstrip(".") if ext else None
        self.last = None
        self.missing = {}  # stem -> the path reported, so one missing image is named once

    def __call__(self, name: str, number: int) -> Tuple[str, bool]:
        stem = os.path.join(self.lfw_dir, name, "%s_%04d" % (name, number))
        if self.fixed is not None:
            path = f"{stem}.{self.fixed}"
            return path, os.path.isfile(path)
        if stem in self.missing:
            return self.missing[stem], False
        order = ([self.last] if self.last else []) + [e for e in _SEARCH_EXTENSIONS if e != self.last]
        for e in order:
            path = f"{stem}.{e}"
            if os.path.isfile(path):
                self.last = e
                return path, True
        self.missing[stem] = f"{stem}.{self.last or 'jpg'}"
        return self.missing[stem], False


def read_pairs(pairs_file, lfw_dir, ext: Optional[str] = None) -> PairSet:
    """Parses an LFW View 1 or View 2 pairs file.

    Args:
      pairs_file: path of ``pairs.txt`` (View 2) or ``pairsDevTrain.txt``/``pairsDevTest.txt``.
      lfw_dir: image root, ``lfw_dir/name/name_0001.jpg``.
      ext: image extension (``"jpg"``, ``".png"``); None finds the one that exists per image.

    Returns:
      A :class:`PairSet`. Missing images are logged and listed in ``missing``; their pairs stay.

    Raises:
      ValueError: malformed header or line (message gives ``file:line``), or a fold without the
        announced number of matched and mismatched pairs.
    """
    pairs_file = os.fspath(pairs_file)
    lfw_dir = os.fspath(lfw_dir)
    with open(pairs_file, encoding="utf-8") as f:
        lines = [(i + 1, raw.strip()) for i, raw in enumerate(f)]
    lines = [(n, s) for n, s in lines if s]
    if not lines:
        raise ValueError(f"{pairs_file}: empty pairs file")
    head_no, head = lines[0]
    fields = _split(head)
    if len(fields) == 2:
        num_folds = _parse_int(fields[0], head_no, "number of folds", pairs_file)
        per_kind = _parse_int(fields[1], head_no, "pairs per fold", pairs_file)
    elif len(fields) == 1:
        num_folds, per_kind = 1, _parse_int(fields[0], head_no, "number of pairs", pairs_file)
    else:
        raise ValueError(f"{pairs_file}:{head_no}: header must be '<folds>\\t<n>' (View 2) or "
                         f"'<n>' (View 1), got {head!r}")
    if num_folds < 1 or per_kind < 1:
        raise ValueError(f"{pairs_file}:{head_no}: header announces no pairs: {head!r}")
    body = lines[1:]
    expected = 2 * per_kind * num_folds
    if len(body) != expected:
        raise ValueError(f"{pairs_file}: header announces {num_folds} folds x {per_kind} matched + "
                         f"{per_kind} mismatched = {expected} pair lines, found {len(body)}")
    locate = _ImageLocator(lfw_dir, ext)
    pairs, missing = [], set()
    counts = np.zeros([num_folds, 2], dtype=np.int64)
    for k, (lineno, line) in enumerate(body):
        fold = k // (2 * per_kind)
        f = _split(line)
        if len(f) == 3:
            name_a, name_b = f[0], f[0]
            num_a = _parse_int(f[1], lineno, "image number", pairs_file)
            num_b = _parse_int(f[2], lineno, "image number", pairs_file)
            issame = True
        elif len(f) == 4:
            name_a, name_b = f[0], f[2]
            num_a = _parse_int(f[1], lineno, "image number", pairs_file)
            num_b = _parse_int(f[3], lineno, "image number", pairs_file)
            issame = False
        else:
            raise ValueError(f"{pairs_file}:{lineno}: expected 'name n1 n2' (matched) or "
                             f"'name1 n1 name2 n2' (mismatched), got {len(f)} fields: {line!r}")
        counts[fold, 0 if issame else 1] += 1
        path_a, ok_a = locate(name_a, num_a)
        path_b, ok_b = locate(name_b, num_b)
        if not ok_a:
            missing.add(path_a)
        if not ok_b:
            missing.add(path_b)
        pairs.append(Pair(path_a, path_b, issame, fold))
    bad = np.flatnonzero((counts != per_kind).any(axis=1))
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"{pairs_file}: fold {b + 1} has {counts[b, 0]} matched and {counts[b, 1]} "
                         f"mismatched pairs, header announces {per_kind} of each")
    if missing:
        logging.warning("read_pairs %s: %d referenced images are missing under %s (e.g. %s); "
                        "their pairs are kept and reported", pairs_file, len(missing), lfw_dir,
                        sorted(missing)[0])
    return PairSet(pairs=pairs, num_folds=num_folds, missing=sorted(missing))


def write_pairs(pairs_file, folds: Sequence[Tuple[Sequence[tuple], Sequence[tuple]]]) -> None:
    """Writes a View 2 ``pairs.txt``.

    Args:
      pairs_file: output path.
      folds: per fold ``(matched, mismatched)`` with matched ``[(name, n1, n2), ...]`` and
        mismatched ``[(name1, n1, name2, n2), ...]``; every fold has the same number ``n`` of each.
    """
    if not folds:
        raise ValueError("write_pairs: no folds")
    n = len(folds[0][0])
    if n == 0:
        raise ValueError("write_pairs: folds hold no pairs")
    for i, (matched, mismatched) in enumerate(folds):
        if len(matched) != n or len(mismatched) != n:
            raise ValueError(f"write_pairs: fold {i} has {len(matched)} matched and "
                             f"{len(mismatched)} mismatched pairs, expected {n} of each")
    lines = [f"{len(folds)}\t{n}"]
    for matched, mismatched in folds:
        for name, a, b in matched:
            _check_name(name)
            lines.append(f"{name}\t{int(a)}\t{int(b)}")
        for name_a, a, name_b, b in mismatched:
            _check_name(name_a)
            _check_name(name_b)
            lines.append(f"{name_a}\t{int(a)}\t{name_b}\t{int(b)}")
    write_text_atomically(pairs_file, "\n".join(lines) + "\n")


def _check_name(name: str) -> None:
    if not name or any(c in name for c in "\t\n\r") or "/" in name:
        raise ValueError(f"write_pairs: identity name {name!r} cannot be written to a pairs file "
                         "(no tab, newline or '/')")
