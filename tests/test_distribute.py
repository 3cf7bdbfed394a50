"""training.distribute: the tf.distribute strategy from its name, the logical CPU devices, the
multi-worker cluster of TF_CONFIG (parsing, the chief, the port check, worker scratch folders, the
collectives that keep workers in step, the Keras fit shim); the model_dir lock shared by one job's
workers; synchronised batch norm as a training option, not a network identity.

Logical devices can only be configured before TensorFlow initialises its devices, which another
test of the same process may already have done: the in-process tests use the devices as they are
(or a stand-in for ``tf``), and the one test that splits the CPU runs in a subprocess. Real
multi-worker jobs run in tests/test_multi_worker.py.
"""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from training.distribute import STRATEGIES, configure_devices, make_strategy

from tests.helpers import REPO, subprocess_env


def test_names_are_the_flag_choices():
    import flags

    flags.define_train_flags()
    assert tuple(flags.FLAGS["distribution_strategy"].parser.enum_values) == STRATEGIES


def test_default_is_tensorflows_default_strategy():
    import tensorflow as tf

    strategy = make_strategy(tf, "default")
    assert strategy is tf.distribute.get_strategy()
    assert strategy.num_replicas_in_sync == 1
    assert not tf.distribute.has_strategy()  # the default: no scope entered


@pytest.mark.parametrize("name", ["", "Mirrored", "tpu", None])
def test_unknown_name_is_refused(name):
    with pytest.raises(ValueError, match="unknown distribution strategy"):
        make_strategy(types.SimpleNamespace(), name)  # refused before tf is used


def test_mirrored_spans_the_logical_devices_as_they_are():
    import tensorflow as tf

    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    strategy = make_strategy(tf, "mirrored")
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == len(devices)
    def local(name):  # "/job:localhost/replica:0/task:0/device:CPU:0" -> "CPU:0"
        return name.rsplit("/device:", 1)[-1]

    assert sorted(map(local, strategy.extended.worker_devices)) == sorted(
        local(d.name) for d in devices)


def _fake_tf(gpus=(), cpus=("/device:CPU:0",)):
    """A stand-in for ``tf`` recording what make_strategy and configure_devices ask of it."""
    calls = []

    def logical(kind):
        return [types.SimpleNamespace(name=n) for n in {"GPU": gpus, "CPU": cpus}[kind]]

    def record(what):
        return lambda *args, **kwargs: calls.append((what, args, kwargs)) or what

    config = types.SimpleNamespace(
        list_logical_devices=logical,
        list_physical_devices=lambda kind: [f"physical-{kind}-0", f"physical-{kind}-1"],
        set_logical_device_configuration=record("set_logical_device_configuration"),
        LogicalDeviceConfiguration=lambda: "logical-config")
    distribute = types.SimpleNamespace(
        get_strategy=record("default"), MirroredStrategy=record("mirrored"),
        MultiWorkerMirroredStrategy=record("multi_worker_mirrored"))
    return types.SimpleNamespace(config=config, distribute=distribute), calls


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_name_builds_its_strategy(name):
    tf, calls = _fake_tf()
    assert make_strategy(tf, name) == name
    assert [c[0] for c in calls] == [name]


def test_mirrored_prefers_gpus_over_cpus():
    tf, calls = _fake_tf(gpus=("/device:GPU:0", "/device:GPU:1"), cpus=("/device:CPU:0",))
    make_strategy(tf, "mirrored")
    assert calls == [("mirrored", (), {"devices": ["/device:GPU:0", "/device:GPU:1"]})]
    tf, calls = _fake_tf(gpus=(), cpus=("/device:CPU:0", "/device:CPU:1"))
    make_strategy(tf, "mirrored")
    assert calls == [("mirrored", (), {"devices": ["/device:CPU:0", "/device:CPU:1"]})]


def test_configure_devices_splits_the_first_cpu():
    tf, calls = _fake_tf()
    configure_devices(tf, 3)
    assert calls == [("set_logical_device_configuration",
                      ("physical-CPU-0", ["logical-config"] * 3), {})]


@pytest.mark.parametrize("n", [1, 0])
def test_configure_devices_leaves_one_device_alone(n):
    configure_devices(types.SimpleNamespace(), n)  # tf is not even touched


_SPLIT = """
import json
from quiet_tf import import_tensorflow
from training.distribute import configure_devices, make_strategy
tf = import_tensorflow(before_first_op=lambda tf: configure_devices(tf, 2))
strategy = make_strategy(tf, "mirrored")
print(json.dumps({"cpus": len(tf.config.list_logical_devices("CPU")),
                  "gpus": len(tf.config.list_logical_devices("GPU")),
                  "replicas": strategy.num_replicas_in_sync}))
"""


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-c", _SPLIT], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["cpus"] == 2
    assert info["replicas"] == (info["gpus"] or 2)


# ----------------------------------------------------------------------------- multi-worker
def _config(cluster, task_type="worker", index=0):
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


TWO = {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}
WITH_CHIEF = {"chief": ["10.0.0.1:2222"], "worker": ["10.0.0.2:2222", "10.0.0.3:2222"]}


