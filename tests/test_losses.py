"""The triplet loss, its statistics, numerics and its Keras Loss / Layer wrappers."""
import numpy as np
import pytest
import tensorflow as tf

import keras
import losses
from tests.helpers import brute_force, random_batch

STRATEGIES = ("semi_hard", "semi_hard_paper", "hard", "all")


def _loss_and_grad(labels, emb, fn=None, **kw):
    emb = tf.convert_to_tensor(emb)
    with tf.GradientTape() as tape:
        tape.watch(emb)
        loss, stats = (fn or losses.triplet_loss_with_stats)(labels, emb, **kw)
    return loss, stats, tape.gradient(loss, emb)


def _check_against_brute_force(emb, labels, margin, strategy, distance, soft, loss, stats):
    dist = losses.pairwise_distances(emb, distance).numpy()
    choice = None
    if strategy == "semi_hard_paper":
        choice = losses.mine_semi_hard_paper(dist, labels, margin, seed=3).negative_index.numpy()
    ref_loss, ref_stats, _ = brute_force(dist, labels, margin, strategy, soft, choice)
    assert loss.dtype == tf.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-4, atol=1e-6)
    assert set(stats) == set(losses.STAT_KEYS)
    for key in losses.STAT_KEYS:
        assert stats[key].dtype == tf.float32 and stats[key].shape == ()
        np.testing.assert_allclose(float(stats[key]), ref_stats[key], rtol=1e-4, atol=1e-6,
                                   err_msg=key)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("distance", losses.DISTANCES)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_stats_match_brute_force(strategy, distance, seed):
    emb, labels = random_batch(seed, clustered=seed == 0)
    margin = 0.2 if distance != "l2" else 0.5
    loss, stats = losses.triplet_loss_with_stats(labels, emb, margin=margin, distance=distance,
                                                 mining=strategy, seed=3)
    _check_against_brute_force(emb, labels, margin, strategy, distance, False, loss, stats)
    assert float(loss) > 0.0  # these batches always have active triplets


@pytest.mark.parametrize("strategy", ["semi_hard", "hard", "semi_hard_paper"])
def test_soft_loss_matches_brute_force(strategy):
    emb, labels = random_batch(2)
    loss, stats = losses.triplet_loss_with_stats(labels, emb, mining=strategy, soft=True, seed=3)
    _check_against_brute_force(emb, labels, 0.2, strategy, "squared_l2", True, loss, stats)


def test_soft_with_batch_all_is_rejected():
    with pytest.raises(ValueError, match="soft"):
        losses.triplet_loss([0, 0, 1], np.eye(3, dtype=np.float32), mining="all", soft=True)
    with pytest.raises(ValueError, match="mining"):
        losses.triplet_loss([0, 0, 1], np.eye(3, dtype=np.float32), mining="hardest")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_graph_mode_matches_eager_with_gradients(strategy):
    emb, labels = random_batch(4)
    kw = dict(mining=strategy, seed=5)
    eager = _loss_and_grad(labels, emb, **kw)
    graph = tf.function(lambda l, e: _loss_and_grad(l, e, **kw))(labels, emb)
    np.testing.assert_allclose(float(graph[0]), float(eager[0]), rtol=1e-6)
    np.testing.assert_allclose(graph[2].numpy(), eager[2].numpy(), rtol=1e-5, atol=1e-7)
    for key in losses.STAT_KEYS:
        np.testing.assert_allclose(float(graph[1][key]), float(eager[1][key]), rtol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradient_matches_finite_differences(strategy):
    emb, labels = random_batch(6, sizes=(3, 2, 4), dim=4)
    emb = emb.astype(np.float64)
    kw = dict(mining=strategy, seed=1)
    _, _, grad = _loss_and_grad(labels, emb.astype(np.float32), **kw)
    eps = 1e-3
    for i, j in [(0, 0), (3, 2), (8, 1)]:
        plus, minus = emb.copy(), emb.copy()
        plus[i, j] += eps
        minus[i, j] -= eps
        fd = (float(losses.triplet_loss(labels, plus.astype(np.float32), **kw))
              - float(losses.triplet_loss(labels, minus.astype(np.float32), **kw))) / (2 * eps)
        np.testing.assert_allclose(grad[i, j], fd, atol=2e-3)


def test_semi_hard_with_l2_equals_tfa_semihard_rule():
    emb, labels = random_batch(8)
    ours = losses.triplet_loss(labels, emb, margin=1.0, distance="l2", mining="semi_hard")
    tfa_like = losses.triplet_semihard_loss(labels, emb, margin=1.0, distance_metric="L2")
    np.testing.assert_allclose(float(ours), float(tfa_like), rtol=1e-6)


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("distance", losses.DISTANCES)
def test_duplicate_embeddings_give_finite_loss_and_gradient(strategy, distance):
    emb, labels = random_batch(0, sizes=(3, 3, 2), dim=4)
    emb[1] = emb[0]  # duplicate within an identity
    emb[3] = emb[0]  # duplicate across identities
    for batch in (emb, np.ones_like(emb)):  # and every embedding equal
        loss, stats, grad = _loss_and_grad(labels, batch, mining=strategy, distance=distance)
        assert np.isfinite(float(loss)) and np.all(np.isfinite(grad.numpy()))
        assert all(np.isfinite(float(v)) for v in stats.values())
    # All embeddings equal: every triplet has loss exactly the margin.
    loss, _, _ = _loss_and_grad(labels, np.ones_like(emb), mining=strategy, distance=distance)
    np.testing.assert_allclose(float(loss), 0.2, rtol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4], [7, 7, 7, 7], [3]],
                         ids=["no_positive_pair", "single_identity", "single_image"])
