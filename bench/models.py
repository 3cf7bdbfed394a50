"""Throughput of the model zoo on this machine: forward and train-step images/s and GFLOP/s.

    python bench/models.py --models nn2,nn4 --batch_size 32 --steps 10
    python bench/models.py --models tiny --jit_compile          # XLA on the step functions

Prints one JSON object per (model, phase) line:
``{"model", "phase": "forward"|"train", "image_size", "batch_size", "steps", "images_per_s",
"gflops_per_s", "madds_per_image", "jit_compile", "threads"}``.

FLOPs: forward = 2 * multiply-adds per image; a train step is counted as 3x the forward (forward,
input gradients, weight gradients). The train step is a tf.function with a batch-all triplet hinge on
squared L2 distances (a stand-in for losses/, not the project's loss) and Adagrad (the paper's
optimiser), over P=batch_size/4 identities x K=4 images of random data. Timings are wall clock
after ``--warmup`` untimed steps; on a shared machine treat them as noisy.
"""
import os
import sys

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_BENCH_DIR)
# This file is called models.py: keep its own folder off sys.path so "import models" is the package.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH_DIR]
sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import models  # noqa: E402  (imports TensorFlow quietly)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def triplet_hinge(labels, embeddings, margin=0.2):
    """Mean over valid (a, p, n) of max(d_ap - d_an + margin, 0), squared L2. [B] int, [B, E]."""
    sq = tf.reduce_sum(tf.square(embeddings), 1)
    d = tf.maximum(sq[:, None] + sq[None] - 2.0 * tf.matmul(embeddings, embeddings,
                                                            transpose_b=True), 0.0)
    same = tf.cast(tf.equal(labels[:, None], labels[None]), tf.float32)
    pos = same - tf.eye(tf.shape(labels)[0])
    mask = pos[:, :, None] * (1.0 - same)[:, None, :]
    hinge = tf.nn.relu(d[:, :, None] - d[:, None, :] + margin) * mask
    return tf.reduce_sum(hinge) / tf.maximum(tf.reduce_sum(mask), 1.0)


def _time(fn, steps, warmup):
    for _ in range(warmup):
        out = fn()
    _ = [np.asarray(o) for o in tf.nest.flatten(out)]
    start = time.perf_counter()
    for _ in range(steps):
        out = fn()
    _ = [np.asarray(o) for o in tf.nest.flatten(out)]
    return time.perf_counter() - start


def bench_model(name, batch_size, steps, warmup, jit_compile, image_size, phases):
    model = models.build_model(name, image_size=image_size)
    size = tuple(model.input_shape[1:3])
    madds = models.count_madds(model)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(-1, 1, (batch_size,) + size + (3,)).astype(np.float32))
    labels = tf.constant(np.repeat(np.arange(max(batch_size // 4, 1)), 4)[:batch_size])
    optimizer = keras.optimizers.Adagrad(0.05)
    rows = []

    @tf.function(jit_compile=jit_compile)
    def forward(x):
        return model(x, training=False)

    @tf.function(jit_compile=jit_compile)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = triplet_hinge(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    for phase in phases:
        if phase == "forward":
            seconds = _time(lambda: forward(images), steps, warmup)
            flops_per_image = 2 * madds
        else:
            seconds = _time(lambda: train_step(images, labels), steps, warmup)
            flops_per_image = 6 * madds
        ips = batch_size * steps / seconds
        rows.append({
            "model": name, "phase": phase, "image_size": list(size), "batch_size": batch_size,
            "steps": steps, "images_per_s": round(ips, 2),
            "gflops_per_s": round(ips * flops_per_image / 1e9, 2), "madds_per_image": madds,
            "jit_compile": jit_compile, "threads": os.cpu_count()})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,nns2,nn4,nns1,nn3,nn2",
                        help="comma-separated model names (nn1 is slow: add it explicitly)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (tracing, caches)")
    parser.add_argument("--phases", default="forward,train")
    parser.add_argument("--image_size", default=None, help="override, e.g. 160 or 140x116")
    parser.add_argument("--jit_compile", action="store_true", help="XLA-compile the steps")
    args = parser.parse_args(argv)
    if args.batch_size < 2 or args.steps < 1 or args.warmup < 1:
        parser.error("--batch_size >= 2, --steps >= 1 and --warmup >= 1 are required")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for name in names:
        if name not in models.MODEL_NAMES:
            parser.error(f"unknown model {name!r}; choose from {', '.join(models.MODEL_NAMES)}")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not set(phases) <= {"forward", "train"}:
        parser.error("--phases is a subset of forward,train")
    for name in names:
        for row in bench_model(name, args.batch_size, args.steps, args.warmup, args.jit_compile,
                               args.image_size, phases):
            print(json.dumps(row), flush=True)
        keras.backend.clear_session()
    return 0


if __name__ == "__main__":
    sys.exit(main())