def test_tf_config_names_this_task_and_the_chief():
    from training.distribute import parse_tf_config

    first, second = (parse_tf_config(_config(TWO, index=i)) for i in (0, 1))
    assert (first.is_chief, second.is_chief) == (True, False)  # worker 0 without a chief
    assert (first.address, first.port, second.port) == ("127.0.0.1:2222", 2222, 2223)
    assert first.num_workers == second.num_workers == 2
    assert first.name == "worker 0" and first.job_id == second.job_id
    chief = parse_tf_config(_config(WITH_CHIEF, "chief", 0))
    worker0 = parse_tf_config(_config(WITH_CHIEF, "worker", 0))
    assert chief.is_chief and not worker0.is_chief and chief.num_workers == 3
    assert chief.job_id != first.job_id  # another cluster, another job
    assert parse_tf_config(_config(TWO, index="1")).task_index == 1  # TF accepts "1" too


@pytest.mark.parametrize("text, words", [
    (None, "not set"),
    ("  ", "not set"),
    ("{oops", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"task": {"type": "worker", "index": 0}}), '"cluster" must map'),
    (_config({"worker": "127.0.0.1:2222"}), "non-empty list"),
    (_config({"worker": []}), "non-empty list"),
    (_config({"worker": ["127.0.0.1"]}), "host:port"),
    (_config({"worker": ["127.0.0.1:0"]}), "1..65535"),
    (_config({"worker": ["127.0.0.1:http"]}), "host:port"),
    (_config({"ps": ["127.0.0.1:2222"], "worker": ["127.0.0.1:2223"]}), "'ps'"),
    (_config({"chief": ["a:1", "b:1"], "worker": ["c:1"]}, "chief"), "at most one chief"),
    (_config({"worker": ["a:1", "a:1"]}), "the same address a:1"),
    (json.dumps({"cluster": TWO}), '"task" must name'),
    (json.dumps({"cluster": TWO, "task": {"type": "worker"}}), '"task" must name'),
    (_config(TWO, index=2), "(worker 2) is not in the cluster: its 'worker' list has 2"),
    (_config(TWO, index=-1), "(worker -1) is not in the cluster"),
    (_config(TWO, index=1.5), "must be an integer"),
    (_config(TWO, index=True), "must be an integer"),
    (_config(TWO, "chief", 0), "(chief 0) is not in the cluster, which has worker 0..1"),
])
def test_a_bad_tf_config_is_one_line_naming_the_problem(text, words):
    from exit_codes import USAGE, CliError
    from training.distribute import parse_tf_config

    with pytest.raises(CliError) as info:
        parse_tf_config(text)
    assert info.value.exit_code == USAGE
    message = str(info.value)
    assert message.startswith("TF_CONFIG: ") and "\n" not in message
    assert words in message, message


def test_read_cluster_reads_the_environment():
    from training.distribute import read_cluster

    assert read_cluster({"TF_CONFIG": _config(TWO, index=1)}).task_index == 1


def test_a_taken_port_is_refused_and_a_free_one_passes():
    import socket

    from exit_codes import CliError
    from training.distribute import check_port_free, parse_tf_config

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cluster = parse_tf_config(_config({"worker": [f"127.0.0.1:{port}"]}))
        with pytest.raises(CliError, match=f"port {port} of this task .* already in use"):
            check_port_free(cluster)
    check_port_free(cluster)  # released: free again (TIME_WAIT does not count)


def test_a_worker_scratch_dir_is_its_own_and_fresh(tmp_path, monkeypatch):
    from training.distribute import parse_tf_config, worker_scratch_dir

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    cluster = parse_tf_config(_config(TWO, index=1))
    a, b = worker_scratch_dir(cluster), worker_scratch_dir(cluster)
    assert a != b and os.path.dirname(a) == str(tmp_path)
    assert os.path.basename(a).startswith("facenet-worker1-") and os.listdir(a) == []


def test_describe_the_split_of_the_global_batch():
    from training.distribute import describe

    def strategy(replicas, workers=1):
        return types.SimpleNamespace(num_replicas_in_sync=replicas,
                                     extended=types.SimpleNamespace(_num_workers=workers))

    d = describe(strategy(4, 2), 1800, "global")
    assert d == {"strategy": "SimpleNamespace", "replicas": 4, "workers": 2,
                 "global_batch": 1800, "per_replica_batch": "450", "mining": "the global batch"}
    assert describe(strategy(4), 1800, "replica")["mining"] == "each replica's slice"
    assert describe(strategy(1), 64, "replica")["mining"] == "the global batch"
    assert describe(strategy(7), 64, "global")["per_replica_batch"] == "9.14286 (not whole)"


def test_worker_sync_agrees_on_the_chiefs_value_in_one_process():
    import tensorflow as tf

    from training.distribute import WorkerSync

    strategy = tf.distribute.get_strategy()
    assert WorkerSync(tf, strategy, is_chief=True).chief_value(17.0) == 17.0
    sync = WorkerSync(tf, strategy, is_chief=True)
    assert sync.gather([3.0, 4.5]).tolist() == [[3.0, 4.5]]
    sync.barrier()


