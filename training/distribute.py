"""The tf.distribute strategy of a run, from its name (train.py --distribution_strategy).

Online triplet mining (FaceNet Section 3.2) happens per replica, inside each replica's share of
the batch. ``tf`` is passed in (the module imports no TensorFlow) so that device set-up can run
before TensorFlow initialises its devices (``quiet_tf.import_tensorflow(before_first_op=...)``).
"""
# the names, defined once (TF-free; flags.py offers them)
from choices import DISTRIBUTION_STRATEGIES as STRATEGIES


def configure_devices(tf, num_cpu_devices):
    """Split the CPU into ``num_cpu_devices`` logical devices (to try ``mirrored`` without GPUs).

    Must run before TensorFlow initialises its devices; 1 (or less) leaves them as they are.
    """
    n = int(num_cpu_devices)
    if n > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])


def make_strategy(tf, name):
    """The strategy called ``name`` (one of :data:`STRATEGIES`).

    ``default``: TensorFlow's default (no distribution); ``mirrored``: MirroredStrategy over every
    logical GPU, or over every logical CPU device when there is no GPU; ``multi_worker_mirrored``:
    MultiWorkerMirroredStrategy (the cluster from ``TF_CONFIG``). Raises ValueError for another
    name.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown distribution strategy {name!r}; choose from {STRATEGIES}")
