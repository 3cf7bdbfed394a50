"""Face detection (MTCNN), choice of one face per photo, and the face crop FaceNet trains on.

FaceNet trains and evaluates on "thumbnails tightly cropped around the face area" (Section 4); the
paper used a proprietary detector, we use MTCNN (Zhang et al. 2016) from the pip ``mtcnn`` package,
whose weights ship inside the wheel (no download). ``mtcnn`` imports TensorFlow; it is imported
lazily, on the first detector built.

Conventions: images are RGB uint8 [H, W, 3]; coordinates are in pixels of the image given, x to the
right, y down; boxes are ``(x0, y0, x1, y1)`` floats; landmarks are float32 [5, 2] rows of (x, y)
in :data:`LANDMARK_NAMES` order, "left"/"right" as seen in the image (MTCNN's own convention).
"""
import dataclasses
import os
import threading

import cv2
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

#: MTCNN thresholds for (PNet, RNet, ONet). PNet/RNet as in MTCNN and davidsandberg/facenet;
#: ONet 0.8 (the pip package's default; davidsandberg used 0.7) drops the low-confidence
#: false faces we saw on single-person photos of ../shared/data/detector_test.
DEFAULT_THRESHOLDS = (0.6, 0.7, 0.8)
DEFAULT_MIN_FACE_SIZE = 20
DEFAULT_SCALE_FACTOR = 0.709
#: Detection runs on a copy whose longer side is at most this many pixels (boxes mapped back).
DEFAULT_DETECT_MAX_SIDE = 2048
#: Images whose shorter side is below this are upscaled to it before detection: a face filling a
#: tiny frame (a 112-px aligned crop, a 92x112 ORL image) is otherwise near PNet's minimum size.
DEFAULT_DETECT_MIN_SIDE = 160
#: When nothing is found, detection is retried on padded copies, in this order, until a face
#: appears: (border kind, border width as a fraction of the shorter side). MTCNN misses faces
#: that fill or touch the frame (pre-cropped datasets such as Extended Yale B, partial faces);
#: a border gives it the context it was trained with. "constant" pads with the image's mean colour.
#: Each retry costs one more detection on an image with no face, so retries are made only on
#: images whose longer side is at most RETRY_MAX_SIDE (face crops are small; big photos rarely
#: have one face filling the frame).
RETRY_MAX_SIDE = 1024
RETRY_PADDINGS = (("constant", 0.25), ("replicate", 0.5), ("reflect", 0.25))
_BORDERS = {"constant": cv2.BORDER_CONSTANT, "replicate": cv2.BORDER_REPLICATE,
            "reflect": cv2.BORDER_REFLECT}

#: Canonical 5-point template (ArcFace / InsightFace 112x112: eyes, nose tip, mouth corners, in
#: LANDMARK_NAMES order), used by ``crop_face(mode="landmarks")``. It is scaled to
#: ``image_size - margin`` output pixels and centred, so ``margin`` output pixels of context
#: surround it in total (half per side).
LANDMARK_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                  [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Face:
    """One detected face.

    Attributes:
        box: (x0, y0, x1, y1) in pixels, floats; x1/y1 exclusive-style extents.
        score: detector confidence in [0, 1].
        landmarks: float32 [5, 2] (x, y) pixels in LANDMARK_NAMES order, or None.
    """

    box: tuple
    score: float
    landmarks: np.ndarray = None

    @property
    def width(self):
        return self.box[2] - self.box[0]

    @property
    def height(self):
        return self.box[3] - self.box[1]

    def scaled(self, factor, offset=(0.0, 0.0)):
        """This face in another frame: ``(p - offset) * factor`` for every coordinate."""
        ox, oy = offset
        x0, y0, x1, y1 = self.box
        box = ((x0 - ox) * factor, (y0 - oy) * factor, (x1 - ox) * factor, (y1 - oy) * factor)
        lms = None
        if self.landmarks is not None:
            lms = ((self.landmarks - np.array([ox, oy], np.float32)) * factor).astype(np.float32)
        return Face(box=tuple(float(v) for v in box), score=self.score, landmarks=lms)

    def to_json(self):
        out = {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 5)}
        if self.landmarks is not None:
            out["landmarks"] = {name: [round(float(x), 2), round(float(y), 2)]
                                for name, (x, y) in zip(LANDMARK_NAMES, self.landmarks)}
        return out


