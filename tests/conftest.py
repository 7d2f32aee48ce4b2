"""Test set-up shared by the whole suite.

The backend comes from KERAS_BACKEND only; the same suite runs once per
backend (`make test`).
"""

import importlib.util
import os

# torch must be imported before TensorFlow when both are installed: the
# other order can crash at import time on some builds.
if importlib.util.find_spec("torch") is not None:
    import torch

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()

if BACKEND == "torch":
    # The suite's models are tiny: a second intra-op thread only adds
    # synchronisation, which costs up to 25x on a loaded 2-core machine.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_session():
    # free_memory=False skips a gc.collect() that costs ~0.5 s per test.
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(1234)
    yield


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
