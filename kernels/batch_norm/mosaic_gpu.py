"""BatchNorm's statistics, backward sums and affine pass as Mosaic GPU kernels: the "mosaic_gpu" backend of
`batch_norm`.

Same math as `optax_ext.kernels.batch_norm` (see its docstring), on (R, C) rows, per feature c:

    statistics:  block b's shifted mean and M2 of x - K (K = the first row), merged with Chan et al.:
                 mean = K + sum_b n_b mean_b / R,   M2 = sum_b M2_b + sum_b n_b (mean_b - (mean - K))^2
    backward sums:  sum_r dy,   sum_r dy * (x - mean) * rstd
    affine:  out = (x - c) * a + b [+ dy * k]

Tiling, TMA and SMEM are those of `optax_ext.kernels.layer_norm.mosaic_gpu` (shared helpers): a thread
block takes 64 rows, cut into column chunks of <= 128 that TMA copies GMEM -> SMEM, and computes in
the WGMMA register layout, where a column sum over the block is a reduction across the four warps.
The two reductions over rows write one (mean_b, M2_b) or (sum dy, sum dy * xhat) row per block into
(cdiv(R, 64), C) f32 partials that XLA merges, in a fixed order (deterministic, no atomics). The
affine pass writes its output over its input in SMEM (x for y; dy for dx, whose dtype it has).
Shapes the kernels cannot take (`layer_norm.mosaic_gpu.supported`) run the jnp math.

Requires jax >= 0.12.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from optax_ext.kernels.layer_norm import mosaic_gpu as lnm

__all__ = ["affine", "bwd_sums", "stats"]

_F32 = jnp.float32
_ROWS = lnm.BLOCK_ROWS


def _copy_in(refs, bufs, vec_refs, vec_bufs, rows, nc: int, cw: int, bar):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def one(c, carry):
        cols = pl.ds(c * cw, cw)
        for g, s in zip(refs, bufs):
            plgpu.copy_gmem_to_smem(g.at[rows, cols], s.at[c], bar)
        for g, s in zip(vec_refs, vec_bufs):
            plgpu.copy_gmem_to_smem(g.at[cols], s.at[c], bar)
        return carry

    lnm.loop(nc, one)
    plgpu.barrier_wait(bar)


def _copy_partials(bufs, refs, program, nc: int, cw: int):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    plgpu.commit_smem()

    def one(c, carry):
        for s, g in zip(bufs, refs):
            plgpu.copy_smem_to_gmem(s.at[c], g.at[program, pl.ds(c * cw, cw)])
        return carry

    lnm.loop(nc, one)
    plgpu.wait_smem_to_gmem(0)


def _column_sums_kernel(m: int, nc: int, cw: int, kind: str):
    """kind "stats": (mean_b, M2_b) of x - K per block; "sums": (sum dy, sum dy * xhat) per block."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    block, _, col_layout = lnm.layouts()
    ragged_rows = m % _ROWS != 0

    def kernel(*refs):
        if kind == "stats":
            x_ref, k_ref, p0_ref, p1_ref, xs, ks, s0, s1, bar = refs
            rows_in, vecs_in, row_bufs, vec_bufs = [x_ref], [k_ref], [xs], [ks]
        else:
            x_ref, dy_ref, mean_ref, rstd_ref, p0_ref, p1_ref, xs, dys, ms, rs, s0, s1, bar = refs
            rows_in, vecs_in, row_bufs, vec_bufs = [x_ref, dy_ref], [mean_ref, rstd_ref], [xs, dys], [ms, rs]
        program = lax.axis_index(lnm.GRID_AXIS)
        row0 = program * _ROWS
        _copy_in(rows_in, row_bufs, vecs_in, vec_bufs, pl.ds(row0, _ROWS), nc, cw, bar)

        def vec(buf, c):
            return plgpu.load(buf.at[c], layout=col_layout)[None, :]

        def stats_chunk(c, carry):
            # Rows past R read as zero, which is -K after the shift: masked out of both sums.
            xs_c = plgpu.load(xs.at[c], layout=block).astype(_F32) - vec(ks, c)
            valid = None
            if ragged_rows:
                row = row0 + plgpu.broadcasted_iota(jnp.int32, (_ROWS, cw), 0, layout=block)
                valid = row < m
                xs_c = jnp.where(valid, xs_c, 0.0)
            count = jnp.minimum(_ROWS, m - row0).astype(_F32)
            mean = jnp.sum(xs_c, axis=0) / count
            xc = xs_c - mean[None, :]
            if valid is not None:
                xc = jnp.where(valid, xc, 0.0)
            s0.at[c][...] = plgpu.layout_cast(mean, col_layout)
            s1.at[c][...] = plgpu.layout_cast(jnp.sum(xc * xc, axis=0), col_layout)
            return carry

        def sums_chunk(c, carry):
            # Rows past R read as zero dy: they add nothing.
            x = plgpu.load(xs.at[c], layout=block).astype(_F32)
            dy = plgpu.load(dys.at[c], layout=block).astype(_F32)
            xhat = (x - vec(ms, c)) * vec(rs, c)
            s0.at[c][...] = plgpu.layout_cast(jnp.sum(dy, axis=0), col_layout)
            s1.at[c][...] = plgpu.layout_cast(jnp.sum(dy * xhat, axis=0), col_layout)
            return carry

        lnm.loop(nc, stats_chunk if kind == "stats" else sums_chunk)
        _copy_partials([s0, s1], [p0_ref, p1_ref], program, nc, cw)

    return kernel


