"""The model zoo: shapes, unit norm, paper budgets, multiply-add counting, saving, training steps."""
import numpy as np
import pytest

import models
import keras
import tensorflow as tf

# Small input sizes that keep every test fast; budgets are checked at the paper's sizes below.
SMALL_SIZES = {"nn1": (64, 64), "nn2": (64, 64), "nn3": (64, 48), "nn4": (64, 64),
               "nns1": (64, 64), "nns2": (70, 58), "tiny": (32, 32)}

# (params target, relative tolerance), (madds target, relative tolerance) at default sizes.
BUDGETS = {
    "nn1": ((140e6, 0.05), (1.6e9, 0.10)),
    "nn2": ((7.5e6, 0.05), (1.6e9, 0.10)),
    "nn3": ((7.5e6, 0.05), (1.6e9 * (160 / 224) ** 2, 0.10)),
    "nn4": (None, (285e6, 0.15)),
    "nns1": ((26e6, 0.20), (220e6, 0.20)),
    "nns2": ((4.3e6, 0.20), (20e6, 0.20)),
    "tiny": (None, (40e6, 0.5)),  # "roughly 20-60M"
}


def _images(n, size, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n,) + tuple(size) + (3,)).astype(
        np.float32)


def test_public_api():
    assert models.MODEL_NAMES == ("nn1", "nn2", "nn3", "nn4", "nns1", "nns2", "tiny")
    assert {n: models.default_image_size(n) for n in models.MODEL_NAMES} == {
        "nn1": (220, 220), "nn2": (224, 224), "nn3": (160, 160), "nn4": (96, 96),
        "nns1": (165, 165), "nns2": (140, 116), "tiny": (64, 64)}
    assert set(models.PAPER_FIGURES) == set(models.MODEL_NAMES)
    for name, fig in models.PAPER_FIGURES.items():
        assert fig["input"] == models.default_image_size(name)
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("nn5")
    with pytest.raises(ValueError, match="normalization"):
        models.build_model("tiny", normalization="group")
    with pytest.raises(ValueError, match="image_size"):
        models.build_model("tiny", image_size=(0, 32))
    with pytest.raises(ValueError, match="embedding_size"):
        models.build_model("tiny", embedding_size=0)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_shapes_name_and_unit_norm(name):
    size = SMALL_SIZES[name]
    model = models.build_model(name, embedding_size=64, image_size=size)
    assert model.name == name
    assert tuple(model.input_shape) == (None,) + size + (3,)
    out = model(_images(3, size), training=False).numpy()
    assert out.shape == (3, 64) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model.layers)


def test_image_size_forms():
    assert models.build_model("tiny", image_size=40).input_shape == (None, 40, 40, 3)
    assert models.build_model("tiny", image_size="48x40").input_shape == (None, 48, 40, 3)
    assert models.build_model("nns2").input_shape == (None, 140, 116, 3)


@pytest.mark.parametrize("name", ["nn1", "nn2", "nn4", "nns2"])
def test_lrn_variant_uses_lrn_and_no_batch_norm(name):
    model = models.build_model(name, image_size=SMALL_SIZES[name], normalization="lrn")
    kinds = {type(layer).__name__ for layer in model.layers}
    assert "LocalResponseNormalization" in kinds and "BatchNormalization" not in kinds
    batch = models.build_model(name, image_size=SMALL_SIZES[name])
    kinds = {type(layer).__name__ for layer in batch.layers}
    assert "BatchNormalization" in kinds and "LocalResponseNormalization" not in kinds
    out = model(_images(2, SMALL_SIZES[name])).numpy()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_nn2_follows_table2():
    """Module output sizes and pooling kinds of Table 2 at 224x224."""
    model = models.build_model("nn2")
    expected = {"3a": (28, 256), "3b": (28, 320), "3c": (14, 640), "4a": (14, 640),
                "4b": (14, 640), "4c": (14, 640), "4d": (14, 640), "4e": (7, 1024),
                "5a": (7, 1024), "5b": (7, 1024)}
    for module, (grid, channels) in expected.items():
        shape = model.get_layer(f"inception_{module}_concat").output.shape
        assert tuple(shape[1:]) == (grid, grid, channels), module
    l2 = {"3b", "4a", "4b", "4c", "4d", "5a"}
    for module in expected:
        pool = model.get_layer(f"inception_{module}_pool")
        assert isinstance(pool, models.L2Pooling2D) == (module in l2), module
    for module in ("3c", "4e"):  # stride-2 modules: pool branch without projection
        names = {layer.name for layer in model.layers}
        assert f"inception_{module}_pool_proj" not in names
    nn4 = models.build_model("nn4")
    names = {layer.name for layer in nn4.layers}
    for module in ("4e", "5a", "5b"):
        assert f"inception_{module}_5x5" not in names
    assert f"inception_4d_5x5" in names


