"""BatchNorm statistics and training-mode BatchNorm kernels: interpreter parity with float64 numpy
and the jnp references (several row blocks, ragged tails), VJPs against autodiff of the
references, the mean-1e3/std-1e-2 case, and Triton/Mosaic lowering.

Every comparison is against the float64 value of the formula on the same inputs, within a tolerance
derived from the unit roundoff (`conftest.tolerance`); `test_mutants_fail` proves that a dx missing its
mean term, sums missing a row and a variance over R - 1 fail those comparisons."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_grads_match_finite_differences, assert_within, tolerance, unit_roundoff
from flax import nnx

from optax_ext.kernels import batch_norm as bn
from optax_ext.kernels import blocks, lower_for
from optax_ext.kernels.backend import use_backend

# (interpreter layout, shape). Blocks are shrunk below so every shape but the tiny ones spans
# several row blocks with a ragged last one.
CASES = [
    ("triton", (33, 10)),
    ("triton", (4, 5, 7, 3)),
    ("triton", (2, 3)),
    ("mosaic", (70, 6)),
    ("mosaic", (4, 5, 7, 3)),
]
DTYPES = [jnp.float32, jnp.bfloat16]


def _set_layout(monkeypatch, layout):
    monkeypatch.setattr(blocks, "INTERPRET_LAYOUT", layout)
    # Few persistent programs, so that the multi-block shapes have programs looping over blocks.
    monkeypatch.setattr(blocks, "PERSISTENT_PROGRAMS", {"triton": 3, "mosaic": 3})
    monkeypatch.setattr(bn, "_STATS_BLOCK", {"triton": 64, "mosaic": 64})
    monkeypatch.setattr(bn, "_AFFINE_BLOCK", {"triton": 64, "mosaic": 64})


def _inputs(shape, dtype, seed):
    k = jax.random.split(jax.random.key(seed), 6)
    c = shape[-1]
    x = (jax.random.normal(k[0], shape) * 3.0 + 1.0).astype(dtype)
    scale = 1.0 + 0.5 * jax.random.normal(k[1], (c,))
    bias = jax.random.normal(k[2], (c,))
    cts = (jax.random.normal(k[3], shape).astype(dtype), jax.random.normal(k[4], (c,)), jax.random.normal(k[5], (c,)))
    return x, scale, bias, cts


def _bn64(x, scale, bias, eps):
    """The textbook formula for float64 inputs: (y, mean, biased var) over all axes but the last."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.mean(jnp.square(x - mean), axes)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias, mean, var


def _stats64(x):
    return _bn64(x, 1.0, 0.0, 1.0)[1:]


@functools.partial(jax.jit, static_argnums=(4,))
def _vjp64(x, scale, bias, cts, eps):
    out, vjp = jax.vjp(lambda x, s, b: _bn64(x, s, b, eps), x, scale, bias)
    _stats, svjp = jax.vjp(_stats64, x)
    return out, vjp(cts), svjp(cts[1:])[0]


