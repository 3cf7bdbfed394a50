"""train.py as a real 2-process MultiWorkerMirroredStrategy job on 127.0.0.1 (TF_CONFIG with two
free local ports), against one process on the same global batches.

- The job: both workers exit 0 at the same final step; only the chief's model_dir is written
  (one export, which TensorFlow alone loads), the worker's scratch folder is gone; the per-step
  training loss logged to TensorBoard and each epoch's loss in metrics.json match the single-process
  run's with rtol 1e-5 (measured: ~1e-7), the validation threshold with atol 1e-4. Both runs use
  --sync_batch_norm (statistics over the global batch, as one process computes them).
- Killing the non-chief worker after the first checkpoint: the chief notices (coordination-service
  heartbeats), exits with CLUSTER (11) on its own, and the restarted job resumes from the last
  checkpoint with the step counter intact, ending on the same loss as the uninterrupted run.
- Bad configurations end with one line and their exit code before TensorFlow is even imported
  (these runs cannot import it): TF_CONFIG missing, malformed, this task not in the cluster, this
  task's port in use, the model_dir locked by another run; a worker whose peer never comes up
  stops after FACENET_CLUSTER_TIMEOUT with CLUSTER.

Every process runs in its own session and is killed (SIGKILL: TensorFlow's preemption notifier
takes SIGTERM over while the server starts) on timeout and at the end of each test.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from exit_codes import CLUSTER, LOCKED, USAGE

from tests.helpers import REPO, subprocess_env

FLAGS = ["--model=tiny", "--image_size=32", "--synthetic_identities=24",
         "--synthetic_images_per_identity=6", "--identities_per_batch=4",
         "--images_per_identity=4", "--max_steps=4", "--steps_per_epoch=2",
         "--projector_images=20", "--sync_batch_norm"]
RUN_TIMEOUT = 420  # seconds for one train.py process on a busy 2-core machine
MODEL_DIR_FILES = {"checkpoints", "config.json", "export", "logs", "metrics.json",
                   "validated_files.json"}


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


class Processes:
    """train.py subprocesses, each in its own session with its output in files; all are killed
    (SIGKILL) by :meth:`kill_all`, and any one on timeout."""

    def __init__(self, root):
        self.root = root
        self.procs = []

    def start(self, name, model_dir, *extra, tf_config=None, env=None):
        env = subprocess_env(**(env or {}))
        env.pop("TF_CONFIG", None)
        if tf_config is not None:
            env["TF_CONFIG"] = tf_config
        out = open(os.path.join(self.root, f"{name}.out"), "w", encoding="utf-8")
        err = open(os.path.join(self.root, f"{name}.err"), "w", encoding="utf-8")
        cmd = [sys.executable, os.path.join(REPO, "train.py"), *FLAGS,
               f"--cache_dir={os.path.join(self.root, 'cache')}", f"--model_dir={model_dir}",
               *extra]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err,
                                start_new_session=True)
        proc.name, proc.files = name, (out, err)
        self.procs.append(proc)
        return proc

    def start_job(self, name, model_dir, *extra, env=None, ports=None):
        """The two workers of one job (worker 0 is the chief)."""
        ports = ports or _free_ports(2)
        return [self.start(f"{name}{i}", model_dir, "--distribution_strategy=multi_worker_mirrored",
                           *extra, tf_config=_tf_config(ports, i), env=env) for i in range(2)]

    @staticmethod
    def kill(proc):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=60)

    def wait(self, proc, timeout=RUN_TIMEOUT):
        """(returncode, stdout, stderr) of ``proc``; killed and AssertionError past ``timeout``."""
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            raise AssertionError(f"{proc.name} still running after {timeout} s (killed):\n"
                                 f"{self.output(proc)[1][-3000:]}") from None
        return (proc.returncode, *self.output(proc))

    def output(self, proc):
        texts = []
        for f in proc.files:
            f.flush()
            with open(f.name, encoding="utf-8", errors="replace") as r:
                texts.append(r.read())
        return texts

    def kill_all(self):
        for proc in self.procs:
            self.kill(proc)
            for f in proc.files:
                f.close()


def _ok(result, name):
    code, out, err = result
    assert code == 0, f"{name} exited {code}:\n{out[-2000:]}\n{err[-4000:]}"
    return out


def _summary(stdout):
    """The JSON object train.py prints last."""
    start = stdout.rindex("\n{\n") + 1 if "\n{\n" in stdout else stdout.index("{")
    return json.loads(stdout[start:])


def _step_losses(model_dir):
    """{step: logged training loss} from the TensorBoard events of ``model_dir``."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(model_dir, "logs", "train"), size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("train/loss")}


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


def _epoch_losses(metrics):
    return {h["step"]: h["train_loss"] for h in metrics["history"]}


