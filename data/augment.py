"""Training-time image augmentation, stateless: the same seed gives the same pixels.

Every function takes one image, float32 [h, w, 3] with values in 0..255, and a seed, int32/int64
[2] (as ``tf.random.stateless_*`` ops expect), and works in graph mode inside ``tf.data``. Because
randomness comes only from the seed, batches are reproducible regardless of parallelism.

FaceNet (Section 4) trains on tight face crops and does not list its augmentation; we use the usual
choice of davidsandberg/facenet and OpenFace: a random crop (here of random scale), resized back to
the network input size, a horizontal flip, and optionally mild brightness/contrast jitter.
"""
import tensorflow as tf


def resize(image, image_size):
    """Bilinear (anti-aliased when shrinking) resize to ``image_size`` = (H, W); float32 [H, W, 3]."""
    image = tf.image.resize(tf.cast(image, tf.float32), image_size, method="bilinear",
                            antialias=True)
    return tf.ensure_shape(image, [image_size[0], image_size[1], 3])


def _split_seed(seed, num):
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num)


def random_crop_resize(image, image_size, seed, min_fraction=0.875):
    """Crops a random window and resizes it to ``image_size``.

    The window keeps the image's aspect ratio; its side is ``s`` times the image side with ``s``
    uniform in [min_fraction, 1] (so the un-cropped image, as seen at evaluation, is in the training
    distribution), at a uniformly random position.

    Args:
      image: float32 [h, w, 3], 0..255.
      image_size: (H, W) of the output, pixels.
      seed: int [2].
      min_fraction: smallest crop side as a fraction of the image side, in (0, 1].
    Returns:
      float32 [H, W, 3], 0..255.
    """
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"crop fraction must be in (0, 1], got {min_fraction}")
    if min_fraction == 1.0:
        return resize(image, image_size)
    s_seed, y_seed, x_seed = tf.unstack(_split_seed(seed, 3))
    shape = tf.shape(image)
    h = tf.cast(shape[0], tf.float32)
    w = tf.cast(shape[1], tf.float32)
    scale = tf.random.stateless_uniform([], s_seed, minval=min_fraction, maxval=1.0)
    ch = tf.clip_by_value(tf.cast(tf.round(h * scale), tf.int32), 1, shape[0])
    cw = tf.clip_by_value(tf.cast(tf.round(w * scale), tf.int32), 1, shape[1])
    y0 = tf.random.stateless_uniform([], y_seed, minval=0, maxval=shape[0] - ch + 1, dtype=tf.int32)
    x0 = tf.random.stateless_uniform([], x_seed, minval=0, maxval=shape[1] - cw + 1, dtype=tf.int32)
    crop = image[y0:y0 + ch, x0:x0 + cw, :]
    return resize(crop, image_size)


def random_flip(image, seed):
    """Left-right flip with probability 1/2. float32 [H, W, 3] -> same."""
    return tf.image.stateless_random_flip_left_right(image, seed)


def random_photometric(image, seed, max_brightness_delta=20.0, contrast_range=(0.8, 1.2)):
    """Brightness shift (uniform in +-max_brightness_delta grey levels) and contrast scaling
    (uniform factor in contrast_range, about the per-image mean), then clipped to 0..255."""
    b_seed, c_seed = tf.unstack(_split_seed(seed, 2))
    image = tf.image.stateless_random_brightness(image, max_brightness_delta, b_seed)
    image = tf.image.stateless_random_contrast(image, contrast_range[0], contrast_range[1], c_seed)
    return tf.clip_by_value(image, 0.0, 255.0)


def augment_image(image, image_size, seed, crop_fraction=0.875, flip=True, photometric=False):
    """The training augmentation: random crop+resize, flip, optional photometric jitter.

    Args:
      image: decoded image, [h, w, 3], any real dtype, values 0..255.
      image_size: (H, W) output size in pixels.
      seed: int [2].
      crop_fraction: smallest crop side fraction (1.0 = no crop, only resize).
      flip: random horizontal flip.
      photometric: random brightness/contrast.
    Returns:
      float32 [H, W, 3], values 0..255 (not yet preprocessed).
    """
    crop_seed, flip_seed, photo_seed = tf.unstack(_split_seed(seed, 3))
    image = random_crop_resize(tf.cast(image, tf.float32), image_size, crop_seed, crop_fraction)
    if flip:
        image = random_flip(image, flip_seed)
    if photometric:
        image = random_photometric(image, photo_seed)
    return tf.clip_by_value(image, 0.0, 255.0)
