"""Global mining under tf.distribute (issue 14, item 1; losses/global_batch.py).

In process (no strategy, eager and graph): `gather_global` is the identity, bad scopes raise,
layers and losses take and round-trip `mining_scope` (old configs without it load as "global"),
`build_train_model` passes it on, and a layer's losses behave as before.

Distributed: one subprocess (this file run as a script, about 60-110 s on 2 busy cores, so the
tests that read it are marked slow) splits the CPU into 2 logical devices, which must happen
before TensorFlow initialises its devices, and compares MirroredStrategy over the 2 devices, fed
the global P x K batch through `strategy.experimental_distribute_dataset` (replica r gets rows
[r B/2, (r+1) B/2): checked), with one device fed the whole batch, in graph mode (Keras `fit`):
  * one SGD step with mining_scope="global": the same total loss and the same updated weights
    (relative error <= 1e-5) for every --mining (semi_hard_paper with a seed), every pair loss
    (distance_weighted with a seed), the harmonic loss, ArcFace pre-training with the triplet
    term (two add_loss terms) and softmax_center, whose centers every replica moves with the
    global batch;
  * with mining_scope="replica" the weights and the loss differ (the global path is really taken);
  * `compile(loss=TripletLoss())`: same loss and weights ("global"), different ("replica");
  * direct calls inside `strategy.run`: the scaling rule of `losses.wrapper`, and random draws
    (seed None) that agree between the replicas.
To keep the run short, the members of one comparison are independent sub-models (own backbone,
own loss) of one Keras model: their weights are disjoint, so each member's update is its own
loss's, and a member's error shows in its own weights. The test backbone has no batch norm
(conv -> dense -> unit normalisation): per-replica BN moments would differ from the global
batch's whatever the loss does (synchronised BN is another option; not used here).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

P, K, SIZE, DIM = 4, 4, 16, 8
TOL = 1e-5
REPLICA_MIN_DIFF = 1e-3  # a per-replica step moves the weights at least this much differently


# ---------------------------------------------------------------------------------------------
# The distributed run (a subprocess: `python tests/test_global_mining.py`).
def _data():
    """The global P x K batch: images float32 [16, 16, 16, 3], labels int32 [16], shuffled so that
    each replica's half holds some identities with one image only."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(P), K)).astype(np.int32)
    images = rng.normal(size=(P * K, SIZE, SIZE, 3)).astype(np.float32)
    images += labels[:, None, None, None] * 0.3  # identities slightly apart
    return images, labels


def _backbone(keras, name, seed):
    """images [B, 16, 16, 3] -> unit embeddings float32 [B, 8]; no batch norm."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((SIZE, SIZE, 3)),
        keras.layers.Conv2D(4, 3, strides=2, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(DIM),
        keras.layers.UnitNormalization(),
    ], name=name)


def _member(keras, case, index, scope):
    """One member model {"images", "labels"} -> embeddings, built as train.py builds it."""
    from losses import TripletLossLayer
    from training.objectives import build_train_model

    kind, arg = case
    backbone = _backbone(keras, f"backbone_{index}", seed=10 + index)
    if kind == "paper":  # the layer with a seed: semi_hard_paper draws the same on both runs
        images = keras.Input((SIZE, SIZE, 3), name="images")
        labels = keras.Input((), dtype="int32", name="labels")
        out = TripletLossLayer(mining="semi_hard_paper", seed=7, mining_scope=scope)(
            [backbone(images), labels])
        return keras.Model({"images": images, "labels": labels}, out, name=f"member_{index}")
    kwargs = dict(mining_scope=scope, seed=3)
    loss = "triplet"
    if kind == "triplet":
        kwargs["mining"] = arg
    elif kind == "harmonic":
        old = _backbone(keras, f"old_{index}", seed=100 + index)
        old.trainable = False
        kwargs["old_embedding"] = old
    elif kind == "pretrain":  # margin head + EmbeddingLossTerm(TripletLoss), both switched on
        kwargs.update(pretrain_steps=1, pretrain_head=arg, num_classes=P)
    else:
        loss = arg
        kwargs["num_classes"] = P
    model, _ = build_train_model(backbone, (SIZE, SIZE), loss, **kwargs)
    return keras.Model(model.inputs, model.outputs, name=f"member_{index}")


def _combined(keras, cases, scope):
    """(model, members): one model whose outputs are the members' embeddings."""
    images = keras.Input((SIZE, SIZE, 3), name="images")
    labels = keras.Input((), dtype="int32", name="labels")
    members = [_member(keras, case, i, scope) for i, case in enumerate(cases)]
    outputs = [m({"images": images, "labels": labels}) for m in members]
    return keras.Model({"images": images, "labels": labels}, outputs), members


