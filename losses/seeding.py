"""Seeds for the losses that draw at random (paper semi-hard window, distance-weighted sampling).

A draw takes `seed`: None for a fresh (stateful) draw, or an int / int tensor [2] for a
reproducible stateless one (`stateless_seed`). A Keras loss or layer given an int seed keeps a
`seed_generator(seed)` and passes `next_seed(generator)` to each call, so successive batches draw
afresh and the whole sequence is reproducible from the int.
"""
import keras
import tensorflow as tf


def stateless_seed(seed):
    """A stateless-op seed, int64 [2], from an int or an int tensor of shape [] or [2] (for
    example `keras.random.SeedGenerator.next()`)."""
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        raise TypeError(f"seed must be an integer or an integer tensor, got {seed.dtype}.")
    seed = tf.cast(seed, tf.int64)
    if seed.shape.rank == 0:
        seed = tf.stack([seed, tf.constant(0, tf.int64)])
    return tf.reshape(seed, [2])


def seed_generator(seed):
    """A `keras.random.SeedGenerator(seed)` for a loss that draws at every call, or None.

    Each call then passes `next_seed(generator)` to a stateless draw: successive batches get fresh
    samples and the whole sequence is reproducible from the int `seed`; None means fresh
    (stateful) draws. Keep the generator as an attribute of the loss or layer, so Keras tracks it.
    """
    return None if seed is None else keras.random.SeedGenerator(int(seed))


def next_seed(generator):
    """The next stateless seed of a `seed_generator` (int tensor [2]), or None for None."""
    return None if generator is None else generator.next()
