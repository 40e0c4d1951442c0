"""LayerNorm and RMSNorm over the last axis: Pallas kernels, jnp references, custom VJPs.

LayerNorm (Ba et al., 2016, https://arxiv.org/abs/1607.06450), per row x of length N:

    mean = sum(x) / N,   var = sum((x - mean)^2) / N,   rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd,   y = xhat * scale + bias

RMSNorm (Zhang & Sennrich, 2019, https://arxiv.org/abs/1910.07467) drops the centring:

    rstd = 1 / sqrt(sum(x^2) / N + eps),   xhat = x * rstd,   y = xhat * scale

Backward, with g = dy * scale (c2 = 0 for RMSNorm):

    c1 = sum(g * xhat) / N,   c2 = sum(g) / N
    dx = rstd * (g - xhat * c1 - c2),   dscale = sum_rows(dy * xhat),   dbias = sum_rows(dy)

The variance is two-pass inside a row block (mean first, then the centred sum of squares), in
f32 whatever the input dtype: inputs with mean 1e3 and std 1e-2 normalise to unit std, which the
one-pass E[x^2] - E[x]^2 cannot do in f32. All statistics and sums are accumulated in f32.

Tiling, masking and the persistent grid are those of `optax_ext.kernels.blocks` (shared with
`batch_norm`): the input is viewed as (M, N) rows and one forward grid step normalises a block
of rows; the "xla" backend runs the same math in jnp and lets XLA fuse it. On "mosaic_gpu" the
kernels are `layer_norm.mosaic_gpu`'s (TMA row blocks), for the shapes they take (jnp for the
others). The backward is one pass over x and dy for dx, dscale and dbias together on the
persistent grid (`persistent_row_call`): each of its P programs writes the dx of its row blocks and
folds their column sums into one f32 (1, N) partial per output, and XLA sums the P partials,

    dscale = sum_p S_p,   S_p = sum_{i in B_p} sum_{r in block i} dy_r * xhat_r   (dbias: dy_r)

so the partials take P * N * 4 bytes whatever M is (one per row block took 537 MB for dscale +
dbias at 8192 x 8192 on Triton, more than the bf16 activations), in a fixed, deterministic order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from optax_ext.kernels import sharding
from optax_ext.kernels.backend import get_backend, is_mosaic_gpu, mosaic_gpu_available
from optax_ext.kernels.blocks import (
    RowLoop,  # noqa: F401  (re-exported: defined here before blocks.py, as row_mask)
    Tiling,
    block_mask,
    call_params,
    check_operands,
    col_mask,
    feature_spec,
    interpret_mode,
    layout_for,
    load_f32,
    make_tiling,
    out_struct,
    per_rows,
    persistent_row_call,
    row_loop,
    row_mask,  # noqa: F401
    row_spec,
    stat_spec,
    store,
    use_pallas,
)
from optax_ext.kernels.layer_norm import mosaic_gpu as lnm

__all__ = [
    "layer_norm",
    "layer_norm_fwd",
    "layer_norm_bwd",
    "layer_norm_reference",
    "rms_norm",
    "rms_norm_fwd",
    "rms_norm_bwd",
    "rms_norm_reference",
]

_F32 = jnp.float32


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _fwd_kernel(x_ref, w_ref, b_ref, y_ref, mean_ref, rstd_ref, *, t: Tiling, eps: float, rms: bool):
    mask = block_mask(t)
    x = load_f32(x_ref, t, mask)
    w = load_f32(w_ref, t, block_mask(t, rows=1))
    inv_n = 1.0 / t.n
    if rms:
        mean = jnp.zeros((t.block_rows, 1), _F32)
        xc = x
    else:
        mean = jnp.sum(x, axis=1, keepdims=True) * inv_n
        xc = x - mean
        if t.ragged_cols:
            xc = jnp.where(col_mask(t, t.block_rows), xc, 0.0)  # padded lanes must not add (0-mean)^2
    var = jnp.sum(xc * xc, axis=1, keepdims=True) * inv_n
    rstd = lax.rsqrt(var + eps)
    y = xc * rstd * w
    if b_ref is not None:
        y = y + load_f32(b_ref, t, block_mask(t, rows=1))
    store(y_ref, y, t, mask)
    stat_mask = block_mask(t, cols=1)
    if mean_ref is not None:
        store(mean_ref, mean, t, stat_mask)
    store(rstd_ref, rstd, t, stat_mask)


def _bwd_block(row0, rows, stats, feats, outs, *, t: Tiling, rms: bool):
    """dx of the row block at `row0`, and its (dscale, dbias) sums over rows (see `persistent_row_call`)."""
    x_ref, dy_ref = rows
    mean_ref, rstd_ref = (None, *stats) if rms else stats
    (w_ref,), (dx_ref,) = feats, outs
    mask = block_mask(t, row0=row0)
    stat_mask = block_mask(t, cols=1, row0=row0)
    x = load_f32(x_ref, t, mask)
    dy = load_f32(dy_ref, t, mask)
    w = load_f32(w_ref, t, block_mask(t, rows=1))
    rstd = load_f32(rstd_ref, t, stat_mask)
    xc = x if rms else x - load_f32(mean_ref, t, stat_mask)
    xhat = xc * rstd
    if mask is not None:
        xhat = jnp.where(mask, xhat, 0.0)
    g = dy * w  # zero outside the array since dy is
    inv_n = 1.0 / t.n
    c1 = jnp.sum(g * xhat, axis=1, keepdims=True) * inv_n
    dx = g - xhat * c1
    if not rms:
        dx = dx - jnp.sum(g, axis=1, keepdims=True) * inv_n
    store(dx_ref, dx * rstd, t, mask)
    dw = jnp.sum(dy * xhat, axis=0, keepdims=True)
    return (dw,) if rms else (dw, jnp.sum(dy, axis=0, keepdims=True))


# --------------------------------------------------------------------------------------------
# pallas_call wrappers (inputs already (M, N); features (1, N))
# --------------------------------------------------------------------------------------------

_FWD_BLOCK = {"triton": 4096, "mosaic": 1 << 18}
_BWD_BLOCK = {"triton": 8192, "mosaic": 1 << 17}


def _fwd_pallas(x2, w2, b2, eps: float, rms: bool, backend: str):
    m, n = x2.shape
    t = make_tiling(m, n, layout_for(backend), block_elems=_FWD_BLOCK[layout_for(backend)])
    stat = out_struct((m, 1), _F32, x2, w2, b2)
    out_shape = [out_struct((m, n), x2.dtype, x2, w2, b2)] + ([] if rms else [stat]) + [stat]
    out_specs = [row_spec(t)] + ([] if rms else [stat_spec(t)]) + [stat_spec(t)]
    in_specs = [row_spec(t), feature_spec(t)] + ([] if rms else [feature_spec(t)])

    def kernel(*refs):
        if rms:
            x_ref, w_ref, y_ref, rstd_ref = refs
            b_ref = mean_ref = None
        else:
            x_ref, w_ref, b_ref, y_ref, mean_ref, rstd_ref = refs
        _fwd_kernel(x_ref, w_ref, b_ref, y_ref, mean_ref, rstd_ref, t=t, eps=eps, rms=rms)

    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(t.grid,),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=call_params(backend, t),
        interpret=interpret_mode(backend),
        name="rms_norm_fwd" if rms else "layer_norm_fwd",
    )(x2, w2, *([] if rms else [b2]))
    if rms:
        y, rstd = outs
        return y, None, rstd[:, 0]
    y, mean, rstd = outs
    return y, mean[:, 0], rstd[:, 0]


def _bwd_pallas(x2, w2, mean, rstd, dy2, rms: bool, backend: str):
    m, n = x2.shape
    t = make_tiling(m, n, layout_for(backend), block_elems=_BWD_BLOCK[layout_for(backend)])
    stats = [rstd[:, None]] if rms else [mean[:, None], rstd[:, None]]
    like = (x2, w2, mean, rstd, dy2)
    (dx,), parts = persistent_row_call(
        functools.partial(_bwd_block, t=t, rms=rms),
        row_loop(t),
        backend,
        rows=[x2, dy2],
        stats=stats,
        feats=[w2],
        row_outs=[out_struct((m, n), dy2.dtype, *like)],
        num_partials=1 if rms else 2,
        name="rms_norm_bwd" if rms else "layer_norm_bwd",
    )
    # (P, 1, N) per-program partials -> (N,): P is fixed, so this sum is small and deterministic.
    dw = jnp.sum(parts[0], axis=(0, 1))
    db = None if rms else jnp.sum(parts[1], axis=(0, 1))
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# jnp versions of the same math (the "xla" backend) and the autodiff references
# --------------------------------------------------------------------------------------------


def _fwd_xla(x, w2, b2, eps: float, rms: bool):
    """The same math in jnp on (..., N) arrays; XLA fuses (and partitions) it."""
    xf = x.astype(_F32)
    if rms:
        mean = None
        xc = xf
    else:
        mean = jnp.mean(xf, axis=-1)
        xc = xf - mean[..., None]
    rstd = lax.rsqrt(jnp.mean(xc * xc, axis=-1) + eps)
    y = xc * rstd[..., None] * w2[0].astype(_F32)
    if not rms:
        y = y + b2[0].astype(_F32)
    return y.astype(x.dtype), mean, rstd


def _bwd_xla(x, w2, mean, rstd, dy, rms: bool):
    xf = x.astype(_F32)
    dyf = dy.astype(_F32)
    xhat = (xf if rms else xf - mean[..., None]) * rstd[..., None]
    g = dyf * w2[0].astype(_F32)
    dx = g - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)
    if not rms:
        dx = dx - jnp.mean(g, axis=-1, keepdims=True)
    dx = dx * rstd[..., None]
    lead = tuple(range(x.ndim - 1))
    dw = jnp.sum(dyf * xhat, axis=lead)[None]
    db = None if rms else jnp.sum(dyf, axis=lead)[None]
    return dx.astype(dy.dtype), dw, db


def layer_norm_reference(x, scale=None, bias=None, *, epsilon: float = 1e-6):
    """Plain-jnp LayerNorm over the last axis (two-pass f32 variance); autodiff gives its VJP.

    y = (x - mean) / sqrt(var + epsilon) * scale + bias, in x's dtype (Ba et al., 2016).
    """
    xf = jnp.asarray(x).astype(_F32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * lax.rsqrt(var + epsilon)
    if scale is not None:
        y = y * jnp.asarray(scale).astype(_F32)
    if bias is not None:
        y = y + jnp.asarray(bias).astype(_F32)
    return y.astype(jnp.asarray(x).dtype)


def rms_norm_reference(x, scale=None, *, epsilon: float = 1e-6):
    """Plain-jnp RMSNorm over the last axis; autodiff gives its VJP.

    y = x / sqrt(mean(x^2) + epsilon) * scale, in x's dtype (Zhang & Sennrich, 2019).
    """
    xf = jnp.asarray(x).astype(_F32)
    y = xf * lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + epsilon)
    if scale is not None:
        y = y * jnp.asarray(scale).astype(_F32)
    return y.astype(jnp.asarray(x).dtype)


# --------------------------------------------------------------------------------------------
# Dispatch, validation and the custom VJP
# --------------------------------------------------------------------------------------------


def _fwd2(x, w2, b2, eps, rms):
    """Forward on (..., N) x: (y, mean or None, rstd), statistics of shape x.shape[:-1]."""
    backend = get_backend()
    if not use_pallas(backend, x, w2, b2, mosaic_gpu=True) or not _mosaic_gpu_takes(backend, x, [x.dtype]):
        sharding.check_whole("rms_norm" if rms else "layer_norm", x, [-1])  # as the kernels' path does
        return _fwd_xla(x, w2, b2, eps, rms)
    lead, n = x.shape[:-1], x.shape[-1]
    operands, kinds = [x, w2] + ([] if rms else [b2]), ["rows", "feat"] + ([] if rms else ["feat"])
    stat = ("stat", (lead, _F32))
    results = [("rows", (x.shape, x.dtype))] + ([] if rms else [stat]) + [stat]

    def local(xs, row_axes):
        xl = xs[0]  # this device's rows, viewed as (M, N) only here, per shard
        x2, b = xl.reshape(-1, n), None if rms else xs[2]
        if not is_mosaic_gpu(backend):
            y, mean, rstd = _fwd_pallas(x2, xs[1], b, eps, rms, backend)
        elif _mosaic_gpu_takes(backend, x2, [x2.dtype]):
            y, mean, rstd = lnm.forward(x2, xs[1], b, eps, rms, interpret=backend == "mosaic_gpu_interpret")
        else:  # a shard the Mosaic GPU kernel cannot take (see `_mosaic_gpu_takes`)
            y, mean, rstd = _fwd_xla(x2, xs[1], b, eps, rms)
        stats = [rstd] if rms else [mean, rstd]
        return [y.reshape(xl.shape)] + [v.reshape(xl.shape[:-1]) for v in stats]

    outs = per_rows(local, operands, kinds, results, "rms_norm" if rms else "layer_norm")
    return (outs[0], None, outs[1]) if rms else tuple(outs)


def _mosaic_gpu_takes(backend: str, x, row_dtypes) -> bool:
    """False where the Mosaic GPU kernels cannot take x's rows (`layer_norm.mosaic_gpu.supported`: M
    a multiple of 8 and >= 64, N of 8, a 64-row block in SMEM; and jax >= 0.12): its jnp math runs.
    True on every other backend."""
    if not is_mosaic_gpu(backend):
        return True
    n = x.shape[-1]
    return mosaic_gpu_available() and lnm.supported(x.size // max(n, 1), n, row_dtypes)


def _bwd2(x, w2, mean, rstd, dy, rms):
    """Backward on (..., N) arrays: (dx, dscale (1, N) f32, dbias (1, N) f32 or None)."""
    backend = get_backend()
    if not use_pallas(backend, x, w2, mean, rstd, dy, mosaic_gpu=True) or not _mosaic_gpu_takes(
        backend, x, [x.dtype, dy.dtype]
    ):
        return _bwd_xla(x, w2, mean, rstd, dy, rms)
    n = x.shape[-1]
    operands = [x, w2] + ([] if rms else [mean]) + [rstd, dy]
    kinds = ["rows", "feat"] + ([] if rms else ["stat"]) + ["stat", "rows"]
    vec = ("vec", ((n,), _F32))
    results = [("rows", (x.shape, dy.dtype)), vec] + ([] if rms else [vec])

    def local(xs, row_axes):
        if rms:
            xl, w, r, dyl = xs
            mu = None
        else:
            xl, w, mu, r, dyl = xs
            mu = mu.reshape(-1)
        x2, dy2 = xl.reshape(-1, n), dyl.reshape(-1, n)
        if not is_mosaic_gpu(backend):
            dx, dw, db = _bwd_pallas(x2, w, mu, r.reshape(-1), dy2, rms, backend)
        elif _mosaic_gpu_takes(backend, x2, [x2.dtype, dy2.dtype]):
            interpret = backend == "mosaic_gpu_interpret"
            dx, dw, db = lnm.backward(x2, w, mu, r.reshape(-1), dy2, rms, interpret=interpret)
        else:
            dx, dw, db = _bwd_xla(x2, w, mu, r.reshape(-1), dy2, rms)
            dw, db = dw[0], None if rms else db[0]
        # dscale and dbias sum over all rows: add the other devices' rows.
        sums = [dw] + ([] if rms else [db])
        if row_axes:
            sums = [jax.lax.psum(v, row_axes) for v in sums]
        return [dx.reshape(dyl.shape), *sums]

    outs = per_rows(local, operands, kinds, results, "rms_norm" if rms else "layer_norm")
    dx, dw = outs[0], outs[1]
    return dx, dw[None], None if rms else outs[2][None]


def _feature(v, n, fill, dtype):
    return jnp.full((1, n), fill, dtype) if v is None else jnp.reshape(v, (1, n))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _norm(x, w, b, eps, rms):
    return _norm_fwd(x, w, b, eps, rms)[0]


def _norm_fwd(x, w, b, eps, rms):
    y, mean, rstd = _fwd2(x, w, b, eps, rms)
    return y, (x, w, b, mean, rstd)


def _norm_bwd(eps, rms, res, dy):
    x, w, b, mean, rstd = res
    dx, dw, db = _bwd2(x, w, mean, rstd, dy, rms)
    dx = dx.astype(dy.dtype)
    return dx, dw.astype(w.dtype), None if b is None else db.astype(b.dtype)


_norm.defvjp(_norm_fwd, _norm_bwd)


def layer_norm(x, scale=None, bias=None, *, epsilon: float = 1e-6):
    """LayerNorm over the last axis with a fused custom VJP (Ba et al., 2016).

    y = (x - mean) * rsqrt(var + epsilon) * scale + bias, statistics of each row over the last
    axis in f32 (two-pass variance), y in x's dtype. `scale`/`bias` of shape (x.shape[-1],) or
    None (no scaling / no shift). Runs on the backend `get_backend()` names at trace time.
    """
    x = check_operands("layer_norm", x, scale, bias, epsilon)
    n = x.shape[-1]
    w = _feature(scale, n, 1, x.dtype)
    b = _feature(bias, n, 0, x.dtype)
    return _norm(x, w, b, float(epsilon), False)


def rms_norm(x, scale=None, *, epsilon: float = 1e-6):
    """RMSNorm over the last axis with a fused custom VJP (Zhang & Sennrich, 2019).

    y = x * rsqrt(mean(x^2) + epsilon) * scale, statistics in f32, y in x's dtype.
    """
    x = check_operands("rms_norm", x, scale, None, epsilon)
    n = x.shape[-1]
    return _norm(x, _feature(scale, n, 1, x.dtype), None, float(epsilon), True)


def layer_norm_fwd(x, scale=None, bias=None, *, epsilon: float = 1e-6):
    """LayerNorm forward returning (y, mean, rstd); mean and rstd are f32 of shape x.shape[:-1].

    rstd = 1 / sqrt(var + epsilon). Not differentiable itself: use `layer_norm` for gradients.
    """
    x = check_operands("layer_norm_fwd", x, scale, bias, epsilon)
    n = x.shape[-1]
    y, mean, rstd = _fwd2(x, _feature(scale, n, 1, x.dtype), _feature(bias, n, 0, x.dtype), float(epsilon), False)
    lead = x.shape[:-1]
    return y, mean.reshape(lead), rstd.reshape(lead)


def layer_norm_bwd(x, scale, mean, rstd, dy):
    """LayerNorm backward from saved f32 (mean, rstd): returns (dx, dscale, dbias).

    dx = rstd * (g - xhat * mean(g * xhat) - mean(g)) with g = dy * scale, xhat = (x - mean) * rstd;
    dscale = sum(dy * xhat), dbias = sum(dy) over all leading axes, accumulated in f32.
    dx has dy's dtype, dscale/dbias are f32. `scale=None` means ones.
    """
    x = check_operands("layer_norm_bwd", x, scale, None, 1.0)
    n = x.shape[-1]
    lead = x.shape[:-1]
    dx, dw, db = _bwd2(
        x,
        _feature(scale, n, 1, _F32),
        jnp.reshape(mean, lead).astype(_F32),
        jnp.reshape(rstd, lead).astype(_F32),
        jnp.reshape(dy, x.shape),
        False,
    )
    return dx, dw.reshape(n), db.reshape(n)


def rms_norm_fwd(x, scale=None, *, epsilon: float = 1e-6):
    """RMSNorm forward returning (y, rstd); rstd = 1/sqrt(mean(x^2) + epsilon), f32, x.shape[:-1]."""
    x = check_operands("rms_norm_fwd", x, scale, None, epsilon)
    n = x.shape[-1]
    y, _, rstd = _fwd2(x, _feature(scale, n, 1, x.dtype), None, float(epsilon), True)
    return y, rstd.reshape(x.shape[:-1])


def rms_norm_bwd(x, scale, rstd, dy):
    """RMSNorm backward from saved f32 rstd: returns (dx, dscale).

    dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * scale, xhat = x * rstd; dscale = sum(dy * xhat).
    """
    x = check_operands("rms_norm_bwd", x, scale, None, 1.0)
    n = x.shape[-1]
    dx, dw, _ = _bwd2(
        x,
        _feature(scale, n, 1, _F32),
        None,
        jnp.reshape(rstd, x.shape[:-1]).astype(_F32),
        jnp.reshape(dy, x.shape),
        True,
    )
    return dx, dw.reshape(n)
