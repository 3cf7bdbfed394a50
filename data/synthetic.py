"""The built-in dataset: procedural synthetic faces, written as an LFW-style image tree.

Lets ``python train.py`` run with no data download: a few thousand faces of a few hundred identities
render at roughly 200 images per second per core. Identity lives in stable mid/large-scale cues (face shape,
skin tone, hair style and colour, eyes, brows, nose, mouth, facial hair, glasses; see
:mod:`data.synthetic_params`), while nuisances break pixel alignment (3-D pose, expression, lighting,
background clutter, crop jitter, occlusion, blur, noise, JPEG; see :mod:`data.synthetic_render`).
Identities are therefore easy for a small CNN and hard for raw pixels: the raw-pixel baseline is
measured on the held-out pairs and stored with the data (``pixel_baseline_accuracy``).

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

Knob: ``difficulty`` (default 1.0) scales every nuisance (pose range, lighting, clutter, occlusion
probability, blur, noise, JPEG quality, expression); 0 gives frontal, clean, neutral faces.

CLI::

    python -m data.synthetic --output_dir DIR --identities N --images_per_identity K \
        --image_size S --seed X [--heldout_identities M] [--workers W] [--difficulty D]
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
    from data.synthetic_render import render_jpeg

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
def make_pairs(names, images_per_identity, seed, num_folds=NUM_FOLDS, max_per_fold=MAX_PAIRS_PER_FOLD):
    """Balanced verification pairs over ``names`` (each with images 1..K), in ``num_folds`` folds.

    With >= 2 * num_folds identities the folds are identity-disjoint (as LFW View 2); with fewer,
    every fold draws from all identities and no pair repeats (in a set too small even for that,
    pairs are unique within a fold only). Every fold has the same number n of matched and of
    mismatched pairs: min(max_per_fold, what the smallest fold can supply).

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


def _write_pairs_view2(path, folds):
    """LFW View 2 pairs.txt: header ``folds<TAB>n``, then per fold n matched then n mismatched lines."""
    n = len(folds[0][0])
    lines = [f"{len(folds)}\t{n}"]
    for matched, mismatched in folds:
        if len(matched) != n or len(mismatched) != n:
            raise ValueError("every fold needs n matched and n mismatched pairs")
        lines += [f"{a}\t{i}\t{j}" for a, i, j in matched]
        lines += [f"{a}\t{i}\t{b}\t{j}" for a, i, b, j in mismatched]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_pairs(path, folds):
    """Write ``folds`` as LFW View 2 (uses :func:`data.pairs.write_pairs` when it exists)."""
    try:
        from data.pairs import write_pairs as shared_write_pairs
    except ImportError:
        shared_write_pairs = None
    if shared_write_pairs is not None:
        shared_write_pairs(path, folds)
    else:
        _write_pairs_view2(path, folds)


def read_pairs_view2(path):
    """Parse a View 2 pairs file -> (list of (name1, n1, name2, n2), issame bool [N], fold int [N])."""
    with open(path) as f:
        rows = [line.split() for line in f if line.strip()]
    num_folds, n = int(rows[0][0]), int(rows[0][1])
    body = rows[1:]
    if len(body) != num_folds * 2 * n:
        raise ValueError(f"{path}: expected {num_folds * 2 * n} pair lines, found {len(body)}")
    pairs, same, fold = [], [], []
    for idx, r in enumerate(body):
        if len(r) == 3:
            pairs.append((r[0], int(r[1]), r[0], int(r[2])))
            same.append(True)
        elif len(r) == 4:
            pairs.append((r[0], int(r[1]), r[2], int(r[3])))
            same.append(False)
        else:
            raise ValueError(f"{path}: bad pair line {idx + 2}: {r}")
        fold.append(idx // (2 * n))
    return pairs, np.asarray(same), np.asarray(fold)


# --- pixel baseline ---------------------------------------------------------------------------------
PIXEL_VARIANTS = ("grey_full", "grey_32", "grey_32_standardized", "rgb_16", "rgb_8_standardized")


def _pixel_features(path, variant):
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read {path}")
    if variant.startswith("grey"):
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    side = {"grey_full": None, "grey_32": 32, "grey_32_standardized": 32, "rgb_16": 16,
            "rgb_8_standardized": 8}[variant]
    if side is not None:
        img = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)
    x = img.astype(np.float64).ravel()
    if variant.endswith("standardized"):
        x = (x - x.mean()) / (x.std() + 1e-6)
    return x


