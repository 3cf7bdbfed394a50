"""The pipeline every command shares: photos -> face crops -> embeddings, with progress.

Photos are processed one at a time and their faces embedded in batches, so memory holds one batch
of model-sized images, not every crop. A photo that gives no face (unreadable, no face found)
becomes a :class:`photos.errors.Failure` and the others go on.
"""
import dataclasses
import sys

import numpy as np

from photos.errors import NON_FINITE, Failure


class Progress:
    """Progress on stderr (stdout stays clean for results) through data.progress: a live bar on a
    terminal, a plain line every 10 s and at the end otherwise (logs); silent when disabled or for
    a single item."""

    def __init__(self, total, unit="photo", enabled=True):
        from data.progress import progress

        self.bar = progress(total, unit=unit, label="embedding", stream=sys.stderr,
                            enabled=bool(enabled and total > 1))

    def update(self, done):
        self.bar.update(done)


@dataclasses.dataclass
class Embedded:
    """Result of :func:`embed_photos`: ``faces[i]`` has embedding row ``embeddings[i]``."""

    faces: list
    embeddings: np.ndarray
    failures: list
    num_photos: int

    @property
    def photos_with_faces(self):
        return len({f.file for f in self.faces})


def embed_photos(paths, model, cropper, largest=False, progress=True, thumbnail_size=None):
    """Embed every face (or the main face, ``largest``) of every photo in ``paths``.

    Args:
        paths: photo files.
        model: :class:`photos.model.FaceModel` (anything with ``image_size``, ``batch_size`` and
            ``embed(images)``).
        cropper: :class:`photos.detection.FaceCropper`.
        largest: one face per photo, the one data.align would keep.
        progress: report progress on stderr (data.progress).
        thumbnail_size: keep a square thumbnail of this side on each face (contact sheets).
    Returns:
        :class:`Embedded`, faces in input order (a photo's faces best score first).
    """
    paths = list(paths)
    faces, rows, failures, pending, pending_faces = [], [], [], [], []
    dim = [None]

    def flush():
        if not pending:
            return
        emb = np.asarray(model.embed(np.stack(pending)), np.float32)
        dim[0] = emb.shape[1]
        for face, e in zip(pending_faces, emb):
            if np.all(np.isfinite(e)):
                faces.append(face)
                rows.append(e)
            else:
                failures.append(Failure(face.file, NON_FINITE, f"face {face.face}"))
        pending.clear()
        pending_faces.clear()

    bar = Progress(len(paths), "photo", progress)
    batch = max(1, int(getattr(model, "batch_size", 64)))
    for i, path in enumerate(paths, 1):
        found, failure = cropper.extract(path, largest)
        if failure is not None:
            failures.append(failure)
        for face in found:
            pending.append(model_input(face.crop, model))
            if thumbnail_size:
                face.thumbnail = thumbnail(face.crop, thumbnail_size)
            face.crop = None
            pending_faces.append(face)
        if len(pending) >= batch:
            flush()
        bar.update(i)
    flush()
    if rows:
        embeddings = np.stack(rows).astype(np.float32)
    else:
        embeddings = np.zeros((0, dim[0] or 0), np.float32)
    return Embedded(faces, embeddings, failures, len(paths))


def model_input(crop, model):
    """A face crop resized to the model's input size as the training pipeline resizes its
    thumbnails (evaluation.embedder.resize_to: bilinear, anti-aliased): float32 [H, W, 3]."""
    from evaluation.embedder import resize_to

    return resize_to(np.asarray(crop)[None], model.image_size)[0]


def thumbnail(image, size):
    """uint8 RGB image -> uint8 [size, size, 3] (area-averaged when shrinking)."""
    import cv2

    image = np.asarray(image)
    if image.shape[:2] == (size, size):
        return image.copy()
    shrink = image.shape[0] > size or image.shape[1] > size
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)
