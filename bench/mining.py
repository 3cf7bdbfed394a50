"""Triplet loss + gradient time and peak RSS per batch size and mining strategy (JSON lines).

One subprocess per (batch size, strategy) so ru_maxrss is that run's own peak (`peak_rss_mb`,
TensorFlow's own ~0.65 GB included; `base_rss_mb` is the peak before the first step). Embeddings
are unit vectors, D=128, K=40 images per identity (the paper's ~40, Section 3.2); one step is the
loss and its gradient with respect to the embeddings, compiled with tf.function, warm-up excluded;
median and minimum of --repeats runs. Timings on a shared machine: note `load` (1-minute load
average) in each line. The default grid (6 sizes x 4 strategies) takes 3-5 minutes on 2 cores.

    python -m bench.mining [--sizes 180,360,720,1200,1800,3600] [--strategies semi_hard,hard]
"""
import argparse
import json
import os
import subprocess
import sys

SIZES = (180, 360, 720, 1200, 1800, 3600)
STRATEGIES = ("semi_hard", "hard", "all", "semi_hard_paper")


def _child(batch, strategy, repeats, per_identity, dim):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import resource
    import time

    import numpy as np
    import tensorflow as tf

    import losses

    rng = np.random.default_rng(0)
    labels = tf.constant(np.repeat(np.arange(-(-batch // per_identity)), per_identity)[:batch]
                         .astype(np.int32))
    emb = rng.normal(size=(batch, dim)).astype(np.float32)
    emb = tf.constant(emb / np.linalg.norm(emb, axis=1, keepdims=True))

    @tf.function
    def step(e):
        with tf.GradientTape() as tape:
            tape.watch(e)
            loss = losses.triplet_loss(labels, e, mining=strategy)
        return loss, tape.gradient(loss, e)

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(emb)[1].numpy()  # trace + warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step(emb)[1].numpy()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(json.dumps({
        "bench": "triplet_loss_grad", "strategy": strategy, "batch": batch, "dim": dim,
        "per_identity": per_identity, "median_ms": round(1000 * float(np.median(wall)), 1),
        "min_ms": round(1000 * float(np.min(wall)), 1),
        "median_cpu_ms": round(1000 * float(np.median(cpu)), 1), "repeats": repeats,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "base_rss_mb": round(base_rss / 1024, 1),
        "load": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--per-identity", type=int, default=40)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--child", nargs=2, metavar=("BATCH", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(int(args.child[0]), args.child[1], args.repeats, args.per_identity, args.dim)
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    for batch in (int(s) for s in args.sizes.split(",")):
        for strategy in args.strategies.split(","):
            cmd = [sys.executable, "-m", "bench.mining", "--child", str(batch), strategy,
                   "--repeats", str(args.repeats), "--per-identity", str(args.per_identity),
                   "--dim", str(args.dim)]
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            if proc.returncode != 0 or not lines:
                print(json.dumps({"bench": "triplet_loss_grad", "strategy": strategy,
                                  "batch": batch, "error": proc.stderr.strip()[-500:],
                                  "returncode": proc.returncode}), flush=True)
            else:
                print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
