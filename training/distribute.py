"""The tf.distribute side of a run: the strategy from its name (train.py --distribution_strategy),
the logical CPU devices, the multi-worker cluster of ``TF_CONFIG``, and the precision policy.

Online triplet mining (FaceNet Section 3.2) sees the global P x K batch under any strategy
(``--mining_scope=global``, losses/global_batch.py) or each replica's slice (``replica``). ``tf`` is
passed in (the module imports no TensorFlow) so that device set-up and the multi-worker server can
start before TensorFlow initialises its devices
(``quiet_tf.import_tensorflow(before_first_op=...)``).

Multi-worker (``multi_worker_mirrored``, MultiWorkerMirroredStrategy): the cluster comes from the
``TF_CONFIG`` environment variable, ``{"cluster": {"chief": ["host:port"], "worker": [...]},
"task": {"type": "worker", "index": 0}}``. It is checked here before TensorFlow starts (one-line
CliError with exit code USAGE: missing or malformed, this task not in the cluster, this task's port
already taken) and the server is started with a start-up timeout (exit code CLUSTER when the other
workers do not all come up in time). The chief is the ``chief`` task, or ``worker`` 0 when the
cluster has no chief (TensorFlow's rule, ``strategy.extended.should_checkpoint``).
"""
import dataclasses
import hashlib
import json
import os
import socket
import tempfile

from absl import logging

# the names, defined once (TF-free; flags.py offers them)
from choices import DISTRIBUTION_STRATEGIES as STRATEGIES
from exit_codes import CLUSTER, USAGE, CliError

