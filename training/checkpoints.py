"""Restore the newest checkpoint of a directory that is intact, skipping damaged ones.

A checkpoint is the prefix ``DIR/ckpt-N`` of the files ``ckpt-N.index`` and
``ckpt-N.data-00000-of-0000M`` written by ``tf.train.CheckpointManager``; ``DIR/checkpoint`` (the
"state file") lists the kept ones. A damaged checkpoint (truncated, zero-byte, byte-flipped or
missing file) makes ``tf.train.Checkpoint.restore`` raise deep in TensorFlow, so each candidate is
first read in full with ``tf.train.load_checkpoint`` (every tensor, which checks the bundle's CRCs)
without touching the model: a read error means "damaged", while an error of the restore itself (a
network that does not match) is the caller's and propagates.

Multi-worker jobs (training/trainer.py): the chief picks the checkpoint and every worker restores
that one from the chief's folder (:func:`restore_chiefs_choice`); a non-chief worker saves into a
scratch folder that is deleted right away (:func:`save_and_discard`).

Used by train.py (resume), export.py and evaluate.py --model_dir. Damaged checkpoints are never
deleted: read-only users (export, evaluate, train.py --projector_only) leave them in place; the
training run, which holds the model_dir lock, moves them into ``DIR/damaged/`` and rewrites the
state file without them, so that the CheckpointManager's max_to_keep rotation cannot delete them
and a new checkpoint of the same step cannot overwrite them. Either way one warning line names them.
"""
import glob
import os
import re
import shutil
import tempfile

from absl import logging

from exit_codes import CLUSTER, NO_CHECKPOINT, CliError

DAMAGED_SUBDIR = "damaged"
STATE_NAME = "checkpoint"
_NUMBER = re.compile(r"-(\d+)$")


class NoCheckpointError(CliError):
    """No checkpoint in the directory restores (exit code NO_CHECKPOINT)."""

    def __init__(self, message):
        super().__init__(message, NO_CHECKPOINT)


def checkpoint_number(prefix):
    """The N of ``.../ckpt-N`` (the training step train.py saves under), or None."""
    m = _NUMBER.search(os.path.basename(prefix))
    return int(m.group(1)) if m else None


def _prefixes_on_disk(directory):
    """Prefixes that have an index or a data file directly in ``directory``."""
    found = set()
    for path in glob.glob(os.path.join(glob.escape(directory), "*.index")):
        found.add(path[: -len(".index")])
    for path in glob.glob(os.path.join(glob.escape(directory), "*.data-?????-of-?????")):
        found.add(path.rsplit(".data-", 1)[0])
    return found


def _newest_first(prefixes):
    def key(p):
        n = checkpoint_number(p)
        return (n if n is not None else -1, p)

    return sorted(prefixes, key=key, reverse=True)


def _local(directory, prefix):
    """A prefix the state file recorded as an absolute path elsewhere (a moved model_dir) is read
    from ``directory`` when its files are there."""
    local = os.path.join(directory, os.path.basename(prefix))
    if os.path.dirname(prefix) != directory and glob.glob(glob.escape(local) + ".index"):
        return local
    return prefix


def list_checkpoints(directory):
    """The checkpoints of ``directory``, newest (highest step) first, as absolute-or-given prefixes.

    Those the state file lists; when it is missing or unreadable (or lists none), the prefixes
    found on disk instead. Returns (prefixes, from_state_file).
    """
    import tensorflow as tf

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return [], False
    try:
        state = tf.train.get_checkpoint_state(directory)
    except (ValueError, OSError, tf.errors.OpError):  # e.g. a zero-byte state file
        state = None
    if state is not None:
        listed = set(state.all_model_checkpoint_paths) | {state.model_checkpoint_path}
        return _newest_first({_local(directory, p) for p in listed}), True
    return _newest_first(_prefixes_on_disk(directory)), False


def damage_reason(prefix):
    """None when every tensor of checkpoint ``prefix`` reads back intact, else a one-line reason."""
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except MemoryError:
        raise
    except (tf.errors.OpError, IndexError, ValueError, OSError, RuntimeError, KeyError) as exc:
        text = (str(getattr(exc, "message", "") or exc).strip().splitlines() or [""])[0]
        return f"{type(exc).__name__}: {text[:120]}"
    return None


def _move_aside(prefix):
    """Move the files of ``prefix`` into ``<dir>/damaged/`` (never over an older move). Returns
    the new prefix."""
    directory, name = os.path.split(prefix)
    target_dir = os.path.join(directory, DAMAGED_SUBDIR)
    os.makedirs(target_dir, exist_ok=True)
    target, i = os.path.join(target_dir, name), 0
    while glob.glob(glob.escape(target) + ".*"):
        i += 1
        target = os.path.join(target_dir, f"{name}.moved-{i}")
    for path in glob.glob(glob.escape(prefix) + ".index") + glob.glob(
            glob.escape(prefix) + ".data-?????-of-?????"):
        os.replace(path, target + path[len(prefix):])
    return target


