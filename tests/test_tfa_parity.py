"""Parity of the tfa drop-ins (and of our own semi-hard / hard losses) with tensorflow_addons 0.23.

The golden file ($FACENET_TFA_ORACLE, see ../shared/README.md) holds tfa's loss and gradient for
60 embeddings of 6 identities: semihard / hard / hard_soft x L2 / squared-L2 x margins 0.2 / 1.0 x
random / clustered embeddings.
"""
import functools
import itertools

import numpy as np
import pytest
import tensorflow as tf

import keras
import losses

SETS = ("random", "clustered")
METRICS = {"l2": "L2", "sql2": "squared-L2"}
OUR_DISTANCE = {"l2": "l2", "sql2": "squared_l2"}
CASES = ([(s, "semihard", m, g) for s, m, g in itertools.product(SETS, METRICS, ("m0.2", "m1.0"))]
         + [(s, "hard", m, g) for s, m, g in itertools.product(SETS, METRICS, ("m0.2", "m1.0"))]
         + [(s, "hard_soft", m, None) for s, m in itertools.product(SETS, METRICS)])
REL_TOL = 1e-5


@functools.lru_cache(maxsize=1)
def _load_oracle(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture
def oracle(tfa_oracle_path):
    return _load_oracle(tfa_oracle_path)


def _key(emb_set, kind, metric, margin):
    return "/".join(p for p in (emb_set, kind, metric, margin) if p)


def _tfa_dropin(kind, metric, margin):
    margin_value = float(margin[1:]) if margin else 1.0
    if kind == "semihard":
        return losses.TripletSemiHardLoss(margin=margin_value, distance_metric=METRICS[metric])
    return losses.TripletHardLoss(margin=margin_value, soft=kind == "hard_soft",
                                  distance_metric=METRICS[metric])


def _value_and_grad(fn, labels, emb):
    emb = tf.constant(emb)
    with tf.GradientTape() as tape:
        tape.watch(emb)
        loss = fn(labels, emb)
    return float(loss), tape.gradient(loss, emb).numpy()


def _assert_close(loss, grad, oracle, key):
    ref_loss, ref_grad = float(oracle["loss/" + key]), oracle["grad/" + key]
    assert abs(loss - ref_loss) <= REL_TOL * abs(ref_loss), (key, loss, ref_loss)
    err = np.max(np.abs(grad - ref_grad)) / np.max(np.abs(ref_grad))
    assert err <= REL_TOL, (key, err)


@pytest.mark.shared
@pytest.mark.parametrize("case", CASES, ids=lambda c: _key(*c))
def test_dropin_matches_tfa(oracle, case):
    emb_set, kind, metric, margin = case
    loss_obj = _tfa_dropin(kind, metric, margin)
    loss, grad = _value_and_grad(loss_obj, oracle["labels"], oracle["emb_" + emb_set])
    _assert_close(loss, grad, oracle, _key(*case))


@pytest.mark.shared
@pytest.mark.slow
def test_dropin_matches_tfa_in_graph_mode(oracle):
    """All cases through tf.function; margin is a tensor so each (kind, metric) traces once."""
    traced = {}
    for case in CASES:
        emb_set, kind, metric, margin = case
        if (kind, metric) not in traced:
            if kind == "semihard":
                body = functools.partial(losses.triplet_semihard_loss,
                                         distance_metric=METRICS[metric])
            else:
                body = functools.partial(losses.triplet_hard_loss, soft=kind == "hard_soft",
                                         distance_metric=METRICS[metric])
            traced[(kind, metric)] = tf.function(
                lambda y, e, m, body=body: body(y, e, margin=m))
        m = tf.constant(float(margin[1:]) if margin else 1.0)
        fn = traced[(kind, metric)]
        loss, grad = _value_and_grad(lambda y, e: fn(y, e, m), oracle["labels"],
                                     oracle["emb_" + emb_set])
        _assert_close(loss, grad, oracle, _key(*case))


@pytest.mark.shared
@pytest.mark.parametrize("case", CASES, ids=lambda c: _key(*c))
def test_our_loss_matches_tfa_where_definitions_agree(oracle, case):
    """Every anchor of the oracle batch has positives and negatives, so our semi_hard / hard
    mining with the same distance and margin give tfa's numbers."""
    emb_set, kind, metric, margin = case
    mining = "semi_hard" if kind == "semihard" else "hard"
    loss_obj = losses.TripletLoss(margin=float(margin[1:]) if margin else 0.0, mining=mining,
                                  distance=OUR_DISTANCE[metric], soft=kind == "hard_soft")
    loss, grad = _value_and_grad(loss_obj, oracle["labels"], oracle["emb_" + emb_set])
    _assert_close(loss, grad, oracle, _key(*case))


# ------------------------------------------------------------- tfa rules without the oracle
def _np_dist(x, metric):
    sq = np.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1)
    if metric == "L2":
        return np.sqrt(sq)
    if metric == "squared-L2":
        return sq
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.maximum(1 - xn @ xn.T, 0.0)


