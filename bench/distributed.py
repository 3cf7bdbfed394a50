"""Global mining across replicas and workers: mining time, all-gather cost and train step time.

Two parts, each printing one JSON object per line (also appended to ``--output``):

``mining`` (``"bench": "distributed_mining"``): the triplet loss and its gradient with respect to the
embeddings for one global batch of P x K unit embeddings (default 45 x 40 = 1,800, D = 128, the
paper's batch, Section 3.2), compiled with tf.function, warm-up excluded, median of ``--repeats``:

  - ``single``: one device, the whole batch;
  - ``global``: MirroredStrategy over 2 logical CPU devices; each replica holds 900 rows, all-gathers
    them (losses/global_batch.py), mines the 1,800 x 1,800 matrix and back-propagates to its rows;
  - ``replica``: the same strategy, each replica mines only its own 900 rows (``--mining_scope=replica``);
  - ``all_gather``: the all-gather of [900, 128] per replica and its gradient alone.

``train`` (``"bench": "distributed_train"``): ``train.py`` on the built-in data with one global
batch of P x K images (default 45 x 40 at 64 px, ``tiny``), as one process (default strategy) and
as two MultiWorkerMirroredStrategy worker processes on 127.0.0.1 (TF_CONFIG, free ports): training
images/s of the second interval of ``--steps`` steps (the first includes tracing), from
metrics.json. ``ratio`` is two-worker images/s over one-process images/s.

On a 2-core machine the two workers share the same two cores, so ``train`` measures the overhead of
the distribution (all-gather, gradient all-reduce, one core each), not a speed-up.

``sync_bn`` (``"bench": "distributed_sync_bn"``): ``train.py --distribution_strategy=mirrored
--num_cpu_devices=2`` on the built-in data (the synthetic recipe, P x K from ``--sync_bn_batch``,
default 16 x 8, i.e. 64 images per replica) for ``--sync_bn_steps`` steps, with and without
``--sync_batch_norm``: held-out accuracy and AUC at the end, training images/s of the last interval.
This is what chose the flag's default (README "Scaling out").

    python bench/distributed.py                       # both parts
    python bench/distributed.py --parts mining --repeats 10
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _emit(record, out_path):
    record = {**record, "load": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    line = json.dumps(record)
    print(line, flush=True)
    if out_path:
        with open(out_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


# ----------------------------------------------------------------------------------------------
# mining
# ----------------------------------------------------------------------------------------------

def _mining_child(args):
    """Runs in a subprocess with 2 logical CPU devices; prints one JSON line per mode."""
    import numpy as np

    from quiet_tf import import_tensorflow
    from training.distribute import configure_devices

    tf = import_tensorflow(before_first_op=lambda tf: configure_devices(tf, 2))
    import losses
    from losses.global_batch import gather_global

    p, k, dim = args.identities_per_batch, args.images_per_identity, args.embedding_size
    batch = p * k
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(batch, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.repeat(np.arange(p), k).astype(np.int32)

    def timed(fn):
        fn()  # trace + warm-up
        wall = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            wall.append(time.perf_counter() - t0)
        return round(1000 * float(np.median(wall)), 1), round(1000 * float(np.min(wall)), 1)

    def loss_and_grad(e, y, scope):
        with tf.GradientTape() as tape:
            tape.watch(e)
            ge, gy = gather_global(e, y, scope)
            loss = losses.triplet_loss(gy, ge, mining=args.mining)
        return loss, tape.gradient(loss, e)

    single = tf.function(lambda: loss_and_grad(tf.constant(emb), tf.constant(labels), "replica"))
    rows = {"single": timed(lambda: single()[1].numpy())}

    strategy = tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")])
    n = strategy.num_replicas_in_sync
    per = batch // n

    def shard(ctx):
        r = ctx.replica_id_in_sync_group
        return tf.constant(emb)[r * per:(r + 1) * per], tf.constant(labels)[r * per:(r + 1) * per]

    e_dist = strategy.experimental_distribute_values_from_function(lambda c: shard(c)[0])
    y_dist = strategy.experimental_distribute_values_from_function(lambda c: shard(c)[1])

    for scope in ("global", "replica"):
        fn = tf.function(lambda scope=scope: strategy.run(
            lambda e, y: loss_and_grad(e, y, scope), args=(e_dist, y_dist)))
        rows[scope] = timed(lambda fn=fn: [t.numpy() for t in strategy.experimental_local_results(
            fn()[1])])

    def gather_only(e):
        with tf.GradientTape() as tape:
            tape.watch(e)
            g = tf.distribute.get_replica_context().all_gather(e, axis=0)
            s = tf.reduce_sum(g * g)
        return tape.gradient(s, e)

    fn = tf.function(lambda: strategy.run(gather_only, args=(e_dist,)))
    rows["all_gather"] = timed(lambda: [t.numpy() for t in strategy.experimental_local_results(fn())])
    for mode, (median_ms, min_ms) in rows.items():
        print(json.dumps({"bench": "distributed_mining", "mode": mode, "replicas": 1 if mode == "single"
                          else n, "global_batch": batch, "rows_per_replica": batch if mode == "single"
                          else per, "dim": dim, "mining": args.mining, "median_ms": median_ms,
                          "min_ms": min_ms, "repeats": args.repeats}), flush=True)


def run_mining(args):
    cmd = [sys.executable, os.path.abspath(__file__), "--_mining_child",
           f"--identities_per_batch={args.identities_per_batch}",
           f"--images_per_identity={args.images_per_identity}",
           f"--embedding_size={args.embedding_size}", f"--mining={args.mining}",
           f"--repeats={args.repeats}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"mining child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    single = next(r["median_ms"] for r in rows if r["mode"] == "single")
    for row in rows:
        row["ratio_to_single"] = round(row["median_ms"] / single, 2)
        _emit(row, args.output)


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------

def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _train_flags(args, model_dir):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--recipe=synthetic",
            f"--model={args.model}", f"--image_size={args.image_size}",
            f"--identities_per_batch={args.identities_per_batch}",
            f"--images_per_identity={args.images_per_identity}",
            f"--max_steps={2 * args.steps}", f"--steps_per_epoch={args.steps}",
            f"--model_dir={model_dir}", f"--cache_dir={args.cache_dir}", "--export=false",
            "--projector_images=0", f"--mining={args.mining}", *args.extra.split()]


def _images_per_second(model_dir):
    with open(os.path.join(model_dir, "metrics.json"), encoding="utf-8") as f:
        history = json.load(f)["history"]
    return history[-1]["images_per_second"]


def run_train(args):
    work = tempfile.mkdtemp(prefix="bench_distributed_")
    try:
        results = {}
        one = os.path.join(work, "one")
        proc = subprocess.run(_train_flags(args, one), cwd=ROOT, env=_env(), capture_output=True,
                              text=True, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"one-process train.py failed:\n{proc.stderr[-3000:]}")
        results["one_process"] = _images_per_second(one)

        two = os.path.join(work, "two")
        ports = _free_ports(2)
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        procs = []
        for index in range(2):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            cmd = _train_flags(args, two) + ["--distribution_strategy=multi_worker_mirrored"]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(TF_CONFIG=tf_config),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        try:
            outs = [p.communicate(timeout=3600) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p, (_, err) in zip(procs, outs):
            if p.returncode != 0:
                raise SystemExit(f"two-worker train.py failed:\n{err[-3000:]}")
        results["two_workers"] = _images_per_second(two)
        for mode, ips in results.items():
            _emit({"bench": "distributed_train", "mode": mode, "model": args.model,
                   "image_size": args.image_size, "global_batch":
                   args.identities_per_batch * args.images_per_identity, "steps": args.steps,
                   "images_per_second": ips, "step_seconds": round(
                       args.identities_per_batch * args.images_per_identity / ips, 2),
                   "ratio": round(ips / results["one_process"], 2)}, args.output)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_sync_bn(args):
    work = tempfile.mkdtemp(prefix="bench_sync_bn_")
    p, k = (int(v) for v in args.sync_bn_batch.lower().split("x"))
    try:
        for sync in (False, True):
            model_dir = os.path.join(work, f"sync_{sync}")
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--recipe=synthetic",
                   f"--identities_per_batch={p}", f"--images_per_identity={k}",
                   f"--max_steps={args.sync_bn_steps}",
                   f"--steps_per_epoch={max(1, args.sync_bn_steps // 2)}",
                   f"--model_dir={model_dir}", f"--cache_dir={args.cache_dir}", "--export=false",
                   "--projector_images=0", "--distribution_strategy=mirrored",
                   "--num_cpu_devices=2", f"--sync_batch_norm={str(sync).lower()}",
                   *args.extra.split()]
            t0 = time.monotonic()
            proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                                  timeout=7200)
            if proc.returncode != 0:
                raise SystemExit(f"train.py (sync_batch_norm={sync}) failed:\n{proc.stderr[-3000:]}")
            with open(os.path.join(model_dir, "metrics.json"), encoding="utf-8") as f:
                metrics = json.load(f)
            _emit({"bench": "distributed_sync_bn", "sync_batch_norm": sync, "replicas": 2,
                   "global_batch": p * k, "rows_per_replica": p * k // 2,
                   "steps": metrics["step"], "accuracy_mean": round(metrics["accuracy_mean"], 4),
                   "auc": round(metrics["auc"], 4),
                   "images_per_second": metrics["history"][-1]["images_per_second"],
                   "train_seconds": metrics["train_seconds"],
                   "wall_seconds": round(time.monotonic() - t0, 1)}, args.output)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="mining,train", help="comma-separated: mining, train, sync_bn")
    ap.add_argument("--identities_per_batch", type=int, default=45, help="P")
    ap.add_argument("--images_per_identity", type=int, default=40, help="K")
    ap.add_argument("--embedding_size", type=int, default=128)
    ap.add_argument("--mining", default="semi_hard")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--image_size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed interval (train)")
    ap.add_argument("--sync_bn_batch", default="16x8", help="P x K of the sync_bn part")
    ap.add_argument("--sync_bn_steps", type=int, default=400, help="steps per sync_bn run")
    ap.add_argument("--cache_dir", default=os.path.join(ROOT, "runs", "bench_cache"))
    ap.add_argument("--extra", default="", help="more train.py flags for every run")
    ap.add_argument("--output", default=os.path.join(ROOT, "bench", "results", "distributed.jsonl"))
    ap.add_argument("--_mining_child", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args._mining_child:
        _mining_child(args)
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for part in parts:
        if part == "mining":
            run_mining(args)
        elif part == "train":
            run_train(args)
        elif part == "sync_bn":
            run_sync_bn(args)
        else:
            raise SystemExit(f"unknown part {part!r}: choose mining, train, sync_bn")


if __name__ == "__main__":
    main()
