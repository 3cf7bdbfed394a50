"""NN1: the Zeiler&Fergus-style network of FaceNet Table 1 (220x220 input, 140M params, 1.6B madds).

Layer by layer (SAME padding; sizes at 220x220):

    conv1   7x7/2, 64      -> 110x110x64      pool1  3x3/2 -> 55x55x64     rnorm1
    conv2a  1x1, 64        -> 55x55x64        conv2  3x3, 192 -> 55x55x192 rnorm2
    pool2   3x3/2          -> 28x28x192
    conv3a  1x1, 192       conv3  3x3, 384    -> 28x28x384     pool3 3x3/2 -> 14x14x384
    conv4a  1x1, 384       conv4  3x3, 256    -> 14x14x256
    conv5a  1x1, 256       conv5  3x3, 256
    conv6a  1x1, 256       conv6  3x3, 256    pool4 3x3/2 -> 7x7x256
    fc1     maxout p=2 -> 32x128 (4096)       fc2  maxout p=2 -> 4096
    fc7128  -> 128                            L2 normalisation

"rnorm" is LRN with ``normalization="lrn"``; with the default batch norm every conv is
conv -> BN -> ReLU and the rnorm layers are omitted. The fully connected layers are Dense(8192)
followed by :class:`~models.layers.Maxout` with 4096 units (pairs of 2), as in the table.
"""
import keras

from models.blocks import (block_normalization, conv_unit, embedding_head, maxout_fc, model_input,
                           pool, rnorm)

FC_UNITS = 32 * 128  # Table 1: "1x32x128"
MAXOUT_PIECES = 2


def build_nn1(embedding_size=128, image_size=(220, 220), normalization="batch", name="nn1",
              sync_batch_norm=False):
    """NN1 of Table 1. Input [N, H, W, 3] preprocessed RGB; output [N, embedding_size], unit rows.
    ``sync_batch_norm``: batch-norm statistics over every replica (models/blocks.py)."""
    n = block_normalization(normalization, sync_batch_norm)
    inputs = model_input(image_size)
    x = conv_unit(inputs, 64, 7, 2, n, "conv1")
    x = pool(x, "max", 3, 2, name="pool1")
    x = rnorm(x, n, "rnorm1")
    x = conv_unit(x, 64, 1, 1, n, "conv2a")
    x = conv_unit(x, 192, 3, 1, n, "conv2")
    x = rnorm(x, n, "rnorm2")
    x = pool(x, "max", 3, 2, name="pool2")
    x = conv_unit(x, 192, 1, 1, n, "conv3a")
    x = conv_unit(x, 384, 3, 1, n, "conv3")
    x = pool(x, "max", 3, 2, name="pool3")
    x = conv_unit(x, 384, 1, 1, n, "conv4a")
    x = conv_unit(x, 256, 3, 1, n, "conv4")
    x = conv_unit(x, 256, 1, 1, n, "conv5a")
    x = conv_unit(x, 256, 3, 1, n, "conv5")
    x = conv_unit(x, 256, 1, 1, n, "conv6a")
    x = conv_unit(x, 256, 3, 1, n, "conv6")
    x = pool(x, "max", 3, 2, name="pool4")
    x = keras.layers.Flatten(name="flatten")(x)
    x = maxout_fc(x, FC_UNITS, "fc1", MAXOUT_PIECES)
    x = maxout_fc(x, FC_UNITS, "fc2", MAXOUT_PIECES)
    outputs = embedding_head(x, embedding_size, name_prefix="fc7128_")
    return keras.Model(inputs, outputs, name=name)
