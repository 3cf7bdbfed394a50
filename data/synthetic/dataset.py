"""Writing the synthetic dataset: an LFW-style image tree with its View 2 pairs, generated atomically.

Identities come from :mod:`data.synthetic.params`, images from :mod:`data.synthetic.render`; this
module renders them in worker processes, picks the held-out verification pairs
(:func:`view2_folds`), writes them with :func:`data.pairs.write_pairs` and records everything in
``synthetic.json``.

Layout of ``DIR`` (identity-disjoint splits; image numbers start at 0001 as in LFW)::

    DIR/train/synth_00000/synth_00000_0001.jpg ...
    DIR/test/synth_00400/synth_00400_0001.jpg ...   (the held-out identities: the last M)
    DIR/test/pairs.txt                              (LFW View 2 format, 10 folds)
    DIR/synthetic.json                              (parameters, counts, baseline; written last)

Generation is atomic: everything is written to a hidden sibling temp dir that is renamed to ``DIR``
only when complete, so an interrupted run never leaves a dataset that looks complete.

Determinism: identity i is drawn from ``default_rng([seed, 0, i, attempt])`` and image j of it from
``default_rng([seed, 1, i, j])``, so the same seed gives byte-identical files whatever the number of
worker processes.

Baseline: a measure passed as ``baseline`` (:func:`evaluation.pixel_baseline.pixel_baseline`, the
raw-pixel baseline, is the one the project uses) is run on the held-out pairs and stored with the
data (``pixel_baseline``, ``pixel_baseline_accuracy``). The data layer does not score
verification itself.
"""
import json
import multiprocessing
import os
import shutil
import sys
import time
import uuid

import numpy as np

FORMAT_VERSION = 1
NUM_FOLDS = 10
MAX_PAIRS_PER_FOLD = 300  # as LFW View 2
METADATA_FILE = "synthetic.json"
PAIRS_FILE = "pairs.txt"


def identity_name(index):
    """Directory / file stem of identity ``index``: ``synth_00042``."""
    return f"synth_{index:05d}"