@pytest.mark.parametrize("name", [pytest.param("nn1", marks=pytest.mark.slow), "nn2", "nn3",
                                  "nn4", "nns1", "nns2", "tiny"])
def test_params_and_madds_budgets(name):
    model = models.build_model(name)
    params, madds = model.count_params(), models.count_madds(model)
    params_budget, madds_budget = BUDGETS[name]
    if params_budget:
        target, tol = params_budget
        assert abs(params - target) <= tol * target, (name, params)
    target, tol = madds_budget
    assert abs(madds - target) <= tol * target, (name, madds)


def test_count_madds_matches_hand_count():
    inputs = keras.Input((10, 8, 3))
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same")(inputs)       # 5x4x6, k=3x3x3
    x = keras.layers.DepthwiseConv2D(3, padding="valid")(x)                  # 3x2x6, k=3x3
    x = keras.layers.Conv2D(4, (1, 2), padding="valid", groups=2)(x)         # 3x1x4, k=1x2x3
    x = keras.layers.Flatten()(x)                                            # 12
    inner = keras.Sequential([keras.Input((12,)), keras.layers.Dense(5)])    # nested: 12x5
    x = inner(x)
    x = keras.layers.Dense(7)(x)                                             # 5x7
    model = keras.Model(inputs, x)
    hand = 5 * 4 * 6 * (3 * 3 * 3) + 3 * 2 * 6 * 9 + 3 * 1 * 4 * (1 * 2 * 3) + 12 * 5 + 5 * 7
    assert models.count_madds(model) == hand


def test_count_madds_scales_with_image_size():
    small = models.count_madds(models.build_model("nn3", image_size=80))
    large = models.count_madds(models.build_model("nn3", image_size=160))
    assert 3.0 < large / small < 4.5


def test_mixed_precision_output_is_float32_unit_norm():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = models.build_model("nn4", image_size=64)
        out = model(_images(2, (64, 64)), training=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("conv1").compute_dtype == "float16"
    assert out.dtype == tf.float32
    np.testing.assert_allclose(np.linalg.norm(out.numpy(), axis=1), 1.0, rtol=1e-5)


def _triplet_like_loss(labels, embeddings, margin=0.2):
    """Batch-all hinge on squared L2 distances (a simple stand-in for losses/)."""
    d = tf.reduce_sum(tf.square(embeddings[:, None] - embeddings[None]), -1)
    same = tf.cast(tf.equal(labels[:, None], labels[None]), tf.float32)
    pos = same - tf.eye(tf.shape(labels)[0])
    mask = pos[:, :, None] * (1.0 - same)[:, None, :]
    hinge = tf.nn.relu(d[:, :, None] - d[:, None, :] + margin) * mask
    return tf.reduce_sum(hinge) / tf.maximum(tf.reduce_sum(mask), 1.0)


def _train_step(model, optimizer, images, labels):
    with tf.GradientTape() as tape:
        loss = _triplet_like_loss(labels, model(images, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss, grads


# Every model: one Adagrad step (eager; tiny also as a tf.function), then a .keras round trip of the
# trained model (BN moving statistics have moved away from their initial values by then).
TRAIN_CASES = [(name, "batch") for name in models.MODEL_NAMES] + [("nn2", "lrn"), ("tiny", "lrn")]


@pytest.mark.slow
@pytest.mark.parametrize("name,normalization", TRAIN_CASES)
def test_train_step_then_keras_round_trip(name, normalization, tmp_path):
    size = SMALL_SIZES[name]
    if name == "nn1":
        size = (32, 32)  # fc1's input shrinks to 256; NN1 stays the heaviest file to write
    model = models.build_model(name, embedding_size=32, image_size=size,
                               normalization=normalization)
    optimizer = keras.optimizers.Adagrad(0.05)
    x = tf.constant(_images(4, size, seed=2))
    labels = tf.constant([0, 0, 1, 1])
    step = _train_step
    if name == "tiny":
        step = tf.function(_train_step)
    before = [v.numpy().copy() for v in model.trainable_variables]
    loss, grads = step(model, optimizer, x, labels)
    assert np.isfinite(loss.numpy())
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    changed = sum(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))
    assert changed > 0.9 * len(before)
    expected = model(x, training=False).numpy()
    assert np.all(np.isfinite(expected))
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, rtol=1e-5)
    if normalization == "batch":
        bn = next(layer for layer in model.layers
                  if isinstance(layer, keras.layers.BatchNormalization))
        assert np.any(bn.moving_mean.numpy() != 0)

    path = tmp_path / f"{name}.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.name == name
    np.testing.assert_array_equal(restored(x, training=False).numpy(), expected)
