"""Custom layers of models/layers.py against brute-force NumPy references (eager and tf.function)."""
import numpy as np
import pytest

import models  # noqa: F401  (registers the layers, imports TF quietly)
import keras
import tensorflow as tf

from models.layers import L2Normalization, L2Pooling2D, LocalResponseNormalization, Maxout


def _same_start(size, pool, stride):
    out = -(-size // stride)
    pad_total = max((out - 1) * stride + pool - size, 0)
    return out, pad_total // 2


def l2_pool_reference(x, pool, stride, padding):
    """Explicit window loop: y[n,i,j,c] = sqrt(sum over valid cells of the window of x^2)."""
    n, h, w, c = x.shape
    if padding == "same":
        oh, top = _same_start(h, pool, stride)
        ow, left = _same_start(w, pool, stride)
    else:
        oh, ow, top, left = (h - pool) // stride + 1, (w - pool) // stride + 1, 0, 0
    y = np.zeros((n, oh, ow, c), np.float64)
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                for ch in range(c):
                    total = 0.0
                    for di in range(pool):
                        for dj in range(pool):
                            r, q = i * stride - top + di, j * stride - left + dj
                            if 0 <= r < h and 0 <= q < w:
                                total += float(x[b, r, q, ch]) ** 2
                    y[b, i, j, ch] = np.sqrt(total)
    return y


def l2_pool_grad_reference(x, weights, pool, stride, padding):
    """d/dx of sum(weights * y): each window adds weights * x / y to its valid cells (0 if y = 0)."""
    n, h, w, c = x.shape
    y = l2_pool_reference(x, pool, stride, padding)
    if padding == "same":
        _, top = _same_start(h, pool, stride)
        _, left = _same_start(w, pool, stride)
    else:
        top = left = 0
    g = np.zeros(x.shape, np.float64)
    for b in range(n):
        for i in range(y.shape[1]):
            for j in range(y.shape[2]):
                for ch in range(c):
                    if y[b, i, j, ch] == 0:
                        continue
                    for di in range(pool):
                        for dj in range(pool):
                            r, q = i * stride - top + di, j * stride - left + dj
                            if 0 <= r < h and 0 <= q < w:
                                g[b, r, q, ch] += weights[b, i, j, ch] * x[b, r, q, ch] / y[b, i, j, ch]
    return g


def _run(fn, mode, *args):
    if mode == "graph":
        fn = tf.function(fn)
    return fn(*args)


CASES = [(3, 1, "same"), (3, 2, "same"), (2, 2, "same"), (3, 2, "valid")]


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("pool,stride,padding", CASES)
def test_l2_pooling_matches_numpy_value_and_gradient(mode, pool, stride, padding):
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(2, 7, 6, 3)), 0).astype(np.float32)  # ReLU-like, many zeros
    x[0, :4, :4, :] = 0.0  # whole windows of zeros
    layer = L2Pooling2D(pool, strides=stride, padding=padding)
    y_ref = l2_pool_reference(x, pool, stride, padding)
    weights = rng.normal(size=y_ref.shape).astype(np.float32)

    def value_and_grad(inp):
        with tf.GradientTape() as tape:
            tape.watch(inp)
            out = layer(inp)
            loss = tf.reduce_sum(out * weights)
        return out, tape.gradient(loss, inp)

    y, g = _run(value_and_grad, mode, tf.constant(x))
    assert y.shape == y_ref.shape
    assert y.shape[1:3] == layer.compute_output_shape(x.shape)[1:3]
    np.testing.assert_allclose(y.numpy(), y_ref, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(g.numpy()))
    g_ref = l2_pool_grad_reference(x.astype(np.float64), weights, pool, stride, padding)
    np.testing.assert_allclose(g.numpy(), g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_l2_pooling_zero_input_has_finite_zero_gradient(mode):
    layer = L2Pooling2D(3, strides=1)

    def grad(inp):
        with tf.GradientTape() as tape:
            tape.watch(inp)
            loss = tf.reduce_sum(layer(inp))
        return tape.gradient(loss, inp)

    g = _run(grad, mode, tf.zeros([2, 5, 5, 4]))
    assert np.all(np.isfinite(g.numpy()))
    np.testing.assert_array_equal(g.numpy(), 0.0)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_l2_pooling_does_not_count_padding(mode):
    """On an all-ones image a 3x3 SAME window sums 4 cells at a corner, 6 on an edge, 9 inside."""
    layer = L2Pooling2D(3, strides=1, padding="same")
    y = _run(lambda t: layer(t), mode, tf.ones([1, 4, 5, 1])).numpy()[0, :, :, 0]
    assert y[0, 0] == pytest.approx(2.0)
    assert y[0, 2] == pytest.approx(np.sqrt(6.0))
    assert y[2, 2] == pytest.approx(3.0)
    assert y[3, 4] == pytest.approx(2.0)


def test_l2_pooling_unknown_spatial_size_in_graph():
    layer = L2Pooling2D(3, strides=2)
    fn = tf.function(lambda t: layer(t), input_signature=[tf.TensorSpec([None, None, None, 2])])
    x = np.random.default_rng(1).normal(size=(1, 9, 6, 2)).astype(np.float32)
    np.testing.assert_allclose(fn(tf.constant(x)).numpy(), l2_pool_reference(x, 3, 2, "same"),
                               rtol=1e-5, atol=1e-6)


def test_l2_pooling_float16_is_finite():
    layer = L2Pooling2D(3, strides=1, dtype="mixed_float16")
    # 100^2 * 9 overflows a float16 sum of squares; the layer sums in float32.
    x = tf.concat([tf.zeros([1, 4, 4, 2]), tf.fill([1, 4, 4, 2], 100.0)], axis=1)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32))
    g = tape.gradient(loss, x)
    assert y.dtype == tf.float16
    assert np.all(np.isfinite(y.numpy())) and np.all(np.isfinite(g.numpy()))
    assert float(tf.reduce_max(y)) == pytest.approx(300.0, rel=1e-3)


