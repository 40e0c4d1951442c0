"""Which engine runs the kernels: Mosaic GPU or Triton (CUDA), Mosaic (TPU), an interpreter, or XLA.

The backend is read when a function is *traced*. Resolution order: `use_backend(...)` context,
then the `OPTAX_EXT_BACKEND` environment variable (read and checked once, when this module is
imported: a bad value fails there, not deep inside a trace), then the platform of JAX's default
device: cuda -> "mosaic_gpu" on a GPU Mosaic GPU supports (compute capability 9.0 or newer:
Hopper, Blackwell; JAX documents Mosaic GPU for those) with jax >= 0.12, else "triton" (Pallas'
Triton backend, deprecated since jax 0.11); rocm -> "triton"; tpu -> "mosaic"; anything else -> "xla".

Backends: "xla" (no Pallas: jnp that XLA fuses), "triton", "mosaic_gpu", "mosaic" (TPU), and three
interpreters that run the kernels on any device: "interpret" (the generic Pallas interpreter, the
Triton kernels' code path), "mosaic_gpu_interpret" (Mosaic GPU's own interpreter,
`plgpu.InterpretGPUParams`: TMA copies, barriers and SMEM as on the GPU), "mosaic_interpret"
(TPU's own interpreter, `pltpu.InterpretParams`: the "mosaic" kernels' DMAs, semaphores, VMEM and
SMEM as on the TPU; LayerNorm, RMSNorm and BatchNorm run their "mosaic" kernels there too). Ops without
a kernel for a backend run their jnp math there (on "mosaic_gpu" and "mosaic_gpu_interpret", the
LayerNorm, RMSNorm and BatchNorm shapes their kernels cannot take: see `layer_norm.mosaic_gpu.supported`).

`use_backend` is a `jax.make_user_context`: its value is part of `jax.jit`'s cache key, so a
function jitted under one backend is traced again, not silently reused, under another.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import jax

BACKENDS = ("xla", "interpret", "triton", "mosaic", "mosaic_interpret", "mosaic_gpu", "mosaic_gpu_interpret")
"""Valid backend names (see the module docstring)."""

MOSAIC_GPU_BACKENDS = ("mosaic_gpu", "mosaic_gpu_interpret")

MOSAIC_TPU_BACKENDS = ("mosaic", "mosaic_interpret")

MOSAIC_GPU_MIN_JAX = (0, 12)
"""The oldest jax the Mosaic GPU kernels are written and tested against (`plgpu.kernel` with
`jax.new_ref` operands, `plgpu.InterpretGPUParams`)."""

MOSAIC_GPU_MIN_CAPABILITY = (9, 0)

ENV_VAR = "OPTAX_EXT_BACKEND"

_NO_SPECIAL_FUNCTIONS = frozenset(
    {
        "bessel_i0e",
        "bessel_i1e",
        "digamma",
        "erfc",
        "igamma",
        "igammac",
        "lgamma",
        "polygamma",
        "zeta",
        "copy",
        "copy_p",
    }
)
CANNOT_LOWER: dict[str, frozenset[str]] = {
    "triton": _NO_SPECIAL_FUNCTIONS | {"erf", "reduce_precision", "round"},
    "mosaic_gpu": _NO_SPECIAL_FUNCTIONS
    | {"acos", "acosh", "asin", "asinh", "atan", "atanh", "cbrt", "ceil", "cosh", "erf_inv", "expm1", "floor"}
    | {"is_finite", "log1p", "nextafter", "pow", "reduce_precision", "rem", "sinh", "tan"},
    "mosaic": _NO_SPECIAL_FUNCTIONS
    | {"acos", "acosh", "asin", "asinh", "atan", "atanh", "cbrt", "cosh", "expm1", "reduce_precision", "sinh"},
}
"""Elementwise primitives (of those a `Rule.element` may use) that a backend's Pallas lowering cannot
lower on some supported jax (0.10.2 to 0.12; `tests/test_kernels_primitives.py` lowers every other
one on each backend). A fused run whose math uses one of them runs on XLA on that backend (see
`optax_ext.kernels.elementwise.run_fused`). The interpreters evaluate any primitive."""


def unlowerable(name: str, primitives) -> frozenset[str]:
    """Which of `primitives` (names) the kernels of backend `name` cannot lower."""
    return CANNOT_LOWER.get(name, frozenset()).intersection(primitives)


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


def is_mosaic_gpu(name: str) -> bool:
    """True for the Mosaic GPU backend and its interpreter."""
    return name in MOSAIC_GPU_BACKENDS


def is_mosaic_tpu(name: str) -> bool:
    """True for the TPU (Mosaic) backend and its interpreter."""
    return name in MOSAIC_TPU_BACKENDS


def mosaic_gpu_available() -> bool:
    """Whether the installed jax has the Mosaic GPU API our kernels use (jax >= `MOSAIC_GPU_MIN_JAX`)."""
    from optax_ext.kernels._compat import JAX_VERSION

    return JAX_VERSION[:2] >= MOSAIC_GPU_MIN_JAX


def require_mosaic_gpu(name: str) -> None:
    """Raise a clear error when backend `name` is a Mosaic GPU one and this jax is too old for it."""
    if is_mosaic_gpu(name) and not mosaic_gpu_available():
        raise RuntimeError(
            f"backend {name!r} needs jax >= {'.'.join(map(str, MOSAIC_GPU_MIN_JAX))} (installed: {jax.__version__}); "
            f"upgrade jax, or use the 'triton' backend (OPTAX_EXT_BACKEND=triton) on this version."
        )


def _cuda_default() -> str:
    """ "mosaic_gpu" where this jax has it and the GPU is one it supports (Hopper or newer), else "triton"."""
    if not mosaic_gpu_available():
        return "triton"
    try:
        capability = tuple(int(p) for p in str(jax.devices()[0].compute_capability).split(".")[:2])
    except (AttributeError, ValueError):
        return "triton"
    return "mosaic_gpu" if capability >= MOSAIC_GPU_MIN_CAPABILITY else "triton"


def platform_backend() -> str:
    """The backend JAX's default device calls for, ignoring any override."""
    platform = jax.default_backend()
    if platform in ("gpu", "cuda"):
        return _cuda_default()
    if platform == "rocm":
        return "triton"
    if platform == "tpu":
        return "mosaic"
    return "xla"


def get_backend() -> str:
    """The backend in force now (context manager > environment variable > platform)."""
    name = _override.value
    if name is None:
        name = _ENVIRONMENT if _ENVIRONMENT is not None else platform_backend()
    if name == "triton":  # about to trace Triton kernels: make their lowering skip futile imports
        from optax_ext.kernels._compat import skip_absent_triton_dialect_imports

        skip_absent_triton_dialect_imports()
    elif name == "mosaic_gpu":  # about to lower Mosaic GPU kernels: one lowering cost made linear
        from optax_ext.kernels._compat import remember_mosaic_gpu_scratch

        remember_mosaic_gpu_scratch()
    return name


def explicit_backend() -> str | None:
    """The backend chosen with `use_backend` or `OPTAX_EXT_BACKEND`, or None (the platform's applies)."""
    return _override.value if _override.value is not None else _ENVIRONMENT


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
