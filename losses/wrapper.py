"""`LossFunctionWrapper`: the Keras form of a pure batch loss `fn(labels, embeddings, **kwargs)`.

Every Keras loss of this package (`TripletLoss`, `ContrastiveLoss`, `LiftedStructuredLoss`,
`TriHardLoss`, `DistanceWeightedLoss`, `TripletSemiHardLoss`, `TripletHardLoss`) is a thin
subclass: its `__init__` checks and converts its arguments and hands them, with its function, to
this wrapper. Called as `loss(y_true=labels [B], y_pred=embeddings [B, D])`, it returns
`fn(y_true, y_pred, **kwargs)`, a float32 scalar for the whole batch; Keras' reductions leave a
scalar unchanged (sample weights scale it).

Distribution (`mining_scope`, `losses.global_batch`). Inside a replica context of a
`tf.distribute` strategy with N > 1 replicas:
  * `mining_scope="global"` (default): the batch is the global one: the replicas' embeddings and
    labels are all-gathered, and `fn` mines over the whole [B, B] distance matrix (FaceNet
    Section 3.2); a random draw (`semi_hard_paper`, distance-weighted sampling) uses one seed on
    all replicas. `"replica"`: `fn` sees the replica's own slice only.
  * the scaling rule: the value a call returns is the batch loss divided by N, as Keras' own
    mean-reduced losses are, so that the optimizer's sum of the replicas' gradients is the
    gradient of the batch loss (with "global": exactly the single-device gradient of the global
    batch). Keras divides by N only when its reduction averages a non-scalar (per-sample sample
    weights or a mask): `__call__` divides the scalar when Keras does not, never twice. So
    `model.compile(loss=TripletLoss())` under MirroredStrategy takes the single-device step.
  * `batch_loss(y_true, y_pred)` is the unscaled batch loss, for a loss added with `add_loss`
    (Keras divides `add_loss` terms by N itself): `training.objectives.EmbeddingLossTerm` uses it.
Outside such a context (no strategy, one replica) all three are the same value.

Unlike `keras.losses.LossFunctionWrapper`, the function is not serialised: `get_config` holds the
keyword arguments only (after Keras' `name` and `reduction`, and `mining_scope`), and the
registered subclass rebuilds itself from them with `from_config` (a config without
`mining_scope`, saved before it existed, loads as "global").
"""
import keras
import tensorflow as tf

from losses.global_batch import (check_mining_scope, gather_global, replica_consistent_seed,
                                 replica_scale)

# Keras reductions that average, and divide the average by the number of replicas.
_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


class LossFunctionWrapper(keras.losses.Loss):
    """Keras loss calling `fn(y_true, y_pred, **kwargs)` on the batch of its `mining_scope`.

    Each keyword argument is kept as an attribute of the same name (read at every call, so
    `loss.margin = 0.5` takes effect) and returned by `get_config`; values must be plain
    (serialisable) Python values, and a callable one makes `get_config` raise TypeError.
    Subclasses that pass something else to `fn` than what they store (a per-call seed) override
    `_call_kwargs`; those that draw at random override `_draws_at_random`.
    """

    def __init__(self, fn, name, reduction="sum_over_batch_size", dtype=None,
                 mining_scope="global", **kwargs):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._fn = fn
        self._fn_arg_names = tuple(kwargs)
        self.mining_scope = check_mining_scope(mining_scope)
        for key, value in kwargs.items():
            setattr(self, key, value)

    def _fn_kwargs(self):
        """The stored keyword arguments, by name, as `get_config` returns them."""
        return {key: getattr(self, key) for key in self._fn_arg_names}

    def _call_kwargs(self):
        """The keyword arguments of one call of `fn`; by default the stored ones."""
        return self._fn_kwargs()

    def _draws_at_random(self):
        """True when `fn` draws with its `seed` argument (the seed must then agree on replicas)."""
        return False

    def call(self, y_true, y_pred):
        """`fn` on the batch of `mining_scope` (the global one under "global"): float32 scalar,
        unscaled."""
        kwargs = self._call_kwargs()
        if self._draws_at_random():
            kwargs["seed"] = replica_consistent_seed(kwargs.get("seed"), self.mining_scope)
        y_pred, y_true = gather_global(y_pred, y_true, self.mining_scope)
        return self._fn(y_true, y_pred, **kwargs)

    def batch_loss(self, y_true, y_pred):
        """The batch loss, float32 scalar, never divided by the number of replicas (for
        `add_loss`, which Keras divides itself). labels [B], embeddings [B, D]."""
        with tf.name_scope(self.name):
            # cast, not convert: bfloat16/float16 embeddings (mixed precision) become float32
            return self.call(y_true, tf.cast(y_pred, self.dtype))

    def __call__(self, y_true, y_pred, sample_weight=None):
        """Keras' reduction of `call`, divided by the number of replicas where Keras did not."""
        value = super().__call__(y_true, y_pred, sample_weight=sample_weight)
        if self._keras_divides(y_pred, sample_weight):
            return value
        return replica_scale(value)

    def _keras_divides(self, y_pred, sample_weight):
        """Whether Keras' reduction already divided by the number of replicas: it does for an
        averaging reduction of non-scalar values, i.e. when a per-sample weight (or a Keras mask
        on y_pred) broadcast the scalar loss (keras.src.losses.loss.reduce_values)."""
        if self.reduction not in _MEAN_REDUCTIONS:
            return False
        weight = sample_weight
        if weight is None:  # Keras' get_keras_mask reads this attribute
            weight = getattr(y_pred, "_keras_mask", None)
        if weight is None:
            return False
        return tuple(tf.convert_to_tensor(weight).shape) not in ((), (0,))

    def get_config(self):
        config = super().get_config()
        kwargs = self._fn_kwargs()
        for key, value in kwargs.items():
            if callable(value):
                raise TypeError(f"A callable {key} cannot be serialised.")
        config.update(kwargs)
        config["mining_scope"] = self.mining_scope
        return config

    @classmethod
    def from_config(cls, config):
        """The loss of `config`; `mining_scope` (absent from old configs: "global") is set after
        construction, so subclasses whose `__init__` does not take it load it too."""
        config = dict(config)
        mining_scope = config.pop("mining_scope", "global")
        loss = cls(**config)
        loss.mining_scope = check_mining_scope(mining_scope)
        return loss
