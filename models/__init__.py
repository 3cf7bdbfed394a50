"""The FaceNet model zoo (Schroff et al., CVPR 2015, Section 3.3).

- ``nn1``: Zeiler&Fergus-style network of Table 1 (220x220).
- ``nn2``: Inception network of Table 2 (224x224); ``nn3`` is NN2 at 160x160; ``nn4`` is NN2 at
  96x96 without 5x5 convolutions in the higher layers.
- ``nns1``, ``nns2``: the paper's small "mobile" networks; the paper gives only their budgets,
  the layer designs are ours (see :mod:`models.small`).
- ``tiny``: **not in the paper**; the 64x64 CPU quick-start network for the default training run.

Every model takes float32 RGB ``[N, H, W, 3]`` already preprocessed by ``data.preprocess`` and
returns float32 ``[N, embedding_size]`` embeddings with unit L2 norm per row.

Importing this package imports TensorFlow with its C++ start-up banner silenced (quiet_tf.py).
"""
from quiet_tf import import_tensorflow

import_tensorflow()

# pylint: disable=wrong-import-position
from models.inception import build_nn2, build_nn3, build_nn4
from models.layers import L2Normalization, L2Pooling2D, LocalResponseNormalization, Maxout
from models.madds import count_madds
from models.nn1 import build_nn1
from models.small import build_nns1, build_nns2, build_tiny

from choices import MODEL_NAMES  # the names, defined once (TF-free, for flags.py)

_DEFAULT_IMAGE_SIZES = {
    "nn1": (220, 220),
    "nn2": (224, 224),
    "nn3": (160, 160),
    "nn4": (96, 96),
    "nns1": (165, 165),
    "nns2": (140, 116),
    "tiny": (64, 64),
}

_BUILDERS = {
    "nn1": build_nn1,
    "nn2": build_nn2,
    "nn3": build_nn3,
    "nn4": build_nn4,
    "nns1": build_nns1,
    "nns2": build_nns2,
    "tiny": build_tiny,
}

# The paper's figures (its "FLPS"/"FLOPS" are multiply-adds per image). None: not given.
# NN1: Table 1; NN2: Table 2; NN3: NN2's network at 160x160 (Section 3.3); NN4: Section 3.3
# ("285M FLOPS"); NNS1/NNS2: Section 3.3 ("26M parameters and only 220M FLOPS", "4.3M parameters
# and 20M FLOPS"). tiny is not in the paper.
PAPER_FIGURES = {
    "nn1": {"params": 140_000_000, "madds": 1_600_000_000, "input": (220, 220)},
    "nn2": {"params": 7_500_000, "madds": 1_600_000_000, "input": (224, 224)},
    "nn3": {"params": 7_500_000, "madds": None, "input": (160, 160)},
    "nn4": {"params": None, "madds": 285_000_000, "input": (96, 96)},
    "nns1": {"params": 26_000_000, "madds": 220_000_000, "input": (165, 165)},
    "nns2": {"params": 4_300_000, "madds": 20_000_000, "input": (140, 116)},
    "tiny": {"params": None, "madds": None, "input": (64, 64)},
}


def _check_name(name):
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def default_image_size(name):
    """The model's native input size (H, W) in pixels, e.g. ``default_image_size("nns2") == (140, 116)``."""
    _check_name(name)
    return _DEFAULT_IMAGE_SIZES[name]


def _parse_image_size(image_size, name):
    if image_size is None:
        return default_image_size(name)
    if isinstance(image_size, str):
        text = image_size.lower().replace("×", "x").split("x")
        try:
            image_size = tuple(int(t) for t in text)
        except ValueError:
            raise ValueError(f"image_size must look like 160 or '140x116', got {image_size!r}")
        if len(image_size) == 1:
            image_size = image_size * 2
    elif isinstance(image_size, int):
        image_size = (image_size, image_size)
    size = tuple(int(v) for v in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return size


def build_model(name, embedding_size=128, image_size=None, normalization="batch",
                sync_batch_norm=False):
    """Build FaceNet network ``name`` (one of :data:`MODEL_NAMES`) as a functional keras.Model.

    Args:
      name: model name; the returned model carries it as ``model.name``.
      embedding_size: output dimension (the paper uses 128).
      image_size: None (the model's default), an int S (SxS) or (H, W) in pixels.
      normalization: ``"batch"`` (default; BN after every conv) or ``"lrn"`` (the paper's LRN
        where the tables put "norm", no BN).
      sync_batch_norm: with ``"batch"``, Keras ``BatchNormalization(synchronized=True)``: the
        statistics of a training step are all-reduced over the replicas of a tf.distribute
        strategy (the global batch), not each replica's slice. Same layers, names and weights as
        without (checkpoints restore either way); inference is unchanged. Ignored with ``"lrn"``.
    Returns:
      keras.Model mapping float32 [N, H, W, 3] preprocessed RGB to float32 [N, embedding_size]
      with unit L2 norm per row.
    """
    _check_name(name)
    if int(embedding_size) != embedding_size or embedding_size < 1:
        raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
    size = _parse_image_size(image_size, name)
    return _BUILDERS[name](embedding_size=int(embedding_size), image_size=size,
                           normalization=normalization, name=name,
                           sync_batch_norm=bool(sync_batch_norm))


__all__ = [
    "MODEL_NAMES", "PAPER_FIGURES", "build_model", "count_madds", "default_image_size",
    "L2Normalization", "L2Pooling2D", "LocalResponseNormalization", "Maxout",
]
