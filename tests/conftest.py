"""Shared pytest set-up: quiet TensorFlow, fixed seeds, and the shared-data fixtures."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture
def shared_data_dir():
    """Path of ../shared/data from $FACENET_SHARED_DATA; the test is skipped when it is unset."""
    path = os.environ.get("FACENET_SHARED_DATA")
    if not path:
        pytest.skip("FACENET_SHARED_DATA is not set")
    if not os.path.isdir(path):
        pytest.skip(f"FACENET_SHARED_DATA={path} is not a directory")
    return path


@pytest.fixture
def tfa_oracle_path():
    """Path of tfa's golden triplet-loss outputs from $FACENET_TFA_ORACLE; skipped when unset."""
    path = os.environ.get("FACENET_TFA_ORACLE")
    if not path:
        pytest.skip("FACENET_TFA_ORACLE is not set")
    if not os.path.isfile(path):
        pytest.skip(f"FACENET_TFA_ORACLE={path} is not a file")
    return path
