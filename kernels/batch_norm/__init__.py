"""BatchNorm statistics and training-mode BatchNorm: Pallas kernels, jnp references, custom VJPs.

Batch normalization (Ioffe & Szegedy, 2015, https://arxiv.org/abs/1502.03167) over all axes but
the last (feature) axis, for (N, C) and NHWC inputs viewed as (R, C) rows, R = N*H*W:

    mean = sum_r x / R,   var = sum_r (x - mean)^2 / R   (biased, as flax stores it)
    xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps),   y = xhat * scale + bias

Statistics in one pass over the data: each row block computes its own (count, mean, M2) of the
shifted data x - K (K = the first row, so sums stay small when |mean| >> std) with a two-pass
centred sum *inside the block* (data already in registers/VMEM), and these are merged with Chan
et al.'s parallel formula (Chan, Golub & LeVeque, 1979), for two sets a, b with n = n_a + n_b:

    d = mean_b - mean_a,   mean = mean_a + d n_b / n,   M2 = M2_a + M2_b + d^2 n_a n_b / n

so no E[x^2] - E[x]^2 cancellation anywhere (mean 1e3, std 1e-2 in f32 normalises to unit std).
The reductions run on the persistent grid of `blocks.py` (`persistent_row_call`): P programs,
each merging its own row blocks in a fixed order into one (count_p, mean_p, M2_p) (the running
count before its k-th block is k * block_rows: only the array's last block can be ragged), and
the P results are merged in XLA, mean = K + sum_p n_p mean_p / R,
M2 = sum_p M2_p + sum_p n_p (mean_p - (mean - K))^2. Partials are (P, 1, C) f32 whatever R is;
one per row block grew with R (at C = 8192 on Triton, 2-row blocks: each of the two partials as
large as a bf16 x).

Backward of y (and of the returned mean/var, with cotangents dmean, dvar), s = scale:

    dbias = sum_r dy,   dscale = sum_r dy * xhat
    dx = s*rstd*dy + (dmean - s*rstd*dbias) / R + 2 (x - mean) (dvar - s*rstd^2*dscale/2) / R

computed as one reduction kernel (persistent grid: (P, 1, C) partials of dbias/dscale, summed by
XLA) and one elementwise kernel.
Every elementwise pass is the same "affine" kernel: out = (x - c) * a + b [+ k * dy].
Tiling/masking conventions are those of `blocks.py` (shared with `layer_norm`). On "mosaic_gpu" the
kernels are `batch_norm.mosaic_gpu`'s, for the shapes they take (jnp for the others).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from optax_ext.kernels.backend import get_backend, is_mosaic_gpu, mosaic_gpu_available
from optax_ext.kernels.batch_norm import mosaic_gpu as bnm
from optax_ext.kernels.blocks import (
    Tiling,
    block_mask,
    call_params,
    check_operands,
    feature_spec,
    interpret_mode,
    layout_for,
    load_f32,
    make_tiling,
    out_struct,
    per_rows,
    persistent_row_call,
    row_loop,
    row_spec,
    store,
    use_pallas,
)
from optax_ext.kernels.layer_norm import mosaic_gpu as lnm

__all__ = [
    "batch_norm",
    "batch_norm_reference",
    "batch_norm_stats",
    "batch_norm_stats_reference",
]

_F32 = jnp.float32
_STATS_BLOCK = {"triton": 16384, "mosaic": 1 << 18}
_AFFINE_BLOCK = {"triton": 8192, "mosaic": 1 << 18}


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _block_rows(t: Tiling, row0):
    """Valid rows in the row block starting at `row0`, as f32."""
    return jnp.minimum(t.block_rows, t.m - row0).astype(_F32)


def _stats_block(row0, rows, stats, feats, outs, *, t: Tiling):
    """(mean_b, M2_b) of the shifted rows x - K of the block at `row0` (see `persistent_row_call`)."""
    del stats, outs
    (x_ref,), (k_ref,) = rows, feats
    mask = block_mask(t, row0=row0)
    # Shifted data: x - K (K = the first row) is exact and small when |mean| >> std, so the
    # block sum below loses nothing to the magnitude of the mean.
    xs = load_f32(x_ref, t, mask) - load_f32(k_ref, t, block_mask(t, rows=1))
    if mask is not None:
        xs = jnp.where(mask, xs, 0.0)
    mean = jnp.sum(xs, axis=0, keepdims=True) / _block_rows(t, row0)
    xc = xs - mean
    if mask is not None:
        xc = jnp.where(mask, xc, 0.0)
    return mean, jnp.sum(xc * xc, axis=0, keepdims=True)


def _chan_merge(acc, new, k, row0, *, t: Tiling):
    """Chan et al.'s merge of a program's running (mean_a, M2_a) over k full blocks with a block's.

    n_a = k * block_rows (every block a program merges before its last is full), n = n_a + n_b:
    mean = mean_a + d * n_b / n,  M2 = M2_a + M2_b + d^2 * n_a * n_b / n,  d = mean_b - mean_a.
    From acc = 0, k = 0 it returns the block's own (mean_b, M2_b).
    """
    (mean_a, m2_a), (mean_b, m2_b) = acc, new
    n_a = jnp.asarray(k).astype(_F32) * t.block_rows
    n_b = _block_rows(t, row0)
    n = n_a + n_b
    d = mean_b - mean_a
    return mean_a + d * (n_b / n), m2_a + m2_b + d * d * (n_a * n_b / n)


def _bwd_sums_block(row0, rows, stats, feats, outs, *, t: Tiling):
    """(sum dy, sum dy * xhat) over the rows of the block at `row0`."""
    del stats, outs
    (x_ref, dy_ref), (mean_ref, rstd_ref) = rows, feats
    mask = block_mask(t, row0=row0)
    fmask = block_mask(t, rows=1)
    x = load_f32(x_ref, t, mask)
    dy = load_f32(dy_ref, t, mask)  # 0 outside the array, so padded rows add nothing
    xhat = (x - load_f32(mean_ref, t, fmask)) * load_f32(rstd_ref, t, fmask)
    return jnp.sum(dy, axis=0, keepdims=True), jnp.sum(dy * xhat, axis=0, keepdims=True)


def _affine_kernel(*refs, t: Tiling, with_dy: bool):
    if with_dy:
        x_ref, dy_ref, c_ref, a_ref, b_ref, k_ref, o_ref = refs
    else:
        x_ref, c_ref, a_ref, b_ref, o_ref = refs
    mask = block_mask(t)
    fmask = block_mask(t, rows=1)
    x = load_f32(x_ref, t, mask)
    out = (x - load_f32(c_ref, t, fmask)) * load_f32(a_ref, t, fmask) + load_f32(b_ref, t, fmask)
    if with_dy:
        out = out + load_f32(dy_ref, t, mask) * load_f32(k_ref, t, fmask)
    store(o_ref, out, t, mask)


# --------------------------------------------------------------------------------------------
# Pallas wrappers ((R, C) inputs, (C,) f32 per-feature vectors) and their jnp twins
# --------------------------------------------------------------------------------------------


def _stats_pallas(x2, backend):
    m, c = x2.shape
    layout = layout_for(backend)
    t = make_tiling(m, c, layout, block_elems=_STATS_BLOCK[layout])
    loop = row_loop(t)
    shift = x2[:1]
    _, (means, m2s) = persistent_row_call(
        functools.partial(_stats_block, t=t),
        loop,
        backend,
        rows=[x2],
        feats=[shift],
        num_partials=2,
        merge=functools.partial(_chan_merge, t=t),
        name="batch_norm_stats",
    )
    # Chan et al. merge of the per-program (count, shifted mean, M2): exact, no cancellation.
    counts = loop.rows_f32()[:, None]
    means, m2s = means[:, 0], m2s[:, 0]
    mean = jnp.sum(counts * means, axis=0) / m
    m2 = jnp.sum(m2s, axis=0) + jnp.sum(counts * jnp.square(means - mean), axis=0)
    return shift[0].astype(_F32) + mean, m2 / m


def _stats_xla(x):
    # Two passes (XLA fuses each); no shift here, since slicing out a row is not allowed on an
    # explicitly sharded batch axis.
    xf = x.astype(_F32)
    lead = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axis=lead)
    return mean, jnp.mean(jnp.square(xf - mean), axis=lead)


def _rows(x):
    return x.reshape(-1, x.shape[-1])


def _mosaic_gpu_takes(backend: str, rows, vectors: int) -> bool:
    """False where the Mosaic GPU kernels cannot take these (..., C) operands' rows
    (`layer_norm.mosaic_gpu.supported`; and jax >= 0.12): the jnp math runs. True on other backends."""
    if not is_mosaic_gpu(backend):
        return True
    c = rows[0].shape[-1]
    dtypes = [r.dtype for r in rows]
    return mosaic_gpu_available() and lnm.supported(rows[0].size // max(c, 1), c, dtypes, vectors=vectors)


def _stats(x):
    """Per-feature (mean, biased var) of (..., C) x over all leading axes, f32."""
    backend = get_backend()
    if not use_pallas(backend, x, mosaic_gpu=True) or not _mosaic_gpu_takes(backend, [x], 3):
        return _stats_xla(x)
    c = x.shape[-1]

    def local(xs, row_axes):
        x2 = _rows(xs[0])
        if not is_mosaic_gpu(backend):
            mean, var = _stats_pallas(x2, backend)
        elif _mosaic_gpu_takes(backend, [x2], 3):
            mean, var = bnm.stats(x2, interpret=backend == "mosaic_gpu_interpret")
        else:  # a shard the Mosaic GPU kernel cannot take
            mean, var = _stats_xla(x2)
        if not row_axes:
            return [mean, var]
        # SyncBN: merge the devices' (count, mean, M2) exactly (Chan et al.; equal counts per shard):
        # mean = sum_d n_d mean_d / R, M2 = sum_d M2_d + sum_d n_d (mean_d - mean)^2.
        n_d = x2.shape[0]
        total = jax.lax.psum(n_d, row_axes)
        g_mean = jax.lax.psum(n_d * mean, row_axes) / total
        m2 = jax.lax.psum(n_d * var + n_d * jnp.square(mean - g_mean), row_axes)
        return [g_mean, m2 / total]

    return tuple(per_rows(local, [x], ["rows"], [("vec", ((c,), _F32))] * 2, "batch_norm", whole_rows=False))


def _affine(x, c, a, b, dy=None, k=None, out_dtype=None):
    """out = (x - c) * a + b [+ dy * k], per-feature c, a, b, k (f32, shape (C,))."""
    out_dtype = out_dtype or x.dtype
    backend = get_backend()
    rows = [x] + ([] if dy is None else [dy])
    if not use_pallas(backend, x, c, a, b, dy, k, mosaic_gpu=True) or not _mosaic_gpu_takes(backend, rows, 4):
        out = (x.astype(_F32) - c) * a + b
        if dy is not None:
            out = out + dy.astype(_F32) * k
        return out.astype(out_dtype)
    with_dy = dy is not None
    operands = [x, c, a, b] + ([dy, k] if with_dy else [])
    kinds = ["rows", "vec", "vec", "vec"] + (["rows", "vec"] if with_dy else [])

    def local(xs, row_axes):
        dyl, kl = (_rows(xs[4]), xs[5]) if with_dy else (None, None)
        return [_affine_pallas(_rows(xs[0]), *xs[1:4], dyl, kl, out_dtype, backend).reshape(xs[0].shape)]

    (out,) = per_rows(local, operands, kinds, [("rows", (x.shape, out_dtype))], "batch_norm", whole_rows=False)
    return out


def _affine_pallas(x2, c, a, b, dy2, k, out_dtype, backend):
    if is_mosaic_gpu(backend):
        interpret = backend == "mosaic_gpu_interpret"
        if _mosaic_gpu_takes(backend, [x2] + ([] if dy2 is None else [dy2]), 4):
            return bnm.affine(x2, c, a, b, dy2, k, out_dtype=out_dtype, interpret=interpret)
        out = (x2.astype(_F32) - c) * a + b  # a shard the Mosaic GPU kernel cannot take
        return (out if dy2 is None else out + dy2.astype(_F32) * k).astype(out_dtype)
    m, n = x2.shape
    layout = layout_for(backend)
    t = make_tiling(m, n, layout, block_elems=_AFFINE_BLOCK[layout])
    with_dy = dy2 is not None
    feats = [c, a, b] + ([k] if with_dy else [])
    feats = [jnp.reshape(v, (1, n)).astype(_F32) for v in feats]
    rows = [x2] + ([dy2] if with_dy else [])
    return pl.pallas_call(
        functools.partial(_affine_kernel, t=t, with_dy=with_dy),
        out_shape=out_struct((m, n), out_dtype, *rows, *feats),
        grid=(t.grid,),
        in_specs=[row_spec(t)] * len(rows) + [feature_spec(t)] * len(feats),
        out_specs=row_spec(t),
        compiler_params=call_params(backend, t),
        interpret=interpret_mode(backend),
        name="batch_norm_affine",
    )(*rows, *feats)


def _bwd_sums(x, dy, mean, rstd):
    """(sum_r dy, sum_r dy * xhat) over all leading axes, f32 (C,)."""
    backend = get_backend()
    if not use_pallas(backend, x, dy, mean, rstd, mosaic_gpu=True) or not _mosaic_gpu_takes(backend, [x, dy], 4):
        dyf = dy.astype(_F32)
        xhat = (x.astype(_F32) - mean) * rstd
        lead = tuple(range(x.ndim - 1))
        return jnp.sum(dyf, axis=lead), jnp.sum(dyf * xhat, axis=lead)
    c = x.shape[-1]

    def local(xs, row_axes):
        sums = _bwd_sums_pallas(_rows(xs[0]), _rows(xs[1]), xs[2], xs[3], backend)
        return [jax.lax.psum(v, row_axes) for v in sums] if row_axes else list(sums)

    return tuple(
        per_rows(
            local,
            [x, dy, mean, rstd],
            ["rows", "rows", "vec", "vec"],
            [("vec", ((c,), _F32))] * 2,
            "batch_norm",
            whole_rows=False,
        )
    )


def _bwd_sums_pallas(x2, dy2, mean, rstd, backend):
    if is_mosaic_gpu(backend):
        if _mosaic_gpu_takes(backend, [x2, dy2], 4):
            return bnm.bwd_sums(x2, dy2, mean, rstd, interpret=backend == "mosaic_gpu_interpret")
        dyf = dy2.astype(_F32)  # a shard the Mosaic GPU kernel cannot take
        return jnp.sum(dyf, axis=0), jnp.sum(dyf * (x2.astype(_F32) - mean) * rstd, axis=0)
    m, n = x2.shape
    layout = layout_for(backend)
    t = make_tiling(m, n, layout, block_elems=_STATS_BLOCK[layout])
    _, (sdy, sdyx) = persistent_row_call(
        functools.partial(_bwd_sums_block, t=t),
        row_loop(t),
        backend,
        rows=[x2, dy2],
        feats=[mean[None], rstd[None]],
        num_partials=2,
        name="batch_norm_bwd_sums",
    )
    return jnp.sum(sdy, axis=(0, 1)), jnp.sum(sdyx, axis=(0, 1))


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def batch_norm_stats_reference(x):
    """Per-feature (mean, biased var) over all axes but the last, two-pass in f32 (plain jnp)."""
    xf = jnp.asarray(x).astype(_F32)
    axes = tuple(range(xf.ndim - 1))
    mean = jnp.mean(xf, axis=axes)
    return mean, jnp.mean(jnp.square(xf - mean), axis=axes)


def batch_norm_reference(x, scale=None, bias=None, *, epsilon: float = 1e-5):
    """Training-mode BatchNorm in plain jnp: returns (y, mean, var) (Ioffe & Szegedy, 2015).

    y = (x - mean) / sqrt(var + epsilon) * scale + bias in x's dtype; mean, var (biased) in f32.
    """
    mean, var = batch_norm_stats_reference(x)
    y = (jnp.asarray(x).astype(_F32) - mean) * lax.rsqrt(var + epsilon)
    if scale is not None:
        y = y * jnp.asarray(scale).astype(_F32)
    if bias is not None:
        y = y + jnp.asarray(bias).astype(_F32)
    return y.astype(jnp.asarray(x).dtype), mean, var


# --------------------------------------------------------------------------------------------
# Public functions with custom VJPs
# --------------------------------------------------------------------------------------------


def _check(name, x, scale=None, bias=None, epsilon=1.0):
    return check_operands(
        name,
        x,
        scale,
        bias,
        epsilon,
        min_ndim=2,
        axes="a batch axis and a last feature axis, e.g. (N, C) or (N, H, W, C)",
    )


@jax.custom_vjp
def _stats_vjp(x):
    return _stats(x)


def _stats_fwd(x):
    mean, var = _stats(x)
    return (mean, var), (x, mean)


def _stats_bwd(res, cts):
    x, mean = res
    dmean, dvar = cts
    r = x.size // x.shape[-1]
    # dx = dmean / R + dvar * 2 (x - mean) / R
    return (_affine(x, mean, 2.0 * dvar / r, dmean / r),)


_stats_vjp.defvjp(_stats_fwd, _stats_bwd)


def batch_norm_stats(x):
    """Per-feature (mean, var) over all axes but the last, in one pass, f32 (differentiable).

    var is the biased variance sum((x - mean)^2) / R; block partials are merged with Chan et al.'s
    formula, so it is exact to f32 rounding even when |mean| >> std. d/dx: dmean/R + 2 dvar (x-mean)/R.
    """
    x = _check("batch_norm_stats", x)
    mean, var = _stats_vjp(x)
    return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bn(x, w, b, eps):
    return _bn_fwd(x, w, b, eps)[0]


def _bn_fwd(x, w, b, eps):
    mean, var = _stats(x)
    rstd = lax.rsqrt(var + eps)
    y = _affine(x, mean, rstd * w.astype(_F32), b.astype(_F32))
    return (y, mean, var), (x, w, b, mean, rstd)


def _bn_bwd(eps, res, cts):
    x, w, b, mean, rstd = res
    dy, dmean, dvar = cts
    r = x.size // x.shape[-1]
    wf = w.astype(_F32)
    sdy, sdyx = _bwd_sums(x, dy, mean, rstd)
    k = wf * rstd
    gm = dmean - k * sdy
    gv = dvar - 0.5 * k * rstd * sdyx
    dx = _affine(x, mean, 2.0 * gv / r, gm / r, dy, k, out_dtype=dy.dtype)
    return dx, sdyx.astype(w.dtype), sdy.astype(b.dtype)


_bn.defvjp(_bn_fwd, _bn_bwd)


def batch_norm(x, scale=None, bias=None, *, epsilon: float = 1e-5):
    """Training-mode BatchNorm over all axes but the last, fused kernels and custom VJP.

    Returns (y, mean, var): y = (x - mean) * rsqrt(var + epsilon) * scale + bias in x's dtype,
    the batch mean and biased variance in f32 (for the running averages). Two passes forward
    (one-pass statistics, then the normalisation), two backward (sums of dy and dy * xhat, then dx);
    gradients flow through y and through mean/var (Ioffe & Szegedy, 2015).
    `scale`/`bias` of shape (x.shape[-1],) or None.
    """
    x = _check("batch_norm", x, scale, bias, epsilon)
    c = x.shape[-1]
    w = jnp.ones((c,), x.dtype) if scale is None else jnp.asarray(scale)
    b = jnp.zeros((c,), x.dtype) if bias is None else jnp.asarray(bias)
    return _bn(x, w, b, float(epsilon))
