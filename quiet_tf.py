"""Import TensorFlow without its start-up noise, for command-line entry points.

TF 2.21 logs oneDNN/CPU-feature lines through absl before its log level is read, so
``TF_CPP_MIN_LOG_LEVEL`` alone does not silence them. ``import_tensorflow()`` sets the usual
variables and silences file descriptor 2 only while the shared libraries load; errors raised by the
import itself still propagate, and stderr is restored before anything else runs.
Set ``FACENET_VERBOSE_TF=1`` to see everything.
"""
import logging
import os
import sys

_LIBRARIES = ("tensorflow", "keras", "tf_keras")


class _LibraryInfoFilter(logging.Filter):
    """Drops INFO and DEBUG records logged by TensorFlow's or Keras' own modules through absl
    (e.g. "Sharding callback duration" on every checkpoint save, SavedModel signature renames);
    warnings and errors, and every record of this project, pass."""

    def filter(self, record):
        if record.levelno >= logging.WARNING:
            return True
        path = os.path.normpath(record.pathname or "")
        return not any(f"{os.sep}{packages}{os.sep}{lib}{os.sep}" in path
                       for packages in ("site-packages", "dist-packages") for lib in _LIBRARIES)


def _quiet_library_info():
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
        handler.addFilter(_LibraryInfoFilter())


def import_tensorflow(before_first_op=None):
    """Import and return ``tensorflow`` quietly (idempotent).

    ``before_first_op(tf)``, when given, runs right after the import and before the first kernel
    (which initialises the devices): the place for ``tf.config`` device set-up.
    """
    if "tensorflow" in sys.modules:
        _quiet_library_info()
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
    _quiet_library_info()
    return tf
