"""training.recipes (train.py --recipe), training.optim schedules, training.callbacks.TimeLimit,
and the real-faces bench's summary arithmetic."""
import json
import os
import sys
import time

import numpy as np
import pytest

import flags
from training import recipes


@pytest.fixture
def parsed():
    """Parses train.py's flags from an argv list into the global FLAGS; resets them after."""
    flags.define_train_flags()
    fv = flags.FLAGS

    def parse(argv):
        fv.unparse_flags()
        fv(["train.py", *argv])
        return fv

    yield parse
    fv.unparse_flags()


def test_auto_recipe_follows_the_data():
    assert recipes.resolve_recipe("auto", None) == "synthetic"
    assert recipes.resolve_recipe("auto", "faces/") == "real"
    assert recipes.resolve_recipe("paper", None) == "paper"
    with pytest.raises(ValueError, match="unknown recipe"):
        recipes.resolve_recipe("fast", None)


def test_recipe_fills_only_the_flags_not_given(parsed):
    fv = parsed(["--recipe=paper", "--learning_rate=0.01"])
    applied = recipes.apply_recipe(fv, "paper")
    assert fv.optimizer == "adagrad" and fv.mining == "semi_hard"
    assert fv.identities_per_batch * fv.images_per_identity == 1800  # Section 4: ~1,800 images
    assert fv.learning_rate == 0.01 and "learning_rate" not in applied  # the user's flag wins
    assert applied["optimizer"] == "adagrad"


def test_synthetic_recipe_keeps_the_flag_defaults(parsed):
    fv = parsed([])
    assert recipes.apply_recipe(fv, "synthetic") == {}
    assert fv.model == "tiny" and fv.optimizer == "adagrad" and fv.learning_rate == 0.05


def test_every_recipe_names_real_flags_with_valid_values():
    flags.define_train_flags()
    for name, values in recipes.RECIPES.items():
        for flag, value in values.items():
            assert flag in flags.FLAGS, (name, flag)
            choices = getattr(flags.FLAGS[flag], "enum_values", None)
            if choices:
                assert value in choices, (name, flag, value)
    assert set(recipes.RECIPES) | {"auto"} == set(recipes.RECIPE_CHOICES)


@pytest.mark.parametrize("after", ["constant", "cosine", "step"])
def test_linear_warmup_then_schedule(after):
    from training.optim import learning_rate_schedule

    lr = learning_rate_schedule(after, 0.1, total_steps=1000, warmup_steps=10)
    values = [float(lr(s)) for s in (0, 4, 9, 10, 400, 999)]
    np.testing.assert_allclose(values[:3], [0.01, 0.05, 0.1], rtol=1e-6)  # linear ramp
    plain = learning_rate_schedule(after, 0.1, total_steps=1000)
    for step, v in zip((10, 400, 999), values[3:]):
        expected = plain if isinstance(plain, float) else float(plain(step))
        assert v == pytest.approx(expected, rel=1e-6)  # then the schedule, at the global step
    assert learning_rate_schedule(after, 0.1, 1000, warmup_steps=0).__class__ is \
        learning_rate_schedule(after, 0.1, 1000).__class__


def test_warmup_schedule_serialises_and_works_in_graph_mode():
    import keras
    import tensorflow as tf

    from training.optim import LinearWarmup, learning_rate_schedule, make_optimizer

    lr = learning_rate_schedule("cosine", 0.2, total_steps=100, warmup_steps=5)
    again = LinearWarmup.from_config(lr.get_config())
    graph = tf.function(lambda s: again(s))
    for s in (0, 3, 50, 99):
        assert float(graph(tf.constant(s))) == pytest.approx(float(lr(s)), rel=1e-6)
    opt = make_optimizer("adamw", 1e-3, 100, "constant", warmup_steps=5)
    assert isinstance(opt, keras.optimizers.AdamW) and opt.weight_decay == pytest.approx(1e-4)


def test_time_limit_pause_moves_the_deadline():
    from training.callbacks import TimeLimit

    class _Model:
        stop_training = False

    limit = TimeLimit(time.monotonic() + 0.05)
    limit.set_model(_Model())
    limit.pause(60.0)  # e.g. a validation: it does not count against the budget
    time.sleep(0.1)
    limit.on_train_batch_end(0)
    assert not limit.hit and limit.paused_seconds == 60.0
    limit.pause(-60.0)
    limit.on_train_batch_end(1)
    assert limit.hit and limit.model.stop_training


