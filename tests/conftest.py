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
# Tests compare float32 results with float64 references. On NVIDIA GPUs
# JAX (and TensorFlow) run float32 matrix products in TF32 by default, which
# keeps 10 mantissa bits; the suite asks for full float32 products.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
# torch.compile is on by default on CUDA, and one compilation takes tens
# of seconds: the suite's hundreds of configurations run eagerly there
# too. tests/ops/test_torch_compile.py turns it on where it checks it.
os.environ.setdefault("KERAS_KD_TORCH_COMPILE", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _cases_keras import x64  # noqa: E402

BACKEND = keras.backend.backend()

if BACKEND == "torch":
    # Full float32 products and convolutions on GPUs (see above).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # The suite's models are tiny: a second intra-op thread only adds
    # synchronisation, which costs up to 25x on a loaded 2-core machine.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_session():
    # free_memory=False skips a gc.collect() that costs ~0.5 s per test.
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture(name="x64")
def _x64():
    """Runs a test with float64 available on this backend."""
    with x64():
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)
