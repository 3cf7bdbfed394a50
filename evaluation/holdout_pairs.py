"""Verification pairs for a folder-per-identity hold-out set (FaceNet Section 4.1 "hold-out test set").

The paper evaluates a hold-out set of about one million images with VAL at FAR = 1e-3 over pairs
of images (Section 5.1); it does not say how the pairs are drawn. Two modes are offered:

* ``"all"``: every pair (i < j), which is what "all pairs" VAL/FAR means; quadratic in the number
  of images, so refused above :data:`MAX_ALL_PAIRS` pairs.
* ``"balanced"``: ``num_pairs // 2`` same pairs and ``num_pairs - num_pairs // 2`` different pairs,
  each sampled uniformly without duplicates (an LFW-like 50/50 mix). When fewer same pairs exist,
  all of them are used and a warning says how many.

Folds: same and different pairs are each shuffled with the seed and dealt round-robin over
``num_folds`` folds, so every fold holds (nearly) the same number of each class; every pair is in
exactly one fold. Identities with a single image contribute only different pairs.
The output is sorted by fold, then same pairs before different pairs, then by (a, b), like LFW's
View 2 file; it is a pure function of (labels, mode, num_pairs, num_folds, seed).
"""
import logging

import numpy as np

__all__ = ["make_pairs", "count_pairs", "MAX_ALL_PAIRS"]

#: ``mode="all"`` refuses more pairs than this (about 0.3 GB of indices; ~7000 images).
MAX_ALL_PAIRS = 25_000_000
#: Below this many candidate pairs the sampler enumerates them all instead of drawing.
_ENUMERATE_LIMIT = 4_000_000

_log = logging.getLogger("facenet.evaluation")


def _check_labels(labels):
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size < 2:
        raise ValueError(f"need at least 2 images to make pairs, got {labels.size}")
    return labels