def _write_state(directory, prefixes_newest_first):
    """Rewrite the state file to list ``prefixes`` (relative names, oldest first), with their
    save times (the index files' mtimes, seconds) so that max_to_keep rotates them as before."""
    from data.atomic import write_text_atomically

    oldest_first = list(reversed(prefixes_newest_first))
    stamps = []
    for p in oldest_first:
        try:
            stamps.append(os.path.getmtime(p + ".index"))
        except OSError:
            stamps.append(stamps[-1] if stamps else 0.0)
    lines = [f'model_checkpoint_path: "{os.path.basename(oldest_first[-1])}"']
    lines += [f'all_model_checkpoint_paths: "{os.path.basename(p)}"' for p in oldest_first]
    lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in stamps]
    lines.append(f"last_preserved_timestamp: {min(stamps) - 1.0!r}")
    write_text_atomically(os.path.join(directory, STATE_NAME), "\n".join(lines) + "\n")


def find_intact(directory, move_damaged=False):
    """The newest intact checkpoint of ``directory``, or None when it holds none at all.

    Damaged newer ones are skipped with one warning line; with ``move_damaged`` (only for the
    process that owns the directory) they are moved to ``directory/damaged/`` and the state file
    is rewritten without them, which is also done when the state file was unreadable. Raises
    :class:`NoCheckpointError` when there are checkpoints but none is intact (nothing is moved).
    """
    directory = os.fspath(directory)
    candidates, from_state = list_checkpoints(directory)
    damaged = []
    for prefix in candidates:
        reason = damage_reason(prefix)
        if reason is None:
            break
        damaged.append((prefix, reason))
    else:
        if damaged:
            names = "; ".join(f"{os.path.basename(p)} ({r})" for p, r in damaged)
            raise NoCheckpointError(
                f"no checkpoint in {directory} restores, all {len(damaged)} are damaged: {names}. "
                "They were left in place; use a new --model_dir, or move the checkpoints folder "
                "aside to start again")
        return None
    kept = [p for p in candidates if p not in dict(damaged)]
    if damaged:
        names = ", ".join(f"{os.path.basename(p)} ({r})" for p, r in damaged)
        if move_damaged:
            for p, _ in damaged:
                _move_aside(p)
            where = f"moved to {os.path.join(directory, DAMAGED_SUBDIR)} (kept, not deleted)"
        else:
            where = "left in place"
        logging.warning("skipped %d damaged checkpoint(s): %s; using %s instead; the damaged "
                        "files were %s", len(damaged), names, os.path.basename(prefix), where)
    if move_damaged and (damaged or not from_state):
        _write_state(directory, kept)
    return prefix


def require_intact(prefix):
    """Check one named checkpoint (e.g. export.py --checkpoint); NoCheckpointError if damaged."""
    reason = damage_reason(os.fspath(prefix))
    if reason is not None:
        raise NoCheckpointError(f"checkpoint {prefix} does not restore: {reason}")
    return prefix


def save_and_discard(checkpoint, step, scratch):
    """A non-chief worker's checkpoint: saved as the chief saves its own
    (tf.train.CheckpointManager, number ``step``: saving can involve collectives, so every worker
    must), into a fresh folder
    under ``scratch`` that is deleted right after (TensorFlow's multi-worker Keras pattern)."""
    import tensorflow as tf

    folder = tempfile.mkdtemp(prefix="ckpt-", dir=scratch)
    try:
        tf.train.CheckpointManager(checkpoint, folder, max_to_keep=1).save(checkpoint_number=step)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def restore_chiefs_choice(checkpoint, directory, sync, task_name, step_fn):
    """Multi-worker resume: the chief finds the newest intact checkpoint of ``directory`` (moving
    damaged ones aside, :func:`find_intact`) and every worker restores that one, ``ckpt-<step>``
    of the chief's folder, into ``checkpoint``. ``sync``: distribute.WorkerSync (collectives:
    every worker calls this at the same point); ``step_fn``: the restored step.

    Returns the restored prefix, or None for a fresh start. Raises NoCheckpointError when this
    worker cannot read the chief's checkpoint (--model_dir not shared by the workers), CliError
    (CLUSTER) when the workers end up at different steps.
    """
    number, path = -1.0, None
    if sync.is_chief:
        path = find_intact(directory, move_damaged=True)
        if path is not None:
            number = float(checkpoint_number(path) if checkpoint_number(path) is not None else -1)
            if number < 0:
                raise NoCheckpointError(f"{path}: not a train.py checkpoint name (ckpt-<step>)")
    number = sync.chief_value(number)
    if number >= 0 and not sync.is_chief:
        path = os.path.join(os.fspath(directory), f"ckpt-{int(number)}")
        reason = damage_reason(path)
        if reason is not None:
            raise NoCheckpointError(
                f"{task_name} cannot read the chief's checkpoint {path} ({reason}): every worker "
                f"must see the chief's --model_dir (one folder on a filesystem they share)")
    if path is not None:
        checkpoint.restore(path).assert_existing_objects_matched()
    steps = sync.gather([float(step_fn())])[:, 0]
    if steps.min() != steps.max():
        raise CliError(f"the workers resumed at different steps ({sorted(set(steps.tolist()))}); "
                       f"restart every worker of the job", CLUSTER)
    return path
