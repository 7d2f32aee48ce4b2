"""`torch.compile` of the fused chunk bodies on the torch backend: one
compilation per configuration (none per chunk, step or ragged batch), the
same values and gradients as eager, an eager fallback where compiling
fails, and a switch."""

import warnings

import keras
import numpy as np
import pytest

from keras_kd import ops as kd_ops
from keras_kd.ops import _torch_compile

torch_only = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="torch.compile is torch's"
)


@pytest.fixture
def compiling(monkeypatch):
    """Compiling on, with a backend that counts the graphs it is given
    (each one a compilation) and runs them as traced."""
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    monkeypatch.setitem(_torch_compile._BACKEND, "name", counting)
    monkeypatch.setitem(_torch_compile._SETTING, "mode", True)
    monkeypatch.setitem(_torch_compile._FAILED, "error", None)
    yield graphs
    _torch_compile._COMPILED.clear()


def _case(rows, hidden=16, vocab=50, seed=0):
    import torch

    rng = np.random.default_rng(seed)

    def tensor(shape, grad=False, scale=1.0):
        value = rng.normal(size=shape).astype("float32") * scale
        return torch.tensor(value, requires_grad=grad)

    return dict(
        student_hidden=tensor((rows, hidden), grad=True),
        student_kernel=tensor((hidden, vocab), grad=True, scale=0.3),
        teacher_hidden=tensor((rows, hidden)),
        teacher_kernel=tensor((hidden, vocab), scale=0.3),
        labels=torch.tensor(rng.integers(0, vocab, rows)),
    )


def _loss_and_grads(case, **options):
    options = dict(dict(alpha=0.3, temperature=2.0, chunk_size=8), **options)
    loss = kd_ops.fused_linear_distillation_loss(
        case["student_hidden"],
        case["student_kernel"],
        case["teacher_hidden"],
        case["teacher_kernel"],
        case["labels"],
        **options,
    )
    hidden, kernel = case["student_hidden"], case["student_kernel"]
    grads = [g.detach().numpy() for g in _grads(loss, hidden, kernel)]
    return float(loss.detach()), grads


def _grads(loss, *tensors):
    import torch

    return torch.autograd.grad(loss, tensors)


@torch_only
def test_one_compilation_for_every_step_chunk_and_ragged_batch(compiling):
    # 29 and 3 rows: a ragged last chunk, and fewer rows than one chunk.
    for rows in (40, 40, 29, 3, 40):
        _loss_and_grads(_case(rows, seed=rows))
    # One graph: no graph break in the chunk body, no recompilation.
    assert len(compiling) == 1
    for divergence in ("reverse_kl", "jsd"):
        _loss_and_grads(_case(40), divergence=divergence)
    assert len(compiling) == 3  # one per new configuration


