"""LayerNorm / RMSNorm kernels: interpreter parity with float64 numpy and the jnp references,
VJPs against autodiff of the references, numerically hard inputs, and Triton/Mosaic lowering.

Every comparison is against the float64 value of the formula on the same inputs, within a tolerance
derived from the unit roundoff (`conftest.tolerance`); `test_mutants_fail` proves that a backward
missing a term, a sum missing a row and a variance over N - 1 fail those comparisons."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_grads_match_finite_differences, assert_within, tolerance, unit_roundoff
from flax import nnx

from optax_ext.kernels import blocks, lower_for
from optax_ext.kernels import layer_norm as ln
from optax_ext.kernels.backend import use_backend

DTYPES = [jnp.float32, jnp.bfloat16]
# (interpreter layout, shape): the triton layout pads features to a power of two and masks; the
# mosaic layout (whole rows, 32-row blocks here) is run on shapes whose last row block is ragged.
CASES = [
    ("triton", (3, 100)),
    ("triton", (5, 7, 1000)),
    ("triton", (1, 1)),
    ("triton", (2, 3, 4, 17)),
    ("triton", (70, 33)),
    ("mosaic", (5, 7, 100)),
    ("mosaic", (70, 33)),
]


def _set_layout(monkeypatch, layout):
    monkeypatch.setattr(blocks, "INTERPRET_LAYOUT", layout)
    # Few persistent programs, so that the multi-block shapes have programs looping over blocks.
    monkeypatch.setattr(blocks, "PERSISTENT_PROGRAMS", {"triton": 3, "mosaic": 3})
    if layout == "mosaic":
        monkeypatch.setattr(ln, "_FWD_BLOCK", {"triton": 4096, "mosaic": 64})
        monkeypatch.setattr(ln, "_BWD_BLOCK", {"triton": 8192, "mosaic": 64})


def _inputs(shape, dtype, seed):
    k = jax.random.split(jax.random.key(seed), 4)
    n = shape[-1]
    x = (jax.random.normal(k[0], shape) * 2.0 + 0.5).astype(dtype)
    scale = 1.0 + 0.5 * jax.random.normal(k[1], (n,))
    bias = jax.random.normal(k[2], (n,))
    dy = jax.random.normal(k[3], shape).astype(dtype)
    return x, scale, bias, dy


def _np_stats(x, rms, eps):
    x = np.asarray(x, np.float64)
    mean = np.zeros(x.shape[:-1]) if rms else x.mean(-1)
    var = ((x - mean[..., None]) ** 2).mean(-1)
    return mean, 1.0 / np.sqrt(var + eps)


def _norm64(x, scale, bias, eps, rms):
    """The textbook formula, for float64 inputs (no f32 casts)."""
    mean = 0.0 if rms else jnp.mean(x, -1, keepdims=True)
    xc = x - mean
    y = xc / jnp.sqrt(jnp.mean(xc * xc, -1, keepdims=True) + eps) * scale
    return y if rms else y + bias


@functools.partial(jax.jit, static_argnums=(4, 5))
def _vjp64(x, scale, bias, dy, eps, rms):
    y, vjp = jax.vjp(lambda x, s, b: _norm64(x, s, b, eps, rms), x, scale, bias)
    return (y, *vjp(dy))


def _exact(x, scale, bias, dy, eps, rms):
    """float64 y, mean, rstd, dx, dscale, dbias (autodiff of `_norm64`) of the same (rounded) inputs,
    and the magnitudes of what each is computed from: the `scale` of its `tolerance`."""
    x, s, b, dy = (np.asarray(v, np.float64) for v in (x, scale, bias, dy))
    with jax.enable_x64(True):
        y, dx, ds, db = (np.asarray(v) for v in _vjp64(x, s, b, dy, eps, rms))
    mean, rstd = (v[..., None] for v in _np_stats(x, rms, eps))
    xhat, g = (x - mean) * rstd, dy * s
    c1, c2 = (g * xhat).mean(-1, keepdims=True), 0.0 if rms else g.mean(-1, keepdims=True)
    xterms = (np.abs(x) + np.abs(mean)) * rstd  # xhat's terms: x - mean cancels when |mean| >> std

    def rss(t):  # per column, root-sum-square over rows: the size of the partial sums of random-sign terms
        return np.sqrt(np.sum(np.square(t.reshape(-1, t.shape[-1])), 0)).max()

    exact = {"y": y, "mean": mean[..., 0], "rstd": rstd[..., 0], "dx": dx, "dscale": ds, "dbias": db}
    scales = {
        "y": np.max(xterms * np.abs(s) + (0.0 if rms else np.abs(b))),
        "mean": np.abs(x).mean(-1).max(),
        "rstd": rstd.max(),
        "dx": np.max(rstd * (np.abs(g) + xterms * np.abs(c1) + np.abs(c2))),
        "dscale": rss(dy * xterms),
        "dbias": rss(dy),
    }
    return exact, scales


# f32 elementwise roundings on the chain that computes each result (see `conftest.tolerance`; an f32
# rsqrt counts 2), and the lengths of its reductions ("N": over a row's features, "M": over rows).
# Measured on every case of this module (CPU, jax 0.10), as max |error| / tolerance over the elements:
# bf16 y and dx 0.99 (their error is the rounding to bf16, which the tolerance bounds exactly); f32
# results 0.06-0.75, i.e. 1.3-18x below (worst-case chains against 1-3 u32 of actual error); dscale and
# dbias of bf16 inputs, f32 sums of exactly representable terms, 0-0.29. The tolerances replaced: f32
# rtol 1e-5 with atol 4e-5 to 8e-5 * sqrt(rows); bf16 rtol 2e-2 with atol 0.12-0.24 on y and dx,
# 0.24 * sqrt(rows) on the f32 dscale/dbias: 1e2-1e5 times the measured error.
_CHAINS = {
    "mean": (2, "N"),  # sum over N, times 1/N (itself rounded)
    "rstd": (7, "N"),  # x - mean, square, sum over N, times 1/N (2), + eps, rsqrt (2)
    "y": (11, "N"),  # rstd's 7, x - mean, * rstd, * scale, + bias
    "dx": (13, "NN"),  # xhat (rstd's 7, 2 more), g = dy * scale, xhat * c1, c1's sum over N, two -, * rstd
    "dscale": (10, "NM"),  # xhat (9), dy * xhat, sum over M rows
    "dbias": (0, "M"),  # sum of dy over M rows
}


def _tol(name, dtype, shape, scales):
    """`tolerance` of result `name` (stored in `dtype`) for an input of `shape`."""
    ops, reductions = _CHAINS[name]
    n, m = shape[-1], int(np.prod(shape[:-1]))
    return tolerance(dtype, [{"N": n, "M": m}[r] for r in reductions], scales[name], ops=ops)


def _check(results, exact, scales, shape, dtypes, err_msg=""):
    """Every result in `results` {name: array} against float64 `exact`: the check the mutants must fail."""
    for name, value in results.items():
        assert_within(
            value, exact[name], _tol(name, dtypes.get(name, jnp.float32), shape, scales), err_msg=f"{name} {err_msg}"
        )


@pytest.mark.parametrize("layout,shape", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_float64(monkeypatch, layout, shape, dtype):
    _set_layout(monkeypatch, layout)
    x, scale, bias, _ = _inputs(shape, dtype, seed=sum(shape))
    eps = 1e-5
    with use_backend("interpret"):
        y, mean, rstd = ln.layer_norm_fwd(x, scale, bias, epsilon=eps)
        y_rms, rstd_rms = ln.rms_norm_fwd(x, scale, epsilon=eps)
    assert y.dtype == dtype and y.shape == shape
    assert mean.dtype == rstd.dtype == jnp.float32 and mean.shape == shape[:-1]
    for rms, (yv, rstdv) in ((False, (y, rstd)), (True, (y_rms, rstd_rms))):
        exact, scales = _exact(x, scale, bias, x, eps, rms)
        results = dict(y=yv, rstd=rstdv, **({} if rms else {"mean": mean}))
        _check(results, exact, scales, shape, {"y": dtype}, err_msg=f"rms={rms}")


@pytest.mark.parametrize("layout,shape", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_vjp_matches_reference_autodiff(monkeypatch, layout, shape, dtype, rms):
    _set_layout(monkeypatch, layout)
    x, scale, bias, dy = _inputs(shape, dtype, seed=7 + len(shape))
    if rms:
        f, ref = (lambda x, s, b: ln.rms_norm(x, s)), (lambda x, s, b: ln.rms_norm_reference(x, s))
    else:
        f, ref = ln.layer_norm, ln.layer_norm_reference
    # The mosaic layout runs in TPU's own interpreter too (backend "mosaic_interpret").
    _check_vjp(
        f, ref, x, scale, bias, dy, rms, ("interpret", "xla") + (("mosaic_interpret",) if layout == "mosaic" else ())
    )


def _check_vjp(f, ref, x, scale, bias, dy, rms, backends, eps=1e-6):
    """y and (dx, dscale, dbias) of `f` on each backend, and of the jnp reference `ref`, against float64."""
    dtype, shape = x.dtype, x.shape
    exact, scales = _exact(x, scale, bias, dy, eps, rms)
    y_ref, vjp_ref = jax.vjp(ref, x, scale, bias)
    runs = [("reference", y_ref, vjp_ref(dy))]
    for backend in backends:
        with use_backend(backend):
            y, vjp = jax.vjp(f, x, scale, bias)
            runs.append((backend, y, vjp(dy)))
    for label, y, g in runs:
        assert y.dtype == dtype and g[0].dtype == dtype and g[1].dtype == jnp.float32
        # dscale/dbias are f32 sums of exactly representable products: f32 tolerances even for bf16 x.
        results = dict(y=y, dx=g[0], dscale=g[1], **({} if rms else {"dbias": g[2]}))
        _check(results, exact, scales, shape, {"y": dtype, "dx": dtype}, err_msg=label)


def test_bwd_functions_from_saved_stats():
    shape = (9, 37)
    x, scale, bias, dy = _inputs(shape, jnp.float32, seed=3)
    (exact, scales), (exact_rms, scales_rms) = (_exact(x, scale, bias, dy, 1e-6, rms) for rms in (False, True))
    for backend in ("interpret", "xla"):
        with use_backend(backend):
            _, mean, rstd = ln.layer_norm_fwd(x, scale, bias)
            dx, ds, db = ln.layer_norm_bwd(x, scale, mean, rstd, dy)
            _, rstd2 = ln.rms_norm_fwd(x, scale)
            dx2, ds2 = ln.rms_norm_bwd(x, scale, rstd2, dy)
        _check({"dx": dx, "dscale": ds, "dbias": db}, exact, scales, shape, {}, err_msg=backend)
        _check({"dx": dx2, "dscale": ds2}, exact_rms, scales_rms, shape, {}, err_msg=f"{backend} rms")


def _fd_checks(x, scale, bias, backend=None):
    """(f, float64 twin, args, tolerances of f's outputs, label) for the finite-difference checks:
    LayerNorm and RMSNorm, the jnp references (backend None) or the custom VJPs."""
    shape = x.shape
    _, scales = _exact(x, scale, bias, x, 1e-6, False)
    _, scales_rms = _exact(x, scale, bias, x, 1e-6, True)
    if backend is None:
        f_ln, f_rms = ln.layer_norm_reference, ln.rms_norm_reference
    else:
        f_ln, f_rms = ln.layer_norm, ln.rms_norm
    return [
        (
            lambda x, s, b: f_ln(x, s, b),
            lambda x, s, b: _norm64(x, s, b, 1e-6, False),
            (x, scale, bias),
            [_tol("y", jnp.float32, shape, scales)],
            "layer",
        ),
        (
            lambda x, s: f_rms(x, s),
            lambda x, s: _norm64(x, s, None, 1e-6, True),
            (x, scale),
            [_tol("y", jnp.float32, shape, scales_rms)],
            "rms",
        ),
    ]


def test_grads_match_finite_differences_reference_and_xla_path():
    """AD (both modes for the references, the custom VJP on the xla path) against central differences,
    within the bound `assert_grads_match_finite_differences` derives: 6.6e-3 (layer), 5.8e-3 (rms) on
    the VJP inner products, measured errors 2.5e-4 and 5.2e-4 (1/26, 1/11 of it; worst case over the
    cotangent's signs, which cancel). Replaced: check_grads with atol = rtol = 2e-2 at eps = 1e-4,
    i.e. 0.059 and 0.095 here, 100-200x its measured 4.5e-4 to 5.9e-4."""
    x, scale, bias, _ = _inputs((4, 6), jnp.float32, seed=11)
    for f, f64, args, tols, label in _fd_checks(x, scale, bias):
        assert_grads_match_finite_differences(f, f64, args, tols, fwd=True, err_msg=f"{label} reference")
    with use_backend("xla"):
        for f, f64, args, tols, label in _fd_checks(x, scale, bias, backend="xla"):
            assert_grads_match_finite_differences(f, f64, args, tols, err_msg=f"{label} xla")


def test_bf16_reductions_accumulate_in_f32():
    """dscale/dbias over 4096 bf16 rows: a bf16 accumulator would be off by ~1e-2 relative."""
    shape = (4096, 8)
    x, scale, bias, dy = _inputs(shape, jnp.bfloat16, seed=5)
    exact, scales = _exact(x, scale, bias, dy, 1e-6, False)
    for backend in ("interpret", "xla"):
        with use_backend(backend):
            ds, db = jax.grad(lambda s, b: jnp.sum(ln.layer_norm(x, s, b).astype(jnp.float32) * dy), argnums=(0, 1))(
                scale, bias
            )
        # f32 sums of exactly representable bf16 products: the f32 tolerance, about 1e-6 relative.
        _check({"dscale": ds, "dbias": db}, exact, scales, shape, {}, err_msg=backend)


@pytest.mark.parametrize("backend", ["interpret", "xla"])
def test_large_mean_small_std_normalizes_to_unit_std(backend):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1e3, 1e-2, size=(16, 1000)).astype(np.float32))
    with use_backend(backend):
        y = ln.layer_norm(x, epsilon=1e-12)
        _, mean, rstd = ln.layer_norm_fwd(x, epsilon=1e-12)
    x64 = np.asarray(x, np.float64)
    std = x64.std(-1)
    # First order: the mean within its f32 tolerance (~12 u32 * 1e3 = 7e-4; measured 1.6-1.9 u32 * 1e3).
    assert_within(
        mean, x64.mean(-1), _tol("mean", jnp.float32, x.shape, {"mean": np.abs(x64).mean(-1).max()}), err_msg="mean"
    )
    # The spread around that computed mean is sqrt(std^2 + d^2), d = its error, so rstd is within its f32
    # chain of 1 / sqrt(std^2 + d^2 + eps), and y = (x - mean) * rstd has std 1 - d^2 / (2 std^2):
    # second order in d, where the one-pass E[x^2] - E[x]^2 loses everything (below).
    d = np.asarray(mean, np.float64) - x64.mean(-1)
    rstd_exact = 1.0 / np.sqrt(std**2 + d**2 + 1e-12)
    tol = _tol("rstd", jnp.float32, x.shape, {"rstd": rstd_exact.max()})
    assert_within(rstd, rstd_exact, tol, err_msg="rstd")  # measured 2 u32 relative
    # y = (x - mean) * rstd: x - mean is exact (Sterbenz), the product rounds once (u32), so std(y) is
    # std * rstd within rstd's relative tolerance + u32, and 1 within that + (d^2 + eps) / (2 std^2).
    rel = tol["atol"] / rstd_exact.min() + unit_roundoff(jnp.float32)
    std_y = np.std(np.asarray(y, np.float64), axis=-1)
    assert_within(std_y, std * rstd_exact, {"rtol": rel, "atol": 0.0}, err_msg="std(y)")
    # Measured |std(y) - 1| = 4-6e-5, all of it d^2 / (2 std^2) (was: atol = 2e-3).
    np.testing.assert_allclose(std_y, 1.0, rtol=0, atol=np.max((d**2 + 1e-12) / (2 * std**2)) + 2 * rel)
    # The data is genuinely hard: flax's default one-pass variance gets it wrong.
    fast = nnx.LayerNorm(1000, epsilon=1e-12, rngs=nnx.Rngs(0))(x)
    assert not np.allclose(np.std(np.asarray(fast, np.float64), axis=-1), 1.0, atol=0.1)


def test_jit_vmap_and_no_scale_bias():
    shape = (3, 5, 40)
    x, scale, bias, _ = _inputs(shape, jnp.float32, seed=2)
    with use_backend("interpret"):
        y_vmap = jax.jit(jax.vmap(lambda x: ln.layer_norm(x, scale, bias)))(x)
        y_plain = ln.layer_norm(x)
        r_plain = ln.rms_norm(x)
    ones, zeros = jnp.ones(shape[-1]), jnp.zeros(shape[-1])
    for y, s, b, rms in ((y_vmap, scale, bias, False), (y_plain, ones, zeros, False), (r_plain, ones, zeros, True)):
        exact, scales = _exact(x, s, b, x, 1e-6, rms)
        _check({"y": y}, exact, scales, shape, {}, err_msg=f"rms={rms}")


def test_bad_inputs():
    x = jnp.ones((4, 8))
    with pytest.raises(ValueError, match="scale"):
        ln.layer_norm(x, jnp.ones((7,)))
    with pytest.raises(ValueError, match="bias"):
        ln.layer_norm(x, None, jnp.ones((8, 1)))
    with pytest.raises(ValueError, match="epsilon"):
        ln.rms_norm(x, epsilon=0.0)
    with pytest.raises(ValueError, match="at least one axis"):
        ln.layer_norm(jnp.float32(1.0))
    with pytest.raises(TypeError, match="int32"):
        ln.rms_norm(jnp.ones((4, 8), jnp.int32))


# --------------------------------------------------------------------------------------------
# Mutants: deliberately broken formulas that the comparisons above must reject
# --------------------------------------------------------------------------------------------


def _bwd_xla_without_mean_g(x, w2, mean, rstd, dy, rms):
    """`ln._bwd_xla` with dx missing its -mean(g) term."""
    xf, dyf = x.astype(jnp.float32), dy.astype(jnp.float32)
    xhat = (xf if rms else xf - mean[..., None]) * rstd[..., None]
    g = dyf * w2[0].astype(jnp.float32)
    dx = (g - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)) * rstd[..., None]
    lead = tuple(range(x.ndim - 1))
    db = None if rms else jnp.sum(dyf, axis=lead)[None]
    return dx.astype(dy.dtype), jnp.sum(dyf * xhat, axis=lead)[None], db


def _bwd_block_without_mean_g(row0, rows, stats, feats, outs, *, t, rms):
    """`ln._bwd_block` (the Pallas kernel's body) with dx missing its -mean(g) term."""
    x_ref, dy_ref = rows
    mean_ref, rstd_ref = (None, *stats) if rms else stats
    (w_ref,), (dx_ref,) = feats, outs
    mask = ln.block_mask(t, row0=row0)
    x = ln.load_f32(x_ref, t, mask)
    dy = ln.load_f32(dy_ref, t, mask)
    w = ln.load_f32(w_ref, t, ln.block_mask(t, rows=1))
    rstd = ln.load_f32(rstd_ref, t, ln.block_mask(t, cols=1, row0=row0))
    xhat = (x if rms else x - ln.load_f32(mean_ref, t, ln.block_mask(t, cols=1, row0=row0))) * rstd
    if mask is not None:
        xhat = jnp.where(mask, xhat, 0.0)
    g = dy * w
    dx = g - xhat * jnp.sum(g * xhat, axis=1, keepdims=True) * (1.0 / t.n)
    ln.store(dx_ref, dx * rstd, t, mask)
    dw = jnp.sum(dy * xhat, axis=0, keepdims=True)
    return (dw,) if rms else (dw, jnp.sum(dy, axis=0, keepdims=True))


def _bwd2_dscale_missing_last_row(original):
    """`ln._bwd2` whose dscale sums over all rows but the last."""

    def bwd2(x, w2, mean, rstd, dy, rms):
        dx, dw, db = original(x, w2, mean, rstd, dy, rms)
        x_last, dy_last = (v.reshape(-1, v.shape[-1])[-1].astype(jnp.float32) for v in (x, dy))
        xhat_last = (x_last - (0.0 if rms else mean.reshape(-1)[-1])) * rstd.reshape(-1)[-1]
        return dx, dw - dy_last * xhat_last, db

    return bwd2


def _fwd_xla_variance_over_n_minus_1(x, w2, b2, eps, rms):
    """`ln._fwd_xla` with the variance divided by N - 1 instead of N."""
    xf = x.astype(jnp.float32)
    mean = None if rms else jnp.mean(xf, axis=-1)
    xc = xf if rms else xf - mean[..., None]
    rstd = jax.lax.rsqrt(jnp.sum(xc * xc, axis=-1) / (x.shape[-1] - 1) + eps)
    y = xc * rstd[..., None] * w2[0].astype(jnp.float32)
    if not rms:
        y = y + b2[0].astype(jnp.float32)
    return y.astype(x.dtype), mean, rstd


MUTANTS = {  # name: (what to patch, the mutant, backend it runs on, the result that must fail)
    "dx_without_mean_g-xla": ("_bwd_xla", lambda: _bwd_xla_without_mean_g, "xla", "dx"),
    "dx_without_mean_g-kernel": ("_bwd_block", lambda: _bwd_block_without_mean_g, "interpret", "dx"),
    "dscale_one_row_short": ("_bwd2", lambda: _bwd2_dscale_missing_last_row(ln._bwd2), "xla", "dscale"),
    "variance_over_n_minus_1": ("_fwd_xla", lambda: _fwd_xla_variance_over_n_minus_1, "xla", "y"),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_mutants_fail(monkeypatch, mutant, dtype):
    """The checks of `test_vjp_matches_reference_autodiff` reject each mutant, in f32 and in bf16.

    Same input as that test's ("triton", (5, 7, 1000)) case, which passes them unmutated. Measured
    max error / tolerance of the mutants: dx without -mean(g) 4.2e3 (f32), 3.9e3 (bf16); dscale one
    row short 3.7e5 (both); variance over N - 1 309 (f32), 62 (bf16). The hand-picked tolerances this
    replaced (bf16: atol 3e-2 * 8 + rtol 2e-2 on y and dx) passed the bf16 dx and variance mutants."""
    _set_layout(monkeypatch, "triton")
    shape = (5, 7, 1000)
    x, scale, bias, dy = _inputs(shape, dtype, seed=7 + len(shape))
    name, make, backend, result = MUTANTS[mutant]
    monkeypatch.setattr(ln, name, make())
    with pytest.raises(AssertionError, match=f"^{result} {backend}"):
        _check_vjp(ln.layer_norm, ln.layer_norm_reference, x, scale, bias, dy, False, (backend,))


def test_mutant_fails_finite_differences(monkeypatch):
    """The finite-difference check rejects the dx without -mean(g) too (f32, xla path)."""
    x, scale, bias, _ = _inputs((4, 6), jnp.float32, seed=11)
    f, f64, args, tols, _ = _fd_checks(x, scale, bias, backend="xla")[0]
    monkeypatch.setattr(ln, "_bwd_xla", _bwd_xla_without_mean_g)
    with use_backend("xla"), pytest.raises(AssertionError, match="vjp"):
        assert_grads_match_finite_differences(f, f64, args, tols)


LOWERINGS = [("triton", "cuda", "__gpu$xla.gpu.triton"), ("mosaic", "tpu", "tpu_custom_call")]


@pytest.mark.parametrize("backend,platform,marker", LOWERINGS)
@pytest.mark.parametrize(
    "shape,dtype",
    [((4096, 1000), jnp.bfloat16), ((3, 100), jnp.float32), ((16, 8192), jnp.float32), ((2, 5, 17), jnp.bfloat16)],
)
def test_lowers_for_gpu_and_tpu(backend, platform, marker, shape, dtype):
    x = jax.ShapeDtypeStruct(shape, dtype)
    s = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)

    def loss(f):
        return jax.grad(lambda x, s: jnp.sum(f(x, s).astype(jnp.float32)), argnums=(0, 1))

    ln_f = lambda x, s: ln.layer_norm(x, s, s)  # noqa: E731
    rms_f = lambda x, s: ln.rms_norm(x, s)  # noqa: E731
    for f, calls in ((ln_f, 1), (rms_f, 1), (loss(ln_f), 2), (loss(rms_f), 2)):
        text = lower_for(f, x, s, platform=platform, backend=backend).as_text()
        assert text.count(marker) == calls


# --------------------------------------------------------------------------------------------
# Persistent grid of the backward (dscale/dbias partials: one per program, not per row block)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["triton", "mosaic"])
@pytest.mark.parametrize(
    "m,block_rows,programs", [(1, 1, 5), (10, 4, 3), (37, 4, 3), (200, 8, 3), (300, 32, 3), (96, 32, 2), (5, 1, 528)]
)
def test_row_loop_covers_every_row_block_once(monkeypatch, layout, m, block_rows, programs):
    monkeypatch.setattr(blocks, "PERSISTENT_PROGRAMS", {"triton": programs, "mosaic": programs})
    t = ln.Tiling(layout, m, 7, block_rows, 8)
    loop = ln.row_loop(t)
    owned = [list(loop.blocks(p)) for p in range(loop.programs)]
    assert loop.programs <= min(programs, t.grid) and all(owned)  # no program without a block
    assert sorted(i for b in owned for i in b) == list(range(t.grid))
    assert max(map(len, owned)) == loop.steps
    # Only the array's last block may be ragged, and it is the last one its program merges.
    assert all(i != t.grid - 1 for b in owned for i in b[:-1])
    np.testing.assert_array_equal(loop.rows().sum(), m)
    np.testing.assert_array_equal(loop.rows_f32(), loop.rows())


# (interpreter layout, shape) with 64-element blocks and 3 programs: every program loops over
# 2-9 row blocks; ragged last row block and/or power-of-two-padded columns (triton layout).
PERSISTENT_CASES = [
    ("triton", (37, 10)),
    ("triton", (4, 50, 7)),
    ("triton", (5, 100)),
    ("triton", (64, 16)),
    ("mosaic", (300, 20)),
    ("mosaic", (200, 7)),
]


@pytest.mark.parametrize("layout,shape", PERSISTENT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_persistent_bwd_matches_reference(monkeypatch, layout, shape, dtype):
    monkeypatch.setattr(blocks, "INTERPRET_LAYOUT", layout)
    monkeypatch.setattr(blocks, "PERSISTENT_PROGRAMS", {"triton": 3, "mosaic": 3})
    monkeypatch.setattr(ln, "_BWD_BLOCK", {"triton": 64, "mosaic": 64})
    m, n = int(np.prod(shape[:-1])), shape[-1]
    loop = ln.row_loop(ln.make_tiling(m, n, layout, block_elems=64))
    assert loop.programs == 3 and loop.steps >= 2
    x, scale, bias, dy = _inputs(shape, dtype, seed=100 + m + n)

    mean, rstd = (jnp.asarray(v, jnp.float32) for v in _np_stats(x, False, 1e-6))
    _, rstd_rms = _np_stats(x, True, 1e-6)

    def bwd(x, scale, mean, rstd, rstd_rms, dy):  # one jit: a single compile of both interpreted kernels
        return ln.layer_norm_bwd(x, scale, mean, rstd, dy), ln.rms_norm_bwd(x, scale, rstd_rms, dy)

    with use_backend("interpret"):
        out_ln, out_rms = jax.jit(bwd)(x, scale, mean, rstd, jnp.asarray(rstd_rms, jnp.float32), dy)
    for rms, out in ((False, out_ln), (True, out_rms)):
        assert out[0].dtype == dtype and out[0].shape == shape
        assert all(a.dtype == jnp.float32 and a.shape == (n,) for a in out[1:])  # f32 sums over all m rows
        exact, scales = _exact(x, scale, bias, dy, 1e-6, rms)
        results = dict(zip(("dx", "dscale", "dbias"), out))
        _check(results, exact, scales, shape, {"dx": dtype}, err_msg=f"rms={rms}")


def _kernel_results(text):
    """{kernel name: its result types ("8192x1x8192xf32", ...)} for the Pallas custom calls of a module."""
    results = {}
    for line in text.splitlines():
        if "custom_call" not in line:
            continue
        line = re.sub(r'\bir = "(?:[^"\\]|\\.)*"', "", line)  # the Triton IR blob
        name = re.search(r'name = "(\w+)"', line)
        if name:
            results[name.group(1)] = re.findall(r"tensor<([^>]*)>", line.rsplit("->", 1)[1])
    return results


@pytest.mark.parametrize("rows", [8192, 65536])
def test_bwd_partials_are_per_program_not_per_row_block(rows):
    """The lowered backward's dscale/dbias partials are (P, 1, N) f32 for any number of rows M.

    One partial per row block made them (M, 1, N) on Triton at N = 8192 (one-row blocks):
    537 MB for dscale + dbias at 8192 x 8192, more than the bf16 activations (134 MB)."""
    n = 8192
    x = jax.ShapeDtypeStruct((rows, n), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((n,), jnp.float32)
    for backend, platform in (("triton", "cuda"), ("mosaic", "tpu")):
        programs = blocks.PERSISTENT_PROGRAMS[backend]
        for rms, name in ((False, "layer_norm_bwd"), (True, "rms_norm_bwd")):

            def loss(x, s, rms=rms):  # fresh per backend: jit caches traces, the backend is read at trace
                y = ln.rms_norm(x, s) if rms else ln.layer_norm(x, s, s)
                return jnp.sum(y.astype(jnp.float32))

            text = lower_for(jax.grad(loss, argnums=(0, 1)), x, s, platform=platform, backend=backend).as_text()
            partials = [f"{programs}x1x{n}xf32"] * (1 if rms else 2)
            assert _kernel_results(text)[name] == [f"{rows}x{n}xbf16", *partials]
    assert blocks.PERSISTENT_PROGRAMS["triton"] * n * 4 < 20e6  # bytes per partial, whatever M is
