"""Turn images into embeddings with an exported SavedModel or a Keras backbone.

:func:`load_embedder` (a SavedModel) and :func:`embedder_from_backbone` (a Keras backbone) return
an :class:`Embedder` with

* ``image_size``: (H, W) model input size in pixels;
* ``embed_images(images)``: RGB 0..255 [N, h, w, 3] (uint8 or float) -> float32 [N, D];
* ``embed_paths(paths, batch_size, flip, progress)``: files -> (float32 [N, D], failed), where
  ``failed`` lists ``(path, reason)`` for every file that could not be embedded (its row is NaN,
  so it can never pass for a real embedding). Results are cached in memory per (path, flip), so
  several protocols on one image set never decode or embed an image twice.

Images are expected to be face crops (aligned, as in LFW/davidsandberg's aligned sets); they are
resized as a whole to the model's input size, with no crop, exactly as the training pipeline does
(bilinear, anti-aliased when shrinking; see :func:`resize_to`). ``flip=True`` adds test-time augmentation: the embeddings of the image and of its
horizontal mirror are summed and re-normalised to unit length.

Sources (the contracts of export.py and train.py):

* ``export_dir``: a SavedModel with signature ``serving_default`` taking float32 [N, H, W, 3]
  RGB 0..255 (preprocessing inside) and returning ``{"embeddings": [N, D]}``; its
  ``assets/facenet.json`` gives ``image_size`` (and the model name, embedding size, threshold). If
  the JSON is missing, H and W come from the signature's static input shape, or ``image_size``
  must be given.
* a backbone: a Keras model from preprocessed RGB to embeddings, fed
  ``data.preprocess.preprocess(images)``. A train.py ``model_dir`` (config.json and the newest
  intact checkpoint) is restored into one by the training side (``training/export.py``), which
  evaluate.py --model_dir uses.
"""
import json
import logging
import os

import numpy as np

from data.image_io import failure_reason

__all__ = ["Embedder", "load_embedder", "embedder_from_backbone", "read_face_image", "resize_to",
           "MISSING", "EMBED_FAILED"]

_log = logging.getLogger("facenet.evaluation")

#: ``failed`` reason for a file that does not exist (data.image_io.failure_reason gives it).
MISSING = "missing"
#: ``failed`` reason for an image the model returned a non-finite embedding for.
EMBED_FAILED = "non_finite_embedding"


def _read_with_cv2(path):
    """Fallback reader (only if data.image_io is unavailable): uint8 RGB [H, W, 3]."""
    import cv2

    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{path}: not_an_image")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(img.astype(np.uint8))


def read_face_image(path):
    """Decode ``path`` to uint8 RGB [H, W, 3] with data.image_io (grey, alpha, CMYK handled).

    Raises FileNotFoundError or ValueError (``data.image_io.UnreadableImageError`` is one).
    """
    try:
        from data.image_io import read_image
    except ImportError:  # pragma: no cover - the project ships data.image_io
        return _read_with_cv2(path)
    return read_image(path)