@torch_only
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_compiled_values_and_gradients_equal_eager(compiling, divergence, cap):
    options = dict(
        divergence=divergence,
        student_logit_soft_cap=cap,
        teacher_logit_soft_cap=cap,
    )
    compiled = _loss_and_grads(_case(29), **options)
    _torch_compile.set_torch_compile(False)
    eager = _loss_and_grads(_case(29), **options)
    np.testing.assert_allclose(compiled[0], eager[0], rtol=1e-6)
    for a, b in zip(compiled[1], eager[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert compiling  # it did compile


@torch_only
def test_top_k_path_compiles_in_one_graph(compiling):
    import torch

    case = _case(24)
    with torch.no_grad():
        top, ids, tail = kd_ops.fused_linear_top_k(
            case["teacher_hidden"], case["teacher_kernel"], 5
        )
    loss = kd_ops.fused_linear_top_k_distillation_loss(
        case["student_hidden"],
        case["student_kernel"],
        top,
        ids,
        tail,
        case["labels"],
        chunk_size=8,
    )
    _grads(loss, case["student_hidden"])
    assert len(compiling) == 1


@torch_only
def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    monkeypatch.setitem(_torch_compile._BACKEND, "name", broken)
    monkeypatch.setitem(_torch_compile._SETTING, "mode", True)
    monkeypatch.setitem(_torch_compile._FAILED, "error", None)
    try:
        with pytest.warns(RuntimeWarning, match="run eagerly"):
            first = _loss_and_grads(_case(29))
        assert not kd_ops.torch_compile_enabled()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = _loss_and_grads(_case(29))
    finally:
        _torch_compile._COMPILED.clear()
    _torch_compile.set_torch_compile(False)
    eager = _loss_and_grads(_case(29))
    assert first[0] == again[0] == eager[0]


@torch_only
def test_inductor_compiles_the_chunk(monkeypatch):
    # The real compiler once, on a small case (it takes seconds on a CPU).
    monkeypatch.setitem(_torch_compile._SETTING, "mode", True)
    monkeypatch.setitem(_torch_compile._FAILED, "error", None)
    try:
        compiled = _loss_and_grads(_case(29))
        assert kd_ops.torch_compile_enabled()  # it did not fall back
    finally:
        _torch_compile._COMPILED.clear()
    _torch_compile.set_torch_compile(False)
    eager = _loss_and_grads(_case(29))
    np.testing.assert_allclose(compiled[0], eager[0], rtol=1e-5)
    for a, b in zip(compiled[1], eager[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_switch(monkeypatch):
    monkeypatch.setitem(_torch_compile._SETTING, "mode", "auto")
    with pytest.raises(ValueError, match="mode"):
        kd_ops.set_torch_compile("sometimes")
    kd_ops.set_torch_compile("AUTO")
    if keras.backend.backend() != "torch":
        kd_ops.set_torch_compile(True)
        assert not kd_ops.torch_compile_enabled()  # torch only
        return
    import torch

    # "auto": compiled on a CUDA device only.
    assert kd_ops.torch_compile_enabled() == torch.cuda.is_available()
    kd_ops.set_torch_compile(False)
    assert not kd_ops.torch_compile_enabled()
    kd_ops.set_torch_compile(True)
    assert kd_ops.torch_compile_enabled()


def _dense(rows, kind, precise, vocab=300, seed=0, dtype="float32"):
    import torch

    rng = np.random.default_rng(seed)
    dtype = getattr(torch, dtype)
    t = torch.tensor(rng.normal(size=(rows, vocab)) * 3, dtype=dtype)
    s = torch.tensor(
        rng.normal(size=(rows, vocab)) * 3, dtype=dtype, requires_grad=True
    )
    functions = {
        "kl": kd_ops.kl_divergence,
        "symmetric_kl": kd_ops.symmetric_kl_divergence,
        "jsd": kd_ops.jensen_shannon_divergence,
    }
    value = functions[kind](t, s, temperature=2.0, precise=precise)
    (grad,) = _grads(value.sum(), s)
    return value.detach().numpy(), grad.float().numpy()


@torch_only
@pytest.mark.parametrize("kind", ["kl", "symmetric_kl", "jsd"])
@pytest.mark.parametrize("precise", [False, True])
def test_dense_divergences_compile_in_one_graph_and_equal_eager(
    compiling, kind, precise
):
    compiled = _dense(24, kind, precise)
    assert len(compiling) == 1  # no graph break
    _torch_compile.set_torch_compile(False)
    eager = _dense(24, kind, precise)
    np.testing.assert_allclose(compiled[0], eager[0], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(compiled[1], eager[1], rtol=1e-4, atol=1e-7)


@torch_only
def test_a_ragged_last_batch_compiles_once_more_at_most(compiling):
    for rows in (32, 32, 17, 32, 5, 32, 17):
        _dense(rows, "kl", False, seed=rows)
    # The first shape, then one graph for every other shape.
    assert len(compiling) <= 2


@torch_only
@pytest.mark.parametrize("kind", ["kl", "symmetric_kl", "jsd"])
def test_half_precision_blocks_compile_once_and_equal_eager(
    compiling, monkeypatch, kind
):
    from keras_kd.ops import _half_logits

    # 40 rows in blocks of 16: two full blocks and a last one of 8.
    monkeypatch.setattr(_half_logits, "rows_per_block", lambda classes: 16)
    compiled = _dense(40, kind, False, dtype="bfloat16")
    again = _dense(40, kind, False, dtype="bfloat16", seed=1)
    # Values (no gradient), then gradients: each a graph for the full
    # blocks and at most one more for the last; none for the second call.
    assert len(compiling) <= 4
    _torch_compile.set_torch_compile(False)
    for found, seed in ((compiled, 0), (again, 1)):
        eager = _dense(40, kind, False, dtype="bfloat16", seed=seed)
        np.testing.assert_allclose(found[0], eager[0], rtol=2e-5, atol=1e-6)
        # One bfloat16 rounding apart at most.
        np.testing.assert_allclose(found[1], eager[1], rtol=2**-7, atol=1e-7)
