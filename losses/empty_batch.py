"""Empty batches (B = 0): a batch loss returns 0 with a zero gradient instead of failing inside TF.

Some ops the mining relies on reject empty inputs (argmax over an empty axis, searchsorted on a
[0, 0] matrix, a categorical draw over 0 classes), so an empty batch would raise
InvalidArgumentError deep in TensorFlow. The losses therefore run their computation through
:func:`if_nonempty`. When B is known while tracing (eager mode, or a tf.function with a fixed batch
size) the choice is a plain Python branch: a graph with a known B > 0 is exactly what it was. When
B is only known at run time (an ``input_signature`` with a None batch dimension) it is one
``tf.cond``. Under XLA (``jit_compile=True``) a non-empty batch compiles and gives the same values
as before; XLA compiles both branches for the concrete shape, so a *compiled* B = 0 still fails in
the mining ops (as it always did).
"""
import tensorflow as tf


def static_batch_size(x):
    """B of a tensor [B, ...] when known while tracing, else None (also for unknown rank)."""
    shape = x.shape
    if shape.rank is None or shape.rank == 0:
        return None
    return tf.compat.dimension_value(shape[0])


def zero_loss(embeddings):
    """float32 scalar 0 that depends on ``embeddings`` [0, D], so its gradient is zeros, not None.

    Only meant for an empty batch: the sum over no element is exactly 0 whatever the values.
    """
    return tf.cast(tf.reduce_sum(embeddings), tf.float32) * 0.0


def if_nonempty(embeddings, compute, empty):
    """``compute()`` when the batch ``embeddings`` [B, ...] has B > 0, else ``empty()``.

    Both callables take no argument and return the same nested structure of tensors, with the same
    dtypes; shapes may differ only where they depend on B. ``embeddings`` must be a tensor.
    """
    size = static_batch_size(embeddings)
    if size is not None:
        return compute() if size > 0 else empty()
    if embeddings.shape.rank == 0:  # not a batch: let the computation report it
        return compute()
    return tf.cond(tf.shape(embeddings)[0] > 0, compute, empty)
