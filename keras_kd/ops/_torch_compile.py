"""`torch.compile` for the elementwise-heavy bodies of keras-kd's ops on
the torch backend, with an automatic eager fallback.

Eager torch runs each elementwise operation of a softmax divergence as its
own kernel, reading and writing a `[rows, vocab]` tensor every time; a
compiled graph fuses them into a few passes. What is compiled is a pure
module-level function of tensors and a hashable tuple of static options
(never an object built per call), so `torch.compile`'s cache is hit on
every later call with the same options: one compilation per
configuration, not per step or per chunk. The chunk loops pad their last
chunk to the common chunk shape, so a ragged final batch reuses it too.

Compilation is on by default where it pays for itself: on a CUDA device.
On a CPU one compilation takes tens of seconds, longer than a short run
gains, so it is off unless asked for. `set_torch_compile(True | False |
"auto")` or the environment variable `KERAS_KD_TORCH_COMPILE` (`1`, `0`,
`auto`) decide. Where compiling fails (no C++ compiler, a Python that
`torch.compile` does not support) keras-kd warns once and runs eagerly
from then on.
"""

import os
import warnings

import keras

from keras_kd import _checks

_SETTING = {"mode": os.environ.get("KERAS_KD_TORCH_COMPILE", "auto")}
_COMPILED = {}
_FAILED = {"error": None}
# The `torch.compile` backend: tests count compilations with their own.
_BACKEND = {"name": "inductor"}


def set_torch_compile(mode):
    """Sets whether keras-kd compiles its ops' bodies with `torch.compile`
    on the torch backend. Other backends are not affected.

    Args:
        mode: `True`, `False`, or `"auto"` (the default: on a CUDA device
            only, where the compile time pays for itself).

    Returns:
        `None`.
    """
    if isinstance(mode, str):
        mode = mode.lower()
    if mode not in (True, False, "auto"):
        raise _checks.invalid("mode", '`True`, `False` or "auto"', mode)
    _SETTING["mode"] = mode


def torch_compile_enabled():
    """Whether the torch ops run compiled now.

    Args:
        (none)

    Returns:
        `True` on the torch backend when `set_torch_compile` (or the
        environment variable `KERAS_KD_TORCH_COMPILE`) asks for it and no
        compilation has failed; `False` otherwise and off torch.
    """
    if keras.backend.backend() != "torch" or _FAILED["error"] is not None:
        return False
    mode = _SETTING["mode"]
    if mode in ("1", "true", True):
        return True
    if mode in ("0", "false", False):
        return False
    import torch

    return torch.cuda.is_available()


def maybe_compiled(function):
    """`function` itself, or its compiled form when compiling is on.

    `function` must be a module-level function whose arguments are tensors
    (or `None`) and hashable static values.
    """
    if not torch_compile_enabled():
        return function
    key = (function, _BACKEND["name"])
    if key not in _COMPILED:
        import torch

        # Automatic dynamic shapes: a second input shape (a ragged last
        # batch) compiles one graph for every shape, not one per shape.
        _COMPILED[key] = torch.compile(function, backend=_BACKEND["name"])
    compiled = _COMPILED[key]

    def run(*args):
        if _FAILED["error"] is not None:
            return function(*args)
        try:
            return compiled(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure
            # An error of the function itself comes back from the eager
            # call below; a compiler's failure does not.
            result = function(*args)
            _FAILED["error"] = error
            warnings.warn(
                "keras-kd could not compile its torch ops with "
                f"torch.compile ({type(error).__name__}: {error}); they "
                "run eagerly from now on. `keras_kd.ops.set_torch_compile("
                "False)` silences this.",
                RuntimeWarning,
                stacklevel=2,
            )
            return result

    return run
