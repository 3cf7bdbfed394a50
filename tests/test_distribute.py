"""training.distribute: the tf.distribute strategy from its name, and the logical CPU devices.

Logical devices can only be configured before TensorFlow initialises its devices, which another
test of the same process may already have done: the in-process tests use the devices as they are
(or a stand-in for ``tf``), and the one test that splits the CPU runs in a subprocess.
"""
import json
import subprocess
import sys
import types

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
