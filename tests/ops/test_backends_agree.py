"""The fixed cases of `_cases.backend_results` agree across backends.

Each other installed backend runs `_cases.py` in its own interpreter (the
backend is fixed at import time); the results are compared with the
current backend's. The subprocesses cost several seconds of imports, so the
test runs once per suite: only under the first installed backend.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import _cases
import keras
import numpy as np
import pytest

INSTALLED = [
    b for b in ("tensorflow", "torch", "jax") if importlib.util.find_spec(b)
]
CURRENT = keras.backend.backend()

pytestmark = pytest.mark.skipif(
    not INSTALLED or CURRENT != INSTALLED[0],
    reason="runs once per suite, under the first installed backend",
)


def test_backends_agree(tmp_path):
    script = Path(_cases.__file__)
    running = {}
    for backend in INSTALLED:
        if backend == CURRENT:
            continue
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        out = tmp_path / f"{backend}.npz"
        command = [sys.executable, str(script), str(out)]
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        running[backend] = (process, out)
    results = {CURRENT: _cases.backend_results()}
    for backend, (process, out) in running.items():
        try:
            _, err = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        assert process.returncode == 0, err.decode()[-3000:]
        with np.load(out) as data:
            results[backend] = {key: data[key] for key in data.files}
    if len(results) < 2:
        pytest.skip("only one backend is installed")

    reference = results[CURRENT]
    assert len(reference) > 100
    for backend, values in results.items():
        assert values.keys() == reference.keys(), backend
        for key, expected in reference.items():
            assert not np.isnan(values[key]).any(), (backend, key)
            # The fast path is exact to its documented bound (an absolute
            # 1e-5 T**2 (1 + E|log P| + E|log Q|)), computed differently
            # on torch (blocked row sums) than under XLA; the precise path and
            # everything else to 1e-6.
            tolerance = 1e-5 if key.endswith("_fast") else 1e-6
            np.testing.assert_allclose(
                values[key],
                expected,
                rtol=tolerance,
                atol=tolerance,
                err_msg=f"{backend} vs {CURRENT}: {key}",
            )
