"""End-to-end tests of train.py and export.py on a small synthetic set, in subprocesses.

Each run uses the ``tiny`` model at 32x32 and batches of 4 identities x 4 images so that the whole
file stays within about two minutes on two cores.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data.align import SETTINGS_NAME

from tests.helpers import REPO, subprocess_env as _env
pytestmark = pytest.mark.slow


ALIGN_CROP = {"detector": "mtcnn", "crop_size": 112, "margin": 16.0, "alignment": "landmarks"}


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """A small folder-per-identity train set and hold-out set of synthetic faces (32 px)."""
    from data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("faces")
    info = generate_dataset(str(root), identities=24, images_per_identity=6, image_size=32,
                            seed=7, heldout_identities=8, workers=1)
    # As if `python -m data.align` had made the training folder: the export must record its crop.
    with open(os.path.join(info["train_dir"], SETTINGS_NAME), "w", encoding="utf-8") as f:
        json.dump(ALIGN_CROP, f)
    return info


def _train(model_dir, faces, *extra, timeout=300, check=True):
    # The flag defaults (the built-in data's recipe) unless a test names another recipe.
    recipe = [] if any(e.startswith("--recipe") for e in extra) else ["--recipe=synthetic"]
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *recipe, "--model=tiny", "--image_size=32",
           f"--data_dir={faces['train_dir']}", f"--val_dir={faces['test_dir']}",
           f"--model_dir={model_dir}", "--identities_per_batch=4", "--images_per_identity=4",
           "--steps_per_epoch=5", "--projector_images=40", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, faces):
    """One 30-step run shared by the export and projector tests."""
    model_dir = str(tmp_path_factory.mktemp("run"))
    _train(model_dir, faces, "--max_steps=30", "--optimizer=adam", "--learning_rate=0.01")
    return model_dir


def test_loss_decreases_and_outputs_exist(trained):
    m = _metrics(trained)
    assert m["step"] == 30
    losses = [h["train_loss"] for h in m["history"]]
    assert len(losses) == 6
    assert all(np.isfinite(losses))
    for key in ("accuracy_mean", "auc", "threshold", "export_dir", "projector_config"):
        assert m[key] is not None, key
    assert 0.0 <= m["accuracy_mean"] <= 1.0
    assert os.path.isdir(os.path.join(trained, "export"))
    assert os.listdir(os.path.join(trained, "logs", "train"))  # TensorBoard events


def test_training_lowers_the_loss_on_a_fixed_batch(trained, faces):
    """Over every training image, the trained checkpoint beats the seeded init (inference mode).

    The semi-hard loss falls and same/different pairs separate better (ROC AUC of the squared
    distances). (The per-step loss is not monotone: mining picks harder negatives as the
    embedding improves.) 30 tiny steps move these by about 12% and 0.05 AUC.
    """
    import keras
    from sklearn.metrics import roc_auc_score

    from data.dataset import scan_identity_folder
    from data.pipeline import eval_dataset
    from training.export import restore_backbone
    from losses import triplet_loss
    from training.run_config import load_run_config

    train = scan_identity_folder(faces["train_dir"])
    labels = np.asarray(train.labels)
    images = np.concatenate([b.numpy() for b in eval_dataset(list(train.paths), (32, 32), 64)])
    keras.utils.set_random_seed(1234)  # train.py's default --seed: the same initial weights
    initial = load_run_config(trained).build_model()
    trained_model, _, _ = restore_backbone(trained)
    upper = np.triu_indices(len(labels), 1)
    same = (labels[:, None] == labels[None, :])[upper]

    def loss_and_auc(model):
        emb = model(images, training=False).numpy()
        d2 = ((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1)[upper]
        return float(triplet_loss(labels, emb)), roc_auc_score(same, -d2)

    loss_before, auc_before = loss_and_auc(initial)
    loss_after, auc_after = loss_and_auc(trained_model)
    assert loss_after < 0.95 * loss_before, (loss_before, loss_after)
    assert auc_after > auc_before + 0.02, (auc_before, auc_after)


def test_tensorboard_scalars_written(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(trained, "logs", "train"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    for tag in ("train/loss", "train/active_fraction", "train/mean_d_ap", "train/mean_d_an",
                "train/learning_rate", "train/images_per_second", "val/accuracy",
                "val/embedding_norm"):
        assert tag in tags, (tag, sorted(tags))


def test_resume_keeps_step_and_is_exact(tmp_path, faces):
    """10 steps + resume to 20 ends with the same weights as 20 steps straight."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    common = ("--optimizer=adagrad", "--export=false", "--augment=false")
    _train(straight, faces, "--max_steps=20", *common)
    _train(split, faces, "--max_steps=10", *common)
    assert _metrics(split)["step"] == 10
    _train(split, faces, "--max_steps=20", *common)
    m = _metrics(split)
    assert m["step"] == 20 and m["resumed_from"].endswith("ckpt-10")

    import tensorflow as tf

    a = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(straight, "checkpoints")))
    b = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(split, "checkpoints")))
    names = [n for n, _ in tf.train.list_variables(
        tf.train.latest_checkpoint(os.path.join(straight, "checkpoints")))]
    opt_names = [n for n in names if n.startswith("optimizer/") and "iteration" not in n]
    assert opt_names, names  # the optimiser's accumulators are checkpointed
    for n in names:
        if n.startswith("_CHECKPOINTABLE_OBJECT_GRAPH"):
            continue
        np.testing.assert_allclose(a.get_tensor(n), b.get_tensor(n), rtol=1e-4, atol=1e-5,
                                   err_msg=n)


