"""Input-pipeline throughput: images/s of data.pipeline.balanced_dataset (JSON lines).

Generates a folder of JPEG faces-like images (default 100 identities x 20 images at 250x250) in a
temporary folder, writes TFRecord shards of it, then times balanced P x K batches from both sources
at several input sizes, with augmentation (random crop + flip) as in training.

    python -m bench.pipeline [--sizes 224,160,96] [--seconds 5] [--p 16 --k 8]

Sources: ``folder`` (decode files), ``tfrecord`` (decode records held in memory), ``memory`` (every
image decoded once into a uint8 array, as ``train.py --cache_images`` does; the one-off decode is
not timed).

Each line: {"bench": "pipeline", "source": "folder"|"tfrecord"|"memory", "image_size": S, "batch": P*K,
"images_per_s": ..., ...}. Compare with an NN2 train step's images/s on the same machine; the
pipeline should deliver at least 3x that. Numbers depend on machine load (reported as load_avg).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402


def make_jpeg_folder(root, identities, images_per_identity, side, seed=0):
    """Synthetic face-like JPEGs: a per-identity ellipse 'face' with jittered pose and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    for c in range(identities):
        d = os.path.join(root, f"id{c:04d}")
        os.makedirs(d, exist_ok=True)
        skin = rng.integers(60, 230, 3)
        bg = rng.integers(0, 255, 3)
        for i in range(images_per_identity):
            img = np.empty([side, side, 3], np.float32)
            img[:] = bg * (0.6 + 0.4 * yy[..., None])
            cx, cy = 0.5 + rng.normal(0, 0.03, 2)
            face = ((xx - cx) / 0.3) ** 2 + ((yy - cy) / 0.4) ** 2 < 1
            img[face] = skin
            for ex in (-0.12, 0.12):
                eye = ((xx - cx - ex) / 0.05) ** 2 + ((yy - cy + 0.1) / 0.03) ** 2 < 1
                img[eye] = 30
            img += rng.normal(0, 8, img.shape)
            cv2.imwrite(os.path.join(d, f"{i:03d}.jpg"), np.clip(img, 0, 255).astype(np.uint8),
                        [cv2.IMWRITE_JPEG_QUALITY, 90])


def time_dataset(ds, batch, seconds, warmup=2):
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    n, start = 0, time.perf_counter()
    while True:
        images, _ = next(it)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 3:
            break
    _ = images.shape
    return n, elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=100)
    parser.add_argument("--images_per_identity", type=int, default=20)
    parser.add_argument("--side", type=int, default=250, help="generated JPEG side, pixels")
    parser.add_argument("--sizes", default="224,160,96", help="input sizes to time")
    parser.add_argument("--p", type=int, default=16, help="identities per batch")
    parser.add_argument("--k", type=int, default=8, help="images per identity")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing window per case")
    parser.add_argument("--sources", default="folder,tfrecord,memory",
                        help="folder, tfrecord, memory (decoded once into RAM, data.memory_cache)")
    parser.add_argument("--workdir", default=None, help="keep the generated data here")
    args = parser.parse_args()

    from data import memory_cache, pipeline
    from data.dataset import scan_identity_folder
    from data.tfrecords import write_tfrecords

    work = args.workdir or tempfile.mkdtemp(prefix="facenet_bench_")
    try:
        images_dir = os.path.join(work, "images")
        if not os.path.isdir(images_dir):
            t = time.perf_counter()
            make_jpeg_folder(images_dir, args.identities, args.images_per_identity, args.side)
            print(json.dumps({"bench": "pipeline_setup", "step": "generate_jpegs",
                              "images": args.identities * args.images_per_identity,
                              "seconds": round(time.perf_counter() - t, 2)}), flush=True)
        dataset = scan_identity_folder(images_dir)
        sources = {}
        if "folder" in args.sources:
            sources["folder"] = dataset
        if "tfrecord" in args.sources:
            shards = os.path.join(work, "shards")
            if not os.path.isdir(shards):
                summary = write_tfrecords(dataset, shards, num_shards=4, progress=False)
                print(json.dumps({"bench": "pipeline_setup", "step": "write_tfrecords",
                                  "images": summary["images_written"],
                                  "seconds": summary["seconds"]}), flush=True)
            sources["tfrecord"] = os.path.join(shards, "*.tfrecord")
        batch = args.p * args.k
        if "memory" in args.sources:
            sources["memory"] = dataset
        for size in [int(s) for s in args.sizes.split(",") if s]:
            for name, source in sources.items():
                cached = None
                if name == "memory":  # decoded at the size train.py caches at (not timed)
                    cached = memory_cache.decode_to_memory(
                        source, memory_cache.cache_image_size((size, size), 0.875), progress=False)
                ds = pipeline.balanced_dataset(source, args.p, args.k, (size, size), augment=True,
                                               seed=0, images=cached)
                n, elapsed = time_dataset(ds, batch, args.seconds)
                print(json.dumps({
                    "bench": "pipeline", "source": name, "image_size": size, "batch": batch,
                    "source_jpeg_side": args.side, "augment": True,
                    "images_per_s": round(n * batch / elapsed, 1),
                    "batches": n, "seconds": round(elapsed, 2),
                    "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                }), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
