"""LayerNorm and RMSNorm forward and backward as Mosaic GPU kernels: the "mosaic_gpu" backend of `layer_norm`.

Same math as `optax_ext.kernels.layer_norm` (see its docstring), per row x of length N, in f32:

    mean = sum(x) / N,   var = sum((x - mean)^2) / N (two passes),   rstd = 1 / sqrt(var + eps)
    y = (x - mean) * rstd * scale + bias                   (RMSNorm: mean = 0, no bias)
    g = dy * scale,   c1 = sum(g * xhat) / N,   c2 = sum(g) / N   (RMSNorm: c2 = 0)
    dx = rstd * (g - xhat * c1 - c2),   dscale = sum_rows(dy * xhat),   dbias = sum_rows(dy)

Tiling. The input is viewed as (M, N) rows; one thread block (one warpgroup, 128 threads) owns
`BLOCK_ROWS` = 64 rows, the fewest the WGMMA register layout holds. That layout keeps each row in
one warp (16 rows per warp), so the row sums (mean, var, c1, c2) are in-register adds and warp
shuffles, and the backward's column sums (dscale, dbias) a reduction across the four warps. The row
is cut into `NC` column chunks of `CW` <= 128 elements (one TMA box each; a box may be 256 wide,
but a (64, 128) f32 chunk is already 64 registers per thread, and the backward, with x, dy, xhat and
g of a chunk live, takes 245 of the 255 registers ptxas allows at 128 and spills at 256):
the forward copies the block's x, every chunk at once, GMEM -> SMEM with TMA, sweeps the chunks
three times in registers (sum, centred sum of squares, normalise), writes y over x in SMEM and
copies it out; the backward holds x and dy, sweeps twice (c1 and c2; then dx, written over dy, and
the block's column sums). The whole row block stays in SMEM so that x is read from HBM once: 64 x N
x 2 bytes (bf16) per operand against the 227 KiB of an H100 SM, so the forward takes N up to ~1580
in bf16 (~820 in f32) and the backward, which holds two operands, about half (GPT-2's 768 in bf16).
Wider rows would need the row block streamed through SMEM twice; they run the jnp math instead
(`supported`), as do the shapes TMA cannot take (below). A block's copies overlap one another, and
another resident block's compute where SMEM leaves room for two (N up to ~800 in the bf16 forward).

TMA and its limits. TMA clips at the array's end (reads as zero, writes dropped), which is how the
ragged last row block and the ragged last column chunk are handled: the padded columns only need a
mask where x - mean would be nonzero (the forward's variance). The WGMMA layout needs its SMEM tiled
(8 rows x one 16-128 byte swizzle span), and Mosaic GPU tiles the global array the same way, so M
must be a multiple of 8 and N of 8 elements (which also makes each row 16-byte aligned, as TMA
needs); and M >= 64, as a copy's box may not be larger than the array.

The backward writes each block's column sums of dy * xhat and dy into its own row of
(cdiv(M, 64), N) f32 partials, which XLA sums (deterministic, no atomics): each 1/32 of the size of
a bf16 dy.

Requires jax >= 0.12 (`plgpu.kernel`, `plgpu.InterpretGPUParams`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

__all__ = [
    "BLOCK_ROWS",
    "SMEM_BUDGET",
    "backward",
    "chunks",
    "forward",
    "layouts",
    "loop",
    "row_buffer",
    "run_rows",
    "smem_transforms",
    "supported",
]

_F32 = jnp.float32
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

BLOCK_ROWS = 64
"""Rows per thread block: the WGMMA register layout's row tile."""

MAX_CHUNK = 128
"""Columns per chunk and TMA box (see the module docstring for why not 256, a box's limit)."""

SMEM_BUDGET = 216 * 1024
"""Bytes of SMEM buffers per thread block: an H100 SM has 227 KiB; the rest is left for Mosaic
GPU's cross-warp reduction scratch and barriers."""

GRID_AXIS = "row_blocks"


