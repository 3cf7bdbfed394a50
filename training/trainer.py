"""The training run: the model_dir, the trainer, the epoch loop and its validation hooks.

:func:`open_model_dir` claims ``--model_dir`` (lock, resume checks) and :func:`run` trains: one
Keras ``fit`` per epoch of ``--steps_per_epoch`` steps over P x K batches (triplets are mined inside
each, FaceNet Section 3.2), then a checkpoint, a timing record and a validation (squared L2
verification, Section 4); at the end the embedding projector, the export (training/export.py) and
``metrics.json`` (the last validation with its threshold, every epoch's record under ``history``).
A non-finite loss stops the run with exit code NAN_LOSS, naming the step and the last good
checkpoint. Everything comes from a training.settings.TrainSettings, never from flags.

Under a multi-worker strategy (``cluster``: training.distribute.Cluster) every worker trains and
saves, but only the chief writes ``model_dir`` (config.json, lock, checkpoints, logs,
metrics.json, projector, export); the others save their checkpoints into a scratch folder of their
own that is deleted again (saving can involve collectives, so every worker must save), and
resume from the chief's checkpoints. Validation, projector and export run on the chief alone and
use no collective (training/validation.py LocalEmbedder, a plain copy of the backbone for the
export); what every worker must decide alike (the checkpoint to resume, the time budget, the end)
is decided by the chief and shared with a small collective (distribute.WorkerSync).
"""
import dataclasses
import json
import os
import shutil
import sys
import time

from absl import logging

import exit_codes
from exit_codes import NO_CHECKPOINT, CliError

EXIT_NAN = exit_codes.NAN_LOSS  # 10, the table of exit_codes.py
BUILTIN_MAX_MINUTES = 8.5  # wall clock from start-up, leaving time to validate, project and export