class FaceDetector:
    """MTCNN with this project's defaults; build once per process (loading takes seconds).

    Args:
        min_face_size: smallest face searched for, in pixels of the detection copy.
        thresholds: (PNet, RNet, ONet) confidence thresholds.
        scale_factor: image-pyramid step.
        detect_max_side: detection runs on a copy downscaled to this longer side (None: never).
        detect_min_side: images with a shorter side below this are upscaled to it (None: never).
        retry_with_padding: when nothing is found, retry on padded copies (RETRY_PADDINGS).
        device: TensorFlow device string for MTCNN ("CPU:0", "GPU:0").
        graph_mode: run MTCNN's three networks as tf.functions with shape-agnostic signatures
            (traced once each) instead of eager Keras calls: same outputs, about 4x faster on CPU.
    """

    def __init__(self, min_face_size=DEFAULT_MIN_FACE_SIZE, thresholds=DEFAULT_THRESHOLDS,
                 scale_factor=DEFAULT_SCALE_FACTOR, detect_max_side=DEFAULT_DETECT_MAX_SIDE,
                 detect_min_side=DEFAULT_DETECT_MIN_SIDE, retry_with_padding=True, device="CPU:0",
                 graph_mode=True):
        if len(thresholds) != 3:
            raise ValueError(f"thresholds needs 3 values (PNet, RNet, ONet), got {thresholds}")
        from mtcnn import MTCNN  # imports TensorFlow

        self.min_face_size = int(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = float(scale_factor)
        self.detect_max_side = detect_max_side
        self.detect_min_side = detect_min_side
        self.retry_with_padding = retry_with_padding
        self._mtcnn = MTCNN(device=device)
        self.graph_mode = bool(graph_mode) and _compile_stages(self._mtcnn)

    def _run(self, image):
        """Raw MTCNN on uint8 [H, W, 3]: list of Face in this image's pixels."""
        h, w = image.shape[:2]
        if min(h, w) < 12:  # below PNet's 12-px window nothing can be found
            return []
        rows = self._mtcnn.detect_faces(
            image.astype(np.float32), box_format="xyxy", output_type="numpy",
            min_face_size=self.min_face_size, scale_factor=self.scale_factor,
            threshold_pnet=self.thresholds[0], threshold_rnet=self.thresholds[1],
            threshold_onet=self.thresholds[2])
        rows = np.asarray(rows, np.float64).reshape(-1, 16) if np.size(rows) else np.empty((0, 16))
        faces = []
        for row in rows:
            # row: [image_id, x1, y1, x2, y2, confidence, 5 landmark x, 5 landmark y]
            lms = np.stack([row[6:11], row[11:16]], axis=1).astype(np.float32)
            faces.append(Face(box=tuple(float(v) for v in row[1:5]), score=float(row[5]),
                              landmarks=lms))
        return faces

    def detect(self, image):
        """All faces in ``image`` (uint8 RGB [H, W, 3]), best score first, in its pixels."""
        image = _as_rgb_uint8(image)
        h, w = image.shape[:2]
        factor = 1.0  # detection-copy pixels per image pixel
        if self.detect_max_side and max(h, w) > self.detect_max_side:
            factor = self.detect_max_side / float(max(h, w))
        elif self.detect_min_side and min(h, w) < self.detect_min_side:
            factor = self.detect_min_side / float(min(h, w))
        work = image
        if factor != 1.0:
            size = (max(1, round(w * factor)), max(1, round(h * factor)))
            interp = cv2.INTER_AREA if factor < 1.0 else cv2.INTER_LINEAR
            work = cv2.resize(image, size, interpolation=interp)
        fx, fy = w / float(work.shape[1]), h / float(work.shape[0])
        faces = self._run(work)
        offset = (0.0, 0.0)
        retry = self.retry_with_padding and max(work.shape[:2]) <= RETRY_MAX_SIDE
        for kind, fraction in (RETRY_PADDINGS if retry else ()):
            if faces:
                break
            pad = max(1, int(round(fraction * min(work.shape[:2]))))
            fill = [float(v) for v in work.reshape(-1, 3).mean(axis=0)]
            padded = cv2.copyMakeBorder(work, pad, pad, pad, pad, _BORDERS[kind], value=fill)
            faces = self._run(padded)
            offset = (float(pad), float(pad))
        out = []
        for f in faces:
            g = f.scaled(1.0, offset)
            x0, y0, x1, y1 = g.box
            box = (max(0.0, x0 * fx), max(0.0, y0 * fy), min(float(w), x1 * fx), min(float(h), y1 * fy))
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            lms = g.landmarks * np.array([fx, fy], np.float32) if g.landmarks is not None else None
            out.append(Face(box=box, score=g.score, landmarks=lms))
        out.sort(key=lambda f: -f.score)
        return out


def _compile_stages(mtcnn):
    """Swap each MTCNN stage's Keras model for a tf.function over it (float32 [N, H, W, 3] input,
    any N, H, W). Returns False, changing nothing, if this mtcnn version is laid out differently."""
    import tensorflow as tf

    stages = getattr(mtcnn, "stages", None) or []
    if not stages or not all(hasattr(st, "_model") for st in stages):
        return False
    spec = [tf.TensorSpec([None, None, None, 3], tf.float32)]
    for st in stages:
        st._model = tf.function(st._model, input_signature=spec, reduce_retracing=True)
    return True


def _as_rgb_uint8(image):
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.shape[2] == 4:
        image = image[..., :3]
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and np.nanmax(image, initial=0) <= 1.0:
            raise ValueError("expected RGB values in 0..255, got a float image in [0, 1]")
        image = np.clip(np.nan_to_num(image), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


_default_detector = None
_default_lock = threading.Lock()


def default_detector():
    """A process-wide :class:`FaceDetector` with default settings, built on first use."""
    global _default_detector
    with _default_lock:
        if _default_detector is None:
            _default_detector = FaceDetector()
        return _default_detector


def detect_faces(image_rgb, detector=None):
    """All faces in an RGB image (uint8 [H, W, 3]), best score first: list of :class:`Face`."""
    return (detector or default_detector()).detect(image_rgb)


def select_face(faces, image_shape):
    """The one face to keep from several: the largest, most central one.

    Score = box area - 2 * squared distance of the box centre from the image centre (pixels^2),
    davidsandberg/facenet's multi-face rule in align_dataset_mtcnn.py.

    Args:
        faces: list of :class:`Face`.
        image_shape: (H, W, ...) of the image the faces were found in.
    Returns:
        the chosen :class:`Face`, or None when ``faces`` is empty.
    """
    if not faces:
        return None
    h, w = image_shape[:2]
    boxes = np.array([f.box for f in faces], np.float64)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    cx = 0.5 * (boxes[:, 0] + boxes[:, 2]) - w / 2.0
    cy = 0.5 * (boxes[:, 1] + boxes[:, 3]) - h / 2.0
    return faces[int(np.argmax(area - 2.0 * (cx * cx + cy * cy)))]


def similarity_transform(src, dst):
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) src -> dst.

    Umeyama (1991), closed form. Args: src, dst float [N, 2], N >= 2.
    Returns: float64 [2, 3] matrix M with dst ~= src @ M[:, :2].T + M[:, 2].
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two [N, 2] point sets, N >= 2; got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s ** 2).sum() / len(src)
    if var_s <= 1e-12:
        raise ValueError("degenerate source points (all equal)")
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    scale = (sig * sign).sum() / var_s
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def landmark_template(image_size, margin):
    """The 5-point template in output pixels, float32 [5, 2], for a square output of image_size."""
    inner = float(image_size - margin)
    if inner <= 0:
        raise ValueError(f"margin {margin} leaves no room in image_size {image_size}")
    return (LANDMARK_TEMPLATE_112 * (inner / 112.0) + margin / 2.0).astype(np.float32)


