"""Fault suite, issue #16: a damaged gallery cache (defect 6) and empty loss batches (defect 9).

* Gallery cache: a zero-byte, truncated or byte-flipped ``.npz`` is treated as absent: one warning
  line naming the file, then the cache is rebuilt (atomically) and read by the next run. Tested on
  the library with a fake model (fast) and once through ``faces.py identify`` (slow: a tiny
  SavedModel is exported here and faces.py starts TensorFlow).
* Losses: every batch loss of ``losses/`` returns 0 on B = 0, with a finite zero gradient, in eager
  mode, in a tf.function with a fixed batch size and in one with an unknown batch dimension; and the
  guard that makes this so leaves the values of non-empty batches unchanged.
"""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- gallery cache
class _MeanColourModel:
    """Stand-in for an export: the unit mean colour of each image quadrant, [N, 12]."""

    image_size = (16, 16)
    batch_size = 4
    threshold = 0.5

    def embed(self, images):
        x = np.asarray(images, np.float32) - 127.5
        q = [x[:, :8, :8], x[:, :8, 8:], x[:, 8:, :8], x[:, 8:, 8:]]
        e = np.concatenate([a.mean(axis=(1, 2)) for a in q], axis=1)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-6)

    def fingerprint(self):
        return "mean-colour"

    def describe(self):
        return {"export_dir": "/fake"}


def _gallery(root):
    """root/<person>/<photo>.png: two people, two noisy colour photos each (24 x 24 RGB)."""
    rng = np.random.default_rng(0)
    for person, rgb in (("red", (220, 40, 40)), ("blue", (40, 40, 220))):
        os.makedirs(os.path.join(root, person))
        for i in range(2):
            img = np.clip(np.array(rgb) + rng.normal(0, 6, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, person, f"{i}.png"))
    return str(root)


def _corrupt(path, how):
    data = open(path, "rb").read()
    if how == "zero_bytes":
        data = b""
    elif how == "truncated":
        data = data[:len(data) // 2]
    else:  # one byte flipped in the middle of the file
        data = bytearray(data)
        data[len(data) // 2] ^= 0xFF
        data = bytes(data)
    with open(path, "wb") as fh:
        fh.write(data)


def _cache_warnings(caplog, path):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and path in r.getMessage()]


@pytest.mark.parametrize("how", ["zero_bytes", "truncated", "flipped"])
def test_damaged_gallery_cache_warns_once_and_is_rebuilt(tmp_path, caplog, how):
    from photos.detection import FaceCropper
    from photos.gallery import load_gallery

    gal = _gallery(tmp_path / "gallery")
    os.makedirs(tmp_path / "cache")
    cache = str(tmp_path / "cache" / "gallery.npz")
    model, cropper = _MeanColourModel(), FaceCropper("none")
    first = load_gallery(gal, model, cropper, cache_path=cache, progress=False)
    _corrupt(cache, how)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rebuilt = load_gallery(gal, model, cropper, cache_path=cache, progress=False)
    warnings = _cache_warnings(caplog, cache)
    assert len(warnings) == 1 and "\n" not in warnings[0] and "rebuilding" in warnings[0]
    assert (rebuilt.stats["embedded"], rebuilt.stats["cached"]) == (4, 0)
    np.testing.assert_array_equal(rebuilt.embeddings, first.embeddings)
    assert rebuilt.files == first.files and rebuilt.cache_path == cache
    # Rewritten atomically (no temporary file left) and read by the next run without a warning.
    assert os.listdir(tmp_path / "cache") == ["gallery.npz"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = load_gallery(gal, model, cropper, cache_path=cache, progress=False)
    assert _cache_warnings(caplog, cache) == []
    assert (again.stats["embedded"], again.stats["cached"]) == (0, 4)
    np.testing.assert_array_equal(again.embeddings, first.embeddings)


def test_every_single_byte_flip_is_read_correctly_or_reported(tmp_path):
    """Whatever byte is damaged, the cache reader returns the right entries or a warning: never an
    exception and never wrong embeddings (the NPZ members carry CRC-32s)."""
    from photos.detection import FaceCropper
    from photos.gallery import _load_cache, _settings_key, load_gallery

    gal = _gallery(tmp_path / "gallery")
    cache = str(tmp_path / "gallery.npz")
    model, cropper = _MeanColourModel(), FaceCropper("none")
    load_gallery(gal, model, cropper, cache_path=cache, progress=False)
    settings = _settings_key(model, cropper)
    good, warning = _load_cache(cache, settings)
    assert warning is None and len(good) == 4
    original = open(cache, "rb").read()
    damaged = tmp_path / "damaged.npz"
    reported = 0
    for i in range(0, len(original), 3):  # every third byte: all the zip and npy structures
        data = bytearray(original)
        data[i] ^= 0xFF
        damaged.write_bytes(bytes(data))
        entries, warning = _load_cache(str(damaged), settings)
        if warning is not None:
            assert entries == {} and str(damaged) in warning and "\n" not in warning
            reported += 1
            continue
        assert sorted(entries) == sorted(good)
        for rel, entry in entries.items():
            np.testing.assert_array_equal(entry["embedding"], good[rel]["embedding"])
    assert reported > len(original) // 6


@pytest.mark.slow
def test_faces_identify_rebuilds_a_damaged_cache_end_to_end(tmp_path):
    """faces.py identify, zero-byte --gallery_cache: exit 0, one warning line, cache rebuilt."""
    import keras

    from training.export import export_saved_model

    backbone = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D(),
                                 keras.layers.Dense(4), keras.layers.UnitNormalization()])
    export = export_saved_model(backbone, str(tmp_path / "export"), (16, 16), {"model": "test"},
                                threshold=1.0)
    gal = _gallery(tmp_path / "gallery")
    cache = tmp_path / "gallery.npz"
    cache.write_bytes(b"")
    probe = os.path.join(gal, "red", "0.png")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO,
               FACENET_CACHE=str(tmp_path / "facenet_cache"))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "faces.py"), "identify", f"--gallery={gal}", probe,
         f"--export_dir={export}", "--detector=none", f"--gallery_cache={cache}", "--json",
         "--noprogress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if str(cache) in line]
    assert len(lines) == 1 and "unreadable" in lines[0], proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["gallery"]["embedded"] == 4 and report["gallery"]["cache"] == str(cache)
    with np.load(cache) as z:
        assert z["embeddings"].shape == (4, 4)