def _scope(strategy):
    return strategy.scope() if strategy is not None else _Null()


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _weights(members):
    return [[np.asarray(w) for w in m.trainable_weights] for m in members]


def _rel(a, b):
    """max |a - b| / max |b| over lists of arrays."""
    a = np.concatenate([x.ravel() for x in a])
    b = np.concatenate([x.ravel() for x in b])
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def _fit_members(tf, keras, strategy, cases, scope, inputs):
    """(loss, member weights before, after, centers after) of one SGD step of the combined
    model; the centers as [member][replica copy]."""
    with _scope(strategy):
        model, members = _combined(keras, cases, scope)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5))
    before = _weights(members)
    history = model.fit(tf.data.Dataset.from_tensors(inputs), epochs=1, verbose=0)
    centers = [[np.asarray(v) for v in getattr(w.value, "values", [w.value])]
               for m in members for w in m.weights if "centers" in w.path]
    return float(history.history["loss"][0]), before, _weights(members), centers


def _fit_compiled(tf, keras, strategy, outputs, images, labels):
    """(loss, per-output losses, per-output weights after) of one step of
    compile(loss=[TripletLoss(mining, mining_scope) for each output])."""
    from losses import TripletLoss

    with _scope(strategy):
        x = keras.Input((SIZE, SIZE, 3), name="images")
        members = [_backbone(keras, f"backbone_{i}", seed=10 + i) for i in range(len(outputs))]
        model = keras.Model(x, [m(x) for m in members])
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5),
                      loss=[TripletLoss(mining=m, mining_scope=s) for m, s in outputs])
    data = tf.data.Dataset.from_tensors((images, tuple(labels for _ in outputs)))
    history = model.fit(data, epochs=1, verbose=0).history
    per_output = [float(history[k][0]) for k in sorted(history) if k.endswith("_loss")]
    return float(history["loss"][0]), per_output, _weights(members)


def _replica_split(tf, strategy, labels):
    """True when experimental_distribute_dataset gives replica r rows [r B/2, (r+1) B/2)."""
    data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(labels))
    got = strategy.experimental_local_results(next(iter(data)))
    half = labels.size // 2
    return all(np.array_equal(np.asarray(g), labels[r * half:(r + 1) * half])
               for r, g in enumerate(got))


def _direct_calls(tf, strategy, labels):
    """Direct loss calls inside strategy.run, per replica, and their single-device values."""
    from losses import ContrastiveLoss, DistanceWeightedLoss, TripletLoss

    rng = np.random.default_rng(1)
    emb = rng.normal(size=(labels.size, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    with strategy.scope():
        contrastive, summed = ContrastiveLoss(), ContrastiveLoss(reduction="sum")
        paper = TripletLoss(mining="semi_hard_paper")  # seed None: one draw shared by replicas
        sampled = DistanceWeightedLoss()  # seed None

    def fn(e, y):
        b = tf.shape(y)[0]
        return {"plain": contrastive(y, e), "sum": summed(y, e),
                "weighted": contrastive(y, e, sample_weight=tf.ones([b])),
                "batch_loss": contrastive.batch_loss(y, e),
                "paper": paper.batch_loss(y, e), "sampled": sampled.batch_loss(y, e)}

    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors((emb, labels)))
    result = tf.function(lambda e, y: strategy.run(fn, args=(e, y)))(*next(iter(data)))
    out = {k: [float(x) for x in strategy.experimental_local_results(v)]
           for k, v in result.items()}
    out["single"] = float(contrastive(labels, emb))
    return out


MEMBERS = [("triplet", "semi_hard"), ("triplet", "hard"), ("triplet", "all"), ("paper", None),
           ("loss", "contrastive"), ("loss", "lifted"), ("loss", "trihard"),
           ("loss", "distance_weighted"), ("harmonic", None), ("pretrain", "arcface"),
           ("loss", "softmax_center")]
REPLICA_MEMBERS = [("triplet", "semi_hard")]
# compile(loss=...): one output per (mining, mining_scope)
COMPILED = [("semi_hard", "global"), ("semi_hard", "replica")]


def _name(case):
    return "pretrain_arcface" if case[0] == "pretrain" else case[1] or case[0]


def _distributed_main():
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(2)])
    # Grappler's rewrites of the large one-step graphs cost more time than the step: off.
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    import keras

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    images, labels = _data()
    inputs = {"images": images, "labels": labels}
    result = {"replicas": strategy.num_replicas_in_sync,
              "split": _replica_split(tf, strategy, labels),
              "direct": _direct_calls(tf, strategy, labels)}

    for scope, cases in (("global", MEMBERS), ("replica", REPLICA_MEMBERS)):
        single = _fit_members(tf, keras, None, cases, scope, inputs)
        dist = _fit_members(tf, keras, strategy, cases, scope, inputs)
        assert all(_rel(a, b) == 0 for a, b in zip(single[1], dist[1])), "initial weights differ"
        result[scope] = {
            "loss": [single[0], dist[0]],
            "weights_rel": {_name(c): _rel(wd, ws) for c, ws, wd in zip(cases, single[2], dist[2])},
            "centers_rel": [_rel([c], [s[0]]) for s, d in zip(single[3], dist[3]) for c in d]}

    single = _fit_compiled(tf, keras, None, COMPILED, images, labels)
    dist = _fit_compiled(tf, keras, strategy, COMPILED, images, labels)
    result["compiled"] = {"loss": [single[0], dist[0]], "per_output": [single[1], dist[1]],
                          "weights_rel": [_rel(wd, ws) for ws, wd in zip(single[2], dist[2])]}
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Distributed tests (one subprocess for all)
@pytest.fixture(scope="module")
def distributed():
    from tests.helpers import REPO, subprocess_env

    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=420)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def _close(a, b, tol=TOL):
    return abs(a - b) <= tol * max(abs(b), 1e-6)


