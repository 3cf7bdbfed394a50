"""The harmonic triplet loss (FaceNet appendix, Section 7): new and old embeddings in one set."""
import numpy as np
import pytest
import tensorflow as tf

import keras
import losses
from tests.helpers import brute_force, random_batch, semi_hard_choice

STRATEGIES = ("semi_hard", "semi_hard_paper", "hard", "all")
GRAPH = pytest.mark.slow  # graph mode: tf.function traces take seconds on a busy CPU
MODES = ("eager", pytest.param("graph", marks=GRAPH))
MARGIN = 0.2


def _old_like(new, seed, noise=0.6):
    """An "old model's" unit embeddings of the same images: the new ones, perturbed."""
    rng = np.random.default_rng(seed + 100)
    old = new + noise * rng.normal(size=new.shape)
    return (old / np.linalg.norm(old, axis=1, keepdims=True)).astype(np.float32)


def _batch(seed=0, sizes=(5, 1, 3, 7, 2, 4), dim=8):
    new, labels = random_batch(seed, sizes=sizes, dim=dim)
    return labels, new, _old_like(new, seed)


def _loss_and_grads(labels, new, old, mode="eager", fn=None, **kw):
    """(loss, stats, d loss / d new, d loss / d old with unconnected = zeros, old connected?)."""
    fn = fn or losses.harmonic_triplet_loss_with_stats

    def step(labels, new, old):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([new, old])
            loss, stats = fn(labels, new, old, **kw)
        grad_old = tape.gradient(loss, old)
        zero_old = tape.gradient(loss, old, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return loss, stats, tape.gradient(loss, new), zero_old, grad_old is not None

    if mode == "graph":
        step = tf.function(step)
    return step(tf.convert_to_tensor(labels), tf.convert_to_tensor(new), tf.convert_to_tensor(old))


def _paper_choice(dist, labels, seed):
    return losses.mine_semi_hard_paper(dist, labels, MARGIN, seed=seed).negative_index.numpy()


# ----------------------------------------------------------------------------- references
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_brute_force_over_the_mixed_set(strategy, mode):
    labels, new, old = _batch(0)
    loss, stats, _, _, _ = _loss_and_grads(labels, new, old, mode, mining=strategy, seed=3)
    mixed, mixed_labels = np.concatenate([new, old]), np.concatenate([labels, labels])
    dist = losses.pairwise_distances(mixed).numpy()
    choice = _paper_choice(dist, mixed_labels, 3) if strategy == "semi_hard_paper" else None
    ref_loss, ref_stats, _ = brute_force(dist, mixed_labels, MARGIN, strategy, False, choice)
    assert loss.dtype == tf.float32 and loss.shape == ()
    assert float(loss) > 0.0
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-4, atol=1e-6)
    assert set(stats) == set(losses.STAT_KEYS)
    for key in losses.STAT_KEYS:
        np.testing.assert_allclose(float(stats[key]), ref_stats[key], rtol=1e-4, atol=1e-6,
                                   err_msg=key)


@pytest.mark.parametrize("distance,mode", [pytest.param("squared_l2", "graph", marks=GRAPH),
                                           ("l2", "eager"), ("cosine", "eager")])
def test_soft_and_other_distances_match_brute_force(distance, mode):
    labels, new, old = _batch(1)
    margin = 0.5 if distance == "l2" else MARGIN
    for soft in (False, True):
        loss, stats, _, _, _ = _loss_and_grads(labels, new, old, mode, mining="hard",
                                               distance=distance, soft=soft, margin=margin)
        mixed_labels = np.concatenate([labels, labels])
        dist = losses.pairwise_distances(np.concatenate([new, old]), distance).numpy()
        ref_loss, ref_stats, _ = brute_force(dist, mixed_labels, margin, "hard", soft)
        np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(stats["mean_d_an"]), ref_stats["mean_d_an"], rtol=1e-4)


