"""The README's advanced-distillation examples run as written."""

import re
from pathlib import Path


def _python_blocks(readme, heading):
    start = readme.index(heading)
    end = readme.find("\n## ", start + 1)
    section = readme[start : end if end > 0 else None]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_advanced_examples_run(tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text("utf-8")
    setup = _python_blocks(readme, "## Distiller")[0]
    blocks = _python_blocks(readme, "## Advanced distillation")
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    namespace = {}
    # fewer rows and epochs: the examples only need to run
    setup = setup.replace("512", "128").replace("epochs=3", "epochs=1")
    setup = setup.replace("validation_split=0.25, ", "")
    exec(setup, namespace)
    for block in blocks:
        exec(block, namespace)
    assert "feature_loss" in namespace["hinted"].history.history
    assert int(namespace["dkd"].step.numpy()) > 0
    assert set(namespace["cache"]) == {
        "teacher_top_k_values",
        "teacher_top_k_indices",
    }
