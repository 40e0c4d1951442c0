"""Sums of squares over many leaves as Pallas kernels: the reductions that feed the fused pass.

`leaf_sq_norms_pallas(leaves, backend=...)` returns `[sum(x**2) in f32 for x in leaves]` and
`global_sq_norm_pallas` their total; the square roots are global-norm clipping (Pascanu et al.,
2013, "On the difficulty of training recurrent neural networks") and the LARS/LAMB trust ratios
(You et al., 2017/2019).

Every program writes the f32 partial sum of one block to its own slot of a `partials` vector;
a tiny jnp reduction adds the partials, leaf by leaf for per-leaf norms (a static slice of the
partials per leaf) or all at once for the global norm. No atomics and a fixed order: the result
is deterministic run to run. Same two forms as `optax_ext.kernels.fused_pass`:
  * "multi_tensor" (every backend by default): many leaves per launch, each its own ref, one
    program per block of any leaf, a switch on the leaf around the copies or loads: `norms.triton`
    (Triton, Pallas' interpreter), `norms.mosaic_gpu` (TMA through SMEM), `norms.mosaic_tpu`
    (double-buffered DMA through VMEM).
  * "per_leaf" (TPU, on request): one call per leaf, BlockSpec'd blocks: `norms.per_leaf`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from optax_ext.kernels import backend as _backend
from optax_ext.kernels import multi_tensor as mt
from optax_ext.kernels.elementwise import PALLAS_DTYPES
from optax_ext.kernels.fused_pass import BACKENDS, FORMS, default_form
from optax_ext.kernels.fused_pass.per_leaf import per_leaf_view
from optax_ext.kernels.norms import per_leaf as norms_per_leaf
from optax_ext.kernels.norms import triton as norms_triton
from optax_ext.kernels.norms.triton import NORM_GPU_BLOCK, NORM_MAX_LEAVES

__all__ = ["NORM_GPU_BLOCK", "NORM_MAX_LEAVES", "global_sq_norm_pallas", "leaf_sq_norms_pallas"]


def _validate(leaves, backend, form, block):
    if backend not in BACKENDS:
        raise ValueError(f"leaf_sq_norms_pallas(backend={backend!r}): expected one of {', '.join(BACKENDS)}.")
    if form == "per_leaf" and (_backend.is_mosaic_gpu(backend) or backend == "mosaic_interpret"):
        raise ValueError(f"leaf_sq_norms_pallas(form='per_leaf'): backend {backend!r} runs the 'multi_tensor' form.")
    _backend.require_mosaic_gpu(backend)
    if form not in FORMS:
        raise ValueError(f"leaf_sq_norms_pallas(form={form!r}): expected 'multi_tensor' or 'per_leaf'.")
    if block is not None and (not isinstance(block, int) or block < 1):
        raise ValueError(f"leaf_sq_norms_pallas(block={block!r}): expected a positive int.")
    if block is not None and form == "multi_tensor" and block & (block - 1):
        raise ValueError(f"leaf_sq_norms_pallas(block={block}): multi-tensor blocks must be a power of 2.")
    if block is not None and form == "per_leaf" and block % 8:
        raise ValueError(f"leaf_sq_norms_pallas(block={block}): per-leaf blocks (rows) must be a multiple of 8.")
    for i, x in enumerate(leaves):
        if jnp.result_type(x) not in PALLAS_DTYPES:
            raise TypeError(
                f"leaf_sq_norms_pallas(leaves): leaf {i} has dtype {jnp.result_type(x)}; expected one of "
                f"float32, bfloat16, float16."
            )


def _default_block(backend: str) -> int:
    """Elements per program of a multi-tensor launch on `backend`."""
    if _backend.is_mosaic_gpu(backend):
        from optax_ext.kernels.norms.mosaic_gpu import NORM_MOSAIC_GPU_BLOCK

        return NORM_MOSAIC_GPU_BLOCK
    if _backend.is_mosaic_tpu(backend):
        from optax_ext.kernels.norms.mosaic_tpu import NORM_MOSAIC_TPU_BLOCK

        return NORM_MOSAIC_TPU_BLOCK
    return norms_triton.NORM_GPU_BLOCK if backend == "triton" else norms_triton.NORM_INTERPRET_BLOCK


def _multi_tensor_partials(leaves, backend, block, count_nonfinite=False) -> list[tuple[mt.Launch, list, list]]:
    """Per launch: its plan, its leaves (indices into `leaves`) and `[partials]` (+ `nonfinite`
    partials): the sums of program j's block. Mosaic GPU and TPU group leaves by dtype, so a
    launch's leaves need not be consecutive."""
    if _backend.is_mosaic_gpu(backend):
        from optax_ext.kernels.norms import mosaic_gpu as norms_mosaic_gpu

        interpret = backend == "mosaic_gpu_interpret"
        return norms_mosaic_gpu.partials(leaves, interpret=interpret, block=block, count_nonfinite=count_nonfinite)
    if _backend.is_mosaic_tpu(backend):
        from optax_ext.kernels.norms import mosaic_tpu as norms_mosaic_tpu

        interpret = backend == "mosaic_interpret"
        return norms_mosaic_tpu.partials(leaves, interpret=interpret, block=block, count_nonfinite=count_nonfinite)
    return norms_triton.partials(leaves, backend=backend, block=block, count_nonfinite=count_nonfinite)