TF_CONFIG = "TF_CONFIG"
JOBS = ("chief", "worker")  # the task types MultiWorkerMirroredStrategy trains with
#: Seconds the workers of a job wait for each other at start-up (TensorFlow's own default is
#: forever); train.py reads FACENET_CLUSTER_TIMEOUT to change it.
STARTUP_TIMEOUT_S = 300.0


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
    MultiWorkerMirroredStrategy (the cluster from ``TF_CONFIG``; train.py starts it with
    :func:`start_multi_worker` instead, before TensorFlow's first operation). Raises ValueError
    for another name.
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


def precision_policy(tf):
    """The Keras mixed-precision policy of --mixed_precision: ``mixed_float16`` when a GPU is
    visible (tensor cores), else ``mixed_bfloat16`` (CPUs compute bfloat16; float16 they
    emulate)."""
    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"


def synchronised_batch_norm(sync_batch_norm, strategy):
    """Whether the model's batch norm is built ``synchronized``: --sync_batch_norm (default on)
    with more than one replica in sync. One replica's statistics are the global batch's already,
    so a one-device run keeps Keras' plain (and numerically usual) moments.

    Measured (bench/distributed.py ``sync_bn``, README "Scaling out"): 2 replicas of 64 images,
    200 steps on the built-in data: 88.6% held-out accuracy synchronised vs 85.4% per replica,
    with no throughput cost measurable on 2 CPU cores.
    """
    return bool(sync_batch_norm) and int(strategy.num_replicas_in_sync) > 1


def check_jit(tf, strategy, jit_compile):
    """CliError (USAGE) for --jit_compile where XLA cannot compile the step: several replicas
    without a GPU (XLA:CPU has no kernels for the cross-replica collectives, e.g.
    CollectiveGatherV2 of global mining or the gradient all-reduce)."""
    replicas = int(strategy.num_replicas_in_sync)
    if jit_compile and replicas > 1 and not tf.config.list_logical_devices("GPU"):
        raise CliError(f"--jit_compile with {replicas} replicas on the CPU: XLA on the CPU cannot "
                       f"compile the collectives between replicas; drop --jit_compile, or train "
                       f"with one replica", USAGE)


# ----------------------------------------------------------------------------- TF_CONFIG
@dataclasses.dataclass(frozen=True)
class Cluster:
    """This process's place in a multi-worker job, from ``TF_CONFIG``.

    ``jobs``: task type -> tuple of "host:port" addresses; ``task_type``/``task_index``: this
    task. Every property is TF-free.
    """

    jobs: dict
    task_type: str
    task_index: int

    @property
    def address(self):
        return self.jobs[self.task_type][self.task_index]

    @property
    def port(self):
        return int(self.address.rsplit(":", 1)[1])

    @property
    def is_chief(self):
        """The ``chief`` task, or ``worker`` 0 when the cluster has no chief."""
        if "chief" in self.jobs:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    @property
    def num_workers(self):
        """Processes that train: the chief (if any) and every worker."""
        return sum(len(self.jobs.get(j, ())) for j in JOBS)

    @property
    def name(self):
        """This task as a log line says it, e.g. ``worker 1``."""
        return f"{self.task_type} {self.task_index}"

    @property
    def job_id(self):
        """A fingerprint of the cluster: the same for every task of one job (the model_dir lock
        lets the tasks of the job that holds it in, training/lock.py)."""
        text = json.dumps({k: list(v) for k, v in sorted(self.jobs.items())}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _bad(message):
    return CliError(f"{TF_CONFIG}: {message} (README: Scaling out)", USAGE)


def _check_address(job, i, address):
    if not isinstance(address, str) or ":" not in address:
        raise _bad(f"cluster {job} task {i}: expected \"host:port\", got {address!r}")
    host, port = address.rsplit(":", 1)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _bad(f"cluster {job} task {i}: expected \"host:port\" with a port in 1..65535, "
                   f"got {address!r}")


def _parse_jobs(cluster):
    if not isinstance(cluster, dict) or not cluster:
        raise _bad("\"cluster\" must map task types to lists of \"host:port\" addresses, e.g. "
                   "{\"worker\": [\"host1:2222\", \"host2:2222\"]}")
    jobs = {}
    for job, addresses in cluster.items():
        if job not in JOBS:
            raise _bad(f"MultiWorkerMirroredStrategy trains with \"chief\" and \"worker\" tasks "
                       f"only; the cluster has {job!r}")
        if isinstance(addresses, str) or not isinstance(addresses, (list, tuple)) or not addresses:
            raise _bad(f"cluster {job!r} must be a non-empty list of \"host:port\" addresses")
        for i, address in enumerate(addresses):
            _check_address(job, i, address)
        jobs[job] = tuple(addresses)
    if len(jobs.get("chief", ())) > 1:
        raise _bad(f"a cluster has at most one chief, got {len(jobs['chief'])}")
    seen = {}
    for job, addresses in jobs.items():
        for i, address in enumerate(addresses):
            if address in seen:
                raise _bad(f"{seen[address]} and {job} {i} have the same address {address}")
            seen[address] = f"{job} {i}"
    return jobs


def parse_tf_config(text):
    """The :class:`Cluster` of a ``TF_CONFIG`` JSON string (None or empty: missing).

    Raises CliError (exit code USAGE), one line naming what is wrong: missing, not JSON, no
    cluster or task, an address that is not "host:port", a task type other than chief/worker,
    or this task not in the cluster (unknown type, index out of range).
    """
    if not text or not text.strip():
        raise _bad("not set; --distribution_strategy=multi_worker_mirrored needs the cluster and "
                   "this task, e.g. {\"cluster\": {\"worker\": [\"host1:2222\", \"host2:2222\"]}, "
                   "\"task\": {\"type\": \"worker\", \"index\": 0}}")
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise _bad(f"not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _bad(f"must be a JSON object with \"cluster\" and \"task\", got "
                   f"{type(config).__name__}")
    jobs = _parse_jobs(config.get("cluster"))
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise _bad("\"task\" must name this process's place in the cluster, e.g. "
                   "{\"type\": \"worker\", \"index\": 1}")
    task_type, index = task["type"], task["index"]
    if isinstance(index, str) and index.strip().isdigit():
        index = int(index)
    if isinstance(index, bool) or not isinstance(index, int):
        raise _bad(f"task index must be an integer, got {task['index']!r}")
    if task_type not in jobs:
        raise _bad(f"this task ({task_type} {index}) is not in the cluster, which has "
                   + ", ".join(f"{j} 0..{len(a) - 1}" for j, a in jobs.items()))
    if not 0 <= index < len(jobs[task_type]):
        n = len(jobs[task_type])
        raise _bad(f"this task ({task_type} {index}) is not in the cluster: its {task_type!r} "
                   f"list has {n} task(s), indices 0..{n - 1}")
    return Cluster(jobs, task_type, index)


def read_cluster(environ=None):
    """:func:`parse_tf_config` of ``$TF_CONFIG``."""
    return parse_tf_config((os.environ if environ is None else environ).get(TF_CONFIG))


def check_port_free(cluster):
    """Bind this task's port for a moment, before TensorFlow's server does: CliError (USAGE) when
    another process holds it. (SO_REUSEADDR, as gRPC sets it: a port in TIME_WAIT is free.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", cluster.port))
        except OSError as exc:
            raise CliError(f"{TF_CONFIG}: port {cluster.port} of this task ({cluster.name}, "
                           f"{cluster.address}) is already in use ({exc.strerror}): another "
                           f"process (another worker of this or another job?) listens on it; "
                           f"stop it or give this task a free port", USAGE) from None


# ----------------------------------------------------------------------------- the strategy
def _coordination_timeout(tf, cluster, timeout_s):
    """Ask TensorFlow's coordination service to wait at most ``timeout_s`` for every task to
    register (a barrier), instead of forever. Uses TensorFlow internals (there is no public
    setting); when they are missing, warns and keeps TensorFlow's default."""
    try:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.eager import context
    except ImportError as exc:
        logging.warning("no start-up timeout for the cluster (%s): a worker that never comes up "
                        "makes the others wait", exc)
        return
    leader = "chief" if "chief" in cluster.jobs else "worker"
    jobs = [coordination_config_pb2.CoordinatedJob(name=j, num_tasks=len(cluster.jobs[j]))
            for j in JOBS if j in cluster.jobs]
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=f"/job:{leader}/replica:0/task:0",
        cluster_register_timeout_in_ms=int(timeout_s * 1000), coordinated_jobs=jobs)
    context.context().coordination_service.cluster_register_with_barrier = True


def start_multi_worker(tf, cluster, timeout_s=STARTUP_TIMEOUT_S):
    """MultiWorkerMirroredStrategy for ``cluster`` (its TF_CONFIG in the environment), started
    before TensorFlow's first operation (``before_first_op``): it starts this task's server and
    waits up to ``timeout_s`` seconds for every task; then CliError (exit code CLUSTER).

    A worker that dies later is noticed by the coordination service's heartbeats (about 10 s) and
    ends the others' collectives with an error: no collective waits forever. SIGTERM, which
    TensorFlow's preemption notifier takes over, kills the process again afterwards.
    """
    import signal

    _coordination_timeout(tf, cluster, timeout_s)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError,
            tf.errors.AbortedError) as exc:
        raise CliError(f"the {cluster.num_workers} workers of TF_CONFIG did not all come up "
                       f"within {timeout_s:g} s (this is {cluster.name} at {cluster.address}): "
                       f"start every worker, check the addresses and that the ports are "
                       f"reachable ({type(exc).__name__})", CLUSTER) from None
    finally:
        signal.signal(signal.SIGTERM, sigterm if sigterm is not None else signal.SIG_DFL)
    return strategy


