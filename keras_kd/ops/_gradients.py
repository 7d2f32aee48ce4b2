"""Closed-form gradients through `keras.ops.custom_gradient`, and the choice
between the precise and the fast path.

Every divergence in `keras_kd.ops` computes its value and its gradient in
one forward pass, from quantities the value needs anyway (for the KL:
`T * (softmax(s / T) - softmax(t / T))`), and hands the gradient to the
backend through `keras.ops.custom_gradient`. The backward pass is then one
elementwise expression instead of autodiff through every `where`,
`log_softmax` and clamp of the forward pass.

Second-order differentiation (a gradient of the gradient):

- JAX and TensorFlow differentiate the gradient expression itself, whose
  inputs (probabilities, log-ratios) are differentiable functions of the
  logits: reverse-over-reverse (`jax.grad(jax.grad(...))`, nested
  `GradientTape`s) is exact (checked by the test suite). In a row
  with mass on one side only, or logits near the float limit, the precise
  path's second-order gradient may be NaN (an unused `where` branch holds
  one there). JAX's forward mode (`jax.jvp`, `jax.jacfwd`, `jax.hessian`)
  raises JAX's own `TypeError` ("can't apply forward-mode autodiff (jvp)
  to a custom_vjp function"): the closed form is a VJP.
- torch runs the forward pass of a custom gradient without recording it,
  so its closed-form gradient is a constant to autograd. When a gradient is
  requested with `create_graph=True`, the backward pass instead
  differentiates the plain formula (the `reference` given to
  `with_gradient`) with autograd, which is exact to any order.
"""

import keras
import numpy as np
from keras import ops

from keras_kd import _checks


def resolve_precise(precise):
    """`precise=None | True | False` as a bool for this backend and device.

    `None` is the precise path where it costs nothing measurable, and
    that is nowhere measured so far, so `None` is the fast path. On a CPU
    (BENCHMARKS.md, "KL on logits (CPU)" and "Other divergences (CPU)")
    the precise path takes 1.15x to 1.8x the fast path's time under XLA
    on JAX (XLA's CPU reductions read stored arrays, and the precise path
    stores more of them), 1.8x to 4.5x in TensorFlow graphs without XLA
    (how `model.fit` runs on a CPU), 2.6x to 8.8x in eager torch. On an
    NVIDIA H200 (BENCHMARKS.md, "GPU") it takes
    1.4x (KL, symmetric KL) to 2.3x (GlobalPointer) under `jax.jit`,
    where XLA's fusion was expected to hide it, and 2.4x to 4.5x in eager
    torch.

    Raises:
        ValueError: for anything but `None`, `True` or `False`.
    """
    if precise is None:
        return default_precise()
    if isinstance(precise, (bool, np.bool_)):
        return bool(precise)
    raise _checks.invalid("precise", "None, True or False", precise)


def default_precise():
    """What `precise=None` means here (tests patch it to run the whole
    numeric contract on both paths): the fast path, on every backend and
    device measured (see `resolve_precise`)."""
    return False


def torch_eager():
    """Whether this is eager torch (not `torch.compile`): the one place
    where a value can be inspected on the host in the middle of a loss."""
    if keras.backend.backend() != "torch":
        return False
    import torch

    return not torch.compiler.is_compiling()


def _torch_needs_grad(tensors):
    import torch

    return torch.is_grad_enabled() and any(
        getattr(x, "requires_grad", False) for x in tensors
    )


def with_gradient(forward, reference, inputs, constants=()):
    """`forward`'s value, differentiable through its closed-form gradient.

    Args:
        forward: `forward(*inputs, *constants, eager=...)` returns
            `(value, grads)`, where `grads(upstream)` returns one gradient
            (or `None`) per entry of `inputs`, `upstream` being the
            gradient of the value. With `eager=True` (torch, gradient
            needed) it may compute the gradient right away and free what
            the value no longer needs: torch runs it with grad mode off and
            calls `grads` once per backward pass. Otherwise it should
            compute the gradient inside `grads`, so that a value without a
            gradient (evaluation, metrics) costs nothing more.
        reference: `reference(*inputs, *constants)` returns the same value
            as plain, autodiff-differentiable operations; used on torch
            for second-order gradients (see the module docstring).
        inputs: the tensors the value is differentiated by.
        constants: more tensors that get no gradient (a temperature tensor,
            labels). Python values belong in the closures.

    Returns:
        The value of `forward`.
    """
    inputs = tuple(inputs)
    arguments = inputs + tuple(constants)
    count = len(inputs)
    if keras.backend.backend() == "torch" and not _torch_needs_grad(inputs):
        import torch

        with torch.no_grad():
            return forward(*arguments, eager=False)[0]
    eager = keras.backend.backend() == "torch"

    @ops.custom_gradient
    def differentiable(*args):
        value, grads = forward(*args, eager=eager)

        # JAX and TensorFlow call `backward(upstream)`, torch calls
        # `backward(*saved_inputs, upstream=...)`.
        def backward(*positional, upstream=None):
            if upstream is None:
                (upstream,) = positional
            if eager and _torch_grad_enabled():
                return _torch_second_order(args, upstream, reference, count)
            found = list(grads(upstream))
            return tuple(found + [None] * (len(args) - count))

        return value, backward

    return differentiable(*arguments)


def _torch_grad_enabled():
    import torch

    return torch.is_grad_enabled()


def _torch_second_order(args, upstream, reference, count):
    """The gradient by autograd of the plain formula, itself differentiable
    (torch runs a backward pass with `create_graph=True` in grad mode)."""
    import torch

    wanted = [i for i in range(count) if args[i].requires_grad]
    with torch.enable_grad():
        value = reference(*args)
        found = torch.autograd.grad(
            value,
            [args[i] for i in wanted],
            grad_outputs=upstream,
            create_graph=True,
            allow_unused=True,
        )
    result = [None] * len(args)
    for i, grad in zip(wanted, found):
        result[i] = grad
    return tuple(result)
