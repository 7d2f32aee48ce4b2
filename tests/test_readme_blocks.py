"""README code blocks that no section test runs: the PyTorch comparison
and the GlobalPointer model. Each runs as written, after the blocks it
continues."""

import re
from pathlib import Path

import keras
import numpy as np
import pytest

README = (Path(__file__).parents[1] / "README.md").read_text("utf-8")


def _blocks(heading):
    start = README.index(heading)
    end = README.find("\n## ", start + 1)
    section = README[start : end if end > 0 else None]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_from_pytorch_block_gives_the_same_number():
    pytest.importorskip("torch")
    losses_blocks = _blocks("## Losses")
    (comparison,) = [b for b in losses_blocks if "F.kl_div" in b]
    namespace = {}
    exec(losses_blocks[0], namespace)
    lines = comparison.strip().splitlines()
    # The last two lines are the two expressions to compare.
    exec("\n".join(lines[:-2]), namespace)
    theirs = eval(lines[-2], namespace)
    ours = eval(lines[-1].split("#")[0], namespace)
    # On a GPU machine the torch backend's result lives on the GPU.
    value = float(keras.ops.convert_to_numpy(ours))
    assert abs(float(theirs) - value) < 1e-6
    assert abs(value - 0.008507) < 1e-6


def test_global_pointer_block_builds_and_compiles():
    (block,) = _blocks("### GlobalPointer")
    namespace = {}
    exec("import keras\nimport keras_kd\n" + block, namespace)
    model = namespace["model"]
    tokens = np.array([[5, 7, 9, 0]], "int32")
    logits = np.asarray(model.predict(tokens, verbose=0))
    assert logits.shape == (1, 4, 4, 4)
    assert np.isneginf(logits[0, :, 3, :]).all()  # padding spans are -inf
