"""evaluate.py --compare_export_dir: FaceNet's appendix "Harmonic Embedding" (Figure 9), the same
pairs scored new-new, old-old and new-old (first image by the new model, second by the old).

Two tiny compatible exports (training.export.export_saved_model of a mean-colour backbone, two
seeds of its small random mix) and a third one of another embedding size; synthetic LFW-style
identities (coloured squares on a noisy background) with a two-fold pairs file.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, subprocess_env, write_colour_faces, write_two_fold_pairs

H, W, D = 24, 20, 8
NAMES = ["Ann_A", "Bob_B", "Cid_C", "Dee_D", "Eve_E", "Fay_F"]
COLOURS = [(230, 30, 30), (30, 200, 40), (40, 40, 220), (220, 220, 30), (200, 40, 210),
           (30, 210, 210)]
PER_ID = 4
MODES = {"new_new", "old_old", "new_old"}
METRICS = ("accuracy_mean", "accuracy_std", "thresholds", "threshold", "val_at_far", "auc", "eer",
           "num_pairs", "num_same", "num_diff", "num_folds", "num_failed_pairs",
           "num_evaluated_pairs", "strict")

pytestmark = pytest.mark.slow


def _backbone(seed, dim, mix):
    """Preprocessed RGB -> unit embedding of the centred mean colour of the left 3/4 of the
    image (plus a seeded mix): not mirror-symmetric, so --flip changes the embeddings."""
    import keras

    inputs = keras.Input((H, W, 3))
    x = keras.layers.Cropping2D(((0, 0), (0, W // 4)))(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(dim, use_bias=False)
    model = keras.Model(inputs, keras.layers.UnitNormalization()(dense(x)))
    kernel = np.eye(3, dim) + mix * np.random.default_rng(seed).normal(size=(3, dim))
    dense.set_weights([kernel.astype(np.float32)])
    return model


def _export(path, seed, dim=D, mix=0.3):
    from training.export import export_saved_model

    export_saved_model(_backbone(seed, dim, mix), path, (H, W),
                       {"model": f"tiny_seed{seed}", "embedding_size": dim,
                        "preprocessing": "fixed_standardization"})
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    lfw = str(root / "lfw")
    write_colour_faces(lfw, np.random.default_rng(0), NAMES, COLOURS, PER_ID, jitter=40)
    pairs = str(root / "pairs.txt")
    write_two_fold_pairs(pairs, NAMES)
    return {"new": _export(str(root / "new"), seed=1), "old": _export(str(root / "old"), seed=2),
            "wide": _export(str(root / "wide"), seed=3, dim=2 * D), "lfw": lfw, "pairs": pairs}


def _run(args):
    import evaluate

    flags = evaluate.FLAGS
    flags.unparse_flags()
    flags(["evaluate.py"] + list(args))
    try:
        return evaluate.run()
    finally:
        flags.unparse_flags()


def _lfw(setup, lfw=None):
    return [f"--lfw_dir={lfw or setup['lfw']}", f"--lfw_pairs={setup['pairs']}"]


def _metrics(r):
    return {k: r[k] for k in METRICS}


def test_three_modes_reproduce_the_single_model_runs(setup):
    """new_new is evaluate.py on NEW alone, old_old on OLD alone (same pairs, same numbers), with
    flip test-time augmentation applied to every mode."""
    cross = _run([f"--export_dir={setup['new']}", f"--compare_export_dir={setup['old']}", "--flip"]
                 + _lfw(setup))
    new = _run([f"--export_dir={setup['new']}", "--flip"] + _lfw(setup))
    old = _run([f"--export_dir={setup['old']}", "--flip"] + _lfw(setup))
    assert set(cross["cross_model"]) == MODES
    for mode in MODES:
        assert set(METRICS) <= set(cross["cross_model"][mode])
        assert set(cross["cross_model"][mode]["val_at_far"]) == {"0.001", "0.01"}
        assert "_valid" not in cross["cross_model"][mode]
    assert _metrics(cross["cross_model"]["new_new"]) == _metrics(new)
    assert _metrics(cross["cross_model"]["old_old"]) == _metrics(old)
    assert _metrics(cross) == _metrics(new)  # the top-level report is still the new model's
    # without --flip the numbers change, in every mode alike
    plain = _run([f"--export_dir={setup['old']}"] + _lfw(setup))
    assert plain["threshold"] != old["threshold"]
    # the two models differ, so the three modes do
    thresholds = {m: cross["cross_model"][m]["threshold"] for m in MODES}
    assert len(set(thresholds.values())) == 3, thresholds
    assert cross["compare_model"]["model"] == "tiny_seed2"
    assert cross["compare_model"]["embedding_size"] == D
    assert cross["compare_model"]["image_size"] == [H, W]
    json.dumps(cross)  # JSON-ready: no arrays left


def test_new_old_distances_use_the_right_model_per_image(setup):
    from data.image_io import read_image
    from data.pairs import read_pairs
    from evaluation.cross_model import cross_model_distances, evaluate_cross_model
    from evaluation.embedder import load_embedder, resize_to

    new, old = load_embedder(setup["new"]), load_embedder(setup["old"])
    pairset = read_pairs(setup["pairs"], setup["lfw"])
    dist, failed = cross_model_distances(new, old, pairset.paths_a, pairset.paths_b,
                                         progress=False)
    assert failed == [] and set(dist) == MODES

    def direct(embedder, path):
        return embedder.embed_images(resize_to(read_image(path)[None], embedder.image_size))[0]

    for i in (0, 4, 7, 11):  # matched and mismatched pairs of both folds
        a, b = pairset.paths_a[i], pairset.paths_b[i]
        ea_new, eb_new, ea_old, eb_old = (direct(new, a), direct(new, b), direct(old, a),
                                          direct(old, b))
        assert dist["new_old"][i] == pytest.approx(np.sum((ea_new - eb_old) ** 2), abs=1e-5)
        assert dist["new_new"][i] == pytest.approx(np.sum((ea_new - eb_new) ** 2), abs=1e-5)
        assert dist["old_old"][i] == pytest.approx(np.sum((ea_old - eb_old) ** 2), abs=1e-5)
        # not the other way round (the second image by the new model)
        assert abs(dist["new_old"][i] - np.sum((ea_old - eb_new) ** 2)) > 1e-4
    # the scored results carry these distances (all pairs valid) for the ROC plot
    results, _ = evaluate_cross_model(new, old, pairset.paths_a, pairset.paths_b, pairset.issame,
                                      pairset.folds, num_folds=2, progress=False)
    np.testing.assert_array_equal(results["new_old"]["_valid"][0], dist["new_old"])


def test_same_export_twice_gives_three_identical_modes(setup):
    r = _run([f"--export_dir={setup['new']}", f"--compare_export_dir={setup['new']}"]
             + _lfw(setup))
    c = r["cross_model"]
    assert c["new_new"] == c["old_old"] == c["new_old"]
    assert _metrics(c["new_new"]) == _metrics(r)


def test_strict_and_missing_images_apply_to_every_mode(setup, tmp_path):
    import shutil

    lfw = str(tmp_path / "lfw")
    shutil.copytree(setup["lfw"], lfw)
    os.remove(os.path.join(lfw, "Ann_A", "Ann_A_0001.png"))
    base = [f"--export_dir={setup['new']}", f"--compare_export_dir={setup['old']}"] + _lfw(setup,
                                                                                           lfw)
    r = _run(base)
    gone = r["num_failed_pairs"]
    assert gone > 0 and r["failed_images"]["count"] == 1
    for mode in MODES:
        m = r["cross_model"][mode]
        assert m["num_failed_pairs"] == gone and m["num_evaluated_pairs"] == 12 - gone
    strict = _run(base + ["--strict"])
    for mode in MODES:
        m = strict["cross_model"][mode]
        assert m["strict"] is True and m["num_failed_pairs"] == gone
        assert m["num_evaluated_pairs"] == 12
    assert _metrics(strict["cross_model"]["new_new"]) == _metrics(strict)


def test_cli_json_summary_and_plot(setup, tmp_path):
    """The command line: LFW and a hold-out folder, JSON, one summary line per mode, plots."""
    out_json, out_dir = tmp_path / "r.json", tmp_path / "plots"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "evaluate.py"), f"--export_dir={setup['new']}",
         f"--compare_export_dir={setup['old']}", f"--data_dir={setup['lfw']}", "--num_pairs=40",
         "--num_folds=4", "--noclustering", f"--output_json={out_json}",
         f"--output_dir={out_dir}"] + _lfw(setup),
        capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out_json.read_text())
    assert set(r["cross_model"]) == MODES and set(r["holdout"]["cross_model"]) == MODES
    assert r["holdout"]["cross_model"]["new_new"]["accuracy_mean"] == r["holdout"]["accuracy_mean"]
    assert r["holdout"]["cross_model"]["new_old"]["num_pairs"] == 40
    assert "rank_1" in r["identification"]  # identification: the new model only, as before
    assert sorted(os.listdir(out_dir)) == [
        "distance_histogram.png", "holdout_distance_histogram.png", "holdout_roc.png",
        "holdout_roc_cross_model.png", "roc.png", "roc_cross_model.png"]
    assert str(out_dir / "roc_cross_model.png") in r["plots"]
    with Image.open(out_dir / "roc_cross_model.png") as im:
        im.load()
        assert im.format == "PNG" and min(im.size) > 100
    lines = proc.stdout.splitlines()
    for name in ("lfw", "holdout"):
        for label in ("new-new", "old-old", "new-old"):
            head = f"cross-model {name} {label}: accuracy"
            assert sum(line.startswith(head) for line in lines) == 1
    assert any(line.startswith("compared with (old): tiny_seed2") for line in lines)


def _exit_code(setup, compare_export_dir):
    """evaluate.main on the LFW set with --compare_export_dir; the exit code it ends with."""
    import evaluate

    flags = evaluate.FLAGS
    flags.unparse_flags()
    flags(["evaluate.py", f"--export_dir={setup['new']}",
           f"--compare_export_dir={compare_export_dir}"] + _lfw(setup))
    try:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(["evaluate.py"])
    finally:
        flags.unparse_flags()
    return exit_info.value.code


def test_embedding_size_mismatch_is_one_line_bad_export(setup, capsys):
    from exit_codes import BAD_EXPORT

    assert _exit_code(setup, setup["wide"]) == BAD_EXPORT == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1, err
    assert err[0].startswith("evaluate.py: error: --compare_export_dir")
    assert f"{2 * D} dimensions" in err[0] and f"model's {D}" in err[0]


def test_missing_compare_export_fails_before_tensorflow(setup, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad, why in ((tmp_path / "nope", "no such folder"), (empty, "not a SavedModel")):
        assert _exit_code(setup, bad) == 2
        err = capsys.readouterr().err
        assert "--compare_export_dir" in err and why in err and "Traceback" not in err


def test_plot_roc_curves_and_summary_lines(tmp_path):
    """No TensorFlow: the three-curve plot and the summary of a cross_model dict."""
    from evaluation.cross_model import MODES as ORDER, roc_curves
    from evaluation.plots import plot_roc_curves
    from evaluation.report import format_summary, score_pairs

    rng = np.random.default_rng(0)
    s = np.arange(400) % 2 == 0
    results = {}
    for k, mode in enumerate(ORDER):
        d = np.where(s, rng.normal(0.6, 0.2 + 0.1 * k, 400), rng.normal(1.6, 0.2, 400))
        results[mode] = score_pairs(d, s, num_folds=4)
    curves = roc_curves(results)
    assert [c[0] for c in curves] == ["new vs new", "old vs old", "new vs old"]
    path = plot_roc_curves(curves, str(tmp_path / "p" / "roc_cross_model.png"), title="t")
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
    with pytest.raises(ValueError):
        plot_roc_curves([], str(tmp_path / "none.png"))
    for r in results.values():
        r.pop("_valid")
    text = format_summary({**results["new_new"], "protocol": "lfw", "cross_model": results,
                           "model": {"model": "x", "image_size": [2, 2]}})
    lines = [line for line in text.splitlines() if line.startswith("cross-model lfw ")]
    assert [line.split(":")[0] for line in lines] == [
        "cross-model lfw new-new", "cross-model lfw old-old", "cross-model lfw new-old"]
    assert all("accuracy" in line and "VAL" in line and "AUC" in line and "threshold" in line
               for line in lines)
