"""Models saved by an earlier keras-kd reload and predict identically.

`tests/fixtures/` holds `.keras` files of every saveable distiller, the
R-Drop model, a GlobalPointer model with its compiled losses and metrics,
and a `CausalLMDistiller` student, written by `fixtures/make_fixtures.py`
with TensorFlow, together with the inputs they were given and the outputs
they gave. Reloading them checks that the registered names (and the
objects behind them) survive any reorganization of keras-kd's modules, and
that the files load on every backend.
"""

import json
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_kd

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.keras"))

# The class each file must come back as, and its distillation loss's.
EXPECTED = {
    "distiller": ("Distiller", "KLDivergence"),
    "reverse_kl_distiller": ("Distiller", "ReverseKLDivergence"),
    "dkd_distiller": ("DKDDistiller", "DecoupledKD"),
    "multi_teacher_distiller": (
        "MultiTeacherDistiller",
        "SymmetricKLDivergence",
    ),
    "feature_distiller": ("FeatureDistiller", "JensenShannonDivergence"),
    "offline_distiller": ("OfflineDistiller", "KLDivergence"),
    "rdrop": ("RDrop", None),
    "global_pointer": ("Functional", None),
    "causal_lm_student": ("LlamaCausalLM", None),
}


def _unflatten(arrays, name):
    if name in arrays:
        return arrays[name]
    prefix = name + "/"
    found = {
        k[len(prefix) :]: arrays[k] for k in arrays if k.startswith(prefix)
    }
    return found or None


def _registered_names(path):
    """Every `registered_name` in a saved file's config."""
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    names = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("registered_name"), str):
                names.add(node["registered_name"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return names


def test_every_fixture_is_checked():
    assert set(NAMES) == set(EXPECTED)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_reloads_and_predicts_identically(name):
    if name == "causal_lm_student":
        pytest.importorskip("keras_hub")
    path = FIXTURES / f"{name}.keras"
    # Names keras-kd registered when the file was written resolve today.
    public = (keras_kd, keras_kd.losses, keras_kd.layers, keras_kd.metrics)
    for registered in _registered_names(path):
        if registered.startswith("keras_kd>"):
            found = keras.saving.get_registered_object(registered)
            short = registered.split(">")[1]
            exported = [getattr(m, short, None) for m in public]
            assert any(found is e for e in exported if e), registered
    model = keras.models.load_model(path)
    class_name, loss_name = EXPECTED[name]
    assert type(model).__name__ == class_name
    if loss_name is not None:
        assert type(model.distillation_loss).__name__ == loss_name
        assert type(model.distillation_loss) is getattr(
            keras_kd.losses, loss_name
        )
    arrays = dict(np.load(FIXTURES / f"{name}.npz"))
    x = _unflatten(arrays, "x")
    predictions = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(
        predictions, arrays["predictions"], rtol=1e-5, atol=1e-6
    )
    if "y" not in arrays:
        return
    assert model.compiled
    eval_x = _unflatten(arrays, "eval_x")
    logs = model.evaluate(
        x if eval_x is None else eval_x,
        arrays["y"],
        batch_size=len(arrays["y"]),
        verbose=0,
        return_dict=True,
    )
    expected = {
        k.split("/", 1)[1]: float(v)
        for k, v in arrays.items()
        if k.startswith("eval/")
    }
    assert set(logs) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(logs[key], value, rtol=1e-5, atol=1e-6)