def _np_tfa_semihard(labels, x, margin, metric):
    d = _np_dist(x.astype(np.float64), metric)
    total, pairs = 0.0, 0
    for a in range(len(labels)):
        negs = [n for n in range(len(labels)) if labels[n] != labels[a]]
        for p in range(len(labels)):
            if p == a or labels[p] != labels[a]:
                continue
            pairs += 1
            farther = [d[a, n] for n in negs if d[a, n] > d[a, p]]
            dan = min(farther) if farther else (max(d[a, n] for n in negs) if negs else 0.0)
            total += max(d[a, p] - dan + margin, 0.0)
    return total / pairs


def _np_tfa_hard(labels, x, margin, soft, metric):
    d = _np_dist(x.astype(np.float64), metric)
    out = []
    for a in range(len(labels)):
        pos = [d[a, p] for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        neg = [d[a, n] for n in range(len(labels)) if labels[n] != labels[a]]
        dap = max(pos) if pos else 0.0
        dan = min(neg) if neg else max(d[a])
        out.append(np.log1p(np.exp(dap - dan)) if soft else max(dap - dan + margin, 0.0))
    return float(np.mean(out))


@pytest.mark.parametrize("metric", ["L2", "squared-L2", "angular"])
def test_dropin_rules_on_uneven_batch_with_anchor_without_positive(metric):
    rng = np.random.default_rng(3)
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3], np.int32)  # identity 2: no positive
    x = rng.normal(size=(10, 5)).astype(np.float32)
    got = float(losses.TripletSemiHardLoss(0.5, metric)(labels, x))
    assert got == pytest.approx(_np_tfa_semihard(labels, x, 0.5, metric), rel=1e-5)
    for soft in (False, True):
        got = float(losses.TripletHardLoss(0.5, soft, metric)(labels, x))
        assert got == pytest.approx(_np_tfa_hard(labels, x, 0.5, soft, metric), rel=1e-5)


def test_dropins_accept_callable_metric_and_return_zero_without_pairs():
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    semi = losses.TripletSemiHardLoss(distance_metric=lambda e: losses.pairwise_distances(e, "l2"))
    assert float(semi(labels, x)) == 0.0  # tfa returns NaN here (issues #1676, #2447)
    same = np.array([0, 0, 1, 1])
    assert float(semi(same, x)) == pytest.approx(
        float(losses.TripletSemiHardLoss()(same, x)), rel=1e-6)
    hard = losses.TripletHardLoss(margin=0.3, distance_metric="angular")
    assert np.isfinite(float(hard(labels, x)))


def test_dropin_defaults_and_serialisation():
    semi, hard = losses.TripletSemiHardLoss(), losses.TripletHardLoss()
    assert (semi.margin, semi.distance_metric) == (1.0, "L2")
    assert (hard.margin, hard.soft, hard.distance_metric) == (1.0, False, "L2")
    for obj in (semi, losses.TripletHardLoss(0.3, True, "squared-L2")):
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(obj))
        assert type(restored) is type(obj) and restored.get_config() == obj.get_config()
    with pytest.raises(ValueError):
        losses.TripletSemiHardLoss(distance_metric="cosine")
