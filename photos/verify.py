"""``faces.py verify A B``: are the people in two photos the same person?

Each photo contributes its main face (the one data.align keeps: largest and most central; the
count of faces found is reported). The verdict is "same" when the squared L2 distance between the
two embeddings is <= the threshold, the rule the threshold was chosen with
(evaluation.verification).
"""
import os

import numpy as np

from evaluation.identification import squared_distances
from photos.embedding import model_input


def main_faces(cropper, path_a, path_b):
    """The main face of each photo, as :class:`photos.detection.FaceCrop` with its crop.

    Both files are decoded before any detection, so an unreadable second file is reported without
    waiting for the detector; raises the first problem as PhotoError (exit 4 unreadable, 3 no face).
    """
    decoded = []
    for path in (path_a, path_b):
        image, failure = cropper.read(path)
        if failure is not None:
            raise failure.error()
        decoded.append(image)
    faces = []
    for path, image in zip((path_a, path_b), decoded):
        found, failure = cropper.crops(path, image, largest=True)
        if failure is not None:
            raise failure.error()
        faces.append(found[0])
    return faces


def run_verify(faces, model, threshold, threshold_source="export"):
    """Compare two :class:`photos.detection.FaceCrop` (from :func:`main_faces`).

    Returns a JSON-ready dict: ``a``, ``b`` (the faces), ``distance`` (squared L2), ``threshold``,
    ``threshold_source``, ``same`` (distance <= threshold).
    """
    emb = model.embed(np.stack([model_input(f.crop, model) for f in faces]))
    distance = float(squared_distances(emb[:1], emb[1:])[0, 0])
    return {"a": faces[0].to_json(), "b": faces[1].to_json(), "distance": distance,
            "distance_metric": "squared_l2", "threshold": float(threshold),
            "threshold_source": threshold_source, "same": bool(distance <= threshold)}


def _face_line(face):
    name = os.path.basename(face["file"])
    box = "[" + ", ".join(f"{v:.0f}" for v in face["box"]) + "]"
    if face["score"] is None:
        return f"{name}: whole image {box} (no detection)"
    which = "1 face" if face["num_faces"] == 1 else f"main face of {face['num_faces']}"
    return f"{name}: face {box}, score {face['score']:.3f} ({which})"


def format_verify(r):
    verdict = "same person" if r["same"] else "different people"
    op = "<=" if r["same"] else ">"
    src = "stored in the export" if r["threshold_source"] == "export" else "--threshold"
    return "\n".join([_face_line(r["a"]), _face_line(r["b"]),
                      f"distance {r['distance']:.4f} (squared L2) {op} threshold "
                      f"{r['threshold']:.4f} ({src}): {verdict}"])