def check_same_objective(model_dir, objective):
    """A checkpoint holds one optimiser's slots and one loss's head: resuming with others cannot
    be exact, so it is refused with the flags to use (``objective``: TrainSettings.objective())."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        stored = json.load(f)
    for key, value in objective.items():
        if key in stored and stored[key] != value:
            sys.exit(f"train.py: {model_dir} was trained with --{key}={stored[key]}; resume with "
                     f"the same flag, or start a new --model_dir (got --{key}={value})")


def open_model_dir(settings, cluster=None):
    """Create and lock ``settings.model_dir``; when it holds a checkpoint, check that the settings
    describe the same network (CliError) and objective (see :func:`check_same_objective`).

    --projector_only only reads checkpoints: no lock (training/lock.py), no objective check.
    ``cluster`` (multi-worker): only the chief creates and locks the folder; another worker only
    checks that no other run holds it (lock.check_shared) and reads it.
    """
    from cli_checks import require_writable_dir
    from training.checkpoints import list_checkpoints
    from training.lock import check_shared, lock_model_dir
    from training.run_config import check_compatible, checkpoint_dir, config_path, load_run_config

    model_dir = settings.model_dir
    chief = cluster is None or cluster.is_chief
    if chief:
        require_writable_dir(model_dir, "--model_dir")
        os.makedirs(model_dir, exist_ok=True)
    if not settings.projector_only and chief:
        # released at exit; in use: LockedError, exit code LOCKED
        lock_model_dir(model_dir, job=None if cluster is None else cluster.job_id)
    elif not settings.projector_only:
        check_shared(model_dir, cluster.job_id)
    if os.path.exists(config_path(model_dir)):
        if list_checkpoints(checkpoint_dir(model_dir))[0]:  # a real resume
            try:
                check_compatible(load_run_config(model_dir), settings.run_config())
            except ValueError as exc:  # another network, or a damaged config.json
                raise CliError(" ".join(str(exc).split())) from exc
            if not settings.projector_only:
                check_same_objective(model_dir, settings.objective())
        elif not settings.projector_only and chief:
            logging.info("ignoring %s: the run that wrote it saved no checkpoint",
                         config_path(model_dir))
    # config.json is (re)written by Trainer.save just before this run's first checkpoint.


class Trainer:
    """Owns the model, optimiser, checkpoints and logs of one run.

    ``cluster`` (multi-worker, training.distribute.Cluster): this process's task; ``scratch``: the
    folder of a non-chief worker's own throw-away files (distribute.worker_scratch_dir).
    """

    def __init__(self, tf, settings, strategy, num_classes=None, old_model=None, cluster=None,
                 scratch=None):
        from training import validation
        from training.distribute import (WorkerSync, keras_fit_under_multi_worker,
                                         synchronised_batch_norm)
        from training.objectives import build_train_model
        from training.optim import make_optimizer
        from training.run_config import checkpoint_dir

        s = settings
        self.tf = tf
        self.settings = settings
        self.config = settings.run_config()
        self.strategy = strategy
        self.total_steps = settings.total_steps
        self.old_model = old_model  # training.compatible.OldModel of --compatible_with, or None
        self.cluster = cluster
        self.is_chief = cluster is None or cluster.is_chief
        self.scratch = scratch
        # the chief's decisions, shared with every worker (a collective each); None: one process
        self.sync = None if cluster is None else WorkerSync(tf, strategy, self.is_chief)
        with strategy.scope():
            # what was built, for the log line too
            self.sync_batch_norm = synchronised_batch_norm(s.sync_batch_norm, strategy)
            self.backbone = self.config.build_model(sync_batch_norm=self.sync_batch_norm)
            old_embedding = None
            if old_model is not None:
                from training.compatible import FrozenEmbedding

                old_embedding = FrozenEmbedding(old_model.path, old=old_model, name="old_model")
            self.train_model, self.terms = build_train_model(
                self.backbone, self.config.image_size, s.loss, num_classes, margin=s.triplet_margin,
                distance=s.distance, mining=s.mining, loss_margin=s.loss_margin,
                head_scale=s.head_scale, head_margin=s.head_margin,
                center_weight=s.center_weight, pretrain_steps=s.pretrain_softmax_steps,
                pretrain_head=s.pretrain_head, seed=s.seed, old_embedding=old_embedding,
                mining_scope=s.mining_scope)
            optimizer = make_optimizer(s.optimizer, s.learning_rate, self.total_steps,
                                       s.lr_schedule, s.momentum, s.weight_decay,
                                       s.warmup_steps, s.ema_momentum)
            self.train_model.compile(optimizer=optimizer, jit_compile=s.jit_compile)
            self.optimizer = self.train_model.optimizer
            self.optimizer.build(self.train_model.trainable_variables)
        if cluster is not None:
            keras_fit_under_multi_worker(self.train_model)
        # validation and projector: this process alone, no collective (traced once)
        self.embedder = validation.LocalEmbedder(self.backbone, self.config.image_size)
        # The classifier head (weights, centers) is part of the run's state, not of the export.
        extra = {"classifier": self.terms["classifier"]} if "classifier" in self.terms else {}
        self.checkpoint = tf.train.Checkpoint(model=self.backbone, optimizer=self.optimizer, **extra)
        self.checkpoint_dir = checkpoint_dir(s.model_dir)
        self._manager = None
        self._config_saved = False

    @property
    def manager(self):
        """The CheckpointManager, made on first use: after :meth:`restore` has repaired the
        checkpoint state (damaged checkpoints moved aside) so that its rotation never sees them."""
        if self._manager is None:
            self._manager = self.tf.train.CheckpointManager(
                self.checkpoint, self.checkpoint_dir, max_to_keep=self.settings.keep_checkpoints)
        return self._manager

    @property
    def step(self):
        return int(self.optimizer.iterations.numpy())

    def restore(self, weights_only=False):
        """Restore the newest intact checkpoint (damaged newer ones are skipped with a warning,
        training/checkpoints.py); ``weights_only`` (--projector_only) skips the optimiser and leaves
        the checkpoints folder untouched. Returns the restored prefix, or None for a fresh run.

        Multi-worker: the chief picks the checkpoint (moving damaged ones aside), every worker
        restores that one from the chief's folder, and all check they are at the same step."""
        from training.checkpoints import find_intact, restore_chiefs_choice

        if self.sync is not None:
            path = restore_chiefs_choice(self.checkpoint, self.checkpoint_dir, self.sync,
                                         self.cluster.name, lambda: self.step)
            if path:
                logging.info("resumed from %s at step %d", path, self.step)
            else:
                logging.info("fresh start: no checkpoint in %s", self.checkpoint_dir)
            return path
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
        checkpoint, so a run that fails before training leaves none behind (issue #16).

        A non-chief worker saves too (saving can involve collectives) but into its scratch
        folder, which is deleted again; it returns None."""
        if not self.is_chief:
            from training.checkpoints import save_and_discard

            save_and_discard(self.checkpoint, self.step, self.scratch)
            return None
        if not self._config_saved:
            from training.run_config import save_run_config

            save_run_config(self.settings.model_dir, self.config, extra=self.settings.objective())
            self._config_saved = True
        return self.manager.save(checkpoint_number=self.step)


def validate(trainer, val_set, writer):
    """Embed the validation images, score pairs, log to TensorBoard; returns the metrics dict."""
    import numpy as np

    from training import validation

    tf = trainer.tf
    t0 = time.perf_counter()
    emb = validation.embed_set(trainer.embedder, val_set, trainer.config.image_size)
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


def write_projector(trainer, val_set, log_dir, emb=None):
    """The embedding projector files of the first --projector_images validation images."""
    from training import projector, validation

    n = min(trainer.settings.projector_images, len(val_set.paths))
    if n == 0:
        return None
    paths, names = val_set.paths[:n], val_set.names[:n]
    if emb is None:
        emb = validation.embed_paths(trainer.embedder, paths, trainer.config.image_size)
    return projector.write_projector(log_dir, emb[:n], names, projector.load_thumbnails(paths))


def plain_backbone(trainer):
    """The trained backbone as a plain single-device model: the backbone itself, or, when it
    trained under a strategy of several replicas or with synchronised batch norm, a copy built
    outside any strategy with its weights (no distributed variables, no collectives: what the
    chief of a multi-worker job can save alone, and what TensorFlow alone serves)."""
    if trainer.strategy.num_replicas_in_sync == 1 and not trainer.settings.sync_batch_norm:
        return trainer.backbone
    plain = trainer.config.build_model()
    plain.set_weights(trainer.backbone.get_weights())
    return plain


def export(trainer, threshold, desc):
    """The SavedModel of the trained backbone at model_dir/export (training/export.py)."""
    from training.export import export_metadata, export_saved_model

    compatible = None
    if trainer.old_model is not None:
        from training.compatible import old_identity

        compatible = old_identity(trainer.old_model)
    meta = export_metadata(trainer.config, step=trainer.step, data=desc.get("data"),
                           crop=desc.get("crop"), compatible_with=compatible)
    return export_saved_model(plain_backbone(trainer),
                              os.path.join(trainer.settings.model_dir, "export"),
                              trainer.config.image_size, meta, threshold)


def apply_precision(tf, settings):
    """--mixed_precision: set Keras' global policy (distribute.precision_policy: mixed_float16 with
    a GPU, mixed_bfloat16 without) and return its name; None (policy untouched) without it. The
    losses and their mining run in float32 whatever the policy."""
    if not settings.mixed_precision:
        return None
    import keras

    from training.distribute import precision_policy

    policy = precision_policy(tf)
    keras.mixed_precision.set_global_policy(policy)
    logging.info("--mixed_precision: Keras policy %s (%s)", policy,
                 "a GPU is visible" if policy == "mixed_float16" else "no GPU: bfloat16 on the CPU")
    return policy


def _scratch_for(cluster):
    """A non-chief worker's scratch folder (removed at exit), or None for the chief."""
    if cluster is None or cluster.is_chief:
        return None
    import atexit

    from training.distribute import worker_scratch_dir

    scratch = worker_scratch_dir(cluster)
    atexit.register(shutil.rmtree, scratch, True)
    return scratch


