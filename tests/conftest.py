"""Shared pytest set-up: quiet TensorFlow, the absl logger's level kept per test, and the
shared-data fixtures (plain helper functions are in tests/helpers.py)."""
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


def _path_from_env(variable, check):
    """The path in $variable; the test is skipped when it is unset or not there."""
    path = os.environ.get(variable)
    if not path:
        pytest.skip(f"{variable} is not set")
    if not check(path):
        pytest.skip(f"{variable}={path} does not exist")
    return path


@pytest.fixture(autouse=True)
def _absl_logger_level():
    """Parsing absl flags (train.py's, evaluate.py's) sets the ``absl`` logger's level from
    --verbosity; put it back after every test, so that a later test's log capture does not
    depend on which tests ran before it in the same process (pytest -n runs files in any order)."""
    logger = logging.getLogger("absl")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.fixture
def shared_data_dir():
    """Path of ../shared/data from $FACENET_SHARED_DATA; the test is skipped when it is unset."""
    return _path_from_env("FACENET_SHARED_DATA", os.path.isdir)


@pytest.fixture
def tfa_oracle_path():
    """Path of tfa's golden triplet-loss outputs from $FACENET_TFA_ORACLE; skipped when unset."""
    return _path_from_env("FACENET_TFA_ORACLE", os.path.isfile)
