"""Train a FaceNet embedding with triplet loss and in-graph online mining.

    python train.py                      # built-in synthetic faces, CPU-sized defaults, ~10 minutes
    python train.py --model nn4 --data_dir ALIGNED --val_dir HOLDOUT --model_dir runs/nn4
    python train.py --model_dir runs/nn4 # rerun: resumes from the last checkpoint

Every batch is P identities x K images (--identities_per_batch, --images_per_identity) so that
triplets can be mined inside it (FaceNet Section 3.2). A run writes into --model_dir:
``config.json`` (the network), ``checkpoints/`` (tf.train.CheckpointManager; step and optimiser
state), ``logs/`` (TensorBoard scalars and the embedding projector), ``metrics.json`` (the last
validation, with the chosen threshold) and ``export/`` (a SavedModel, see export.py).

Multi-worker (--distribution_strategy=multi_worker_mirrored, README: Scaling out): start one
train.py per worker, each with the job's TF_CONFIG (its own task) and the same flags. TF_CONFIG and
this task's port are checked, and the chief locks --model_dir, before TensorFlow starts; the
workers then wait for each other for at most FACENET_CLUSTER_TIMEOUT seconds (default 300).
"""
import glob as globlib
import os
import sys
import time

from absl import app, logging

import flags
from cli_checks import cli_main, require_dir, require_file, require_writable_dir
from data.dataset import EmptyDatasetError
from data.tfrecords import DamagedShardError
from exit_codes import CLUSTER, DAMAGED_DATA, CliError
from quiet_tf import import_tensorflow
from training import trainer
from training.data import is_tfrecord_source
from training.distribute import STARTUP_TIMEOUT_S, configure_devices
from training.recipes import apply_recipe, resolve_recipe
from training.settings import TrainSettings

FLAGS = flags.FLAGS
flags.define_train_flags()


def _check_inputs():
    """The folders and files the flags name exist (TF-free: runs before TensorFlow loads).

    Raises CliError (exit code USAGE) naming the flag and the path.
    """
    if FLAGS.model_dir:  # the default, runs/<model>, is checked once the recipe has set --model
        require_writable_dir(FLAGS.model_dir, "--model_dir")
    if FLAGS.data_dir:
        if is_tfrecord_source(FLAGS.data_dir):
            if not (globlib.glob(FLAGS.data_dir) or os.path.isfile(FLAGS.data_dir)):
                raise CliError(f"--data_dir {FLAGS.data_dir}: no TFRecord file matches")
        else:
            require_dir(FLAGS.data_dir, "--data_dir")
    if bool(FLAGS.lfw_dir) != bool(FLAGS.lfw_pairs):
        raise CliError("--lfw_dir and --lfw_pairs go together")
    if FLAGS.lfw_dir:
        require_dir(FLAGS.lfw_dir, "--lfw_dir")
        require_file(FLAGS.lfw_pairs, "--lfw_pairs")
    elif FLAGS.val_dir:
        require_dir(FLAGS.val_dir, "--val_dir")
    if not 0.0 <= FLAGS.val_fraction < 1.0:
        raise CliError(f"--val_fraction must be in [0, 1) (0: no validation without --val_dir), "
                       f"got {FLAGS.val_fraction:g}")
    if FLAGS.ema_momentum and not 0.0 < FLAGS.ema_momentum < 1.0:
        raise CliError(f"--ema_momentum must be in (0, 1) (0: off), got {FLAGS.ema_momentum:g}")


def _apply_recipe():
    """Apply the recipe to the flags not given (TF-free); returns its name."""
    recipe = resolve_recipe(FLAGS.recipe, FLAGS.data_dir)
    recipe_flags = apply_recipe(FLAGS, recipe)
    logging.info("recipe %s%s", recipe, "".join(f" --{k}={v}" for k, v in recipe_flags.items()))
    return recipe


def _settings(recipe):
    """Read the flags once into the run's frozen TrainSettings: nothing under training/ reads
    flags."""
    import models

    if FLAGS.model not in models.MODEL_NAMES:
        sys.exit(f"unknown --model {FLAGS.model!r}; choose from {models.MODEL_NAMES}")
    return TrainSettings.from_flags(FLAGS, recipe)


