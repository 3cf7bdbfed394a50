"""Import TensorFlow without its C++ start-up banner (for command-line tools).

TF 2.21 prints "oneDNN custom operations are on ..." through absl before its logging is configured,
ignoring ``TF_CPP_MIN_LOG_LEVEL``. :func:`import_tensorflow_quietly` sets ``TF_CPP_MIN_LOG_LEVEL=2``
(unless already set) and silences file descriptor 2 only while TensorFlow is being imported and
initialised; later errors and warnings reach stderr as usual.
"""
import os
import sys


def import_tensorflow_quietly():
    """Import and return ``tensorflow`` with start-up noise suppressed."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow as tf

            tf.constant(0.0) + 1.0  # the banner is printed when the first kernel runs
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
    return tf
