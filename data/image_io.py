"""Robust image reading: any common file in, uint8 RGB [H, W, 3] out, or a clear error.

Every reader returns ``numpy.uint8`` arrays of shape [H, W, 3] in RGB order, or raises
:class:`UnreadableImageError` whose ``.reason`` says why (one of :data:`REASONS`). A missing file
raises the usual ``FileNotFoundError``.

Policies (decided here, once, for training, alignment and deployment):

* **Grey / 16-bit.** Grey (L, PGM, 1-bit) is repeated into 3 channels. 16-bit grey keeps its top
  8 bits (``v >> 8``); Pillow already reduces 16-bit RGB(A) PNGs to 8 bits the same way.
* **Alpha** (RGBA, LA, palette with transparency) is composited on **white**. Dropping alpha
  instead exposes whatever colour the encoder left under transparent pixels (often black), which is
  arbitrary; white is the usual "paper" background of cut-out photos.
* **CMYK JPEG** is converted with its embedded ICC profile when there is one (littleCMS through
  Pillow's ImageCms), otherwise with Pillow's plain CMYK->RGB formula. Pillow handles Adobe's
  inverted CMYK.
* **EXIF orientation** is applied, so the array is upright as a viewer shows it.
* **Truncated or damaged files are refused** (reason ``"truncated"``). Pillow can decode what is
  there and pad the rest with grey, but a half-grey face is worse training data than none.
* **Animated GIF / WebP / APNG**: the first frame.
* **Size limits, checked on the header before any pixel is decoded.** :func:`read_image` refuses an
  image whose declared width x height exceeds ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`,
  250 MP, 750 MB as RGB) with reason ``"too_large"``. :func:`read_image_downscaled` is for
  legitimate but huge photos: it refuses only above :data:`HARD_MAX_PIXELS` (1.6 GP, e.g.
  40000 x 40000) and decodes JPEGs at 1/2, 1/4 or 1/8 scale in the decoder (``Image.draft``), so a
  400 MP JPEG costs a 6 MP decode. Other formats have no reduced decode, so they must fit
  :data:`DEFAULT_MAX_PIXELS` even there. :func:`declared_pixels` reads the declared size alone
  (the training pipeline checks it before TensorFlow's decoders see a file).

Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``, 179 MP) is lifted while *this
module* opens a file, under a lock, because the limits above replace it; it is restored afterwards
and other Pillow users in the process are unaffected outside that window.
"""
import contextlib
import os
import struct
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Declared pixel count above which :func:`read_image` refuses a file (reason "too_large").
DEFAULT_MAX_PIXELS = 250_000_000
#: Declared pixel count above which even :func:`read_image_downscaled` refuses a file.
HARD_MAX_PIXELS = 1_600_000_000
#: The values ``UnreadableImageError.reason`` can take.
REASONS = ("empty", "not_an_image", "truncated", "too_large", "unsupported")

_PIL_GUARD_LOCK = threading.Lock()


class UnreadableImageError(ValueError):
    """A file that cannot be turned into an RGB image.

    Attributes:
        path: the file, as given.
        reason: one of :data:`REASONS`: "empty" (zero bytes), "not_an_image" (no known image
            format), "truncated" (an image whose pixel data is cut short or damaged),
            "too_large" (declared size above the limit; nothing was decoded), "unsupported"
            (a recognised format or pixel mode this reader cannot decode).
    """

    def __init__(self, path, reason, detail=""):
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        self.path = os.fspath(path)
        self.reason = reason
        message = f"{self.path}: {reason}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