# ----------------------------------------------------------------------------- empty batches
D = 4


def _losses():
    """name -> make(): a fn(labels [B], embeddings [B, D]) -> float32 scalar, for every batch loss
    of losses/. make() creates the Keras objects (which own variables) outside any tf.function."""
    import keras
    import tensorflow as tf

    import losses as L
    from losses import margin_heads as heads

    def keras_loss(cls, **kwargs):
        def make():
            loss = cls(**kwargs)
            return lambda y, x: loss(y, x)
        return make

    def head_loss(cls):
        def make():
            head = cls(3)
            xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            # Keras returns an empty [0] tensor, not a scalar, for an empty batch: sum it.
            return lambda y, x: tf.reduce_sum(xent(y, head([x, y])))
        return make

    def layer_loss():
        layer = L.TripletLossLayer()

        def fn(y, x):
            layer([x, y])
            return layer.losses[-1]
        return fn

    def plain(fn, **kwargs):
        return lambda: (lambda y, x: fn(y, x, **kwargs))

    return {
        **{f"triplet_{m}": plain(L.triplet_loss, mining=m) for m in L.STRATEGIES},
        "triplet_semi_hard_paper_seeded": plain(L.triplet_loss, mining="semi_hard_paper", seed=3),
        "triplet_hard_soft": plain(L.triplet_loss, mining="hard", soft=True),
        "triplet_cosine": plain(L.triplet_loss, distance="cosine"),
        "TripletLoss": keras_loss(L.TripletLoss),
        "TripletLossLayer": layer_loss,
        "tfa_semihard": plain(L.triplet_semihard_loss),
        "tfa_hard": plain(L.triplet_hard_loss),
        "tfa_hard_soft": plain(L.triplet_hard_loss, soft=True),
        "TripletSemiHardLoss": keras_loss(L.TripletSemiHardLoss),
        "TripletHardLoss": keras_loss(L.TripletHardLoss),
        "contrastive": plain(L.contrastive_loss),
        "ContrastiveLoss": keras_loss(L.ContrastiveLoss),
        "lifted": plain(L.lifted_structured_loss),
        "trihard": plain(L.trihard_loss),
        "TriHardLoss": keras_loss(L.TriHardLoss),
        "distance_weighted_margin": plain(L.distance_weighted_loss, seed=1),
        "distance_weighted_triplet": plain(L.distance_weighted_loss, loss="triplet"),
        "DistanceWeightedLoss": keras_loss(L.DistanceWeightedLoss, seed=2),
        "center": plain(heads.center_loss, centers=tf.zeros([3, D])),
        "arcface_head": head_loss(L.ArcFaceHead),
        "cosface_head": head_loss(L.CosFaceHead),
        "sphereface_head": head_loss(L.SphereFaceHead),
        "softmax_center_head": head_loss(L.SoftmaxCenterHead),
    }