def test_batches_without_triplets_give_zero_not_nan(strategy, labels):
    emb = np.random.default_rng(0).normal(size=(len(labels), 6)).astype(np.float32)
    loss, stats, grad = _loss_and_grad(np.array(labels, np.int32), emb, mining=strategy)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(grad.numpy(), 0.0)
    n = len(labels)
    assert float(stats["num_pairs"]) == (n * (n - 1) if len(set(labels)) == 1 else 0)
    assert all(np.isfinite(float(v)) for v in stats.values())


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_low_precision_embeddings_are_computed_in_float32(dtype, strategy):
    emb, labels = random_batch(1)
    low = tf.cast(emb, dtype)
    loss, stats, grad = _loss_and_grad(labels, low, mining=strategy, seed=2)
    ref = losses.triplet_loss(labels, tf.cast(low, tf.float32), mining=strategy, seed=2)
    assert loss.dtype == tf.float32 and grad.dtype == dtype
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    assert np.all(np.isfinite(tf.cast(grad, tf.float32).numpy()))


def test_labels_may_be_column_vectors_or_floats():
    emb, labels = random_batch(3)
    ref = float(losses.triplet_loss(labels, emb))
    assert float(losses.triplet_loss(labels[:, None], emb)) == pytest.approx(ref, rel=1e-6)
    assert float(losses.triplet_loss(labels.astype(np.float32), emb)) == pytest.approx(ref, rel=1e-6)


# ----------------------------------------------------------------------------- Keras
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_keras_loss_equals_function_and_round_trips(strategy):
    emb, labels = random_batch(5)
    loss_obj = losses.TripletLoss(margin=0.3, mining=strategy, distance="cosine", seed=4)
    expected = losses.triplet_loss(labels, emb, margin=0.3, mining=strategy, distance="cosine",
                                   seed=4)
    assert float(loss_obj(labels, emb)) == float(expected)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss_obj))
    assert isinstance(restored, losses.TripletLoss)
    assert restored.get_config() == loss_obj.get_config()
    assert float(restored(labels, emb)) == float(expected)


def _embedding_model(dim_in=12, dim_out=8):
    inputs = keras.Input((dim_in,))
    x = keras.layers.Dense(dim_out)(inputs)
    return inputs, keras.layers.UnitNormalization()(x)


