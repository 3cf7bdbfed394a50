"""Keras callbacks for train.py: per-step TensorBoard scalars, NaN stop, and a wall-clock limit."""
import math
import time

import keras
import tensorflow as tf

from losses.triplet import STAT_KEYS
from training.optim import current_learning_rate

# Scalars logged as they arrive in Keras' logs: the loss, the triplet-loss layer's mining
# statistics, and the classification head's accuracy and center loss.
STEP_SCALARS = ("loss", *STAT_KEYS, "classifier_accuracy", "center_loss")


class StepLogger(keras.callbacks.Callback):
    """Every ``every`` steps, write loss, mining statistics, learning rate and images/s.

    ``step_fn`` returns the global step (the optimiser's iteration count).
    """

    def __init__(self, writer, step_fn, images_per_step, every=10):
        super().__init__()
        self.writer = writer
        self.step_fn = step_fn
        self.images_per_step = images_per_step
        self.every = max(1, int(every))
        self._t = None
        self._n = 0
        self.last_images_per_second = float("nan")

    def on_train_batch_begin(self, batch, logs=None):
        if self._t is None:
            self._t = time.perf_counter()
            self._n = 0

    def on_train_batch_end(self, batch, logs=None):
        self._n += 1
        step = self.step_fn()
        if step % self.every:
            return
        now = time.perf_counter()
        self.last_images_per_second = self._n * self.images_per_step / max(now - self._t, 1e-9)
        self._t, self._n = now, 0
        logs = logs or {}
        with self.writer.as_default(step=step):
            for key in STEP_SCALARS:
                if key in logs:
                    tf.summary.scalar(f"train/{key}", float(logs[key]))
            tf.summary.scalar("train/learning_rate", current_learning_rate(self.model.optimizer))
            tf.summary.scalar("train/images_per_second", self.last_images_per_second)


class StopOnNaN(keras.callbacks.Callback):
    """Stop training at the first non-finite loss and remember the step for the error message."""

    def __init__(self, step_fn):
        super().__init__()
        self.step_fn = step_fn
        self.nan_step = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.nan_step = self.step_fn()
            self.model.stop_training = True


class BudgetProgress(keras.callbacks.Callback):
    """Before every step, set ``schedule.progress`` (a :class:`training.optim.MinutesCosine`) to
    the fraction of ``time_limit``'s budget of ``budget_seconds`` spent so far, in [0, 1].

    The remaining time is read from ``time_limit.deadline``, which :meth:`TimeLimit.pause` moves
    while train.py validates, so validation does not advance the schedule either.
    """

    def __init__(self, schedule, time_limit, budget_seconds):
        super().__init__()
        self.schedule = schedule
        self.time_limit = time_limit
        self.budget_seconds = float(budget_seconds)

    def fraction(self):
        remaining = self.time_limit.deadline - time.monotonic()
        return min(1.0, max(0.0, 1.0 - remaining / self.budget_seconds))

    def on_train_batch_begin(self, batch, logs=None):
        self.schedule.progress.assign(self.fraction())


class TimeLimit(keras.callbacks.Callback):
    """Stop training once ``deadline`` (time.monotonic()) has passed; checked after every step.

    :meth:`pause` stops the clock (train.py pauses it while validating, so that a budget counts
    start-up and training, not evaluation).
    """

    def __init__(self, deadline):
        super().__init__()
        self.deadline = deadline
        self.hit = False
        self.paused_seconds = 0.0

    def pause(self, seconds):
        """Move the deadline ``seconds`` later: time spent outside training."""
        self.paused_seconds += float(seconds)
        if self.deadline is not None:
            self.deadline += float(seconds)

    def on_train_batch_end(self, batch, logs=None):
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.hit = True
            self.model.stop_training = True
