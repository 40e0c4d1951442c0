"""Lower a step for CUDA or TPU from any machine, to read what the accelerator would run.

`lower_for(fn, *args, platform="cuda")` is `jax.jit(fn).trace(*args).lower(lowering_platforms=...)`
with the two things that need saying: the kernel backend that platform uses (Triton on CUDA,
Mosaic on TPU, unless one is forced) and, off that accelerator, the abstract target device Pallas
asks about while lowering (`lowering_target`, an H100 or a TPU v5e by default). The result is
JAX's `Lowered`: `.as_text()` is the StableHLO, where kernel custom calls and XLA ops can be
counted (every kernel lowers or this fails, which is what CI checks for each backend).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax.sharding import NamedSharding

from optax_ext.kernels._compat import lowering_target
from optax_ext.kernels.backend import use_backend

__all__ = ["PLATFORM_BACKENDS", "lower_for"]

PLATFORM_BACKENDS = {"cuda": "triton", "tpu": "mosaic"}
"""The kernel backend each lowering platform gets by default."""


def lower_for(
    fn: Callable,
    *args,
    platform: str = "cuda",
    backend: str | None = None,
    donate_argnums: int | Sequence[int] = (),
    mesh=None,
) -> jax.stages.Lowered:
    """`fn` jitted, traced on `args` (arrays or `jax.ShapeDtypeStruct`s) and lowered for `platform`.

    Args:
      fn: the function to lower (a step, a kernel call); jitted here with `donate_argnums`.
      *args: its arguments; only shapes, dtypes and shardings matter.
      platform: "cuda" or "tpu".
      backend: the kernel backend (default `PLATFORM_BACKENDS[platform]`).
      donate_argnums: as for `jax.jit`.
      mesh: the mesh the arguments are sharded over (default: that of the first argument sharded
        over several devices, if any). It is lowered for the same mesh of target devices, and the
        arguments are retyped onto it (shapes, dtypes and specs unchanged).
    """
    if platform not in PLATFORM_BACKENDS:
        raise ValueError(f"lower_for(platform={platform!r}): expected one of {', '.join(PLATFORM_BACKENDS)}.")
    if mesh is None:
        mesh = _mesh_of(args)
    with use_backend(backend or PLATFORM_BACKENDS[platform]), lowering_target(platform, mesh=mesh) as target:
        if mesh is not None:
            args = _on_mesh(args, target)
        return jax.jit(fn, donate_argnums=donate_argnums).trace(*args).lower(lowering_platforms=(platform,))


def _mesh_of(args):
    """The mesh of the first argument leaf sharded over a multi-device mesh, or None."""
    for x in jax.tree.leaves(args):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def _on_mesh(args, target):
    """Arguments as abstract values sharded the same way over `target` (the mesh with the target
    device): under Explicit axes an array's type carries its mesh, which must be the one in context."""

    def one(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.axis_names == target.axis_names:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(target, sharding.spec))
        return x

    return jax.tree.map(one, args)
