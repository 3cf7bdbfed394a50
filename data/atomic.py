"""Atomic file writes: a temporary file in the same folder, flushed and fsynced, then renamed.

A reader (or a rerun after ``kill -9``) sees the old file or the new one, never half of one. The
temporary file is hidden and named ``.<name>.partial-<pid>`` so that a resumable job can tell
leftovers of a killed run (:func:`is_partial`) from real output.
"""
import os

PARTIAL_MARK = ".partial-"


def partial_path(path):
    """Where :func:`write_atomically` stages ``path`` before the rename."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}{PARTIAL_MARK}{os.getpid()}")


def is_partial(name):
    """True for a file name that :func:`partial_path` made (a leftover when no writer runs)."""
    return name.startswith(".") and PARTIAL_MARK in name


def write_atomically(path, write):
    """Create the folder, call ``write(binary_file)`` on a temporary file, then rename to ``path``.

    Returns the absolute path. On any error the temporary file is removed and ``path`` is left
    as it was.
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text_atomically(path, text):
    """:func:`write_atomically` for a str, UTF-8 encoded."""
    data = text.encode("utf-8")
    return write_atomically(path, lambda fh: fh.write(data))


def write_png_atomically(path, image_rgb):
    """Write uint8 RGB [H, W, 3] as a PNG file at ``path``, atomically (:func:`write_atomically`)."""
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image_rgb[..., ::-1]))
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    write_atomically(path, lambda fh: fh.write(buf.tobytes()))
