"""train.py --compatible_with (harmonic embeddings, FaceNet's appendix): the old model is frozen
in the training graph, its weights never change, and the new export records the old identity."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO, subprocess_env

P, K = 4, 4


def _old_model(size=(40, 32), dim=16, seed=0):
    """An in-memory 'old' model: a small backbone wrapped as training.compatible.OldModel."""
    import keras

    from training.compatible import OldModel

    keras.utils.set_random_seed(seed)
    inp = keras.Input(size + (3,))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3)(inp))
    backbone = keras.Model(inp, keras.layers.UnitNormalization()(keras.layers.Dense(dim)(x)))
    backbone.trainable = False
    return OldModel("in-memory", "model_dir", size, dim, {"model": "test"},
                    lambda images: backbone(images, training=False)), backbone


def test_old_model_is_frozen_inside_the_training_model():
    import keras

    import models
    from training.compatible import FrozenEmbedding
    from training.objectives import build_train_model

    old, old_backbone = _old_model()
    new_backbone = models.build_model("tiny", image_size=(24, 24), embedding_size=16)
    layer = FrozenEmbedding(old.path, old=old)
    model, terms = build_train_model(new_backbone, (24, 24), "triplet", old_embedding=layer)
    assert type(terms["triplet"]).__name__ == "HarmonicTripletLossLayer"
    assert not any(w is v for w in model.trainable_weights for v in old_backbone.weights)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    before_old = [w.numpy().copy() for w in old_backbone.weights]
    before_new = [w.numpy().copy() for w in new_backbone.trainable_weights]
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(P), K).astype(np.int32)
    images = rng.normal(size=(P * K, 24, 24, 3)).astype(np.float32)
    model.fit({"images": np.concatenate([images, images[::-1]]),
               "labels": np.concatenate([labels, labels[::-1]])}, epochs=1, steps_per_epoch=2,
              verbose=0, batch_size=P * K, shuffle=False)  # two P x K steps
    for a, w in zip(before_old, old_backbone.weights):
        np.testing.assert_array_equal(a, w.numpy())  # the old model never changes
    assert any(not np.array_equal(a, w.numpy())
               for a, w in zip(before_new, new_backbone.trainable_weights))


def test_frozen_embedding_resizes_to_the_old_input_size():
    import tensorflow as tf

    from training.compatible import FrozenEmbedding

    old, backbone = _old_model(size=(40, 32))
    images = np.random.default_rng(1).normal(size=(3, 24, 24, 3)).astype(np.float32)
    got = FrozenEmbedding(old.path, old=old)(images).numpy()
    want = backbone(tf.image.resize(images, (40, 32)), training=False).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_only_the_triplet_loss_can_be_harmonic():
    import models
    from training.compatible import FrozenEmbedding
    from training.objectives import build_train_model

    old, _ = _old_model()
    backbone = models.build_model("tiny", image_size=(24, 24), embedding_size=16)
    with pytest.raises(ValueError, match="harmonic triplet loss"):
        build_train_model(backbone, (24, 24), "contrastive",
                          old_embedding=FrozenEmbedding(old.path, old=old))


# ---------------------------------------------------------------------------------------- CLI
TINY = ("--recipe=synthetic", "--model=tiny", "--identities_per_batch=4", "--images_per_identity=4",
        "--steps_per_epoch=2", "--max_steps=2", "--projector_images=0", "--embedding_size=16",
        "--val_fraction=0")


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    from data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("harmonic")
    return generate_dataset(str(root / "syn"), identities=12, images_per_identity=5, image_size=40,
                            seed=3, heldout_identities=4, workers=1, progress=False)


def _train(*flags):
    return subprocess.run([sys.executable, "train.py", *TINY, *flags], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)


def _digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


@pytest.mark.slow
def test_compatible_run_end_to_end(tmp_path, faces):
    """Old tiny at 32 px, then a new one at 24 px compatible with its export: it trains, the old
    files are untouched, the export (and a re-export by export.py) records the old identity; the
    old model also loads from its model_dir, and another embedding size is a one-line error."""
    old_dir = tmp_path / "old"
    proc = _train(f"--data_dir={faces['train_dir']}", "--image_size=32", f"--model_dir={old_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = _digest(old_dir / "export"), _digest(old_dir / "checkpoints")
    old_meta = json.loads((old_dir / "export" / "assets" / "facenet.json").read_text())

    new_dir = tmp_path / "new"
    proc = _train(f"--data_dir={faces['train_dir']}", "--image_size=24", f"--model_dir={new_dir}",
                  f"--compatible_with={old_dir / 'export'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (_digest(old_dir / "export"), _digest(old_dir / "checkpoints")) == before
    meta = json.loads((new_dir / "export" / "assets" / "facenet.json").read_text())
    compatible = meta["compatible_with"]
    assert compatible["path"] == str(old_dir / "export") and compatible["kind"] == "export"
    assert compatible["export_id"] == old_meta["export_id"]
    assert meta["embedding_space"] == old_meta["embedding_space"] != meta["export_id"]
    config = json.loads((new_dir / "config.json").read_text())
    assert config["compatible_with"] == str(old_dir / "export")
    # export.py re-exporting a checkpoint of the run keeps it compatible
    proc = subprocess.run([sys.executable, "export.py", f"--model_dir={new_dir}",
                           f"--export_dir={tmp_path / 're'}"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "re" / "assets" / "facenet.json").read_text())
    assert again["embedding_space"] == meta["embedding_space"]
    assert again["export_id"] != meta["export_id"]

    # in process (no more train.py start-ups): the model_dir form, and the size check
    import tensorflow as tf

    from exit_codes import CliError
    from training.compatible import FrozenEmbedding, load_old_model, old_identity

    old = load_old_model(tf, str(old_dir), 16)
    assert old.kind == "model_dir" and old.image_size == (32, 32)
    assert old_identity(old)["export_id"] == old_meta["export_id"]  # from model_dir/export
    images = np.random.default_rng(2).normal(size=(2, 24, 24, 3)).astype(np.float32)
    from_dir = FrozenEmbedding(str(old_dir), old=old)(images).numpy()
    from_export = FrozenEmbedding(str(old_dir / "export"))(images).numpy()  # loads it itself
    np.testing.assert_allclose(from_dir, from_export, atol=1e-4)  # the same old model
    with pytest.raises(CliError, match="same --embedding_size"):
        load_old_model(tf, str(old_dir / "export"), 8)
    # a damaged old export (truncated graph, truncated variables): one line, exit BAD_EXPORT
    import shutil

    from exit_codes import BAD_EXPORT

    for part in ("saved_model.pb", os.path.join("variables", "variables.data-00000-of-00001")):
        damaged = tmp_path / f"damaged_{os.path.basename(part)}"
        shutil.copytree(old_dir / "export", damaged)
        with open(damaged / part, "r+b") as f:
            f.truncate(100)
        with pytest.raises(CliError, match="cannot load the SavedModel") as info:
            load_old_model(tf, str(damaged), 16)
        assert info.value.exit_code == BAD_EXPORT