@pytest.mark.slow
def test_two_replicas_and_contiguous_split(distributed):
    assert distributed["replicas"] == 2
    assert distributed["split"], "replica r must get rows [r B/2, (r+1) B/2) of the global batch"


@pytest.mark.slow
@pytest.mark.parametrize("name", [_name(c) for c in MEMBERS])
def test_global_step_equals_single_device(distributed, name):
    assert distributed["global"]["weights_rel"][name] <= TOL


@pytest.mark.slow
def test_global_step_loss_equals_single_device(distributed):
    """The total of the members' losses, as fit reports it (each replica sees its own terms)."""
    single, dist = distributed["global"]["loss"]
    assert _close(dist, single), (single, dist)


@pytest.mark.slow
def test_softmax_center_centers_update_equals_single_device(distributed):
    assert max(distributed["global"]["centers_rel"]) <= TOL


@pytest.mark.slow
def test_replica_scope_takes_the_per_replica_path(distributed):
    replica = distributed["replica"]
    assert all(rel > REPLICA_MIN_DIFF for rel in replica["weights_rel"].values()), replica
    assert not _close(replica["loss"][1], replica["loss"][0], 1e-3), replica["loss"]
    compiled = distributed["compiled"]
    assert compiled["weights_rel"][1] > REPLICA_MIN_DIFF, compiled
    assert not _close(compiled["per_output"][1][1], compiled["per_output"][0][1], 1e-3), compiled


@pytest.mark.slow
def test_compiled_triplet_loss_equals_single_device(distributed):
    """compile(loss=TripletLoss()): the wrapper divides by the replicas where Keras does not."""
    result = distributed["compiled"]
    single, dist = result["per_output"][0][0], result["per_output"][1][0]
    assert _close(dist, single), result["per_output"]
    assert result["weights_rel"][0] <= TOL, result["weights_rel"]


@pytest.mark.slow
def test_direct_calls_follow_the_scaling_rule(distributed):
    """Inside strategy.run a wrapper loss returns the global batch loss / N (any reduction, with
    or without sample weights), batch_loss the global batch loss; random draws agree."""
    d = distributed["direct"]
    full, half = d["single"], d["single"] / 2
    for key in ("plain", "weighted", "sum"):
        assert all(_close(v, half) for v in d[key]), (key, d[key], full)
    assert all(_close(v, full) for v in d["batch_loss"]), (d["batch_loss"], full)
    for key in ("paper", "sampled"):  # seed None: the replicas still draw the same
        assert d[key][0] == d[key][1], (key, d[key])


# ---------------------------------------------------------------------------------------------
# In-process tests (no strategy)
import tensorflow as tf  # noqa: E402  (after the subprocess part, which imports it itself)