def pixel_baseline(test_dir, pairs_file, variants=PIXEL_VARIANTS):
    """10-fold threshold verification accuracy of raw-pixel L2 distance on ``pairs_file``.

    Returns {variant: mean accuracy} for each variant (grey or RGB, full or downsampled, raw or
    per-image standardised).
    """
    from evaluation.verification import kfold_accuracy

    pairs, issame, folds = read_pairs_view2(pairs_file)

    def path(name, n):
        return os.path.join(test_dir, name, f"{name}_{n:04d}.jpg")

    result = {}
    for v in variants:
        cache = {}

        def feat(name, n):
            key = (name, n)
            if key not in cache:
                cache[key] = _pixel_features(path(name, n), v)
            return cache[key]

        d = np.array([np.sum((feat(a, i) - feat(b, j)) ** 2) for a, i, b, j in pairs])
        result[v] = round(kfold_accuracy(d, issame, folds)[0], 4)
    return result


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
                     compute_baseline=True):
    """Render the dataset into ``output_dir`` atomically, or reuse it if already complete.

    Args:
      output_dir: final dataset root; must not exist, be empty, or hold a matching dataset.
      identities: N identities in total; the last ``heldout_identities`` (M) form the test split.
      images_per_identity: K images each (>= 2).
      image_size: square side in pixels.
      seed: master seed (same seed => byte-identical files).
      heldout_identities: M; default :func:`default_heldout_identities`.
      workers: processes; default os.cpu_count(). The output does not depend on it.
      difficulty: nuisance strength (1.0 default; see module docstring).
      compute_baseline: measure the raw-pixel baseline on the test pairs (a few seconds).

    Returns a dict: root, train_dir, test_dir, pairs_file, cached (bool) and the metadata
    (params, counts, pixel_baseline_accuracy, pixel_baseline, ...).
    """
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
        from data.synthetic_params import sample_identities

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
        folds = make_pairs(test_names, images_per_identity, seed)
        pairs_file = os.path.join(tmp, "test", PAIRS_FILE)
        write_pairs(pairs_file, folds)
        baseline = pixel_baseline(os.path.join(tmp, "test"), pairs_file) if compute_baseline else {}
        meta = {
            "complete": True,
            "generator": "data.synthetic",
            "params": params,
            "counts": {"train_identities": n_train, "test_identities": m,
                       "train_images": n_train * images_per_identity, "test_images": m * images_per_identity,
                       "pairs_per_fold": len(folds[0][0]), "folds": len(folds), "bytes": nbytes},
            "pixel_baseline": baseline,
            "pixel_baseline_accuracy": max(baseline.values()) if baseline else None,
            "pixel_baseline_best_variant": max(baseline, key=baseline.get) if baseline else None,
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
                             heldout_identities=None, workers=None, difficulty=1.0, progress=True):
    """The dataset for these parameters under ``cache_dir/<key>``, generated on first use.

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
                            difficulty=difficulty, progress=progress)


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--identities", type=int, default=500)
    ap.add_argument("--images_per_identity", type=int, default=20)
    ap.add_argument("--image_size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--heldout_identities", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--difficulty", type=float, default=1.0)
    ap.add_argument("--no_baseline", action="store_true", help="skip the raw-pixel baseline")
    args = ap.parse_args(argv)
    out = generate_dataset(args.output_dir, args.identities, args.images_per_identity, args.image_size,
                           args.seed, args.heldout_identities, args.workers, args.difficulty,
                           compute_baseline=not args.no_baseline)
    summary = {k: out[k] for k in ("root", "train_dir", "test_dir", "pairs_file", "cached", "counts",
                                   "pixel_baseline_accuracy", "pixel_baseline_best_variant",
                                   "pixel_baseline", "render_seconds", "images_per_second")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
