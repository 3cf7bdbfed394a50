"""NNS1, NNS2 (the paper's small "mobile" Inception networks) and ``tiny`` (not in the paper).

The paper (Section 3.3, Fig. 4) gives only their budgets: NNS1 has 26M parameters and 220M
multiply-adds at 165x165, NNS2 4.3M parameters and 20M multiply-adds at 140x116. It publishes no
layer tables, so the two designs below are ours, "in the paper's spirit": the NN2 Inception layout
(Table 2) thinned out, with the parameters concentrated in NN1-style maxout fully connected layers
(Table 1), which is how a small-FLOP network reaches a large parameter count.

NNS1 (165x165; sizes at that input)::

    NN2's stem at quarter width (conv1 7x7/2 16; inception (2) 1x1 16 -> 3x3 48) and
    modules 3a-5b at half width (every conv and projection width / 2),
    grid 83 -> 42 -> 21 -> 11 -> 6, ending in 6x6x512
    avg pool 2x2/2 -> 3x3x512 -> flatten 4608
    fc1 Dense 4096 + maxout p=2 -> 2048; fc2 Dense 2048 + maxout p=2 -> 1024
    fc 128 -> L2 normalisation                      (~25M params, ~223M multiply-adds)

NNS2 (140x116)::

    conv1 3x3/2, 16 -> 70x58; max pool 3x3/2 -> 35x29
    inception (2): 1x1 16 -> 3x3 48; max pool 3x3/2 -> 18x15
    modules 3a, 3c, 4a, 4e, 5a of NN2 at 1/6 width (grid 18x15 -> 9x8 -> 5x4), ending in 5x4x170
    flatten 3400 -> fc1 Dense 1200 + maxout p=2 -> 600 -> fc 128 -> L2
                                                    (~4.4M params, ~18M multiply-adds)

tiny (64x64, **not in the paper**): the CPU quick-start network for the default ``train.py`` run.
Plain VGG-style conv + BN + ReLU with global average pooling and a 128-d dense head::

    conv 5x5/2, 32 -> 32x32; max pool 2x2 -> 16x16
    conv 3x3, 64; conv 3x3, 64; max pool -> 8x8
    conv 3x3, 128; conv 3x3, 128; max pool -> 4x4
    conv 3x3, 256; global avg pool; fc 128 -> L2     (~0.6M params, ~35M multiply-adds)

It always uses batch norm in its convs (there is no paper "norm" to reproduce); with
``normalization="lrn"`` it drops BN and puts LRN after the first two pooling stages.
"""
import keras

from models.blocks import (InceptionSpec, block_normalization, conv_unit, embedding_head,
                           inception_module, maxout_fc, model_input, pool, rnorm)
from models.inception import NN2_MODULES, inception_stem


def _scaled(spec: InceptionSpec, factor):
    """``spec`` with every width multiplied by ``factor`` (zero stays zero, at least 4 channels)."""
    def s(c):
        return 0 if c == 0 else max(4, int(round(c * factor)))

    return InceptionSpec(s(spec.n1x1), s(spec.n3x3_reduce), s(spec.n3x3), s(spec.n5x5_reduce),
                         s(spec.n5x5), spec.pool, s(spec.proj), spec.stride, spec.pool_size)


def build_nns1(embedding_size=128, image_size=(165, 165), normalization="batch", name="nns1",
               sync_batch_norm=False):
    """NNS1 (our design, see module docstring). Output [N, embedding_size], unit rows.
    ``sync_batch_norm``: batch-norm statistics over every replica (models/blocks.py)."""
    normalization = block_normalization(normalization, sync_batch_norm)
    inputs = model_input(image_size)
    x = inception_stem(inputs, normalization, conv1_filters=16, conv2_reduce=16, conv2_filters=48)
    for module_name, spec in NN2_MODULES:
        x = inception_module(x, _scaled(spec, 0.5), normalization, f"inception_{module_name}")
    x = keras.layers.AveragePooling2D(2, strides=2, padding="same", name="avg_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = maxout_fc(x, 2048, "fc1")
    x = maxout_fc(x, 1024, "fc2")
    outputs = embedding_head(x, embedding_size)
    return keras.Model(inputs, outputs, name=name)


NNS2_MODULES = ("3a", "3c", "4a", "4e", "5a")
NNS2_WIDTH = 1 / 6
NNS2_FC_UNITS = 600


def build_nns2(embedding_size=128, image_size=(140, 116), normalization="batch", name="nns2",
               sync_batch_norm=False):
    """NNS2 (our design, see module docstring). Output [N, embedding_size], unit rows.
    ``sync_batch_norm``: batch-norm statistics over every replica (models/blocks.py)."""
    n = block_normalization(normalization, sync_batch_norm)
    inputs = model_input(image_size)
    x = conv_unit(inputs, 16, 3, 2, n, "conv1")
    x = pool(x, "max", 3, 2, name="pool1")
    x = rnorm(x, n, "norm1")
    x = conv_unit(x, 16, 1, 1, n, "inception_2_reduce")
    x = conv_unit(x, 48, 3, 1, n, "inception_2")
    x = rnorm(x, n, "norm2")
    x = pool(x, "max", 3, 2, name="pool2")
    specs = dict(NN2_MODULES)
    for module_name in NNS2_MODULES:
        spec = _scaled(specs[module_name], NNS2_WIDTH)
        x = inception_module(x, spec, n, f"inception_{module_name}")
    x = keras.layers.Flatten(name="flatten")(x)
    x = maxout_fc(x, NNS2_FC_UNITS, "fc1")
    outputs = embedding_head(x, embedding_size)
    return keras.Model(inputs, outputs, name=name)


def build_tiny(embedding_size=128, image_size=(64, 64), normalization="batch", name="tiny",
               sync_batch_norm=False):
    """tiny: the CPU quick-start network (not in the paper). Output [N, embedding_size], unit rows.
    ``sync_batch_norm``: batch-norm statistics over every replica (models/blocks.py)."""
    n = block_normalization(normalization, sync_batch_norm)
    inputs = model_input(image_size)
    x = conv_unit(inputs, 32, 5, 2, n, "conv1")
    x = keras.layers.MaxPooling2D(2, padding="same", name="pool1")(x)
    x = rnorm(x, n, "norm1")
    x = conv_unit(x, 64, 3, 1, n, "conv2a")
    x = conv_unit(x, 64, 3, 1, n, "conv2b")
    x = keras.layers.MaxPooling2D(2, padding="same", name="pool2")(x)
    x = rnorm(x, n, "norm2")
    x = conv_unit(x, 128, 3, 1, n, "conv3a")
    x = conv_unit(x, 128, 3, 1, n, "conv3b")
    x = keras.layers.MaxPooling2D(2, padding="same", name="pool3")(x)
    x = conv_unit(x, 256, 3, 1, n, "conv4")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = embedding_head(x, embedding_size)
    return keras.Model(inputs, outputs, name=name)
