"""Compare losses and sampling side by side: same model, data, seed and wall-clock budget.

    python bench/compare_losses.py                                  # built-in synthetic faces
    python bench/compare_losses.py --data_dir ../shared/data/CroppedYale --output_dir runs/cmp_yale
    python bench/compare_losses.py --methods triplet_semi_hard,arcface --budget_minutes 3

Each method is one ``train.py`` run (a subprocess, so every run starts from the same seeded state)
with ``--max_minutes`` as its budget; validation runs every ``--steps_per_epoch`` steps on the same
held-out pairs (the synthetic set's LFW-format pairs of held-out identities, or the
identity-disjoint split of ``--data_dir`` made from ``--seed``). A run already finished in
``output_dir/<method>`` is reused, so an interrupted comparison continues where it stopped
(``--fresh`` starts over).

Output: one JSON object per method on stdout (accuracy mean and std over the 10 folds, VAL at
FAR = 1e-3, AUC, steps, training seconds, and the training seconds until the validation accuracy
first reached ``--target_accuracy``); ``output_dir/results.md`` (a Markdown table) and
``output_dir/accuracy_vs_time.png`` (validation accuracy against training time, one curve per
method).
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

# name -> train.py flags. Heads over a few hundred identities use s = 30 (s = 64 is meant for
# tens of thousands of classes); every method shares the optimiser and learning rate.
METHODS = {
    "triplet_semi_hard": ["--loss=triplet", "--mining=semi_hard"],
    "triplet_semi_hard_paper": ["--loss=triplet", "--mining=semi_hard_paper"],
    "triplet_hard": ["--loss=triplet", "--mining=hard"],
    "triplet_all": ["--loss=triplet", "--mining=all"],
    "trihard_soft": ["--loss=trihard"],
    "contrastive": ["--loss=contrastive"],
    "lifted": ["--loss=lifted"],
    "distance_weighted": ["--loss=distance_weighted"],
    "softmax": ["--loss=softmax"],
    "softmax_center": ["--loss=softmax_center"],
    "normface": ["--loss=normface", "--head_scale=30"],
    "sphereface": ["--loss=sphereface", "--head_scale=30"],
    "cosface": ["--loss=cosface", "--head_scale=30"],
    "arcface": ["--loss=arcface", "--head_scale=30"],
    "softmax_then_triplet": ["--loss=triplet", "--mining=semi_hard", "--pretrain_softmax_steps=STEPS"],
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated subset of: {', '.join(METHODS)}")
    ap.add_argument("--data_dir", default=None, help="folder per identity; default: built-in data")
    ap.add_argument("--val_dir", default=None, help="hold-out folder; default: split of --data_dir")
    ap.add_argument("--output_dir", default=os.path.join("runs", "compare_losses"))
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--image_size", default=None)
    ap.add_argument("--budget_minutes", type=float, default=1.5,
                    help="wall-clock budget of each run (train.py --max_minutes)")
    ap.add_argument("--steps_per_epoch", type=int, default=50, help="steps between validations")
    ap.add_argument("--pretrain_fraction", type=float, default=0.5,
                    help="softmax_then_triplet: share of the expected steps spent on softmax")
    ap.add_argument("--expected_steps", type=int, default=400,
                    help="steps a run is expected to reach in the budget (for the pre-training share)")
    ap.add_argument("--target_accuracy", type=float, default=0.85)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--extra", default="", help="more train.py flags for every run, space-separated")
    ap.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    return ap.parse_args(argv)


def train_command(args, method, model_dir):
    flags = [f.replace("STEPS", str(int(args.expected_steps * args.pretrain_fraction)))
             for f in METHODS[method]]
    # --recipe=synthetic: the flag defaults, whatever the data (the comparison sets its own flags)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--recipe=synthetic",
           f"--model={args.model}",
           f"--model_dir={model_dir}", f"--seed={args.seed}", f"--max_minutes={args.budget_minutes}",
           f"--max_steps=1000000", f"--steps_per_epoch={args.steps_per_epoch}", "--export=false",
           "--projector_images=0", *flags, *args.extra.split()]
    if args.image_size:
        cmd.append(f"--image_size={args.image_size}")
    if args.data_dir:
        cmd.append(f"--data_dir={args.data_dir}")
    if args.val_dir:
        cmd.append(f"--val_dir={args.val_dir}")
    return cmd


def summarise(method, metrics, target):
    """One result row from a run's metrics.json."""
    curve = [(h["train_seconds"], h["accuracy_mean"]) for h in metrics["history"]
             if "accuracy_mean" in h and "train_seconds" in h]
    reached = next((t for t, acc in curve if acc >= target), None)
    return {"bench": "compare_losses", "method": method, "step": metrics["step"],
            "train_seconds": metrics.get("train_seconds"),
            "accuracy_mean": metrics.get("accuracy_mean"), "accuracy_std": metrics.get("accuracy_std"),
            "val_at_far_1e-3": metrics.get("val_at_far_1e-3"), "auc": metrics.get("auc"),
            "target_accuracy": target, "seconds_to_target": reached, "curve": curve}