def failure_reason(exc):
    """Why a read of an image file failed, as reported beside the file: ``"missing"`` for a file
    that is not there, the :data:`REASONS` value of an :class:`UnreadableImageError`, else the
    exception's type and message."""
    if isinstance(exc, FileNotFoundError):
        return "missing"
    return getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _pillow_bomb_guard_lifted():
    """Let Image.open read any declared size; our own limits are checked right after."""
    with _PIL_GUARD_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open(path):
    """Open ``path`` with Pillow, reading only the header. Returns an un-loaded PIL image."""
    path = os.fspath(path)
    size = os.path.getsize(path)  # FileNotFoundError for a missing file, as usual
    if size == 0:
        raise UnreadableImageError(path, "empty", "zero-byte file")
    try:
        with _pillow_bomb_guard_lifted():
            img = Image.open(path)
    except UnidentifiedImageError as exc:
        raise UnreadableImageError(path, "not_an_image", "no known image format") from exc
    except Image.DecompressionBombError as exc:  # only if the guard was not lifted
        raise UnreadableImageError(path, "too_large", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise UnreadableImageError(path, "not_an_image", f"bad header: {exc}") from exc
    return img


def _check_pixels(path, img, max_pixels, hint=""):
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise UnreadableImageError(path, "not_an_image", f"declared size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise UnreadableImageError(
            path, "too_large",
            f"declares {width}x{height} = {width * height / 1e6:.1f} MP, above the limit of "
            f"{max_pixels / 1e6:.1f} MP{hint}; refused before decoding")


def probe_image(path):
    """Read only the header of ``path``.

    Returns:
        ``(width, height, mode)``: the stored size in pixels (before EXIF orientation) and the
        Pillow mode string ("RGB", "L", "CMYK", "I;16", "P", ...).
    Raises:
        UnreadableImageError: reason "empty" or "not_an_image".
        FileNotFoundError: the file does not exist.
    """
    img = _open(path)
    try:
        return img.size[0], img.size[1], img.mode
    finally:
        img.close()


#: Orientation rule of every reader (data.decode, data.tfrecords, here): a JPEG whose first
#: ORIENTATION_WINDOW bytes hold one of ORIENTATION_TAGS (an EXIF block, wherever it sits after
#: APP0, COM, ... segments, or an XMP orientation) is decoded here, where Pillow applies the
#: orientation; TensorFlow's decoder would ignore it.
ORIENTATION_WINDOW = 1 << 18
ORIENTATION_TAGS = (b"Exif\0\0", b"tiff:Orientation")

#: Segments walked at most by :func:`jpeg_frame_size` (a camera JPEG has ~15 before its pixels).
JPEG_MAX_SEGMENTS = 128
_HEAD_BYTES = 1 << 16


def jpeg_frame_size(data):
    """``(height, width)`` declared by a JPEG's SOF segment, (0, 0) when none is found.

    ``data``: the file's bytes (or its beginning). Walks the marker segments from the SOI to the
    first SOS, reading no pixel data; stops at a byte that is not a marker, when fewer than 10
    bytes are left, or after :data:`JPEG_MAX_SEGMENTS` steps. The frame size is the one
    ``tf.image.extract_jpeg_shape`` and Pillow read.
    """
    n, pos = len(data), 2
    for _ in range(JPEG_MAX_SEGMENTS):
        if pos + 10 > n or data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS: the header is over
            break
        length = data[pos + 2] * 256 + data[pos + 3]
        if length < 2:
            break
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return data[pos + 5] * 256 + data[pos + 6], data[pos + 7] * 256 + data[pos + 8]
        pos += 2 + length
    return 0, 0


def declared_pixels(path):
    """Width x height that the header of ``path`` declares, without decoding anything.

    PNG, BMP and JPEG are read from their first 64 KiB (a few microseconds); other formats, or a
    JPEG whose frame header lies further in, through :func:`probe_image` (Pillow).

    Raises:
        UnreadableImageError, FileNotFoundError: as :func:`probe_image`.
    """
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24 and head[12:16] == b"IHDR":
        width, height = struct.unpack_from(">II", head, 16)
        return width * height
    if head[:2] == b"BM" and len(head) >= 26:
        width, height = struct.unpack_from("<ii", head, 18)
        return abs(width) * abs(height)
    if head[:3] == b"\xff\xd8\xff":
        height, width = jpeg_frame_size(head)
        if height and width:
            return height * width
    width, height, _ = probe_image(path)
    return width * height


def _classify_decode_error(path, exc):
    text = str(exc).lower()
    if "decoder" in text and "not available" in text:
        return UnreadableImageError(path, "unsupported", str(exc))
    return UnreadableImageError(path, "truncated", f"decoding failed: {exc}")


def _load(path, img):
    """Decode the pixels of an opened image (first frame), mapping errors to reasons."""
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(path, "too_large", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
        raise _classify_decode_error(path, exc) from exc


def _apply_exif_orientation(img):
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        return img


def _cmyk_to_rgb(img):
    icc = img.info.get("icc_profile")
    if icc:
        try:
            import io

            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
        except Exception:  # unusable profile: fall back to the plain formula
            pass
    return img.convert("RGB")


def _on_white(img_rgba):
    background = Image.new("RGBA", img_rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, img_rgba).convert("RGB")


def _to_rgb_array(path, img):
    """A decoded PIL image of any mode -> uint8 [H, W, 3] RGB."""
    mode = img.mode
    if mode == "RGB":
        out = np.asarray(img)
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        out = np.asarray(img).astype(np.uint16) >> 8
        out = np.repeat(out.astype(np.uint8)[..., None], 3, axis=-1)
    elif mode == "I":
        arr = np.asarray(img)
        # 16-bit grey PNG/TIFF decoded as 32-bit int: values in 0..65535.
        arr = np.clip(arr, 0, 65535).astype(np.uint32) >> 8 if arr.max(initial=0) > 255 else arr
        out = np.repeat(np.clip(arr, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        if arr.max(initial=0.0) <= 1.0:
            arr = arr * 255.0
        out = np.repeat(np.clip(np.rint(arr), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    elif mode in ("1", "L"):
        out = np.repeat(np.asarray(img.convert("L"))[..., None], 3, axis=-1)
    elif mode == "CMYK":
        out = np.asarray(_cmyk_to_rgb(img))
    elif mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        out = np.asarray(_on_white(img.convert("RGBA")))
    elif mode == "P":
        if "transparency" in img.info:
            out = np.asarray(_on_white(img.convert("RGBA")))
        else:
            out = np.asarray(img.convert("RGB"))
    else:
        try:
            out = np.asarray(img.convert("RGB"))
        except (ValueError, OSError) as exc:
            raise UnreadableImageError(path, "unsupported", f"pixel mode {mode}") from exc
    if out.ndim != 3 or out.shape[2] != 3 or out.dtype != np.uint8:
        raise UnreadableImageError(path, "unsupported", f"pixel mode {mode} gave {out.shape}")
    return np.ascontiguousarray(out)


def read_image(path, max_pixels=DEFAULT_MAX_PIXELS):
    """Decode ``path`` to RGB.

    Args:
        path: image file (JPEG, PNG, PGM/PPM, BMP, GIF, WebP, TIFF, ... anything Pillow opens).
        max_pixels: refuse files whose *declared* width x height exceeds this (checked on the
            header before decoding); None disables the check.
    Returns:
        uint8 [H, W, 3] RGB, upright (EXIF orientation applied); see the module docstring for
        grey, 16-bit, alpha, CMYK and animation policies.
    Raises:
        UnreadableImageError: with ``.reason`` in :data:`REASONS`.
        FileNotFoundError: the file does not exist.
    """
    path = os.fspath(path)
    img = _open(path)
    with img:
        _check_pixels(path, img, max_pixels)
        _load(path, img)
        upright = _apply_exif_orientation(img)
        return _to_rgb_array(path, upright)


def read_image_downscaled(path, max_side, max_pixels=HARD_MAX_PIXELS):
    """Decode ``path`` so that its longer side is at most ``max_side`` pixels.

    JPEGs are reduced inside the decoder (1/2, 1/4, 1/8 DCT scaling) before any full-size buffer
    exists, then resized with area averaging to the exact size; other formats are decoded in full
    (so they must also fit :data:`DEFAULT_MAX_PIXELS`) and resized. Images already small enough are
    returned as :func:`read_image` would.

    Args:
        path: image file.
        max_side: longest side of the result, in pixels (>= 1).
        max_pixels: refuse files declaring more pixels than this (default :data:`HARD_MAX_PIXELS`).
    Returns:
        ``(image, scale)``: uint8 [h, w, 3] RGB, upright, with max(h, w) <= max_side; and
        ``scale`` = source pixels per returned pixel (>= 1.0, 1.0 if not reduced), so a box found
        in ``image`` maps back to the upright source as ``box * scale``.
    Raises:
        UnreadableImageError, FileNotFoundError: as :func:`read_image`.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    path = os.fspath(path)
    img = _open(path)
    with img:
        _check_pixels(path, img, max_pixels)
        src_w, src_h = img.size
        factor = max(src_w, src_h) / float(max_side)
        is_jpeg = img.format in ("JPEG", "MPO")
        if not is_jpeg:
            _check_pixels(path, img, min(max_pixels, DEFAULT_MAX_PIXELS),
                          hint=" for a full decode (only JPEG can be decoded reduced)")
        if factor > 1.0 and is_jpeg:
            # Ask for at least the final size; the decoder picks the largest 1/2^k that stays above.
            want = (max(1, int(src_w / factor)), max(1, int(src_h / factor)))
            try:
                img.draft(img.mode if img.mode in ("RGB", "L", "CMYK") else "RGB", want)
            except (OSError, ValueError):
                pass
        _load(path, img)
        upright = _apply_exif_orientation(img)
        # Source size in the upright frame: exif_transpose swapped the axes iff the decoded
        # (possibly reduced) image changed from landscape to portrait or back.
        swapped = (upright.size != img.size) and (upright.size == img.size[::-1])
        array = _to_rgb_array(path, upright)
    up_w, up_h = (src_h, src_w) if swapped else (src_w, src_h)
    h, w = array.shape[:2]
    if max(h, w) > max_side:
        ratio = max_side / float(max(h, w))
        new_w, new_h = max(1, round(w * ratio)), max(1, round(h * ratio))
        import cv2

        array = cv2.resize(array, (new_w, new_h), interpolation=cv2.INTER_AREA)
        h, w = new_h, new_w
    scale = 0.5 * (up_w / w + up_h / h)
    return np.ascontiguousarray(array), float(scale)
