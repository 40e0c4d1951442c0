"""BatchNorm statistics and training-mode BatchNorm kernels: interpreter parity with float64 numpy
and the jnp references (several row blocks, ragged tails), VJPs against autodiff of the
references, the mean-1e3/std-1e-2 case, and Triton/Mosaic lowering."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from optax_ext.kernels import batch_norm as bn
from optax_ext.kernels import layer_norm as ln
from optax_ext.kernels.backend import use_backend

# (interpreter layout, shape). Blocks are shrunk below so every shape but the tiny ones spans
# several row blocks with a ragged last one.
CASES = [("triton", (33, 10)), ("triton", (4, 5, 7, 3)), ("triton", (2, 3)), ("mosaic", (70, 6)),
         ("mosaic", (4, 5, 7, 3))]
DTYPES = [jnp.float32, jnp.bfloat16]


def _set_layout(monkeypatch, layout):
    monkeypatch.setattr(ln, "_INTERPRET_LAYOUT", layout)
    # Few persistent programs, so that the multi-block shapes have programs looping over blocks.
    monkeypatch.setattr(ln, "_PERSISTENT_PROGRAMS", {"triton": 3, "mosaic": 3})
    monkeypatch.setattr(bn, "_STATS_BLOCK", {"triton": 64, "mosaic": 64})
    monkeypatch.setattr(bn, "_AFFINE_BLOCK", {"triton": 64, "mosaic": 64})


def _inputs(shape, dtype, seed):
    k = jax.random.split(jax.random.key(seed), 6)
    c = shape[-1]
    x = (jax.random.normal(k[0], shape) * 3.0 + 1.0).astype(dtype)
    scale = 1.0 + 0.5 * jax.random.normal(k[1], (c,))
    bias = jax.random.normal(k[2], (c,))
    cts = (jax.random.normal(k[3], shape).astype(dtype), jax.random.normal(k[4], (c,)),
           jax.random.normal(k[5], (c,)))
    return x, scale, bias, cts


def _close(a, b, dtype, scale=1.0):
    rtol, atol = (1e-5, 1e-5) if dtype == jnp.float32 else (2e-2, 3e-2)
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("layout,shape", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_match_float64(monkeypatch, layout, shape, dtype):
    _set_layout(monkeypatch, layout)
    x, *_ = _inputs(shape, dtype, seed=sum(shape))
    with use_backend("interpret"):
        mean, var = bn.batch_norm_stats(x)
    assert mean.dtype == var.dtype == jnp.float32 and mean.shape == var.shape == shape[-1:]
    x64 = np.asarray(x, np.float64).reshape(-1, shape[-1])
    np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, x64.var(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout,shape", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_and_vjp_match_reference(monkeypatch, layout, shape, dtype):
    _set_layout(monkeypatch, layout)
    x, scale, bias, cts = _inputs(shape, dtype, seed=1 + sum(shape))
    out_ref, vjp_ref = jax.vjp(bn.batch_norm_reference, x, scale, bias)
    g_ref = vjp_ref(cts)
    s_ref, svjp_ref = jax.vjp(bn.batch_norm_stats_reference, x)
    sg_ref = svjp_ref(cts[1:])
    rows = int(np.prod(shape[:-1]))
    for backend in ("interpret", "xla"):
        with use_backend(backend):
            out, vjp = jax.vjp(bn.batch_norm, x, scale, bias)
            g = vjp(cts)
            s, svjp = jax.vjp(bn.batch_norm_stats, x)
            sg = svjp(cts[1:])
        assert out[0].dtype == dtype and g[0].dtype == dtype and g[1].dtype == jnp.float32
        _close(out[0], out_ref[0], dtype, scale=4)
        for a, b in zip(out[1:] + s, out_ref[1:] + s_ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        _close(g[0], g_ref[0], dtype, scale=4)
        _close(g[1], g_ref[1], dtype, scale=4 * np.sqrt(rows))
        _close(g[2], g_ref[2], dtype, scale=4 * np.sqrt(rows))
        _close(sg[0], sg_ref[0], dtype)


def test_check_grads_reference_and_xla_path():
    x, scale, bias, _ = _inputs((6, 3), jnp.float32, seed=4)
    check_grads(lambda x, s, b: bn.batch_norm_reference(x, s, b), (x, scale, bias), order=1, atol=2e-2, rtol=2e-2)
    check_grads(bn.batch_norm_stats_reference, (x,), order=1, atol=2e-2, rtol=2e-2)
    with use_backend("xla"):
        check_grads(lambda x, s, b: bn.batch_norm(x, s, b), (x, scale, bias), order=1, modes=["rev"],
                    atol=2e-2, rtol=2e-2)
        check_grads(bn.batch_norm_stats, (x,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["interpret", "xla"])
@pytest.mark.parametrize("shape", [(4096, 4), (8, 16, 16, 4)])
def test_large_mean_small_std(monkeypatch, backend, shape):
    """Mean 1e3, std 1e-2 in f32: E[x^2] - E[x]^2 has no correct digits; ours must be exact."""
    monkeypatch.setattr(bn, "_STATS_BLOCK", {"triton": 1024, "mosaic": 1024})
    # 3 programs merging 5-6 blocks each (Chan et al. in the kernel loop), then 3 partials in XLA.
    monkeypatch.setattr(ln, "_PERSISTENT_PROGRAMS", {"triton": 3, "mosaic": 3})
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(1e3, 1e-2, size=shape).astype(np.float32))
    x64 = np.asarray(x, np.float64).reshape(-1, shape[-1])
    with use_backend(backend):
        mean, var = bn.batch_norm_stats(x)
        y, _, _ = bn.batch_norm(x, epsilon=1e-12)
    np.testing.assert_allclose(var, x64.var(0), rtol=1e-3)
    # Within one f32 ulp of 1e3 (6.1e-5): the shifted block sums lose nothing to the large mean.
    np.testing.assert_allclose(mean, x64.mean(0), rtol=0, atol=6.2e-5)
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(-1, shape[-1]).std(0), 1.0, atol=2e-3)
    # flax's default (fast) variance on the same data is far off.
    fast = nnx.BatchNorm(shape[-1], epsilon=1e-12, use_running_average=False, rngs=nnx.Rngs(0))(x)
    assert not np.allclose(np.asarray(fast, np.float64).reshape(-1, shape[-1]).std(0), 1.0, atol=0.1)


def test_no_scale_bias_and_jit():
    x, *_ = _inputs((3, 4, 5), jnp.float32, seed=9)
    with use_backend("interpret"):
        y, mean, var = jax.jit(bn.batch_norm)(x)
    y_ref, m_ref, v_ref = bn.batch_norm_reference(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, v_ref, rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="feature axis"):
        bn.batch_norm_stats(jnp.ones((5,)))
    with pytest.raises(ValueError, match="scale"):
        bn.batch_norm(jnp.ones((4, 3)), jnp.ones((4,)))
    with pytest.raises(ValueError, match="epsilon"):
        bn.batch_norm(jnp.ones((4, 3)), epsilon=-1.0)
    with pytest.raises(TypeError, match="int32"):
        bn.batch_norm_stats(jnp.ones((4, 3), jnp.int32))


LOWERINGS = [("triton", "cuda", "__gpu$xla.gpu.triton"), ("mosaic", "tpu", "tpu_custom_call")]


@pytest.mark.parametrize("backend,platform,marker", LOWERINGS)
@pytest.mark.parametrize("shape,dtype", [((256, 56, 56, 64), jnp.bfloat16), ((33, 10), jnp.float32),
                                         ((4, 5, 7, 3), jnp.bfloat16)])
def test_lowers_for_gpu_and_tpu(backend, platform, marker, shape, dtype):
    x = jax.ShapeDtypeStruct(shape, dtype)
    s = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)

    def bn_loss(x, s):
        y, mean, var = bn.batch_norm(x, s, s)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(mean * var)

    def stats_loss(x):
        mean, var = bn.batch_norm_stats(x)
        return jnp.sum(mean * var)

    # forward: stats + normalise; backward adds the sums kernel and the dx kernel.
    # Fresh lambdas: jax.jit caches traces by function identity, and the backend is read at trace time.
    for f, args, calls in ((lambda x, s: bn.batch_norm(x, s, s), (x, s), 2), (lambda x: bn.batch_norm_stats(x), (x,), 1),
                           (jax.grad(bn_loss, argnums=(0, 1)), (x, s), 4), (jax.grad(stats_loss), (x,), 2)):
        with use_backend(backend):
            text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        assert text.count(marker) == calls


# --------------------------------------------------------------------------------------------
# Persistent grid of the statistics and backward sums (partials per program, not per row block)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fake_tpu(monkeypatch):
    """Register the CPU as a TPU v5e for Mosaic lowering rules that ask for the chip generation
    (copied from tests/test_kernels_lowering.py; private API, tests only)."""
    try:
        from jax._src.pallas.mosaic import tpu_info
    except ImportError:  # pragma: no cover - layout of jax internals changed
        return
    kind = jax.devices()[0].device_kind
    if tpu_info.chip_version_from_device_kind(kind) is None and kind not in tpu_info.registry:
        monkeypatch.setitem(tpu_info.registry, kind,
                            lambda: tpu_info._get_tpu_info_impl(tpu_info.ChipVersion.TPU_V5E, 1))


# (interpreter layout, shape) with 64-element blocks and 3 programs: every program loops over
# 2-9 row blocks, with a ragged last row block and/or power-of-two-padded columns.
PERSISTENT_CASES = [("triton", (200, 5)), ("triton", (3, 50, 7)), ("triton", (64, 16)), ("mosaic", (300, 6)),
                    ("mosaic", (5, 40, 3))]


@pytest.mark.parametrize("layout,shape", PERSISTENT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_persistent_stats_and_bwd_sums_match_reference(monkeypatch, layout, shape, dtype):
    _set_layout(monkeypatch, layout)
    r, c = int(np.prod(shape[:-1])), shape[-1]
    loop = ln.row_loop(ln.make_tiling(r, c, layout, block_elems=64))
    assert loop.programs == 3 and loop.steps >= 2
    x, scale, _, cts = _inputs(shape, dtype, seed=200 + r + c)
    x = x + 50.0  # |mean| >> std: the in-loop merges must keep the shifted sums exact
    x64 = np.asarray(x, np.float64).reshape(r, c)
    mean64, var64 = x64.mean(0), x64.var(0)
    dy = cts[0]
    dy64 = np.asarray(dy, np.float64).reshape(r, c)

    def stats_and_sums(x, dy):  # one jit: a single compile of both interpreted kernels
        mean, var = bn.batch_norm_stats(x)
        rstd = jax.lax.rsqrt(var + 1e-5)
        return mean, var, rstd, bn._bwd_sums(x.reshape(r, c), dy.reshape(r, c), mean, rstd)

    with use_backend("interpret"):
        mean, var, rstd, (sdy, sdyx) = jax.jit(stats_and_sums)(x, dy)
    np.testing.assert_allclose(mean, mean64, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(var, var64, rtol=1e-5, atol=1e-5)
    xhat64 = (x64 - np.asarray(mean, np.float64)) * np.asarray(rstd, np.float64)
    np.testing.assert_allclose(sdy, dy64.sum(0), rtol=1e-5, atol=1e-5 * np.sqrt(r))
    np.testing.assert_allclose(sdyx, (dy64 * xhat64).sum(0), rtol=1e-4, atol=1e-4 * np.sqrt(r))


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
def test_partials_are_per_program_not_per_row_block(fake_tpu, rows):
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

        with use_backend(backend):
            text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, s).lower(
                lowering_platforms=(platform,)).as_text()
        results = _kernel_results(text)
        partial = f"{ln._PERSISTENT_PROGRAMS[backend]}x1x{c}xf32"
        assert results["batch_norm_stats"] == [partial, partial]
        assert results["batch_norm_bwd_sums"] == [partial, partial]
