"""LayerNorm / RMSNorm kernels: interpreter parity with float64 numpy and the jnp references,
VJPs against autodiff of the references, numerically hard inputs, and Triton/Mosaic lowering."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from optax_ext.kernels import layer_norm as ln
from optax_ext.kernels.backend import use_backend

DTYPES = [jnp.float32, jnp.bfloat16]
# (interpreter layout, shape): the triton layout pads features to a power of two and masks; the
# mosaic layout (whole rows, 32-row blocks here) is run on shapes whose last row block is ragged.
CASES = [("triton", (3, 100)), ("triton", (5, 7, 1000)), ("triton", (1, 1)), ("triton", (2, 3, 4, 17)),
         ("triton", (70, 33)), ("mosaic", (5, 7, 100)), ("mosaic", (70, 33))]


def _set_layout(monkeypatch, layout):
    monkeypatch.setattr(ln, "_INTERPRET_LAYOUT", layout)
    # Few persistent programs, so that the multi-block shapes have programs looping over blocks.
    monkeypatch.setattr(ln, "_PERSISTENT_PROGRAMS", {"triton": 3, "mosaic": 3})
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


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=3e-2)


def _close(a, b, dtype, scale=1.0):
    t = _tol(dtype)
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=t["rtol"],
                               atol=t["atol"] * scale)


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
    m64, r64 = _np_stats(x, False, eps)
    np.testing.assert_allclose(mean, m64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rstd, r64, rtol=1e-4)
    x64 = np.asarray(x, np.float64)
    y64 = (x64 - m64[..., None]) * r64[..., None] * np.asarray(scale) + np.asarray(bias)
    _close(y, y64, dtype, scale=4)
    _, r64 = _np_stats(x, True, eps)
    np.testing.assert_allclose(rstd_rms, r64, rtol=1e-4)
    _close(y_rms, x64 * r64[..., None] * np.asarray(scale), dtype, scale=4)


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
    y_ref, vjp_ref = jax.vjp(ref, x, scale, bias)
    g_ref = vjp_ref(dy)
    for backend in ("interpret", "xla"):
        with use_backend(backend):
            y, vjp = jax.vjp(f, x, scale, bias)
            g = vjp(dy)
        assert y.dtype == dtype and g[0].dtype == dtype and g[1].dtype == jnp.float32
        _close(y, y_ref, dtype, scale=4)
        # dscale/dbias sum over all rows: tolerance grows with the row count.
        rows = max(1, int(np.prod(shape[:-1])))
        _close(g[0], g_ref[0], dtype, scale=8)
        _close(g[1], g_ref[1], dtype, scale=8 * np.sqrt(rows))
        _close(g[2], g_ref[2], dtype, scale=8 * np.sqrt(rows))


def test_bwd_functions_from_saved_stats():
    x, scale, bias, dy = _inputs((9, 37), jnp.float32, seed=3)
    _, vjp = jax.vjp(ln.layer_norm_reference, x, scale, bias)
    gx, gs, gb = vjp(dy)
    _, vjp_rms = jax.vjp(ln.rms_norm_reference, x, scale)
    rx, rs = vjp_rms(dy)
    for backend in ("interpret", "xla"):
        with use_backend(backend):
            _, mean, rstd = ln.layer_norm_fwd(x, scale, bias)
            dx, ds, db = ln.layer_norm_bwd(x, scale, mean, rstd, dy)
            _, rstd2 = ln.rms_norm_fwd(x, scale)
            dx2, ds2 = ln.rms_norm_bwd(x, scale, rstd2, dy)
        for a, b in ((dx, gx), (ds, gs), (db, gb), (dx2, rx), (ds2, rs)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_check_grads_reference_and_xla_path():
    x, scale, bias, _ = _inputs((4, 6), jnp.float32, seed=11)
    check_grads(lambda x, s, b: ln.layer_norm_reference(x, s, b), (x, scale, bias), order=1, atol=2e-2, rtol=2e-2)
    check_grads(lambda x, s: ln.rms_norm_reference(x, s), (x, scale), order=1, atol=2e-2, rtol=2e-2)
    with use_backend("xla"):
        check_grads(lambda x, s, b: ln.layer_norm(x, s, b), (x, scale, bias), order=1, modes=["rev"],
                    atol=2e-2, rtol=2e-2)
        check_grads(lambda x, s: ln.rms_norm(x, s), (x, scale), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_bf16_reductions_accumulate_in_f32():
    """dscale/dbias over 4096 bf16 rows: a bf16 accumulator would be off by ~1e-2 relative."""
    x, scale, bias, dy = _inputs((4096, 8), jnp.bfloat16, seed=5)
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    m64, r64 = _np_stats(x, False, 1e-6)
    xhat = (x64 - m64[:, None]) * r64[:, None]
    for backend in ("interpret", "xla"):
        with use_backend(backend):
            ds, db = jax.grad(lambda s, b: jnp.sum(ln.layer_norm(x, s, b).astype(jnp.float32) * dy),
                              argnums=(0, 1))(scale, bias)
        np.testing.assert_allclose(db, dy64.sum(0), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(ds, (dy64 * xhat).sum(0), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ["interpret", "xla"])
def test_large_mean_small_std_normalizes_to_unit_std(backend):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1e3, 1e-2, size=(16, 1000)).astype(np.float32))
    with use_backend(backend):
        y = ln.layer_norm(x, epsilon=1e-12)
        _, mean, rstd = ln.layer_norm_fwd(x, epsilon=1e-12)
    np.testing.assert_allclose(np.std(np.asarray(y, np.float64), axis=-1), 1.0, atol=2e-3)
    np.testing.assert_allclose(1.0 / np.asarray(rstd), np.asarray(x, np.float64).std(-1), rtol=2e-3)
    # The data is genuinely hard: flax's default one-pass variance gets it wrong.
    fast = nnx.LayerNorm(1000, epsilon=1e-12, rngs=nnx.Rngs(0))(x)
    assert not np.allclose(np.std(np.asarray(fast, np.float64), axis=-1), 1.0, atol=0.1)


def test_jit_vmap_and_no_scale_bias():
    x, scale, bias, _ = _inputs((3, 5, 40), jnp.float32, seed=2)
    with use_backend("interpret"):
        y_vmap = jax.jit(jax.vmap(lambda x: ln.layer_norm(x, scale, bias)))(x)
        y_plain = ln.layer_norm(x)
        r_plain = ln.rms_norm(x)
    np.testing.assert_allclose(y_vmap, ln.layer_norm_reference(x, scale, bias), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_plain, ln.layer_norm_reference(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r_plain, ln.rms_norm_reference(x), rtol=1e-5, atol=1e-5)


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


LOWERINGS = [("triton", "cuda", "__gpu$xla.gpu.triton"), ("mosaic", "tpu", "tpu_custom_call")]


@pytest.mark.parametrize("backend,platform,marker", LOWERINGS)
@pytest.mark.parametrize("shape,dtype", [((4096, 1000), jnp.bfloat16), ((3, 100), jnp.float32),
                                         ((16, 8192), jnp.float32), ((2, 5, 17), jnp.bfloat16)])
def test_lowers_for_gpu_and_tpu(backend, platform, marker, shape, dtype):
    x = jax.ShapeDtypeStruct(shape, dtype)
    s = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)

    def loss(f):
        return jax.grad(lambda x, s: jnp.sum(f(x, s).astype(jnp.float32)), argnums=(0, 1))

    ln_f = lambda x, s: ln.layer_norm(x, s, s)  # noqa: E731
    rms_f = lambda x, s: ln.rms_norm(x, s)  # noqa: E731
    for f, calls in ((ln_f, 1), (rms_f, 1), (loss(ln_f), 2), (loss(rms_f), 2)):
        with use_backend(backend):
            text = jax.jit(f).trace(x, s).lower(lowering_platforms=(platform,)).as_text()
        assert text.count(marker) == calls


# --------------------------------------------------------------------------------------------
# Persistent grid of the backward (dscale/dbias partials: one per program, not per row block)
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


@pytest.mark.parametrize("layout", ["triton", "mosaic"])
@pytest.mark.parametrize("m,block_rows,programs", [(1, 1, 5), (10, 4, 3), (37, 4, 3), (200, 8, 3), (300, 32, 3),
                                                   (96, 32, 2), (5, 1, 528)])
def test_row_loop_covers_every_row_block_once(monkeypatch, layout, m, block_rows, programs):
    monkeypatch.setattr(ln, "_PERSISTENT_PROGRAMS", {"triton": programs, "mosaic": programs})
    t = ln.Tiling(layout, m, 7, block_rows, 8)
    loop = ln.row_loop(t)
    blocks = [list(loop.blocks(p)) for p in range(loop.programs)]
    assert loop.programs <= min(programs, t.grid) and all(blocks)  # no program without a block
    assert sorted(i for b in blocks for i in b) == list(range(t.grid))
    assert max(map(len, blocks)) == loop.steps
    # Only the array's last block may be ragged, and it is the last one its program merges.
    assert all(i != t.grid - 1 for b in blocks for i in b[:-1])
    np.testing.assert_array_equal(loop.rows().sum(), m)
    np.testing.assert_array_equal(loop.rows_f32(), loop.rows())


# (interpreter layout, shape) with 64-element blocks and 3 programs: every program loops over
# 2-9 row blocks; ragged last row block and/or power-of-two-padded columns (triton layout).
PERSISTENT_CASES = [("triton", (37, 10)), ("triton", (4, 50, 7)), ("triton", (5, 100)), ("triton", (64, 16)),
                    ("mosaic", (300, 20)), ("mosaic", (200, 7))]


@pytest.mark.parametrize("layout,shape", PERSISTENT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_persistent_bwd_matches_reference(monkeypatch, layout, shape, dtype):
    monkeypatch.setattr(ln, "_INTERPRET_LAYOUT", layout)
    monkeypatch.setattr(ln, "_PERSISTENT_PROGRAMS", {"triton": 3, "mosaic": 3})
    monkeypatch.setattr(ln, "_BWD_BLOCK", {"triton": 64, "mosaic": 64})
    m, n = int(np.prod(shape[:-1])), shape[-1]
    loop = ln.row_loop(ln.make_tiling(m, n, layout, block_elems=64))
    assert loop.programs == 3 and loop.steps >= 2
    x, scale, bias, dy = _inputs(shape, dtype, seed=100 + m + n)

    @jax.jit  # one compile instead of one per op: keeps the test fast
    def ref_grads(x, scale, bias, dy):
        return (jax.vjp(ln.layer_norm_reference, x, scale, bias)[1](dy),
                jax.vjp(ln.rms_norm_reference, x, scale)[1](dy))

    g_ln, g_rms = ref_grads(x, scale, bias, dy)
    mean, rstd = (jnp.asarray(v, jnp.float32) for v in _np_stats(x, False, 1e-6))
    _, rstd_rms = _np_stats(x, True, 1e-6)

    def bwd(x, scale, mean, rstd, rstd_rms, dy):  # one jit: a single compile of both interpreted kernels
        return ln.layer_norm_bwd(x, scale, mean, rstd, dy), ln.rms_norm_bwd(x, scale, rstd_rms, dy)

    with use_backend("interpret"):
        out_ln, out_rms = jax.jit(bwd)(x, scale, mean, rstd, jnp.asarray(rstd_rms, jnp.float32), dy)
    for out, ref in ((out_ln, g_ln), (out_rms, g_rms)):
        assert out[0].dtype == dtype and out[0].shape == shape
        _close(out[0], ref[0], dtype, scale=8)
        for a, b in zip(out[1:], ref[1:]):  # f32 sums over all m rows
            assert a.dtype == jnp.float32 and a.shape == (n,)
            _close(a, b, dtype, scale=8 * np.sqrt(m))


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
def test_bwd_partials_are_per_program_not_per_row_block(fake_tpu, rows):
    """The lowered backward's dscale/dbias partials are (P, 1, N) f32 for any number of rows M.

    One partial per row block made them (M, 1, N) on Triton at N = 8192 (one-row blocks):
    537 MB for dscale + dbias at 8192 x 8192, more than the bf16 activations (134 MB)."""
    n = 8192
    x = jax.ShapeDtypeStruct((rows, n), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((n,), jnp.float32)
    for backend, platform in (("triton", "cuda"), ("mosaic", "tpu")):
        programs = ln._PERSISTENT_PROGRAMS[backend]
        for rms, name in ((False, "layer_norm_bwd"), (True, "rms_norm_bwd")):
            def loss(x, s, rms=rms):  # fresh per backend: jit caches traces, the backend is read at trace
                y = ln.rms_norm(x, s) if rms else ln.layer_norm(x, s, s)
                return jnp.sum(y.astype(jnp.float32))

            with use_backend(backend):
                text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, s).lower(
                    lowering_platforms=(platform,)).as_text()
            partials = [f"{programs}x1x{n}xf32"] * (1 if rms else 2)
            assert _kernel_results(text)[name] == [f"{rows}x{n}xbf16", *partials]
    assert ln._PERSISTENT_PROGRAMS["triton"] * n * 4 < 20e6  # bytes per partial, whatever M is