def test_export_round_trip_without_project_imports(trained, tmp_path):
    import cv2

    from training.export import read_export_metadata, restore_backbone
    from data.preprocess import preprocess

    export_dir = os.path.join(trained, "export")
    meta = read_export_metadata(export_dir)
    assert meta["model"] == "tiny" and meta["image_size"] == [32, 32]
    assert meta["threshold"] is not None and np.isfinite(meta["threshold"])
    assert meta["crop"] == ALIGN_CROP

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(5, 32, 32, 3)).astype(np.float32)
    images = np.round(images)  # exact in PNG
    np.save(tmp_path / "images.npy", images)
    for i, img in enumerate(images.astype(np.uint8)):
        cv2.imwrite(str(tmp_path / f"{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    backbone, _, _ = restore_backbone(trained)
    expected = backbone(preprocess(images), training=False).numpy()

    script = f"""
import json, sys, numpy as np, tensorflow as tf
m = tf.saved_model.load({export_dir!r})
x = np.load({str(tmp_path / 'images.npy')!r})
a = m.signatures["serving_default"](images=tf.constant(x))["embeddings"].numpy()
blobs = [open({str(tmp_path)!r} + f"/{{i}}.png", "rb").read() for i in range(len(x))]
b = m.signatures["embed_jpeg"](images=tf.constant(blobs))["embeddings"].numpy()
project = [k for k in sys.modules if k.split(".")[0] in ("models", "losses", "data", "training", "export", "evaluation", "flags")]
np.save({str(tmp_path / 'a.npy')!r}, a); np.save({str(tmp_path / 'b.npy')!r}, b)
print(json.dumps({{"project_modules": project, "threshold": float(m.threshold.numpy()),
                  "image_size": m.image_size.numpy().tolist()}}))
"""
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-I", "-c", script], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["project_modules"] == []
    assert info["image_size"] == [32, 32]
    assert info["threshold"] == pytest.approx(meta["threshold"], rel=1e-6)
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert np.max(np.abs(a - expected)) <= 1e-5
    assert np.max(np.abs(b - expected)) <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_export_cli_from_checkpoint(trained, tmp_path):
    out_dir = str(tmp_path / "exported")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "export.py"), f"--model_dir={trained}",
                           f"--export_dir={out_dir}"], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["export_dir"] == os.path.abspath(out_dir)
    assert info["threshold"] == pytest.approx(_metrics(trained)["threshold"])
    assert os.path.exists(os.path.join(out_dir, "saved_model.pb"))
    from training.export import read_export_metadata

    assert read_export_metadata(out_dir)["crop"] == ALIGN_CROP


def test_projector_files_valid(trained):
    import cv2
    from google.protobuf import text_format
    from tensorboard.plugins.projector import ProjectorConfig

    log_dir = os.path.join(trained, "logs")
    with open(os.path.join(log_dir, "projector_config.pbtxt"), encoding="utf-8") as f:
        config = text_format.Parse(f.read(), ProjectorConfig())
    (emb,) = config.embeddings
    vectors = np.loadtxt(os.path.join(log_dir, emb.tensor_path), delimiter="\t", ndmin=2)
    with open(os.path.join(log_dir, emb.metadata_path), encoding="utf-8") as f:
        rows = f.read().splitlines()
    assert vectors.shape == (40, 128)
    assert len(rows) == 41 and rows[0] == "index\tidentity"
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    sprite = cv2.imread(os.path.join(log_dir, emb.sprite.image_path))
    w, h = emb.sprite.single_image_dim
    assert sprite.shape[0] == 7 * h and sprite.shape[1] == 7 * w  # ceil(sqrt(40)) = 7
    assert sprite.std() > 0


