"""Sums of squares in the "per_leaf" form: one `pallas_call` per leaf, for TPU (Mosaic) on request.

`optax_ext.kernels.norms` with `form="per_leaf"` on "mosaic" (or "interpret"): a leaf is a
(rows, 128) slab (`fused_pass.per_leaf.per_leaf_view`) reduced over sublanes to one (1, 128)
partial per block, or (sizes not divisible by 128) 1-D blocks whose partial sum is stored in lane 0
of a (1, 128) row; Pallas pads the last block's reads, the mask zeroes them. `NORM_TPU_BLOCK_ROWS`
= 1024 rows per block (one input, so twice the fused pass's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_ext.kernels import backend as _backend
from optax_ext.kernels.fused_pass.per_leaf import LANES, per_leaf_view

__all__ = ["NORM_TPU_BLOCK_ROWS", "sq_norm"]

NORM_TPU_BLOCK_ROWS = 1024


def _kernel(view, block_shape, count_nonfinite):
    def kernel(x_ref, *o_refs):
        x = x_ref[...].astype(jnp.float32)
        first = pl.program_id(0) * block_shape[0]
        if view[0] % block_shape[0]:  # ragged last block: Pallas pads its reads; zero them
            pos = first + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
            x = jnp.where(pos < view[0], x, 0.0)
        values = [x * x] + ([jnp.where(jnp.isfinite(x), 0.0, 1.0)] if count_nonfinite else [])
        for o_ref, v in zip(o_refs, values):
            if len(view) == 2:
                # Sublane reduction to one (1, 128) row per block; lanes are added in jnp afterwards.
                o_ref[...] = jnp.sum(v, axis=0, keepdims=True).reshape(o_ref.shape)
            else:
                lane = jax.lax.broadcasted_iota(jnp.int32, o_ref.shape, len(o_ref.shape) - 1)
                o_ref[...] = jnp.where(lane == 0, jnp.sum(v), 0.0)

    return kernel


def sq_norm(x, backend, block, count_nonfinite=False):
    view, block_shape = per_leaf_view(x.size, block)
    grid = pl.cdiv(view[0], block_shape[0])
    params = _backend.compiler_params("mosaic", dimension_semantics=("parallel",)) if backend == "mosaic" else None
    index_map = (lambda i: (i,)) if len(view) == 1 else (lambda i: (i, 0))
    outputs = 2 if count_nonfinite else 1
    # (grid, 1, 128): a (1, 128) block whose last two dims equal the array's, as Mosaic needs.
    partials = pl.pallas_call(
        _kernel(view, block_shape, count_nonfinite),
        out_shape=[jax.ShapeDtypeStruct((grid, 1, LANES), jnp.float32)] * outputs,
        grid=(grid,),
        in_specs=[pl.BlockSpec(block_shape, index_map)],
        out_specs=[pl.BlockSpec((None, 1, LANES), lambda i: (i, 0, 0))] * outputs,
        interpret=backend == "interpret",
        compiler_params=params,
        name="sq_norm_rows" if len(view) == 2 else "sq_norm_flat",
    )(jnp.reshape(x, view))
    sums = [jnp.sum(p) for p in partials]
    return tuple(sums) if count_nonfinite else sums[0]