def _batch(b=12, d=DIM, ids=3, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(b, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return tf.constant(emb), tf.constant(np.arange(b) % ids, tf.int32)


@pytest.mark.parametrize("scope", ["global", "replica"])
@pytest.mark.parametrize("graph", [False, True])
def test_gather_global_is_identity_without_strategy(scope, graph):
    from losses.global_batch import gather_global, num_replicas

    emb, labels = _batch()

    def fn(e, y):
        out_e, out_y = gather_global(e, y, scope)
        return out_e, out_y, tf.constant(num_replicas())

    out_e, out_y, n = (tf.function(fn) if graph else fn)(emb, labels)
    np.testing.assert_array_equal(out_e, emb)
    np.testing.assert_array_equal(out_y, labels)
    assert int(n) == 1
    if not graph:
        assert gather_global(emb, labels, scope)[0] is emb


def test_one_replica_strategy_is_the_identity():
    from losses.global_batch import gather_global, num_replicas, replica_scale

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    emb, labels = _batch()

    def fn(e, y):
        out_e, out_y = gather_global(e, y)
        return out_e, out_y, tf.constant(num_replicas()), replica_scale(tf.constant(2.0))

    out_e, out_y, n, scaled = strategy.run(tf.function(fn), args=(emb, labels))
    np.testing.assert_array_equal(out_e, emb)
    np.testing.assert_array_equal(out_y, labels)
    assert int(n) == 1 and float(scaled) == 2.0


def test_replica_consistent_seed_without_strategy():
    from losses.global_batch import replica_consistent_seed

    assert replica_consistent_seed(None) is None
    assert replica_consistent_seed(5, "replica") == 5


def test_bad_mining_scope_is_a_value_error():
    from losses import (ContrastiveLoss, HarmonicTripletLossLayer, TripletLoss,
                        TripletLossLayer, gather_global)
    from training.objectives import build_train_model, metric_loss

    emb, labels = _batch()
    for make in (lambda: gather_global(emb, labels, "world"),
                 lambda: TripletLossLayer(mining_scope="world"),
                 lambda: HarmonicTripletLossLayer(mining_scope="world"),
                 lambda: TripletLoss(mining_scope="world"),
                 lambda: ContrastiveLoss(mining_scope="world"),
                 lambda: metric_loss("lifted", mining_scope="world")):
        with pytest.raises(ValueError, match=r"mining_scope.*'global', 'replica'"):
            make()
    import keras

    backbone = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                                 keras.layers.Dense(4)])
    with pytest.raises(ValueError, match="mining_scope"):
        build_train_model(backbone, (8, 8), "triplet", mining_scope="world")


def _wrapper_losses():
    from losses import (ContrastiveLoss, DistanceWeightedLoss, LiftedStructuredLoss,
                        TriHardLoss, TripletHardLoss, TripletLoss, TripletSemiHardLoss)

    return [TripletLoss, ContrastiveLoss, LiftedStructuredLoss, TriHardLoss,
            DistanceWeightedLoss, TripletSemiHardLoss, TripletHardLoss]


@pytest.mark.parametrize("index", range(7))
def test_wrapper_losses_round_trip_mining_scope(index):
    import keras

    cls = _wrapper_losses()[index]
    loss = cls()
    assert loss.mining_scope == "global"
    config = loss.get_config()
    assert config["mining_scope"] == "global"
    config["mining_scope"] = "replica"
    assert cls.from_config(config).mining_scope == "replica"
    restored = keras.losses.deserialize(keras.losses.serialize(cls.from_config(config)))
    assert type(restored) is cls and restored.mining_scope == "replica"
    del config["mining_scope"]  # a config saved before mining_scope existed
    assert cls.from_config(config).mining_scope == "global"
    with pytest.raises(ValueError, match="mining_scope"):
        cls.from_config(dict(config, mining_scope="world"))


def test_wrapper_losses_take_mining_scope():
    for cls in _wrapper_losses():  # the tfa drop-ins too (they also take tfa's extra kwargs)
        assert cls(mining_scope="replica").mining_scope == "replica"
        with pytest.raises(ValueError, match="mining_scope"):
            cls(mining_scope="world")


@pytest.mark.parametrize("harmonic", [False, True])
def test_layers_round_trip_mining_scope(harmonic):
    import keras

    from losses import HarmonicTripletLossLayer, TripletLossLayer

    cls = HarmonicTripletLossLayer if harmonic else TripletLossLayer
    layer = cls(margin=0.3, mining="hard", mining_scope="replica")
    config = layer.get_config()
    assert config["mining_scope"] == "replica"
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(restored) is cls and restored.mining_scope == "replica"
    assert restored.mining == "hard" and restored.margin == pytest.approx(0.3)
    del config["mining_scope"]  # an old config
    assert cls.from_config(config).mining_scope == "global"
    assert cls().mining_scope == "global"


