"""Functional building blocks shared by the networks: conv units, pooling, inception modules.

Every function takes and returns a Keras symbolic tensor [N, H, W, C] (channels last).

``normalization`` is ``"batch"`` (conv without bias -> BatchNorm -> ReLU: the default, it trains
far better from scratch) or ``"lrn"`` (the paper's version: conv with bias -> ReLU, and local
response normalisation only where Tables 1-2 put "norm"/"rnorm"). Inside the builders it can also
be ``"sync_batch"`` (:func:`block_normalization`): batch norm whose statistics are all-reduced over
the replicas of a tf.distribute strategy (Keras ``BatchNormalization(synchronized=True)``); the
layers, their names and weights are those of ``"batch"``, so checkpoints restore across the two.
"""
from dataclasses import dataclass

import keras

from models.layers import L2Pooling2D, LocalResponseNormalization

NORMALIZATIONS = ("batch", "lrn")
SYNC_BATCH = "sync_batch"  # "batch" with synchronised statistics; not a user-facing choice
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.9  # Keras default 0.99 lags badly in short runs: inference statistics stay near init


def check_normalization(normalization):
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def block_normalization(normalization, sync_batch_norm=False):
    """What the builders pass to the blocks: ``normalization`` (one of NORMALIZATIONS, checked),
    or ``"sync_batch"`` for ``"batch"`` with ``sync_batch_norm``."""
    check_normalization(normalization)
    return SYNC_BATCH if sync_batch_norm and normalization == "batch" else normalization


def conv_unit(x, filters, kernel, stride=1, normalization="batch", name=None):
    """Conv2D (SAME) + [BatchNorm] + ReLU. [N, H, W, Cin] -> [N, ceil(H/s), ceil(W/s), filters]."""
    use_bn = normalization in ("batch", SYNC_BATCH)
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=not use_bn,
                            kernel_initializer="he_normal", name=name)(x)
    if use_bn:
        x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                                            synchronized=normalization == SYNC_BATCH,
                                            name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def rnorm(x, normalization, name):
    """The tables' "norm": LRN in the paper's configuration, identity with batch norm."""
    if normalization == "lrn":
        return LocalResponseNormalization(name=name)(x)
    return x


def pool(x, kind, size=3, stride=1, name=None):
    """Max ("max") or L2 ("l2") pooling, SAME padding. [N, H, W, C] -> [N, ceil(H/s), ceil(W/s), C]."""
    if kind == "max":
        return keras.layers.MaxPooling2D(size, strides=stride, padding="same", name=name)(x)
    if kind == "l2":
        return L2Pooling2D(size, strides=stride, padding="same", name=name)(x)
    if kind == "avg":
        return keras.layers.AveragePooling2D(size, strides=stride, padding="same", name=name)(x)
    raise ValueError(f"unknown pooling {kind!r}")


@dataclass(frozen=True)
class InceptionSpec:
    """One row of Table 2. Zero widths drop a branch; ``proj=0`` passes the pool branch through.

    Output channels: ``n1x1 + n3x3 + n5x5 + (proj or C_in)`` (the pass-through pool branch keeps
    the input's channels, as in modules 3c and 4e).
    """

    n1x1: int
    n3x3_reduce: int
    n3x3: int
    n5x5_reduce: int
    n5x5: int
    pool: str  # "max" or "l2"
    proj: int
    stride: int = 1
    pool_size: int = 3

    def without_5x5(self):
        return InceptionSpec(self.n1x1, self.n3x3_reduce, self.n3x3, 0, 0, self.pool, self.proj,
                             self.stride, self.pool_size)


def inception_module(x, spec: InceptionSpec, normalization, name):
    """Inception module of Table 2 (Szegedy et al. 2014 with the FaceNet pooling choices).

    Branches, concatenated on channels: 1x1; 1x1 reduce -> 3x3 (stride s); 1x1 reduce -> 5x5
    (stride s); pool (max or L2, 3x3, stride s) -> optional 1x1 projection.
    [N, H, W, Cin] -> [N, ceil(H/s), ceil(W/s), Cout].
    """
    branches = []
    if spec.n1x1:
        if spec.stride != 1:
            raise ValueError(f"{name}: a 1x1 branch in a stride-{spec.stride} module is not defined")
        branches.append(conv_unit(x, spec.n1x1, 1, 1, normalization, f"{name}_1x1"))
    if spec.n3x3:
        b = x
        if spec.n3x3_reduce:
            b = conv_unit(b, spec.n3x3_reduce, 1, 1, normalization, f"{name}_3x3_reduce")
        branches.append(conv_unit(b, spec.n3x3, 3, spec.stride, normalization, f"{name}_3x3"))
    if spec.n5x5:
        b = x
        if spec.n5x5_reduce:
            b = conv_unit(b, spec.n5x5_reduce, 1, 1, normalization, f"{name}_5x5_reduce")
        branches.append(conv_unit(b, spec.n5x5, 5, spec.stride, normalization, f"{name}_5x5"))
    if spec.pool:
        b = pool(x, spec.pool, spec.pool_size, spec.stride, name=f"{name}_pool")
        if spec.proj:
            b = conv_unit(b, spec.proj, 1, 1, normalization, f"{name}_pool_proj")
        branches.append(b)
    if len(branches) == 1:
        return branches[0]
    return keras.layers.Concatenate(axis=-1, name=f"{name}_concat")(branches)


def maxout_fc(x, units, name, pieces=2):
    """Dense(pieces * units) + maxout (NN1's fully connected layers, Table 1). [N, D] -> [N, units]."""
    from models.layers import Maxout

    x = keras.layers.Dense(pieces * units, name=name)(x)
    return Maxout(units, name=f"{name}_maxout")(x)


def embedding_head(x, embedding_size, name_prefix=""):
    """Linear projection to the embedding, then L2 normalisation in float32. [N, D] -> [N, E]."""
    from models.layers import L2Normalization

    x = keras.layers.Dense(embedding_size, name=f"{name_prefix}embedding")(x)
    return L2Normalization(name=f"{name_prefix}l2_normalize")(x)


def model_input(image_size, name="images"):
    """Float32 input [N, H, W, 3] of already preprocessed RGB images (see data/preprocess.py)."""
    h, w = image_size
    return keras.Input(shape=(h, w, 3), dtype="float32", name=name)

