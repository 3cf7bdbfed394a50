"""The single preprocessing definition shared by training, evaluation and the exported model.

Input: RGB images with values in 0..255 (any real dtype), shape [..., H, W, 3].
Output: float32 in roughly [-1, 1], as ``(x - 127.5) / 128`` (the convention of
davidsandberg/facenet's "fixed image standardization").
"""
import tensorflow as tf

PREPROCESS_NAME = "fixed_standardization"
PREPROCESS_MEAN = 127.5
PREPROCESS_SCALE = 1.0 / 128.0


def preprocess(images):
    """Map RGB 0..255 images, [..., H, W, 3], to model input, float32 [..., H, W, 3]."""
    images = tf.cast(images, tf.float32)
    return (images - PREPROCESS_MEAN) * PREPROCESS_SCALE


def preprocess_numpy(images):
    """NumPy twin of :func:`preprocess` for code paths outside TensorFlow."""
    import numpy as np

    return (np.asarray(images, dtype=np.float32) - PREPROCESS_MEAN) * PREPROCESS_SCALE
