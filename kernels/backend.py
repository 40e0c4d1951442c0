"""Which engine runs the kernels: Triton (CUDA), Mosaic (TPU), the Pallas interpreter, or XLA.

The backend is read when a function is *traced*. Resolution order: `use_backend(...)` context,
then the `OPTAX_EXT_BACKEND` environment variable (read and checked once, when this module is
imported: a bad value fails there, not deep inside a trace), then the platform of JAX's default
device (cuda/rocm -> "triton", tpu -> "mosaic", anything else -> "xla").

`use_backend` is a `jax.make_user_context`: its value is part of `jax.jit`'s cache key, so a
function jitted under one backend is traced again, not silently reused, under another.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import jax

BACKENDS = ("xla", "interpret", "triton", "mosaic")
"""Valid backend names. `interpret` runs the Pallas kernels in the Pallas interpreter (any device)."""

ENV_VAR = "OPTAX_EXT_BACKEND"


def _check(name, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}.")
    return name


def _from_environment() -> str | None:
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return _check(env, f"environment variable {ENV_VAR}") if env else None


_ENVIRONMENT = _from_environment()

# Part of jit's cache key (see the module docstring).
_override = jax.make_user_context(default_value=None)


def platform_backend() -> str:
    """The backend JAX's default device calls for, ignoring any override."""
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "triton"
    if platform == "tpu":
        return "mosaic"
    return "xla"


def get_backend() -> str:
    """The backend in force now (context manager > environment variable > platform)."""
    name = _override.value
    if name is not None:
        return name
    if _ENVIRONMENT is not None:
        return _ENVIRONMENT
    return platform_backend()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Force a backend inside a `with` block (at trace time), e.g. `use_backend("interpret")`.

    Forcing "triton" or "mosaic" on a machine without that hardware is allowed: it is how the
    kernels are lowered for CUDA and TPU from a CPU (`optax_ext.kernels.lower_for`).
    """
    with _override(_check(name, "use_backend(name)")):
        yield name


def is_pallas(name: str | None = None) -> bool:
    """True when the backend runs Pallas kernels (every backend but "xla")."""
    return (name or get_backend()) != "xla"


def compiler_params(name: str, *, num_warps: int = 4, num_stages: int = 1, dimension_semantics=None):
    """Compiler params for `pl.pallas_call` on this backend (None for interpret/xla)."""
    if name == "triton":
        from jax.experimental.pallas import triton as pl_triton

        return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    if name == "mosaic":
        from jax.experimental.pallas import tpu as pl_tpu

        return pl_tpu.CompilerParams(dimension_semantics=dimension_semantics)
    return None