def test_minutes_cosine_follows_the_budget_in_eager_and_graph_mode():
    """The rate is a cosine of the budget fraction (NumPy formula), read live by a traced step,
    and the callback derives that fraction from TimeLimit's (pausable) deadline."""
    import math

    import tensorflow as tf

    from training.callbacks import BudgetProgress, TimeLimit
    from training.optim import (LinearWarmup, MinutesCosine, learning_rate_schedule,
                                make_optimizer, minutes_schedule)

    lr = learning_rate_schedule("cosine_minutes", 0.2, total_steps=1, warmup_steps=5)
    assert isinstance(lr, LinearWarmup) and isinstance(lr.after, MinutesCosine)
    opt = make_optimizer("adam", 0.2, 1, "cosine_minutes", warmup_steps=5)
    sched = minutes_schedule(opt)
    assert sched is not None and minutes_schedule(make_optimizer("adam", 0.2)) is None
    graph = tf.function(lambda s: sched(s))
    for p in (0.0, 0.25, 0.5, 1.0, 1.7):
        sched.progress.assign(p)
        want = 0.2 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))
        assert float(sched(7)) == pytest.approx(want, rel=1e-6)
        assert float(graph(tf.constant(7))) == pytest.approx(want, rel=1e-6)  # not a constant
    again = MinutesCosine.from_config(sched.get_config())
    assert again.rate == 0.2 and float(again(0)) == pytest.approx(0.2)

    limit = TimeLimit(time.monotonic() + 100.0)
    cb = BudgetProgress(sched, limit, budget_seconds=400.0)  # 300 of 400 s already spent
    cb.on_train_batch_begin(0)
    assert float(sched.progress) == pytest.approx(0.75, abs=0.01)
    limit.pause(100.0)  # validation does not advance the schedule
    cb.on_train_batch_begin(1)
    assert float(sched.progress) == pytest.approx(0.5, abs=0.01)
    limit.deadline = time.monotonic() - 5.0
    cb.on_train_batch_begin(2)
    assert float(sched.progress) == 1.0


def test_ema_weights_replace_the_weights_when_fit_returns():
    """--ema_momentum: after fit() the model holds the running average (checked against a NumPy
    recurrence of the raw weights, the first step of Keras' EMA copies the weights)."""
    import keras
    import tensorflow as tf

    from training.optim import make_optimizer

    with pytest.raises(ValueError, match="ema_momentum"):
        make_optimizer("adam", 1e-3, ema_momentum=1.5)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    opt = make_optimizer("sgd", 0.1, momentum=0.0, ema_momentum=0.5)
    model.compile(optimizer=opt, loss="mse")
    x = np.eye(3, dtype=np.float32)
    y = np.ones((3, 1), np.float32)
    w = model.get_weights()[0].copy()
    ema = None
    for _ in range(4):  # plain SGD on the full batch, then the average as Keras keeps it
        grad = 2.0 / 3.0 * (x.T @ (x @ w - y))
        w = w - 0.1 * grad
        ema = w.copy() if ema is None else 0.5 * ema + 0.5 * w
    model.fit(tf.data.Dataset.from_tensors((x, y)).repeat(4), epochs=1, verbose=0,
              shuffle=False)
    np.testing.assert_allclose(model.get_weights()[0], ema, rtol=1e-5)
    assert not np.allclose(ema, w)  # the average really differs from the last weights


def test_real_faces_bench_summary():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    import real_faces

    history = [{"step": 100 * i, "elapsed_seconds": 60.0 * m, "accuracy_mean": acc,
                "accuracy_std": 0.01, "auc": acc, "val_at_far_1e-3": 0.0,
                "images_per_second": 200.0}
               for i, (m, acc) in enumerate([(1, 0.6), (4.5, 0.71), (9, 0.76), (12, 0.74),
                                             (19.5, 0.81)], start=1)]
    rows = real_faces.points("r", {"history": history})
    s = real_faces.summarise("r", [], rows, {"step": 500})
    assert s["minutes_to_70"] == 4.5 and s["minutes_to_75"] == 9 and s["minutes_to_80"] == 19.5
    assert s["minutes_to_85"] is None
    assert s["accuracy_at_5"] == 0.71 and s["accuracy_at_10"] == 0.76
    assert s["accuracy_at_20"] == 0.81  # the last validation at or before 20 minutes
    assert s["accuracy_at_60"] is None  # the run stopped long before
    json.dumps(s)
    assert real_faces.parse_recipes("real,x=--loss=cosface --head_scale=30") == {
        "real": ["--recipe=real"], "x": ["--loss=cosface", "--head_scale=30"]}


def test_settings_are_read_once_and_frozen(parsed):
    """train.py turns its flags into one frozen TrainSettings (training/settings.py)."""
    import dataclasses

    from training.settings import TrainSettings

    fv = parsed(["--model=nns2", "--identities_per_batch=6", "--images_per_identity=3",
                 "--max_steps=7"])
    s = TrainSettings.from_flags(fv, "synthetic")
    assert s.image_size == (140, 116) and s.model_dir == os.path.join("runs", "nns2")
    assert s.batch_images == 18 and s.total_steps == 7 and s.recipe == "synthetic"
    assert s.triplet_margin == pytest.approx(0.2)
    assert s.run_config().model == "nns2"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.learning_rate = 1.0
    # every field is a train.py flag of the same name, except the three derived ones
    derived = {"image_size", "model_dir", "recipe"}
    assert {f.name for f in dataclasses.fields(TrainSettings)} - derived <= set(fv)


def test_deprecated_margin_sets_the_triplet_margin_before_the_recipe(parsed, capsys):
    """--margin (old name of --triplet_margin) counts as given: the recipe does not override it."""
    fv = parsed(["--recipe=paper", "--margin=0.35"])
    assert flags.apply_deprecated_aliases("train.py", flag_values=fv) == ["margin"]
    recipes.apply_recipe(fv, "paper")
    assert fv.triplet_margin == pytest.approx(0.35)
    assert "--margin is deprecated" in capsys.readouterr().err