def _independent_semi_hard(labels, new, old, margin):
    """Semi-hard harmonic loss written from the paper, with no repository code: loops over every
    (anchor, positive) of the 2B embeddings, each tagged with its model, in float64."""
    points = [(e.astype(np.float64), int(y), model)
              for model, embs in (("new", new), ("old", old)) for e, y in zip(embs, labels)]
    d = lambda i, j: float(np.sum((points[i][0] - points[j][0]) ** 2))  # noqa: E731
    terms, kinds = [], set()
    for a in range(len(points)):
        negs = [n for n in range(len(points)) if points[n][1] != points[a][1]]
        for p in range(len(points)):
            if p == a or points[p][1] != points[a][1] or not negs:
                continue
            farther = [n for n in negs if d(a, n) > d(a, p)]
            n = min(farther, key=lambda j: d(a, j)) if farther else max(negs, key=lambda j: d(a, j))
            terms.append(max(d(a, p) - d(a, n) + margin, 0.0))
            kinds.add((points[a][2], points[p][2], points[n][2]))
    return float(np.mean(terms)), len(terms), kinds


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 2])
def test_semi_hard_matches_an_independent_loop(seed, mode):
    labels, new, old = _batch(seed)
    ref, num_triplets, kinds = _independent_semi_hard(labels, new, old, MARGIN)
    loss, stats, _, _, _ = _loss_and_grads(labels, new, old, mode, mining="semi_hard")
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4, atol=1e-6)
    # Every identity with >= 2 images gives k(k-1) pairs per model pair: 4 B-sized blocks, plus
    # the (new i, old i) pairs of the same image, here all identities have a negative.
    sizes = np.bincount(labels)
    assert float(stats["num_pairs"]) == num_triplets == sum(2 * k * (2 * k - 1) for k in sizes)
    # Anchor, positive and negative come from either model: all 8 combinations are mined here.
    assert len(kinds) == 8, kinds


def test_semi_hard_choice_of_helpers_agrees_with_mixed_mining():
    """The mined semi-hard negative of each mixed pair is the helpers' explicit-loop choice."""
    labels, new, old = _batch(3)
    mixed_labels = np.concatenate([labels, labels])
    dist = losses.pairwise_distances(np.concatenate([new, old])).numpy()
    mined = losses.mine_semi_hard(dist, mixed_labels)
    index = mined.negative_index.numpy()
    b = len(labels)
    checked = 0
    for a in range(2 * b):
        negs = [n for n in range(2 * b) if mixed_labels[n] != mixed_labels[a]]
        for p in range(2 * b):
            if p != a and mixed_labels[p] == mixed_labels[a] and negs and (a < b) != (p < b):
                assert index[a, p] == semi_hard_choice(dist, a, p, negs)[0]
                checked += 1
    assert checked > 0


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_old_embeddings_get_no_gradient_and_new_ones_do(strategy, mode):
    labels, new, old = _batch(4)
    loss, _, grad_new, zero_old, old_connected = _loss_and_grads(
        labels, new, old, mode, mining=strategy, seed=1)
    assert not old_connected  # stop_gradient: the old model is frozen
    np.testing.assert_array_equal(zero_old.numpy(), 0.0)
    assert grad_new.shape == new.shape and np.all(np.isfinite(grad_new.numpy()))
    assert np.any(grad_new.numpy() != 0.0)

    # The gradient w.r.t. the new half is the plain triplet loss's on the mixed set.
    mixed = tf.constant(np.concatenate([new, old]))
    with tf.GradientTape() as tape:
        tape.watch(mixed)
        plain = losses.triplet_loss(np.concatenate([labels, labels]), mixed, mining=strategy,
                                    seed=1)
    np.testing.assert_allclose(float(loss), float(plain), rtol=1e-6)
    np.testing.assert_allclose(grad_new.numpy(), tape.gradient(plain, mixed).numpy()[:len(new)],
                               rtol=1e-5, atol=1e-7)


def test_gradient_matches_finite_differences():
    labels, new, old = _batch(6, sizes=(3, 2, 4), dim=4)
    kw = dict(mining="semi_hard")
    _, _, grad, _, _ = _loss_and_grads(labels, new, old, **kw)
    new64, eps = new.astype(np.float64), 1e-3
    for i, j in [(0, 0), (3, 2), (8, 1)]:
        plus, minus = new64.copy(), new64.copy()
        plus[i, j] += eps
        minus[i, j] -= eps
        fd = (float(losses.harmonic_triplet_loss(labels, plus.astype(np.float32), old, **kw))
              - float(losses.harmonic_triplet_loss(labels, minus.astype(np.float32), old, **kw))
              ) / (2 * eps)
        np.testing.assert_allclose(grad[i, j], fd, atol=2e-3)


