"""Fault tests for the training side of issue #16: damaged checkpoints (defect 3), the model_dir
lock (defect 4), config.json from a run that never trained (defect 8), and kill -9 at random
moments during training.

The checkpoint and lock tests run in-process on tiny tf.train.Checkpoint files and helper
processes (seconds); the end-to-end ones run train.py, export.py and evaluate.py in subprocesses
on a tiny synthetic set (32 px, the ``tiny`` model) and are marked slow.
"""
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from exit_codes import LOCKED, NO_CHECKPOINT, USAGE, CliError

from tests.helpers import REPO, subprocess_env as _env


# --------------------------------------------------------------------------- damaged checkpoints

def _write_checkpoints(directory, steps=(1, 2, 3), max_to_keep=5):
    """Checkpoints ckpt-<step> of a [50, 20] variable filled with the step; returns the objects."""
    import tensorflow as tf

    v = tf.Variable(tf.zeros([50, 20]))
    ckpt = tf.train.Checkpoint(v=v)
    manager = tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=max_to_keep)
    for s in steps:
        v.assign(tf.fill([50, 20], float(s)))
        manager.save(checkpoint_number=s)
    return v, ckpt


def _damage(prefix, kind):
    data, index = prefix + ".data-00000-of-00001", prefix + ".index"
    if kind == "truncated_data":
        os.truncate(data, os.path.getsize(data) // 2)
    elif kind == "zero_byte_data":
        os.truncate(data, 0)
    elif kind == "flipped_data":
        with open(data, "r+b") as f:
            f.seek(os.path.getsize(data) // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
    elif kind == "missing_index":
        os.remove(index)
    elif kind == "truncated_index":
        os.truncate(index, os.path.getsize(index) // 2)
    else:
        raise ValueError(kind)


def _files(directory):
    return sorted(os.path.relpath(p, directory)
                  for p in glob.glob(os.path.join(directory, "**", "*"), recursive=True)
                  if os.path.isfile(p))


@pytest.mark.parametrize("kind", ["truncated_data", "zero_byte_data", "flipped_data",
                                  "missing_index", "truncated_index"])
def test_damaged_newest_checkpoint_is_skipped_and_left_in_place(tmp_path, kind, caplog):
    """Read-only users (export, evaluate) get the newest intact one, one warning, nothing moved."""
    from training.checkpoints import find_intact

    d = str(tmp_path / "ckpts")
    v, ckpt = _write_checkpoints(d)
    _damage(os.path.join(d, "ckpt-3"), kind)
    before = _files(d)
    with caplog.at_level("WARNING"):
        path = find_intact(d)
    assert path == os.path.join(d, "ckpt-2")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                and "damaged" in r.getMessage()]
    assert len(warnings) == 1 and "ckpt-3" in warnings[0] and "left in place" in warnings[0]
    assert _files(d) == before  # nothing deleted or moved
    ckpt.restore(path).assert_existing_objects_matched()
    assert float(v.numpy()[0, 0]) == 2.0


def test_training_moves_damaged_aside_and_rotation_never_deletes_them(tmp_path):
    """The owner (train.py) moves the damaged one to damaged/; later saves with max_to_keep=2
    neither overwrite nor delete it, and rotation of the intact ones still works."""
    import tensorflow as tf

    from training.checkpoints import DAMAGED_SUBDIR, find_intact

    d = str(tmp_path / "ckpts")
    v, ckpt = _write_checkpoints(d, steps=(2, 4))
    _damage(os.path.join(d, "ckpt-4"), "truncated_data")
    damaged_bytes = open(os.path.join(d, "ckpt-4.data-00000-of-00001"), "rb").read()
    path = find_intact(d, move_damaged=True)
    assert path == os.path.join(d, "ckpt-2")
    moved = os.path.join(d, DAMAGED_SUBDIR, "ckpt-4.data-00000-of-00001")
    assert open(moved, "rb").read() == damaged_bytes
    assert not glob.glob(os.path.join(d, "ckpt-4.*"))
    ckpt.restore(path)
    manager = tf.train.CheckpointManager(ckpt, d, max_to_keep=2)
    assert manager.latest_checkpoint == path  # the state file no longer names ckpt-4
    for step in (4, 6, 8):  # ckpt-4 again: a new file, the damaged one untouched
        v.assign(tf.fill([50, 20], float(step)))
        manager.save(checkpoint_number=step)
    assert open(moved, "rb").read() == damaged_bytes
    assert os.path.exists(os.path.join(d, DAMAGED_SUBDIR, "ckpt-4.index"))
    kept = sorted(os.path.basename(p)[:-6] for p in glob.glob(os.path.join(d, "*.index")))
    assert kept == ["ckpt-6", "ckpt-8"]  # max_to_keep rotated ckpt-2 and the new ckpt-4


def test_a_second_damage_of_the_same_step_does_not_overwrite_the_first(tmp_path):
    from training.checkpoints import DAMAGED_SUBDIR, find_intact

    d = str(tmp_path / "ckpts")
    for _ in range(2):
        _write_checkpoints(d, steps=(1, 2))
        _damage(os.path.join(d, "ckpt-2"), "truncated_data")
        assert find_intact(d, move_damaged=True) == os.path.join(d, "ckpt-1")
    names = sorted(os.listdir(os.path.join(d, DAMAGED_SUBDIR)))
    assert len([n for n in names if n.endswith(".index")]) == 2, names


def test_no_intact_checkpoint_is_a_clear_error_and_nothing_moves(tmp_path):
    from training.checkpoints import NoCheckpointError, find_intact

    d = str(tmp_path / "ckpts")
    _write_checkpoints(d, steps=(1, 2))
    _damage(os.path.join(d, "ckpt-1"), "zero_byte_data")
    _damage(os.path.join(d, "ckpt-2"), "missing_index")
    before = _files(d)
    with pytest.raises(NoCheckpointError) as err:
        find_intact(d, move_damaged=True)
    assert isinstance(err.value, CliError) and err.value.exit_code == NO_CHECKPOINT
    assert "ckpt-1" in str(err.value) and "ckpt-2" in str(err.value)
    assert "\n" not in str(err.value)
    assert _files(d) == before


def test_empty_or_missing_directory_has_no_checkpoint(tmp_path):
    from training.checkpoints import find_intact

    assert find_intact(str(tmp_path / "absent")) is None
    os.makedirs(tmp_path / "empty")
    assert find_intact(str(tmp_path / "empty"), move_damaged=True) is None


def test_unreadable_state_file_falls_back_to_the_files(tmp_path):
    """A zero-byte ``checkpoint`` state file makes CheckpointManager raise; the checkpoints on disk
    are still found, and the owner rewrites the state file."""
    import tensorflow as tf

    from training.checkpoints import find_intact

    d = str(tmp_path / "ckpts")
    v, ckpt = _write_checkpoints(d, steps=(3, 5))
    os.truncate(os.path.join(d, "checkpoint"), 0)
    with pytest.raises(ValueError):
        tf.train.CheckpointManager(ckpt, d, max_to_keep=3)
    assert find_intact(d) == os.path.join(d, "ckpt-5")
    assert find_intact(d, move_damaged=True) == os.path.join(d, "ckpt-5")
    assert tf.train.CheckpointManager(ckpt, d, max_to_keep=3).latest_checkpoint == \
        os.path.join(d, "ckpt-5")


def test_a_named_damaged_checkpoint_is_refused(tmp_path):
    from training.checkpoints import NoCheckpointError, require_intact

    d = str(tmp_path / "ckpts")
    _write_checkpoints(d, steps=(1, 2))
    _damage(os.path.join(d, "ckpt-1"), "flipped_data")
    assert require_intact(os.path.join(d, "ckpt-2")) == os.path.join(d, "ckpt-2")
    with pytest.raises(NoCheckpointError, match="ckpt-1"):
        require_intact(os.path.join(d, "ckpt-1"))


# --------------------------------------------------------------------------------- model_dir lock

_HOLD = ("import sys, time; sys.path.insert(0, {repo!r}); from training.lock import lock_model_dir; "
         "lock_model_dir(sys.argv[1]); print('locked', flush=True); {then}")


def _holder(model_dir, then="time.sleep(120)"):
    """A helper process that takes the lock of model_dir, then runs ``then``."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD.format(repo=REPO, then=then),
                             str(model_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


def test_second_lock_is_refused_naming_the_running_holder(tmp_path):
    from training.lock import LOCK_NAME, LockedError, ModelDirLock

    holder = _holder(tmp_path)
    try:
        with pytest.raises(LockedError) as err:
            ModelDirLock(tmp_path).acquire()
        assert err.value.exit_code == LOCKED
        assert f"PID {holder.pid}" in str(err.value) and socket.gethostname() in str(err.value)
        assert json.load(open(tmp_path / LOCK_NAME))["pid"] == holder.pid  # untouched
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    from training.lock import LOCK_NAME, ModelDirLock

    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert os.path.exists(tmp_path / LOCK_NAME)  # kill -9 leaves it behind
    lock = ModelDirLock(tmp_path)
    with caplog.at_level("WARNING"):
        lock.acquire()
    assert any("stale" in r.getMessage() and str(holder.pid) in r.getMessage()
               for r in caplog.records)
    assert json.load(open(tmp_path / LOCK_NAME))["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(tmp_path / LOCK_NAME)


def test_lock_is_released_at_exit_even_after_an_error(tmp_path):
    from training.lock import LOCK_NAME

    holder = _holder(tmp_path, then="raise RuntimeError('boom')")
    holder.wait(timeout=60)
    assert holder.returncode != 0 and "boom" in holder.stderr.read()
    assert not os.path.exists(tmp_path / LOCK_NAME)


def test_reused_pid_other_boot_and_other_host(tmp_path):
    """A live PID whose start time differs (reused PID) or a lock from before a reboot is stale;
    a lock from another host cannot be checked and is never taken over."""
    from training.lock import LOCK_NAME, LockedError, ModelDirLock, is_stale

    parent = os.getppid()  # alive, and not us
    me = {"pid": parent, "host": socket.gethostname(), "since": time.time()}
    assert not is_stale(me)
    assert is_stale({**me, "start": -1})  # another process now has that PID
    assert is_stale({**me, "boot": "not-this-boot"})
    assert is_stale({**me, "pid": 2 ** 22 + 12345})  # no such process
    other = {**me, "host": socket.gethostname() + "-elsewhere", "pid": 2 ** 22 + 12345}
    assert not is_stale(other)
    with open(tmp_path / LOCK_NAME, "w") as f:
        json.dump(other, f)
    with pytest.raises(LockedError, match="elsewhere"):
        ModelDirLock(tmp_path).acquire()


def test_release_never_removes_another_process_lock(tmp_path):
    from training.lock import LOCK_NAME, ModelDirLock

    lock = ModelDirLock(tmp_path).acquire()
    theirs = {"pid": os.getppid(), "host": socket.gethostname(), "token": "theirs"}
    with open(tmp_path / LOCK_NAME, "w") as f:  # as if another run had taken it over
        json.dump(theirs, f)
    lock.release()
    assert json.load(open(tmp_path / LOCK_NAME)) == theirs


def test_unreadable_lock_file_is_taken_over_once_old(tmp_path, monkeypatch):
    """A run killed between creating the lock and writing it leaves an empty file."""
    from training import lock as lock_mod

    path = tmp_path / lock_mod.LOCK_NAME
    path.write_text("")
    old = time.time() - 2 * lock_mod._FRESH_SECONDS
    os.utime(path, (old, old))
    lock = lock_mod.ModelDirLock(tmp_path).acquire()
    assert json.load(open(path))["token"] == lock.token
    lock.release()


# ------------------------------------------------------------------------------ train.py end to end

@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Synthetic faces, 32 px: 8 training identities and 4 held out, 6 images each."""
    from data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("faces")
    return generate_dataset(str(root), identities=12, images_per_identity=6, image_size=32,
                            seed=11, heldout_identities=4, workers=1, progress=False,
                            compute_baseline=False)


def _train_cmd(model_dir, faces, *extra):
    return [sys.executable, os.path.join(REPO, "train.py"), "--recipe=synthetic", "--model=tiny",
            "--image_size=32", f"--data_dir={faces['train_dir']}",
            f"--val_dir={faces['test_dir']}", f"--model_dir={model_dir}",
            "--identities_per_batch=4", "--images_per_identity=4", "--steps_per_epoch=2",
            "--export=false", "--projector_images=0", *extra]


def _run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, f"{proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


def _error_lines(stderr):
    """stderr without TF/absl log lines (they start with a level letter and a date)."""
    return [line for line in stderr.splitlines()
            if line.strip() and not (line[:1] in "IWE" and line[1:5].isdigit())
            and not line.startswith("WARNING:")]


@pytest.mark.slow
def test_train_export_evaluate_fall_back_past_a_damaged_newest_checkpoint(tmp_path, faces):
    """Issue #16 defect 3, as reported: a truncated newest checkpoint no longer stops train.py
    (resume from the step before), export.py or evaluate.py --model_dir; none restores: exit 8."""
    m = str(tmp_path / "m")
    _ok(_run(_train_cmd(m, faces, "--max_steps=4")))
    ck = os.path.join(m, "checkpoints")
    _damage(os.path.join(ck, "ckpt-4"), "truncated_data")

    proc = _ok(_run([sys.executable, os.path.join(REPO, "export.py"), f"--model_dir={m}",
                     f"--export_dir={tmp_path / 'export'}"]))
    assert json.loads(proc.stdout.strip().splitlines()[-1])["checkpoint"] == os.path.join(ck, "ckpt-2")
    assert "ckpt-4" in proc.stderr and "damaged" in proc.stderr
    proc = _ok(_run([sys.executable, os.path.join(REPO, "evaluate.py"), f"--model_dir={m}",
                     f"--data_dir={faces['test_dir']}", "--pairs=all", "--noclustering",
                     "--noidentification"]))
    assert "ckpt-4" in proc.stderr and "damaged" in proc.stderr
    assert os.path.exists(os.path.join(ck, "ckpt-4.index"))  # read-only users leave it

    proc = _ok(_run(_train_cmd(m, faces, "--max_steps=6")))
    metrics = _metrics(m)
    assert metrics["resumed_from"] == os.path.join(ck, "ckpt-2") and metrics["step"] == 6
    assert [h["step"] for h in metrics["history"]] == [4, 6]  # continued from the restored step
    assert len([ln for ln in proc.stderr.splitlines() if "damaged checkpoint" in ln]) == 1
    assert os.path.exists(os.path.join(ck, "damaged", "ckpt-4.data-00000-of-00001"))

    for prefix in glob.glob(os.path.join(ck, "ckpt-*.index")):
        _damage(prefix[:-len(".index")], "zero_byte_data")
    for cmd in ([sys.executable, os.path.join(REPO, "export.py"), f"--model_dir={m}"],
                _train_cmd(m, faces, "--max_steps=8")):
        proc = _run(cmd)
        assert proc.returncode == NO_CHECKPOINT, proc.stderr[-3000:]
        lines = _error_lines(proc.stderr)
        assert len(lines) == 1 and "error:" in lines[0] and "damaged" in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_second_train_run_on_a_locked_model_dir_is_refused(tmp_path, faces):
    """Issue #16 defect 4: a second train.py on a model_dir in use exits LOCKED naming the PID,
    and writes nothing there."""
    m = tmp_path / "m"
    holder = _holder(m)
    try:
        proc = _run(_train_cmd(str(m), faces, "--max_steps=2"))
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == LOCKED, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and f"PID {holder.pid}" in lines[0], proc.stderr
    assert sorted(os.listdir(m)) == [".lock"]


@pytest.mark.slow
def test_a_run_that_failed_before_training_does_not_block_a_corrected_rerun(tmp_path, faces):
    """Issue #16 defect 8: a run that fails before its first checkpoint leaves no config.json,
    and a config.json without any checkpoint (an older version's leftover) is ignored."""
    m = str(tmp_path / "m")
    # fails once the model is built, before the first step: P = 40 > the 8 training identities
    proc = _run(_train_cmd(m, faces, "--max_steps=2", "--optimizer=adagrad",
                           "--identities_per_batch=40"))
    # a P x K batch the data cannot fill is a user error: one line, exit USAGE, no traceback
    assert proc.returncode == USAGE and "P=40" in proc.stderr.strip().splitlines()[-1], \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not glob.glob(os.path.join(m, "checkpoints", "*.index"))
    assert not os.path.exists(os.path.join(m, "config.json"))
    assert not os.path.exists(os.path.join(m, ".lock"))  # released on the error path too
    with open(os.path.join(m, "config.json"), "w", encoding="utf-8") as f:  # old behaviour
        json.dump({"model": "nn4", "image_size": [96, 96], "embedding_size": 64,
                   "normalization": "batch", "optimizer": "adagrad"}, f)
    _ok(_run(_train_cmd(m, faces, "--max_steps=2", "--optimizer=adam")))
    with open(os.path.join(m, "config.json"), encoding="utf-8") as f:
        stored = json.load(f)
    assert stored["optimizer"] == "adam" and stored["model"] == "tiny"
    # a real resume still checks the stored flags
    proc = _run(_train_cmd(m, faces, "--max_steps=4", "--optimizer=adagrad"))
    assert proc.returncode != 0 and "--optimizer=adam" in proc.stderr
    # ... and flags that describe another network are refused in one line naming the difference
    proc = _run(_train_cmd(m, faces, "--max_steps=4", "--optimizer=adam", "--embedding_size=64"))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == USAGE and last.startswith("train.py: error: ") and \
        "embedding_size" in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_random_kill_minus_9_and_resume_equals_an_uninterrupted_run(tmp_path, faces):
    """Several kill -9 at random moments (start-up, training, saving, validation) of one short
    run, each followed by a rerun: the final step and every checkpointed tensor (weights and
    optimiser state) equal an uninterrupted run's. Seed with KILL_SEED to replay a schedule."""
    import tensorflow as tf

    seed = int(os.environ.get("KILL_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    steps = 10
    common = ("--optimizer=adagrad", "--augment=false", f"--max_steps={steps}")
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    _ok(_run(_train_cmd(straight, faces, *common)))

    state = os.path.join(killed, "checkpoints", "checkpoint")
    kills = []
    for i, mode in enumerate(("training", "start-up", "training")):
        log = open(tmp_path / f"segment{i}.log", "w")
        before = os.path.getmtime(state) if os.path.exists(state) else None
        proc = subprocess.Popen(_train_cmd(killed, faces, *common), cwd=REPO, env=_env(),
                                stdout=log, stderr=subprocess.STDOUT)
        t0 = time.time()
        try:
            if mode == "start-up":
                time.sleep(rng.uniform(0.5, 6.0))
            else:  # after this segment's first checkpoint, at a random point in the loop
                while time.time() - t0 < 120 and proc.poll() is None and (
                        not os.path.exists(state) or os.path.getmtime(state) == before):
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 1.5))
        finally:
            finished = proc.poll() is not None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            log.close()
        kills.append((mode, round(time.time() - t0, 2), finished))
        if finished:
            break
    _ok(_run(_train_cmd(killed, faces, *common)))
    info = f"KILL_SEED={seed}, kills (mode, seconds, had finished): {kills}"
    assert sum(not k[2] for k in kills) >= 2, info
    assert _metrics(killed)["step"] == steps, info

    a = tf.train.latest_checkpoint(os.path.join(straight, "checkpoints"))
    b = tf.train.latest_checkpoint(os.path.join(killed, "checkpoints"))
    assert os.path.basename(a) == os.path.basename(b) == f"ckpt-{steps}", info
    ra, rb = tf.train.load_checkpoint(a), tf.train.load_checkpoint(b)
    names = sorted(n for n in ra.get_variable_to_shape_map() if not n.startswith("_CHECKPOINTABLE"))
    assert sorted(n for n in rb.get_variable_to_shape_map()
                  if not n.startswith("_CHECKPOINTABLE")) == names
    assert any(n.startswith("optimizer/") for n in names)
    for n in names:
        np.testing.assert_allclose(ra.get_tensor(n), rb.get_tensor(n), rtol=1e-4, atol=1e-5,
                                   err_msg=f"{n}; {info}")
    assert not os.path.exists(os.path.join(killed, ".lock"))
    shutil.rmtree(tmp_path / "straight", ignore_errors=True)
