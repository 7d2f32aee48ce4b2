"""The one place where keras-kd checks its arguments.

Every public class and function validates its plain-number, integer,
choice and model arguments here, so the rules and the wording are the same
everywhere: numbers may be Python or NumPy scalars or 0-d arrays, NaN and
infinities are rejected, and every error reads

    Invalid value for argument `x`. Expected ... Received: x=...
"""

import math
import numbers

import keras
import numpy as np


def invalid(name, expected, received):
    """The `ValueError` for argument `name` (not raised, returned)."""
    return ValueError(
        f"Invalid value for argument `{name}`. Expected {expected}. "
        f"Received: {name}={received!r}"
    )


def as_python_number(value):
    """`value` as a Python float if it is a real number (Python or NumPy
    scalar, or a 0-d / one-element NumPy array), else `None`.

    `bool` is not a number here: `alpha=True` is a mistake, not 1.0.
    """
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        if value.dtype.kind in "iuf":
            return float(value)
    return None


def _range_text(low, high, low_open, high_open):
    if low is not None and high is not None:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        return f"a finite number in {left}{low:g}, {high:g}{right}"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def number(
    name,
    value,
    low=None,
    high=None,
    low_open=False,
    high_open=False,
    allow_variable=False,
):
    """Returns `value` as a float, or raises a `ValueError` naming `name`.

    Args:
        name: the argument's name, for the message.
        value: the value to check.
        low: the smallest allowed value, or `None`.
        high: the largest allowed value, or `None`.
        low_open: whether `low` itself is excluded.
        high_open: whether `high` itself is excluded.
        allow_variable: whether a scalar `keras.Variable` (a value a
            callback schedules) is accepted; it is returned unchanged and
            its current value must be in range.

    Returns:
        A Python float, or the variable.
    """
    checked = value
    if allow_variable and isinstance(value, keras.Variable):
        if tuple(value.shape) != ():
            raise invalid(name, "a scalar variable", value)
        checked = float(keras.ops.convert_to_numpy(value))
    result = as_python_number(checked)
    ok = result is not None and math.isfinite(result)
    if ok and low is not None:
        ok = result > low if low_open else result >= low
    if ok and high is not None:
        ok = result < high if high_open else result <= high
    if not ok:
        expected = _range_text(low, high, low_open, high_open)
        if allow_variable:
            expected += " (or a scalar `keras.Variable`)"
        raise invalid(name, expected, value)
    return value if checked is not value else result


def temperature(value, name="temperature"):
    """A temperature: finite and `> 0`; a scalar variable is accepted."""
    return number(name, value, low=0.0, low_open=True, allow_variable=True)


def fraction(name, value):
    """A weight in `[0, 1]` (`alpha` of the Distiller, `beta` of JSD)."""
    return number(name, value, low=0.0, high=1.0)


def non_negative(name, value):
    """A finite weight `>= 0`."""
    return number(name, value, low=0.0)


def integer(name, value, low=None):
    """Returns `value` as a Python int (Python or NumPy integer) `>= low`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (numbers.Integral, np.integer)
    ):
        ok = False
    else:
        value = int(value)
        ok = low is None or value >= low
    if not ok:
        expected = "an integer" if low is None else f"an integer >= {low}"
        raise invalid(name, expected, value)
    return value


def choice(name, value, options):
    """Returns `value` if it is one of `options`."""
    if not any(value == option for option in options):
        raise invalid(name, f"one of {tuple(options)}", value)
    return value


def model(name, value):
    """Returns `value` if it is a `keras.Model`."""
    if not isinstance(value, keras.Model):
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a `keras.Model`. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    return value


def weights(name, values, count):
    """One finite weight `>= 0` per entry, not all 0, normalized to sum to 1.

    Normalizing divides by the largest weight first, so weights near the
    float maximum (whose sum overflows) are normalized correctly.
    """
    sized = isinstance(values, (list, tuple, np.ndarray))
    if not sized or len(values) != count:
        raise invalid(
            name, f"a list of {count} finite numbers >= 0, not all 0", values
        )
    floats = []
    for value in values:
        value = as_python_number(value)
        if value is None or not math.isfinite(value) or value < 0:
            raise invalid(
                name,
                f"a list of {count} finite numbers >= 0, not all 0",
                values,
            )
        floats.append(value)
    top = max(floats)
    if top <= 0:
        raise invalid(
            name, f"a list of {count} finite numbers >= 0, not all 0", values
        )
    scaled = [value / top for value in floats]
    total = math.fsum(scaled)
    return [value / total for value in scaled]
