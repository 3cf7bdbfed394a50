"""Import TensorFlow without its start-up noise, for command-line entry points.

TF 2.21 logs oneDNN/CPU-feature lines through absl before its log level is read, so
``TF_CPP_MIN_LOG_LEVEL`` alone does not silence them. ``import_tensorflow()`` sets the usual
variables and silences file descriptor 2 only while the shared libraries load; errors raised by the
import itself still propagate, and stderr is restored before anything else runs.
Set ``FACENET_VERBOSE_TF=1`` to see everything.
"""
import os
import sys


def import_tensorflow(before_first_op=None):
    """Import and return ``tensorflow`` quietly (idempotent).

    ``before_first_op(tf)``, when given, runs right after the import and before the first kernel
    (which initialises the devices): the place for ``tf.config`` device set-up.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ.get("FACENET_VERBOSE_TF"):
        import tensorflow as tf

        if before_first_op is not None:
            before_first_op(tf)
        return tf
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf

        if before_first_op is not None:
            before_first_op(tf)
        tf.constant(0.0) + 1.0  # the oneDNN banner is printed when the first kernel runs
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    tf.get_logger().setLevel("WARNING")  # e.g. the checkpoint saver's per-save INFO lines
    return tf