def _reference(x):
    x = jnp.asarray(x, jnp.float32)
    return jnp.sum(x * x)


def leaf_sq_norms_pallas(
    leaves: Sequence[jax.Array], *, backend: str, form: str | None = None, block: int | None = None
) -> list[jax.Array]:
    """`[sum(x**2) for x in leaves]`, each a f32 scalar, from deterministic Pallas kernels.

    Args:
      leaves: arrays of any shapes (0-d and empty included), dtypes f32/bf16/f16.
      backend: "interpret", "triton", "mosaic", "mosaic_interpret", "mosaic_gpu" or
        "mosaic_gpu_interpret".
      form: "multi_tensor" or "per_leaf" (see the module docstring); default: per backend.
      block: elements per program (multi_tensor, a power of 2) or rows per block (per_leaf, a
        multiple of 8; 1-D views use `block * 128` elements); default: the backend's own.
    """
    form = form or default_form(backend)
    _validate(leaves, backend, form, block)
    sums: list = [None] * len(leaves)
    if form == "per_leaf":
        rows = block or norms_per_leaf.NORM_TPU_BLOCK_ROWS
        for i, x in enumerate(leaves):
            if x.size and per_leaf_view(x.size, rows) is not None:
                sums[i] = norms_per_leaf.sq_norm(x, backend, rows)
    else:
        for launch, members, (partials,) in _multi_tensor_partials(leaves, backend, block or _default_block(backend)):
            for i, seg in zip(members, launch.segments):
                sums[i] = jnp.sum(partials[seg.start : seg.start + launch.num_blocks(seg)])
    # Empty leaves, and a huge leaf the kernels cannot address, in jnp.
    return [s if s is not None else _reference(x) for s, x in zip(sums, leaves)]


def global_sq_norm_pallas(
    leaves: Sequence[jax.Array],
    *,
    backend: str,
    form: str | None = None,
    block: int | None = None,
    count_nonfinite: bool = False,
):
    """`sum over leaves of sum(x**2)` in f32: one partial per block, one reduction per launch.

    With `count_nonfinite`, returns `(sum, count)` where `count` is the number of NaN or infinite
    elements, from the same pass over the data (`apply_if_finite`'s test: a sum of squares alone
    would also overflow on large finite values).
    """
    form = form or default_form(backend)
    _validate(leaves, backend, form, block)
    total, count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    covered = set()
    if form == "per_leaf":
        rows = block or norms_per_leaf.NORM_TPU_BLOCK_ROWS
        for i, x in enumerate(leaves):
            if x.size and per_leaf_view(x.size, rows) is not None:
                out = norms_per_leaf.sq_norm(x, backend, rows, count_nonfinite)
                total, count = (total + out[0], count + out[1]) if count_nonfinite else (total + out, count)
                covered.add(i)
    else:
        b = block or _default_block(backend)
        for _, members, partials in _multi_tensor_partials(leaves, backend, b, count_nonfinite):
            total = total + jnp.sum(partials[0])
            if count_nonfinite:
                count = count + jnp.sum(partials[1])
            covered.update(members)
    for i, x in enumerate(leaves):
        if i not in covered:
            total = total + _reference(x)
            count = count + jnp.sum(jnp.where(jnp.isfinite(x), 0.0, 1.0))
    return (total, count) if count_nonfinite else total
