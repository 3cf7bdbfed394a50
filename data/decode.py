"""Decoding image files and bytes into upright uint8 RGB tensors, the same pixels on every route.

JPEG (without EXIF), BMP and PNG without alpha/palette are decoded in-graph by TensorFlow;
anything else (PGM/PPM, GIF, WebP, TIFF, PNG with alpha or palette, JPEGs with an EXIF block
anywhere among their segments, whose orientation TensorFlow would ignore) goes through
:func:`data.image_io.read_image` (grey -> 3 channels, alpha composited on white, EXIF orientation
applied), so both routes give the same, upright pixels. Size limit: a file whose header declares
more than ``data.image_io.DEFAULT_MAX_PIXELS`` is never given to TensorFlow's decoders; image_io
refuses it (reason "too_large") before decoding, so a decompression bomb fails fast instead of
exhausting memory. A corrupt file fails with an error naming the file; :mod:`data.file_check`
finds such files up front. Used by the batch builders of :mod:`data.pipeline` and by
:mod:`data.memory_cache`.
"""
from __future__ import annotations

import os
import re
import tempfile

import numpy as np
import tensorflow as tf

from data import augment as augment_lib

_HEADER_BYTES = 64


def _tf_decodable(contents, max_pixels=None):
    """bool scalar: TensorFlow's decoder gives the same pixels as data.image_io for these bytes.

    See :func:`_routing`, which also says whether the bytes are a JPEG.
    """
    return _routing(contents, max_pixels)[0]


def _routing(contents, max_pixels=None):
    """-> (tf_decodable bool scalar, is_jpeg bool scalar) for encoded image bytes.

    ``tf_decodable`` is True for JPEG without EXIF/XMP orientation data (TensorFlow ignores
    orientation, image_io applies it; aligned crops carry none; see
    :data:`data.image_io.ORIENTATION_WINDOW`),
    BMP, and PNG whose IHDR colour type is 0 (grey) or 2 (RGB); BMP and PNG only when the size
    their header declares is at most ``max_pixels`` (default data.image_io.DEFAULT_MAX_PIXELS;
    larger ones go to image_io, which refuses them, reason "too_large", before decoding anything;
    a JPEG's size is checked by :func:`decode_image`). Everything else (PGM/PPM, GIF, WebP, TIFF,
    PNG with alpha or a palette, EXIF JPEGs, empty or garbage files) goes to data.image_io.
    Mirrored by data.tfrecords.native_format.
    """
    from data.image_io import DEFAULT_MAX_PIXELS, ORIENTATION_TAGS, ORIENTATION_WINDOW

    if max_pixels is None:
        max_pixels = DEFAULT_MAX_PIXELS
    # A fixed-size, zero-padded header: substr fails past the end of short files.
    head = tf.strings.substr(tf.strings.substr(contents, 0, _HEADER_BYTES) + b"\0" * _HEADER_BYTES,
                             0, _HEADER_BYTES)
    b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)  # [64]

    def at(i, values):
        return tf.reduce_all(tf.equal(tf.gather(b, i + tf.range(len(values))),
                                      tf.constant(list(values), tf.int64)))

    def be32(i):
        return b[i] * 2**24 + b[i + 1] * 2**16 + b[i + 2] * 2**8 + b[i + 3]

    def le32_signed(i):
        u = b[i] + b[i + 1] * 2**8 + b[i + 2] * 2**16 + b[i + 3] * 2**24
        return tf.where(u >= 2**31, u - 2**32, u)

    window = tf.strings.substr(contents, 0, ORIENTATION_WINDOW)
    pattern = "|".join(re.escape(tag.decode("latin-1")) for tag in ORIENTATION_TAGS)
    oriented = tf.strings.length(tf.strings.regex_replace(
        window, pattern, "", replace_global=False)) < tf.strings.length(window)
    is_jpeg = at(0, b"\xff\xd8\xff")
    plain_jpeg = tf.logical_and(is_jpeg, tf.logical_not(oriented))
    bmp = tf.logical_and(at(0, b"BM"),
                         tf.abs(le32_signed(18)) * tf.abs(le32_signed(22)) <= max_pixels)
    png_plain = tf.logical_and(
        tf.logical_and(at(0, b"\x89PNG\r\n\x1a\n"), tf.strings.length(contents) > 25),
        tf.logical_or(tf.equal(b[25], 0), tf.equal(b[25], 2)))
    png_plain = tf.logical_and(png_plain, be32(16) * be32(20) <= max_pixels)
    return tf.logical_or(tf.logical_or(plain_jpeg, bmp), png_plain), is_jpeg


