"""Time-to-accuracy curves of training recipes on real, aligned faces (identity-disjoint hold-out).

    python bench/real_faces.py --data_dir ../shared/data/pins_aligned --output_dir runs/real_faces
    python bench/real_faces.py --data_dir ALIGNED --recipes real,paper --minutes 60

The split is fixed by ``--split_seed``: ``--holdout`` identities (default 20) are held out, the
rest train (the 90 people of pins_aligned give 70 / 20). The split is materialised as two trees
of symbolic links under ``output_dir/split`` (``train/`` and ``test/``, plus ``split.json`` naming
the identities) and every run validates on the same 6,000 balanced pairs of the held-out people
(LFW protocol, 10 folds; train.py's ``--val_dir`` pairs, drawn from ``--seed``).

Each recipe is one ``train.py`` run (a subprocess; ``--max_minutes`` is its budget), validating
about once a minute (``VALIDATE_EVERY`` steps, or ``--validate_every``). **Minutes** are wall-clock minutes from train.py's
start-up (reading the data and decoding it into memory included) with the time spent validating
taken out: train.py stops its clock while it validates. A finished run in ``output_dir/<recipe>``
is reused (``--fresh`` retrains).

Output: one JSON object per validation (``"kind": "point"``) and one per recipe (``"kind":
"summary"``: minutes to 70/75/80/85%, accuracy at 5/10/20/60 minutes, images/s) on stdout and in
``output_dir/results.jsonl``; ``results.md`` (Markdown table) and ``accuracy_vs_minutes.png``.
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

# name -> train.py flags
RECIPES = {
    "real": ["--recipe=real"],
    "paper": ["--recipe=paper"],
}
# Steps between validations, about one per minute of training on a 2-core CPU (the paper's
# 1,800-image batches take ~20 s a step there); other recipes use --validate_every.
VALIDATE_EVERY = {"real": 150, "paper": 3}
THRESHOLDS = (0.70, 0.75, 0.80, 0.85)
BUDGET_FILE = "bench_budget.json"
CHECKPOINT_MINUTES = (5, 10, 20, 60)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", required=True, help="aligned faces, one folder per identity")
    ap.add_argument("--output_dir", default=os.path.join("runs", "real_faces"))
    ap.add_argument("--recipes", default="real,paper",
                    help="comma-separated; a name of RECIPES or NAME='train.py flags'")
    ap.add_argument("--minutes", type=float, default=20.0, help="budget of each run")
    ap.add_argument("--validate_every", type=int, default=100,
                    help="steps between validations for recipes not in VALIDATE_EVERY")
    ap.add_argument("--holdout", type=int, default=20, help="identities held out")
    ap.add_argument("--split_seed", type=int, default=2015)
    ap.add_argument("--seed", type=int, default=1234, help="train.py --seed (same for every run)")
    ap.add_argument("--extra", default="", help="more train.py flags for every run")
    ap.add_argument("--fresh", action="store_true")
    return ap.parse_args(argv)


def parse_recipes(text):
    """'real,paper,x=--loss=cosface --lr=...' -> {name: [flags]}; a bare name must be in RECIPES."""
    out = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        if "=" in part.split()[0] and not part.startswith("--"):
            name, flags = part.split("=", 1)
            out[name.strip()] = flags.split()
        elif part in RECIPES:
            out[part] = list(RECIPES[part])
        else:
            raise SystemExit(f"unknown recipe {part!r}; name one of {list(RECIPES)} or give "
                             "NAME='train.py flags'")
    return out


def make_split(data_dir, output_dir, holdout, seed):
    """Link trees ``split/train`` and ``split/test`` (identity-disjoint); returns their paths."""
    from data.dataset import scan_identity_folder, split_identities

    dataset = scan_identity_folder(data_dir)
    if not 0 < holdout < dataset.num_classes:
        raise SystemExit(f"--holdout must be between 1 and {dataset.num_classes - 1}")
    train, test = split_identities(dataset, holdout / dataset.num_classes, seed)
    root = os.path.join(output_dir, "split")
    record = {"data_dir": os.path.abspath(data_dir), "split_seed": seed,
              "train": list(train.class_names), "test": list(test.class_names)}
    record_path = os.path.join(root, "split.json")
    if os.path.exists(record_path):
        with open(record_path, encoding="utf-8") as f:
            if json.load(f) == record:
                return os.path.join(root, "train"), os.path.join(root, "test"), record
        shutil.rmtree(root)
    for part, ds in (("train", train), ("test", test)):
        for path, label in zip(ds.paths, ds.labels):
            folder = os.path.join(root, part, ds.class_names[int(label)])
            os.makedirs(folder, exist_ok=True)
            os.symlink(os.path.abspath(path), os.path.join(folder, os.path.basename(path)))
    crop = os.path.join(data_dir, "align_settings.json")  # how the crops were made, for exports
    if os.path.exists(crop):
        shutil.copyfile(crop, os.path.join(root, "train", "align_settings.json"))
    with open(record_path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    return os.path.join(root, "train"), os.path.join(root, "test"), record


def train_command(name, flags, args, train_dir, test_dir, model_dir, steps_per_epoch):
    return [sys.executable, os.path.join(ROOT, "train.py"), *flags,
            f"--data_dir={train_dir}", f"--val_dir={test_dir}", f"--model_dir={model_dir}",
            f"--seed={args.seed}", f"--max_minutes={args.minutes}", "--max_steps=100000000",
            f"--steps_per_epoch={steps_per_epoch}", "--export=false", "--projector_images=0",
            *args.extra.split()]


def points(name, metrics):
    """The run's validations as JSON rows (minutes: start-up + training, validation excluded)."""
    rows = []
    for h in metrics.get("history", []):
        if "accuracy_mean" not in h:
            continue
        rows.append({"bench": "real_faces", "kind": "point", "recipe": name, "step": h["step"],
                     "minutes": round(h["elapsed_seconds"] / 60.0, 3),
                     "accuracy": h["accuracy_mean"], "accuracy_std": h["accuracy_std"],
                     "auc": h["auc"], "val_at_far_1e-3": h["val_at_far_1e-3"],
                     "images_per_second": h.get("images_per_second")})
    return rows