def _toy_data(n=96, dim=12, classes=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(classes), n // classes).astype(np.int32)
    x = rng.normal(size=(classes, dim))[labels] + 0.8 * rng.normal(size=(n, dim))
    return x.astype(np.float32), labels


@pytest.mark.slow
def test_keras_loss_trains_with_compile_fit():
    x, labels = _toy_data()
    inputs, outputs = _embedding_model()
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=losses.TripletLoss())
    before = float(losses.triplet_loss(labels, model(x)))
    history = model.fit(x, labels, batch_size=48, epochs=4, shuffle=False, verbose=0)
    after = float(losses.triplet_loss(labels, model(x)))
    assert all(np.isfinite(history.history["loss"]))
    assert after < before


@pytest.mark.slow
def test_layer_fit_reports_stats_and_round_trips(tmp_path):
    x, labels = _toy_data()
    inputs, emb = _embedding_model()
    label_in = keras.Input((), dtype="int32")
    out = losses.TripletLossLayer(margin=0.2, mining="semi_hard", name="triplet")([emb, label_in])
    model = keras.Model([inputs, label_in], out)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    history = model.fit([x, labels], None, batch_size=48, epochs=2, shuffle=False, verbose=0)
    for key in ("loss",) + losses.STAT_KEYS:
        assert key in history.history, history.history.keys()
        assert np.all(np.isfinite(history.history[key]))
    # 8 classes x 6 per batch of 48: 8 * 6 * 5 = 240 positive pairs.
    assert history.history["num_pairs"][-1] == pytest.approx(240.0)
    assert 0.0 <= history.history["active_fraction"][-1] <= 1.0

    # The layer adds the same loss as the function.
    emb_model = keras.Model(inputs, emb)
    expected = float(losses.triplet_loss(labels[:48], emb_model(x[:48])))
    logs = model.evaluate([x[:48], labels[:48]], None, batch_size=48, verbose=0,
                          return_dict=True)
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)

    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    layer = restored.get_layer("triplet")
    assert isinstance(layer, losses.TripletLossLayer)
    assert layer.get_config() == model.get_layer("triplet").get_config()
    np.testing.assert_allclose(restored.predict([x, labels], verbose=0),
                               model.predict([x, labels], verbose=0), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loss_and_gradient_compile_with_xla(strategy):
    """Keras jit-compiles train steps on GPUs: every strategy and the tfa drop-ins must compile."""
    emb, labels = random_batch(7)
    fns = [lambda l, e: losses.triplet_loss(l, e, mining=strategy, seed=3)]
    if strategy == "semi_hard":
        fns.append(losses.triplet_semihard_loss)
    if strategy == "hard":
        fns.append(losses.triplet_hard_loss)
    for fn in fns:
        step = lambda l, e, fn=fn: _loss_and_grad(l, e, fn=lambda l, e, **kw: (fn(l, e), {}))
        loss, _, grad = tf.function(step, jit_compile=True)(labels, emb)
        assert np.isfinite(float(loss)) and np.all(np.isfinite(grad.numpy()))
        if strategy != "semi_hard_paper":  # XLA draws other random numbers
            ref_loss, _, ref_grad = step(labels, emb)
            np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
            np.testing.assert_allclose(grad.numpy(), ref_grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("wrap", ["loss", "layer"])
def test_seeded_paper_window_draws_afresh_each_call_and_repeats_from_the_seed(wrap):
    """TripletLoss / TripletLossLayer with an int seed: a new draw per batch, same sequence per seed."""
    emb, labels = random_batch(2, sizes=(12, 10, 11), dim=3, clustered=False)

    def run(seed):
        if wrap == "loss":
            loss = losses.TripletLoss(mining="semi_hard_paper", margin=2.0, seed=seed)
            return [float(loss(y_true=labels, y_pred=emb)) for _ in range(6)]
        layer = losses.TripletLossLayer(mining="semi_hard_paper", margin=2.0, seed=seed)
        values = []
        for _ in range(6):
            layer([tf.constant(emb), tf.constant(labels)])
            values.append(float(layer.losses[-1]))  # losses of the last call only
        return values

    first, again = run(7), run(7)
    np.testing.assert_allclose(first, again, rtol=1e-6)
    assert len(set(np.round(first, 6))) > 1, first   # successive calls draw different negatives
    assert not np.allclose(first, run(8))
