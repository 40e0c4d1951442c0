"""Per-leaf sums of squares as Pallas kernels: the reductions that feed the fused pass.

`leaf_sq_norms_pallas(leaves, backend=...)` returns `[sum(x**2) in f32 for x in leaves]`; the
square roots are global-norm clipping (Pascanu et al., 2013, "On the difficulty of training
recurrent neural networks") and the LARS/LAMB trust ratios (You et al., 2017/2019).

Each leaf is one kernel over a 1-D grid of blocks; program i writes the partial sum of block i
to its own output slot, and a tiny jnp sum adds the partials. No atomics, so the result is
deterministic run to run. Layouts follow `optax_ext.kernels.fused_pass`: "flat" 1-D blocks on
Triton and in the interpreter, (rows, 128) lane-dense blocks on Mosaic (a < 128-element ragged
tail is summed in jnp). Elements past the end of the array in a ragged last block are zeroed by
an explicit mask (`jnp.where`), never trusted, on every backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_ext.kernels import backend as _backend
from optax_ext.kernels.fused_pass import LANES, _MAX_FLAT, _pow2_at_least

__all__ = ["leaf_sq_norms_pallas", "sq_norm_pallas", "NORM_GPU_BLOCK", "NORM_TPU_BLOCK_ROWS"]

# One input and no outputs to speak of: blocks can be larger than the fused pass's.
NORM_GPU_BLOCK = 8192
NORM_GPU_NUM_WARPS = 8
NORM_TPU_BLOCK_ROWS = 1024
NORM_INTERPRET_BLOCK = 4096

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def _flat_kernel(n_valid, block, grid):
    def partial_sum(x_ref, o_ref, mask):
        if mask is not None:
            from jax.experimental.pallas import triton as plt

            x = jnp.where(mask, plt.load(x_ref, mask=mask).astype(jnp.float32), 0.0)
        else:
            x = x_ref[...].astype(jnp.float32)
        o_ref[...] = jnp.broadcast_to(jnp.sum(x * x), (1,))

    def kernel(x_ref, o_ref):
        if n_valid is None:
            partial_sum(x_ref, o_ref, None)
            return
        # Only the last block masks, so the others keep vectorized loads (see fused_pass).
        last = pl.program_id(0) == grid - 1

        @pl.when(jnp.logical_not(last))
        def _():
            partial_sum(x_ref, o_ref, None)

        @pl.when(last)
        def _():
            idx = (grid - 1) * block + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
            partial_sum(x_ref, o_ref, idx < n_valid)

    return kernel


def _rows_kernel(rows, block_rows):
    def kernel(x_ref, o_ref):
        x = x_ref[...].astype(jnp.float32)
        if rows % block_rows:
            row = pl.program_id(0) * block_rows + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
            x = jnp.where(row < rows, x, 0.0)
        # Sublane reduction to one (1, 128) row per block; lanes are added in jnp afterwards.
        o_ref[...] = jnp.sum(x * x, axis=0, keepdims=True).reshape(o_ref.shape)

    return kernel


def sq_norm_pallas(x: jax.Array, *, backend: str, layout: str | None = None,
                   block: int | None = None) -> jax.Array:
    """sum(x**2) of one array in f32, computed blockwise by a Pallas kernel.

    Args:
      x: array of any shape, dtype f32/bf16/f16.
      backend: "interpret", "triton" or "mosaic".
      layout: "flat" or "rows"; default "rows" on Mosaic, else "flat".
      block: elements ("flat") or rows ("rows") per block; default: the tunables above.
    """
    if backend not in ("interpret", "triton", "mosaic"):
        raise ValueError(f"sq_norm_pallas(backend={backend!r}): expected 'interpret', 'triton' or 'mosaic'.")
    x = jnp.asarray(x)
    if x.dtype not in _FLOATS:
        raise TypeError(f"sq_norm_pallas(x): dtype {x.dtype}; expected one of float32, bfloat16, float16.")
    layout = layout or ("rows" if backend == "mosaic" else "flat")
    if layout not in ("flat", "rows"):
        raise ValueError(f"sq_norm_pallas(layout={layout!r}): expected 'flat' or 'rows'.")
    if block is not None and (not isinstance(block, int) or block < 1):
        raise ValueError(f"sq_norm_pallas(block={block!r}): expected a positive int.")
    n = x.size
    if n == 0:
        return jnp.zeros((), jnp.float32)
    flat = x.reshape(n)
    interpret = backend == "interpret"

    if layout == "flat":
        if n > _MAX_FLAT:
            raise ValueError(f"sq_norm_pallas(x): {n} elements exceed the flat layout's int32 range.")
        b = block or (NORM_GPU_BLOCK if backend == "triton" else NORM_INTERPRET_BLOCK)
        if backend == "triton" and b & (b - 1):
            raise ValueError(f"sq_norm_pallas(block={b}): Triton blocks must be a power of 2.")
        b = min(b, _pow2_at_least(n))
        grid = pl.cdiv(n, b)
        params = (_backend.compiler_params("triton", num_warps=NORM_GPU_NUM_WARPS, num_stages=1)
                  if backend == "triton" else None)
        partials = pl.pallas_call(
            _flat_kernel(None if n % b == 0 else n, b, grid),
            out_shape=jax.ShapeDtypeStruct((grid,), jnp.float32),
            grid=(grid,),
            in_specs=[pl.BlockSpec((b,), lambda i: (i,))],
            out_specs=pl.BlockSpec((1,), lambda i: (i,)),
            interpret=interpret,
            compiler_params=params,
            name="leaf_sq_norm_flat",
        )(flat)
        return jnp.sum(partials)

    rows, tail = divmod(n, LANES)
    total = jnp.zeros((), jnp.float32)
    if rows:
        r = block or NORM_TPU_BLOCK_ROWS
        if r % 8:
            raise ValueError(f"sq_norm_pallas(block={r}): rows per block must be a multiple of 8.")
        r = rows if rows <= r else r
        grid = pl.cdiv(rows, r)
        main = (flat if not tail else flat[: rows * LANES]).reshape(rows, LANES)
        params = (_backend.compiler_params("mosaic", dimension_semantics=("parallel",))
                  if backend == "mosaic" else None)
        # (grid, 1, 128): a (1, 128) block whose last two dims equal the array's, as Mosaic needs.
        partials = pl.pallas_call(
            _rows_kernel(rows, r),
            out_shape=jax.ShapeDtypeStruct((grid, 1, LANES), jnp.float32),
            grid=(grid,),
            in_specs=[pl.BlockSpec((r, LANES), lambda i: (i, 0))],
            out_specs=pl.BlockSpec((None, 1, LANES), lambda i: (i, 0, 0)),
            interpret=interpret,
            compiler_params=params,
            name="leaf_sq_norm_rows",
        )(main)
        total = jnp.sum(partials)
    if tail:
        t = flat[rows * LANES:].astype(jnp.float32)
        total = total + jnp.sum(t * t)
    return total


def leaf_sq_norms_pallas(leaves: Sequence[jax.Array], *, backend: str) -> list[jax.Array]:
    """`[sum(x**2) for x in leaves]`, each a f32 scalar, one deterministic kernel per leaf.

    Args:
      leaves: arrays of any shapes (0-d included), dtypes f32/bf16/f16.
      backend: "interpret", "triton" or "mosaic".
    """
    return [sq_norm_pallas(x, backend=backend) for x in leaves]
