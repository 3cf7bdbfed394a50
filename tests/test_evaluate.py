"""End to end: evaluation/embedder.py and evaluate.py on a tiny SavedModel and synthetic images.

The "identities" are coloured squares on a noisy background; the tiny model embeds the mean colour,
so identities separate perfectly. The SavedModel follows the export contract: signature
serving_default, float32 RGB 0..255 [N, H, W, 3] in, {"embeddings": [N, D]} out, assets/facenet.json.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import write_colour_faces, write_two_fold_pairs

H, W, D = 24, 20, 8
NAMES = ["Ann_A", "Bob_B", "Cid_C", "Dee_D", "Eve_E", "Fay_F"]
COLOURS = [(230, 30, 30), (30, 200, 40), (40, 40, 220), (220, 220, 30), (200, 40, 210),
           (30, 210, 210)]
PER_ID = 4

pytestmark = pytest.mark.slow


def _tiny_keras_model():
    import keras

    inputs = keras.Input((H, W, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    dense = keras.layers.Dense(D, use_bias=False)
    x = keras.layers.UnitNormalization()(dense(x))
    model = keras.Model(inputs, x)
    # embedding = direction of the centred mean colour (+ a small mix so all D dims are used)
    kernel = np.eye(3, D) + 0.05 * np.random.default_rng(1).normal(size=(3, D))
    dense.set_weights([kernel.astype(np.float32)])
    return model


def _save_export(export_dir, with_json=True):
    import tensorflow as tf

    from data.preprocess import preprocess

    model = _tiny_keras_model()

    class Export(tf.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        @tf.function(input_signature=[tf.TensorSpec([None, H, W, 3], tf.float32, name="images")])
        def serve(self, images):
            return {"embeddings": self.m(preprocess(images), training=False)}

    module = Export(model)
    tf.saved_model.save(module, export_dir, signatures={"serving_default": module.serve})
    if with_json:
        os.makedirs(os.path.join(export_dir, "assets"), exist_ok=True)
        with open(os.path.join(export_dir, "assets", "facenet.json"), "w") as f:
            json.dump({"model": "tiny_test", "image_size": [H, W], "embedding_size": D,
                       "preprocessing": "fixed_standardization", "threshold": None}, f)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    export_dir = str(root / "export")
    model = _save_export(export_dir)
    lfw = str(root / "lfw")
    write_colour_faces(lfw, np.random.default_rng(0), NAMES, COLOURS, PER_ID, jitter=8)
    pairs = str(root / "pairs.txt")
    write_two_fold_pairs(pairs, NAMES)
    return {"root": root, "export": export_dir, "lfw": lfw, "pairs": pairs, "model": model}


def _run(args):
    import evaluate

    flags = evaluate.FLAGS
    flags.unparse_flags()
    flags(["evaluate.py"] + list(args))
    try:
        return evaluate.run()
    finally:
        flags.unparse_flags()


def _copy_tree(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


# ------------------------------------------------------------------------------------ embedder
def test_embedder_saved_model_matches_keras_and_caches(setup, monkeypatch):
    from data.preprocess import preprocess_numpy
    from evaluation.embedder import load_embedder

    emb = load_embedder(export_dir=setup["export"])
    assert emb.image_size == (H, W) and emb.metadata["model"] == "tiny_test"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(5, H, W, 3)).astype(np.uint8)
    want = setup["model"](preprocess_numpy(x)).numpy()
    np.testing.assert_allclose(emb.embed_images(x), want, atol=1e-5)
    np.testing.assert_allclose(emb.embed_images(x.astype(np.float32), batch_size=2), want,
                               atol=1e-5)
    # flip: sum of both embeddings, re-normalised
    flipped = setup["model"](preprocess_numpy(x[:, :, ::-1])).numpy()
    both = want + flipped
    np.testing.assert_allclose(emb.embed_images(x, flip=True),
                               both / np.linalg.norm(both, axis=1, keepdims=True), atol=1e-5)
    # paths: resized to the model size, cached per (path, flip)
    paths = [os.path.join(setup["lfw"], "Ann_A", "Ann_A_0001.png"),
             os.path.join(setup["lfw"], "Bob_B", "Bob_B_0002.png")]
    calls = []
    real = emb._fn
    monkeypatch.setattr(emb, "_fn", lambda b: calls.append(len(b)) or real(b))
    e1, failed = emb.embed_paths(paths + paths[:1], progress=False)
    assert failed == [] and e1.shape == (3, D) and calls == [2]
    np.testing.assert_array_equal(e1[0], e1[2])
    e2, _ = emb.embed_paths(paths[::-1], progress=False)
    assert calls == [2]  # all cached
    np.testing.assert_array_equal(e2[0], e1[1])
    emb.embed_paths(paths, flip=True, progress=False)
    assert calls == [2, 2, 2]  # flip is a separate cache entry: image + mirror
    from data.image_io import read_image
    from evaluation.embedder import resize_to

    direct = emb.embed_images(resize_to(read_image(paths[0])[None], (H, W)))
    np.testing.assert_allclose(e1[0], direct[0], atol=1e-6)


def test_embedder_reports_failures(setup, tmp_path):
    from evaluation.embedder import load_embedder

    emb = load_embedder(export_dir=setup["export"])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((30, 30), 128, np.uint8)).save(grey)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.full((30, 30, 4), 200, np.uint8)).save(rgba)
    paths = [str(bad), str(tmp_path / "missing.png"), str(empty), str(grey), str(rgba)]
    e, failed = emb.embed_paths(paths, progress=False)
    assert dict(failed) == {str(bad): "not_an_image", str(tmp_path / "missing.png"): "missing",
                            str(empty): "empty"}
    assert np.all(np.isnan(e[:3])) and np.all(np.isfinite(e[3:]))


def test_embedder_without_json_uses_signature_shape(tmp_path):
    from evaluation.embedder import load_embedder

    export = str(tmp_path / "nojson")
    _save_export(export, with_json=False)
    emb = load_embedder(export_dir=export)
    assert emb.image_size == (H, W)
    assert emb.embed_images(np.zeros((2, 50, 40, 3), np.uint8)).shape == (2, D)
    with pytest.raises(ValueError, match="export_dir|model_dir"):
        load_embedder()
    with pytest.raises(FileNotFoundError):
        load_embedder(export_dir=str(tmp_path / "nope"))


def test_embedder_from_checkpoint(tmp_path):
    import tensorflow as tf

    from data.preprocess import preprocess_numpy
    from training.export import load_embedder

    try:
        from models import build_model

        model = build_model("tiny", embedding_size=16, image_size=(64, 64))
    except (ImportError, KeyError, ValueError) as exc:  # pragma: no cover
        pytest.skip(f"models.build_model('tiny') unavailable: {exc}")
    model_dir = tmp_path / "run"
    tf.train.Checkpoint(model=model).save(str(model_dir / "checkpoints" / "ckpt"))
    (model_dir / "config.json").write_text(json.dumps(
        {"model": "tiny", "image_size": [64, 64], "embedding_size": 16, "normalization": "batch"}))
    emb = load_embedder(model_dir=str(model_dir))
    x = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3)).astype(np.uint8)
    np.testing.assert_allclose(emb.embed_images(x),
                               model(preprocess_numpy(x), training=False).numpy(), atol=1e-4)


# ---------------------------------------------------------------------------------- evaluate.py
REQUIRED = ("accuracy_mean", "accuracy_std", "thresholds", "val_at_far", "auc", "eer",
            "num_pairs", "num_failed_pairs")


def test_cli_lfw_and_holdout_subprocess(setup, tmp_path):
    out_json = tmp_path / "r.json"
    out_dir = tmp_path / "plots"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "evaluate.py"), f"--export_dir={setup['export']}",
         f"--lfw_dir={setup['lfw']}", f"--lfw_pairs={setup['pairs']}",
         f"--data_dir={setup['lfw']}", "--num_pairs=40", "--num_folds=4", "--flip",
         f"--output_json={out_json}", f"--output_dir={out_dir}"],
        capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out_json.read_text())
    for k in REQUIRED:
        assert k in r
    assert r["protocol"] == "lfw" and r["num_pairs"] == 12 and r["num_failed_pairs"] == 0
    assert r["accuracy_mean"] == 1.0 and r["auc"] == 1.0 and r["eer"] == 0.0
    assert len(r["thresholds"]) == 2 and set(r["val_at_far"]) == {"0.001", "0.01"}
    assert r["holdout"]["num_pairs"] == 40 and r["holdout"]["accuracy_mean"] == 1.0
    assert r["identification"]["rank_1"] == 1.0
    assert r["clustering"]["pairwise_f1"] == 1.0 and r["clustering"]["num_clusters"] == 6
    assert r["flip"] is True and r["model"]["image_size"] == [H, W]
    assert sorted(os.listdir(out_dir)) == ["distance_histogram.png", "holdout_distance_histogram.png",
                                           "holdout_roc.png", "roc.png"]
    for name in ("roc.png", "distance_histogram.png"):
        path = out_dir / name
        assert path.stat().st_size > 1000
        with Image.open(path) as im:
            im.load()
            assert im.format == "PNG" and min(im.size) > 100
    assert "accuracy" in proc.stdout and "identification" in proc.stdout


def test_missing_image_is_counted_and_strict_scores_it_wrong(setup, tmp_path):
    lfw = _copy_tree(setup["lfw"], tmp_path / "lfw")
    # Ann_A_0001 is in the first matched pair and the first mismatched pair of fold 0
    os.remove(os.path.join(lfw, "Ann_A", "Ann_A_0001.png"))
    from data.pairs import read_pairs

    pairset = read_pairs(setup["pairs"], lfw)
    gone = [p for p in pairset.pairs if "Ann_A_0001" in p.path_a + p.path_b]
    assert gone
    base = [f"--export_dir={setup['export']}", f"--lfw_dir={lfw}", f"--lfw_pairs={setup['pairs']}"]
    r = _run(base)
    assert r["num_failed_pairs"] == len(gone) and r["num_pairs"] == 12
    assert r["num_evaluated_pairs"] == 12 - len(gone) and r["accuracy_mean"] == 1.0
    assert set(r["failed_images"]["by_reason"]) == {"missing"}
    strict = _run(base + ["--strict"])
    assert strict["num_failed_pairs"] == len(gone) and strict["num_evaluated_pairs"] == 12
    # every failed pair is an error: fold accuracies drop by exactly the failed count
    folds = np.array([p.fold for p in pairset.pairs])
    wrong = np.array([("Ann_A_0001" in p.path_a + p.path_b) for p in pairset.pairs])
    expect = np.mean([1 - wrong[folds == k].sum() / (folds == k).sum() for k in range(2)])
    assert strict["accuracy_mean"] == pytest.approx(expect)
    assert strict["threshold"] == pytest.approx(r["threshold"])


def test_holdout_with_corrupt_and_single_image_identity(setup, tmp_path):
    data = _copy_tree(setup["lfw"], tmp_path / "data")
    with open(os.path.join(data, "Bob_B", "Bob_B_0003.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n garbage")
    os.makedirs(os.path.join(data, "Zed_Z"))
    Image.fromarray(np.full((40, 36, 3), 90, np.uint8)).save(os.path.join(data, "Zed_Z", "z.png"))
    out_dir = tmp_path / "plots"
    r = _run([f"--export_dir={setup['export']}", f"--data_dir={data}", "--pairs=all",
              "--num_folds=3", "--impostor_fraction=0.3", f"--output_dir={out_dir}",
              "--linkage=complete"])
    n = 6 * PER_ID + 1
    assert r["protocol"] == "holdout" and r["num_pairs"] == n * (n - 1) // 2
    assert r["num_failed_pairs"] == n - 1  # every pair with the corrupt image
    assert r["failed_images"]["count"] == 1
    assert list(r["failed_images"]["by_reason"]) in (["truncated"], ["not_an_image"])
    assert r["accuracy_mean"] == 1.0
    assert r["identification"]["num_probes"] + r["identification"]["num_gallery"] + \
        r["identification"]["num_impostor_probes"] == n - 1
    assert r["clustering"]["linkage"] == "complete" and r["clustering"]["num_images"] == n - 1
    assert r["clustering"]["pairwise_f1"] == 1.0
    assert sorted(os.listdir(out_dir)) == ["distance_histogram.png", "roc.png"]
    json.dumps(r)


def test_kmeans_and_disabled_protocols(setup):
    r = _run([f"--export_dir={setup['export']}", f"--data_dir={setup['lfw']}", "--num_pairs=30",
              "--num_clusters=6", "--noidentification"])
    assert "identification" not in r and r["clustering"]["method"] == "kmeans"
    assert r["clustering"]["pairwise_f1"] == 1.0
    r = _run([f"--export_dir={setup['export']}", f"--data_dir={setup['lfw']}", "--num_pairs=30",
              "--noclustering", "--noidentification"])
    assert "clustering" not in r and "identification" not in r
    r = _run([f"--export_dir={setup['export']}", f"--data_dir={setup['lfw']}", "--num_pairs=30",
              "--noidentification", "--clustering_threshold=0.5"])
    assert r["clustering"]["distance_threshold"] == 0.5 and r["clustering"]["pairwise_f1"] == 1.0


def test_usage_errors(setup):
    from absl import app

    with pytest.raises(app.UsageError, match="export_dir"):
        _run([f"--data_dir={setup['lfw']}"])
    with pytest.raises(app.UsageError, match="nothing to evaluate"):
        _run([f"--export_dir={setup['export']}"])
    with pytest.raises(app.UsageError, match="together"):
        _run([f"--export_dir={setup['export']}", f"--lfw_dir={setup['lfw']}"])


def test_report_summary_and_failures():
    from evaluation.report import format_summary, score_pairs, summarize_failures

    d = np.array([0.1, np.nan, 0.2, 1.5, 1.4, np.nan])
    s = np.array([1, 1, 1, 0, 0, 0], bool)
    r = score_pairs(d, s, num_folds=1)
    assert r["num_failed_pairs"] == 2 and r["num_evaluated_pairs"] == 4 and r["accuracy_mean"] == 1
    r2 = score_pairs(d, s, num_folds=1, strict=True)
    assert r2["accuracy_mean"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="none of the"):
        score_pairs(np.full(3, np.nan), s[:3])
    f = summarize_failures([("a", "missing"), ("b", "missing"), ("c", "empty")])
    assert f["by_reason"] == {"empty": 1, "missing": 2} and f["count"] == 3
    r.pop("_valid")
    text = format_summary({**r, "protocol": "lfw", "model": {"model": "x", "image_size": [2, 2]},
                           "failed_images": f})
    assert "accuracy" in text and "failed images: 3" in text and len(text.splitlines()) < 25


def test_lfw_view1_single_fold(setup, tmp_path):
    dev = tmp_path / "pairsDevTest.txt"
    dev.write_text("2\nAnn_A\t1\t2\nBob_B\t1\t3\nAnn_A\t1\tBob_B\t1\nCid_C\t2\tDee_D\t4\n")
    r = _run([f"--export_dir={setup['export']}", f"--lfw_dir={setup['lfw']}",
              f"--lfw_pairs={dev}"])
    assert r["num_folds"] == 1 and len(r["thresholds"]) == 1 and r["num_pairs"] == 4
    assert r["accuracy_mean"] == 1.0


def test_main_reports_input_errors_without_traceback(setup, tmp_path, capsys):
    import evaluate

    flags = evaluate.FLAGS
    flags.unparse_flags()
    flags(["evaluate.py", f"--export_dir={tmp_path / 'nope'}", f"--data_dir={setup['lfw']}"])
    try:
        with pytest.raises(SystemExit) as exit_info:  # a missing export: BAD_EXPORT (exit_codes.py)
            evaluate.main(["evaluate.py"])
    finally:
        flags.unparse_flags()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--export_dir" in err and "no such folder" in err and "Traceback" not in err


@pytest.mark.parametrize("src,dst", [((112, 92), (64, 64)), ((40, 36), (24, 20)), ((30, 20), (96, 80))])
def test_resize_matches_training_pipeline(src, dst):
    from data.augment import resize
    from evaluation.embedder import resize_to

    img = np.random.default_rng(0).integers(0, 256, size=(1,) + src + (3,)).astype(np.uint8)
    want = resize(img[0], dst).numpy()
    got = resize_to(img, dst)[0]
    assert got.shape == dst + (3,)
    np.testing.assert_allclose(got, np.clip(want, 0, 255), atol=0.02)
