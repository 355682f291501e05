"""Settle the Keras backend before any test imports Keras.

Keras fixes its backend per process, so the suite runs once per backend:
``KERAS_BACKEND=torch pytest`` and ``KERAS_BACKEND=jax pytest``.
"""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

sys.path.insert(0, str(REPO))

from common import backend  # noqa: E402

BACKEND = backend.select_backend().name


@pytest.fixture(scope="session")
def shared_dir():
    """The real data beside the repository: MNIST, VGG16 weights, photos.

    A clone without it skips the tests that need it; CI must have it.
    """
    if not SHARED.is_dir():
        message = f"the real test data is missing: expected the folder {SHARED}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SHARED


@pytest.fixture(scope="session")
def backend_name():
    return BACKEND