def _jpeg_small_enough(contents, max_pixels=None):
    """bool scalar for a JPEG: the frame size in its header is at most ``max_pixels``.

    Reads the header only (``tf.image.extract_jpeg_shape``); fails, like the decoder would, on a
    JPEG whose header is unreadable.
    """
    if max_pixels is None:
        from data.image_io import DEFAULT_MAX_PIXELS as max_pixels
    shape = tf.cast(tf.image.extract_jpeg_shape(contents), tf.int64)
    return shape[0] * shape[1] <= max_pixels


def _read_with_image_io(path: str) -> np.ndarray:
    from data.image_io import read_image  # imported lazily: Pillow only when needed

    return read_image(path)


def _as_bytes(value) -> bytes:
    if isinstance(value, np.ndarray):
        value = value.item()
    return bytes(value)


def _py_decode_path(path) -> np.ndarray:
    return _read_with_image_io(_as_bytes(path).decode("utf-8"))


def _py_decode_bytes(contents) -> np.ndarray:
    from data.image_io import UnreadableImageError

    contents = _as_bytes(contents)
    if len(contents) == 0:
        raise ValueError("empty image bytes")
    fd, tmp = tempfile.mkstemp(prefix="facenet_decode_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(contents)
        try:
            return _read_with_image_io(tmp)
        except UnreadableImageError as exc:  # name the bytes, not the temporary file
            raise ValueError(f"encoded image ({len(contents):,} bytes): "
                             f"{str(exc).replace(tmp, '').lstrip(': ')}") from None
    finally:
        os.unlink(tmp)


def decode_image(contents, path=None):
    """Encoded image bytes (string scalar) -> uint8 [h, w, 3] RGB, in graph mode.

    TF-native formats are decoded in-graph; others through ``data.image_io.read_image`` (reading
    ``path`` when given, else the bytes). Grey is repeated to 3 channels, alpha composited on
    white, EXIF orientation applied (see data.image_io). Both routes give the same pixels. Files
    declaring more than ``data.image_io.DEFAULT_MAX_PIXELS`` fail (reason "too_large") without
    being decoded.
    """
    contents = tf.convert_to_tensor(contents, tf.string)

    def tf_decode():
        return tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)

    def py_decode():
        if path is not None:
            img = tf.numpy_function(_py_decode_path, [path], tf.uint8, stateful=False)
        else:
            img = tf.numpy_function(_py_decode_bytes, [contents], tf.uint8, stateful=False)
        return tf.ensure_shape(img, [None, None, 3])

    native, is_jpeg = _routing(contents)
    # A JPEG's frame size is not at a fixed offset: read its header before letting TF decode it.
    native = tf.cond(tf.logical_and(native, is_jpeg),
                     lambda: _jpeg_small_enough(contents), lambda: native)
    image = tf.cond(native, tf_decode, py_decode)
    return tf.ensure_shape(image, [None, None, 3])


def load_image(path):
    """Reads and decodes one file: path string scalar -> uint8 [h, w, 3] RGB."""
    path = tf.convert_to_tensor(path, tf.string)
    return decode_image(tf.io.read_file(path), path)


def load_and_resize(path_or_contents, image_size, is_contents=False):
    """File (or encoded bytes) -> float32 [H, W, 3], 0..255, resized to image_size = (H, W)."""
    image = decode_image(path_or_contents) if is_contents else load_image(path_or_contents)
    return tf.clip_by_value(augment_lib.resize(image, image_size), 0.0, 255.0)
