"""Shared pytest set-up: quiet TensorFlow, fixed seeds, and the shared-data fixtures."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


#: The repository root (what the CLI subprocesses run in and import from).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra):
    """The environment for a CLI run in a subprocess: this process's, with TensorFlow quiet, the
    repository importable (PYTHONPATH), and ``extra`` variables (values turned into strings)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def gaussian_clusters(num_ids, per_id, dim=16, spread=0.01, seed=0):
    """Unit embeddings [num_ids * per_id, dim] around random unit centres, and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(num_ids), per_id)
    emb = centres[labels] + spread * rng.normal(size=(labels.size, dim))
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), labels


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
