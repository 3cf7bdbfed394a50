"""`LossFunctionWrapper`: the Keras form of a pure batch loss `fn(labels, embeddings, **kwargs)`.

Every Keras loss of this package (`TripletLoss`, `ContrastiveLoss`, `LiftedStructuredLoss`,
`TriHardLoss`, `DistanceWeightedLoss`, `TripletSemiHardLoss`, `TripletHardLoss`) is a thin
subclass: its `__init__` checks and converts its arguments and hands them, with its function, to
this wrapper. Called as `loss(y_true=labels [B], y_pred=embeddings [B, D])`, it returns
`fn(y_true, y_pred, **kwargs)`, a float32 scalar for the whole batch; Keras' reductions leave a
scalar unchanged (sample weights scale it).

Unlike `keras.losses.LossFunctionWrapper`, the function is not serialised: `get_config` holds the
keyword arguments only (after Keras' `name` and `reduction`), and the registered subclass
rebuilds itself from them with `from_config`.
"""
import keras


class LossFunctionWrapper(keras.losses.Loss):
    """Keras loss calling `fn(y_true, y_pred, **kwargs)`.

    Each keyword argument is kept as an attribute of the same name (read at every call, so
    `loss.margin = 0.5` takes effect) and returned by `get_config`; values must be plain
    (serialisable) Python values, and a callable one makes `get_config` raise TypeError.
    Subclasses that pass something else to `fn` than what they store (a per-call seed) override
    `_call_kwargs`.
    """

    def __init__(self, fn, name, reduction="sum_over_batch_size", dtype=None, **kwargs):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._fn = fn
        self._fn_arg_names = tuple(kwargs)
        for key, value in kwargs.items():
            setattr(self, key, value)

    def _fn_kwargs(self):
        """The stored keyword arguments, by name, as `get_config` returns them."""
        return {key: getattr(self, key) for key in self._fn_arg_names}

    def _call_kwargs(self):
        """The keyword arguments of one call of `fn`; by default the stored ones."""
        return self._fn_kwargs()

    def call(self, y_true, y_pred):
        return self._fn(y_true, y_pred, **self._call_kwargs())

    def get_config(self):
        config = super().get_config()
        kwargs = self._fn_kwargs()
        for key, value in kwargs.items():
            if callable(value):
                raise TypeError(f"A callable {key} cannot be serialised.")
        config.update(kwargs)
        return config