def _exact(x, scale, bias, cts, eps=1e-5):
    """float64 y, mean, var, dx, dscale, dbias and the stats' dx (`sdx`) of the same (rounded) inputs
    (autodiff of `_bn64`), and the magnitudes of what each is computed from: the `scale` of its `tolerance`."""
    c = x.shape[-1]
    x, s, b = (np.asarray(v, np.float64) for v in (x, scale, bias))
    cts = tuple(np.asarray(v, np.float64) for v in cts)
    with jax.enable_x64(True):
        (y, mean, var), (dx, ds, db), sdx = jax.tree.map(np.asarray, _vjp64(x, s, b, cts, eps))
    dy, dmean, dvar = cts
    x2, dy2 = x.reshape(-1, c), dy.reshape(-1, c)
    r, rstd = x2.shape[0], 1.0 / np.sqrt(var + eps)
    xterms = (np.abs(x2) + np.abs(mean)) * rstd  # xhat's terms: x - mean cancels when |mean| >> std
    k = np.abs(s) * rstd

    def rss(t):  # per column, root-sum-square over rows: the size of the partial sums of random-sign terms
        return np.sqrt(np.sum(np.square(t), 0))

    exact = {"y": y, "mean": mean, "var": var, "dx": dx, "dscale": ds, "dbias": db, "sdx": sdx}
    scales = {
        "y": np.max(xterms * np.abs(s) + np.abs(b)),
        "mean": np.abs(x2).mean(0).max(),  # the plain sum (xla path)
        "mean_shifted": np.abs(x2 - x2[:1]).mean(0).max(),  # the kernel's sum of x - K, K = the first row
        "var": var.max(),  # positive terms: relative to the result
        "dx": np.max(
            k * np.abs(dy2)
            + (np.abs(dmean) + k * rss(dy2)) / r
            + 2 * (np.abs(x2) + np.abs(mean)) * (np.abs(dvar) + 0.5 * k * rstd * rss(dy2 * xterms)) / r
        ),
        "dscale": rss(dy2 * xterms).max(),
        "dbias": rss(dy2).max(),
        "sdx": np.max(np.abs(dmean) / r + 2 * np.abs(dvar) * (np.abs(x2) + np.abs(mean)) / r),
    }
    return exact, scales


# f32 elementwise roundings on the chain that computes each result (see `conftest.tolerance`; an f32
# rsqrt counts 2), and the lengths of its reductions ("R": over the rows, all axes but the last).
# Measured on every case of this module (CPU, jax 0.10), as max |error| / tolerance over the elements:
# bf16 y, dx and the statistics' dx 0.95-0.97 (the rounding to bf16); f32 results 0.04-0.77, i.e.
# 1.3-28x below (worst-case chains against 1-7 u32 of actual error); the f32 mean, var, dscale, dbias
# of bf16 inputs 0-0.21. The tolerances replaced: f32 rtol 1e-5 with atol 1e-5 to 4e-5 * sqrt(R);
# bf16 rtol 2e-2 with atol 0.03-0.12 on y and dx, 0.12 * sqrt(R) on the f32 dscale/dbias.
_CHAINS = {
    "mean": (8, "R"),  # x - K, block sums, / count (2), Chan merges (d, * n_b / n, +), the programs' merge (3), + K
    "var": (10, "R"),  # centring, square, block sums, Chan merges (M2_a + M2_b + d^2 n_a n_b / n: 4), / R (2)
    "y": (16, "R"),  # var's 10, + eps, rsqrt (2), x - mean, * (rstd * scale) (2), + bias
    "dx": (14, "RR"),  # rstd (13), then sums over R, k = scale * rstd, gm, gv (3), / R (2), the affine (4)
    "dscale": (14, "RR"),  # xhat (rstd's 13, x - mean, * rstd), dy * xhat, sum over R
    "dbias": (0, "R"),  # sum of dy over R
    "sdx": (12, "R"),  # mean (8), x - mean, * 2 dvar / R (2), + dmean / R
}


def _tol(name, dtype, shape, scales, shifted=False):
    """`tolerance` of result `name` (stored in `dtype`) for an input of `shape`; `shifted`: statistics of
    the Pallas kernel, which sums x - K rather than x."""
    ops, reductions = _CHAINS[name]
    r = int(np.prod(shape[:-1]))
    scale = scales["mean_shifted" if name == "mean" and shifted else name]
    return tolerance(dtype, [r for _ in reductions], scale, ops=ops)


def _check(results, exact, scales, shape, dtypes, err_msg="", shifted=False):
    """Every result in `results` {name: array} against float64 `exact`: the check the mutants must fail."""
    for name, value in results.items():
        assert_within(
            value,
            exact[name],
            _tol(name, dtypes.get(name, jnp.float32), shape, scales, shifted),
            err_msg=f"{name} {err_msg}",
        )


