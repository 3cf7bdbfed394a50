"""Identity-balanced batches under tf.distribute: one global P x K batch, one slice per replica.

FaceNet mines triplets inside the mini-batch (Section 3.2; ~1,800 images per batch, Section 4).
Under a strategy of N replicas the batch that is mined must still be the P x K batch the flags ask
for, so the input side keeps that **global batch** and only splits it:

* Every input pipeline (one per worker) builds the SAME deterministic sequence of global batches
  (:func:`data.pipeline.balanced_dataset`, seeded from --seed, so the same on every worker) and
  keeps only its own rows. With W workers x G local replicas (N = W*G, B = P*K, b = B/N), global
  replica r = w*G + g receives rows ``[r*b, (r+1)*b)`` of every global batch: worker w keeps rows
  ``[w*G*b, (w+1)*G*b)`` and hands them to its local replicas in order (tf.distribute gives
  consecutive elements of a worker's dataset to its local replicas 0..G-1 in turn; the tests check
  it). Every row goes to exactly one replica; no batch is duplicated across workers. Concatenating
  the replicas' slices in ``replica_id_in_sync_group`` order (what an all-gather does) gives back
  the single-device global batch exactly, pixels included.
* The slicing is **contiguous rows**, so it follows the batch layout (identity p occupies rows
  p*K .. p*K+K-1). When P % N == 0 every replica holds P/N **whole identities** (K images each).
* ``mining_scope="global"`` (the losses all-gather embeddings and labels and mine over the whole
  [B, B] distance matrix): only B % N == 0 is required. An identity may then straddle two replicas;
  the global loss does not mind, because it sees every row.
* ``mining_scope="replica"`` (each replica mines in its own slice, for comparison): P % N == 0 is
  required, so that each replica holds whole identities (positives for every anchor), and
  P/N >= 2, so that each replica has negatives.
* One replica (or no strategy): the dataset is returned unchanged, so single-device runs are
  byte-for-byte what they were.

TFRecord sources under several workers: **every worker reads all the shards** (into memory once,
:func:`data.tfrecords.load_tfrecords`) and keeps its slice of each global batch, like a folder
source. Shards are not split across workers because ``data.tfrecords.write_tfrecords`` spreads
the images of every identity over every shard (seeded random order): a worker holding 1/W of the
shards holds part of the images of nearly every identity, so it can neither draw K images of an
identity whose other images live on other workers, nor make the W workers' identities P distinct
ones, without exchanging records. Splitting the identities between workers instead would change
the batch sequence with W (no longer the single-device batches, no longer reproducible across
cluster sizes). The cost is W x the shard reads and memory (bounded by ``max_bytes``).

A builder that accepts ``rows=(start, stop)`` (train.py's does: :func:`data.pipeline.balanced_dataset`
selects the rows before decoding) makes each worker decode and augment only its own share; a
builder without it yields whole global batches and each worker drops the other workers' rows.
"""
from __future__ import annotations

import tensorflow as tf

from choices import MINING_SCOPES


def check_replica_split(num_replicas: int, identities_per_batch: int, images_per_identity: int,
                        mining_scope: str = "global") -> int:
    """Raises ValueError unless a P x K global batch splits over ``num_replicas`` replicas.

    Args:
      num_replicas: N, replicas in sync (all workers).
      identities_per_batch: P.
      images_per_identity: K.
      mining_scope: "global" needs B = P*K divisible by N; "replica" needs P divisible by N (whole
        identities per replica) and P/N >= 2 (negatives in every replica).
    Returns:
      b = B / N, the rows (images) each replica receives per step.
    """
    n, p, k = int(num_replicas), int(identities_per_batch), int(images_per_identity)
    if mining_scope not in MINING_SCOPES:
        raise ValueError(f"mining_scope must be one of {MINING_SCOPES}, got {mining_scope!r}")
    if n < 1:
        raise ValueError(f"the number of replicas must be >= 1, got {n}")
    b = p * k
    if b % n:
        raise ValueError(
            f"the global batch P x K = {p} x {k} = {b} images does not split evenly over {n} "
            f"replicas; choose P x K divisible by {n}")
    if mining_scope == "replica" and p % n:
        raise ValueError(
            f"mining_scope=replica mines inside each replica's slice, which must hold whole "
            f"identities: identities_per_batch P={p} must be divisible by the {n} replicas "
            f"(or use mining_scope=global)")
    if mining_scope == "replica" and n > 1 and p // n < 2:
        raise ValueError(
            f"mining_scope=replica with P={p} over {n} replicas leaves {p // n} identity per "
            f"replica: no negatives to mine; use P >= {2 * n} or mining_scope=global")
    return b // n


def pipeline_rows(input_context: tf.distribute.InputContext, global_batch: int):
    """Which rows of each global batch one input pipeline keeps.

    Args:
      input_context: the pipeline's context (``num_input_pipelines`` W, ``input_pipeline_id`` w,
        ``num_replicas_in_sync`` N).
      global_batch: B images.
    Returns:
      (start row, local replicas G = N/W, rows per replica b = B/N): the pipeline keeps rows
      [start, start + G*b), start = w*G*b.
    """
    w, workers = input_context.input_pipeline_id, input_context.num_input_pipelines
    n = input_context.num_replicas_in_sync
    if n % workers:
        raise ValueError(f"{n} replicas do not split over {workers} input pipelines")
    if global_batch % n:
        raise ValueError(f"a global batch of {global_batch} does not split over {n} replicas")
    local, per_replica = n // workers, global_batch // n
    return w * local * per_replica, local, per_replica


