"""training/objectives.py: every --loss builds a training model that fits, and the phase switch."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import models
from losses import margin_heads, pair_losses
from training.objectives import (LOSSES, ClassifierTerm, EmbeddingLossTerm, PhaseSwitch,
                                 build_train_model, needs_classes)

SIZE = (32, 32)
P, K, CLASSES = 4, 4, 10


def test_flag_choices_and_classifier_need_follow_the_losses():
    """--loss and --pretrain_head offer exactly the losses and heads that build (names from the
    TF-free choices.py, which flags.py reads)."""
    from absl import flags as absl_flags

    import flags

    flags.define_train_flags()
    assert list(absl_flags.FLAGS["loss"].parser.enum_values) == list(LOSSES)
    assert list(absl_flags.FLAGS["pretrain_head"].parser.enum_values) == list(margin_heads.HEADS)
    assert [name for name in LOSSES if needs_classes(name)] == list(margin_heads.HEADS)
    assert needs_classes("triplet", pretrain_steps=10) and not needs_classes("triplet")


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.choice(CLASSES, P, replace=False), K).astype(np.int32)
    images = rng.normal(size=(P * K,) + SIZE + (3,)).astype(np.float32)
    return {"images": images, "labels": labels}


def _model(loss, **kw):
    keras.utils.set_random_seed(0)
    backbone = models.build_model("tiny", image_size=SIZE)
    model, terms = build_train_model(backbone, SIZE, loss, CLASSES, **kw)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return backbone, model, terms


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_a_step_and_keeps_the_embedding_output(loss):
    backbone, model, terms = _model(loss)
    batch = _batch()
    before = [w.numpy().copy() for w in backbone.trainable_weights]
    logs = model.fit(tf.data.Dataset.from_tensors((batch,)), epochs=1, verbose=0, shuffle=False).history
    assert np.isfinite(logs["loss"][0]) and logs["loss"][0] > 0
    moved = [np.abs(w.numpy() - b).max() for w, b in zip(backbone.trainable_weights, before)]
    assert max(moved) > 0
    out = model(batch, training=False)
    assert out.shape == (P * K, 128)  # the training model still outputs the embedding
    assert ("classifier" in terms) == (loss in margin_heads.HEADS)


def test_metric_term_equals_its_loss_function():
    backbone, model, terms = _model("contrastive")
    batch = _batch(1)
    emb = backbone(batch["images"], training=False)
    model(batch, training=False)
    expected = float(pair_losses.contrastive_loss(batch["labels"], emb))
    assert float(model.losses[0]) == pytest.approx(expected, rel=1e-5)


def test_classifier_term_is_cross_entropy_of_the_head():
    backbone, model, terms = _model("cosface", head_margin=0.3, head_scale=16.0)
    head = terms["classifier"].head
    assert head.margin == pytest.approx(0.3) and head.scale == pytest.approx(16.0)
    batch = _batch(2)
    model(batch, training=False)
    emb = backbone(batch["images"], training=False)
    logits = margin_heads.cosface_logits(batch["labels"], emb, head.kernel, 16.0, 0.3)
    ce = keras.losses.sparse_categorical_crossentropy(batch["labels"], logits, from_logits=True)
    assert float(model.losses[0]) == pytest.approx(float(tf.reduce_mean(ce)), rel=1e-5)


def test_pretraining_switches_from_softmax_to_triplet():
    backbone, model, terms = _model("triplet", pretrain_steps=2)
    assert set(terms) == {"classifier", "metric"}
    step = {"n": 0}
    switch = PhaseSwitch(lambda: step["n"], 2, terms["classifier"], terms["metric"])
    batch = _batch(3)
    seen = []
    for n in range(4):
        step["n"] = n
        switch.on_train_batch_begin(n)
        model(batch, training=False)
        seen.append((float(terms["classifier"].weight.numpy()), float(terms["metric"].weight.numpy())))
        assert len(model.losses) == 2
    assert seen == [(1.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.0, 1.0)]


@pytest.mark.parametrize("head", ["cosface", "arcface"])
def test_pretraining_head_can_be_a_margin_head(head):
    """--pretrain_head: the classifier trained first is the named head (the seeds' recipe)."""
    from losses.margin_heads import make_head

    _, model, terms = _model("triplet", pretrain_steps=2, pretrain_head=head)
    assert type(terms["classifier"].head) is type(make_head(head, CLASSES))
    assert terms["classifier"].name == f"{head}_head"
    model(_batch(1), training=False)
    assert len(model.losses) == 2 and all(np.isfinite(float(l)) for l in model.losses)


def test_heads_need_the_number_of_classes_and_pretraining_needs_triplet():
    backbone = models.build_model("tiny", image_size=SIZE)
    with pytest.raises(ValueError, match="number of identities"):
        build_train_model(backbone, SIZE, "arcface", None)
    with pytest.raises(ValueError, match="fine-tunes with --loss=triplet"):
        build_train_model(backbone, SIZE, "contrastive", CLASSES, pretrain_steps=5)
    with pytest.raises(ValueError, match="unknown loss"):
        build_train_model(backbone, SIZE, "nope", CLASSES)


def test_terms_serialise():
    term = EmbeddingLossTerm(pair_losses.LiftedStructuredLoss(margin=0.7), name="t")
    again = EmbeddingLossTerm.from_config(term.get_config())
    assert isinstance(again.loss_fn, pair_losses.LiftedStructuredLoss)
    assert again.loss_fn.get_config()["margin"] == pytest.approx(0.7)
    head = ClassifierTerm(margin_heads.make_head("arcface", CLASSES, margin=0.4), name="h")
    again = ClassifierTerm.from_config(head.get_config())
    assert isinstance(again.head, margin_heads.ArcFaceHead) and again.head.margin == pytest.approx(0.4)
