"""Argument checks shared by the public factories: clear errors at construction time.

Values that are traced (under `optax.inject_hyperparams` or `jit`) or schedules (callables) are
not checked here: they are only known at run time.
"""

from __future__ import annotations

import math

import jax
import numpy as np


def _concrete(value):
    """The value as a Python float, or None when it is a schedule or a traced value."""
    if callable(value) or value is None:
        return None
    if isinstance(value, jax.core.Tracer):
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


def _fail(fn: str, name: str, value, expected: str):
    raise ValueError(f"{fn}: {name} must be {expected}, got {value!r}.")


def unit_interval(fn: str, name: str, value, *, closed: bool = False):
    """Check 0 <= value < 1 (or <= 1 when closed)."""
    v = _concrete(value)
    if v is None:
        return value
    ok = (0.0 <= v <= 1.0) if closed else (0.0 <= v < 1.0)
    if not ok or math.isnan(v):
        _fail(fn, name, value, "in [0, 1]" if closed else "in [0, 1)")
    return value


def non_negative(fn: str, name: str, value):
    v = _concrete(value)
    if v is not None and (not v >= 0.0 or math.isinf(v)):
        _fail(fn, name, value, "a finite number >= 0")
    return value


def positive(fn: str, name: str, value):
    v = _concrete(value)
    if v is not None and (not v > 0.0 or math.isinf(v)):
        _fail(fn, name, value, "a finite number > 0")
    return value


def one_of(fn: str, name: str, value, options):
    if value not in options:
        _fail(fn, name, value, "one of " + ", ".join(repr(o) for o in options))
    return value