def _column_sums(kind: str, rows, vectors, *, interpret: bool, name: str):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, n = rows[0].shape
    nc, cw = lnm.chunks(n)
    grid = pl.cdiv(m, _ROWS)
    vec = plgpu.SMEM((nc, cw), _F32)
    part = jax.ShapeDtypeStruct((grid, n), _F32)
    scratch = (
        [lnm.row_buffer(r.dtype, n, nc, cw) for r in rows]
        + [vec] * (len(vectors) + 2)
        + [plgpu.Barrier(num_arrivals=nc * (len(rows) + len(vectors)))]
    )
    vectors = [jnp.reshape(v, (n,)).astype(_F32) for v in vectors]
    kernel = _column_sums_kernel(m, nc, cw, kind)
    return lnm.run_rows(kernel, [part, part], scratch, grid, interpret, name, *rows, *vectors)


def stats(x2, *, interpret: bool):
    """Per-feature (mean, biased var) of (R, C) rows, f32; `lnm.supported(R, C, [x.dtype])` must hold."""
    m = x2.shape[0]
    shift = x2[0].astype(_F32)
    means, m2s = _column_sums("stats", [x2], [shift], interpret=interpret, name="batch_norm_stats")
    # Chan et al.'s merge of the per-block (count, shifted mean, M2); counts from an iota, not a constant
    # (custom_partitioning's per-shard function may not close over one).
    counts = jnp.minimum(_ROWS, m - _ROWS * lax.iota(jnp.int32, means.shape[0])).astype(_F32)[:, None]
    mean = jnp.sum(counts * means, axis=0) / m
    m2 = jnp.sum(m2s, axis=0) + jnp.sum(counts * jnp.square(means - mean), axis=0)
    return shift + mean, m2 / m


def bwd_sums(x2, dy2, mean, rstd, *, interpret: bool):
    """(sum_r dy, sum_r dy * (x - mean) * rstd), f32 (C,); `lnm.supported(R, C, [x.dtype, dy.dtype])`."""
    sdy, sdyx = _column_sums("sums", [x2, dy2], [mean, rstd], interpret=interpret, name="batch_norm_bwd_sums")
    return jnp.sum(sdy, axis=0), jnp.sum(sdyx, axis=0)


def _affine_kernel(nc: int, cw: int, with_dy: bool):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    block, _, col_layout = lnm.layouts()

    def kernel(*refs):
        if with_dy:
            x_ref, dy_ref, c_ref, a_ref, b_ref, k_ref, o_ref, xs, dys, cs, a_s, bs, ks, bar = refs
            rows_in, row_bufs, vecs_in, vec_bufs = (
                [x_ref, dy_ref],
                [xs, dys],
                [c_ref, a_ref, b_ref, k_ref],
                [cs, a_s, bs, ks],
            )
        else:
            x_ref, c_ref, a_ref, b_ref, o_ref, xs, cs, a_s, bs, bar = refs
            rows_in, row_bufs, vecs_in, vec_bufs = [x_ref], [xs], [c_ref, a_ref, b_ref], [cs, a_s, bs]
        rows = pl.ds(lax.axis_index(lnm.GRID_AXIS) * _ROWS, _ROWS)
        _copy_in(rows_in, row_bufs, vecs_in, vec_bufs, rows, nc, cw, bar)
        out_buf = row_bufs[-1]  # the output has this operand's dtype, and its rows are spent once read

        def vec(buf, c):
            return plgpu.load(buf.at[c], layout=col_layout)[None, :]

        def chunk(c, carry):
            x = plgpu.load(xs.at[c], layout=block).astype(_F32)
            out = (x - vec(cs, c)) * vec(a_s, c) + vec(bs, c)
            if with_dy:
                out = out + plgpu.load(dys.at[c], layout=block).astype(_F32) * vec(ks, c)
            out_buf.at[c][...] = out.astype(out_buf.dtype)
            return carry

        lnm.loop(nc, chunk)
        plgpu.commit_smem()

        def copy_out(c, carry):
            plgpu.copy_smem_to_gmem(out_buf.at[c], o_ref.at[rows, pl.ds(c * cw, cw)])
            return carry

        lnm.loop(nc, copy_out)
        plgpu.wait_smem_to_gmem(0)

    return kernel


def affine(x2, c, a, b, dy2=None, k=None, *, out_dtype, interpret: bool):
    """(x - c) * a + b [+ dy * k] on (R, C) rows with per-feature f32 (C,) vectors, in `out_dtype`
    (x's without dy, dy's with it); `lnm.supported(R, C, row dtypes, vectors=4)` must hold."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, n = x2.shape
    nc, cw = lnm.chunks(n)
    rows = [x2] + ([] if dy2 is None else [dy2])
    assert jnp.dtype(out_dtype) == rows[-1].dtype, (out_dtype, rows[-1].dtype)
    vectors = [c, a, b] + ([] if dy2 is None else [k])
    vectors = [jnp.reshape(v, (n,)).astype(_F32) for v in vectors]
    scratch = (
        [lnm.row_buffer(r.dtype, n, nc, cw) for r in rows]
        + [plgpu.SMEM((nc, cw), _F32)] * len(vectors)
        + [plgpu.Barrier(num_arrivals=nc * (len(rows) + len(vectors)))]
    )
    out_type = jax.ShapeDtypeStruct((m, n), jnp.dtype(out_dtype))
    kernel = _affine_kernel(nc, cw, dy2 is not None)
    grid = pl.cdiv(m, _ROWS)
    return lnm.run_rows(kernel, out_type, scratch, grid, interpret, "batch_norm_affine", *rows, *vectors)