def chunks(n: int) -> tuple[int, int]:
    """(NC, CW): N as NC column chunks of CW <= `MAX_CHUNK` elements, CW a multiple of 8, least padding."""
    first = pl.cdiv(n, MAX_CHUNK)
    options = [(nc, -(-pl.cdiv(n, nc) // 8) * 8) for nc in range(first, first + 4)]
    return min(options, key=lambda o: (o[0] * o[1], o[0]))


def smem_transforms(dtype, n: int, cw: int):
    """SMEM transforms for a row-block buffer: (8, span) tiles, the widest swizzle that divides N and
    CW (fewer bank conflicts); bf16/f16 may fall back to unswizzled 16-byte tiles. None: no tiling fits."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bits = jnp.dtype(dtype).itemsize * 8
    for swizzle in (128, 64, 32):
        span = swizzle * 8 // bits
        if cw % span == 0 and n % span == 0:
            return (plgpu.TilingTransform((8, span)), plgpu.SwizzleTransform(swizzle))
    span = 128 // bits
    if bits < 32 and cw % span == 0 and n % span == 0:
        return (plgpu.TilingTransform((8, span)),)
    return None


def supported(m: int, n: int, row_dtypes, *, vectors: int = 3) -> bool:
    """Whether the kernels take (M, N) rows of `row_dtypes` (the row-block operands held in SMEM: x,
    and dy for the backward; f32, bf16 or f16) with `vectors` f32 (N,) vectors in SMEM; see the module
    docstring for why each condition."""
    if m < BLOCK_ROWS or m % 8 or n % 8 or m * n >= 2**31:
        return False
    if any(jnp.dtype(d) not in _DTYPES for d in row_dtypes):
        return False
    nc, cw = chunks(n)
    if any(smem_transforms(d, n, cw) is None for d in row_dtypes):
        return False
    rows = sum(BLOCK_ROWS * nc * cw * jnp.dtype(d).itemsize for d in row_dtypes)
    return rows + vectors * nc * cw * 4 + 2 * BLOCK_ROWS * 4 <= SMEM_BUDGET


def row_buffer(dtype, n: int, nc: int, cw: int):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.SMEM((nc, BLOCK_ROWS, cw), jnp.dtype(dtype), transforms=smem_transforms(dtype, n, cw))


def loop(nc: int, body, init=None):
    """`body(c, carry)` over the chunks as one loop: the code is emitted once, whatever NC is."""
    return lax.fori_loop(0, nc, body, init)


def layouts():
    from jax.experimental.pallas import mosaic_gpu as plgpu

    wgmma = plgpu.Layout.WGMMA
    return wgmma, wgmma.reduce(1), wgmma.reduce(0)  # (block, per-row vector, per-column vector)


def run_rows(body, out_type, scratch, grid: int, interpret: bool, name: str, *operands):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=(grid,),
        grid_names=(GRID_AXIS,),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name=name,
    )(*operands)


def _fwd_kernel(n: int, nc: int, cw: int, eps: float, rms: bool):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    block, row_layout, col_layout = layouts()
    ragged_cols = nc * cw != n

    def kernel(*refs):
        if rms:
            x_ref, w_ref, y_ref, rstd_ref, xs, ws, rstd_s, bar = refs
            b_ref = mean_ref = bs = mean_s = None
        else:
            x_ref, w_ref, b_ref, y_ref, mean_ref, rstd_ref, xs, ws, bs, mean_s, rstd_s, bar = refs
        rows = pl.ds(lax.axis_index(GRID_AXIS) * BLOCK_ROWS, BLOCK_ROWS)

        def copy_in(c, carry):
            cols = pl.ds(c * cw, cw)
            plgpu.copy_gmem_to_smem(x_ref.at[rows, cols], xs.at[c], bar)
            for g, s in ((w_ref, ws), (b_ref, bs)):
                if g is not None:
                    plgpu.copy_gmem_to_smem(g.at[cols], s.at[c], bar)
            return carry

        loop(nc, copy_in)
        plgpu.barrier_wait(bar)

        def load(c):
            return plgpu.load(xs.at[c], layout=block).astype(_F32)

        zero = jnp.zeros((BLOCK_ROWS,), _F32)
        if rms:
            mean = zero
        else:
            mean = loop(nc, lambda c, acc: acc + jnp.sum(load(c), axis=1), zero) * (1.0 / n)

        def centred(c):
            xc = load(c) - mean[:, None]
            if ragged_cols and not rms:  # TMA's zero padding is -mean after centring
                col = c * cw + plgpu.broadcasted_iota(jnp.int32, (BLOCK_ROWS, cw), 1, layout=block)
                xc = jnp.where(col < n, xc, 0.0)
            return xc

        def square_sum(c, acc):
            xc = centred(c)
            return acc + jnp.sum(xc * xc, axis=1)

        rstd = lax.rsqrt(loop(nc, square_sum, zero) * (1.0 / n) + eps)

        def normalise(c, carry):
            y = centred(c) * rstd[:, None] * plgpu.load(ws.at[c], layout=col_layout)[None, :]
            if bs is not None:
                y = y + plgpu.load(bs.at[c], layout=col_layout)[None, :]
            xs.at[c][...] = y.astype(xs.dtype)
            return carry

        loop(nc, normalise)
        rstd_s[...] = plgpu.layout_cast(rstd, row_layout)
        if mean_s is not None:
            mean_s[...] = plgpu.layout_cast(mean, row_layout)
        plgpu.commit_smem()

        def copy_out(c, carry):
            plgpu.copy_smem_to_gmem(xs.at[c], y_ref.at[rows, pl.ds(c * cw, cw)])
            return carry

        loop(nc, copy_out)
        plgpu.copy_smem_to_gmem(rstd_s, rstd_ref.at[rows])
        if mean_s is not None:
            plgpu.copy_smem_to_gmem(mean_s, mean_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    return kernel


def forward(x2, w, b, eps: float, rms: bool, *, interpret: bool):
    """(y (M, N) in x's dtype, mean (M,) f32 or None, rstd (M,) f32) of (M, N) rows; `supported` must hold.

    `w`, `b`: per-feature (N,) or (1, N) vectors (b ignored for RMSNorm)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, n = x2.shape
    nc, cw = chunks(n)
    feats = [jnp.reshape(w, (n,)).astype(_F32)] + ([] if rms else [jnp.reshape(b, (n,)).astype(_F32)])
    stat = jax.ShapeDtypeStruct((m,), _F32)
    out_type = [jax.ShapeDtypeStruct((m, n), x2.dtype)] + ([] if rms else [stat]) + [stat]
    vec, row_stat = plgpu.SMEM((nc, cw), _F32), plgpu.SMEM((BLOCK_ROWS,), _F32)
    scratch = (
        [row_buffer(x2.dtype, n, nc, cw)]
        + [vec] * len(feats)
        + ([] if rms else [row_stat])
        + [row_stat, plgpu.Barrier(num_arrivals=nc * (1 + len(feats)))]
    )
    outs = run_rows(
        _fwd_kernel(n, nc, cw, eps, rms),
        out_type,
        scratch,
        pl.cdiv(m, BLOCK_ROWS),
        interpret,
        "rms_norm_fwd" if rms else "layer_norm_fwd",
        x2,
        *feats,
    )
    return (outs[0], None, outs[1]) if rms else tuple(outs)


def _bwd_kernel(n: int, nc: int, cw: int, rms: bool):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    block, row_layout, col_layout = layouts()
    inv_n = 1.0 / n

    def kernel(*refs):
        if rms:
            x_ref, dy_ref, w_ref, rstd_ref, dx_ref, dw_ref, xs, dys, ws, rstd_s, dw_s, bar = refs
            mean_ref = db_ref = mean_s = db_s = None
        else:
            x_ref, dy_ref, w_ref, mean_ref, rstd_ref, dx_ref, dw_ref, db_ref = refs[:8]
            xs, dys, ws, mean_s, rstd_s, dw_s, db_s, bar = refs[8:]
        program = lax.axis_index(GRID_AXIS)
        rows = pl.ds(program * BLOCK_ROWS, BLOCK_ROWS)

        def copy_in(c, carry):
            cols = pl.ds(c * cw, cw)
            plgpu.copy_gmem_to_smem(x_ref.at[rows, cols], xs.at[c], bar)
            plgpu.copy_gmem_to_smem(dy_ref.at[rows, cols], dys.at[c], bar)
            plgpu.copy_gmem_to_smem(w_ref.at[cols], ws.at[c], bar)
            return carry

        loop(nc, copy_in)
        plgpu.copy_gmem_to_smem(rstd_ref.at[rows], rstd_s, bar)
        if mean_s is not None:
            plgpu.copy_gmem_to_smem(mean_ref.at[rows], mean_s, bar)
        plgpu.barrier_wait(bar)
        # Rows past M read as zero (x, dy, mean, rstd), so they add nothing to any sum below; so do the
        # padded columns, where dy is zero.
        rstd = plgpu.load(rstd_s, layout=row_layout)
        mean = None if mean_s is None else plgpu.load(mean_s, layout=row_layout)

        def terms(c):
            x = plgpu.load(xs.at[c], layout=block).astype(_F32)
            dy = plgpu.load(dys.at[c], layout=block).astype(_F32)
            xhat = (x if mean is None else x - mean[:, None]) * rstd[:, None]
            return xhat, dy, dy * plgpu.load(ws.at[c], layout=col_layout)[None, :]

        def row_sums(c, acc):
            xhat, _, g = terms(c)
            c1, c2 = acc
            return c1 + jnp.sum(g * xhat, axis=1), c2 + jnp.sum(g, axis=1)

        zero = jnp.zeros((BLOCK_ROWS,), _F32)
        c1, c2 = loop(nc, row_sums, (zero, zero))
        c1, c2 = c1 * inv_n, c2 * inv_n

        def grads(c, carry):
            xhat, dy, g = terms(c)
            dx = g - xhat * c1[:, None]
            if mean is not None:
                dx = dx - c2[:, None]
            dw_s.at[c][...] = plgpu.layout_cast(jnp.sum(dy * xhat, axis=0), col_layout)
            if db_s is not None:
                db_s.at[c][...] = plgpu.layout_cast(jnp.sum(dy, axis=0), col_layout)
            dys.at[c][...] = (dx * rstd[:, None]).astype(dys.dtype)  # dy is spent: dx takes its place
            return carry

        loop(nc, grads)
        plgpu.commit_smem()

        def copy_out(c, carry):
            cols = pl.ds(c * cw, cw)
            plgpu.copy_smem_to_gmem(dys.at[c], dx_ref.at[rows, cols])
            plgpu.copy_smem_to_gmem(dw_s.at[c], dw_ref.at[program, cols])
            if db_s is not None:
                plgpu.copy_smem_to_gmem(db_s.at[c], db_ref.at[program, cols])
            return carry

        loop(nc, copy_out)
        plgpu.wait_smem_to_gmem(0)

    return kernel


def backward(x2, w, mean, rstd, dy2, rms: bool, *, interpret: bool):
    """(dx (M, N) in dy's dtype, dscale (N,) f32, dbias (N,) f32 or None); `supported(M, N, [x.dtype,
    dy.dtype])` must hold. `mean`, `rstd`: (M,) f32 (mean ignored for RMSNorm)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, n = x2.shape
    nc, cw = chunks(n)
    grid = pl.cdiv(m, BLOCK_ROWS)
    stats = ([] if rms else [jnp.reshape(mean, (m,)).astype(_F32)]) + [jnp.reshape(rstd, (m,)).astype(_F32)]
    part = jax.ShapeDtypeStruct((grid, n), _F32)
    out_type = [jax.ShapeDtypeStruct((m, n), dy2.dtype), part] + ([] if rms else [part])
    vec, row_stat = plgpu.SMEM((nc, cw), _F32), plgpu.SMEM((BLOCK_ROWS,), _F32)
    scratch = (
        [row_buffer(x2.dtype, n, nc, cw), row_buffer(dy2.dtype, n, nc, cw), vec]
        + [row_stat] * len(stats)
        + [vec] * (1 if rms else 2)
        + [plgpu.Barrier(num_arrivals=3 * nc + len(stats))]
    )
    outs = run_rows(
        _bwd_kernel(n, nc, cw, rms),
        out_type,
        scratch,
        grid,
        interpret,
        "rms_norm_bwd" if rms else "layer_norm_bwd",
        x2,
        dy2,
        jnp.reshape(w, (n,)).astype(_F32),
        *stats,
    )
    # (grid, N) per-block partials -> (N,), in a fixed order.
    dw = jnp.sum(outs[1], axis=0)
    return outs[0], dw, None if rms else jnp.sum(outs[2], axis=0)
