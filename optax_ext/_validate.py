"""Argument checks shared by the public factories: clear errors at construction time.

Values that are traced (under `optax.inject_hyperparams` or `jit`) or schedules (callables) are
range-checked only at run time; their kind is checked here: a string, a bool or an array where a
number is due is a TypeError naming the argument, and so is a schedule where the transformation's
state (Optax's layout) has no step count to evaluate it at.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _concrete(value):
    """The value as a Python float, or None when it is a schedule or a traced value."""
    if callable(value) or value is None:
        return None
    try:
        arr = np.asarray(value)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None
    if arr.shape != ():
        return None
    try:
        return float(arr)
    except (TypeError, ValueError):
        return None


def is_real_number(value) -> bool:
    """A real (integer or floating) scalar kind: a Python int or float, or anything with a real dtype.

    `jnp.issubdtype`, not NumPy's: NumPy does not count the ml_dtypes floats (bfloat16, float8_*)
    as floating, and `jnp.bfloat16(1e-3)` is not an `np.number`.
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return False
    try:
        return bool(jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
    except TypeError:
        return False


def _fail(fn: str, name: str, value, expected: str):
    hint = ""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        # Typically optax.inject_hyperparams, which casts every hyperparameter to the params' dtype:
        # in bfloat16, b2 = 0.999 rounds to 1 (and Adam's bias correction to 0 / 0).
        hint = (
            f" ({name} is stored in {jnp.dtype(dtype).name}, which may have rounded it there; "
            f"optax.inject_hyperparams casts hyperparameters to the params' dtype unless given "
            f"hyperparam_dtype=jnp.float32)"
        )
    raise ValueError(f"{fn}: {name} must be {expected}, got {value!r}{hint}.")


def _kind(fn: str, name: str, value, schedule: bool):
    """TypeError unless `value` is a number, a 0-d array (traced ones included), or an allowed schedule."""
    if callable(value):
        if schedule:
            return
        raise TypeError(
            f"{fn}: {name} cannot be a schedule here (its Optax state has no step count to evaluate it at); "
            f"got {value!r}. To change {name} during training, wrap the optimizer: "
            f"optax.inject_hyperparams(<factory>)(..., {name}=schedule) evaluates the schedule each step "
            f"and passes the value."
        )
    if not is_real_number(value):
        raise TypeError(
            f"{fn}: {name} must be a real number{' or a schedule (step -> value)' if schedule else ''}; "
            f"got {value!r} of type {type(value).__name__}."
        )
    if np.ndim(value) != 0:
        raise ValueError(f"{fn}: {name} must be a scalar, got an array of shape {np.shape(value)}.")


def _promotable(value):
    """The value, with an 8-bit float (no implicit promotion in JAX: `fp8 * f32` is an error) as the
    f32 array of the same value, so that it mixes with f32 math like any other low-precision float."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits == 8:
        return jnp.asarray(value, jnp.float32)
    return value


def unit_interval(fn: str, name: str, value, *, closed: bool = False, schedule: bool = False):
    """Check 0 <= value < 1 (or <= 1 when closed). Each check returns the value to use (see `_promotable`)."""
    _kind(fn, name, value, schedule)
    value = _promotable(value)
    v = _concrete(value)
    if v is None:
        return value
    ok = (0.0 <= v <= 1.0) if closed else (0.0 <= v < 1.0)
    if not ok or math.isnan(v):
        _fail(fn, name, value, "in [0, 1]" if closed else "in [0, 1)")
    return value


def non_negative(fn: str, name: str, value, *, schedule: bool = False):
    _kind(fn, name, value, schedule)
    value = _promotable(value)
    v = _concrete(value)
    if v is not None and (not v >= 0.0 or math.isinf(v)):
        _fail(fn, name, value, "a finite number >= 0")
    return value


def positive(fn: str, name: str, value, *, schedule: bool = False):
    _kind(fn, name, value, schedule)
    value = _promotable(value)
    v = _concrete(value)
    if v is not None and (not v > 0.0 or math.isinf(v)):
        _fail(fn, name, value, "a finite number > 0")
    return value


def finite(fn: str, name: str, value, *, schedule: bool = False):
    _kind(fn, name, value, schedule)
    value = _promotable(value)
    v = _concrete(value)
    if v is not None and not math.isfinite(v):
        _fail(fn, name, value, "a finite number")
    return value


def one_of(fn: str, name: str, value, options):
    if value not in options:
        _fail(fn, name, value, "one of " + ", ".join(repr(o) for o in options))
    return value


def storage(fn: str, name: str, value):
    """A moment's storage: None (the params' dtype), a floating dtype, or an `Int8Blockwise` spec."""
    from optax_ext.quantization import Int8Blockwise

    if value is None or isinstance(value, Int8Blockwise):
        return value
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"{fn}: {name} must be None, a floating-point dtype (jnp.float32, jnp.bfloat16, ...) or "
            f"optax_ext.int8_blockwise (8-bit blockwise moments); got {value!r}."
        )
    return value