def _resize_float(img, h, w):
    """One float32 [h0, w0, 3] image -> [h, w, 3], Pillow bilinear per channel in mode "F"."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c]), mode="F")
                                .resize((w, h), Image.BILINEAR)) for c in range(3)], axis=-1)


def resize_to(images, image_size):
    """Resize RGB images [N, h, w, 3] to ``image_size`` (H, W); float32 0..255 out.

    Same result as the training/validation pipelines' ``data.augment.resize``
    (``tf.image.resize(bilinear, antialias=True)``, to ~1e-3 grey levels; TF modelled its
    anti-aliased kernels on Pillow's), but computed with Pillow's float mode: ~30x faster than an
    eager TF call per image.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be RGB [N, H, W, 3], got shape {images.shape}")
    h, w = int(image_size[0]), int(image_size[1])
    if images.shape[1:3] == (h, w):
        return images.astype(np.float32, copy=False)
    out = np.empty((images.shape[0], h, w, 3), np.float32)
    for i, img in enumerate(images):
        out[i] = _resize_float(img.astype(np.float32, copy=False), h, w)
    return np.clip(out, 0.0, 255.0, out=out)


def _resize_one(img, image_size):
    return resize_to(img[None], image_size)[0]


def _l2_normalize(x):
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


class Embedder:
    """Embeds images with a callable ``fn(float32 [n, H, W, 3] RGB 0..255) -> [n, D]``.

    Attributes:
      image_size: (H, W) input size in pixels.
      embedding_size: D, or None until the first call when unknown.
      metadata: dict describing the model (from facenet.json / config.json), JSON-ready.
    """

    def __init__(self, fn, image_size, embedding_size=None, metadata=None, batch_size=64):
        self._fn = fn
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.embedding_size = embedding_size
        self.metadata = dict(metadata or {})
        self.batch_size = int(batch_size)
        self._cache = {}  # (path, flip) -> float32 [D] or failure reason (str)

    def _run(self, batch):
        out = np.asarray(self._fn(batch), dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != batch.shape[0]:
            raise ValueError(f"model returned shape {out.shape} for {batch.shape[0]} images")
        if self.embedding_size is None:
            self.embedding_size = int(out.shape[1])
        return out

    def embed_images(self, images, flip=False, batch_size=None):
        """RGB 0..255 images [N, h, w, 3] (uint8 or float; resized if needed) -> float32 [N, D].

        With ``flip`` the embeddings of each image and its mirror are summed and re-normalised.
        """
        images = np.asarray(images)
        if images.ndim == 3:
            raise ValueError("embed_images takes a batch [N, H, W, 3]; add a leading axis")
        batch_size = int(batch_size or self.batch_size)
        chunks = []
        for s in range(0, images.shape[0], batch_size):
            x = resize_to(images[s:s + batch_size], self.image_size)
            e = self._run(x)
            if flip:
                e = _l2_normalize(e + self._run(np.ascontiguousarray(x[:, :, ::-1, :])))
            chunks.append(e)
        if not chunks:
            return np.zeros((0, self.embedding_size or 0), np.float32)
        return np.concatenate(chunks, axis=0)

    def embed_paths(self, paths, batch_size=64, flip=False, progress=True):
        """Embed image files.

        Returns:
          ``(emb, failed)``: float32 [N, D] in the order of ``paths`` (rows of failed files are
          NaN) and ``failed``: list of ``(path, reason)``, reason one of ``"missing"``, the
          ``UnreadableImageError`` reasons (``"empty"``, ``"not_an_image"``, ``"truncated"``,
          ``"too_large"``, ``"unsupported"``) or ``"non_finite_embedding"``.
        """
        paths = [os.fspath(p) for p in paths]
        todo = list(dict.fromkeys(p for p in paths if (p, flip) not in self._cache))
        from data.progress import progress as make_progress

        bar = make_progress(len(todo), unit="image", label="embedding",
                            enabled=bool(progress and todo))
        done = 0
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            images, ok = [], []
            for p in chunk:
                try:
                    images.append(_resize_one(read_face_image(p), self.image_size))
                    ok.append(p)
                except (OSError, ValueError) as exc:
                    self._cache[(p, flip)] = failure_reason(exc)  # MISSING for a file not there
            if images:
                emb = self.embed_images(np.stack(images), flip=flip, batch_size=batch_size)
                for p, e in zip(ok, emb):
                    self._cache[(p, flip)] = e if np.all(np.isfinite(e)) else EMBED_FAILED
            done += len(chunk)
            bar.update(done)
        dim = self.embedding_size
        if dim is None:  # nothing could be embedded at all
            dim = 0
        out = np.full((len(paths), dim), np.nan, np.float32)
        failed = []
        for i, p in enumerate(paths):
            v = self._cache[(p, flip)]
            if isinstance(v, str):
                failed.append((p, v))
            else:
                out[i] = v
        if failed:
            _log.warning("embed_paths: %d of %d images could not be embedded (e.g. %s: %s)",
                         len(failed), len(paths), failed[0][0], failed[0][1])
        return out, failed


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_saved_model(export_dir, image_size, batch_size):
    import tensorflow as tf

    if not os.path.isdir(export_dir):
        raise FileNotFoundError(f"--export_dir {export_dir!r} is not a directory")
    loaded = tf.saved_model.load(export_dir)
    if "serving_default" not in loaded.signatures:
        raise ValueError(f"{export_dir}: no 'serving_default' signature "
                         f"(found {list(loaded.signatures)})")
    sig = loaded.signatures["serving_default"]
    inputs = sig.structured_input_signature[1]
    if len(inputs) != 1:
        raise ValueError(f"{export_dir}: serving_default must take one input, got {list(inputs)}")
    input_name, spec = next(iter(inputs.items()))
    if "embeddings" not in sig.structured_outputs:
        raise ValueError(f"{export_dir}: serving_default must return 'embeddings', got "
                         f"{list(sig.structured_outputs)}")
    meta_path = os.path.join(export_dir, "assets", "facenet.json")
    meta = _read_json(meta_path) if os.path.isfile(meta_path) else {}
    size = image_size
    if size is None and meta.get("image_size"):
        size = tuple(meta["image_size"])
    if size is None:
        shape = spec.shape.as_list()
        if len(shape) == 4 and shape[1] and shape[2]:
            size = (shape[1], shape[2])
    if size is None:
        raise ValueError(f"{export_dir}: no assets/facenet.json and no static input size in the "
                         "signature; pass --image_size")
    if not meta:
        _log.warning("%s has no assets/facenet.json; image size %s from %s", export_dir, size,
                     "--image_size" if image_size else "the signature")

    def fn(batch):
        return sig(**{input_name: tf.constant(batch, tf.float32)})["embeddings"].numpy()

    fn.loaded = loaded  # keep the trackable object alive
    meta.setdefault("source", "saved_model")
    meta["export_dir"] = os.path.abspath(export_dir)
    return Embedder(fn, size, meta.get("embedding_size"), meta, batch_size)


def embedder_from_backbone(backbone, image_size, metadata=None, batch_size=64,
                           embedding_size=None):
    """An :class:`Embedder` of a Keras ``backbone`` (preprocessed RGB [N, H, W, 3] -> [N, D]) at
    input size ``image_size`` (H, W), fed ``data.preprocess.preprocess(images)`` as in training.

    ``metadata``: the dict the embedder reports (e.g. a training run's config.json).
    """
    import tensorflow as tf

    from data.preprocess import preprocess

    size = (int(image_size[0]), int(image_size[1]))

    @tf.function(input_signature=[tf.TensorSpec([None, size[0], size[1], 3], tf.float32)])
    def embed(x):
        return backbone(preprocess(x), training=False)

    def fn(batch):
        return embed(tf.constant(batch, tf.float32)).numpy()

    return Embedder(fn, size, embedding_size, metadata, batch_size)


def load_embedder(export_dir=None, *, image_size=None, batch_size=64):
    """An :class:`Embedder` of the SavedModel at ``export_dir``.

    ``image_size`` (H, W) overrides the stored input size (needed for a SavedModel without
    ``assets/facenet.json`` and without a static input shape). A training checkpoint is wrapped
    by the training side (its backbone through :func:`embedder_from_backbone`).
    """
    if image_size is not None:
        image_size = (int(image_size[0]), int(image_size[1]))
    if export_dir:
        return _load_saved_model(os.fspath(export_dir), image_size, batch_size)
    raise ValueError("give --export_dir (SavedModel) or --model_dir (training checkpoint)")
