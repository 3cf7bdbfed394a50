"""Evaluate a FaceNet model: LFW verification, hold-out VAL@FAR, identification and clustering.

FaceNet Section 4 / 5: squared L2 distances between embeddings; LFW accuracy with the threshold
chosen on nine folds and tested on the tenth (Section 5.6); VAL at FAR = 1e-3 on a hold-out set
(Section 5.1); agglomerative clustering (Section 5.7).

Examples:
  python evaluate.py --export_dir runs/nn4/export --lfw_dir lfw_aligned --lfw_pairs pairs.txt \\
      --flip --output_json lfw.json --output_dir plots/
  python evaluate.py --model_dir runs/nn4 --data_dir holdout/ --pairs balanced --num_pairs 6000

Harmonic embeddings (FaceNet's appendix, Figure 9): with ``--compare_export_dir OLD`` the
verification pairs are also scored with the old model alone and across models (first image by the
new model, second by the old), under ``cross_model`` (new_new, old_old, new_old) in the JSON:
  python evaluate.py --export_dir runs/nn2/export --compare_export_dir runs/nn1/export \\
      --lfw_dir lfw_aligned --lfw_pairs pairs.txt --output_json cross.json --output_dir plots/

The model is a SavedModel (``--export_dir``) or the latest checkpoint of ``--model_dir``. Pairs
with a missing or unreadable image are counted (``num_failed_pairs``) and excluded, or scored as
wrong with ``--strict``. Identification and clustering run on the hold-out folder (``--data_dir``,
or ``--val_dir``) unless ``--noidentification`` / ``--noclustering``.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, logging  # noqa: E402

import flags as project_flags  # noqa: E402

project_flags.define_evaluate_flags()
FLAGS = project_flags.FLAGS


def _embed(embedder, paths, what):
    logging.info("embedding %d %s images", len(paths), what)
    emb, failed = embedder.embed_paths(paths, batch_size=FLAGS.batch_size, flip=FLAGS.flip,
                                       progress=True)
    return emb, failed


def _cross_model(embedder, old, paths_a, paths_b, issame, folds, num_folds, all_paths):
    """The three-way scores of --compare_export_dir over the protocol's pairs (new_new is the
    protocol's own result, recomputed from the cached embeddings; the old model embeds
    ``all_paths`` as a run of it alone would). Returns (dict, failed)."""
    from evaluation.cross_model import evaluate_cross_model

    logging.info("cross-model scoring against --compare_export_dir")
    return evaluate_cross_model(embedder, old, paths_a, paths_b, issame, folds,
                                num_folds=num_folds, strict=FLAGS.strict, flip=FLAGS.flip,
                                batch_size=FLAGS.batch_size, progress=True,
                                embed_first=all_paths)


def evaluate_lfw(embedder, lfw_dir, pairs_file, old=None):
    """LFW View 2 (10 folds) or View 1 (1 fold) verification. Returns (results, failed images).

    ``old``: the --compare_export_dir embedder; adds ``cross_model`` to the results."""
    from data.pairs import read_pairs
    from evaluation.report import pair_distances, score_pairs

    pairset = read_pairs(pairs_file, lfw_dir)
    paths = pairset.unique_paths()
    emb, failed = _embed(embedder, paths, "LFW")
    row = {p: i for i, p in enumerate(paths)}
    a = emb[[row[p] for p in pairset.paths_a]]
    b = emb[[row[p] for p in pairset.paths_b]]
    result = score_pairs(pair_distances(a, b), pairset.issame, pairset.folds,
                         num_folds=pairset.num_folds, strict=FLAGS.strict)
    result["protocol"] = "lfw"
    result["num_missing_images"] = len(pairset.missing)
    if old is not None:
        result["cross_model"], failed_old = _cross_model(
            embedder, old, pairset.paths_a, pairset.paths_b, pairset.issame, pairset.folds,
            pairset.num_folds, paths)
        failed = failed + failed_old
    return result, failed


def evaluate_holdout(embedder, root, old=None):
    """Hold-out folder: verification over make_pairs, then identification and clustering.

    ``old``: the --compare_export_dir embedder; adds ``cross_model`` to the verification (the
    identification and clustering protocols use the new model only)."""
    from data.dataset import scan_identity_folder
    from evaluation.holdout_pairs import make_pairs
    from evaluation.report import pair_distances, score_pairs

    if any(c in root for c in "*?[") or root.endswith(".tfrecord"):
        raise app.UsageError(f"--data_dir {root!r}: evaluate.py needs a folder-per-identity image "
                             "tree, not TFRecords")
    dataset = scan_identity_folder(root)
    labels = np.asarray(dataset.labels)
    emb, failed = _embed(embedder, dataset.paths, "hold-out")
    idx_a, idx_b, issame, folds = make_pairs(labels, mode=FLAGS.pairs, num_pairs=FLAGS.num_pairs,
                                             num_folds=FLAGS.num_folds, seed=FLAGS.seed)
    verification = score_pairs(pair_distances(emb[idx_a], emb[idx_b]), issame, folds,
                               num_folds=FLAGS.num_folds, strict=FLAGS.strict)
    if FLAGS.pairs == "all":
        logging.info("--pairs=all: %d same vs %d different pairs; accuracy and its threshold "
                     "favour the majority class, VAL@FAR and AUC do not",
                     int(issame.sum()), int((~issame).sum()))
    verification["protocol"] = "holdout"
    verification["pairs_mode"] = FLAGS.pairs
    verification["num_images"] = len(dataset)
    verification["num_identities"] = dataset.num_classes
    if old is not None:
        verification["cross_model"], failed_old = _cross_model(
            embedder, old, [dataset.paths[i] for i in idx_a], [dataset.paths[i] for i in idx_b],
            issame, folds, FLAGS.num_folds, dataset.paths)
        failed = failed + failed_old
    ok = np.all(np.isfinite(emb), axis=1)
    extra = {}
    if FLAGS.identification:
        from evaluation.identification import evaluate_identification

        try:
            extra["identification"] = evaluate_identification(
                emb[ok], labels[ok], impostor_fraction=FLAGS.impostor_fraction, seed=FLAGS.seed)
        except ValueError as exc:
            logging.warning("identification skipped: %s", exc)
            extra["identification"] = {"error": str(exc)}
    if FLAGS.clustering:
        from evaluation.clustering import evaluate_clustering

        threshold = (FLAGS.clustering_threshold if FLAGS.clustering_threshold is not None
                     else verification["threshold"])
        try:
            extra["clustering"] = evaluate_clustering(
                emb[ok], labels[ok], distance_threshold=threshold,
                num_clusters=FLAGS.num_clusters, linkage=project_flags.linkage("evaluate"),
                seed=FLAGS.seed)
        except ValueError as exc:
            logging.warning("clustering skipped: %s", exc)
            extra["clustering"] = {"error": str(exc)}
    return verification, extra, failed


def _write_plots(result, output_dir, prefix=""):
    """roc.png and distance_histogram.png, and roc_cross_model.png with --compare_export_dir
    (file names prefixed with ``prefix``)."""
    from evaluation.plots import plot_distance_histogram, plot_roc, plot_roc_curves
    from evaluation.verification import roc_curve

    d, s = result["_valid"]
    os.makedirs(output_dir, exist_ok=True)
    written = []
    if s.any() and (~s).any():
        far, tar, _ = roc_curve(d, s)
        written.append(plot_roc(far, tar, os.path.join(output_dir, prefix + "roc.png"),
                                title=f"ROC ({result['protocol']})"))
    else:
        logging.warning("no ROC plot: the evaluated pairs hold only one class")
    if d.size:
        written.append(plot_distance_histogram(
            d, s, result["threshold"], os.path.join(output_dir, prefix + "distance_histogram.png"),
            title=f"Pair distances ({result['protocol']})"))
    if "cross_model" in result:
        from evaluation.cross_model import roc_curves

        curves = roc_curves(result["cross_model"])
        if curves:
            written.append(plot_roc_curves(
                curves, os.path.join(output_dir, prefix + "roc_cross_model.png"),
                title=f"ROC across models ({result['protocol']})"))
        else:
            logging.warning("no cross-model ROC plot: the evaluated pairs hold only one class")
    return written


def _check_paths(holdout_dir):
    """The folders and files the flags name exist, and the outputs can be written; raises
    CliError (BAD_EXPORT for --export_dir, USAGE otherwise) naming the flag and the path."""
    from cli_checks import require_dir, require_file, require_writable_dir, require_writable_parent
    from exit_codes import BAD_EXPORT, CliError

    def require_saved_model(path, flag):
        require_dir(path, flag, BAD_EXPORT)
        if not any(os.path.isfile(os.path.join(path, name))
                   for name in ("saved_model.pb", "saved_model.pbtxt")):
            raise CliError(f"{flag} {path}: not a SavedModel (no saved_model.pb"
                           f"{'; the folder is empty' if not os.listdir(path) else ''})",
                           BAD_EXPORT)

    if FLAGS.export_dir:
        require_saved_model(FLAGS.export_dir, "--export_dir")
    elif FLAGS.model_dir:
        require_dir(FLAGS.model_dir, "--model_dir")
    if FLAGS.compare_export_dir:
        require_saved_model(FLAGS.compare_export_dir, "--compare_export_dir")
    if FLAGS.lfw_dir:
        require_dir(FLAGS.lfw_dir, "--lfw_dir")
    if FLAGS.lfw_pairs:
        require_file(FLAGS.lfw_pairs, "--lfw_pairs")
    if holdout_dir and not any(c in holdout_dir for c in "*?["):
        require_dir(holdout_dir, "--data_dir" if FLAGS.data_dir else "--val_dir")
    if FLAGS.output_dir:
        require_writable_dir(FLAGS.output_dir, "--output_dir")
    if FLAGS.output_json:
        require_writable_parent(FLAGS.output_json, "--output_json")


def _load_saved_model(export_dir, flag, image_size):
    """The embedder of the SavedModel ``export_dir``; CliError (BAD_EXPORT) naming ``flag``."""
    from exit_codes import BAD_EXPORT, CliError
    from training.export import load_embedder

    try:
        return load_embedder(export_dir, None, image_size=image_size, batch_size=FLAGS.batch_size)
    except (OSError, ValueError) as exc:  # unparsable, no serving_default, bad signature
        raise CliError(f"{flag} {export_dir}: not a usable SavedModel "
                       f"({' '.join(str(exc).split())})", BAD_EXPORT) from None


def _check_compatible(new, old):
    """Both models must return embeddings of one size: else CliError (BAD_EXPORT), one line."""
    from evaluation.cross_model import check_compatible
    from exit_codes import BAD_EXPORT, CliError

    try:
        check_compatible(new, old)
    except ValueError as exc:
        raise CliError(f"--compare_export_dir {FLAGS.compare_export_dir}: {exc}",
                       BAD_EXPORT) from None


def run():
    """Run the protocols selected by the flags; returns the JSON-ready results dict."""
    from evaluation.report import summarize_failures
    from training.export import load_embedder  # a SavedModel, or a checkpoint of --model_dir

    if not FLAGS.export_dir and not FLAGS.model_dir:
        raise app.UsageError("give --export_dir (SavedModel) or --model_dir (checkpoint)")
    holdout_dir = FLAGS.data_dir or FLAGS.val_dir
    lfw = bool(FLAGS.lfw_dir or FLAGS.lfw_pairs)
    if lfw and not (FLAGS.lfw_dir and FLAGS.lfw_pairs):
        raise app.UsageError("--lfw_dir and --lfw_pairs go together")
    if not lfw and not holdout_dir:
        raise app.UsageError("nothing to evaluate: give --lfw_dir and --lfw_pairs, or --data_dir")
    _check_paths(holdout_dir)
    image_size = (project_flags.parse_image_size(FLAGS.image_size, None)
                  if FLAGS.image_size else None)
    if FLAGS.export_dir:
        embedder = _load_saved_model(FLAGS.export_dir, "--export_dir", image_size)
    else:
        embedder = load_embedder(None, FLAGS.model_dir, image_size=image_size,
                                 batch_size=FLAGS.batch_size)
    old = None
    if FLAGS.compare_export_dir:
        # the old model's own input size (facenet.json), whatever --image_size says of the new one
        old = _load_saved_model(FLAGS.compare_export_dir, "--compare_export_dir", None)
        _check_compatible(embedder, old)
    model = dict(embedder.metadata)
    model["image_size"] = list(embedder.image_size)
    results = {"model": model, "flip": bool(FLAGS.flip), "strict": bool(FLAGS.strict)}
    if old is not None:
        results["compare_model"] = {**old.metadata, "image_size": list(old.image_size),
                                    "embedding_size": old.embedding_size}
    failed_all = []
    primary = None
    if lfw:
        primary, failed = evaluate_lfw(embedder, FLAGS.lfw_dir, FLAGS.lfw_pairs, old)
        failed_all += failed
    if holdout_dir:
        verification, extra, failed = evaluate_holdout(embedder, holdout_dir, old)
        failed_all += failed
        if primary is None:
            primary = verification
        else:
            results["holdout"] = verification
        results.update(extra)
    model["embedding_size"] = embedder.embedding_size
    results["failed_images"] = summarize_failures(list(dict(failed_all).items()))  # unique paths
    plots = []
    if FLAGS.output_dir:
        plots = _write_plots(primary, FLAGS.output_dir)
        if "holdout" in results:
            plots += _write_plots(results["holdout"], FLAGS.output_dir, prefix="holdout_")
    for r in (primary, results.get("holdout")):
        if r is not None:
            r.pop("_valid", None)
            for mode in r.get("cross_model", {}).values():
                mode.pop("_valid", None)
    results = {**primary, **results}
    results["plots"] = plots
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from evaluation.report import format_summary
    from quiet_tf import import_tensorflow

    from exit_codes import CliError, fail

    try:
        project_flags.apply_deprecated_aliases("evaluate.py")  # e.g. --clustering_linkage
        _check_paths(FLAGS.data_dir or FLAGS.val_dir)  # before TensorFlow loads: fails fast
        import_tensorflow()  # TF 2.21's start-up banner ignores TF_CPP_MIN_LOG_LEVEL
        results = run()
    except CliError as exc:  # e.g. no checkpoint of --model_dir restores (NO_CHECKPOINT)
        fail(str(exc), exc.exit_code, program="evaluate.py")
    except (FileNotFoundError, ValueError) as exc:
        # user-facing input problems (bad paths, empty dataset, malformed pairs file): the message,
        # not a traceback; run with --verbosity=1 to see where it came from
        logging.debug("evaluation failed", exc_info=True)
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 1
    if FLAGS.output_json:
        directory = os.path.dirname(os.path.abspath(FLAGS.output_json))
        os.makedirs(directory, exist_ok=True)
        with open(FLAGS.output_json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, sort_keys=True)
    print(format_summary(results))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    app.run(main)
