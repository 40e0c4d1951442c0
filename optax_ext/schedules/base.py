"""Shared pieces of the learning-rate schedules: step handling and validation.

A schedule is a plain callable ``step -> value``: ``step`` is an int or an array
of ints (or floats, for plotting), the value is a float32 array of the same
shape. This is Optax's ``optax.Schedule`` convention, so every schedule here
also works inside Optax optimizers and under ``optax.inject_hyperparams``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_ext._validate import is_real_number

Schedule = Callable[[jax.typing.ArrayLike], jax.Array]


def steps(step: jax.typing.ArrayLike) -> jax.Array:
    """Normalizes a step count: an int32 (or float32) array, negatives clamped to 0.

    Small integer dtypes are widened so that cycle arithmetic cannot overflow;
    floats are kept so that schedules can be drawn on a fine grid.
    """
    t = jnp.asarray(step)
    if jnp.issubdtype(t.dtype, jnp.integer):
        if t.dtype.itemsize < 4 or jnp.issubdtype(t.dtype, jnp.unsignedinteger):
            t = t.astype(jnp.int32)
    elif jnp.issubdtype(t.dtype, jnp.floating):
        if t.dtype.itemsize < 4:
            t = t.astype(jnp.float32)
    else:
        raise TypeError(f"schedule: step must be an integer or float array, got dtype {t.dtype}")
    return jnp.maximum(t, 0)


def floordiv(t: jax.Array, k: int) -> jax.Array:
    """``floor(t / k)``, exact in integer arithmetic when ``t`` is an int array."""
    if jnp.issubdtype(t.dtype, jnp.integer):
        return t // k
    return jnp.floor(t / k)


def f32(x: Any) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def as_float(t: jax.Array) -> jax.Array:
    """Step as float32 for the continuous parts of a formula."""
    return t.astype(jnp.float32)


def like_steps(value: Any, t: jax.Array) -> jax.Array:
    """``value`` as float32, broadcast to the shape of the step array."""
    return jnp.broadcast_to(f32(value), t.shape)


# ----------------------------------------------------------------------------
# Validation. Every message names the function, the argument, the received
# value and what was expected.


def int_arg(fn: str, name: str, value: Any, *, minimum: int = 1) -> int:
    """Checks a step count (Python or NumPy int, or an integral float)."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be {what}, got {value!r}")
    try:
        ivalue = operator.index(value)
    except TypeError:
        if isinstance(value, (float, np.floating)) and math.isfinite(value):
            if not float(value).is_integer():
                raise ValueError(f"{fn}: {name} must be {what}, got {value!r}") from None
            ivalue = int(value)
        else:
            raise TypeError(f"{fn}: {name} must be {what}, got {value!r} of type {type(value).__name__}") from None
    if ivalue < minimum:
        raise ValueError(f"{fn}: {name} must be {what}, got {value!r}")
    return ivalue


def concrete(value: Any) -> float | None:
    """The Python float of a concrete scalar, or None for a traced value.

    Hyperparameters may be traced (``optax.inject_hyperparams``, ``jax.jit`` of a
    factory); those cannot be checked at construction time.
    """
    try:
        return float(np.asarray(value))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def real_arg(
    fn: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
    high_open: bool = False,
) -> float | None:
    """Checks a real scalar hyperparameter (finite, optionally within bounds)."""
    if not is_real_number(value):
        raise TypeError(f"{fn}: {name} must be a real number, got {value!r} of type {type(value).__name__}")
    if np.ndim(value) != 0:
        raise ValueError(f"{fn}: {name} must be a scalar, got shape {np.shape(value)}")
    x = concrete(value)
    if x is None:
        return None
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
    expected = " and ".join(s for s in (lo, hi) if s) or "finite"
    bad = not math.isfinite(x)
    if low is not None:
        bad |= x <= low if low_open else x < low
    if high is not None:
        bad |= x >= high if high_open else x > high
    if bad:
        raise ValueError(f"{fn}: {name} must be a finite number {expected}, got {value!r}")
    return x


def choice_arg(fn: str, name: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{fn}: unknown {name} {value!r}; valid options are {', '.join(repr(o) for o in options)}")
    return value


def ordered_arg(fn: str, low_name: str, low: Any, high_name: str, high: Any) -> None:
    """Checks ``low <= high`` when both are concrete."""
    lo, hi = concrete(low), concrete(high)
    if lo is not None and hi is not None and hi < lo:
        raise ValueError(f"{fn}: {high_name} must be >= {low_name}, got {high_name}={high!r} < {low_name}={low!r}")


def decay_floor_arg(fn: str, init_name: str, init: Any, floor_name: str, floor: Any, increasing: bool) -> None:
    """A decay's final value above its start (a rise) is an error unless `increasing=True` asks for it.

    The usual cause is Optax's convention: `optax.cosine_decay_schedule(init, steps, alpha)` takes the
    final value as a *fraction* of init, ours as an absolute value."""
    lo, hi = concrete(floor), concrete(init)
    if not increasing and lo is not None and hi is not None and lo > hi >= 0:
        raise ValueError(
            f"{fn}: {floor_name}={floor!r} is above {init_name}={init!r}, so the schedule would rise. "
            f"{floor_name} is the absolute final value; for Optax's fraction alpha use "
            f"optax_ext.cosine_decay_schedule / warmup_cosine_decay_schedule (Optax's arguments), "
            f"or pass increasing=True for a rising schedule."
        )


def schedule_arg(fn: str, name: str, value: Any) -> Schedule:
    if not callable(value):
        raise TypeError(
            f"{fn}: {name} must be a schedule (a callable step -> value), got {value!r} of type {type(value).__name__}"
        )
    return value


def boundaries_arg(fn: str, name: str, value: Any) -> tuple[int, ...]:
    """Checks a sequence of strictly increasing positive step boundaries."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{fn}: {name} must be a sequence of positive integers, got {value!r}")
    out = tuple(int_arg(fn, f"{name}[{i}]", b) for i, b in enumerate(value))
    for i in range(1, len(out)):
        if out[i] <= out[i - 1]:
            raise ValueError(
                f"{fn}: {name} must be strictly increasing, got {list(out)!r}"
                f" ({name}[{i}]={out[i]} <= {name}[{i - 1}]={out[i - 1]})"
            )
    return out


def jitted(schedule: Schedule) -> Schedule:
    """Compiles a schedule's body once per step shape and dtype.

    Called eagerly (e.g. to log the learning rate every step) a schedule then
    costs one dispatch instead of one per jnp op; inside an outer ``jax.jit`` it
    is simply inlined. Hyperparameters it closes over may be tracers of an outer
    trace (``optax.inject_hyperparams``).
    """
    return jax.jit(schedule)
