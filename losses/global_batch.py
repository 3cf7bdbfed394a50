"""Global mining under tf.distribute: every replica mines over the whole global batch.

FaceNet mines its triplets over the whole mini-batch of ~1,800 images (Schroff et al. 2015,
Section 3.2). Under a `tf.distribute` strategy with N replicas each replica holds only its slice
[B/N, D] of the global batch [B, D]; mining inside the slice never sees the other replicas'
identities nor their hard negatives. With `mining_scope="global"` each replica all-gathers the
embeddings and labels of every replica (`tf.distribute.ReplicaContext.all_gather`, in
`replica_id_in_sync_group` order, which is the order in which the distributed dataset slices the
global batch, so the gathered batch is the original global batch) and computes the loss L over the
[B, B] distance matrix of the global batch; `mining_scope="replica"` keeps the per-replica mining.

Why the gradient is the single-device one. Every replica computes the same scalar L of the same
gathered batch G [B, D]. `all_gather` is differentiable: its gradient is the SUM all-reduce of the
replicas' dL/dG followed by the replica's own rows, i.e. N * dL/d(own rows). The loss a replica
hands to Keras is scaled by 1/N (Keras does it for `add_loss` terms; `losses.wrapper` does it for
a scalar batch loss Keras would leave unscaled), so each replica back-propagates exactly
dL/d(own rows) through its own forward pass, and the optimizer's sum over the replicas of the
weight gradients is sum_r dL/d(rows_r) d(rows_r)/dW = dL/dW: the gradient of the single-device
step on the global batch. This holds for any split of the batch (equal slices or not), for every
mining strategy and every pair loss, provided the replicas draw the same random numbers
(`replica_consistent_seed`). The loss value each replica reports is L itself.

Labels (and other tensors that need no gradient, as the old model's embeddings of the harmonic
loss) are gathered by separate all-gathers, with `tf.stop_gradient` on both sides, so no gradient
is ever asked of an integer tensor.

Outside a replica context of a strategy with more than one replica (no strategy, one replica, the
cross-replica context in which Keras builds models), or with `mining_scope="replica"`, everything
here is the identity.

`ReplicaLocalLosses`, a Layer mixin: Keras 3 (3.15) keeps a layer's `add_loss` terms in one Python
list shared by the replicas, and MirroredStrategy runs the replicas' forward passes in threads
that take turns at each cross-replica call (the all-gather here, synchronised batch norm). The
second replica's model call then clears the terms the first one added before that call, and later
reads the first one's terms as its own: the reported loss is wrong (1.5 L with 2 replicas), and
with two terms (a head and a metric loss) a replica can lose one, so a variable has a gradient on
one replica only and the step fails ("Values to regroup had different lengths"). Per-replica
mining without another cross-replica call in the forward pass happens not to interleave. The
mixin keeps each thread's terms apart (in this package's loss layers).
"""
import threading

import tensorflow as tf

from choices import MINING_SCOPES  # defined once (TF-free; flags.py offers them)


def check_mining_scope(mining_scope):
    """`mining_scope` if it is one of `MINING_SCOPES`; ValueError naming the choices otherwise."""
    if mining_scope not in MINING_SCOPES:
        raise ValueError(f"Unknown mining_scope {mining_scope!r}; expected one of {MINING_SCOPES}.")
    return mining_scope