def test_embedding_loss_term_round_trips_and_loads_old_configs():
    import keras

    from training.objectives import EmbeddingLossTerm, metric_loss

    term = EmbeddingLossTerm(metric_loss("contrastive", mining_scope="replica"), name="c")
    config = term.get_config()
    restored = EmbeddingLossTerm.from_config(config)
    assert restored.loss_fn.mining_scope == "replica"
    old = keras.losses.serialize(metric_loss("trihard"))
    old["config"].pop("mining_scope")
    assert EmbeddingLossTerm(old).loss_fn.mining_scope == "global"


def test_build_train_model_passes_mining_scope():
    import keras

    from training.objectives import build_train_model

    def backbone():
        return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                                 keras.layers.Dense(4), keras.layers.UnitNormalization()])

    for loss, kw in (("triplet", {}), ("triplet", {"pretrain_steps": 2, "num_classes": 3}),
                     ("contrastive", {}), ("lifted", {}), ("trihard", {}),
                     ("distance_weighted", {}), ("arcface", {"num_classes": 3})):
        for scope in ("global", "replica"):
            _, terms = build_train_model(backbone(), (8, 8), loss, mining_scope=scope, **kw)
            if "triplet" in terms:
                assert terms["triplet"].mining_scope == scope
            if "metric" in terms:
                assert terms["metric"].loss_fn.mining_scope == scope
        _, terms = build_train_model(backbone(), (8, 8), loss, **kw)  # default: global
        for term in terms.values():
            assert getattr(term, "mining_scope", getattr(getattr(term, "loss_fn", None),
                                                         "mining_scope", "global")) == "global"
    old = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                            keras.layers.Dense(4)])
    old.trainable = False
    _, terms = build_train_model(backbone(), (8, 8), "triplet", old_embedding=old,
                                 mining_scope="replica")
    assert terms["triplet"].mining_scope == "replica"


@pytest.mark.parametrize("graph", [False, True])
def test_wrapper_paths_agree_without_strategy(graph):
    """Without a strategy, __call__ (any reduction, sample weights as before) == batch_loss ==
    the function (graph mode with the cheap contrastive loss: tracing the triplet loss is slow)."""
    from losses import ContrastiveLoss, TripletLoss, contrastive_loss, triplet_loss

    emb, labels = _batch()
    contrastive, summed = ContrastiveLoss(), ContrastiveLoss(reduction="sum")

    def fn(e, y):
        return (contrastive(y, e), contrastive.batch_loss(y, e), contrastive_loss(y, e),
                contrastive(y, e, sample_weight=tf.fill([12], 0.5)),
                summed(y, e, sample_weight=tf.fill([12], 0.5)))

    call, batch, value, weighted, weighted_sum = (tf.function(fn) if graph else fn)(emb, labels)
    assert float(call) == pytest.approx(float(value), rel=1e-6)
    assert float(batch) == pytest.approx(float(value), rel=1e-6)
    assert float(weighted) == pytest.approx(0.5 * float(value), rel=1e-6)
    assert float(weighted_sum) == pytest.approx(6.0 * float(value), rel=1e-6)
    if not graph:
        triplet = TripletLoss()
        expected = float(triplet_loss(labels, emb))
        assert float(triplet(labels, emb)) == pytest.approx(expected, rel=1e-6)
        assert float(triplet.batch_loss(labels, emb)) == pytest.approx(expected, rel=1e-6)


def test_layer_losses_are_replaced_at_each_call():
    """ReplicaLocalLosses without a strategy: one term per call, as Keras' own list keeps it."""
    import keras

    from losses import TripletLossLayer, triplet_loss
    from training.objectives import build_train_model

    emb, labels = _batch()
    images = keras.Input((DIM,))
    ids = keras.Input((), dtype="int32")
    layer = TripletLossLayer()
    model = keras.Model([images, ids], layer([images, ids]))
    for _ in range(2):
        model([emb, labels])
        assert len(model.losses) == 1 and len(layer.losses) == 1
        assert float(model.losses[0]) == pytest.approx(float(triplet_loss(labels, emb)))
    backbone = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                                 keras.layers.Dense(4), keras.layers.UnitNormalization()])
    train, _ = build_train_model(backbone, (4, 4), "softmax_center", num_classes=3)
    x = {"images": tf.random.normal([6, 4, 4, 3]), "labels": tf.constant([0, 1, 2] * 2)}
    for _ in range(2):
        train(x, training=True)
        assert len(train.losses) == 2  # cross-entropy, and the head's center loss (claimed)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _distributed_main()
