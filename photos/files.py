"""Small output helpers: atomic JSON / NPZ writes and the cache folder."""
import json
import os

import numpy as np

from data.atomic import write_atomically, write_text_atomically


def write_json(path, payload):
    """Write ``payload`` as indented UTF-8 JSON, atomically (temporary file, then rename)."""
    return write_text_atomically(path, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")


def write_npz(path, **arrays):
    """``numpy.savez`` to exactly ``path`` (no '.npz' appended), atomically."""
    return write_atomically(path, lambda fh: np.savez(fh, **arrays))


def cache_dir():
    """$FACENET_CACHE, else ~/.cache/facenet (where train.py caches the synthetic faces)."""
    return os.environ.get("FACENET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "facenet")