def _cluster_timeout():
    """Seconds the workers wait for each other at start-up: $FACENET_CLUSTER_TIMEOUT or 300."""
    text = os.environ.get("FACENET_CLUSTER_TIMEOUT", "").strip()
    try:
        value = float(text) if text else STARTUP_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise CliError(f"FACENET_CLUSTER_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return value


def _join_cluster():
    """--distribution_strategy=multi_worker_mirrored: this task of TF_CONFIG, checked before
    TensorFlow starts (TF_CONFIG, this task's port; the chief locks --model_dir, another worker
    checks that no other run holds it). None for the other strategies. Raises CliError."""
    if FLAGS.distribution_strategy != "multi_worker_mirrored":
        return None
    from training.distribute import check_port_free, read_cluster
    from training.lock import check_shared, lock_model_dir

    if FLAGS.projector_only:
        raise CliError("--projector_only runs in one process: drop "
                       "--distribution_strategy=multi_worker_mirrored")
    cluster = read_cluster()
    check_port_free(cluster)
    model_dir = FLAGS.model_dir or os.path.join("runs", FLAGS.model)  # TrainSettings' default
    if cluster.is_chief:
        require_writable_dir(model_dir, "--model_dir")
        lock_model_dir(model_dir, job=cluster.job_id)
    else:
        check_shared(model_dir, cluster.job_id)
    logging.info("multi-worker job of %d workers: this is %s at %s%s; waiting up to %g s for the "
                 "others", cluster.num_workers, cluster.name, cluster.address,
                 " (the chief)" if cluster.is_chief else "", _cluster_timeout())
    return cluster


def _peer_failure(tf, exc, cluster, model_dir):
    """The CliError (exit code CLUSTER) of a collective that failed because another worker of the
    job stopped, or None for any other error."""
    kinds = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError,
             tf.errors.CancelledError)
    if cluster is None or not isinstance(exc, kinds):
        return None
    lines = [line.strip() for line in str(getattr(exc, "message", "") or exc).splitlines()
             if line.strip() and line.strip() != "Graph execution error:"
             and not line.strip().startswith(("Detected at node", "File "))]
    telling = ("unhealthy", "heartbeat", "Connection refused", "failed to connect")
    detail = next((line for line in lines if any(word in line for word in telling)),
                  lines[0] if lines else "")
    if "Error reported from" in detail:  # "... Error reported from /job:worker/task:1: ..."
        detail = detail[detail.index("Error reported from"):]
    return CliError(f"{cluster.name}: the job stopped because another of its {cluster.num_workers} "
                    f"workers is gone ({type(exc).__name__}: {detail[:200]}); restart every "
                    f"worker: the job resumes from the last checkpoint in {model_dir}", CLUSTER)


def _quiet_teardown():
    """After a CLUSTER error: silence stderr once our one line is out (atexit runs after it), so
    that TensorFlow's coordination agent, shutting down in error at exit, does not bury it."""
    import atexit

    def silence():
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)

    atexit.register(silence)


def main(argv):
    del argv
    try:
        _main()
    except CliError as exc:
        if exc.exit_code == CLUSTER:
            _quiet_teardown()
        raise


def _main():
    t_start = time.monotonic()
    _check_inputs()
    recipe = _apply_recipe()
    cluster = _join_cluster()
    started = {}

    def before_first_op(tf):  # devices and the multi-worker server: before TensorFlow's first op
        configure_devices(tf, FLAGS.num_cpu_devices)
        if cluster is not None:
            from training.distribute import start_multi_worker

            started["strategy"] = start_multi_worker(tf, cluster, _cluster_timeout())

    tf = import_tensorflow(before_first_op=before_first_op)
    if cluster is not None and "strategy" not in started:
        raise RuntimeError("TensorFlow ran before train.py could start the multi-worker server")
    settings = _settings(recipe)
    trainer.open_model_dir(settings, cluster)  # lock, resume checks
    try:
        trainer.run(tf, settings, t_start, strategy=started.get("strategy"), cluster=cluster)
    except tf.errors.OpError as exc:
        failure = _peer_failure(tf, exc, cluster, settings.model_dir)
        if failure is None:
            raise
        raise failure from None


if __name__ == "__main__":
    # user errors (CliError, an empty data set) end as one line on stderr with an exit_codes code
    app.run(cli_main(main, "train.py", user_errors=(EmptyDatasetError,
                                                    (DamagedShardError, DAMAGED_DATA))))
