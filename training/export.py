"""The export library: a trained backbone as a SavedModel that TensorFlow alone can serve, and the
way back from a model_dir (checkpoint restore, stored metrics, an embedder for evaluate.py).

Signatures of the export:
- ``serving_default``: ``images`` float32 [N, H, W, 3], RGB in 0..255 -> ``embeddings`` float32 [N, D]
  (the training preprocessing, data/preprocess.py, runs inside the graph);
- ``embed_jpeg``: ``images`` string [N] of encoded JPEG/PNG/BMP/GIF/WebP bytes -> ``embeddings``,
  with decode, resize to H x W and the same preprocessing in-graph.

Also stored: ``assets/facenet.json`` (model name, image size, embedding size, preprocessing, the
validation-chosen verification threshold in squared L2 distance, and ``crop``: how the training
faces were cut from photos, from the aligned folder's align_settings.json, or null; the export's
identity: ``export_id``, ``embedding_space`` and, for a model trained compatible with an older
export, ``compatible_with``, see :func:`export_metadata`) and, as attributes of the loaded
object, ``threshold`` (float32 scalar variable, NaN when unknown) and ``image_size`` (int32 [2]).

Used by train.py (the export at the end of a run), export.py (the CLI), evaluate.py --model_dir
(:func:`load_embedder`) and the photo tool (:func:`read_export_metadata`).
"""
import dataclasses
import json
import os
import shutil
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


