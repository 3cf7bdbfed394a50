"""quiet_tf: TensorFlow's own INFO chatter is dropped from absl's handler; ours and warnings pass."""
import logging

from absl import logging as absl_logging

import quiet_tf

SITE = "/venv/lib/python3.11/site-packages"


def _record(pathname, level=logging.INFO):
    return logging.LogRecord("absl", level, pathname, 1, "message", None, None)


def test_filter_drops_library_info_and_keeps_the_rest():
    f = quiet_tf._LibraryInfoFilter()
    assert not f.filter(_record(f"{SITE}/tensorflow/python/checkpoint/functional_saver.py"))
    assert not f.filter(_record(f"{SITE}/keras/src/saving/saving_lib.py", logging.DEBUG))
    assert f.filter(_record(f"{SITE}/tensorflow/python/saved_model/save.py", logging.WARNING))
    assert f.filter(_record("/work/main/train.py"))
    assert f.filter(_record("/home/me/tensorflow/facenet/train.py"))  # a checkout named so
    assert f.filter(_record(f"{SITE}/absl/app.py"))


def test_import_installs_the_filter_once():
    quiet_tf.import_tensorflow()
    quiet_tf.import_tensorflow()
    handler = absl_logging.get_absl_handler()
    assert sum(isinstance(f, quiet_tf._LibraryInfoFilter) for f in handler.filters) == 1
