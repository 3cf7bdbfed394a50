"""Shared pytest set-up: quiet TensorFlow and the shared-data fixtures (plain helper functions are
in tests/helpers.py)."""
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


@pytest.fixture
def shared_data_dir():
    """Path of ../shared/data from $FACENET_SHARED_DATA; the test is skipped when it is unset."""
    return _path_from_env("FACENET_SHARED_DATA", os.path.isdir)


@pytest.fixture
def tfa_oracle_path():
    """Path of tfa's golden triplet-loss outputs from $FACENET_TFA_ORACLE; skipped when unset."""
    return _path_from_env("FACENET_TFA_ORACLE", os.path.isfile)