def test_keras_fit_under_multi_worker_needs_a_built_model_and_patches_once():
    import keras
    from keras.src.backend.tensorflow import trainer as keras_tf_trainer

    from training.distribute import keras_fit_under_multi_worker

    model = keras.Sequential([keras.layers.Dense(2)])  # not built
    model.compile(optimizer="sgd")
    with pytest.raises(RuntimeError, match="build .* before training"):
        keras_fit_under_multi_worker(model)
    built = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    built.compile(optimizer="sgd", loss="mse")
    built.optimizer.build(built.trainable_variables)
    built.fit(np.zeros((2, 3)), np.zeros((2, 2)), verbose=0)  # builds the compiled loss
    original = keras_tf_trainer.reduce_per_replica
    try:
        keras_fit_under_multi_worker(built)
        patched = keras_tf_trainer.reduce_per_replica
        keras_fit_under_multi_worker(built)
        assert keras_tf_trainer.reduce_per_replica is patched and patched.facenet_first
        assert built._maybe_symbolic_build() is None
        # one process: the patch leaves Keras' reduction as it was
        built.fit(np.zeros((2, 3)), np.zeros((2, 2)), verbose=0)
    finally:
        keras_tf_trainer.reduce_per_replica = original


# ----------------------------------------------------------------------------- model_dir lock
def test_lock_model_dir_records_the_job_and_is_taken_once_per_process(tmp_path):
    from training.lock import lock_model_dir

    model_dir = str(tmp_path / "run")
    held = lock_model_dir(model_dir, job="job-a")
    try:
        assert lock_model_dir(model_dir, job="job-a") is held  # the same process: no re-take
        with open(held.path, encoding="utf-8") as f:
            assert json.load(f)["job"] == "job-a"
    finally:
        held.release()


def test_the_workers_of_the_locking_job_share_the_model_dir(tmp_path):
    """A live holder (this test's parent process stands in for another job's chief)."""
    import socket

    from training.lock import LOCK_NAME, LockedError, check_shared

    model_dir = str(tmp_path / "run")
    check_shared(model_dir, "job-a")  # no lock yet: the chief takes it later
    os.makedirs(model_dir)
    with open(os.path.join(model_dir, LOCK_NAME), "w", encoding="utf-8") as f:
        json.dump({"pid": os.getppid(), "host": socket.gethostname(), "job": "job-a"}, f)
    check_shared(model_dir, "job-a")
    with pytest.raises(LockedError, match="in use by another run") as info:
        check_shared(model_dir, "job-b")
    assert info.value.exit_code == 7
    with pytest.raises(LockedError):
        check_shared(model_dir, None)


def test_a_lock_of_a_dead_run_does_not_stop_a_worker(tmp_path):
    import socket

    from training.lock import LOCK_NAME, check_shared

    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": 2 ** 22 + 7, "host": socket.gethostname(), "job": "old-job"}))
    check_shared(str(tmp_path), "new-job")  # stale: its chief will take it over


# ----------------------------------------------------------------------------- sync batch norm
def test_sync_batch_norm_changes_how_it_trains_not_what_it_is(tmp_path):
    """Same layers, names and weights with or without synchronised batch norm: checkpoints restore
    across the two and config.json does not record it."""
    import keras
    import tensorflow as tf

    import models
    from training.run_config import RunConfig

    config = RunConfig("tiny", (16, 16), 8, "batch")
    keras.utils.set_random_seed(0)
    plain = config.build_model()
    synced = config.build_model(sync_batch_norm=True)
    bn = [l for l in synced.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bn and all(l.synchronized for l in bn)
    assert not any(l.synchronized for l in plain.layers
                   if isinstance(l, keras.layers.BatchNormalization))
    assert [w.path for w in plain.weights] == [w.path for w in synced.weights]
    x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
    for source, target in ((plain, synced), (synced, plain)):
        prefix = tf.train.Checkpoint(model=source).write(str(tmp_path / f"ck-{source.name}"))
        tf.train.Checkpoint(model=target).read(prefix).assert_existing_objects_matched()
        np.testing.assert_allclose(target(x, training=False), source(x, training=False),
                                   atol=1e-6)
    assert "sync" not in json.dumps(config.to_json())
    lrn = models.build_model("tiny", 8, 16, normalization="lrn", sync_batch_norm=True)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in lrn.layers)


def test_jit_compile_is_refused_for_several_replicas_on_the_cpu():
    from exit_codes import CliError
    from training.distribute import check_jit

    def tf_with(gpus):
        return types.SimpleNamespace(config=types.SimpleNamespace(
            list_logical_devices=lambda kind: list(gpus) if kind == "GPU" else ["CPU:0"]))

    two = types.SimpleNamespace(num_replicas_in_sync=2)
    one = types.SimpleNamespace(num_replicas_in_sync=1)
    with pytest.raises(CliError, match="--jit_compile with 2 replicas on the CPU"):
        check_jit(tf_with([]), two, True)
    check_jit(tf_with([]), two, False)
    check_jit(tf_with([]), one, True)  # one replica: no collective to compile
    check_jit(tf_with(["GPU:0", "GPU:1"]), two, True)  # left to XLA on GPUs
