"""The exported model as the photo tool sees it: embeddings, input size and verification threshold.

Any SavedModel written by ``export.py`` (or ``train.py``) works: its ``serving_default`` signature
maps float32 [N, H, W, 3] RGB 0..255 to ``embeddings`` (the training preprocessing runs inside the
graph), ``assets/facenet.json`` stores the input size, the preprocessing name and the
validation-chosen threshold on the *squared* L2 distance, and the loaded object carries the same
threshold as a variable (NaN when unknown). Loading goes through
:func:`evaluation.embedder.load_embedder` (``tf.saved_model.load``), so faces are resized to the
model input exactly as the training and evaluation pipelines resize their thumbnails.

The threshold is checked twice: :func:`threshold_before_loading` reads the JSON only (no
TensorFlow), so a missing threshold fails in a fraction of a second; :func:`resolve_threshold`
decides after loading, falling back to the SavedModel's ``threshold`` variable when the JSON is
missing.
"""
import math
import os

import numpy as np

from photos.errors import EXIT_BAD_EXPORT, EXIT_NO_THRESHOLD, PhotoError
# the file inside export_dir/assets and its reader (importing them loads no TensorFlow)
from training.export import METADATA_NAME, read_export_metadata


def _valid_threshold(value):
    """A usable threshold (finite, > 0) as float, else None."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _identity(value):
    """An export or space id from facenet.json: a non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def check_export_dir(export_dir):
    """Raise :class:`PhotoError` (exit 2) unless ``export_dir`` looks like a SavedModel."""
    if not export_dir:
        raise PhotoError("--export_dir is required: a SavedModel written by export.py or train.py "
                         "(python train.py writes runs/tiny/export)", EXIT_BAD_EXPORT)
    if not os.path.isdir(export_dir):
        raise PhotoError(f"--export_dir {export_dir}: no such directory", EXIT_BAD_EXPORT)
    if not os.path.isfile(os.path.join(export_dir, "saved_model.pb")):
        raise PhotoError(f"--export_dir {export_dir}: not a SavedModel (no saved_model.pb)",
                         EXIT_BAD_EXPORT)


def read_metadata(export_dir):
    """``assets/facenet.json`` as a dict, or None when the export has none (no TensorFlow)."""
    if not os.path.isfile(os.path.join(export_dir, "assets", METADATA_NAME)):
        return None
    try:
        return read_export_metadata(export_dir)
    except (OSError, ValueError) as exc:
        raise PhotoError(f"--export_dir {export_dir}: unreadable assets/{METADATA_NAME}: {exc}",
                         EXIT_BAD_EXPORT) from exc


def _no_threshold(export_dir):
    return PhotoError(
        f"the export {export_dir} stores no verification threshold (it was exported without a "
        "validation run); pass --threshold T, a squared L2 distance (e.g. the 'threshold' that "
        "evaluate.py reports for this model)", EXIT_NO_THRESHOLD)


def _override(threshold):
    value = _valid_threshold(threshold)
    if value is None:
        raise PhotoError(f"--threshold must be a positive squared L2 distance, got {threshold}",
                         EXIT_NO_THRESHOLD)
    return value


def threshold_before_loading(export_dir, override=None):
    """Fail fast, before TensorFlow is imported, when no threshold can be had.

    Returns the threshold when ``override`` is given or the export's JSON stores a usable one;
    None when only the loaded model can tell (no JSON, or a JSON without the key).
    Raises :class:`PhotoError` (exit 5) when the JSON says the threshold is unknown.
    """
    if override is not None:
        return _override(override)
    meta = read_metadata(export_dir)
    if meta is None or "threshold" not in meta:
        return None
    value = _valid_threshold(meta["threshold"])
    if value is None:
        raise _no_threshold(export_dir)
    return value


class FaceModel:
    """A loaded export.

    Attributes:
        export_dir: the SavedModel folder.
        image_size: (H, W) model input in pixels.
        metadata: ``assets/facenet.json`` (empty dict if absent); its ``export_id`` and
            ``embedding_space`` (:meth:`export_id`, :meth:`embedding_space`) identify the export
            and the space its embeddings live in.
        threshold: stored verification threshold (squared L2), or None when unknown.
    """

    def __init__(self, export_dir, embedder, threshold):
        self.export_dir = os.path.abspath(export_dir)
        self.embedder = embedder
        self.image_size = tuple(embedder.image_size)
        self.metadata = dict(embedder.metadata)
        self.threshold = threshold

    @property
    def batch_size(self):
        return self.embedder.batch_size

    def embed(self, images):
        """RGB 0..255 images [N, H, W, 3] (resized like training if not H x W) -> float32 [N, D]."""
        return self.embedder.embed_images(np.asarray(images))

    def fingerprint(self):
        """Identifies the exported weights: path plus size and mtime of the graph and variables."""
        parts = [os.path.realpath(self.export_dir)]
        for name in ("saved_model.pb", os.path.join("variables", "variables.index")):
            try:
                st = os.stat(os.path.join(self.export_dir, name))
                parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
            except OSError:
                parts.append(f"{name}:-")
        return "|".join(parts)

    def export_id(self):
        """The export's ``export_id`` (training/export.py ``export_metadata``), or None for an
        export written before exports had identities."""
        return _identity(self.metadata.get("export_id"))

    def embedding_space(self):
        """The id of the space the embeddings live in: the export's ``embedding_space`` (its own
        ``export_id``, or an older export's space when it was trained compatible with that export,
        so embeddings of the two can be compared), or None for an old export without one.
        The gallery cache is keyed by it (photos/gallery.py)."""
        return _identity(self.metadata.get("embedding_space")) or self.export_id()

    def describe(self):
        """JSON-ready summary for reports."""
        compatible = self.metadata.get("compatible_with")
        return {"export_dir": self.export_dir, "model": self.metadata.get("model"),
                "image_size": list(self.image_size),
                "preprocessing": self.metadata.get("preprocessing"),
                "stored_threshold": self.threshold, "export_id": self.export_id(),
                "embedding_space": self.embedding_space(),
                "compatible_with": compatible if isinstance(compatible, dict) else None}


def load_model(export_dir, batch_size=64):
    """Load ``export_dir`` (a SavedModel from export.py); :class:`PhotoError` (exit 2) if it is not
    one."""
    from quiet_tf import import_tensorflow

    check_export_dir(export_dir)
    tf = import_tensorflow()
    from evaluation.embedder import load_embedder

    try:
        embedder = load_embedder(export_dir=export_dir, batch_size=batch_size)
    except (OSError, ValueError, tf.errors.OpError) as exc:
        raise PhotoError(f"--export_dir {export_dir}: cannot load the SavedModel: {exc}",
                         EXIT_BAD_EXPORT) from exc
    meta = embedder.metadata
    if "threshold" in meta:
        threshold = _valid_threshold(meta["threshold"])
    else:  # no facenet.json: the object's own variable (export.py always writes one)
        loaded = tf.saved_model.load(export_dir)
        var = getattr(loaded, "threshold", None)
        threshold = _valid_threshold(var.numpy()) if var is not None else None
    return FaceModel(export_dir, embedder, threshold)


def resolve_threshold(model, override=None):
    """(threshold, source): ``--threshold`` if given, else the export's; PhotoError (exit 5) if
    neither exists."""
    if override is not None:
        return _override(override), "--threshold"
    if model.threshold is None:
        raise _no_threshold(model.export_dir)
    return model.threshold, "export"