def box_with_margin(face, image_shape, margin):
    """Integer crop box: the face box grown by margin/2 pixels on each side, clipped to the image.

    davidsandberg/facenet's convention (align_dataset_mtcnn.py). Returns (x0, y0, x1, y1) ints,
    x1/y1 exclusive.
    """
    h, w = image_shape[:2]
    x0, y0, x1, y1 = face.box
    half = margin / 2.0
    bx0 = int(max(np.floor(x0 - half), 0))
    by0 = int(max(np.floor(y0 - half), 0))
    bx1 = int(min(np.ceil(x1 + half), w))
    by1 = int(min(np.ceil(y1 + half), h))
    if bx1 <= bx0 or by1 <= by0:
        raise ValueError(f"empty crop for box {face.box} in image {w}x{h}")
    return bx0, by0, bx1, by1


def crop_face(image, face, image_size, margin=32, mode="box"):
    """The square face thumbnail FaceNet consumes.

    Args:
        image: uint8 RGB [H, W, 3].
        face: a :class:`Face` in this image's pixels.
        image_size: side S of the output, pixels.
        margin: "box" mode: source pixels added around the box in total (margin/2 per side,
            clipped to the image), then the crop is resized to S x S (aspect not preserved, as
            davidsandberg/facenet). "landmarks" mode: output pixels of context around the
            template (see :data:`LANDMARK_TEMPLATE_112`).
        mode: "box", or "landmarks" (5-point similarity warp onto the template; needs landmarks).
    Returns:
        uint8 [S, S, 3].
    """
    image = _as_rgb_uint8(image)
    size = int(image_size)
    if size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if mode == "box":
        x0, y0, x1, y1 = box_with_margin(face, image.shape, margin)
        patch = image[y0:y1, x0:x1]
        shrinking = patch.shape[0] > size or patch.shape[1] > size
        interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        return np.ascontiguousarray(cv2.resize(patch, (size, size), interpolation=interp))
    if mode == "landmarks":
        if face.landmarks is None:
            raise ValueError("mode='landmarks' needs a face with landmarks")
        m = similarity_transform(face.landmarks, landmark_template(size, margin))
        # Shrinking by a lot aliases with a bilinear warp: pre-blur by resizing first.
        scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
        src = image
        if scale < 0.5:
            f = scale * 2.0
            src = cv2.resize(image, (max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f))),
                             interpolation=cv2.INTER_AREA)
            fx, fy = src.shape[1] / image.shape[1], src.shape[0] / image.shape[0]
            m = m @ np.diag([1.0 / fx, 1.0 / fy, 1.0])
        out = cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        return np.ascontiguousarray(out)
    raise ValueError(f"mode must be 'box' or 'landmarks', got {mode!r}")