def run_method(args, method):
    model_dir = os.path.join(args.output_dir, method)
    metrics_path = os.path.join(model_dir, "metrics.json")
    if args.fresh and os.path.isdir(model_dir):
        shutil.rmtree(model_dir)
    if not os.path.exists(metrics_path):
        if os.path.isdir(model_dir):
            shutil.rmtree(model_dir)  # an interrupted run: start it again with the full budget
        t0 = time.monotonic()
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run(train_command(args, method, model_dir), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-5:]
            return {"bench": "compare_losses", "method": method, "error": " | ".join(tail),
                    "seconds": round(time.monotonic() - t0, 1)}
    with open(metrics_path, encoding="utf-8") as f:
        return summarise(method, json.load(f), args.target_accuracy)


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def markdown_table(rows, args):
    data = args.data_dir or "built-in synthetic faces"
    lines = [f"Data: {data}; model {args.model}; {args.budget_minutes} min wall clock per run; "
             f"seed {args.seed}; 10-fold accuracy on the same held-out pairs.", "",
             "| method | steps | train s | accuracy (± std over folds) | VAL@FAR=1e-3 | AUC | "
             f"s to {args.target_accuracy:.0%} |", "|---|---|---|---|---|---|---|"]
    ok = [r for r in rows if "error" not in r]
    for r in sorted(ok, key=lambda r: -(r["accuracy_mean"] or 0)):
        lines.append(f"| {r['method']} | {r['step']} | {_fmt(r['train_seconds'], '.0f')} | "
                     f"{_fmt(r['accuracy_mean'], '.4f')} ± {_fmt(r['accuracy_std'], '.4f')} | "
                     f"{_fmt(r['val_at_far_1e-3'], '.3f')} | {_fmt(r['auc'], '.4f')} | "
                     f"{_fmt(r['seconds_to_target'], '.0f')} |")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:120]} | | | | | |")
    return "\n".join(lines) + "\n"


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from quiet_tf import import_tensorflow

    import_tensorflow()  # training.objectives imports TensorFlow: without its start-up banner
    from training.objectives import METRIC_LOSSES

    # One colour per method (tab20), and the line style tells the family apart: triplet mining
    # solid, other metric losses dashed, classification heads dotted.
    colours = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for i, r in enumerate(rows):
        if r.get("curve"):
            t, acc = zip(*r["curve"])
            loss = METHODS.get(r["method"], ["--loss="])[0].split("=", 1)[1]
            style = "-" if loss == "triplet" else "--" if loss in METRIC_LOSSES else ":"
            ax.plot(t, acc, style, color=colours[i % len(colours)], marker="o", markersize=3,
                    linewidth=1.6, label=r["method"])
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("held-out 10-fold verification accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    os.makedirs(args.output_dir, exist_ok=True)
    rows = []
    for method in methods:
        row = run_method(args, method)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown_table(rows, args))
    with open(os.path.join(args.output_dir, "results.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    plot(rows, os.path.join(args.output_dir, "accuracy_vs_time.png"),
         f"{args.model} on {os.path.basename(os.path.normpath(args.data_dir)) if args.data_dir else 'synthetic faces'}")


if __name__ == "__main__":
    main()