# ----------------------------------------------------------------------------- same model
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_model_equals_plain_triplet_loss_on_the_duplicated_batch(strategy, mode):
    labels, emb, _ = _batch(5)
    loss, stats, _, _, _ = _loss_and_grads(labels, emb, emb, mode, mining=strategy, seed=2)
    ref, ref_stats = losses.triplet_loss_with_stats(
        np.concatenate([labels, labels]), np.concatenate([emb, emb]), mining=strategy, seed=2)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6, atol=1e-7)
    for key in losses.STAT_KEYS:
        np.testing.assert_allclose(float(stats[key]), float(ref_stats[key]), rtol=1e-6,
                                   atol=1e-7, err_msg=key)


# ----------------------------------------------------------------------------- inputs
def test_embedding_size_mismatch_is_a_clear_error():
    labels, new, _ = _batch(0)
    old = np.ones((len(labels), 6), np.float32)
    message = ("the old model's embeddings are 6-D, the new model's 8-D: --compatible_with "
               "needs the same --embedding_size")
    with pytest.raises(ValueError) as info:
        losses.harmonic_triplet_loss(labels, new, old)
    assert str(info.value) == message
    # Unknown while tracing: the check runs with the graph.
    fn = tf.function(losses.harmonic_triplet_loss, input_signature=[
        tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, None], tf.float32),
        tf.TensorSpec([None, None], tf.float32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="--compatible_with needs the same"):
        fn(labels, new, old)
    # And a functional model is rejected when it is built.
    inputs = [keras.Input((8,)), keras.Input((6,)), keras.Input((), dtype="int32")]
    with pytest.raises(ValueError, match="old model's embeddings are 6-D, the new model's 8-D"):
        losses.HarmonicTripletLossLayer()(inputs)


def test_batch_size_mismatch_and_bad_arguments_are_rejected():
    labels, new, old = _batch(0)
    with pytest.raises(ValueError, match="different batches"):
        losses.harmonic_triplet_loss(labels, new, old[:-1])
    with pytest.raises(ValueError, match="labels"):
        losses.harmonic_triplet_loss(labels[:-1], new, old)
    with pytest.raises(ValueError, match="soft"):
        losses.harmonic_triplet_loss(labels, new, old, mining="all", soft=True)
    with pytest.raises(ValueError, match="mining"):
        losses.harmonic_triplet_loss(labels, new, old, mining="hardest")


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_embeddings_are_computed_in_float32(dtype):
    labels, new, old = _batch(1)
    ref = losses.harmonic_triplet_loss(labels, tf.cast(tf.cast(new, dtype), tf.float32),
                                       tf.cast(tf.cast(old, dtype), tf.float32))
    for new_dtype, old_dtype in [(tf.float32, dtype), (dtype, tf.float32), (dtype, dtype)]:
        loss, _, grad, _, _ = _loss_and_grads(labels, tf.cast(tf.cast(new, dtype), new_dtype),
                                              tf.cast(tf.cast(old, dtype), old_dtype))
        assert loss.dtype == tf.float32 and grad.dtype == new_dtype
        np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_batch_gives_zero_with_zero_gradient(strategy):
    spec = [tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, 8], tf.float32),
            tf.TensorSpec([None, 8], tf.float32)]

    def step(labels, new, old):
        with tf.GradientTape() as tape:
            tape.watch(new)
            loss, stats = losses.harmonic_triplet_loss_with_stats(labels, new, old,
                                                                  mining=strategy, seed=1)
        return loss, stats, tape.gradient(loss, new)

    graph = tf.function(step, input_signature=spec)  # B known only at run time: one tf.cond
    empty = (tf.zeros([0], tf.int32), tf.zeros([0, 8]), tf.zeros([0, 8]))
    for fn in (step, graph):
        loss, stats, grad = fn(*empty)
        assert float(loss) == 0.0 and grad.shape == (0, 8)
        assert all(float(v) == 0.0 for v in stats.values())
    # A non-empty batch through the same graph gives the eager value.
    batch = [tf.constant(v) for v in _batch(2)]
    np.testing.assert_allclose(float(graph(*batch)[0]), float(step(*batch)[0]), rtol=1e-6)