def default_heldout_identities(identities):
    """max(20, 20% of N), but never more than half of N (the rest must train)."""
    return int(min(max(20, round(0.2 * identities)), identities // 2))


def _check_args(identities, images_per_identity, image_size, heldout):
    if identities < 3:
        raise ValueError(f"identities must be >= 3, got {identities}")
    if images_per_identity < 2:
        raise ValueError(f"images_per_identity must be >= 2 (matched pairs need two), got {images_per_identity}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if not 2 <= heldout <= identities - 1:
        raise ValueError(f"heldout_identities must be in [2, identities - 1 = {identities - 1}], got {heldout}")


# --- rendering workers (no TensorFlow here) -------------------------------------------------------
def _init_worker():
    import cv2

    cv2.setNumThreads(1)


def _render_identity(task):
    """Render and write all images of one identity. Returns (images written, bytes written)."""
    from data.synthetic.render import render_jpeg

    index, folder, params, count, size, seed, difficulty = task
    name = identity_name(index)
    os.makedirs(folder, exist_ok=True)
    total = 0
    for j in range(1, count + 1):
        data, _ = render_jpeg(params, np.random.default_rng([seed, 1, index, j]), size, difficulty)
        with open(os.path.join(folder, f"{name}_{j:04d}.jpg"), "wb") as f:
            f.write(data)
        total += len(data)
    return count, total


class _Progress:
    """Minimal text progress bar on stderr (keeps TensorFlow out of the generator)."""

    def __init__(self, total, enabled=True, width=30):
        self.total, self.enabled, self.width = total, enabled, width
        self.done, self.start, self.last = 0, time.time(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, n):
        self.done += n
        now = time.time()
        if not self.enabled or (now - self.last < (0.2 if self.tty else 5.0) and self.done < self.total):
            return
        self.last = now
        frac = self.done / max(1, self.total)
        rate = self.done / max(1e-9, now - self.start)
        bar = "=" * int(frac * self.width)
        msg = f"[{bar:<{self.width}}] {self.done}/{self.total} images, {rate:.0f} img/s"
        sys.stderr.write(("\r" + msg) if self.tty else (msg + "\n"))
        if self.tty and self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _pool_context():
    # fork is fastest, but forking a process that already runs TensorFlow's threads can deadlock.
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and "tensorflow" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _render_all(tasks, workers, progress):
    bar = _Progress(sum(t[3] for t in tasks), enabled=progress)
    nbytes = 0
    if workers <= 1:
        _init_worker()
        for t in tasks:
            n, b = _render_identity(t)
            nbytes += b
            bar.update(n)
        return nbytes
    with _pool_context().Pool(workers, initializer=_init_worker) as pool:
        for n, b in pool.imap_unordered(_render_identity, tasks, chunksize=1):
            nbytes += b
            bar.update(n)
    return nbytes


# --- pairs ------------------------------------------------------------------------------------------
def view2_folds(names, images_per_identity, seed, num_folds=NUM_FOLDS, max_per_fold=MAX_PAIRS_PER_FOLD):
    """LFW View 2 folds of balanced verification pairs over ``names`` (each with images 1..K).

    With >= 2 * num_folds identities the folds are identity-disjoint (as LFW View 2); with fewer,
    every fold draws from all identities and no pair repeats (in a set too small even for that,
    pairs are unique within a fold only). Every fold has the same number n of matched and of
    mismatched pairs: min(max_per_fold, what the smallest fold can supply).

    Not :func:`evaluation.holdout_pairs.make_pairs`, which draws pairs of image indices from labels:
    this one needs only identity names and a fixed K, and returns the folds that
    :func:`data.pairs.write_pairs` writes.

    Returns a list of ``(matched: [(name, n1, n2)], mismatched: [(name1, n1, name2, n2)])``.
    """
    k = int(images_per_identity)
    rng = np.random.default_rng([seed, 2])
    names = list(names)
    if len(names) < 2 or k < 2:
        raise ValueError(f"pairs need >= 2 identities with >= 2 images each, got {len(names)} x {k}")
    disjoint = len(names) >= 2 * num_folds
    order = [names[i] for i in rng.permutation(len(names))]
    groups = [order[f::num_folds] for f in range(num_folds)] if disjoint else [order] * num_folds
    share = 1 if disjoint else num_folds
    cap_same = min(len(g) * k * (k - 1) // 2 for g in groups)
    cap_diff = min(len(g) * (len(g) - 1) // 2 * k * k for g in groups)
    n = int(min(max_per_fold, cap_same // share, cap_diff // share))
    repeat_across_folds = n < 1  # tiny set: pairs are unique within a fold but may recur across folds
    if repeat_across_folds:
        n = int(min(max_per_fold, cap_same, cap_diff))
    used_same, used_diff, folds = set(), set(), []
    for g in groups:
        if repeat_across_folds:
            used_same, used_diff = set(), set()
        matched, mismatched = [], []
        while len(matched) < n:
            name = g[int(rng.integers(len(g)))]
            a, b = sorted(int(v) for v in rng.choice(k, 2, replace=False) + 1)
            if (name, a, b) not in used_same:
                used_same.add((name, a, b))
                matched.append((name, a, b))
        while len(mismatched) < n:
            i, j = sorted(int(v) for v in rng.choice(len(g), 2, replace=False))
            a, b = (int(v) for v in rng.integers(1, k + 1, 2))
            key = (g[i], a, g[j], b)
            if key not in used_diff:
                used_diff.add(key)
                mismatched.append(key)
        folds.append((matched, mismatched))
    return folds


# --- dataset ----------------------------------------------------------------------------------------
def _params(identities, images_per_identity, image_size, seed, heldout, difficulty):
    return {"format_version": FORMAT_VERSION, "identities": int(identities),
            "images_per_identity": int(images_per_identity), "image_size": int(image_size),
            "seed": int(seed), "heldout_identities": int(heldout), "difficulty": float(difficulty)}


def load_metadata(root):
    """The ``synthetic.json`` of a complete dataset at ``root``, or None if absent / incomplete."""
    path = os.path.join(root, METADATA_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not meta.get("complete") or meta.get("params", {}).get("format_version") != FORMAT_VERSION:
        return None
    return meta


def _result(root, meta, cached):
    out = dict(meta)
    out.update(root=root, train_dir=os.path.join(root, "train"), test_dir=os.path.join(root, "test"),
               pairs_file=os.path.join(root, "test", PAIRS_FILE), cached=cached)
    return out


def generate_dataset(output_dir, identities, images_per_identity, image_size, seed,
                     heldout_identities=None, workers=None, difficulty=1.0, progress=True,
                     compute_baseline=True, baseline=None):
    """Render the dataset into ``output_dir`` atomically, or reuse it if already complete.

    Args:
      output_dir: final dataset root; must not exist, be empty, or hold a matching dataset.
      identities: N identities in total; the last ``heldout_identities`` (M) form the test split.
      images_per_identity: K images each (>= 2).
      image_size: square side in pixels.
      seed: master seed (same seed => byte-identical files).
      heldout_identities: M; default :func:`default_heldout_identities`.
      workers: processes; default os.cpu_count(). The output does not depend on it.
      difficulty: nuisance strength (1.0 default; 0 gives frontal, clean, neutral faces; see
        :mod:`data.synthetic.render`).
      compute_baseline: False skips ``baseline`` (kept for callers that switch it off).
      baseline: ``baseline(test_dir, pairs_file) -> {variant: accuracy}`` run on the test pairs
        before the dataset is published, e.g. :func:`evaluation.pixel_baseline.pixel_baseline`
        (a few seconds); None stores no baseline.

    Returns a dict: root, train_dir, test_dir, pairs_file, cached (bool) and the metadata
    (params, counts, pixel_baseline_accuracy, pixel_baseline, ...).
    """
    from data.pairs import write_pairs

    m = default_heldout_identities(identities) if heldout_identities is None else int(heldout_identities)
    _check_args(int(identities), int(images_per_identity), int(image_size), m)
    params = _params(identities, images_per_identity, image_size, seed, m, difficulty)
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir):
        meta = load_metadata(output_dir)
        if meta is not None and meta["params"] == params:
            return _result(output_dir, meta, cached=True)
        if meta is not None or os.listdir(output_dir):
            raise FileExistsError(
                f"{output_dir} exists and is not the synthetic dataset with parameters {params}; "
                "choose another --output_dir or delete it")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(output_dir)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    start = time.time()
    try:
        from data.synthetic.params import sample_identities

        ids = sample_identities(identities, seed)
        n_train = identities - m
        tasks = []
        for i, p in enumerate(ids):
            split = "train" if i < n_train else "test"
            folder = os.path.join(tmp, split, identity_name(i))
            tasks.append((i, folder, p, int(images_per_identity), int(image_size), int(seed), float(difficulty)))
        workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
        os.makedirs(os.path.join(tmp, "train"))
        os.makedirs(os.path.join(tmp, "test"))
        nbytes = _render_all(tasks, min(workers, len(tasks)), progress)
        render_s = time.time() - start
        test_names = [identity_name(i) for i in range(n_train, identities)]
        folds = view2_folds(test_names, images_per_identity, seed)
        pairs_file = os.path.join(tmp, "test", PAIRS_FILE)
        write_pairs(pairs_file, folds)
        scores = baseline(os.path.join(tmp, "test"), pairs_file) if compute_baseline and baseline is not None else {}
        meta = {
            "complete": True,
            "generator": "data.synthetic",
            "params": params,
            "counts": {"train_identities": n_train, "test_identities": m,
                       "train_images": n_train * images_per_identity, "test_images": m * images_per_identity,
                       "pairs_per_fold": len(folds[0][0]), "folds": len(folds), "bytes": nbytes},
            "pixel_baseline": scores,
            "pixel_baseline_accuracy": max(scores.values()) if scores else None,
            "pixel_baseline_best_variant": max(scores, key=scores.get) if scores else None,
            "render_seconds": round(render_s, 2),
            "images_per_second": round(identities * images_per_identity / max(render_s, 1e-9), 1),
            "workers": workers,
        }
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.isdir(output_dir) and not os.listdir(output_dir):
            os.rmdir(output_dir)
        try:
            os.rename(tmp, output_dir)
        except OSError:
            other = load_metadata(output_dir)  # another process finished first
            if other is not None and other["params"] == params:
                return _result(output_dir, other, cached=True)
            raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return _result(output_dir, meta, cached=False)


def dataset_key(identities, images_per_identity, image_size, seed, heldout_identities=None, difficulty=1.0):
    """Folder name of one configuration inside a cache dir."""
    m = default_heldout_identities(identities) if heldout_identities is None else int(heldout_identities)
    return (f"synthetic_v{FORMAT_VERSION}_n{identities}_k{images_per_identity}_s{image_size}"
            f"_seed{seed}_h{m}_d{difficulty:g}")


def ensure_synthetic_dataset(cache_dir, identities, images_per_identity, image_size, seed,
                             heldout_identities=None, workers=None, difficulty=1.0, progress=True,
                             baseline=None):
    """The dataset for these parameters under ``cache_dir/<key>``, generated on first use.

    ``baseline``: as for :func:`generate_dataset` (measured only when the dataset is generated).
    Returns the dict of :func:`generate_dataset` (train_dir, test_dir, pairs_file, root, cached, ...).
    """
    root = os.path.join(cache_dir, dataset_key(identities, images_per_identity, image_size, seed,
                                               heldout_identities, difficulty))
    if os.path.isdir(root) and load_metadata(root) is None:
        # Not produced by a finished run of this version (the rename is atomic): a cache entry we own.
        sys.stderr.write(f"synthetic: removing incomplete or outdated cache entry {root}\n")
        shutil.rmtree(root)
    return generate_dataset(root, identities, images_per_identity, image_size, seed,
                            heldout_identities=heldout_identities, workers=workers,
                            difficulty=difficulty, progress=progress, baseline=baseline)