LOSS_NAMES = sorted(["triplet_semi_hard", "triplet_semi_hard_paper", "triplet_hard",
                     "triplet_all", "triplet_semi_hard_paper_seeded", "triplet_hard_soft",
                     "triplet_cosine", "TripletLoss", "TripletLossLayer", "tfa_semihard",
                     "tfa_hard", "tfa_hard_soft", "TripletSemiHardLoss", "TripletHardLoss",
                     "contrastive", "ContrastiveLoss", "lifted", "trihard", "TriHardLoss",
                     "distance_weighted_margin", "distance_weighted_triplet",
                     "DistanceWeightedLoss", "center", "arcface_head", "cosface_head",
                     "sphereface_head", "softmax_center_head"])


def _loss_and_gradient(fn, mode):
    """A step (labels [B], inputs [B, 3]) -> (loss, dloss/dW) of fn on embeddings = inputs @ W
    ([B, D], unit rows), run eagerly ('eager'), in a tf.function ('graph') or in one whose
    input_signature has an unknown batch dimension ('unknown_b')."""
    import tensorflow as tf

    weights = tf.Variable(tf.random.stateless_normal([3, D], [1, 2]))

    def step(labels, inputs):
        with tf.GradientTape() as tape:
            emb = tf.math.l2_normalize(tf.matmul(inputs, weights), axis=1)
            loss = fn(labels, emb)
        return loss, tape.gradient(loss, weights)

    if mode == "graph":
        step = tf.function(step)
    elif mode == "unknown_b":
        step = tf.function(step, input_signature=[tf.TensorSpec([None], tf.int32),
                                                  tf.TensorSpec([None, 3], tf.float32)])
    return step


def test_every_batch_loss_is_listed():
    assert sorted(_losses()) == LOSS_NAMES


# A fixed B = 0 takes the same Python branch in a tf.function as in eager mode: "graph" runs for
# the pure functions only, not for their Keras wrappers and variants (saves ~20 s of tracing).
PURE = ("triplet_semi_hard", "triplet_semi_hard_paper", "triplet_hard", "triplet_all",
        "tfa_semihard", "tfa_hard", "contrastive", "lifted", "trihard", "distance_weighted_margin",
        "distance_weighted_triplet", "center")
CASES = [(name, mode) for name in LOSS_NAMES for mode in ("eager", "graph", "unknown_b")
         if mode != "graph" or name in PURE]


@pytest.mark.parametrize("name,mode", CASES)
def test_empty_batch_gives_zero_loss_and_zero_gradient(name, mode):
    import tensorflow as tf

    step = _loss_and_gradient(_losses()[name](), mode)
    loss, grad = step(tf.zeros([0], tf.int32), tf.zeros([0, 3], tf.float32))
    assert float(loss) == 0.0
    assert grad is not None and grad.shape == (3, D)
    assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("mining", ["semi_hard", "semi_hard_paper", "hard", "all"])
def test_empty_batch_statistics_are_zero(mining):
    import tensorflow as tf

    from losses import STAT_KEYS, triplet_loss_with_stats

    def fn(labels, embeddings):
        return triplet_loss_with_stats(labels, embeddings, mining=mining)

    unknown_b = tf.function(fn, input_signature=[tf.TensorSpec([None], tf.int32),
                                                 tf.TensorSpec([None, D], tf.float32)])
    for call in (fn, unknown_b):
        loss, stats = call(tf.zeros([0], tf.int32), tf.zeros([0, D]))
        assert float(loss) == 0.0 and sorted(stats) == sorted(STAT_KEYS)
        assert {k: float(v) for k, v in stats.items()} == {k: 0.0 for k in STAT_KEYS}


@pytest.mark.parametrize("name", ["triplet_semi_hard", "triplet_semi_hard_paper_seeded",
                                  "triplet_hard", "triplet_all", "tfa_semihard", "tfa_hard",
                                  "distance_weighted_margin"])
def test_unknown_batch_size_leaves_nonempty_batches_unchanged(name):
    """The run-time branch (tf.cond) computes exactly what the eager call does on a real batch."""
    import tensorflow as tf

    labels = tf.constant(np.repeat(np.arange(4), 3), tf.int32)
    inputs = tf.random.stateless_normal([12, 3], [3, 4])
    fn = _losses()[name]()
    eager_loss, eager_grad = _loss_and_gradient(fn, "eager")(labels, inputs)
    loss, grad = _loss_and_gradient(fn, "unknown_b")(labels, inputs)
    assert float(eager_loss) > 0.0
    np.testing.assert_allclose(float(loss), float(eager_loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(eager_grad), rtol=1e-4, atol=1e-6)
