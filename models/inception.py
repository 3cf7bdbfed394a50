"""NN2, NN3 and NN4: the GoogLeNet-style Inception networks of FaceNet Table 2 / Section 3.3.

Table 2 (NN2, 224x224; sizes at that input; "m" max pooling, "L2" L2 pooling, "p" projection):

    conv1 (7x7/2, 64)                   112x112x64
    max pool 3x3/2 + norm               56x56x64
    inception (2): 1x1 64 -> 3x3 192    56x56x192
    norm + max pool 3x3/2               28x28x192
    module  #1x1  #3x3r  #3x3  #5x5r  #5x5  pool        out
    3a        64     96   128     16    32   m, 32p      28x28x256
    3b        64     96   128     32    64   L2, 64p     28x28x320
    3c         0    128  256/2    32  64/2   m 3x3/2     14x14x640
    4a       256     96   192     32    64   L2, 128p    14x14x640
    4b       224    112   224     32    64   L2, 128p    14x14x640
    4c       192    128   256     32    64   L2, 128p    14x14x640
    4d       160    144   288     32    64   L2, 128p    14x14x640
    4e         0    160  256/2    64 128/2   m 3x3/2     7x7x1024
    5a       384    192   384     48   128   L2, 128p    7x7x1024
    5b       384    192   384     48   128   m, 128p     7x7x1024
    avg pool -> fully connected 128 -> L2 normalisation

Modules 3c and 4e reduce the grid (stride 2 on the 3x3, 5x5 and pool branches) and their pool branch
has no projection. Pooling inside the other modules is 3x3, stride 1.

NN3 is NN2 at 160x160. NN4 is NN2 at 96x96 without the 5x5 branches in the higher layers (4e, 5a, 5b)
"as the receptive field is already too small by then" (Section 3.3); its 4e/5a/5b outputs are
therefore 896 channels wide.
"""
import keras

from models.blocks import (InceptionSpec, block_normalization, conv_unit, embedding_head,
                           inception_module, model_input, pool, rnorm)

NN2_MODULES = (
    ("3a", InceptionSpec(64, 96, 128, 16, 32, "max", 32)),
    ("3b", InceptionSpec(64, 96, 128, 32, 64, "l2", 64)),
    ("3c", InceptionSpec(0, 128, 256, 32, 64, "max", 0, stride=2)),
    ("4a", InceptionSpec(256, 96, 192, 32, 64, "l2", 128)),
    ("4b", InceptionSpec(224, 112, 224, 32, 64, "l2", 128)),
    ("4c", InceptionSpec(192, 128, 256, 32, 64, "l2", 128)),
    ("4d", InceptionSpec(160, 144, 288, 32, 64, "l2", 128)),
    ("4e", InceptionSpec(0, 160, 256, 64, 128, "max", 0, stride=2)),
    ("5a", InceptionSpec(384, 192, 384, 48, 128, "l2", 128)),
    ("5b", InceptionSpec(384, 192, 384, 48, 128, "max", 128)),
)

NN4_NO_5X5 = ("4e", "5a", "5b")


def inception_stem(inputs, normalization, conv1_filters=64, conv2_reduce=64, conv2_filters=192):
    """conv1 7x7/2, max pool + norm, inception (2), norm + max pool. [N,H,W,3] -> [N,H/8,W/8,192]."""
    n = normalization
    x = conv_unit(inputs, conv1_filters, 7, 2, n, "conv1")
    x = pool(x, "max", 3, 2, name="pool1")
    x = rnorm(x, n, "norm1")
    x = conv_unit(x, conv2_reduce, 1, 1, n, "inception_2_reduce")
    x = conv_unit(x, conv2_filters, 3, 1, n, "inception_2")
    x = rnorm(x, n, "norm2")
    return pool(x, "max", 3, 2, name="pool2")


def build_inception(modules, embedding_size, image_size, normalization, name,
                    sync_batch_norm=False):
    """Stem + the given (name, InceptionSpec) modules + global avg pool + fc + L2.
    ``sync_batch_norm``: batch-norm statistics over every replica (models/blocks.py)."""
    normalization = block_normalization(normalization, sync_batch_norm)
    inputs = model_input(image_size)
    x = inception_stem(inputs, normalization)
    for module_name, spec in modules:
        x = inception_module(x, spec, normalization, f"inception_{module_name}")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = embedding_head(x, embedding_size)
    return keras.Model(inputs, outputs, name=name)


def build_nn2(embedding_size=128, image_size=(224, 224), normalization="batch", name="nn2",
              sync_batch_norm=False):
    """NN2 of Table 2. Input [N, H, W, 3] preprocessed RGB; output [N, embedding_size], unit rows."""
    return build_inception(NN2_MODULES, embedding_size, image_size, normalization, name,
                           sync_batch_norm)


def build_nn3(embedding_size=128, image_size=(160, 160), normalization="batch", name="nn3",
              sync_batch_norm=False):
    """NN3: NN2's architecture at 160x160 (Section 3.3)."""
    return build_inception(NN2_MODULES, embedding_size, image_size, normalization, name,
                           sync_batch_norm)


def build_nn4(embedding_size=128, image_size=(96, 96), normalization="batch", name="nn4",
              sync_batch_norm=False):
    """NN4: NN2 at 96x96 without 5x5 convolutions in 4e, 5a and 5b (Section 3.3)."""
    modules = tuple((m, s.without_5x5() if m in NN4_NO_5X5 else s) for m, s in NN2_MODULES)
    return build_inception(modules, embedding_size, image_size, normalization, name,
                           sync_batch_norm)