def num_workers(strategy):
    """Worker processes of ``strategy`` (1 unless multi-worker)."""
    return int(getattr(strategy.extended, "_num_workers", 1) or 1)


def worker_scratch_dir(cluster):
    """A fresh folder of this non-chief task's own (system temp dir), for what it must write but
    nobody keeps: its checkpoints (saving can involve collectives, so every worker saves) and the
    data caches. The caller removes it."""
    return tempfile.mkdtemp(prefix=f"facenet-{cluster.task_type}{cluster.task_index}-")


def describe(strategy, batch_images, mining_scope):
    """One start-up log line's fields: strategy class, replicas, workers, global and per-replica
    batch (images) and where triplets are mined."""
    replicas = int(strategy.num_replicas_in_sync)
    per_replica = (f"{batch_images // replicas}" if batch_images % replicas == 0
                   else f"{batch_images / replicas:g} (not whole)")
    scope = ("the global batch" if mining_scope == "global" or replicas == 1
             else "each replica's slice")
    return {"strategy": type(strategy).__name__, "replicas": replicas,
            "workers": num_workers(strategy), "global_batch": batch_images,
            "per_replica_batch": per_replica, "mining": scope}


# ----------------------------------------------------------------------------- across workers
class WorkerSync:
    """Small collectives across the workers of a job, for the decisions every worker must take
    alike (which checkpoint to resume, whether the time budget is spent, the end of the run).

    Every worker must make the same calls in the same order: each one is a collective that waits
    for all of them. ``is_chief``: whether this process is the chief.
    """

    def __init__(self, tf, strategy, is_chief):
        self.tf = tf
        self.strategy = strategy
        self.is_chief = bool(is_chief)

        @tf.function
        def gather(values):  # [n] on every replica -> [replicas, n], the same on every worker
            def per_replica(v):
                return tf.distribute.get_replica_context().all_gather(v[None], axis=0)

            return strategy.run(per_replica, args=(values,))

        self._gather = gather

    def gather(self, values):
        """float64 ``values`` [n] of this worker -> numpy [replicas, n] of every replica (each
        worker's row repeated for its local replicas)."""
        out = self._gather(self.tf.constant(values, self.tf.float64))
        return self.strategy.experimental_local_results(out)[0].numpy()

    def chief_value(self, value):
        """The chief's ``value`` (a float), on every worker."""
        rows = self.gather([1.0 if self.is_chief else 0.0, float(value)])
        return float(rows[rows[:, 0] == 1.0][0, 1])

    def barrier(self):
        """Return once every worker has called it."""
        self.gather([0.0])


