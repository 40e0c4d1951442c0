"""Trace-time argument checks shared by the augmentation ops.

Every check runs in Python on static shapes and Python numbers, so a bad
argument fails at trace time with a message that names the op, the argument,
the received value and what was expected. Traced (jax) values are passed
through unchecked: their value is unknown at trace time.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_static_number(x: Any) -> bool:
    """True for Python / NumPy scalars (not jax tracers or arrays)."""
    if isinstance(x, jax.Array):  # concrete arrays and tracers alike
        return False
    return isinstance(x, (numbers.Number, np.number)) or (isinstance(x, np.ndarray) and x.ndim == 0)


def keeps_uint8(op: Callable) -> Callable:
    """Let an op whose math is on floats in [0, 1] take a uint8 image (or batch) and return uint8.

    As torchvision's v2 transforms do for uint8 tensors: the math runs in float32 on
    value / 255, and the result is rounded to the nearest of 0..255 (torchvision truncates
    after a blend; rounding is the nearest uint8 to the exact result). Exact for ops that only move
    or copy pixels (flips, crops, pads, nearest-neighbour warps). Arguments other than the image
    keep their units: a `fill` is still a value in [0, 1]. If the op also returns labels (Mixup,
    CutMix), only the images are converted back.
    """
    signature = inspect.signature(op)
    name = "image" if "image" in signature.parameters else "images"

    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        x = bound.arguments.get(name)
        if getattr(x, "dtype", None) != jnp.uint8:
            return op(*args, **kwargs)
        bound.arguments[name] = x.astype(jnp.float32) / 255.0
        out = op(*bound.args, **bound.kwargs)
        if isinstance(out, tuple):
            return (_to_uint8(out[0]), *out[1:])
        return _to_uint8(out)

    return wrapper


def _to_uint8(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round(x.astype(jnp.float32) * 255.0), 0, 255).astype(jnp.uint8)


def check_image(fn: str, image: Any, name: str = "image") -> tuple[int, int, int]:
    """Checks a single (H, W, C) floating image; returns (H, W, C)."""
    shape = getattr(image, "shape", None)
    if shape is None:
        raise TypeError(f"{fn}: {name} must be an array, got {type(image).__name__}")
    if len(shape) != 3:
        raise ValueError(f"{fn}: {name} must be 3-D (H, W, C), got shape {tuple(shape)}")
    if not jnp.issubdtype(image.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: {name} must have a floating dtype with values in [0, 1], or be uint8 (0..255), "
            f"got dtype {image.dtype}"
        )
    h, w, c = (int(s) for s in shape)
    if h < 1 or w < 1 or c < 1:
        raise ValueError(f"{fn}: {name} must be non-empty, got shape {tuple(shape)}")
    return h, w, c


def check_batch(fn: str, images: Any) -> tuple[int, int, int, int]:
    """Checks a (B, H, W, C) floating batch; returns (B, H, W, C)."""
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(f"{fn}: images must be 4-D (B, H, W, C), got shape {None if shape is None else tuple(shape)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: images must have a floating dtype with values in [0, 1], or be uint8 (0..255), "
            f"got dtype {images.dtype}"
        )
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def check_probability(fn: str, name: str, p: Any) -> None:
    if is_static_number(p) and not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{fn}: {name} must be in [0, 1], got {p}")


def check_nonnegative(fn: str, name: str, x: Any) -> None:
    if is_static_number(x) and not float(x) >= 0.0:
        raise ValueError(f"{fn}: {name} must be >= 0, got {x}")


def check_positive(fn: str, name: str, x: Any) -> None:
    if is_static_number(x) and not float(x) > 0.0:
        raise ValueError(f"{fn}: {name} must be > 0, got {x}")


def check_static_int(fn: str, name: str, x: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """A Python int (shapes, loop counts) within [minimum, maximum]."""
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{fn}: {name} must be a Python int, got {x!r}")
    x = int(x)
    if minimum is not None and x < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {x}")
    if maximum is not None and x > maximum:
        raise ValueError(f"{fn}: {name} must be <= {maximum}, got {x}")
    return x


def check_interval(
    fn: str, name: str, interval: Any, lo: float | None = None, hi: float | None = None
) -> tuple[float, float]:
    """A static (a, b) with a <= b, both inside [lo, hi] where given."""
    try:
        a, b = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {name} must be a pair of numbers (min, max), got {interval!r}") from None
    if not a <= b:
        raise ValueError(f"{fn}: {name} must satisfy min <= max, got {interval!r}")
    if (lo is not None and a < lo) or (hi is not None and b > hi):
        raise ValueError(f"{fn}: {name} must lie in [{lo}, {hi}], got {interval!r}")
    return a, b


def size_pair(fn: str, name: str, size: Any) -> tuple[int, int]:
    """An int or (h, w) pair of positive Python ints."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (size, size)
    if not isinstance(size, Sequence) or len(size) != 2:
        raise TypeError(f"{fn}: {name} must be an int or a pair (h, w), got {size!r}")
    h = check_static_int(fn, name, size[0], minimum=1)
    w = check_static_int(fn, name, size[1], minimum=1)
    return h, w


INTERPOLATIONS = {"nearest": 0, "bilinear": 1}


def interpolation_order(fn: str, interpolation: str) -> int:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"{fn}: interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    return INTERPOLATIONS[interpolation]


def fill_vector(fn: str, fill: Any, channels: int) -> jax.Array:
    """A scalar or per-channel fill value as a (C,) float32 vector."""
    fill_arr = jnp.asarray(fill, jnp.float32)
    if fill_arr.ndim == 0:
        return jnp.broadcast_to(fill_arr, (channels,))
    if fill_arr.shape != (channels,):
        raise ValueError(
            f"{fn}: fill must be a scalar or have one value per channel ({channels}), got shape {fill_arr.shape}"
        )
    return fill_arr


def as_float32(image: jax.Array) -> jax.Array:
    """Math in float32 whatever the storage dtype (bf16 loses too much)."""
    return jnp.asarray(image, jnp.float32)
