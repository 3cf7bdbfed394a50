"""Photo -> face crops, made exactly as ``data.align`` makes the training thumbnails.

For each photo: decode with :func:`data.image_io.read_image_downscaled` (EXIF rotation, grey,
alpha, CMYK handled; huge JPEGs decoded reduced), detect with MTCNN
(:class:`data.detect.FaceDetector` with the project defaults), and cut every face (or, with
``largest``, the one face :func:`data.detect.select_face` keeps: largest and most central, the
rule alignment applies to a training set) with :func:`data.detect.crop_face`: the box grown by
``margin`` source pixels in total and resized to ``crop_size`` (``mode="box"``), or the 5-point
similarity warp (``mode="landmarks"``). With the same ``crop_size``, ``margin`` and ``mode`` as the
``python -m data.align`` run that prepared the training data (its defaults are ours), the crop is
bit-identical to the aligned training image; the model then resizes it to its input size as the
training pipeline does.

``detector="none"`` treats every file as an already-aligned face crop (as evaluate.py does with
aligned sets): the whole image is the face, its box is the image.

Boxes and landmarks are reported in pixels of the upright source photo, ``(x0, y0, x1, y1)``.
"""
import dataclasses
import os

import numpy as np

from data import detect, image_io
from data.align import ALIGN_EXTENSIONS, DEFAULT_MAX_DECODE_SIDE, list_jobs
from photos.errors import MISSING, NO_FACE, Failure

#: The crop of ``python -m data.align`` by default: 160 px with 32 source pixels of margin.
DEFAULT_CROP_SIZE = 160
DEFAULT_MARGIN = 32
DETECTORS = ("mtcnn", "none")


@dataclasses.dataclass
class FaceCrop:
    """One face of one photo.

    Attributes:
        file: the photo, as given.
        face: index of this face among the photo's detections (best score first).
        num_faces: faces detected in the photo (1 with detector "none").
        box: (x0, y0, x1, y1) in upright source pixels.
        score: detector confidence, None with detector "none".
        landmarks: float32 [5, 2] (x, y) source pixels in data.detect.LANDMARK_NAMES order, or None.
        crop: uint8 [S, S, 3] (the whole image with detector "none"); dropped after embedding.
        thumbnail: small uint8 copy of the crop, kept only when asked (contact sheets).
    """

    file: str
    face: int
    num_faces: int
    box: tuple
    score: float = None
    landmarks: np.ndarray = None
    crop: np.ndarray = None
    thumbnail: np.ndarray = None

    def to_json(self):
        out = {"file": self.file, "face": self.face, "num_faces": self.num_faces,
               "box": [round(float(v), 2) for v in self.box],
               "score": None if self.score is None else round(float(self.score), 5)}
        if self.landmarks is not None:
            out["landmarks"] = {name: [round(float(x), 2), round(float(y), 2)]
                                for name, (x, y) in zip(detect.LANDMARK_NAMES, self.landmarks)}
        return out

    def describe(self):
        """'[x0, y0, x1, y1] (score 0.999)', for printed reports."""
        box = "[" + ", ".join(f"{v:.0f}" for v in self.box) + "]"
        return box if self.score is None else f"{box} (score {self.score:.3f})"