# ----------------------------------------------------------------------------- Keras layer
def test_layer_config_round_trip_and_value():
    layer = losses.HarmonicTripletLossLayer(margin=0.3, distance="cosine", mining="hard",
                                            soft=True, seed=4, name="harmonic")
    config = layer.get_config()
    assert {k: config[k] for k in ("margin", "distance", "mining", "soft", "seed")} == dict(
        margin=0.3, distance="cosine", mining="hard", soft=True, seed=4)
    assert losses.HarmonicTripletLossLayer.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, losses.HarmonicTripletLossLayer)
    assert restored.get_config() == config

    labels, new, old = _batch(3)
    out = restored([tf.constant(new), tf.constant(old), tf.constant(labels)])
    np.testing.assert_array_equal(out.numpy(), new)
    expected = losses.harmonic_triplet_loss(labels, new, old, margin=0.3, distance="cosine",
                                            mining="hard", soft=True)
    np.testing.assert_allclose(float(restored.losses[-1]), float(expected), rtol=1e-6)
    assert [m.name for m in restored.stat_trackers] == list(losses.STAT_KEYS)


def test_layer_seeded_paper_window_repeats_from_the_seed():
    labels, new, old = _batch(2, sizes=(12, 10, 11), dim=3)

    def run(seed):
        layer = losses.HarmonicTripletLossLayer(mining="semi_hard_paper", margin=2.0, seed=seed)
        values = []
        for _ in range(4):
            layer([tf.constant(new), tf.constant(old), tf.constant(labels)])
            values.append(float(layer.losses[-1]))
        return values

    first = run(7)
    np.testing.assert_allclose(first, run(7), rtol=1e-6)
    assert len(set(np.round(first, 6))) > 1, first


@pytest.mark.slow
def test_layer_fit_trains_the_new_branch_only():
    rng = np.random.default_rng(0)
    classes, n, dim = 8, 96, 12
    labels = np.tile(np.arange(classes), n // classes).astype(np.int32)
    x = (rng.normal(size=(classes, dim))[labels] + 0.8 * rng.normal(size=(n, dim))).astype(
        np.float32)

    images, label_in = keras.Input((dim,)), keras.Input((), dtype="int32")
    new_dense, old_dense = keras.layers.Dense(8, name="new"), keras.layers.Dense(8, name="old")
    old_dense.trainable = False  # the old model is frozen
    new = keras.layers.UnitNormalization()(new_dense(images))
    old = keras.layers.UnitNormalization()(old_dense(images))
    out = losses.HarmonicTripletLossLayer(name="harmonic")([new, old, label_in])
    model = keras.Model([images, label_in], out)
    model.compile(optimizer=keras.optimizers.SGD(0.1))

    old_before = [w.numpy().copy() for w in old_dense.weights]
    new_before = [w.numpy().copy() for w in new_dense.weights]
    history = model.fit([x, labels], None, batch_size=48, epochs=1, shuffle=False, verbose=0)
    assert model.optimizer.iterations.numpy() == 2
    for key in ("loss",) + losses.STAT_KEYS:
        assert key in history.history and np.all(np.isfinite(history.history[key])), key
    # 8 identities x 6 images x 2 models per batch: 8 * 12 * 11 anchor-positive pairs.
    assert history.history["num_pairs"][-1] == pytest.approx(8 * 12 * 11)
    for before, weight in zip(old_before, old_dense.weights):
        np.testing.assert_array_equal(weight.numpy(), before)
    assert all(not np.array_equal(w.numpy(), b) for w, b in zip(new_dense.weights, new_before))

    # The loss it adds is the function's.
    new_model, old_model = keras.Model(images, new), keras.Model(images, old)
    expected = float(losses.harmonic_triplet_loss(labels[:48], new_model(x[:48]),
                                                  old_model(x[:48])))
    logs = model.evaluate([x[:48], labels[:48]], None, batch_size=48, verbose=0,
                          return_dict=True)
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)
