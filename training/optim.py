"""Optimisers and learning-rate schedules.

The paper trains with AdaGrad at an initial learning rate of 0.05 (FaceNet Section 4, "we used
... AdaGrad, with an initial learning rate of 0.05"); Adam and SGD with momentum are the usual
alternatives. Any schedule can start with a linear warm-up (``warmup_steps``), which keeps Adam's
first, badly scaled updates from scrambling a freshly initialised network.
"""
import keras

# the names, defined once (TF-free; flags.py offers them)
from choices import LR_SCHEDULES as SCHEDULES, OPTIMIZERS


@keras.saving.register_keras_serializable(package="facenet")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """``rate * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then ``after``.

    ``after`` is a float or a schedule; it is evaluated at the global step (it does not restart
    after the warm-up), so a cosine over ``total_steps`` still ends at step ``total_steps``.
    """

    def __init__(self, after, warmup_steps, rate=None):
        self.after = after
        self.warmup_steps = int(warmup_steps)
        self.rate = float(rate if rate is not None else (
            after if not callable(after) else after(0)))

    def _after(self, step):
        import tensorflow as tf

        if callable(self.after):
            return tf.cast(self.after(step), tf.float32)
        return tf.constant(float(self.after), tf.float32)

    def __call__(self, step):
        import tensorflow as tf

        step = tf.cast(step, tf.float32)
        warm = self.rate * (step + 1.0) / float(max(self.warmup_steps, 1))
        return tf.where(step < float(self.warmup_steps), warm, self._after(step))

    def get_config(self):
        after = self.after
        if isinstance(after, keras.optimizers.schedules.LearningRateSchedule):
            after = keras.optimizers.schedules.serialize(after)
        return {"after": after, "warmup_steps": self.warmup_steps, "rate": self.rate}

    @classmethod
    def from_config(cls, config):
        after = config["after"]
        if isinstance(after, dict):
            after = keras.optimizers.schedules.deserialize(after)
        return cls(after, config["warmup_steps"], config.get("rate"))


@keras.saving.register_keras_serializable(package="facenet")
class MinutesCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Cosine decay from ``rate`` to ``alpha * rate`` over a wall-clock budget, not over steps.

    The fraction of the budget spent so far lives in the non-trainable variable ``progress``
    (0 to 1), which train.py's ``BudgetProgress`` callback sets before every step from the
    ``--max_minutes`` deadline (validation time excluded, like the budget itself). The rate is
    ``rate * (alpha + (1 - alpha) * (1 + cos(pi * progress)) / 2)``; the step is ignored. A time
    budget cannot be turned into a step count before the run has measured its own speed, so this
    is how a run bounded by minutes still ends at a low learning rate.
    """

    def __init__(self, rate, alpha=0.01):
        import tensorflow as tf

        self.rate = float(rate)
        self.alpha = float(alpha)
        self.progress = tf.Variable(0.0, trainable=False, dtype=tf.float32,
                                    name="budget_progress")

    def __call__(self, step):
        import math

        import tensorflow as tf

        p = tf.clip_by_value(tf.cast(self.progress, tf.float32), 0.0, 1.0)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * p))
        return self.rate * (self.alpha + (1.0 - self.alpha) * cosine)

    def get_config(self):
        return {"rate": self.rate, "alpha": self.alpha}


def minutes_schedule(optimizer):
    """The optimiser's :class:`MinutesCosine` (inside a warm-up or not), or None."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = getattr(inner, "_learning_rate", None)
    if isinstance(lr, LinearWarmup):
        lr = lr.after
    return lr if isinstance(lr, MinutesCosine) else None


def learning_rate_schedule(name, learning_rate, total_steps, warmup_steps=0):
    """A float, or a keras schedule over ``total_steps`` optimiser steps.

    cosine: cosine decay to 1% of the initial rate; step: x0.1 at 50% and again at 75% of training;
    cosine_minutes: cosine decay to 1% over the wall-clock budget (:class:`MinutesCosine`).
    ``warmup_steps > 0`` prepends a linear warm-up from ~0 to ``learning_rate``.
    """
    total_steps = max(int(total_steps), 1)
    if name == "constant":
        lr = float(learning_rate)
    elif name == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(learning_rate, total_steps, alpha=0.01)
    elif name == "cosine_minutes":
        lr = MinutesCosine(learning_rate)
    elif name == "step":
        bounds = [max(1, total_steps // 2), max(2, (3 * total_steps) // 4)]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [learning_rate, learning_rate * 0.1, learning_rate * 0.01])
    else:
        raise ValueError(f"unknown learning-rate schedule {name!r}; choose from {SCHEDULES}")
    if warmup_steps and int(warmup_steps) > 0:
        return LinearWarmup(lr, int(warmup_steps), float(learning_rate))
    return lr


def make_optimizer(name, learning_rate, total_steps=1, schedule="constant", momentum=0.9,
                   weight_decay=0.0, warmup_steps=0, ema_momentum=0.0):
    """A Keras optimiser by name (adagrad | adam | adamw | sgd).

    ``weight_decay`` is decoupled (applied to the weights by the optimiser, not added to the
    loss) for every optimiser; ``adamw`` is Adam with it (default 1e-4 when 0 is given).
    ``ema_momentum`` > 0 keeps an exponential moving average of the weights (Keras' ``use_ema``):
    ``fit()`` copies the average into the weights when it returns, i.e. at every validation,
    checkpoint and export, and training goes on from there.
    """
    lr = learning_rate_schedule(schedule, learning_rate, total_steps, warmup_steps)
    wd = weight_decay or None
    ema = {"use_ema": True, "ema_momentum": float(ema_momentum)} if ema_momentum else {}
    if ema and not 0.0 < ema_momentum < 1.0:
        raise ValueError(f"ema_momentum must be in (0, 1), got {ema_momentum}")
    if name == "adagrad":
        return keras.optimizers.Adagrad(learning_rate=lr, weight_decay=wd, **ema)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr, weight_decay=wd, **ema)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=wd or 1e-4, **ema)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=momentum, nesterov=True,
                                    weight_decay=wd, **ema)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def current_learning_rate(optimizer):
    """The learning rate at the optimiser's current step, as a Python float."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = inner.learning_rate
    try:
        return float(lr.numpy())
    except AttributeError:
        return float(lr)
