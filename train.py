"""Train a FaceNet embedding with triplet loss and in-graph online mining.

    python train.py                      # built-in synthetic faces, CPU-sized defaults, ~10 minutes
    python train.py --model nn4 --data_dir ALIGNED --val_dir HOLDOUT --model_dir runs/nn4
    python train.py --model_dir runs/nn4 # rerun: resumes from the last checkpoint

Every batch is P identities x K images (--identities_per_batch, --images_per_identity) so that
triplets can be mined inside it (FaceNet Section 3.2). A run writes into --model_dir:
``config.json`` (the network), ``checkpoints/`` (tf.train.CheckpointManager; step and optimiser
state), ``logs/`` (TensorBoard scalars and the embedding projector), ``metrics.json`` (the last
validation, with the chosen threshold) and ``export/`` (a SavedModel, see export.py).
"""
import glob as globlib
import json
import os
import sys
import time

from absl import app, logging

import flags
from cli_checks import cli_main, require_dir, require_file, require_writable_dir
from data.dataset import EmptyDatasetError
from data.tfrecords import DamagedShardError
import exit_codes
from exit_codes import DAMAGED_DATA, NO_CHECKPOINT, CliError
from quiet_tf import import_tensorflow

FLAGS = flags.FLAGS
flags.define_train_flags()

SYNTHETIC_SEED = 2015  # the built-in data set is the same for every run
EXIT_NAN = exit_codes.NAN_LOSS  # 3
BUILTIN_MAX_MINUTES = 8.5  # wall clock from start-up, leaving time to validate, project and export


def _default_cache_dir():
    return FLAGS.cache_dir or os.environ.get("FACENET_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "facenet")


def _is_tfrecord_source(path):
    return any(ch in path for ch in "*?[") or path.endswith(".tfrecord") or path.endswith(".tfrecords")


def _check_inputs():
    """The folders and files the flags name exist (TF-free: runs before TensorFlow loads).

    Raises CliError (exit code USAGE) naming the flag and the path.
    """
    if FLAGS.model_dir:  # the default, runs/<model>, is checked once the recipe has set --model
        require_writable_dir(FLAGS.model_dir, "--model_dir")
    if FLAGS.data_dir:
        if _is_tfrecord_source(FLAGS.data_dir):
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


def _resolve_data(image_size):
    """Returns (train_source, val_set or None, description dict).

    Unreadable validation images are left out and counted (training/validation.py); an empty or
    unusable data set raises EmptyDatasetError (a one-line error at the command line).
    """
    from data.dataset import scan_identity_folder, split_identities
    from training import validation

    min_images = 1 if FLAGS.small_identities == "replace" else FLAGS.images_per_identity
    check_cache = os.path.join(FLAGS.model_dir, "validated_files.json")
    val_set = None
    if FLAGS.lfw_dir and FLAGS.lfw_pairs:
        val_set = validation.from_lfw_pairs(FLAGS.lfw_pairs, FLAGS.lfw_dir, cache_path=check_cache)
    elif FLAGS.val_dir:
        val_set = validation.from_identity_dataset(scan_identity_folder(FLAGS.val_dir),
                                                   seed=FLAGS.seed, cache_path=check_cache,
                                                   source=FLAGS.val_dir)

    if not FLAGS.data_dir:
        from data.synthetic import ensure_synthetic_dataset

        size = max(image_size)
        info = ensure_synthetic_dataset(
            os.path.join(_default_cache_dir(), "synthetic"),
            identities=FLAGS.synthetic_identities,
            images_per_identity=FLAGS.synthetic_images_per_identity,
            image_size=size, seed=SYNTHETIC_SEED)
        train = scan_identity_folder(info["train_dir"], min_images_per_identity=min_images)
        if val_set is None:
            val_set = validation.from_lfw_pairs(info["pairs_file"], info["test_dir"],
                                                cache_path=check_cache)
        desc = {"data": "synthetic", "train_dir": info["train_dir"], "test_dir": info["test_dir"],
                "pixel_baseline_accuracy": info.get("pixel_baseline_accuracy")}
        return train, val_set, desc

    if _is_tfrecord_source(FLAGS.data_dir):
        files = sorted(globlib.glob(FLAGS.data_dir)) or [FLAGS.data_dir]
        if val_set is None:
            logging.warning("TFRecord input without --val_dir or --lfw_dir/--lfw_pairs: no validation")
        return files, val_set, {"data": "tfrecord", "files": len(files)}

    from data.pipeline import validate_files

    dataset = scan_identity_folder(FLAGS.data_dir, min_images_per_identity=min_images)
    dataset, skipped = validate_files(
        dataset, cache_path=os.path.join(FLAGS.model_dir, "validated_files.json"))
    if skipped:
        logging.warning("skipped %d unreadable training images (first: %s)", len(skipped), skipped[0])
    if val_set is None and FLAGS.val_fraction == 0:
        logging.warning("--val_fraction=%g and no --val_dir or --lfw_dir/--lfw_pairs: no "
                        "validation (no accuracy, no threshold in the export)", FLAGS.val_fraction)
    elif val_set is None:
        dataset, held_out = split_identities(dataset, FLAGS.val_fraction, FLAGS.seed)
        # held_out comes from the checked training images: nothing to decode again
        val_set = validation.from_identity_dataset(
            held_out, seed=FLAGS.seed, check_images=False,
            source=f"{FLAGS.data_dir} (--val_fraction={FLAGS.val_fraction:g} of its identities)")
    from data.align import read_crop_settings

    return dataset, val_set, {"data": FLAGS.data_dir, "identities": dataset.num_classes,
                              "images": len(dataset), "skipped": len(skipped),
                              "crop": read_crop_settings(FLAGS.data_dir)}


def _configure_devices(tf):
    """Split the CPU into --num_cpu_devices logical devices (must run before TF initialises)."""
    n = FLAGS.num_cpu_devices
    if n > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])


