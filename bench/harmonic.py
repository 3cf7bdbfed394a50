"""Harmonic embeddings, measured: an old model, a new one trained with and without
``--compatible_with``, and the three ways of comparing them (FaceNet's appendix, Figure 9 style).

    python bench/harmonic.py --output_dir runs/harmonic [--minutes 5]
    python bench/harmonic.py --data_dir ALIGNED --holdout_dir HOLDOUT --old_model nns2 --new_model nn4

Steps, each a subprocess of the project's own CLIs, every training run with the same data, seed,
P x K batches and wall-clock budget (``--minutes``, validation not counted):

1. ``old``: ``train.py --model nns2`` (the model a deployed gallery was embedded with);
2. ``new_plain``: ``train.py --model nn4``, trained on its own;
3. ``new_compatible``: ``train.py --model nn4 --compatible_with old/export`` (harmonic triplet
   loss, losses/harmonic.py);
4. ``evaluate.py --export_dir NEW --compare_export_dir old/export`` for both new models: accuracy,
   VAL@FAR=1e-3 and AUC of new-new, old-old and new-old pairs on the held-out identities
   (LFW protocol, 10 folds), and one ROC plot per new model.

Every run uses ``--recipe`` (default ``synthetic``: Adagrad 0.05, semi-hard, P=16 x K=8; ``real``
for in-the-wild crops) with ``--model`` set per run. Data: the built-in synthetic faces rendered
at 160 px (their held-out identities and View 2 pairs; ``--data_dir``/``--holdout_dir`` use a
folder per identity instead, scored on 6,000 balanced pairs). Finished runs in ``output_dir`` are
reused (``--fresh`` retrains).
Output: one JSON object per line on stdout and in ``output_dir/results.jsonl`` (``kind``
"train" per run, "compare" per new model and mode), ``results.md``, and the ROC PNGs.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = ("new_new", "old_old", "new_old")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output_dir", default=os.path.join("runs", "harmonic"))
    ap.add_argument("--data_dir", default=None, help="training faces, one folder per identity "
                    "(default: the built-in synthetic faces)")
    ap.add_argument("--holdout_dir", default=None, help="held-out identities (with --data_dir)")
    ap.add_argument("--old_model", default="nns2")
    ap.add_argument("--new_model", default="nn4")
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget of each run")
    ap.add_argument("--recipe", default="synthetic",
                    help="train.py --recipe of every run (e.g. real for in-the-wild crops)")
    ap.add_argument("--steps_per_epoch", type=int, default=50, help="steps between validations")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--extra", default="", help="more train.py flags for every run")
    ap.add_argument("--fresh", action="store_true")
    return ap.parse_args(argv)


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)


def _emit(record, out):
    line = json.dumps(record)
    print(line, flush=True)
    out.write(line + "\n")
    out.flush()


def synthetic_data(output_dir):
    """The built-in faces at 160 px: (train_dir, [--lfw_dir, --lfw_pairs] flags)."""
    from data.synthetic import ensure_synthetic_dataset

    info = ensure_synthetic_dataset(os.path.join(output_dir, "data"), identities=400,
                                    images_per_identity=20, image_size=160, seed=2015,
                                    progress=False)
    return info["train_dir"], [f"--lfw_dir={info['test_dir']}", f"--lfw_pairs={info['pairs_file']}"]


def train(name, model, flags, args, data_flags):
    """One train.py run into output_dir/name (reused when it finished); its metrics.json."""
    model_dir = os.path.join(args.output_dir, name)
    metrics = os.path.join(model_dir, "metrics.json")
    if os.path.isfile(metrics) and not args.fresh:
        with open(metrics, encoding="utf-8") as f:
            return json.load(f)
    shutil.rmtree(model_dir, ignore_errors=True)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--recipe={args.recipe}", f"--model={model}",
           f"--model_dir={model_dir}", f"--max_minutes={args.minutes}", "--max_steps=100000",
           f"--steps_per_epoch={args.steps_per_epoch}", f"--seed={args.seed}",
           "--projector_images=0", *data_flags, *flags, *args.extra.split()]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(metrics, encoding="utf-8") as f:
        result = json.load(f)
    result["wall_seconds"] = round(time.time() - t0, 1)
    return result


def _val_at_1e3(result):
    """VAL at FAR = 1e-3 of an evaluate.py verification block (JSON keys are strings)."""
    val = (result.get("val_at_far") or {}).get("0.001")
    return val.get("val") if isinstance(val, dict) else val


def compare(new_export, old_export, eval_flags, plots_dir):
    """evaluate.py --compare_export_dir: the cross_model block of its JSON."""
    out_json = os.path.join(plots_dir, "evaluate.json")
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), f"--export_dir={new_export}",
           f"--compare_export_dir={old_export}", f"--output_json={out_json}",
           f"--output_dir={plots_dir}", "--noidentification", "--noclustering", *eval_flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"evaluate.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(out_json, encoding="utf-8") as f:
        return json.load(f)["cross_model"]


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.data_dir:
        if not args.holdout_dir:
            raise SystemExit("--data_dir needs --holdout_dir (identities never trained on)")
        train_dir, eval_flags = args.data_dir, [f"--data_dir={args.holdout_dir}",
                                                "--pairs=balanced", "--num_pairs=6000"]
        val_flags = [f"--val_dir={args.holdout_dir}"]
    else:
        train_dir, val_flags = synthetic_data(args.output_dir)
        eval_flags = list(val_flags)
    data_flags = [f"--data_dir={train_dir}", *val_flags]
    old_export = os.path.join(args.output_dir, "old", "export")
    runs = (("old", args.old_model, []), ("new_plain", args.new_model, []),
            ("new_compatible", args.new_model, [f"--compatible_with={old_export}"]))
    rows = {}
    with open(os.path.join(args.output_dir, "results.jsonl"), "w", encoding="utf-8") as out:
        for name, model, flags in runs:
            m = train(name, model, flags, args, data_flags)
            _emit({"kind": "train", "run": name, "model": model, "steps": m["step"],
                   "train_seconds": m["train_seconds"], "accuracy": m.get("accuracy_mean"),
                   "auc": m.get("auc")}, out)
        for name in ("new_plain", "new_compatible"):
            plots = os.path.join(args.output_dir, f"compare_{name}")
            os.makedirs(plots, exist_ok=True)
            cross = compare(os.path.join(args.output_dir, name, "export"), old_export, eval_flags,
                            plots)
            rows[name] = cross
            for mode in MODES:
                r = cross[mode]
                _emit({"kind": "compare", "new": name, "mode": mode,
                       "accuracy_mean": r["accuracy_mean"], "accuracy_std": r["accuracy_std"],
                       "val_at_far_1e-3": _val_at_1e3(r), "auc": r["auc"]}, out)
    lines = ["| new model | new–new | old–old | new–old |", "|---|---|---|---|"]
    for name, cross in rows.items():
        cells = [f"{100 * cross[m]['accuracy_mean']:.1f}% (AUC {cross[m]['auc']:.3f})" for m in MODES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