def slice_for_pipeline(dataset: tf.data.Dataset, global_batch: int,
                       input_context: tf.distribute.InputContext) -> tf.data.Dataset:
    """A dataset of global batches -> this pipeline's per-replica batches, in replica order.

    Args:
      dataset: elements whose tensors all have a leading dimension of ``global_batch`` B (any
        nest: a tuple, a dict, ``({"images", "labels"},)``).
      global_batch: B.
      input_context: see :func:`pipeline_rows`.
    Returns:
      tf.data.Dataset with G elements per global batch, of the same structure, every tensor
      [b, ...]: element g of global step s holds rows [start + g*b, start + (g+1)*b) of step s.
    """
    start, local, per_replica = pipeline_rows(input_context, global_batch)
    for spec in tf.nest.flatten(dataset.element_spec):
        if spec.shape.rank is None or spec.shape.rank == 0 or spec.shape[0] != global_batch:
            raise ValueError(f"every tensor of a global batch must be [{global_batch}, ...], "
                             f"got {spec.shape}")

    def cut(t):  # [B, ...] -> [G, b, ...]
        rows = t[start:start + local * per_replica]
        return tf.reshape(rows, [local, per_replica] + t.shape[1:].as_list())

    is_tuple = isinstance(dataset.element_spec, tuple)

    def split(*element):  # tf.data unpacks tuples into arguments; keep the structure as it was
        element = element if is_tuple else element[0]
        return tf.nest.map_structure(cut, element)

    return dataset.map(split).unbatch()


def _split_local(dataset, local, per_replica):
    """Elements [G*b, ...] -> G consecutive elements [b, ...] (local replicas in order)."""
    def cut(t):
        return tf.reshape(t, [local, per_replica] + t.shape[1:].as_list())

    is_tuple = isinstance(dataset.element_spec, tuple)

    def split(*element):
        element = element if is_tuple else element[0]
        return tf.nest.map_structure(cut, element)

    return dataset.map(split).unbatch()


def pipeline_dataset_fn(make_global_dataset, global_batch: int, selects_rows: bool = False):
    """``fn(input_context)`` for ``strategy.distribute_datasets_from_function``.

    Without ``selects_rows`` it builds the global batch sequence with ``make_global_dataset()``
    and keeps this pipeline's slices (:func:`slice_for_pipeline`); with it, it calls
    ``make_global_dataset(rows=(start, stop))`` for this pipeline's rows only (the same rows,
    built without the other workers' share) and splits them over the local replicas.
    """

    def dataset_fn(input_context):
        if not selects_rows:
            return slice_for_pipeline(make_global_dataset(), global_batch, input_context)
        start, local, per_replica = pipeline_rows(input_context, global_batch)
        dataset = make_global_dataset(rows=(start, start + local * per_replica))
        for spec in tf.nest.flatten(dataset.element_spec):
            if spec.shape.rank is None or spec.shape.rank == 0 or \
                    spec.shape[0] != local * per_replica:
                raise ValueError(f"rows=({start}, {start + local * per_replica}) must give "
                                 f"[{local * per_replica}, ...] tensors, got {spec.shape}")
        return _split_local(dataset, local, per_replica)

    return dataset_fn


def distribute_balanced(strategy, make_global_dataset, identities_per_batch: int,
                        images_per_identity: int, mining_scope: str = "global",
                        selects_rows: bool = False):
    """What Keras ``fit`` should get under ``strategy`` for P x K global batches.

    Args:
      strategy: a tf.distribute.Strategy, or None.
      make_global_dataset: callable, no arguments -> tf.data.Dataset of global batches whose
        tensors are all [P*K, ...] (e.g. images float32 [P*K, H, W, 3], labels int32 [P*K]),
        deterministic (the same sequence on every worker: seed it from --seed).
      identities_per_batch: P.
      images_per_identity: K.
      mining_scope: "global" or "replica" (see :func:`check_replica_split`).
      selects_rows: ``make_global_dataset`` also accepts ``rows=(start, stop)`` and then yields
        only those rows of every global batch (decoded only for them), see
        :func:`pipeline_dataset_fn`.
    Returns:
      With no strategy or one replica: ``make_global_dataset()`` itself, unchanged. Otherwise a
      ``tf.distribute`` DistributedDatasetsFromFunction whose per-replica values are
      [P*K/N, ...]: replica r gets rows [r*B/N, (r+1)*B/N) of every global batch.
    Raises:
      ValueError: the batch does not split over the replicas (:func:`check_replica_split`).
    """
    n = 1 if strategy is None else int(strategy.num_replicas_in_sync)
    check_replica_split(n, identities_per_batch, images_per_identity, mining_scope)
    if n == 1:
        return make_global_dataset()
    global_batch = int(identities_per_batch) * int(images_per_identity)
    return strategy.distribute_datasets_from_function(
        pipeline_dataset_fn(make_global_dataset, global_batch, selects_rows))