def count_pairs(labels):
    """(number of same pairs, number of different pairs) among all i < j."""
    labels = _check_labels(labels)
    _, counts = np.unique(labels, return_counts=True)
    n = labels.size
    same = int(np.sum(counts * (counts - 1) // 2))
    return same, n * (n - 1) // 2 - same


def _assign_folds(num, num_folds, rng):
    """Shuffle ``num`` items and deal them round-robin: int [num] fold per item (in item order)."""
    folds = np.empty(num, dtype=np.int64)
    folds[rng.permutation(num)] = np.arange(num) % num_folds
    return folds


def _sample_same(labels, n_want, rng):
    """Up to ``n_want`` distinct same pairs (a < b), uniform without replacement."""
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    per_class = counts * (counts - 1) // 2
    total = int(per_class.sum())
    pick = np.arange(total) if n_want >= total else np.sort(rng.choice(total, n_want, replace=False))
    # Decode a global pair index -> (class, local pair index) -> (i, j) with i < j in the class.
    offsets = np.concatenate([[0], np.cumsum(per_class)])
    cls = np.searchsorted(offsets, pick, side="right") - 1
    local = pick - offsets[cls]
    # Local index enumerates j = 1..c-1, i = 0..j-1 in order: local = j(j-1)/2 + i.
    j = np.floor((1 + np.sqrt(1 + 8 * local.astype(np.float64))) / 2).astype(np.int64)
    j = np.where(j * (j - 1) // 2 > local, j - 1, j)
    j = np.where((j + 1) * j // 2 <= local, j + 1, j)
    i = local - j * (j - 1) // 2
    a = order[starts[cls] + i]
    b = order[starts[cls] + j]
    return np.minimum(a, b), np.maximum(a, b)


def _sample_diff(labels, n_want, rng):
    """Up to ``n_want`` distinct different pairs (a < b), uniform without replacement."""
    n = labels.size
    _, n_diff = count_pairs(labels)
    if n_want >= n_diff or n * (n - 1) // 2 <= _ENUMERATE_LIMIT:
        a, b = np.triu_indices(n, k=1)
        keep = labels[a] != labels[b]
        a, b = a[keep], b[keep]
        if n_want < a.size:
            pick = np.sort(rng.choice(a.size, n_want, replace=False))
            a, b = a[pick], b[pick]
        return a.astype(np.int64), b.astype(np.int64)
    # Large set: rejection sampling of random (a, b), deduplicated through a pair code a * n + b.
    chosen = np.empty(0, dtype=np.int64)
    while chosen.size < n_want:
        need = n_want - chosen.size
        x = rng.integers(0, n, size=2 * need + 16)
        y = rng.integers(0, n, size=2 * need + 16)
        ok = labels[x] != labels[y]
        a, b = np.minimum(x[ok], y[ok]), np.maximum(x[ok], y[ok])
        codes = a * n + b
        _, first = np.unique(codes, return_index=True)
        codes = codes[np.sort(first)]  # keep draw order (uniform), drop repeats
        codes = codes[~np.isin(codes, chosen)]
        chosen = np.concatenate([chosen, codes[:need]])
    chosen = np.sort(chosen)
    return chosen // n, chosen % n


def make_pairs(labels, mode="balanced", num_pairs=6000, num_folds=10, seed=0):
    """Verification pairs over a labelled hold-out set.

    Args:
      labels: int [N], identity of each image (e.g. ``IdentityDataset.labels``).
      mode: ``"balanced"`` (sample ``num_pairs`` pairs, half same, half different; when fewer
        same pairs exist, all of them and as many different pairs) or ``"all"``
        (every i < j; refused above :data:`MAX_ALL_PAIRS`).
      num_pairs: total pairs for ``"balanced"``.
      num_folds: cross-validation folds.
      seed: sampling and fold seed.

    Returns:
      ``(idx_a, idx_b, issame, folds)``: int64 [P] image indices with idx_a < idx_b, bool [P],
      int64 [P] fold in 0..num_folds-1.

    Raises:
      ValueError: fewer than 2 images, a single identity (no different pair), no identity with two
        images (no same pair), a bad mode or size, or too many pairs for ``"all"``.
    """
    labels = _check_labels(labels)
    if num_folds < 1:
        raise ValueError(f"num_folds must be >= 1, got {num_folds}")
    n_same_all, n_diff_all = count_pairs(labels)
    if n_diff_all == 0:
        raise ValueError("all images belong to one identity: no different pair can be made")
    if n_same_all == 0:
        raise ValueError("no identity has two images: no same pair can be made")
    rng = np.random.default_rng(seed)
    if mode == "all":
        total = n_same_all + n_diff_all
        if total > MAX_ALL_PAIRS:
            raise ValueError(
                f"--pairs=all would make {total:,} pairs from {labels.size} images (limit "
                f"{MAX_ALL_PAIRS:,}); use --pairs=balanced with --num_pairs instead")
        a, b = np.triu_indices(labels.size, k=1)
        a, b = a.astype(np.int64), b.astype(np.int64)
        same = labels[a] == labels[b]
        sa, sb, da, db = a[same], b[same], a[~same], b[~same]
    elif mode == "balanced":
        if num_pairs < 2:
            raise ValueError(f"num_pairs must be >= 2, got {num_pairs}")
        want_same = num_pairs // 2
        want_diff = num_pairs - want_same
        sa, sb = _sample_same(labels, want_same, rng)
        if sa.size < want_same:
            # Keep the classes balanced (accuracy stays meaningful): as many different pairs.
            want_diff = sa.size
            _log.warning("make_pairs: only %d same pairs exist (asked for %d); using all of them "
                         "with as many different pairs", sa.size, want_same)
        da, db = _sample_diff(labels, want_diff, rng)
        if da.size < want_diff:
            _log.warning("make_pairs: only %d different pairs exist (asked for %d)",
                         da.size, want_diff)
    else:
        raise ValueError(f"mode must be 'all' or 'balanced', got {mode!r}")
    fs = _assign_folds(sa.size, num_folds, rng)
    fd = _assign_folds(da.size, num_folds, rng)
    idx_a = np.concatenate([sa, da])
    idx_b = np.concatenate([sb, db])
    issame = np.concatenate([np.ones(sa.size, bool), np.zeros(da.size, bool)])
    folds = np.concatenate([fs, fd])
    order = np.lexsort((idx_b, idx_a, ~issame, folds))
    return idx_a[order], idx_b[order], issame[order], folds[order]
