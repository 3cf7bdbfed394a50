"""``faces.py embed PATH...``: every face (or the main one) of every photo -> embeddings.npz + JSON.

The NPZ holds ``embeddings`` float32 [N, D] (unit rows) and, row for row, ``files`` (str),
``face`` (int, the face's index in its photo), ``boxes`` float32 [N, 4] (x0, y0, x1, y1 in source
pixels) and ``scores`` float32 [N] (NaN with --detector=none). The JSON beside it repeats that per
face (plus landmarks) with the model and crop settings, and lists the photos that gave no face.
"""
import os

import numpy as np

from photos.embedding import embed_photos
from photos.errors import EXIT_USAGE, PhotoError, exit_code_for_failures
from photos.files import write_json, write_npz


def default_json_path(output):
    stem, ext = os.path.splitext(output)
    return (stem if ext.lower() == ".npz" else output) + ".json"


def run_embed(files, model, cropper, output, output_json=None, largest=False, progress=True):
    """Embed ``files`` and write ``output`` (NPZ) and ``output_json``.

    Returns the JSON payload. Raises :class:`PhotoError` when no photo gave a face (nothing is
    written then).
    """
    if not files:
        raise PhotoError("no photos to embed", EXIT_USAGE)
    output_json = output_json or default_json_path(output)
    result = embed_photos(files, model, cropper, largest=largest, progress=progress)
    if not result.faces:
        detail = "; ".join(f.message() for f in result.failures[:3])
        more = len(result.failures) - 3
        raise PhotoError(f"no face embedded from {len(files)} photo(s): {detail}"
                         + (f" (and {more} more)" if more > 0 else ""),
                         exit_code_for_failures(result.failures))
    faces = result.faces
    write_npz(output, embeddings=result.embeddings,
              files=np.array([f.file for f in faces], dtype=str),
              face=np.array([f.face for f in faces], np.int32),
              boxes=np.array([f.box for f in faces], np.float32).reshape(-1, 4),
              scores=np.array([np.nan if f.score is None else f.score for f in faces], np.float32))
    payload = {
        "npz": os.path.abspath(output),
        "model": model.describe(),
        "crop": cropper.settings(),
        "largest_only": bool(largest),
        "num_photos": result.num_photos,
        "num_photos_with_faces": result.photos_with_faces,
        "num_faces": len(faces),
        "embedding_size": int(result.embeddings.shape[1]),
        "faces": [dict(row=i, **f.to_json()) for i, f in enumerate(faces)],
        "failed": [f.to_json() for f in result.failures],
    }
    write_json(output_json, payload)
    payload["json"] = os.path.abspath(output_json)
    return payload


def format_embed(payload):
    lines = [f"{payload['num_faces']} face(s) from {payload['num_photos_with_faces']} of "
             f"{payload['num_photos']} photo(s) -> {payload['npz']} "
             f"[{payload['num_faces']} x {payload['embedding_size']}], {payload['json']}"]
    return "\n".join(lines)
