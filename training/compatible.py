"""The old, frozen model of a compatible run: ``train.py --compatible_with OLD`` (harmonic embeddings).

FaceNet's appendix ("Harmonic Embedding", Figure 11) trains a new network so that its embeddings
compare directly with those of an older one: every batch is embedded by both, and the triplet
loss mines over the mixed set (losses/harmonic.py). This module loads the old model and puts it
in the training graph as :class:`FrozenEmbedding`, a layer with no trainable weights:

* an export folder (a SavedModel by export.py or train.py): its ``serving_default`` signature is
  called on the batch turned back into RGB 0..255 (``data.preprocess`` inverted exactly) and
  resized to the old input size;
* a train.py ``model_dir``: the backbone is rebuilt from ``config.json`` and the newest intact
  checkpoint (training/export.py ``restore_backbone``), frozen, and called in inference mode
  (batch norm uses its moving statistics).

Either way the old weights never change: they are not in the optimiser, not in the new run's
checkpoints, and the loss stops their gradient. :func:`old_identity` is what the new export
records as ``compatible_with`` so that faces.py can keep a gallery embedded by the old export.
"""
import json
import os

import keras

from exit_codes import BAD_EXPORT, USAGE, CliError


class OldModel:
    """The old model: ``embed`` maps preprocessed RGB [N, h, w, 3] (any h, w) to float32 [N, D].

    Attributes: ``path`` (as given), ``kind`` ("export" or "model_dir"), ``image_size`` (H, W),
    ``embedding_size`` (D), ``metadata`` (the export's assets/facenet.json, or config.json).
    """

    def __init__(self, path, kind, image_size, embedding_size, metadata, embed):
        self.path = path
        self.kind = kind
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.embedding_size = int(embedding_size)
        self.metadata = dict(metadata)
        self.embed = embed


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_export(tf, path):
    from data.preprocess import PREPROCESS_MEAN, PREPROCESS_SCALE
    from training.export import read_export_metadata

    try:
        loaded = tf.saved_model.load(path)
    except (OSError, ValueError, IndexError, tf.errors.OpError) as exc:  # damaged graph/variables
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CliError(f"--compatible_with {path}: cannot load the SavedModel ({first})",
                       BAD_EXPORT) from exc
    if "serving_default" not in loaded.signatures:
        raise CliError(f"--compatible_with {path}: the SavedModel has no serving_default signature",
                       USAGE)
    signature = loaded.signatures["serving_default"]
    (input_name, _), = signature.structured_input_signature[1].items()
    meta = read_export_metadata(path)
    if not meta.get("image_size") or not meta.get("embedding_size"):
        raise CliError(f"--compatible_with {path}: assets/facenet.json does not give image_size "
                       "and embedding_size", USAGE)

    def embed(preprocessed):
        rgb = preprocessed / PREPROCESS_SCALE + PREPROCESS_MEAN  # data.preprocess, inverted
        return signature(**{input_name: rgb})["embeddings"]

    embed.loaded = loaded  # keeps the SavedModel's variables alive
    return OldModel(path, "export", meta["image_size"], meta["embedding_size"], meta, embed)


def _load_model_dir(path):
    from training.export import restore_backbone

    backbone, config, _ = restore_backbone(path)
    backbone.trainable = False

    def embed(preprocessed):
        return backbone(preprocessed, training=False)

    embed.backbone = backbone
    stored = _read_json(os.path.join(path, "config.json"))
    return OldModel(path, "model_dir", config.image_size, config.embedding_size, stored, embed)


def load_old_model(tf, path, embedding_size):
    """The old model at ``path`` (an export folder or a train.py model_dir), checked to give
    ``embedding_size``-D embeddings. Raises CliError with a one-line message: exit code
    BAD_EXPORT for a SavedModel that does not load (damaged), USAGE otherwise."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        old = _load_export(tf, path)
    elif os.path.isfile(os.path.join(path, "config.json")):
        old = _load_model_dir(path)
    else:
        raise CliError(f"--compatible_with {path}: neither an export folder (saved_model.pb) nor "
                       "a train.py model_dir (config.json)", USAGE)
    if old.embedding_size != int(embedding_size):
        raise CliError(f"--compatible_with {path}: the old model's embeddings are "
                       f"{old.embedding_size}-D and the new model's {int(embedding_size)}-D; "
                       "harmonic embeddings need the same --embedding_size", USAGE)
    return old


def old_identity(old):
    """What the new run records about the old model (config.json and the export's
    ``compatible_with``): its path and kind, and for an export its ``export_id`` and
    ``embedding_space`` (a model_dir's own export, model_dir/export, when it has one)."""
    meta = old.metadata
    if old.kind == "model_dir":
        exported = os.path.join(old.path, "export", "assets", "facenet.json")
        meta = _read_json(exported) if os.path.isfile(exported) else {}
    identity = {"path": os.path.abspath(old.path), "kind": old.kind,
                "model": old.metadata.get("model")}
    for key in ("export_id", "embedding_space"):
        if meta.get(key):
            identity[key] = meta[key]
    return identity


@keras.saving.register_keras_serializable(package="facenet")
class FrozenEmbedding(keras.layers.Layer):
    """The old model inside the training graph: preprocessed images [B, H, W, 3] at the new
    model's size -> the old model's embeddings [B, D], resized to its input size first
    (bilinear). No trainable weights; rebuilt from ``old_path`` by ``from_config``."""

    def __init__(self, old_path, old=None, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.old_path = os.fspath(old_path)
        self._old = old

    def _model(self):
        if self._old is None:  # from_config: load it now
            import tensorflow as tf

            is_export = os.path.isfile(os.path.join(self.old_path, "saved_model.pb"))
            meta = _read_json(os.path.join(self.old_path, "assets", "facenet.json") if is_export
                              else os.path.join(self.old_path, "config.json"))
            self._old = load_old_model(tf, self.old_path, meta["embedding_size"])
        return self._old

    @property
    def embedding_size(self):
        return self._model().embedding_size

    def call(self, images):
        import tensorflow as tf

        old = self._model()
        images = tf.cast(images, tf.float32)
        if tuple(images.shape[1:3]) != old.image_size:
            images = tf.image.resize(images, old.image_size, method="bilinear")
        return tf.stop_gradient(tf.cast(old.embed(images), tf.float32))

    def compute_output_spec(self, images):
        return keras.KerasTensor((images.shape[0], self.embedding_size), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(old_path=self.old_path)
        return config
