"""Export a trained backbone as a SavedModel that TensorFlow alone can serve.

    python export.py --model_dir runs/tiny [--checkpoint PREFIX] [--export_dir DIR] [--threshold T]

Signatures of the export:
- ``serving_default``: ``images`` float32 [N, H, W, 3], RGB in 0..255 -> ``embeddings`` float32 [N, D]
  (the training preprocessing, data/preprocess.py, runs inside the graph);
- ``embed_jpeg``: ``images`` string [N] of encoded JPEG/PNG/BMP/GIF/WebP bytes -> ``embeddings``,
  with decode, resize to H x W and the same preprocessing in-graph.

Also stored: ``assets/facenet.json`` (model name, image size, embedding size, preprocessing, the
validation-chosen verification threshold in squared L2 distance, and ``crop``: how the training
faces were cut from photos, from the aligned folder's align_settings.json, or null) and, as
attributes of the loaded
object, ``threshold`` (float32 scalar variable, NaN when unknown) and ``image_size`` (int32 [2]).
"""
import json
import os
import shutil
import sys
import tempfile

from quiet_tf import import_tensorflow

METADATA_NAME = "facenet.json"


def _module_class(tf):
    from data.preprocess import preprocess

    class FaceNetExport(tf.Module):
        """The exported object: a backbone plus its preprocessing, threshold and metadata."""

        def __init__(self, backbone, image_size, threshold, metadata_path):
            super().__init__(name="facenet_export")
            h, w = image_size
            self.backbone = backbone
            self.image_size = tf.Variable([h, w], dtype=tf.int32, trainable=False, name="image_size")
            self.threshold = tf.Variable(float("nan") if threshold is None else float(threshold),
                                         dtype=tf.float32, trainable=False, name="threshold")
            self.metadata = tf.saved_model.Asset(metadata_path)

            @tf.function(input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32, name="images")])
            def serve(images):
                emb = self.backbone(preprocess(images), training=False)
                return {"embeddings": tf.cast(emb, tf.float32)}

            def decode_one(data):
                img = tf.io.decode_image(data, channels=3, expand_animations=False)
                img = tf.image.resize(tf.cast(img, tf.float32), (h, w), method="bilinear",
                                      antialias=True)
                return tf.clip_by_value(img, 0.0, 255.0)

            @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
            def embed_jpeg(images):
                decoded = tf.map_fn(decode_one, images,
                                    fn_output_signature=tf.TensorSpec([h, w, 3], tf.float32))
                return serve(decoded)

            self.serve = serve
            self.embed_jpeg = embed_jpeg

    return FaceNetExport


def export_saved_model(backbone, export_dir, image_size, metadata, threshold=None):
    """Write ``backbone`` as a SavedModel at ``export_dir`` (replaced atomically).

    backbone: Keras model, preprocessed RGB [N, H, W, 3] -> unit embeddings [N, D].
    image_size: (H, W). metadata: JSON-serialisable dict stored in assets/facenet.json.
    threshold: verification threshold on squared L2 distance, or None.
    """
    tf = import_tensorflow()
    export_dir = os.path.abspath(export_dir)
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    meta = dict(metadata)
    meta.update({"image_size": [int(image_size[0]), int(image_size[1])],
                 "threshold": None if threshold is None else float(threshold),
                 "signatures": {"serving_default": "images float32 [N,H,W,3] RGB 0..255 -> embeddings",
                                "embed_jpeg": "images string [N] encoded -> embeddings"}})
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        meta_path = os.path.join(staging, METADATA_NAME)
        with open(meta_path, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        module = _module_class(tf)(backbone, image_size, threshold, meta_path)
        out = os.path.join(staging, "saved_model")
        tf.saved_model.save(module, out, signatures={"serving_default": module.serve,
                                                      "embed_jpeg": module.embed_jpeg})
        old = None
        if os.path.exists(export_dir):
            old = export_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(export_dir, old)
        os.replace(out, export_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return export_dir


def read_export_metadata(export_dir):
    """The dict stored in ``export_dir/assets/facenet.json``."""
    with open(os.path.join(export_dir, "assets", METADATA_NAME), encoding="utf-8") as f:
        return json.load(f)


def restore_backbone(model_dir, checkpoint=None):
    """Rebuild the backbone from model_dir/config.json and restore a checkpoint into it.

    ``checkpoint``: a prefix to restore exactly; by default the newest intact checkpoint (damaged
    newer ones are skipped with a warning and left in place, training/checkpoints.py). Raises
    training.checkpoints.NoCheckpointError (exit code NO_CHECKPOINT) when none restores.
    Returns (backbone, run_config, checkpoint_path).
    """
    tf = import_tensorflow()
    from training.checkpoints import NoCheckpointError, find_intact, require_intact
    from training.run_config import checkpoint_dir, load_run_config

    config = load_run_config(model_dir)
    if checkpoint:
        path = require_intact(checkpoint)
    else:
        path = find_intact(checkpoint_dir(model_dir))
        if not path:
            raise NoCheckpointError(f"no checkpoint found in {checkpoint_dir(model_dir)}")
    backbone = config.build_model()
    tf.train.Checkpoint(model=backbone).restore(path).expect_partial()
    return backbone, config, path


def stored_metrics(model_dir, required=True):
    """What train.py recorded in model_dir/metrics.json (threshold, crop, ...), or {} without one.

    A damaged (unreadable, not JSON, not an object) file raises CliError (exit code DAMAGED_DATA)
    naming it when ``required``; otherwise (--threshold given) it is ignored with one warning.
    """
    from exit_codes import DAMAGED_DATA, CliError

    path = os.path.join(model_dir, "metrics.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
        if not isinstance(recorded, dict):
            raise ValueError(f"a JSON {type(recorded).__name__}, not an object")
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        if required:
            raise CliError(f"{path} is damaged ({reason}): it holds the validation threshold; "
                           "pass --threshold to export without it, or rerun train.py on this "
                           "--model_dir to rewrite it", DAMAGED_DATA) from None
        from absl import logging

        logging.warning("ignoring damaged %s (%s): the export records no crop settings", path,
                        reason)
        return {}
    return recorded


def export_metadata(config, **extra):
    """The ``assets/facenet.json`` fields of a run's backbone (``config``: its RunConfig), plus
    ``extra`` (step or checkpoint, data, crop)."""
    from data.preprocess import PREPROCESS_NAME

    return {"model": config.model, "embedding_size": config.embedding_size,
            "normalization": config.normalization, "preprocessing": PREPROCESS_NAME, **extra}


def main(argv):
    del argv
    from absl import flags as absl_flags

    FLAGS = absl_flags.FLAGS
    if not FLAGS.model_dir:
        sys.exit("export.py: --model_dir is required")
    from cli_checks import require_dir, require_writable_parent
    from exit_codes import BAD_EXPORT, CliError

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
    meta = export_metadata(config, checkpoint=os.path.basename(ckpt), crop=recorded.get("crop"))
    export_saved_model(backbone, export_dir, config.image_size, meta, threshold)
    print(json.dumps({"export_dir": export_dir, "checkpoint": ckpt, "threshold": threshold}))


if __name__ == "__main__":
    from absl import app

    import flags

    from cli_checks import cli_main

    flags.define_export_flags()
    app.run(cli_main(main, "export.py"))
