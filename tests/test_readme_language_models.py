"""The README's language-model example runs as written."""

import re
from pathlib import Path

import pytest

pytest.importorskip("keras_hub")


def test_readme_language_model_example_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text("utf-8")
    start = readme.index("## Language models")
    end = readme.find("\n## ", start + 1)
    online, offline = re.findall(
        r"```python\n(.*?)```", readme[start:end], re.S
    )
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(online, namespace)
    history = namespace["history"].history
    assert set(history) == {"loss", "student_loss", "distillation_loss"}
    assert (tmp_path / "student_lm.keras").exists()
    exec(offline, namespace)
    history = namespace["offline"].history.history
    assert set(history) == {"loss", "student_loss", "distillation_loss"}
    assert (tmp_path / "lm_cache" / "causal_lm_top_k.json").exists()
