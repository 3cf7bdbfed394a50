"""Classification heads and center loss (losses/margin_heads.py) against NumPy formulas.

The NumPy references work with the angle theta = arccos(cos) directly (the implementation never
forms it); ArcFace and SphereFace gradients are checked against float64 finite differences.
"""
import math

import numpy as np
import pytest
import tensorflow as tf

import keras
from losses import margin_heads as mh

MARGIN_HEADS = ("normface", "sphereface", "cosface", "arcface")


# ----------------------------------------------------------------------------- references
def np_cos(x, w):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    w = w / np.linalg.norm(w, axis=0, keepdims=True)
    return np.clip(x @ w, -1.0, 1.0)


def np_arcface_target(cos, m, easy):
    theta = np.arccos(cos)
    if easy:
        return np.where(cos > 0, np.cos(theta + m), cos)
    return np.where(theta < np.pi - m, np.cos(theta + m), cos - m * np.sin(m))


def np_sphereface_target(cos, m):
    theta = np.arccos(cos)
    k = np.minimum(np.floor(m * theta / np.pi), m - 1)
    return (-1.0) ** k * np.cos(m * theta) - 2.0 * k


def np_logits(name, x, w, labels, bias=None, **kw):
    """Logits [B, C] in float64 by the papers' formulas, margin on the label column only."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    if name in ("softmax", "softmax_center"):
        return x @ w + (0.0 if bias is None else bias)
    cos = np_cos(x, w)
    out = cos.copy()
    rows = np.arange(len(labels))
    t = cos[rows, labels]
    if name == "cosface":
        out[rows, labels] = t - kw.get("margin", 0.35)
    elif name == "arcface":
        out[rows, labels] = np_arcface_target(t, kw.get("margin", 0.5),
                                              kw.get("easy_margin", False))
    elif name == "sphereface":
        lam = kw.get("lambda_blend", 0.0)
        out[rows, labels] = (lam * t + np_sphereface_target(t, kw.get("margin", 4))) / (1 + lam)
    default_scale = 64.0 if name in ("cosface", "arcface") else 30.0
    return kw.get("scale", default_scale) * out


def batch(seed=0, b=9, d=6, c=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.concatenate([np.arange(c), rng.integers(0, c, size=b - c)]).astype(np.int32)
    w = rng.normal(size=(d, c)) * 0.5
    return x.astype(np.float32), labels, w.astype(np.float32)


def built_head(name, w, **kw):
    head = mh.make_head(name, w.shape[1], **kw)
    head.build([(None, w.shape[0]), (None,)])
    head.kernel.assign(w)
    return head


def at_angles(w, labels, thetas, seed=0):
    """Unit embeddings at angle thetas[i] from the column of class labels[i]."""
    rng = np.random.default_rng(seed)
    wn = (w / np.linalg.norm(w, axis=0)).T[labels].astype(np.float64)
    u = rng.normal(size=wn.shape)
    u -= np.sum(u * wn, axis=1, keepdims=True) * wn
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return np.cos(thetas)[:, None] * wn + np.sin(thetas)[:, None] * u


# ----------------------------------------------------------------------------- values
def test_cosine_logits_match_numpy_for_unnormalised_inputs():
    x, _, w = batch(1)
    got = mh.cosine_logits(3.0 * x, w)
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), np_cos(x.astype(np.float64), w), atol=1e-6)


HEAD_CASES = [
    ("softmax", {}), ("softmax", dict(use_bias=False)), ("softmax_center", {}),
    ("normface", {}), ("normface", dict(scale=16.0)),
    ("cosface", {}), ("cosface", dict(scale=30.0, margin=0.2)),
    ("arcface", {}), ("arcface", dict(margin=0.3, easy_margin=True)),
    ("arcface", dict(margin=1.2, scale=10.0)),
    ("sphereface", {}), ("sphereface", dict(margin=1)), ("sphereface", dict(margin=2)),
    ("sphereface", dict(margin=3, lambda_blend=5.0)),
]


@pytest.mark.parametrize("name, kw", HEAD_CASES)
def test_head_logits_match_numpy(name, kw):
    x, labels, w = batch(2)
    # Spread the target angles over [0, pi] so every branch (k, threshold, easy margin) is hit.
    thetas = np.linspace(0.1, 3.1, len(labels))
    x = at_angles(w, labels, thetas).astype(np.float32)
    head = built_head(name, w, **kw)
    bias = None
    if getattr(head, "bias", None) is not None:
        bias = np.linspace(-1, 1, w.shape[1]).astype(np.float32)
        head.bias.assign(bias)
    logits = head([x, labels])
    assert logits.dtype == tf.float32 and logits.shape == (len(labels), w.shape[1])
    expected = np_logits(name, x, w, labels, bias=bias, **kw)
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_sphereface_target_matches_numpy_and_is_monotonic(m):
    theta = np.concatenate([np.linspace(0.0, np.pi, 2001), np.arange(m + 1) * np.pi / m])
    theta = np.sort(np.clip(theta, 0.0, np.pi))
    cos = np.cos(theta)
    got = mh.sphereface_target(tf.constant(cos), m).numpy()
    np.testing.assert_allclose(got, np_sphereface_target(cos, m), atol=1e-9)
    assert np.all(np.diff(got) <= 1e-12)  # psi decreases with theta
    np.testing.assert_allclose(got[[0, -1]], [1.0, 1.0 - 2.0 * m], atol=1e-12)


@pytest.mark.parametrize("margin", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("easy", [False, True])
def test_arcface_target_matches_numpy_and_is_monotonic(margin, easy):
    theta = np.linspace(0.0, np.pi, 4001)
    cos = np.cos(theta)
    got = mh.arcface_target(tf.constant(cos), margin, easy).numpy()
    # Away from cos = +-1 (where the sqrt floor eps acts) the identity is exact.
    inner = np.abs(cos) < 1 - 1e-6
    np.testing.assert_allclose(got[inner], np_arcface_target(cos, margin, easy)[inner], atol=1e-9)
    if easy:
        # Easy margin is monotonic on each side of pi/2 only: it jumps up from -sin(m) to 0 there.
        left, right = cos > 0.0, cos <= 0.0
        assert np.all(np.diff(got[left]) <= 1e-12) and np.all(np.diff(got[right]) <= 1e-12)
        assert got[right][0] > got[left][-1]
    else:
        # The threshold fallback sits below cos(theta + m) at the switch: the jump goes down, so
        # the target logit never increases with theta.
        assert np.all(np.diff(got) <= 1e-12)
        assert got[-1] == pytest.approx(-1.0 - margin * math.sin(margin), abs=1e-9)


def test_cosface_and_normface_ignore_no_columns_but_the_target():
    x, labels, w = batch(3)
    norm = mh.normface_logits(x, w, 10.0).numpy()
    cosf = mh.cosface_logits(labels, x, w, 10.0, 0.4).numpy()
    diff = norm - cosf
    onehot = np.eye(w.shape[1])[labels]
    np.testing.assert_allclose(diff, 4.0 * onehot, atol=1e-5)


# ----------------------------------------------------------------------------- gradients
def _fd_check(fn, x, w):
    theoretical, numerical = tf.test.compute_gradient(fn, [x, w], delta=1e-6)
    for t, n in zip(theoretical, numerical):
        assert np.all(np.isfinite(t))
        np.testing.assert_allclose(t, n, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, kw", [
    ("arcface", {}), ("arcface", dict(easy_margin=True)), ("arcface", dict(margin=1.0)),
    ("sphereface", {}), ("sphereface", dict(margin=3, lambda_blend=2.0)), ("cosface", {}),
])
def test_gradients_match_finite_differences_in_float64(name, kw):
    _, labels, w = batch(4, b=7, d=5, c=4)
    # Angles chosen inside every piece of psi (joints at multiples of pi/4, pi/3) and on both sides
    # of ArcFace's thresholds (pi/2 for easy margin, pi - m otherwise), away from the joints.
    thetas = np.array([0.3, 0.9, 1.3, 1.9, 2.2, 2.8, 3.0])
    x = at_angles(w.astype(np.float64), labels, thetas) * 1.3  # off the unit sphere too
    weights = np.random.default_rng(0).normal(size=(len(labels), w.shape[1]))
    fn = {"arcface": mh.arcface_logits, "sphereface": mh.sphereface_logits,
          "cosface": mh.cosface_logits}[name]

    def scalar(xx, ww):  # a generic scalar of all logits, so every entry's gradient counts
        logits = fn(labels, xx, ww, **kw)
        assert logits.dtype == tf.float64
        return tf.reduce_sum(logits * weights)[None]

    _fd_check(scalar, tf.constant(x), tf.constant(w.astype(np.float64)))


# ----------------------------------------------------------------------------- numerics
def _ce_and_grads(head, x, labels):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = head([x, labels], training=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        loss = loss + tf.add_n(head.losses) if head.losses else loss
    gx, gw = tape.gradient(loss, [x, head.kernel])
    return loss, logits, gx, gw


@pytest.mark.parametrize("name", mh.HEADS)
def test_cos_theta_of_plus_minus_one_is_finite(name):
    _, labels, w = batch(5, b=4, d=6, c=4)
    wn = (w / np.linalg.norm(w, axis=0)).T
    x = np.stack([wn[labels[0]], -wn[labels[1]], wn[labels[2]], -wn[labels[3]]])
    head = built_head(name, w)
    loss, logits, gx, gw = _ce_and_grads(head, x.astype(np.float32), labels)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(logits.numpy()))
    assert np.all(np.isfinite(gx.numpy())) and np.all(np.isfinite(gw.numpy()))


@pytest.mark.parametrize("target", ["arcface", "arcface_easy", "sphereface", "sphereface_m3"])
def test_target_gradient_is_finite_at_exactly_plus_minus_one(target):
    cos = tf.constant([1.0, -1.0, 0.9999999, -0.9999999], tf.float32)
    fn = {"arcface": lambda c: mh.arcface_target(c, 0.5),
          "arcface_easy": lambda c: mh.arcface_target(c, 0.5, easy_margin=True),
          "sphereface": lambda c: mh.sphereface_target(c, 4),
          "sphereface_m3": lambda c: mh.sphereface_target(c, 3)}[target]
    with tf.GradientTape() as tape:
        tape.watch(cos)
        value = fn(cos)
        total = tf.reduce_sum(value)
    grad = tape.gradient(total, cos).numpy()
    assert np.all(np.isfinite(value.numpy())) and np.all(np.isfinite(grad))
    if target == "arcface":
        np.testing.assert_allclose(value.numpy()[:2], [math.cos(0.5), -1 - 0.5 * math.sin(0.5)],
                                   atol=2e-4)
    if target == "sphereface":
        np.testing.assert_allclose(value.numpy()[:2], [1.0, -7.0], atol=1e-5)


@pytest.mark.parametrize("name", mh.HEADS)
@pytest.mark.parametrize("case", ["duplicates", "single_class", "zero_embedding"])
def test_degenerate_batches_are_finite(name, case):
    x, labels, w = batch(6)
    if case == "duplicates":
        x[1] = x[0]
        x[2] = x[0]
        labels[2] = labels[0]
    elif case == "single_class":
        labels[:] = 3
    else:
        x[0] = 0.0
    head = built_head(name, w)
    loss, logits, gx, gw = _ce_and_grads(head, x, labels)
    for value in (loss, logits, gx, gw):
        assert np.all(np.isfinite(value.numpy())), (name, case)


@pytest.mark.parametrize("name", mh.HEADS)
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_embeddings_give_float32_logits(name, dtype):
    x, labels, w = batch(7)
    low = tf.cast(x, dtype)
    head = built_head(name, w)
    logits = head([low, labels])
    assert logits.dtype == tf.float32 and head.compute_dtype == "float32"
    np.testing.assert_allclose(logits.numpy(), head([tf.cast(low, tf.float32), labels]).numpy(),
                               rtol=1e-6, atol=1e-6)
    # The pure functions also lift low precision to float32.
    assert mh.arcface_logits(labels, low, w).dtype == tf.float32
    assert mh.softmax_logits(low, tf.cast(w, dtype)).dtype == tf.float32


def test_mixed_precision_backbone_feeds_a_float32_head():
    inputs = keras.Input((4,))
    emb = keras.layers.Dense(6, dtype="mixed_float16")(inputs)
    assert emb.dtype == "float16"
    logits = mh.ArcFaceHead(5)([emb, keras.Input((), dtype="int32")])
    assert logits.dtype == "float32"


# ----------------------------------------------------------------------------- center loss
def test_center_loss_and_update_match_numpy():
    x, labels, _ = batch(8, b=10, d=4, c=5)
    centers = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    got = mh.center_loss(labels, x, centers)
    expected = np.mean([0.5 * np.sum((x[i] - centers[labels[i]]) ** 2) for i in range(len(x))])
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    new = mh.center_update(labels, x, centers, alpha=0.3).numpy()
    ref = centers.astype(np.float64).copy()
    for j in range(5):
        members = [i for i in range(len(x)) if labels[i] == j]
        delta = sum(centers[j] - x[i] for i in members) / (1.0 + len(members))
        ref[j] = centers[j] - 0.3 * delta
    np.testing.assert_allclose(new, ref, rtol=1e-6, atol=1e-7)
    absent = mh.center_update(np.zeros(3, np.int32), x[:3], centers, 0.5).numpy()
    np.testing.assert_array_equal(absent[1:], centers[1:])  # classes not in the batch stay


def test_center_loss_gradient_flows_to_embeddings_only():
    x, labels, _ = batch(9, b=6, d=4, c=3)
    centers = tf.Variable(np.ones((3, 4), np.float32))
    xt = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        loss = mh.center_loss(labels, xt, centers)
    np.testing.assert_allclose(tape.gradient(loss, xt).numpy(), (x - 1.0) / len(x), rtol=1e-6)
    assert tape.gradient(loss, centers) is None


@pytest.mark.parametrize("layer_cls", [mh.CenterLoss, mh.SoftmaxCenterHead])
def test_center_layers_add_weighted_loss_and_update_only_in_training(layer_cls):
    x, labels, w = batch(10, b=8, d=4, c=3)
    if layer_cls is mh.CenterLoss:
        layer = mh.CenterLoss(3, alpha=0.5, weight=0.1)
    else:
        layer = mh.SoftmaxCenterHead(3, center_weight=0.1, center_alpha=0.5)
    out = layer([x, labels], training=False)
    centers0 = layer.centers.numpy().copy()
    np.testing.assert_array_equal(centers0, 0.0)
    assert layer.centers.trainable is False and len(layer.trainable_weights) in (0, 2)
    np.testing.assert_allclose(float(layer.losses[0]),
                               0.1 * float(mh.center_loss(labels, x, centers0)), rtol=1e-6)
    if layer_cls is mh.CenterLoss:
        np.testing.assert_array_equal(out.numpy(), x)
    else:
        assert out.shape == (8, 3)
    layer([x, labels], training=True)
    np.testing.assert_allclose(layer.centers.numpy(),
                               mh.center_update(labels, x, centers0, 0.5).numpy(), rtol=1e-6)
    assert float(layer.losses[0]) == pytest.approx(0.1 * float(mh.center_loss(labels, x, centers0)))


def test_softmax_center_fit_loss_is_cross_entropy_plus_weighted_center():
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(4), 6).astype(np.int32)
    x = (rng.normal(size=(4, 8))[labels] + 0.5 * rng.normal(size=(24, 8))).astype(np.float32)
    emb_in, label_in = keras.Input((8,)), keras.Input((), dtype="int32")
    emb = keras.layers.UnitNormalization()(keras.layers.Dense(6)(emb_in))
    head = mh.SoftmaxCenterHead(4, center_weight=0.5, name="head")
    model = keras.Model([emb_in, label_in], head([emb, label_in]))
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit([x, labels], labels, batch_size=24, epochs=5, shuffle=False, verbose=0)
    assert np.all(np.isfinite(history.history["loss"])) and "center_loss" in history.history
    assert np.any(head.centers.numpy() != 0.0)  # centers moved during fit
    logs = model.evaluate([x, labels], labels, batch_size=24, verbose=0, return_dict=True)
    emb_model = keras.Model(emb_in, emb)
    e = emb_model(x)
    logits = mh.softmax_logits(e, head.kernel, head.bias)
    ce = float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)))
    center = float(mh.center_loss(labels, e, head.centers))
    assert logs["loss"] == pytest.approx(ce + 0.5 * center, rel=1e-5)


# ----------------------------------------------------------------------------- Keras
@pytest.mark.parametrize("name, kw", HEAD_CASES)
def test_get_config_round_trip(name, kw):
    x, labels, w = batch(11)
    head = built_head(name, w, kernel_initializer="he_normal", **kw)
    config = head.get_config()
    restored = type(head).from_config(config)
    assert restored.get_config() == config
    restored.build([(None, w.shape[0]), (None,)])
    restored.set_weights(head.get_weights())
    np.testing.assert_array_equal(restored([x, labels]).numpy(), head([x, labels]).numpy())
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(head))
    assert type(again) is type(head) and again.get_config() == config


def test_model_with_heads_saves_and_loads(tmp_path):
    x, labels, w = batch(12)
    emb_in, label_in = keras.Input((6,)), keras.Input((), dtype="int32")
    emb = mh.CenterLoss(5, alpha=0.4, weight=0.01, name="center")([emb_in, label_in])
    logits = mh.ArcFaceHead(5, margin=0.4, easy_margin=True, name="arc")([emb, label_in])
    model = keras.Model([emb_in, label_in], logits)
    model.get_layer("center").centers.assign(np.full((5, 6), 0.25, np.float32))
    path = tmp_path / "heads.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    for layer in ("center", "arc"):
        assert restored.get_layer(layer).get_config() == model.get_layer(layer).get_config()
    np.testing.assert_array_equal(restored.get_layer("center").centers.numpy(), 0.25)
    np.testing.assert_allclose(restored([x, labels]).numpy(), model([x, labels]).numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize("name", mh.HEADS)
def test_graph_mode_matches_eager(name):
    x, labels, w = batch(13)
    head = built_head(name, w)

    def run(xx, yy):
        with tf.GradientTape() as tape:
            tape.watch(xx)
            logits = head([xx, yy])
            total = tf.reduce_sum(tf.nn.log_softmax(logits)[:, 0])
        return logits, tape.gradient(total, xx)

    eager = run(tf.constant(x), tf.constant(labels))
    graph = tf.function(run)(tf.constant(x), tf.constant(labels))
    for e, g in zip(eager, graph):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", mh.HEADS)
def test_every_head_trains_with_fit(name):
    rng = np.random.default_rng(1)
    labels = np.tile(np.arange(4), 8).astype(np.int32)
    x = (rng.normal(size=(4, 8))[labels] + 0.7 * rng.normal(size=(32, 8))).astype(np.float32)
    emb_in, label_in = keras.Input((8,)), keras.Input((), dtype="int32")
    emb = keras.layers.UnitNormalization()(keras.layers.Dense(6)(emb_in))
    kw = {} if name in ("softmax", "softmax_center") else dict(scale=8.0)
    logits = mh.make_head(name, 4, **kw)([emb, label_in])
    model = keras.Model([emb_in, label_in], logits)
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit([x, labels], labels, batch_size=16, epochs=6, shuffle=False, verbose=0)
    loss = history.history["loss"]
    assert np.all(np.isfinite(loss)) and loss[-1] < loss[0], loss


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="Unknown head"):
        mh.make_head("adacos", 3)
    with pytest.raises(ValueError, match="integer"):
        mh.SphereFaceHead(3, margin=1.5)
    with pytest.raises(ValueError, match="integer"):
        mh.sphereface_target(tf.constant([0.5]), 0)
    with pytest.raises(ValueError, match="margin"):
        mh.ArcFaceHead(3, margin=4.0)
    with pytest.raises(ValueError, match="num_classes"):
        mh.NormFaceHead(0)