def restore_backbone(model_dir, checkpoint=None, image_size=None):
    """Rebuild the backbone from model_dir/config.json and restore a checkpoint into it.

    ``checkpoint``: a prefix to restore exactly; by default the newest intact checkpoint (damaged
    newer ones are skipped with a warning and left in place, training/checkpoints.py). Raises
    training.checkpoints.NoCheckpointError (exit code NO_CHECKPOINT) when none restores.
    ``image_size``: (H, W) to build the backbone at instead of the stored input size.
    Returns (backbone, run_config, checkpoint_path); run_config is the one the backbone was built
    from.
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
    if image_size is not None:
        config = dataclasses.replace(config, image_size=(int(image_size[0]), int(image_size[1])))
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


def _metadata_of_folder(path):
    """(metadata, export folder) of an export folder or of a train.py model_dir (its export,
    model_dir/export); ({}, path) when neither has an ``assets/facenet.json``."""
    for folder in (path, os.path.join(path, "export")):
        if os.path.isfile(os.path.join(folder, "assets", METADATA_NAME)):
            return read_export_metadata(folder), folder
    return {}, path


def compatibility_record(old):
    """The ``compatible_with`` record of an export whose embeddings live in ``old``'s space.

    ``old``: the old export's folder (its ``assets/facenet.json`` is read; for a train.py
    model_dir, that of model_dir/export), its metadata dict as :func:`read_export_metadata`
    returns it (with an ``export_dir`` key if the path is to be recorded: an evaluation embedder's
    metadata has one), what training/compatible.py ``old_identity`` returns (``path``, ``kind``,
    and the ids when the old model has them), or a record this function returned (kept as it is,
    so a re-export keeps the run's compatibility).
    Returns ``{"export_id": OLD_ID, "embedding_space": OLD_SPACE, "export_dir": OLD_PATH}``
    (plus ``path``, ``kind`` and ``model`` when ``old`` has them, for the reader):
    OLD_SPACE is the old export's ``embedding_space``, else its ``export_id``. Both are None when
    the old model records no identity (an export written before exports had one, or a model_dir
    without an export): the compatibility is recorded, but no gallery cache can be shared.
    """
    if isinstance(old, (str, os.PathLike)):
        meta, folder = _metadata_of_folder(os.path.abspath(os.fspath(old)))
        old = dict(meta, export_dir=folder)
    if not isinstance(old, dict):
        raise TypeError(f"compatible_with: an export folder or its metadata dict, not "
                        f"{type(old).__name__}")

    def ident(key):
        value = old.get(key)
        return value if isinstance(value, str) and value else None

    export_id = ident("export_id")
    space = ident("embedding_space") or export_id
    export_dir = old.get("export_dir") or old.get("path")
    if export_dir and old.get("kind") == "model_dir" and export_id:
        export_dir = os.path.join(export_dir, "export")  # the ids are those of its export
    record = {"export_id": export_id, "embedding_space": space,
              "export_dir": os.path.abspath(export_dir) if export_dir else None}
    record.update({k: old[k] for k in ("path", "kind", "model") if old.get(k) is not None})
    return record


def export_metadata(config, compatible_with=None, **extra):
    """The ``assets/facenet.json`` fields of a run's backbone (``config``: its RunConfig), plus
    ``extra`` (step or checkpoint, data, crop) and the export's identity.

    Identity (new at every call, so every export, re-exports of one checkpoint included, has its
    own): ``export_id``, a uuid4 hex, and ``embedding_space``, the id of the space its embeddings
    live in (the photo tool's gallery cache is keyed by it). By default the space is the export's
    own id. ``compatible_with``: for a model trained so that its embeddings compare directly with
    an old model's (FaceNet's harmonic embeddings), anything :func:`compatibility_record` takes
    (the old export's folder, its metadata, training/compatible.py ``old_identity``, or the record
    an earlier export of the run stored); the export then records ``compatible_with`` (the old
    export's ``export_id``, ``embedding_space`` and ``export_dir``) and lives in the old export's
    space, so faces.py keeps the galleries the old export embedded. Whoever exports a run trained
    that way (train.py at its end, export.py later from a checkpoint) passes what the run keeps
    about its old model, so that every export of the run stays compatible. When the old model has
    no identity the export keeps a space of its own (a warning says so). Raises ValueError when
    the old export's metadata gives another embedding size. The identity keys are set after
    ``extra``, which cannot override them.
    """
    import uuid

    from data.preprocess import PREPROCESS_NAME

    meta = {"model": config.model, "embedding_size": config.embedding_size,
            "normalization": config.normalization, "preprocessing": PREPROCESS_NAME, **extra}
    export_id = uuid.uuid4().hex
    meta["export_id"] = export_id
    meta["embedding_space"] = export_id
    if compatible_with is None:
        return meta
    if isinstance(compatible_with, (str, os.PathLike)):
        folder_meta, folder = _metadata_of_folder(os.path.abspath(os.fspath(compatible_with)))
        compatible_with = dict(folder_meta, export_dir=folder)
    record = compatibility_record(compatible_with)
    old_size = compatible_with.get("embedding_size") if isinstance(compatible_with, dict) else None
    if old_size is not None and int(old_size) != int(config.embedding_size):
        raise ValueError(f"cannot be compatible with {record['export_dir']}: its embeddings have "
                         f"{old_size} dimensions, this model's {config.embedding_size}")
    meta["compatible_with"] = record
    if record["embedding_space"]:
        meta["embedding_space"] = record["embedding_space"]
    else:
        from absl import logging

        logging.warning("the old model %s records no export_id (exported before exports had "
                        "identities): this export is compatible with it but has an embedding "
                        "space of its own, so faces.py rebuilds the gallery caches it embedded",
                        record["export_dir"])
    return meta


def load_checkpoint_embedder(model_dir, image_size=None, batch_size=64):
    """An evaluation.embedder.Embedder of the newest intact checkpoint of a train.py ``model_dir``
    (damaged newer ones are skipped with a warning and left in place, training/checkpoints.py).

    The backbone is rebuilt from ``model_dir/config.json`` (at ``image_size`` (H, W) if given)
    and fed ``data.preprocess.preprocess(images)``; the embedder's metadata is config.json plus
    ``source="checkpoint"`` and the ``checkpoint`` prefix. Raises FileNotFoundError without a
    config.json and training.checkpoints.NoCheckpointError (exit code NO_CHECKPOINT) when no
    checkpoint restores.
    """
    from evaluation.embedder import embedder_from_backbone
    from training.checkpoints import NoCheckpointError
    from training.run_config import checkpoint_dir, config_path

    path = config_path(model_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is --model_dir a training directory?")
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    try:
        backbone, config, ckpt = restore_backbone(model_dir, image_size=image_size)
    except NoCheckpointError:
        raise NoCheckpointError(f"no checkpoint under {checkpoint_dir(model_dir)}") from None
    meta = dict(stored, source="checkpoint", checkpoint=ckpt)
    return embedder_from_backbone(backbone, config.image_size, meta, batch_size,
                                  embedding_size=stored.get("embedding_size"))


def load_embedder(export_dir=None, model_dir=None, image_size=None, batch_size=64):
    """An evaluation.embedder.Embedder from a SavedModel (``export_dir``, preferred when both are
    given; evaluation.embedder.load_embedder) or from the newest intact checkpoint of a training
    directory (``model_dir``; :func:`load_checkpoint_embedder`).

    ``image_size`` (H, W) overrides the stored input size (needed for a SavedModel without
    ``assets/facenet.json`` and without a static input shape).
    """
    from evaluation import embedder

    if image_size is not None:
        image_size = (int(image_size[0]), int(image_size[1]))
    if export_dir:
        return embedder.load_embedder(os.fspath(export_dir), image_size=image_size,
                                      batch_size=batch_size)
    if model_dir:
        return load_checkpoint_embedder(os.fspath(model_dir), image_size, batch_size)
    raise ValueError("give --export_dir (SavedModel) or --model_dir (training checkpoint)")
