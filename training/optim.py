"""Optimisers and learning-rate schedules.

The paper trains with AdaGrad at an initial learning rate of 0.05 (FaceNet Section 4, "we used
... AdaGrad, with an initial learning rate of 0.05"); Adam and SGD with momentum are the usual
alternatives.
"""
import keras

OPTIMIZERS = ("adagrad", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "step")


def learning_rate_schedule(name, learning_rate, total_steps):
    """A float, or a keras schedule over ``total_steps`` optimiser steps.

    cosine: cosine decay to 1% of the initial rate; step: x0.1 at 50% and again at 75% of training.
    """
    if name == "constant":
        return float(learning_rate)
    total_steps = max(int(total_steps), 1)
    if name == "cosine":
        return keras.optimizers.schedules.CosineDecay(learning_rate, total_steps, alpha=0.01)
    if name == "step":
        bounds = [max(1, total_steps // 2), max(2, (3 * total_steps) // 4)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [learning_rate, learning_rate * 0.1, learning_rate * 0.01])
    raise ValueError(f"unknown learning-rate schedule {name!r}; choose from {SCHEDULES}")


def make_optimizer(name, learning_rate, total_steps=1, schedule="constant", momentum=0.9,
                   weight_decay=0.0):
    """A Keras optimiser by name (adagrad | adam | sgd)."""
    lr = learning_rate_schedule(schedule, learning_rate, total_steps)
    wd = weight_decay or None
    if name == "adagrad":
        return keras.optimizers.Adagrad(learning_rate=lr, weight_decay=wd)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr, weight_decay=wd)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=momentum, nesterov=True,
                                    weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def current_learning_rate(optimizer):
    """The learning rate at the optimiser's current step, as a Python float."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = inner.learning_rate
    try:
        return float(lr.numpy())
    except AttributeError:
        return float(lr)