def _kill_worker_after_first_checkpoint(procs, job, model_dir):
    """Kill the job's non-chief worker as soon as the chief has written its first checkpoint;
    then wait for the chief, which must exit by itself. Returns (chief's result, checkpoint files
    there were)."""
    chief, worker = job
    first = os.path.join(model_dir, "checkpoints", "ckpt-2.index")
    deadline = time.monotonic() + RUN_TIMEOUT
    while not os.path.exists(first) and chief.poll() is None and worker.poll() is None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    procs.kill(worker)
    result = procs.wait(chief, timeout=120)  # no hang: heartbeats end its collectives
    folder = os.path.dirname(first)
    saved = sorted(f for f in os.listdir(folder) if f.endswith(".index")) if os.path.isdir(
        folder) else []
    return result, saved


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Side by side (the synthetic data rendered once first): the single-process reference, the
    uninterrupted 2-worker job, and a job whose non-chief worker is killed after the first
    checkpoint (a thread watches for it). Returns their model_dirs, results and scratch root."""
    import threading

    from data.synthetic import ensure_synthetic_dataset
    from evaluation.pixel_baseline import pixel_baseline
    from training.data import SYNTHETIC_SEED

    root = str(tmp_path_factory.mktemp("multi_worker"))
    ensure_synthetic_dataset(os.path.join(root, "cache", "synthetic"), identities=24,
                             images_per_identity=6, image_size=32, seed=SYNTHETIC_SEED,
                             baseline=pixel_baseline, progress=False)
    procs = Processes(root)
    scratch = os.path.join(root, "tmp")  # the workers' TMPDIR: their scratch folders go here
    kill_scratch = os.path.join(root, "tmp-killed")
    os.makedirs(scratch)
    os.makedirs(kill_scratch)
    dirs = {name: os.path.join(root, name) for name in ("single", "job", "killed")}
    killed = {}
    try:
        single = procs.start("single", dirs["single"])
        job = procs.start_job("job", dirs["job"], env={"TMPDIR": scratch})
        doomed = procs.start_job("kill", dirs["killed"], env={"TMPDIR": kill_scratch})
        killer = threading.Thread(target=lambda: killed.update(zip(
            ("chief", "saved"), _kill_worker_after_first_checkpoint(procs, doomed,
                                                                    dirs["killed"]))))
        killer.start()
        results = {"single_run": procs.wait(single), "chief": procs.wait(job[0]),
                   "worker": procs.wait(job[1])}
        killer.join(timeout=RUN_TIMEOUT)
    finally:
        procs.kill_all()
    return {"root": root, **dirs, "scratch": scratch, "kill_scratch": kill_scratch,
            "killed_run": killed, **results}


@pytest.mark.slow
def test_two_workers_train_like_one_process(runs):
    _ok(runs["single_run"], "single process")
    chief, worker = _summary(_ok(runs["chief"], "chief")), _summary(_ok(runs["worker"], "worker"))
    assert chief["step"] == worker["step"] == 4
    assert (chief["task"], worker["task"]) == ("worker 0", "worker 1")
    assert worker["writes_model_dir"] is False and "export_dir" not in worker
    # only the chief wrote, and exactly what one process writes; the worker's scratch is gone
    assert set(os.listdir(runs["job"])) == MODEL_DIR_FILES == set(os.listdir(runs["single"]))
    assert chief["export_dir"] == os.path.join(runs["job"], "export")
    assert os.listdir(runs["scratch"]) == []
    assert sorted(os.listdir(os.path.join(runs["job"], "checkpoints"))) == sorted(
        os.listdir(os.path.join(runs["single"], "checkpoints")))

    one, two = _step_losses(runs["single"]), _step_losses(runs["job"])
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[k] for k in sorted(two)], [one[k] for k in sorted(one)],
                               rtol=1e-5)
    m1, m2 = _metrics(runs["single"]), _metrics(runs["job"])
    assert sorted(_epoch_losses(m1)) == sorted(_epoch_losses(m2)) == [2, 4]
    np.testing.assert_allclose(list(_epoch_losses(m2).values()),
                               list(_epoch_losses(m1).values()), rtol=1e-5)
    assert m2["threshold"] == pytest.approx(m1["threshold"], abs=1e-4)


@pytest.mark.slow
def test_the_chiefs_export_needs_tensorflow_alone(runs):
    import tensorflow as tf

    _ok(runs["chief"], "chief")
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    emb = {}
    for name in ("single", "job"):
        m = tf.saved_model.load(os.path.join(runs[name], "export"))
        serve = m.signatures["serving_default"]
        emb[name] = serve(images=tf.constant(images))["embeddings"].numpy()
    np.testing.assert_allclose(emb["job"], emb["single"], atol=1e-4)


@pytest.mark.slow
def test_a_killed_worker_stops_the_job_and_a_restart_resumes(runs):
    """The non-chief worker killed once the first checkpoint is written (the ``runs`` fixture):
    the chief exits with CLUSTER by itself; the restarted job resumes at that checkpoint's step
    and ends like the uninterrupted single-process run (the same loss in the last epoch)."""
    model_dir, killed = runs["killed"], runs["killed_run"]
    assert set(killed) == {"chief", "saved"}, "the killed job did not run"
    code, _, err = killed["chief"]
    assert code == CLUSTER, err[-3000:]
    assert "restart every worker" in err.strip().splitlines()[-1], err[-2000:]
    assert killed["saved"] and killed["saved"][0] == "ckpt-2.index"
    newest = os.path.join(model_dir, "checkpoints", killed["saved"][-1][: -len(".index")])

    left = os.listdir(runs["kill_scratch"])  # a SIGKILLed worker cannot clean up after itself
    procs = Processes(runs["root"])
    try:
        chief, worker = procs.start_job("restart", model_dir,
                                        env={"TMPDIR": runs["kill_scratch"]})
        after = [_summary(_ok(procs.wait(p), p.name)) for p in (chief, worker)]
    finally:
        procs.kill_all()
    assert os.listdir(runs["kill_scratch"]) == left  # the restarted worker's own is gone
    assert [s["resumed_from"] for s in after] == [newest, newest]
    assert [s["step"] for s in after] == [4, 4]
    resumed = _metrics(model_dir)
    reference = _epoch_losses(_metrics(runs["single"]))
    assert resumed["resumed_from"] == newest
    for step, loss in _epoch_losses(resumed).items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step


def _without_tensorflow(tmp_path):
    """Environment under which importing tensorflow fails: proves an error came before it."""
    fake = tmp_path / "no_tensorflow" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('train.py imported TensorFlow')\n")
    return {"PYTHONPATH": f"{fake.parent}{os.pathsep}{REPO}"}


def _run_alone(tmp_path, tf_config, *extra, env=None, timeout=120):
    """One train.py worker (nothing else of its job), killed past ``timeout``."""
    procs = Processes(str(tmp_path))
    try:
        proc = procs.start("alone", str(tmp_path / "model"), "--distribution_strategy="
                           "multi_worker_mirrored", *extra, tf_config=tf_config, env=env)
        return procs.wait(proc, timeout=timeout)
    finally:
        procs.kill_all()


def _one_line_error(result, code, *words):
    rc, _, err = result
    last = err.strip().splitlines()[-1]
    assert rc == code, err[-2000:]
    assert last.startswith("train.py: error: "), err[-2000:]
    assert "Traceback" not in err
    for word in words:
        assert word in last, last


@pytest.mark.parametrize("tf_config, words", [
    (None, ["TF_CONFIG", "not set"]),
    ('{"cluster": ', ["TF_CONFIG", "not valid JSON"]),
    ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", '
     '"index": 2}}', ["worker 2", "not in the cluster", "0..1"]),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "chief", "index": 0}}',
     ["chief 0", "not in the cluster"]),
    ('{"cluster": {"worker": ["127.0.0.1"]}, "task": {"type": "worker", "index": 0}}',
     ["host:port"]),
])
def test_a_bad_tf_config_is_one_line_before_tensorflow_starts(tmp_path, tf_config, words):
    result = _run_alone(tmp_path, tf_config, env=_without_tensorflow(tmp_path), timeout=90)
    _one_line_error(result, USAGE, *words)


def test_a_port_in_use_is_refused_before_tensorflow_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = _free_ports(1)[0]
        result = _run_alone(tmp_path, _tf_config([port, other], 0),
                            env=_without_tensorflow(tmp_path), timeout=90)
    _one_line_error(result, USAGE, f"port {port}", "already in use")


@pytest.mark.parametrize("index", [0, 1])
def test_a_model_dir_locked_by_another_run_is_refused_by_every_worker(tmp_path, index):
    """The chief (index 0) cannot take the lock; the other worker sees a lock of another job."""
    from training.lock import ModelDirLock

    model_dir = tmp_path / "model"
    with ModelDirLock(str(model_dir), job="another-job"):  # held by this live test process
        result = _run_alone(tmp_path, _tf_config(_free_ports(2), index),
                            env=_without_tensorflow(tmp_path), timeout=90)
    _one_line_error(result, LOCKED, str(model_dir), "in use by another run")


@pytest.mark.slow
def test_a_peer_that_never_comes_up_ends_the_wait(tmp_path):
    t0 = time.monotonic()
    result = _run_alone(tmp_path, _tf_config(_free_ports(2), 0),
                        env={"FACENET_CLUSTER_TIMEOUT": "5"}, timeout=180)
    _one_line_error(result, CLUSTER, "did not all come up within 5 s", "worker 0")
    assert time.monotonic() - t0 < 150