@pytest.mark.parametrize("layout,shape", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_match_float64(monkeypatch, layout, shape, dtype):
    _set_layout(monkeypatch, layout)
    x, *_ = _inputs(shape, dtype, seed=sum(shape))
    with use_backend("interpret"):
        mean, var = bn.batch_norm_stats(x)
    assert mean.dtype == var.dtype == jnp.float32 and mean.shape == var.shape == shape[-1:]
    exact, scales = _exact(x, jnp.ones(shape[-1]), jnp.zeros(shape[-1]), (x, mean, var))
    _check({"mean": mean, "var": var}, exact, scales, shape, {}, shifted=True)


@pytest.mark.parametrize("layout,shape", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_and_vjp_match_reference(monkeypatch, layout, shape, dtype):
    _set_layout(monkeypatch, layout)
    x, scale, bias, cts = _inputs(shape, dtype, seed=1 + sum(shape))
    # The mosaic layout runs in TPU's own interpreter too (backend "mosaic_interpret").
    _check_vjp(x, scale, bias, cts, ("interpret", "xla") + (("mosaic_interpret",) if layout == "mosaic" else ()))


def _check_vjp(x, scale, bias, cts, backends):
    """batch_norm's (y, mean, var) and VJP, batch_norm_stats and its VJP, on each backend and for the
    jnp references, against float64."""
    dtype, shape = x.dtype, x.shape
    exact, scales = _exact(x, scale, bias, cts)
    out, vjp = jax.vjp(bn.batch_norm_reference, x, scale, bias)
    s, svjp = jax.vjp(bn.batch_norm_stats_reference, x)
    runs = [("reference", out, vjp(cts), s, svjp(cts[1:]))]
    for backend in backends:
        with use_backend(backend):
            out, vjp = jax.vjp(bn.batch_norm, x, scale, bias)
            s, svjp = jax.vjp(bn.batch_norm_stats, x)
            runs.append((backend, out, vjp(cts), s, svjp(cts[1:])))
    for label, out, g, s, sg in runs:
        assert out[0].dtype == dtype and g[0].dtype == dtype and g[1].dtype == jnp.float32
        # mean, var, dscale, dbias: f32, even for bf16 x (sums of exactly representable values).
        results = {"y": out[0], "mean": out[1], "var": out[2], "dx": g[0], "dscale": g[1], "dbias": g[2]}
        shifted = label == "interpret"
        if label == "reference":
            # Autodiff of the reference converts x to f32 twice (for the statistics, for y), so its dx is
            # the sum of two cotangents rounded to x's dtype separately: two more roundings of terms of
            # the size of scales["dx"] (in bf16: 17x the kernels' tolerance on some elements).
            tol = _tol("dx", dtype, shape, scales)
            tol["atol"] += 2 * unit_roundoff(dtype) * scales["dx"]
            assert_within(results.pop("dx"), exact["dx"], tol, err_msg="dx reference")
        _check(results, exact, scales, shape, {"y": dtype, "dx": dtype}, err_msg=label, shifted=shifted)
        _check(
            {"mean": s[0], "var": s[1], "sdx": sg[0]},
            exact,
            scales,
            shape,
            {"sdx": dtype},
            err_msg=f"{label} stats",
            shifted=shifted,
        )


def _fd_checks(x, scale, bias, backend=None):
    """(f, float64 twin, args, tolerances of f's outputs, label) for the finite-difference checks."""
    shape = x.shape
    _, scales = _exact(x, scale, bias, (x, bias, bias))
    f_bn, f_stats = (
        (bn.batch_norm_reference, bn.batch_norm_stats_reference)
        if backend is None
        else (bn.batch_norm, bn.batch_norm_stats)
    )
    shifted = backend not in (None, "xla")
    stat_tols = [_tol(name, jnp.float32, shape, scales, shifted) for name in ("mean", "var")]
    return [
        (
            lambda x, s, b: f_bn(x, s, b),
            lambda x, s, b: _bn64(x, s, b, 1e-5),
            (x, scale, bias),
            [_tol("y", jnp.float32, shape, scales), *stat_tols],
            "batch_norm",
        ),
        (f_stats, _stats64, (x,), stat_tols, "batch_norm_stats"),
    ]


def test_grads_match_finite_differences_reference_and_xla_path():
    """AD (both modes for the references, the custom VJPs on the xla path) against central differences,
    within the bound `assert_grads_match_finite_differences` derives (see the report for measured
    fractions). Replaced: check_grads with atol = rtol = 2e-2 at eps = 1e-4 (0.039 and 0.107 on these
    inner products; measured 2.7e-3 to 5.8e-3, 7-19x)."""
    x, scale, bias, _ = _inputs((6, 3), jnp.float32, seed=4)
    for f, f64, args, tols, label in _fd_checks(x, scale, bias):
        assert_grads_match_finite_differences(f, f64, args, tols, fwd=True, err_msg=f"{label} reference")
    with use_backend("xla"):
        for f, f64, args, tols, label in _fd_checks(x, scale, bias, backend="xla"):
            assert_grads_match_finite_differences(f, f64, args, tols, err_msg=f"{label} xla")


@pytest.mark.parametrize("backend", ["interpret", "xla"])
@pytest.mark.parametrize("shape", [(4096, 4), (8, 16, 16, 4)])
def test_large_mean_small_std(monkeypatch, backend, shape):
    """Mean 1e3, std 1e-2 in f32: E[x^2] - E[x]^2 has no correct digits; ours must be exact."""
    monkeypatch.setattr(bn, "_STATS_BLOCK", {"triton": 1024, "mosaic": 1024})
    # 3 programs merging 5-6 blocks each (Chan et al. in the kernel loop), then 3 partials in XLA.
    monkeypatch.setattr(blocks, "PERSISTENT_PROGRAMS", {"triton": 3, "mosaic": 3})
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(1e3, 1e-2, size=shape).astype(np.float32))
    x64 = np.asarray(x, np.float64).reshape(-1, shape[-1])
    with use_backend(backend):
        mean, var = bn.batch_norm_stats(x)
        y, _, _ = bn.batch_norm(x, epsilon=1e-12)
    mean64, var64 = x64.mean(0), x64.var(0)
    u32 = unit_roundoff(jnp.float32)
    if backend == "interpret":
        # The kernel sums x - K (K = the first row; x - K is exact): the mean is K + a small f32 mean,
        # half an ulp of 1e3 (3.1e-5) from the final addition plus the chain on |x - K| ~ 1e-2.
        # Measured 2.2-2.5e-5.
        _, scales = _exact(x, jnp.ones(shape[-1]), jnp.zeros(shape[-1]), (x, mean64, var64))
        assert_within(mean, mean64, _tol("mean", jnp.float32, shape, scales, shifted=True), err_msg="mean")
    else:
        # The xla path's plain two-pass mean: its worst-case bound is `tolerance` on |x| = 1e3, 20 u32 * 1e3
        # = 1.2e-3; XLA's tree sum does far better (measured 3.9-4.0e-5), and this keeps the one ulp
        # of 1e3 that this test always required.
        np.testing.assert_allclose(mean, mean64, rtol=0, atol=float(np.spacing(np.float32(1e3))))
    # The variance about the computed mean is exactly var + d^2 (d: the mean's error, 0 for the kernel,
    # which centres on its own block means): within the variance's f32 chain of that.
    d = np.abs(np.asarray(mean, np.float64) - mean64) * (backend == "xla")
    chain = tolerance(jnp.float32, x64.shape[0], 1.0, ops=_CHAINS["var"][0])["atol"] + u32  # relative
    var_tol = {"rtol": 0.0, "atol": d**2 + chain * (var64 + d**2)}
    assert_within(var, var64, var_tol, err_msg="var")  # measured: 1.5-1.7e-5 relative (xla, all d^2), 9e-8 (kernel)
    # y = (x - mean) * rsqrt(var + eps): x - mean exact (Sterbenz), rsqrt (2 u32), + eps, * (1 u32 each), so
    # std(y) = std(x) / sqrt(var + eps) within 4 u32, which is 1 within |var / var64 - 1| / 2 + eps / (2 var).
    std_y = np.asarray(y, np.float64).reshape(-1, shape[-1]).std(0)
    var_c = np.asarray(var, np.float64)
    assert_within(std_y, np.sqrt(var64 / (var_c + 1e-12)), {"rtol": 4 * u32, "atol": 0.0}, err_msg="std(y)")
    bound = np.abs(var_c / var64 - 1) / 2 + 1e-12 / (2 * var64) + 5 * u32  # measured 5e-8 (kernel), 8e-6 (xla)
    assert_within(std_y, np.ones_like(std_y), {"rtol": 0.0, "atol": bound}, err_msg="|std(y) - 1|")
    # flax's default (fast) variance on the same data is far off.
    fast = nnx.BatchNorm(shape[-1], epsilon=1e-12, use_running_average=False, rngs=nnx.Rngs(0))(x)
    assert not np.allclose(np.asarray(fast, np.float64).reshape(-1, shape[-1]).std(0), 1.0, atol=0.1)


def test_no_scale_bias_and_jit():
    shape = (3, 4, 5)
    x, *_ = _inputs(shape, jnp.float32, seed=9)
    with use_backend("interpret"):
        y, mean, var = jax.jit(bn.batch_norm)(x)
    exact, scales = _exact(x, jnp.ones(shape[-1]), jnp.zeros(shape[-1]), (x, mean, var))
    _check({"y": y, "mean": mean, "var": var}, exact, scales, shape, {}, shifted=True)


def test_bad_inputs():
    with pytest.raises(ValueError, match="feature axis"):
        bn.batch_norm_stats(jnp.ones((5,)))
    with pytest.raises(ValueError, match="scale"):
        bn.batch_norm(jnp.ones((4, 3)), jnp.ones((4,)))
    with pytest.raises(ValueError, match="epsilon"):
        bn.batch_norm(jnp.ones((4, 3)), epsilon=-1.0)
    with pytest.raises(TypeError, match="int32"):
        bn.batch_norm_stats(jnp.ones((4, 3), jnp.int32))


# --------------------------------------------------------------------------------------------
# Mutants: deliberately broken formulas that the comparisons above must reject
# --------------------------------------------------------------------------------------------


def _affine_without_mean_dy(original):
    """`bn._affine` whose dx pass drops -scale * rstd * sum(dy) / R from gm / R = (dmean - k sum(dy)) / R."""

    def affine(x, c, a, b, dy=None, k=None, out_dtype=None):
        if dy is not None:
            r = dy.size // dy.shape[-1]
            b = b + k * jnp.sum(dy.astype(jnp.float32), axis=tuple(range(dy.ndim - 1))) / r
        return original(x, c, a, b, dy, k, out_dtype)

    return affine


def _bwd_sums_one_row_short(original):
    """`bn._bwd_sums` summing over all rows but the last."""

    def sums(x, dy, mean, rstd):
        sdy, sdyx = original(x, dy, mean, rstd)
        x_last, dy_last = (v.reshape(-1, v.shape[-1])[-1].astype(jnp.float32) for v in (x, dy))
        return sdy - dy_last, sdyx - dy_last * (x_last - mean) * rstd

    return sums


def _stats_over_r_minus_1(original):
    """`bn._stats_xla` / `bn._stats_pallas` with the variance divided by R - 1 instead of R."""

    def stats(x, *args):
        mean, var = original(x, *args)
        r = x.size // x.shape[-1]
        return mean, var * (r / (r - 1))

    return stats


MUTANTS = {  # name: (what to patch, the mutant, backend it runs on, the result that must fail)
    "dx_without_mean_dy-xla": ("_affine", _affine_without_mean_dy, "xla", "dx"),
    "dx_without_mean_dy-kernel": ("_affine", _affine_without_mean_dy, "interpret", "dx"),
    "dscale_one_row_short": ("_bwd_sums", _bwd_sums_one_row_short, "xla", "dscale"),
    "dbias_one_row_short": ("_bwd_sums", _bwd_sums_one_row_short, "interpret", "dbias"),
    "variance_over_r_minus_1-xla": ("_stats_xla", _stats_over_r_minus_1, "xla", "var"),
    "variance_over_r_minus_1-kernel": ("_stats_pallas", _stats_over_r_minus_1, "interpret", "var"),
    "y_of_variance_over_r_minus_1": ("_stats_xla", _stats_over_r_minus_1, "xla", "y"),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_mutants_fail(monkeypatch, mutant, dtype):
    """The comparison of `test_batch_norm_and_vjp_match_reference` rejects each mutant's result, in f32
    and in bf16, on that test's ("triton", (4, 5, 7, 3)) input, which it passes unmutated.

    Measured max error / tolerance: dx without the mean term 2.3e4 (f32), 4.2e3 (bf16); dscale one row
    short 5.7e4, dbias one row short 1.7e5; var over R - 1 6.4e3; its y 1.7e3 (f32), 111 (bf16). The
    hand-picked bf16 tolerances this replaced (atol 3e-2 * 4 + rtol 2e-2 on y and dx, 3e-2 * 4 * sqrt(R)
    on dscale and dbias) passed the bf16 dx, dbias and y mutants."""
    _set_layout(monkeypatch, "triton")
    shape = (4, 5, 7, 3)
    x, scale, bias, cts = _inputs(shape, dtype, seed=1 + sum(shape))
    exact, scales = _exact(x, scale, bias, cts)
    name, make, backend, result = MUTANTS[mutant]
    monkeypatch.setattr(bn, name, make(getattr(bn, name)))
    with use_backend(backend):
        (y, _mean, var), vjp = jax.vjp(bn.batch_norm, x, scale, bias)
        dx, dscale, dbias = vjp(cts)
    value = {"y": y, "var": var, "dx": dx, "dscale": dscale, "dbias": dbias}[result]
    with pytest.raises(AssertionError, match=f"^{result} "):
        _check(
            {result: value},
            exact,
            scales,
            shape,
            {"y": dtype, "dx": dtype},
            err_msg=backend,
            shifted=backend == "interpret",
        )


def test_mutant_fails_finite_differences(monkeypatch):
    """The finite-difference check rejects the dx without its mean term too (f32, xla path)."""
    x, scale, bias, _ = _inputs((6, 3), jnp.float32, seed=4)
    f, f64, args, tols, _ = _fd_checks(x, scale, bias, backend="xla")[0]
    monkeypatch.setattr(bn, "_affine", _affine_without_mean_dy(bn._affine))
    with use_backend("xla"), pytest.raises(AssertionError, match="vjp"):
        assert_grads_match_finite_differences(f, f64, args, tols)


LOWERINGS = [("triton", "cuda", "__gpu$xla.gpu.triton"), ("mosaic", "tpu", "tpu_custom_call")]


@pytest.mark.parametrize("backend,platform,marker", LOWERINGS)
@pytest.mark.parametrize(
    "shape,dtype", [((256, 56, 56, 64), jnp.bfloat16), ((33, 10), jnp.float32), ((4, 5, 7, 3), jnp.bfloat16)]
)
def test_lowers_for_gpu_and_tpu(backend, platform, marker, shape, dtype):
    x = jax.ShapeDtypeStruct(shape, dtype)
    s = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)

    def bn_loss(x, s):
        y, mean, var = bn.batch_norm(x, s, s)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(mean * var)

    def stats_loss(x):
        mean, var = bn.batch_norm_stats(x)
        return jnp.sum(mean * var)

    # forward: stats + normalise; backward adds the sums kernel and the dx kernel. value_and_grad, not
    # grad: the loss value needs the normalised output (jax >= 0.12 drops a kernel whose outputs are unused).
    # Fresh lambdas: jax.jit caches traces by function identity, and the backend is read at trace time.
    for f, args, calls in (
        (lambda x, s: bn.batch_norm(x, s, s), (x, s), 2),
        (lambda x: bn.batch_norm_stats(x), (x,), 1),
        (jax.value_and_grad(bn_loss, argnums=(0, 1)), (x, s), 4),
        (jax.grad(stats_loss), (x,), 2),
    ):
        text = lower_for(f, *args, platform=platform, backend=backend).as_text()
        assert text.count(marker) == calls


# --------------------------------------------------------------------------------------------
# Persistent grid of the statistics and backward sums (partials per program, not per row block)
# --------------------------------------------------------------------------------------------


# (interpreter layout, shape) with 64-element blocks and 3 programs: every program loops over
# 2-9 row blocks, with a ragged last row block and/or power-of-two-padded columns.
PERSISTENT_CASES = [
    ("triton", (200, 5)),
    ("triton", (3, 50, 7)),
    ("triton", (64, 16)),
    ("mosaic", (300, 6)),
    ("mosaic", (5, 40, 3)),
]


@pytest.mark.parametrize("layout,shape", PERSISTENT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_persistent_stats_and_bwd_sums_match_reference(monkeypatch, layout, shape, dtype):
    _set_layout(monkeypatch, layout)
    r, c = int(np.prod(shape[:-1])), shape[-1]
    loop = blocks.row_loop(blocks.make_tiling(r, c, layout, block_elems=64))
    assert loop.programs == 3 and loop.steps >= 2
    x, scale, _, cts = _inputs(shape, dtype, seed=200 + r + c)
    x = x + 50.0  # |mean| >> std: the in-loop merges must keep the shifted sums exact
    x64 = np.asarray(x, np.float64).reshape(r, c)
    dy = cts[0]
    dy64 = np.asarray(dy, np.float64).reshape(r, c)

    def stats_and_sums(x, dy):  # one jit: a single compile of both interpreted kernels
        mean, var = bn.batch_norm_stats(x)
        rstd = jax.lax.rsqrt(var + 1e-5)
        return mean, var, rstd, bn._bwd_sums(x.reshape(r, c), dy.reshape(r, c), mean, rstd)

    with use_backend("interpret"):
        mean, var, rstd, (sdy, sdyx) = jax.jit(stats_and_sums)(x, dy)
    exact, scales = _exact(x, scale, scale, cts)
    _check({"mean": mean, "var": var}, exact, scales, shape, {}, shifted=True)
    # The sums against float64 sums of the kernel's own f32 mean and rstd: f32 chains of sums over R
    # (dy * xhat: x - mean, * rstd, * dy: 3 roundings).
    xhat64 = (x64 - np.asarray(mean, np.float64)) * np.asarray(rstd, np.float64)
    xterms = (np.abs(x64) + np.abs(np.asarray(mean, np.float64))) * np.asarray(rstd, np.float64)
    rss = lambda t: np.sqrt(np.sum(np.square(t), 0)).max()  # noqa: E731
    assert_within(sdy, dy64.sum(0), tolerance(jnp.float32, r, rss(dy64)), err_msg="sum dy")
    assert_within(
        sdyx, (dy64 * xhat64).sum(0), tolerance(jnp.float32, r, rss(dy64 * xterms), ops=3), err_msg="sum dy * xhat"
    )


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
def test_partials_are_per_program_not_per_row_block(rows):
    """Statistics and backward-sum partials are (P, 1, C) f32 for any number of rows R.

    One partial per row block (2-row blocks on Triton at C = 8192) made each of them as large as
    the bf16 input: 134 MB at 8192 x 8192, four of them per training step."""
    c = 8192
    x = jax.ShapeDtypeStruct((rows, c), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((c,), jnp.float32)
    for backend, platform in (("triton", "cuda"), ("mosaic", "tpu")):

        def loss(x, s):  # fresh per backend: jit caches traces, the backend is read at trace time
            y, mean, var = bn.batch_norm(x, s, s)
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(mean * var)

        text = lower_for(jax.grad(loss, argnums=(0, 1)), x, s, platform=platform, backend=backend).as_text()
        results = _kernel_results(text)
        partial = f"{blocks.PERSISTENT_PROGRAMS[backend]}x1x{c}xf32"
        assert results["batch_norm_stats"] == [partial, partial]
        assert results["batch_norm_bwd_sums"] == [partial, partial]
