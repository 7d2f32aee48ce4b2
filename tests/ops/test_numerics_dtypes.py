"""float64 in, float64 out on every backend, and loss configs that use
only public Keras names (no `keras.src`, no underscore attribute of a Keras
object) in keras_kd.ops and keras_kd.losses."""

import ast
from pathlib import Path

import keras
import numpy as np
import pytest
from _cases import (
    cross_entropy64,
    dkd64,
    global_pointer64,
    jsd64,
    kl64,
    log_softmax64,
    logit_pairs,
    mlce64,
    sparse_labels,
    symmetric_kl64,
)
from _cases_keras import (
    close,
    engine_path,  # noqa: F401 (each test runs on both paths)
    np_,
)

from keras_kd import losses
from keras_kd import ops as kd

pytestmark = pytest.mark.usefixtures("engine_path")

CASES = logit_pairs()
PACKAGE = Path(kd.__file__).parents[1]


def _dtype(x):
    return keras.backend.standardize_dtype(x.dtype)


# ------------------------------------------------------------ 4. float64


def _float64_cases():
    t, s = (x.astype("float64") for x in CASES["masked"])
    labels = np.array([0, 3, 6, 1, 2])
    indices, dense = sparse_labels(rows=(5,), classes=7)
    pairs = np.repeat(s[:2], 2, axis=0) + np.tile([[0.0], [0.5]], (2, 1))
    tckd, nckd, dkd = dkd64(t[:4], s[:4], labels[:4], 1.0, 8.0, 2.0)
    return {
        "kl": (
            lambda: kd.kl_divergence(t, s, temperature=2.0),
            kl64(t, s, 2.0),
        ),
        "reverse_kl": (lambda: kd.kl_divergence(s, t), kl64(s, t)),
        "symmetric": (
            lambda: kd.symmetric_kl_divergence(t, s, temperature=3.0),
            symmetric_kl64(t, s, 3.0),
        ),
        "jsd": (
            lambda: kd.jensen_shannon_divergence(t, s, 0.3),
            jsd64(t, s, 0.3),
        ),
        "cross_entropy": (
            lambda: kd.cross_entropy(t, s),
            cross_entropy64(t, s),
        ),
        "log_probabilities": (
            lambda: kd.log_probabilities(s, temperature=2.0),
            log_softmax64(s, 2.0),
        ),
        "global_pointer": (
            lambda: kd.global_pointer_kl_divergence(t, s, 2.0),
            global_pointer64(t, s, 2.0, axes=-1),
        ),
        "mlce": (
            lambda: kd.multilabel_categorical_crossentropy(t > 0, s),
            mlce64(t > 0, s),
        ),
        "sparse_mlce": (
            lambda: kd.sparse_multilabel_categorical_crossentropy(
                indices, t[:, :7]
            ),
            mlce64(dense, t[:, :7]),
        ),
        "tckd": (
            lambda: kd.target_class_kd(t[:4], s[:4], labels[:4], 2.0),
            tckd,
        ),
        "nckd": (
            lambda: kd.non_target_class_kd(t[:4], s[:4], labels[:4], 2.0),
            nckd,
        ),
        "dkd": (
            lambda: kd.decoupled_kd(t[:4], s[:4], labels[:4], 1.0, 8.0, 2.0),
            dkd,
        ),
        "paired": (
            lambda: kd.paired_symmetric_kl_divergence(pairs),
            np.repeat(symmetric_kl64(pairs[0::2], pairs[1::2]), 2),
        ),
    }


@pytest.mark.parametrize("name", sorted(_float64_cases()))
def test_float64_in_float64_out(name, x64):
    # Regression: torch computed float64 inputs in float32 (Keras'
    # result_type maps float64 to float32 off TensorFlow).
    fn, expected = _float64_cases()[name]
    value = fn()
    assert _dtype(value) == "float64"
    # float64 agreement far below float32 rounding: computed in float64
    np.testing.assert_allclose(np_(value), expected, rtol=1e-10, atol=1e-12)


def test_float64_with_float32_and_loss_dtype(x64):
    t, s = CASES["random"]
    value = kd.kl_divergence(t.astype("float64"), s)
    assert _dtype(value) == "float64"
    np.testing.assert_allclose(np_(value), kl64(t, s), rtol=1e-10)
    # Reductions that divide go through Keras' own `reduce_values`, which
    # computes float64 in float32 on torch and JAX: "sum" keeps float64.
    loss = losses.KLDivergence(2.0, reduction="sum", dtype="float64")
    value = loss(t.astype("float64"), s.astype("float64"))
    assert _dtype(value) == "float64"
    np.testing.assert_allclose(np_(value), kl64(t, s, 2.0).sum(), rtol=1e-10)


# --------------------------------- 7. configs through public Keras names


def _private_keras_attributes(paths):
    """Reads of `x._name` that keras-kd itself never defines: `x` is not a
    keras-kd module and `_name` is not assigned, set on `self` or defined
    as a method by keras-kd, so it is someone else's (Keras') private name.
    """
    trees = {path: ast.parse(path.read_text("utf-8")) for path in paths}
    defined = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(
                node.ctx, ast.Store
            ):
                defined.add(node.attr)
    found = []
    for path, tree in trees.items():
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (
                node.module or ""
            ).startswith("keras_kd"):
                modules |= {a.asname or a.name for a in node.names}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            name = node.attr
            if not name.startswith("_") or name.startswith("__"):
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in modules:
                continue
            if name not in defined:
                found.append(f"{path.name}:{node.lineno} {name}")
    return found


def test_no_private_keras_names_in_ops_and_losses():
    # Regression: losses/base.py read `self._dtype_policy`.
    files = sorted((PACKAGE / "ops").glob("*.py"))
    files += sorted((PACKAGE / "losses").glob("*.py"))
    assert len(files) >= 10
    for path in files:
        assert "keras.src" not in path.read_text("utf-8"), path
    assert _private_keras_attributes(files) == []


@pytest.mark.parametrize("dtype", [None, "float32", "mixed_float16"])
def test_dtype_config_round_trip(dtype):
    loss = losses.KLDivergence(temperature=2.0, dtype=dtype)
    config = loss.get_config()
    assert config["dtype"] == loss.dtype
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert restored.dtype == loss.dtype
    assert restored.get_config() == config
    # the Distiller's copy with a temperature variable
    copy = type(loss).from_config(config)
    copy.temperature = keras.Variable(3.0, trainable=False)
    t, s = CASES["random"]
    tolerance = 1e-2 if loss.dtype == "float16" else 1e-5
    close(copy(t, s), kl64(t, s, 3.0).mean(), rtol=tolerance, atol=tolerance)
    assert copy.get_config()["temperature"] == 3.0
