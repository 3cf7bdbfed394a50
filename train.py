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
import os
import sys
import time

from absl import app, logging

import flags
from cli_checks import cli_main, require_dir, require_file, require_writable_dir
from data.dataset import EmptyDatasetError
from data.tfrecords import DamagedShardError
from exit_codes import DAMAGED_DATA, CliError
from quiet_tf import import_tensorflow
from training import trainer
from training.data import is_tfrecord_source
from training.distribute import configure_devices
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


def _settings():
    """Apply the recipe to the flags not given, then read the flags once into the run's frozen
    TrainSettings: nothing under training/ reads flags."""
    import models

    recipe = resolve_recipe(FLAGS.recipe, FLAGS.data_dir)
    recipe_flags = apply_recipe(FLAGS, recipe)
    logging.info("recipe %s%s", recipe, "".join(f" --{k}={v}" for k, v in recipe_flags.items()))
    if FLAGS.model not in models.MODEL_NAMES:
        sys.exit(f"unknown --model {FLAGS.model!r}; choose from {models.MODEL_NAMES}")
    return TrainSettings.from_flags(FLAGS, recipe)


def main(argv):
    del argv
    t_start = time.monotonic()
    _check_inputs()
    tf = import_tensorflow(before_first_op=lambda tf: configure_devices(tf, FLAGS.num_cpu_devices))
    settings = _settings()
    trainer.open_model_dir(settings)  # lock, resume checks
    trainer.run(tf, settings, t_start)


if __name__ == "__main__":
    # user errors (CliError, an empty data set) end as one line on stderr with an exit_codes code
    app.run(cli_main(main, "train.py", user_errors=(EmptyDatasetError,
                                                    (DamagedShardError, DAMAGED_DATA))))