def summarise(name, flags, rows, metrics):
    """Minutes to each accuracy threshold and accuracy at fixed minutes (the last validation at
    or before that minute; None when the run did not last that long)."""
    out = {"bench": "real_faces", "kind": "summary", "recipe": name, "flags": flags,
           "steps": metrics.get("step"), "model": metrics.get("model"),
           "image_size": metrics.get("image_size")}
    for t in THRESHOLDS:
        hit = next((r["minutes"] for r in rows if r["accuracy"] >= t), None)
        out[f"minutes_to_{int(round(t * 100))}"] = hit
    last_minute = rows[-1]["minutes"] if rows else 0.0
    for m in CHECKPOINT_MINUTES:
        before = [r for r in rows if r["minutes"] <= m + 1e-9]
        out[f"accuracy_at_{m}"] = before[-1]["accuracy"] if before and last_minute >= m - 0.5 \
            else None
    ips = [r["images_per_second"] for r in rows[1:] if r.get("images_per_second")]
    out["images_per_second"] = round(sorted(ips)[len(ips) // 2], 1) if ips else None
    if rows:
        out.update(final_accuracy=rows[-1]["accuracy"], final_minutes=rows[-1]["minutes"],
                   best_accuracy=max(r["accuracy"] for r in rows))
    return out


def run_recipe(name, flags, args, train_dir, test_dir):
    model_dir = os.path.join(args.output_dir, name)
    metrics_path = os.path.join(model_dir, "metrics.json")
    if args.fresh and os.path.isdir(model_dir):
        shutil.rmtree(model_dir)
    if not os.path.exists(metrics_path):
        shutil.rmtree(model_dir, ignore_errors=True)  # interrupted: start over, full budget
        every = VALIDATE_EVERY.get(name, args.validate_every)
        os.makedirs(model_dir)
        with open(os.path.join(model_dir, BUDGET_FILE), "w", encoding="utf-8") as f:
            json.dump({"minutes": args.minutes, "validate_every": every}, f)
        t0 = time.monotonic()
        proc = subprocess.run(
            train_command(name, flags, args, train_dir, test_dir, model_dir, every), cwd=ROOT,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-5:]
            return [], {"bench": "real_faces", "kind": "summary", "recipe": name,
                        "error": " | ".join(tail), "seconds": round(time.monotonic() - t0, 1)}
    with open(metrics_path, encoding="utf-8") as f:
        metrics = json.load(f)
    rows = points(name, metrics)
    summary = summarise(name, flags, rows, metrics)
    budget_path = os.path.join(model_dir, BUDGET_FILE)
    if os.path.exists(budget_path):
        with open(budget_path, encoding="utf-8") as f:
            summary["budget_minutes"] = json.load(f)["minutes"]
    return rows, summary


def _fmt(value, spec, none="–"):
    return none if value is None else format(value, spec)


def markdown_table(summaries, args, split):
    lines = [f"Data: {args.data_dir}, {len(split['train'])} identities for training, "
             f"{len(split['test'])} held out (split seed {args.split_seed}); 6,000 held-out pairs, "
             "10 folds. Minutes: wall clock from start-up, validation excluded.", "",
             "| recipe | model | budget min | steps | img/s | " +
             " | ".join(f"min to {int(t * 100)}%" for t in THRESHOLDS) + " | " +
             " | ".join(f"acc @ {m} min" for m in CHECKPOINT_MINUTES) + " |",
             "|---" * (5 + len(THRESHOLDS) + len(CHECKPOINT_MINUTES)) + "|"]
    for s in summaries:
        if "error" in s:
            lines.append(f"| {s['recipe']} | failed: {s['error'][:150]} |")
            continue
        size = "×".join(str(v) for v in (s.get("image_size") or []))
        lines.append(
            f"| {s['recipe']} | {s.get('model')} {size} | {_fmt(s.get('budget_minutes'), 'g')} | "
            f"{s.get('steps')} | "
            f"{_fmt(s.get('images_per_second'), '.0f')} | " +
            " | ".join(_fmt(s.get(f"minutes_to_{int(t * 100)}"), ".1f", "not reached")
                       for t in THRESHOLDS) + " | " +
            " | ".join(_fmt(s.get(f"accuracy_at_{m}"), ".1%") for m in CHECKPOINT_MINUTES) + " |")
    return "\n".join(lines) + "\n"


def plot(all_rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    names = list(dict.fromkeys(r["recipe"] for r in all_rows))
    for name in names:
        rows = [r for r in all_rows if r["recipe"] == name]
        ax.plot([r["minutes"] for r in rows], [r["accuracy"] for r in rows], marker="o",
                markersize=3, linewidth=1.6, label=name)
    for t in THRESHOLDS:
        ax.axhline(t, color="grey", linewidth=0.5, linestyle=":")
    ax.set_xlabel("minutes (wall clock from start-up, validation excluded)")
    ax.set_ylabel("held-out 10-fold verification accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    recipes = parse_recipes(args.recipes)
    os.makedirs(args.output_dir, exist_ok=True)
    train_dir, test_dir, split = make_split(args.data_dir, args.output_dir, args.holdout,
                                            args.split_seed)
    all_rows, summaries = [], []
    for name, flags in recipes.items():
        rows, summary = run_recipe(name, flags, args, train_dir, test_dir)
        for row in rows:
            print(json.dumps(row), flush=True)
        print(json.dumps(summary), flush=True)
        all_rows.extend(rows)
        summaries.append(summary)
    with open(os.path.join(args.output_dir, "results.jsonl"), "w", encoding="utf-8") as f:
        for row in all_rows + summaries:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown_table(summaries, args, split))
    plot(all_rows, os.path.join(args.output_dir, "accuracy_vs_minutes.png"),
         f"{os.path.basename(os.path.normpath(args.data_dir))}: {len(split['train'])} training "
         f"identities, {len(split['test'])} held out")


if __name__ == "__main__":
    main()
