"""The fused pass in its "per_leaf" form: one `pallas_call` per leaf, for TPU (Mosaic) on request.

`fused_pass_pallas(..., form="per_leaf")` on "mosaic" (or "interpret"): BlockSpec'd refs that
Mosaic pipelines through VMEM itself. A leaf whose size is a multiple of 128 is viewed as a
lane-dense (rows, 128) slab in (`TPU_BLOCK_ROWS`, 128) blocks; any other leaf as 1-D blocks of
`TPU_FLAT_BLOCK` elements (a multiple of 1024, one f32 vreg), whose partial last block Pallas reads
padded and writes clipped. Kept beside the multi-tensor form (`fused_pass.mosaic_tpu`) as a
comparison point for a TPU: no leaf switch and no hand-written DMA, at one call per leaf.

Tunables: 512 rows of f32 (or 64K elements of a 1-D view) = 256 KiB per buffer, so even a
5-input/4-output body double-buffered stays below 5 MiB of VMEM. Quantized storage is not on this
form: such jobs return None and the caller runs them on XLA.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_ext.kernels import backend as _backend
from optax_ext.kernels import multi_tensor as mt
from optax_ext.kernels.elementwise import Job, quantized_formats
from optax_ext.kernels.fused_pass.scalars import ScalarRef, check_outputs, scalar_vector

__all__ = ["LANES", "TPU_BLOCK_ROWS", "TPU_FLAT_BLOCK", "fused_pass_per_leaf", "per_leaf_view"]

TPU_BLOCK_ROWS = 512
TPU_FLAT_BLOCK = 512 * 128
TPU_FLAT_ALIGN = 1024
LANES = 128


def _compiler_params(backend: str):
    if backend == "mosaic":
        return _backend.compiler_params("mosaic", dimension_semantics=("parallel",))
    return None


def _kernel(body, n_in, n_out, n_shared, width, block_shape):
    def kernel(*refs):
        ins, s_ref, t_ref, outs = refs[:n_in], refs[n_in], refs[n_in + 1], refs[n_in + 2 :]
        ys = list(body([r[...].astype(jnp.float32) for r in ins], ScalarRef(s_ref, n_shared), ScalarRef(t_ref, width)))
        check_outputs(ys, n_out)
        for r, y in zip(outs, ys):
            r[...] = jnp.broadcast_to(jnp.asarray(y, jnp.float32), block_shape).astype(r.dtype)

    return kernel


def per_leaf_view(n: int, block: int | None) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(view, block shape) of an n-element leaf on TPU: (rows, 128) slabs or 1-D blocks; None if too big."""
    rows, tail = divmod(n, LANES)
    if not tail:
        r = block or TPU_BLOCK_ROWS
        return (rows, LANES), (min(r, rows), LANES)  # a block equal to the full array is always legal
    if n > mt.INDEX_LIMIT:
        return None
    b = (block * LANES) if block else TPU_FLAT_BLOCK
    # Below one aligned block, the whole array is the block (always legal); above, aligned blocks
    # and a partial last block.
    return (n,), ((n,) if n < TPU_FLAT_ALIGN else (min(b, n // TPU_FLAT_ALIGN * TPU_FLAT_ALIGN),))


def _call(body, job, shared, backend, block):
    shape = jnp.shape(job.inputs[0])
    n = job.inputs[0].size
    view, block_shape = per_leaf_view(n, block)
    grid = pl.cdiv(view[0], block_shape[0])
    index_map = (lambda i: (i,)) if len(view) == 1 else (lambda i: (i, 0))
    data_spec = pl.BlockSpec(block_shape, index_map)
    svec, table = scalar_vector(shared), scalar_vector(job.scalars)
    if backend == "mosaic":
        from jax.experimental.pallas import tpu as pltpu

        s_specs = [pl.BlockSpec(memory_space=pltpu.SMEM)] * 2
    else:
        s_specs = [pl.BlockSpec(svec.shape, lambda i: (0,)), pl.BlockSpec(table.shape, lambda i: (0,))]
    n_in, n_out = len(job.inputs), len(job.out_dtypes)
    outs = pl.pallas_call(
        _kernel(body, n_in, n_out, shared.shape[0], job.scalars.shape[0], block_shape),
        out_shape=[jax.ShapeDtypeStruct(view, jnp.dtype(d)) for d in job.out_dtypes],
        grid=(grid,),
        in_specs=[data_spec] * n_in + s_specs,
        out_specs=[data_spec] * n_out,
        input_output_aliases=dict(job.aliases),
        interpret=backend == "interpret",
        compiler_params=_compiler_params(backend),
        name="fused_pass_rows" if len(view) == 2 else "fused_pass_flat",
    )(*[jnp.reshape(x, view) for x in job.inputs], svec, table)
    return [o.reshape(shape) for o in outs]


def fused_pass_per_leaf(body, jobs: Sequence[Job], shared, *, backend: str, block: int | None = None) -> list:
    """`fused_pass_pallas(..., form="per_leaf")`. Jobs are validated by the caller. Per job its
    outputs, or None for a job left to the caller's XLA path (quantized, or no usable view)."""
    results: list = []
    for job in jobs:
        if quantized_formats(job):
            results.append(None)
        elif jnp.size(job.inputs[0]) == 0:
            results.append([jnp.zeros(jnp.shape(job.inputs[0]), d) for d in job.out_dtypes])
        elif per_leaf_view(job.inputs[0].size, block) is None:
            results.append(None)
        else:
            results.append(_call(body, job, shared, backend, block))
    return results
