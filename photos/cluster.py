"""``faces.py cluster DIR``: group the faces of a photo collection by person (FaceNet Section 5.7).

Agglomerative clustering (:func:`evaluation.clustering.cluster_embeddings`) on the squared L2
distances, cut at the verification threshold. The default is complete linkage: two groups merge
only while every pair of their faces is within the threshold, so every pair inside a cluster would
be verified "same" and two people the verifier tells apart are never put together (a person may be
split instead, which is the cheaper mistake in a photo collection). ``average`` (evaluate.py's
default) merges while the mean distance is within it: fewer, larger clusters. Writes to
``out_dir``:

* ``clusters.json``: the clusters, largest first, each with its faces (photo, face index, box,
  score), plus the photos that gave no face;
* ``cluster_000.png``, ``cluster_001.png``, ...: one contact sheet per cluster, its faces' crops in
  the JSON's order, row by row (at most ``sheet_max`` per sheet).

Sheets of an earlier run in ``out_dir`` (``cluster_<n>.png``) are removed first, so the folder
always matches its ``clusters.json``.
"""
import math
import os
import re

import numpy as np

from photos.embedding import embed_photos
from photos.errors import PhotoError, exit_code_for_failures
from photos.files import write_json

REPORT_NAME = "clusters.json"
_SHEET_RE = re.compile(r"^cluster_\d{3,}\.png$")


def contact_sheet(thumbnails, columns=None, gap=4, background=(32, 32, 32)):
    """uint8 RGB [S, S, 3] tiles -> one uint8 RGB grid image, row by row."""
    n = len(thumbnails)
    if n == 0:
        raise ValueError("contact_sheet needs at least one thumbnail")
    size = thumbnails[0].shape[0]
    cols = columns or min(10, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    sheet = np.empty((rows * size + (rows + 1) * gap, cols * size + (cols + 1) * gap, 3), np.uint8)
    sheet[:] = background
    for i, t in enumerate(thumbnails):
        r, c = divmod(i, cols)
        y, x = gap + r * (size + gap), gap + c * (size + gap)
        sheet[y:y + size, x:x + size] = t
    return sheet


def run_cluster(files, model, cropper, threshold, out_dir, threshold_source="export",
                linkage="complete", largest=False, progress=True, thumbnail_size=96, sheet_max=100):
    """Cluster every face of ``files``; write the report and sheets; return the report dict."""
    from data.atomic import write_png_atomically
    from evaluation.clustering import cluster_embeddings

    result = embed_photos(files, model, cropper, largest=largest, progress=progress,
                          thumbnail_size=thumbnail_size)
    if not result.faces:
        detail = "; ".join(f.message() for f in result.failures[:3])
        raise PhotoError(f"no face found in {len(files)} photo(s) to cluster: {detail}",
                         exit_code_for_failures(result.failures))
    labels = cluster_embeddings(result.embeddings, distance_threshold=threshold, linkage=linkage)
    # Clusters largest first; ties by their first face's input order.
    groups = {}
    for i, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(i)
    order = sorted(groups, key=lambda lab: (-len(groups[lab]), groups[lab][0]))

    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if _SHEET_RE.match(name):
            os.remove(os.path.join(out_dir, name))
    width = max(3, len(str(len(order) - 1)))
    clusters = []
    for cid, lab in enumerate(order):
        members = groups[lab]
        sheet_name = f"cluster_{cid:0{width}d}.png"
        sheet = contact_sheet([result.faces[i].thumbnail for i in members[:sheet_max]])
        write_png_atomically(os.path.join(out_dir, sheet_name), sheet)
        clusters.append({"id": cid, "size": len(members), "sheet": sheet_name,
                         "sheet_faces": min(len(members), sheet_max),
                         "photos": len({result.faces[i].file for i in members}),
                         "faces": [result.faces[i].to_json() for i in members]})
    report = {
        "model": model.describe(), "crop": cropper.settings(), "largest_only": bool(largest),
        "threshold": float(threshold), "threshold_source": threshold_source,
        "distance_metric": "squared_l2", "linkage": linkage,
        "num_photos": result.num_photos, "num_photos_with_faces": result.photos_with_faces,
        "num_faces": len(result.faces), "num_clusters": len(clusters),
        "num_singletons": sum(1 for c in clusters if c["size"] == 1),
        "clusters": clusters, "failed": [f.to_json() for f in result.failures],
    }
    write_json(os.path.join(out_dir, REPORT_NAME), report)
    report["out_dir"] = os.path.abspath(out_dir)
    return report


def format_cluster(r):
    lines = [f"{r['num_faces']} face(s) from {r['num_photos_with_faces']} of {r['num_photos']} "
             f"photo(s) -> {r['num_clusters']} cluster(s) ({r['num_singletons']} single faces) at "
             f"threshold {r['threshold']:.4f}, {r['linkage']} linkage; report and sheets in "
             f"{r['out_dir']}"]
    for c in r["clusters"]:
        if c["size"] < 2:
            continue
        names = ", ".join(os.path.basename(f["file"]) for f in c["faces"][:4])
        more = f", ... (+{c['size'] - 4})" if c["size"] > 4 else ""
        lines.append(f"  {c['sheet']}: {c['size']} faces: {names}{more}")
    return "\n".join(lines)