def test_l2_pooling_rejects_bad_padding():
    with pytest.raises(ValueError, match="padding"):
        L2Pooling2D(3, padding="full")


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_maxout_matches_numpy(mode):
    x = np.random.default_rng(2).normal(size=(3, 12)).astype(np.float32)
    y = _run(lambda t: Maxout(4)(t), mode, tf.constant(x)).numpy()
    ref = np.empty((3, 4), np.float32)
    for b in range(3):
        for u in range(4):
            ref[b, u] = max(x[b, u * 3 + k] for k in range(3))
    np.testing.assert_array_equal(y, ref)


def test_maxout_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="divisible"):
        Maxout(5)(tf.zeros([1, 12]))


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_l2_normalization_unit_rows_and_zero_row(mode):
    x = np.random.default_rng(3).normal(size=(4, 16)).astype(np.float32) * 7
    x[1] = 0.0
    y = _run(lambda t: L2Normalization()(t), mode, tf.constant(x)).numpy()
    norms = np.sqrt((y.astype(np.float64) ** 2).sum(1))
    np.testing.assert_allclose(norms[[0, 2, 3]], 1.0, rtol=1e-6)
    np.testing.assert_allclose(y[0], x[0] / np.linalg.norm(x[0]), rtol=1e-5)
    assert np.all(np.isfinite(y)) and np.all(y[1] == 0)


def test_l2_normalization_is_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = L2Normalization()
        y = layer(tf.constant(np.full((2, 8), 300.0, np.float16)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert layer.compute_dtype == "float32"
    assert y.dtype == tf.float32
    np.testing.assert_allclose(np.linalg.norm(y.numpy(), axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_lrn_matches_numpy(mode):
    x = np.random.default_rng(4).normal(size=(2, 3, 3, 12)).astype(np.float32) * 20
    layer = LocalResponseNormalization(depth_radius=2, bias=1.0, alpha=1e-3, beta=0.75)
    y = _run(lambda t: layer(t), mode, tf.constant(x)).numpy()
    ref = np.empty_like(x, dtype=np.float64)
    for idx in np.ndindex(x.shape[:3]):
        for c in range(12):
            s = sum(float(x[idx + (k,)]) ** 2 for k in range(max(0, c - 2), min(12, c + 3)))
            ref[idx + (c,)] = x[idx + (c,)] / (1.0 + 1e-3 * s) ** 0.75
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", [
    L2Pooling2D((3, 2), strides=(2, 1), padding="valid"), L2Normalization(axis=-1, epsilon=1e-6),
    Maxout(7), LocalResponseNormalization(3, 2.0, 1e-3, 0.5)])
def test_layer_config_round_trip(layer):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer)
    assert restored.get_config() == layer.get_config()
