"""Export a trained backbone as a SavedModel that TensorFlow alone can serve.

    python export.py --model_dir runs/tiny [--checkpoint PREFIX] [--export_dir DIR] [--threshold T]

Re-exports any checkpoint of a train.py ``--model_dir`` (default: the newest intact one) with
the threshold and crop the run recorded; a run trained ``--compatible_with`` an old model stays
compatible. The SavedModel's signatures (``serving_default``, ``embed_jpeg``) and its
``assets/facenet.json`` are described in training/export.py, the library this CLI drives.
"""
import json
import os
import sys



def main(argv):
    del argv
    from absl import flags as absl_flags

    FLAGS = absl_flags.FLAGS
    if not FLAGS.model_dir:
        sys.exit("export.py: --model_dir is required")
    from cli_checks import require_dir, require_writable_parent
    from exit_codes import BAD_EXPORT, CliError
    from training.export import (export_metadata, export_saved_model, restore_backbone,
                                 stored_metrics)

    # User errors first, before TensorFlow loads: one line each (cli_main), no traceback.
    require_dir(FLAGS.model_dir, "--model_dir")
    if not os.path.isfile(os.path.join(FLAGS.model_dir, "config.json")):
        raise CliError(f"--model_dir {FLAGS.model_dir}: no config.json (not a train.py model_dir, "
                       "or its run saved no checkpoint)")
    recorded = stored_metrics(FLAGS.model_dir, required=FLAGS.threshold is None)
    export_dir = FLAGS.export_dir or os.path.join(FLAGS.model_dir, "export")
    require_writable_parent(export_dir, "--export_dir", BAD_EXPORT)
    # none restores: NoCheckpointError, a CliError (one line, exit code NO_CHECKPOINT)
    backbone, config, ckpt = restore_backbone(FLAGS.model_dir, FLAGS.checkpoint)
    threshold = FLAGS.threshold if FLAGS.threshold is not None else recorded.get("threshold")
    with open(os.path.join(FLAGS.model_dir, "config.json"), encoding="utf-8") as f:
        old = json.load(f).get("compatible_with")  # train.py --compatible_with: stay compatible
    meta = export_metadata(config, compatible_with=old, checkpoint=os.path.basename(ckpt),
                           crop=recorded.get("crop"))
    export_saved_model(backbone, export_dir, config.image_size, meta, threshold)
    print(json.dumps({"export_dir": export_dir, "checkpoint": ckpt, "threshold": threshold}))


if __name__ == "__main__":
    from absl import app

    import flags

    from cli_checks import cli_main

    flags.define_export_flags()
    app.run(cli_main(main, "export.py"))