def _strategy(tf):
    name = FLAGS.distribution_strategy
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _objective():
    """The flags a checkpoint's optimiser slots and loss state depend on (stored in config.json)."""
    return {"optimizer": FLAGS.optimizer, "loss": FLAGS.loss,
            "pretrain_softmax_steps": FLAGS.pretrain_softmax_steps,
            "pretrain_head": FLAGS.pretrain_head}


def _check_same_objective(model_dir):
    """A checkpoint holds one optimiser's slots and one loss's head: resuming with others cannot
    be exact, so it is refused with the flags to use."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        stored = json.load(f)
    for key, value in _objective().items():
        if key in stored and stored[key] != value:
            sys.exit(f"train.py: {model_dir} was trained with --{key}={stored[key]}; resume with "
                     f"the same flag, or start a new --model_dir (got --{key}={value})")


def _num_classes(source):
    """Identities of the training data (class indices of the batches), for classification heads."""
    if hasattr(source, "num_classes"):
        return int(source.num_classes)
    from data.tfrecords import load_tfrecords

    table = load_tfrecords(source, skip_damaged=FLAGS.skip_damaged_shards)
    return len(table.class_names)  # cached: the pipeline reuses the table


def _total_steps():
    if FLAGS.max_steps is not None:
        return int(FLAGS.max_steps)
    if FLAGS.epochs is not None:
        return int(FLAGS.epochs) * FLAGS.steps_per_epoch
    return 20 * FLAGS.steps_per_epoch


class Trainer:
    """Owns the model, optimiser, checkpoints and logs of one run."""

    def __init__(self, tf, config, strategy, total_steps, num_classes=None):
        import keras

        from training.objectives import build_train_model
        from training.optim import make_optimizer
        from training.run_config import checkpoint_dir

        self.tf = tf
        self.config = config
        self.strategy = strategy
        self.total_steps = total_steps
        with strategy.scope():
            self.backbone = config.build_model()
            self.train_model, self.terms = build_train_model(
                self.backbone, config.image_size, FLAGS.loss, num_classes, margin=FLAGS.margin,
                distance=FLAGS.distance, mining=FLAGS.mining, loss_margin=FLAGS.loss_margin,
                head_scale=FLAGS.head_scale, head_margin=FLAGS.head_margin,
                center_weight=FLAGS.center_weight, pretrain_steps=FLAGS.pretrain_softmax_steps,
                pretrain_head=FLAGS.pretrain_head, seed=FLAGS.seed)
            optimizer = make_optimizer(FLAGS.optimizer, FLAGS.learning_rate, total_steps,
                                       FLAGS.lr_schedule, FLAGS.momentum, FLAGS.weight_decay,
                                       FLAGS.warmup_steps)
            self.train_model.compile(optimizer=optimizer)
            self.optimizer = self.train_model.optimizer
            self.optimizer.build(self.train_model.trainable_variables)
        # The classifier head (weights, centers) is part of the run's state, not of the export.
        extra = {"classifier": self.terms["classifier"]} if "classifier" in self.terms else {}
        self.checkpoint = tf.train.Checkpoint(model=self.backbone, optimizer=self.optimizer, **extra)
        self.checkpoint_dir = checkpoint_dir(FLAGS.model_dir)
        self._manager = None
        self._config_saved = False

    @property
    def manager(self):
        """The CheckpointManager, made on first use: after :meth:`restore` has repaired the
        checkpoint state (damaged checkpoints moved aside) so that its rotation never sees them."""
        if self._manager is None:
            self._manager = self.tf.train.CheckpointManager(
                self.checkpoint, self.checkpoint_dir, max_to_keep=FLAGS.keep_checkpoints)
        return self._manager

    @property
    def step(self):
        return int(self.optimizer.iterations.numpy())

    def restore(self, weights_only=False):
        """Restore the newest intact checkpoint (damaged newer ones are skipped with a warning,
        training/checkpoints.py); ``weights_only`` (--projector_only) skips the optimiser and leaves
        the checkpoints folder untouched. Returns the restored prefix, or None for a fresh run."""
        from training.checkpoints import find_intact

        path = find_intact(self.checkpoint_dir, move_damaged=not weights_only)
        self._manager = None  # re-read the (possibly rewritten) state file
        if path and weights_only:
            self.tf.train.Checkpoint(model=self.backbone).restore(path).expect_partial()
            logging.info("restored weights from %s", path)
        elif path:
            self.checkpoint.restore(path).assert_existing_objects_matched()
            logging.info("resumed from %s at step %d", path, self.step)
        return path

    def save(self):
        """Checkpoint at the current step. config.json is written just before this run's first
        checkpoint, so a run that fails before training leaves none behind (issue #16)."""
        if not self._config_saved:
            from training.run_config import save_run_config

            save_run_config(FLAGS.model_dir, self.config, extra=_objective())
            self._config_saved = True
        return self.manager.save(checkpoint_number=self.step)


def _cached_images(source, image_size):
    """The training images decoded into memory (--cache_images), or None."""
    from data import memory_cache
    from data.pipeline import resolve_source

    if FLAGS.cache_images == "off":
        return None
    size = memory_cache.cache_image_size(image_size, FLAGS.crop_fraction if FLAGS.augment else 1.0)
    n = len(resolve_source(source, skip_damaged_shards=FLAGS.skip_damaged_shards)[0])
    if FLAGS.cache_images == "auto" and not memory_cache.cache_fits(n, size):
        logging.info("cache_images=auto: %d images at %dx%d (%.1f GB) would take more than a "
                     "quarter of the RAM; decoding from files", n, size[0], size[1],
                     memory_cache.cache_bytes(n, size) / 1e9)
        return None
    logging.info("decoding %d training images into memory at %dx%d", n, size[0], size[1])
    # a live bar on a terminal, a plain line now and then in a log file (data/progress.py)
    return memory_cache.decode_to_memory(source, size, progress=True,
                                         skip_damaged_shards=FLAGS.skip_damaged_shards)


def _batches(source, image_size, epoch, images=None):
    from data.pipeline import balanced_dataset

    try:
        ds = balanced_dataset(source, FLAGS.identities_per_batch, FLAGS.images_per_identity,
                              image_size, augment=FLAGS.augment,
                              seed=FLAGS.seed * 1_000_003 + epoch,
                              small_identities=FLAGS.small_identities,
                              crop_fraction=FLAGS.crop_fraction, photometric=FLAGS.photometric,
                              images=images, skip_damaged_shards=FLAGS.skip_damaged_shards)
    except ValueError as exc:  # P x K the data cannot fill, bad sizes: a user error, one line
        raise CliError(str(exc)) from exc
    return ds.map(lambda x, y: ({"images": x, "labels": y},))


def _validate(trainer, val_set, writer):
    """Embed the validation images, score pairs, log to TensorBoard; returns the metrics dict."""
    import numpy as np

    from training import validation

    tf = trainer.tf
    t0 = time.perf_counter()
    emb = validation.embed_set(trainer.backbone, val_set, trainer.config.image_size)
    metrics = validation.score(emb, val_set)
    val = metrics.get("val_at_far", {})
    v3 = val.get("0.001", val.get(0.001))
    if isinstance(v3, dict):
        v3 = v3.get("val")
    out = {"step": trainer.step, "accuracy_mean": float(metrics["accuracy_mean"]),
           "accuracy_std": float(metrics["accuracy_std"]),
           "val_at_far_1e-3": None if v3 is None else float(v3),
           "auc": float(metrics["auc"]), "threshold": float(metrics["threshold"]),
           "num_pairs": int(val_set.num_pairs), "num_failed_pairs": int(val_set.num_failed_pairs),
           "skipped_images": len(val_set.skipped_images),
           "embedding_norm_mean": float(np.mean(np.linalg.norm(emb, axis=1))),
           "seconds": time.perf_counter() - t0}
    with writer.as_default(step=trainer.step):
        tf.summary.scalar("val/accuracy", out["accuracy_mean"])
        if out["val_at_far_1e-3"] is not None:
            tf.summary.scalar("val/val_at_far_1e-3", out["val_at_far_1e-3"])
        tf.summary.scalar("val/auc", out["auc"])
        tf.summary.scalar("val/threshold", out["threshold"])
        tf.summary.scalar("val/embedding_norm", out["embedding_norm_mean"])
    writer.flush()
    return out, emb


def _write_projector(trainer, val_set, log_dir, emb=None):
    from training import projector, validation

    n = min(FLAGS.projector_images, len(val_set.paths))
    if n == 0:
        return None
    paths, names = val_set.paths[:n], val_set.names[:n]
    if emb is None:
        emb = validation.embed_paths(trainer.backbone, paths, trainer.config.image_size)
    return projector.write_projector(log_dir, emb[:n], names, projector.load_thumbnails(paths))


def _export(trainer, threshold, desc):
    from export import export_metadata, export_saved_model

    meta = export_metadata(trainer.config, step=trainer.step, data=desc.get("data"),
                           crop=desc.get("crop"))
    return export_saved_model(trainer.backbone, os.path.join(FLAGS.model_dir, "export"),
                              trainer.config.image_size, meta, threshold)


def main(argv):
    del argv
    t_start = time.monotonic()
    _check_inputs()
    tf = import_tensorflow(before_first_op=_configure_devices)
    import keras

    import models
    from training.run_config import RunConfig, check_compatible, config_path, load_run_config

    from training.recipes import apply_recipe, resolve_recipe

    recipe = resolve_recipe(FLAGS.recipe, FLAGS.data_dir)
    recipe_flags = apply_recipe(FLAGS, recipe)
    logging.info("recipe %s%s", recipe, "".join(f" --{k}={v}" for k, v in recipe_flags.items()))
    if FLAGS.model not in models.MODEL_NAMES:
        sys.exit(f"unknown --model {FLAGS.model!r}; choose from {models.MODEL_NAMES}")
    image_size = flags.parse_image_size(FLAGS.image_size, models.default_image_size(FLAGS.model))
    config = RunConfig(FLAGS.model, image_size, FLAGS.embedding_size, FLAGS.normalization)
    if not FLAGS.model_dir:
        FLAGS.model_dir = os.path.join("runs", FLAGS.model)
    require_writable_dir(FLAGS.model_dir, "--model_dir")
    os.makedirs(FLAGS.model_dir, exist_ok=True)
    if not FLAGS.projector_only:  # --projector_only only reads checkpoints: no lock (training/lock.py)
        from training.lock import lock_model_dir

        lock_model_dir(FLAGS.model_dir)  # released at exit; in use: LockedError, exit code LOCKED
    from training.checkpoints import list_checkpoints
    from training.run_config import checkpoint_dir

    if os.path.exists(config_path(FLAGS.model_dir)):
        if list_checkpoints(checkpoint_dir(FLAGS.model_dir))[0]:  # a real resume
            try:
                check_compatible(load_run_config(FLAGS.model_dir), config)
            except ValueError as exc:  # another network, or a damaged config.json
                raise CliError(" ".join(str(exc).split())) from exc
            if not FLAGS.projector_only:
                _check_same_objective(FLAGS.model_dir)
        elif not FLAGS.projector_only:
            logging.info("ignoring %s: the run that wrote it saved no checkpoint",
                         config_path(FLAGS.model_dir))
    # config.json is (re)written by Trainer.save just before this run's first checkpoint.
    keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")

    train_source, val_set, desc = _resolve_data(image_size)
    desc["recipe"] = recipe
    total_steps = _total_steps()
    strategy = _strategy(tf)
    from training.objectives import needs_classes

    with_classifier = needs_classes(FLAGS.loss, FLAGS.pretrain_softmax_steps)
    trainer = Trainer(tf, config, strategy, total_steps,
                      _num_classes(train_source) if with_classifier else None)
    resumed = trainer.restore(weights_only=FLAGS.projector_only)  # all damaged: NO_CHECKPOINT
    log_dir = os.path.join(FLAGS.model_dir, "logs")
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "train"))

    if FLAGS.projector_only:
        if not resumed:
            raise CliError(f"--projector_only: no checkpoint in {FLAGS.model_dir}", NO_CHECKPOINT)
        if val_set is None:
            raise CliError("--projector_only needs validation images (--val_dir, --lfw_dir/--lfw_pairs "
                           "or --val_fraction > 0)")
        print(json.dumps({"projector_config": _write_projector(trainer, val_set, log_dir)}))
        return

    from training.callbacks import StepLogger, StopOnNaN, TimeLimit
    from training.objectives import PhaseSwitch

    batch = FLAGS.identities_per_batch * FLAGS.images_per_identity
    step_fn = lambda: trainer.step  # noqa: E731
    logger = StepLogger(writer, step_fn, batch, every=max(1, min(50, FLAGS.steps_per_epoch // 4)))
    nan_stop = StopOnNaN(step_fn)
    max_minutes = FLAGS.max_minutes
    if max_minutes is None and not FLAGS.data_dir and FLAGS.max_steps is None and FLAGS.epochs is None:
        max_minutes = BUILTIN_MAX_MINUTES  # the no-flag main job ends in about 10 minutes
        logging.info("built-in data with no step budget: training stops after %.1f minutes",
                     max_minutes)
    deadline = None if max_minutes is None else t_start + 60.0 * max_minutes
    time_limit = TimeLimit(deadline)
    callbacks = [nan_stop, time_limit, logger]
    if FLAGS.pretrain_softmax_steps > 0:
        callbacks.insert(0, PhaseSwitch(step_fn, FLAGS.pretrain_softmax_steps,
                                        trainer.terms["classifier"], trainer.terms["metric"]))
    logging.info("training %s at %s on %s; %d steps of %d images (P=%d, K=%d), model_dir=%s",
                 config.model, image_size, desc.get("data"), total_steps, batch,
                 FLAGS.identities_per_batch, FLAGS.images_per_identity, FLAGS.model_dir)

    images = None if FLAGS.projector_only else _cached_images(train_source, image_size)
    history = []
    last = None
    train_seconds = 0.0
    while trainer.step < total_steps and not time_limit.hit:
        epoch = trainer.step // FLAGS.steps_per_epoch
        steps = min(FLAGS.steps_per_epoch - trainer.step % FLAGS.steps_per_epoch,
                    total_steps - trainer.step)
        t0, step0 = time.perf_counter(), trainer.step
        fit = trainer.train_model.fit(_batches(train_source, image_size, epoch, images), epochs=1,
                                      steps_per_epoch=steps, shuffle=False,
                                      verbose=1 if sys.stdout.isatty() else 2,
                                      callbacks=callbacks)
        fit_seconds = time.perf_counter() - t0
        train_seconds += fit_seconds
        if nan_stop.nan_step is not None:
            good = trainer.manager.latest_checkpoint
            sys.stderr.write(f"train.py: loss became NaN/inf at step {nan_stop.nan_step}; stopping. "
                             f"Last good checkpoint: {good}. Try a lower --learning_rate.\n")
            sys.exit(EXIT_NAN)
        trainer.save()
        # Wall clock from start-up (data loading and caching included), validation excluded.
        elapsed = time.monotonic() - t_start - time_limit.paused_seconds
        epoch_record = {"step": trainer.step, "train_seconds": round(train_seconds, 2),
                        "elapsed_seconds": round(elapsed, 2),
                        "images_per_second": round((trainer.step - step0) * batch / fit_seconds, 1),
                        **{f"train_{k}": float(v[-1]) for k, v in fit.history.items() if v}}
        if val_set is not None:
            last, _ = _validate(trainer, val_set, writer)
            time_limit.pause(last["seconds"])
            epoch_record.update(last)
        history.append(epoch_record)
        if val_set is not None:
            print(f"step {last['step']}: val accuracy {last['accuracy_mean']:.4f} "
                  f"± {last['accuracy_std']:.4f}, VAL@FAR=1e-3 {last['val_at_far_1e-3']}, "
                  f"AUC {last['auc']:.4f}", flush=True)

    if last is None and val_set is not None:
        last, _ = _validate(trainer, val_set, writer)
    threshold = last["threshold"] if last else None
    summary = {"model": config.model, "image_size": list(image_size), "loss": FLAGS.loss,
               "step": trainer.step,
               "train_seconds": round(train_seconds, 1),
               "stopped_by_time_limit": time_limit.hit, "resumed_from": resumed, **desc}
    if last:
        summary.update({k: last[k] for k in ("accuracy_mean", "accuracy_std", "val_at_far_1e-3",
                                             "auc", "threshold", "num_pairs", "num_failed_pairs",
                                             "skipped_images")})
    if val_set is not None:
        summary["projector_config"] = _write_projector(trainer, val_set, log_dir)
    if FLAGS.export:
        summary["export_dir"] = _export(trainer, threshold, desc)
    summary.update({"model_dir": FLAGS.model_dir, "log_dir": log_dir,
                    "checkpoint": trainer.manager.latest_checkpoint,
                    "total_seconds": round(time.monotonic() - t_start, 1)})
    from data.atomic import write_text_atomically

    write_text_atomically(os.path.join(FLAGS.model_dir, "metrics.json"),
                          json.dumps({**summary, "history": history}, indent=2))
    writer.close()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    # user errors (CliError, an empty data set) end as one line on stderr with an exit_codes code
    app.run(cli_main(main, "train.py", user_errors=(EmptyDatasetError,
                                                    (DamagedShardError, DAMAGED_DATA))))