def keras_fit_under_multi_worker(model):
    """Make Keras 3 ``model.fit`` run under MultiWorkerMirroredStrategy (keras-team/keras#20585).

    Keras 3.15 fails there twice: before training it all-reduces the first batch to build the
    model symbolically (``_maybe_symbolic_build``; the batch is a nest, which the strategy
    cannot reduce), and it reduces every step's logs with ``strategy.reduce("MEAN", v, axis=0)``,
    which fails on the scalar logs. ``model`` is built here already (layers, optimizer), so the
    first is skipped for it; the logs are taken from the first local replica instead (Keras's
    "first" reduction): they are the values of metrics whose variables the strategy keeps
    identical on every replica. Raises RuntimeError when ``model`` is not fully built.
    """
    from keras.src.backend.tensorflow import trainer as keras_tf_trainer

    unbuilt = [layer.name for layer in model._flatten_layers() if not layer.built]
    pending = [name for name in ("_compile_loss", "_compile_metrics")
               if getattr(model, name, None) is not None and not getattr(model, name).built]
    if unbuilt or pending or not model.optimizer.built:
        raise RuntimeError(f"build {model.name} and its optimizer before training it under "
                           f"MultiWorkerMirroredStrategy (unbuilt: {unbuilt + pending})")
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    original = keras_tf_trainer.reduce_per_replica
    if getattr(original, "facenet_first", False):
        return
    multi_worker = keras_tf_trainer._collective_all_reduce_multi_worker

    def reduce_per_replica(values, strategy, reduction="auto"):
        if reduction == "auto" and multi_worker(strategy):
            reduction = "first"
        return original(values, strategy, reduction=reduction)

    reduce_per_replica.facenet_first = True
    keras_tf_trainer.reduce_per_replica = reduce_per_replica
