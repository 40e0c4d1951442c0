"""Compile a step for a GPU this machine does not have ("deviceless AOT"), to read XLA's own program.

The lowered StableHLO (`lower_for`) shows which kernels a step calls; what a GPU runs is XLA's
*compiled* program: its fusions (a launch each), the copies its copy insertion adds, its buffer
assignment (temp memory, which donated inputs alias which outputs). XLA's GPU compiler runs on any
host given a description of the target, so from a CPU machine:

    compiled = optax_ext.kernels.aot.compile_for(step, params, opt_state, grads, target="h100")
    compiled.as_text()            # the optimized, scheduled HLO for an H100
    compiled.memory_analysis()    # temp_size_in_bytes, alias_size_in_bytes, ...

Pallas kernels are compiled for the target too (Triton to PTX to SASS for sm_90), so a kernel that
asks for more shared memory than the target has fails here as it would on the device.

Needs JAX's CUDA plugin (`pip install "optax_ext[gpu-aot]"`, i.e. `jax[cuda13]`; no GPU, driver or
CUDA install needed) and, on a machine without a GPU, `JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` in the
environment before JAX first initializes its backends: the plugin checks the CUDA libraries'
versions against a driver and, when that check fails, is not loaded at all. Targets are text
protos in `targets/` (`TARGETS`), each with the sources of its numbers.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from optax_ext.kernels.backend import explicit_backend, use_backend

__all__ = ["TARGETS", "AotUnavailableError", "available", "compile_for", "target_mesh"]

TARGETS = {"h100": "h100_sxm.txtpb"}
"""GPU targets by name: their `xla.GpuTargetConfigProto` files in optax_ext/kernels/targets/."""


class AotUnavailableError(RuntimeError):
    """This installation cannot compile for a GPU target (the message says what is missing)."""


def _cuda_plugin_installed() -> bool:
    if importlib.util.find_spec("jax_plugins") is None:
        return False
    return any(importlib.util.find_spec(f"jax_plugins.xla_{v}") is not None for v in ("cuda13", "cuda12"))


@functools.cache
def target_mesh(target: str = "h100") -> jax.sharding.Mesh:
    """A one-device mesh of the GPU `target` (see `TARGETS`), for arguments and `use_abstract_mesh`."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r}: expected one of {', '.join(sorted(TARGETS))}.")
    from jax.experimental import topologies

    config = (Path(__file__).parent / "targets" / TARGETS[target]).read_text()
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=config, topology="1x1x1")
    except (NotImplementedError, RuntimeError) as e:
        if not _cuda_plugin_installed():
            hint = 'JAX\'s CUDA plugin is not installed: pip install "optax_ext[gpu-aot]" (jax[cuda13]).'
        else:
            hint = (
                "JAX's CUDA plugin is installed but did not load. Without a GPU its CUDA version check fails and "
                "disables it: set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 in the environment before JAX initializes its "
                "backends (before the first array or jax.devices() call)."
            )
        raise AotUnavailableError(f"Cannot compile for target {target!r}: {hint} (JAX said: {e})") from e
    return topologies.make_mesh(topology, (1,), ("_target",))


@functools.cache
def available(target: str = "h100") -> bool:
    """Whether `compile_for(..., target=target)` can run here."""
    try:
        target_mesh(target)
    except AotUnavailableError:
        return False
    return True


def compile_for(
    fn: Callable,
    *args,
    target: str = "h100",
    backend: str | None = "default",
    donate_argnums: int | Sequence[int] = (),
) -> jax.stages.Compiled:
    """`fn` traced on `args` and compiled by XLA for the GPU `target`, on this machine.

    Args:
      fn: a function or a jitted function. A jitted one keeps its own options (donation, static
        arguments); a plain one is jitted here with `donate_argnums`.
      *args: its arguments: arrays or `jax.ShapeDtypeStruct`s (only shapes and dtypes matter;
        nothing is allocated). Other leaves (Python scalars) pass through.
      target: a name in `TARGETS`.
      backend: the kernel backend to trace with. "default": one chosen with `use_backend` or
        `OPTAX_EXT_BACKEND`, else "triton" (the Triton kernels' step; pass "mosaic_gpu" for the
        Mosaic GPU backend, the default on an H100 with jax >= 0.12); None: `get_backend()`.
      donate_argnums: for a plain `fn`, as for `jax.jit`.

    Raises `AotUnavailableError` (saying what to install or set) where this cannot run.
    """
    mesh = target_mesh(target)
    replicated = NamedSharding(mesh, PartitionSpec())

    def on_target(x):
        if isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)):
            sharding = getattr(x, "sharding", None)
            if sharding is not None and len(sharding.device_set) > 1:
                raise ValueError(
                    f"compile_for compiles for one {target} GPU; got an argument of shape {x.shape} sharded over "
                    f"{len(sharding.device_set)} devices. Pass it unsharded (a jax.ShapeDtypeStruct)."
                )
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
        return x

    args = jax.tree.map(on_target, args)
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn, donate_argnums=donate_argnums)
    if backend == "default":
        backend = explicit_backend() or "triton"
    kernels = use_backend(backend) if backend is not None else contextlib.nullcontext()
    with kernels, jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jitted.trace(*args).lower().compile()