def _replica_context():
    """The current ReplicaContext when it belongs to a strategy with > 1 replica, else None."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def num_replicas():
    """N when called inside a replica context of a strategy with N > 1 replicas, else 1 (no
    strategy, the cross-replica context, or one replica)."""
    context = _replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def _gathering(mining_scope):
    """The replica context to gather in for `mining_scope`, or None (nothing to gather)."""
    return _replica_context() if check_mining_scope(mining_scope) == "global" else None


def gather_constant(value, mining_scope="global"):
    """The rows of every replica of a tensor that needs no gradient ([b, ...] -> [B, ...], any
    dtype), in replica order; `value` unchanged when `_gathering` is None."""
    context = _gathering(mining_scope)
    if context is None:
        return value
    return tf.stop_gradient(context.all_gather(tf.stop_gradient(value), axis=0))


def gather_global(embeddings, labels, mining_scope="global"):
    """The global batch under `mining_scope="global"`: (embeddings [B, D], labels [B]).

    Args:
      embeddings: float [b, D], this replica's slice (b = B / N with equal slices).
      labels: [b] (or [b, 1]) identities, int or floats holding integers.
      mining_scope: "global" or "replica" (`choices.MINING_SCOPES`).
    Returns:
      Inside a replica context of a strategy with N > 1 replicas and with "global": the
      concatenation over the replicas, in `replica_id_in_sync_group` order, of the embeddings
      (differentiable: this replica gets the gradient of its own rows) and of the labels (no
      gradient). Otherwise (no strategy, one replica, cross-replica context, "replica") the
      inputs unchanged.
    Raises:
      ValueError: unknown `mining_scope`.
    """
    context = _gathering(mining_scope)
    if context is None:
        return embeddings, labels
    gathered = context.all_gather(tf.convert_to_tensor(embeddings), axis=0)
    return gathered, gather_constant(labels, mining_scope)


def replica_consistent_seed(seed, mining_scope="global"):
    """A seed every replica agrees on, so a random draw over the global batch is the same on all.

    With `mining_scope="global"` inside a replica context of N > 1 replicas and `seed=None` (a
    fresh, stateful draw, which would differ from replica to replica), returns a fresh stateless
    seed int64 [2] drawn on replica 0 and sent to all. Otherwise `seed` unchanged (an int seed, or a
    `losses.seeding.next_seed` tensor, is already the same on every replica).
    """
    if seed is not None or _gathering(mining_scope) is None:
        return seed
    fresh = tf.random.uniform([1, 2], minval=0, maxval=2**31 - 1, dtype=tf.int64)
    return gather_constant(fresh, mining_scope)[0]


def replica_scale(value):
    """`value / N` inside a replica context of N > 1 replicas, else `value` (float tensor).

    What Keras does to its mean-reduced losses and to `add_loss` terms, so that the optimizer's
    sum of the replicas' gradients is the gradient of the (global) batch loss.
    """
    n = num_replicas()
    if n == 1:
        return value
    value = tf.convert_to_tensor(value)
    return value * tf.cast(1.0 / n, value.dtype)


class ReplicaLocalLosses:
    """Mixin for a keras Layer: its `add_loss` terms are kept per thread (= per replica).

    Under MirroredStrategy each replica runs in its own thread, and the threads take turns at
    every cross-replica call (`gather_global`, synchronised batch norm); Keras' single list of a
    layer's losses is then cleared and read across replicas (module docstring). This mixin moves
    the terms `add_loss` puts in that list into a list of the calling thread, which
    `_get_own_losses` returns and `_clear_losses` clears. `_claim_losses(sublayer)` moves in the
    terms a sublayer without the mixin has just added (a margin head's center loss). Without a
    strategy there is one thread and nothing changes. Put it before the Keras base class:
    `class MyLayer(ReplicaLocalLosses, keras.layers.Layer)`.
    """

    def _thread_losses(self):
        """This thread's list of loss terms (created on first use)."""
        store = self.__dict__.get("_replica_local_losses")
        if store is None:
            with _STORE_LOCK:
                store = self.__dict__.get("_replica_local_losses")
                if store is None:
                    store = threading.local()
                    # Not through Layer.__setattr__: no tracking, not part of the layer's state.
                    object.__setattr__(self, "_replica_local_losses", store)
        if not hasattr(store, "losses"):
            store.losses = []
        return store.losses

    def _claim_losses(self, layer, start=0):
        """Moves `layer`'s shared loss terms from index `start` on into this thread's list."""
        shared = layer._losses
        self._thread_losses().extend(shared[start:])
        del shared[start:]

    def add_loss(self, loss):
        start = len(self._losses)
        super().add_loss(loss)  # validates; appends to the shared list (outside stateless scopes)
        self._claim_losses(self, start)

    def _get_own_losses(self):
        return super()._get_own_losses() + list(self._thread_losses())

    def _clear_losses(self):
        super()._clear_losses()
        self._thread_losses().clear()


_STORE_LOCK = threading.Lock()