def test_projector_only_rewrites(trained, faces):
    path = os.path.join(trained, "logs", "projector_config.pbtxt")
    os.remove(path)
    proc = _train(trained, faces, "--projector_only")
    assert os.path.exists(path)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["projector_config"] == path
    assert _metrics(trained)["step"] == 30  # nothing was trained


def test_resume_with_another_optimizer_is_refused(trained, faces):
    """The fixture trained with Adam: resuming with Adagrad must stop with a clear message."""
    proc = _train(trained, faces, "--max_steps=40", "--optimizer=adagrad", check=False)
    assert proc.returncode != 0
    assert "--optimizer=adam" in proc.stderr
    assert _metrics(trained)["step"] == 30  # nothing was trained or overwritten


def test_mirrored_strategy_on_two_cpu_devices(tmp_path, faces):
    model_dir = str(tmp_path / "mirrored")
    proc = _train(model_dir, faces, "--max_steps=4", "--steps_per_epoch=2", "--export=false",
                  "--distribution_strategy=mirrored", "--num_cpu_devices=2", check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    m = _metrics(model_dir)
    assert m["step"] == 4
    assert all(np.isfinite(h["train_loss"]) for h in m["history"])


def test_evaluate_reads_the_export_that_train_wrote(trained, faces, tmp_path):
    """evaluate.py on train.py's own SavedModel and on its checkpoint gives the same verification."""
    results = {}
    for source in (f"--export_dir={os.path.join(trained, 'export')}", f"--model_dir={trained}"):
        out_json = str(tmp_path / f"{len(results)}.json")
        proc = subprocess.run(
            [sys.executable, os.path.join(REPO, "evaluate.py"), source,
             f"--data_dir={faces['test_dir']}", "--pairs=all", "--noclustering",
             "--noidentification", f"--output_json={out_json}"],
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(out_json, encoding="utf-8") as f:
            results[source.split("=")[0]] = json.load(f)
    a, b = results["--export_dir"], results["--model_dir"]
    for key in ("accuracy_mean", "auc", "eer", "num_pairs", "num_failed_pairs", "val_at_far"):
        assert key in a, key
    assert a["num_pairs"] == 48 * 47 // 2  # every pair of the 8 x 6 hold-out images
    assert a["num_failed_pairs"] == 0
    assert a["auc"] == pytest.approx(b["auc"], abs=1e-4)


def test_margin_head_run_checkpoints_the_head_and_resumes(tmp_path, faces):
    """--loss=arcface: the head's class weights are checkpointed (not exported) and resume works."""
    model_dir = str(tmp_path / "arcface")
    _train(model_dir, faces, "--loss=arcface", "--head_scale=16", "--max_steps=4",
           "--steps_per_epoch=2", "--export=false")
    _train(model_dir, faces, "--loss=arcface", "--head_scale=16", "--max_steps=6",
           "--steps_per_epoch=2", "--export=false")
    m = _metrics(model_dir)
    assert m["step"] == 6 and m["loss"] == "arcface" and m["resumed_from"].endswith("ckpt-4")
    assert all(np.isfinite(h["train_loss"]) for h in m["history"])
    import tensorflow as tf

    names = [n for n, _ in tf.train.list_variables(os.path.join(model_dir, "checkpoints"))]
    kernels = [n for n in names if n.startswith("classifier/") and "kernel" in n]
    assert kernels, names
    shapes = dict(tf.train.list_variables(os.path.join(model_dir, "checkpoints")))
    assert shapes[kernels[0]] == [128, 16]  # D x identities of the training set


def test_real_recipe_is_the_default_with_a_data_dir(tmp_path, faces):
    """--data_dir with no --recipe: the real-faces recipe fills the flags not given, the images
    are decoded into memory, and each validation records minutes without validation time."""
    model_dir = str(tmp_path / "real")
    proc = _train(model_dir, faces, "--recipe=auto", "--max_steps=10", "--export=false",
                  "--projector_images=0")
    m = _metrics(model_dir)
    assert m["recipe"] == "real" and m["step"] == 10
    assert "recipe real --loss=triplet --mining=all" in proc.stderr
    assert "--model=" not in proc.stderr.split("recipe real", 1)[1].splitlines()[0]  # given: kept
    assert "into memory" in proc.stderr
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["optimizer"] == "adam"
    for h in m["history"]:
        assert np.isfinite(h["train_loss"]) and h["images_per_second"] > 0
        assert 0 < h["elapsed_seconds"] and h["train_seconds"] <= h["elapsed_seconds"]
    elapsed = [h["elapsed_seconds"] for h in m["history"]]
    assert elapsed == sorted(elapsed)