class FaceCropper:
    """Finds and crops faces in photo files.

    Args:
        detector: "mtcnn" (built on first use), "none" (files are already face crops), or any
            object with ``detect(uint8 RGB [H, W, 3]) -> list of data.detect.Face`` (tests).
        crop_size, margin, mode: the crop, as ``python -m data.align --image_size --margin
            --align`` (see :func:`data.detect.crop_face`).
        min_face_size: MTCNN's smallest face in pixels (None: data.detect's default).
        max_decode_side: photos with a longer side above this are decoded reduced (as data.align).
    """

    def __init__(self, detector="mtcnn", crop_size=DEFAULT_CROP_SIZE, margin=DEFAULT_MARGIN,
                 mode="box", min_face_size=None, max_decode_side=DEFAULT_MAX_DECODE_SIDE):
        if isinstance(detector, str) and detector not in DETECTORS:
            raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")
        if mode not in ("box", "landmarks"):
            raise ValueError(f"mode must be 'box' or 'landmarks', got {mode!r}")
        if int(crop_size) < 1 or margin < 0:
            raise ValueError(f"need crop_size >= 1 and margin >= 0, got {crop_size}, {margin}")
        self._detector = detector
        self.crop_size = int(crop_size)
        self.margin = float(margin)
        self.mode = mode
        self.min_face_size = min_face_size
        self.max_decode_side = int(max_decode_side)

    @property
    def detects(self):
        return not (isinstance(self._detector, str) and self._detector == "none")

    def settings(self):
        """JSON-ready description (reports, gallery-cache keys)."""
        name = self._detector if isinstance(self._detector, str) else type(self._detector).__name__
        if not self.detects:
            return {"detector": "none"}
        return {"detector": name, "crop_size": self.crop_size, "margin": self.margin,
                "mode": self.mode,
                "min_face_size": self.min_face_size or detect.DEFAULT_MIN_FACE_SIZE,
                "thresholds": list(detect.DEFAULT_THRESHOLDS),
                "max_decode_side": self.max_decode_side}

    def detector(self):
        """The face detector, built (MTCNN, a few seconds) on first use."""
        if isinstance(self._detector, str):
            from quiet_tf import import_tensorflow

            import_tensorflow()  # before mtcnn imports it, so its start-up noise stays hidden
            kwargs = {}
            if self.min_face_size:
                kwargs["min_face_size"] = self.min_face_size
            self._detector = detect.FaceDetector(**kwargs)
        return self._detector

    def read(self, path):
        """Decode ``path``: ``((image, scale), None)`` or ``(None, Failure)``; no TensorFlow."""
        path = os.fspath(path)
        try:
            if self.detects:
                return image_io.read_image_downscaled(path, self.max_decode_side), None
            return (image_io.read_image(path), 1.0), None
        except FileNotFoundError:
            return None, Failure(path, MISSING)
        except image_io.UnreadableImageError as exc:
            detail = str(exc)
            prefix = f"{path}: {exc.reason}"
            detail = detail[len(prefix):].strip(" ()") if detail.startswith(prefix) else detail
            return None, Failure(path, exc.reason, detail)
        except OSError as exc:  # a folder, no permission, an I/O error
            return None, Failure(path, "error", f"{type(exc).__name__}: {exc.strerror or exc}")

    def crops(self, path, decoded, largest=False):
        """Faces of a decoded photo: ``(list of FaceCrop, None)`` or ``([], Failure)``."""
        path = os.fspath(path)
        image, scale = decoded
        h, w = image.shape[:2]
        if not self.detects:
            return [FaceCrop(path, 0, 1, (0.0, 0.0, float(w), float(h)), crop=image)], None
        faces = self.detector().detect(image)
        if not faces:
            size = f"{round(w * scale)}x{round(h * scale)} photo"
            return [], Failure(path, NO_FACE, size)
        chosen = list(enumerate(faces))
        if largest:
            keep = detect.select_face(faces, image.shape)
            chosen = [(i, f) for i, f in chosen if f is keep]
        crop_margin = self.margin / scale if self.mode == "box" else self.margin  # as data.align
        out = []
        for i, face in chosen:
            crop = detect.crop_face(image, face, self.crop_size, crop_margin, mode=self.mode)
            src = face.scaled(scale)
            out.append(FaceCrop(path, i, len(faces), src.box, float(face.score), src.landmarks,
                                crop=crop))
        return out, None

    def extract(self, path, largest=False):
        """Read and crop one photo: ``(list of FaceCrop, None)`` or ``([], Failure)``.

        Never raises for a bad file: unexpected errors become a Failure with reason "error".
        """
        decoded, failure = self.read(path)
        if failure is not None:
            return [], failure
        try:
            return self.crops(path, decoded, largest)
        except (ValueError, OSError, MemoryError) as exc:
            return [], Failure(os.fspath(path), "error", f"{type(exc).__name__}: {exc}")


def expand_inputs(paths):
    """Files and folders -> (list of photo files, number of non-image files skipped in folders).

    A folder contributes every image under it (recursively, sorted, hidden entries skipped, image
    extensions only, as ``python -m data.align``); a file is taken as given, whatever its name, so
    that a bad one is reported rather than silently dropped.
    """
    files, ignored = [], 0
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            jobs, skipped = list_jobs(p, os.path.join(p, ".faces-none"))
            files.extend(j.src for j in jobs)
            ignored += len(skipped)
        else:
            files.append(p)
    return list(dict.fromkeys(files)), ignored


__all__ = ["FaceCrop", "FaceCropper", "expand_inputs", "ALIGN_EXTENSIONS", "DEFAULT_CROP_SIZE",
           "DEFAULT_MARGIN", "DETECTORS"]
