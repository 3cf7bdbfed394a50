"""TensorBoard embedding-projector files for a set of validation images.

Writes, into a TensorBoard log directory:
- ``projector/embeddings.tsv``: float embeddings, one row per image, [N, D];
- ``projector/metadata.tsv``: a header row and one identity name per image;
- ``projector/sprite.png``: the thumbnails tiled row-major on a square grid;
- ``projector_config.pbtxt``: the ProjectorConfig that TensorBoard's projector plugin reads.
"""
import math
import os

import numpy as np

SPRITE_MAX_SIDE = 8192  # the projector refuses larger sprite atlases
CONFIG_NAME = "projector_config.pbtxt"


def _tsv_cell(text):
    return str(text).replace("\t", " ").replace("\n", " ")


def make_sprite(thumbnails):
    """Tile uint8 thumbnails [N, h, w, 3] into a square atlas [g*h, g*w, 3], g = ceil(sqrt(N))."""
    thumbnails = np.asarray(thumbnails, dtype=np.uint8)
    n, h, w, c = thumbnails.shape
    g = int(math.ceil(math.sqrt(n)))
    atlas = np.zeros((g * h, g * w, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, g)
        atlas[r * h:(r + 1) * h, col * w:(col + 1) * w] = thumbnails[i]
    return atlas


def write_projector(log_dir, embeddings, names, thumbnails=None, tensor_name="validation_embeddings"):
    """Write the projector files; returns the config path.

    embeddings: float [N, D]; names: N identity names; thumbnails: uint8 [N, h, w, 3] or None.
    """
    import cv2
    from google.protobuf import text_format
    from tensorboard.plugins import projector

    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(names):
        raise ValueError(f"embeddings {embeddings.shape} and {len(names)} names do not match")
    if len(names) == 0:
        raise ValueError("no embeddings to project")
    sub = os.path.join(log_dir, "projector")
    os.makedirs(sub, exist_ok=True)
    np.savetxt(os.path.join(sub, "embeddings.tsv"), embeddings, delimiter="\t", fmt="%.6f")
    with open(os.path.join(sub, "metadata.tsv"), "w", encoding="utf-8") as f:
        f.write("index\tidentity\n")
        for i, name in enumerate(names):
            f.write(f"{i}\t{_tsv_cell(name)}\n")

    config = projector.ProjectorConfig()
    emb = config.embeddings.add()
    emb.tensor_name = tensor_name
    emb.tensor_path = "projector/embeddings.tsv"
    emb.metadata_path = "projector/metadata.tsv"
    if thumbnails is not None:
        thumbnails = np.asarray(thumbnails, dtype=np.uint8)
        g = int(math.ceil(math.sqrt(len(thumbnails))))
        h, w = thumbnails.shape[1:3]
        scale = min(1.0, SPRITE_MAX_SIDE / float(g * max(h, w)))
        if scale < 1.0:
            h, w = max(1, int(h * scale)), max(1, int(w * scale))
            thumbnails = np.stack([cv2.resize(t, (w, h), interpolation=cv2.INTER_AREA)
                                   for t in thumbnails])
        atlas = make_sprite(thumbnails)
        cv2.imwrite(os.path.join(sub, "sprite.png"), cv2.cvtColor(atlas, cv2.COLOR_RGB2BGR))
        emb.sprite.image_path = "projector/sprite.png"
        emb.sprite.single_image_dim.extend([w, h])
    path = os.path.join(log_dir, CONFIG_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text_format.MessageToString(config))
    return path


def load_thumbnails(paths, size=64):
    """uint8 RGB thumbnails [N, size, size, 3] of image files (unreadable ones are grey)."""
    import cv2
    from data.image_io import UnreadableImageError, read_image

    out = np.full((len(paths), size, size, 3), 128, dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            out[i] = cv2.resize(read_image(p), (size, size), interpolation=cv2.INTER_AREA)
        except (UnreadableImageError, OSError):
            pass
    return out
