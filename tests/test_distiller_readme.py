"""The README's Distiller section runs as written."""

import re
from pathlib import Path

import keras


def test_readme_distiller_examples_run(tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text("utf-8")
    start = readme.index("## Distiller")
    end = readme.find("\n## ", start + 1)
    section = readme[start : end if end > 0 else None]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        exec(block, namespace)
    history = namespace["history"].history
    assert {"loss", "student_loss", "distillation_loss"} <= set(history)
    assert "val_sparse_categorical_accuracy" in history
    assert isinstance(keras.models.load_model("student.keras"), keras.Model)
    assert (tmp_path / "distill.csv").read_text().count("\n") == 4
    pure = namespace["pure"].history.history
    assert set(pure) == {"loss", "distillation_loss"}
    assert "distillation_loss" in namespace["first_head"].history.history