def _log_distribution(strategy, settings, cluster, trainer):
    from training.distribute import describe

    d = describe(strategy, settings.batch_images, settings.mining_scope)
    task = "" if cluster is None else (f"; this process: {cluster.name} at {cluster.address}, "
                                       f"{'the chief' if cluster.is_chief else 'not the chief'}")
    logging.info("distribution: %s, %d replica(s) on %d worker(s); global batch %d images "
                 "(P=%d x K=%d), %s per replica; triplets mined over %s (--mining_scope=%s); "
                 "sync batch norm %s; XLA %s%s", d["strategy"], d["replicas"], d["workers"],
                 d["global_batch"], settings.identities_per_batch, settings.images_per_identity,
                 d["per_replica_batch"], d["mining"], settings.mining_scope,
                 ("on" if trainer.sync_batch_norm else
                  "off" + (" (one replica)" if settings.sync_batch_norm else "")),
                 "on" if trainer.train_model.jit_compile else "off", task)


def run(tf, settings, t_start, strategy=None, cluster=None):
    """Train as ``settings`` say (the model_dir already opened, :func:`open_model_dir`), or with
    --projector_only only rewrite the projector files. ``t_start``: time.monotonic() at start-up,
    the origin of --max_minutes and of the records' ``elapsed_seconds``. ``strategy``: one already
    started (multi-worker: distribute.start_multi_worker), else made from the settings;
    ``cluster``: this process's task of a multi-worker job (distribute.Cluster), or None."""
    import keras

    from data.atomic import write_text_atomically
    from training import data as sources
    from training.distribute import check_jit, make_strategy

    s = settings
    config = s.run_config()
    image_size = s.image_size
    keras.utils.set_random_seed(s.seed)
    apply_precision(tf, s)
    if strategy is None:
        strategy = make_strategy(tf, s.distribution_strategy)
    check_jit(tf, strategy, s.jit_compile)
    scratch = _scratch_for(cluster)
    chief = scratch is None
    # a non-chief worker writes its data caches (validated_files.json) into its scratch folder
    data_settings = s if chief else dataclasses.replace(s, model_dir=scratch)

    train_source, val_set, desc = sources.resolve_data(data_settings)
    desc["recipe"] = s.recipe
    total_steps = s.total_steps
    from training.objectives import needs_classes

    with_classifier = needs_classes(s.loss, s.pretrain_softmax_steps)
    old_model = None
    if s.compatible_with and not s.projector_only:
        from training.compatible import load_old_model

        old_model = load_old_model(tf, s.compatible_with, s.embedding_size)
        logging.info("harmonic embeddings: compatible with the frozen %s %s (%s at %s)",
                     old_model.kind, old_model.path, old_model.metadata.get("model"),
                     old_model.image_size)
    trainer = Trainer(tf, s, strategy,
                      sources.num_classes(train_source, s.skip_damaged_shards)
                      if with_classifier else None, old_model=old_model, cluster=cluster,
                      scratch=scratch)
    _log_distribution(strategy, s, cluster, trainer)
    resumed = trainer.restore(weights_only=s.projector_only)  # all damaged: NO_CHECKPOINT
    log_dir = os.path.join(s.model_dir, "logs")
    writer = (tf.summary.create_file_writer(os.path.join(log_dir, "train")) if chief
              else tf.summary.create_noop_writer())

    if s.projector_only:
        if not resumed:
            raise CliError(f"--projector_only: no checkpoint in {s.model_dir}", NO_CHECKPOINT)
        if val_set is None:
            raise CliError("--projector_only needs validation images (--val_dir, --lfw_dir/--lfw_pairs "
                           "or --val_fraction > 0)")
        print(json.dumps({"projector_config": write_projector(trainer, val_set, log_dir)}))
        return

    from training.callbacks import BudgetProgress, StepLogger, StopOnNaN, TimeLimit
    from training.optim import minutes_schedule
    from training.objectives import PhaseSwitch

    batch = s.batch_images
    step_fn = lambda: trainer.step  # noqa: E731
    logger = StepLogger(writer, step_fn, batch, every=max(1, min(50, s.steps_per_epoch // 4)))
    nan_stop = StopOnNaN(step_fn)
    max_minutes = s.max_minutes
    if max_minutes is None and not s.data_dir and s.max_steps is None and s.epochs is None:
        max_minutes = BUILTIN_MAX_MINUTES  # the no-flag main job ends in about 10 minutes
        logging.info("built-in data with no step budget: training stops after %.1f minutes",
                     max_minutes)
    deadline = None if max_minutes is None else t_start + 60.0 * max_minutes
    time_limit = TimeLimit(deadline)
    # One process stops at the step the budget runs out; the workers of a job must stop at the
    # same step, so they follow the chief's clock at the end of each epoch instead.
    callbacks = [nan_stop, logger] + ([time_limit] if cluster is None else [])
    budget_schedule = minutes_schedule(trainer.optimizer)
    if budget_schedule is not None:
        if deadline is None or cluster is not None:
            # No budget to decay over (or workers whose clocks would give them different rates):
            # the rate stays at --learning_rate, as with --lr_schedule=constant.
            why = ("has no --max_minutes budget to decay over" if cluster is None else
                   "does not run in a multi-worker job (each worker's clock would set its own rate)")
            logging.warning("--lr_schedule=cosine_minutes %s: the learning rate stays constant", why)
        else:
            callbacks.append(BudgetProgress(budget_schedule, time_limit, 60.0 * max_minutes))
    if s.pretrain_softmax_steps > 0:
        callbacks.insert(0, PhaseSwitch(step_fn, s.pretrain_softmax_steps,
                                        trainer.terms["classifier"], trainer.terms["metric"]))
    logging.info("training %s at %s on %s; %d steps of %d images (P=%d, K=%d), model_dir=%s",
                 config.model, image_size, desc.get("data"), total_steps, batch,
                 s.identities_per_batch, s.images_per_identity, s.model_dir)

    images = None if s.projector_only else sources.cached_images(data_settings, train_source)
    verbose = (1 if sys.stdout.isatty() else 2) if chief else 0
    history = []
    last = None
    train_seconds = 0.0
    while trainer.step < total_steps and not time_limit.hit:
        epoch = trainer.step // s.steps_per_epoch
        steps = min(s.steps_per_epoch - trainer.step % s.steps_per_epoch,
                    total_steps - trainer.step)
        t0, step0 = time.perf_counter(), trainer.step
        fit = trainer.train_model.fit(
            sources.batches(data_settings, train_source, epoch, images, strategy=strategy),
            epochs=1, steps_per_epoch=steps, shuffle=False, verbose=verbose, callbacks=callbacks)
        fit_seconds = time.perf_counter() - t0
        train_seconds += fit_seconds
        if nan_stop.nan_step is not None:
            good = trainer.manager.latest_checkpoint if chief else "the chief's newest"
            sys.stderr.write(f"train.py: loss became NaN/inf at step {nan_stop.nan_step}; stopping. "
                             f"Last good checkpoint: {good}. Try a lower --learning_rate.\n")
            sys.exit(EXIT_NAN)
        trainer.save()
        if trainer.sync is not None:  # the chief's clock decides, for every worker alike
            expired = deadline is not None and time.monotonic() >= time_limit.deadline
            time_limit.hit = bool(trainer.sync.chief_value(1.0 if expired else 0.0))
        # Wall clock from start-up (data loading and caching included), validation excluded.
        elapsed = time.monotonic() - t_start - time_limit.paused_seconds
        epoch_record = {"step": trainer.step, "train_seconds": round(train_seconds, 2),
                        "elapsed_seconds": round(elapsed, 2),
                        "images_per_second": round((trainer.step - step0) * batch / fit_seconds, 1),
                        **{f"train_{k}": float(v[-1]) for k, v in fit.history.items() if v}}
        if val_set is not None and chief:
            last, _ = validate(trainer, val_set, writer)
            time_limit.pause(last["seconds"])
            epoch_record.update(last)
        history.append(epoch_record)
        if val_set is not None and chief:
            print(f"step {last['step']}: val accuracy {last['accuracy_mean']:.4f} "
                  f"± {last['accuracy_std']:.4f}, VAL@FAR=1e-3 {last['val_at_far_1e-3']}, "
                  f"AUC {last['auc']:.4f}", flush=True)

    if not chief:
        _finish_worker(trainer, cluster, train_seconds, resumed, t_start)
        return
    if last is None and val_set is not None:
        last, _ = validate(trainer, val_set, writer)
    threshold = last["threshold"] if last else None
    summary = {"model": config.model, "image_size": list(image_size), "loss": s.loss,
               "step": trainer.step,
               "train_seconds": round(train_seconds, 1),
               "stopped_by_time_limit": time_limit.hit, "resumed_from": resumed, **desc}
    if last:
        summary.update({k: last[k] for k in ("accuracy_mean", "accuracy_std", "val_at_far_1e-3",
                                             "auc", "threshold", "num_pairs", "num_failed_pairs",
                                             "skipped_images")})
    if val_set is not None:
        summary["projector_config"] = write_projector(trainer, val_set, log_dir)
    if s.export:
        summary["export_dir"] = export(trainer, threshold, desc)
    summary.update({"model_dir": s.model_dir, "log_dir": log_dir,
                    "checkpoint": trainer.manager.latest_checkpoint,
                    "total_seconds": round(time.monotonic() - t_start, 1)})
    if cluster is not None:
        summary.update({"task": cluster.name, "workers": cluster.num_workers})
    write_text_atomically(os.path.join(s.model_dir, "metrics.json"),
                          json.dumps({**summary, "history": history}, indent=2))
    writer.close()
    if trainer.sync is not None:
        trainer.sync.barrier()  # the other workers wait for the export before they exit
    print(json.dumps(summary, indent=2))


def _finish_worker(trainer, cluster, train_seconds, resumed, t_start):
    """A non-chief worker's end: wait for the chief's validation, projector and export (a
    barrier: the job ends together), then print what it did; it wrote nothing in model_dir."""
    trainer.sync.barrier()
    print(json.dumps({"task": cluster.name, "workers": cluster.num_workers, "step": trainer.step,
                      "train_seconds": round(train_seconds, 1), "resumed_from": resumed,
                      "model_dir": trainer.settings.model_dir, "writes_model_dir": False,
                      "total_seconds": round(time.monotonic() - t_start, 1)}, indent=2))
