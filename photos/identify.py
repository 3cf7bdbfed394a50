"""``faces.py identify --gallery DIR PROBE...``: who is this?

Every face of every probe photo (or its main face, ``largest``) is compared with every gallery
face. A person's distance is the squared L2 distance to their nearest gallery face (k-NN with one
neighbour per person, FaceNet Section 1); the top-k people are listed nearest first. The answer is
the nearest person when that distance is <= the threshold, else "unknown".
"""
import os

import numpy as np

from evaluation.identification import squared_distances
from photos.embedding import embed_photos
from photos.errors import PhotoError, exit_code_for_failures

UNKNOWN = "unknown"


def rank_people(gallery, embeddings, threshold, top_k=3):
    """For each row of ``embeddings``: {"identity", "distance", "candidates": [{"person",
    "distance", "nearest_file"}]} with at most ``top_k`` candidates, nearest first."""
    d = squared_distances(embeddings, gallery.embeddings)  # [probes, gallery faces]
    labels = np.asarray(gallery.labels)
    best = np.full((d.shape[0], len(gallery.people)), np.inf)  # per person: nearest face
    arg = np.full(best.shape, -1)
    rows = np.arange(d.shape[0])
    for person in np.unique(labels):
        cols = np.flatnonzero(labels == person)
        j = d[:, cols].argmin(axis=1)
        best[:, person], arg[:, person] = d[rows, cols[j]], cols[j]
    out = []
    for b, a in zip(best, arg):
        order = [int(p) for p in np.argsort(b, kind="stable") if np.isfinite(b[p])]
        cands = [{"person": gallery.people[p], "distance": float(b[p]),
                  "nearest_file": gallery.files[int(a[p])]} for p in order[:max(1, top_k)]]
        known = cands[0]["distance"] <= threshold
        out.append({"identity": cands[0]["person"] if known else UNKNOWN,
                    "distance": cands[0]["distance"], "candidates": cands})
    return out


def run_identify(gallery, files, model, cropper, threshold, threshold_source="export", top_k=3,
                 largest=False, progress=True):
    """Identify the faces of ``files`` against a loaded :class:`photos.gallery.Gallery`."""
    result = embed_photos(files, model, cropper, largest=largest, progress=progress)
    if not result.faces:
        detail = "; ".join(f.message() for f in result.failures[:3])
        raise PhotoError(f"no face found in the probe photo(s): {detail}",
                         exit_code_for_failures(result.failures))
    ranked = rank_people(gallery, result.embeddings, threshold, top_k)
    return {
        "gallery": {"dir": gallery.root, "cache": gallery.cache_path, **gallery.stats,
                    "failed_files": [f.to_json() for f in gallery.failures]},
        "threshold": float(threshold), "threshold_source": threshold_source,
        "distance_metric": "squared_l2", "top_k": int(top_k),
        "faces": [dict(face.to_json(), **r) for face, r in zip(result.faces, ranked)],
        "failed": [f.to_json() for f in result.failures],
    }


def format_identify(r):
    g = r["gallery"]
    lines = [f"gallery {g['dir']}: {g['people']} people, {g['images'] - g['failed']} faces "
             f"({g['cached']} cached, {g['embedded']} embedded now, {g['removed']} removed, "
             f"{g['failed']} without a face); threshold {r['threshold']:.4f}"]
    for f in r["faces"]:
        where = os.path.basename(f["file"])
        if f["score"] is not None:
            box = "[" + ", ".join(f"{v:.0f}" for v in f["box"]) + "]"
            where += f" face {f['face']} {box}"
        top = ", ".join(f"{c['person']} {c['distance']:.4f}" for c in f["candidates"])
        lines.append(f"{where}: {f['identity']}  (top {len(f['candidates'])}: {top})")
    return "\n".join(lines)
