"""Throughput of the synthetic-face generator (data/synthetic/); one JSON object per line.

    python bench/synthetic.py [--image_size 160] [--images 400] [--workers 2]

Lines: ``render`` (render_face only), ``render_jpeg`` (plus JPEG encode), ``render_jpeg_write``
(plus writing the file), all single process; then ``generate_dataset`` end to end with 1 and with
``--workers`` processes (pixel baseline excluded); last ``pixel_baseline``: the raw-pixel baseline
(evaluation/pixel_baseline.py) on that dataset's held-out pairs, with its accuracies (few pairs: a
timing, not the README's figure). ``images_per_second_per_core`` divides by the processes used.
The 1-minute load average is printed: on a shared machine the figures are a floor.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from data.synthetic import generate_dataset  # noqa: E402
from data.synthetic.params import sample_identities  # noqa: E402
from data.synthetic.render import render_face, render_jpeg  # noqa: E402
from evaluation.pixel_baseline import pixel_baseline  # noqa: E402


def _emit(mode, size, n, seconds, processes=1, **extra):
    rate = n / seconds
    print(json.dumps({"bench": "synthetic", "mode": mode, "image_size": size, "images": n,
                      "processes": processes, "seconds": round(seconds, 3),
                      "images_per_second": round(rate, 1),
                      "images_per_second_per_core": round(rate / processes, 1),
                      "load_avg_1m": round(os.getloadavg()[0], 2), **extra}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image_size", type=int, default=160)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    size, n = args.image_size, args.images
    ids = sample_identities(20, 0)
    seeds = [(i % 20, i) for i in range(n)]

    import cv2

    cv2.setNumThreads(1)
    render_face(ids[0], np.random.default_rng(0), size)  # warm-up
    t = time.perf_counter()
    for i, j in seeds:
        render_face(ids[i], np.random.default_rng([0, i, j]), size)
    _emit("render", size, n, time.perf_counter() - t)

    t = time.perf_counter()
    for i, j in seeds:
        render_jpeg(ids[i], np.random.default_rng([0, i, j]), size)
    _emit("render_jpeg", size, n, time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        for i, j in seeds:
            data, _ = render_jpeg(ids[i], np.random.default_rng([0, i, j]), size)
            with open(os.path.join(tmp, f"{i}_{j}.jpg"), "wb") as f:
                f.write(data)
        _emit("render_jpeg_write", size, n, time.perf_counter() - t)

        per_id = 20
        n_ids = max(3, n // per_id)
        for workers in sorted({1, args.workers}):
            out = os.path.join(tmp, f"ds_{workers}")
            t = time.perf_counter()
            info = generate_dataset(out, n_ids, per_id, size, 0, heldout_identities=2, workers=workers,
                                    progress=False)
            _emit("generate_dataset", size, n_ids * per_id, time.perf_counter() - t, processes=workers)
        t = time.perf_counter()
        base = pixel_baseline(info["test_dir"], info["pairs_file"])
        _emit("pixel_baseline", size, 2 * per_id, time.perf_counter() - t,
              pairs=2 * info["counts"]["folds"] * info["counts"]["pairs_per_fold"],
              pixel_baseline_accuracy=max(base.values()), pixel_baseline=base)


if __name__ == "__main__":
    main()
