"""Small output helpers: atomic JSON / NPZ writes and the cache folder."""
import json
import os
import tempfile

import numpy as np


def _atomic(path, write):
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".partial",
                               dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json(path, payload):
    """Write ``payload`` as indented UTF-8 JSON, atomically (temporary file, then rename)."""
    data = (json.dumps(payload, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    return _atomic(path, lambda fh: fh.write(data))


def write_npz(path, **arrays):
    """``numpy.savez`` to exactly ``path`` (no '.npz' appended), atomically."""
    return _atomic(path, lambda fh: np.savez(fh, **arrays))


def cache_dir():
    """$FACENET_CACHE, else ~/.cache/facenet (where train.py caches the synthetic faces)."""
    return os.environ.get("FACENET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "facenet")
