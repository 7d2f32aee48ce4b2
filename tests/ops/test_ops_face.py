"""`keras_kd.ops`'s face: public functions only, each documented with its
arguments and result, each exercised by the suite."""

import inspect
import re
from pathlib import Path

import pytest

from keras_kd import ops as kd

TESTS = Path(__file__).parents[1]


def test_all_lists_public_functions_only():
    assert kd.__all__ == sorted(kd.__all__)
    assert [name for name in kd.__all__ if name.startswith("_")] == []
    for name in kd.__all__:
        assert inspect.isfunction(getattr(kd, name)), name
    # And nothing public on the face is left out of `__all__`.
    public = {
        name
        for name, value in vars(kd).items()
        if not name.startswith("_") and inspect.isfunction(value)
    }
    assert public == set(kd.__all__)


@pytest.mark.parametrize("name", kd.__all__)
def test_each_function_is_documented(name):
    doc = inspect.getdoc(getattr(kd, name)) or ""
    assert "Args:" in doc and "Returns:" in doc, name
    for argument in inspect.signature(getattr(kd, name)).parameters:
        assert re.search(rf"\b{argument}\b", doc), (name, argument)


def test_each_function_is_exercised_by_a_test():
    sources = "\n".join(
        p.read_text("utf-8")
        for p in TESTS.rglob("test_*.py")
        if p.name != Path(__file__).name
    )
    untested = [n for n in kd.__all__ if not re.search(rf"\.{n}\(", sources)]
    assert untested == []
