"""LayerNorm, RMSNorm and BatchNorm on the Mosaic GPU backend: kernels in Mosaic GPU's interpreter against
float64 and the jnp references, Flax's layers, and lowered for CUDA (forward and backward as
`mosaic_gpu_v2` calls).

Ragged shapes: rows not a multiple of the 64-row block, a ragged last column chunk, and widths the
kernels do not take (N not a multiple of 8, M not a multiple of 8 or under 64 rows, rows too wide for
SMEM), which run the jnp math on this backend; `layer_norm.mosaic_gpu.supported` says which, and the
lowering test checks that exactly those lower to kernels. Tolerances are those of
tests/test_kernels_layer_norm.py (`conftest.tolerance`). Needs jax >= 0.12.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_kernels_batch_norm as tbn
import test_kernels_layer_norm as tln
from flax import nnx

from optax_ext import nn as onn
from optax_ext.kernels import backend as kb
from optax_ext.kernels import batch_norm as bn
from optax_ext.kernels import layer_norm as ln
from optax_ext.kernels import lower_for, use_backend
from optax_ext.kernels.layer_norm import mosaic_gpu as lnm

pytestmark = pytest.mark.skipif(not kb.mosaic_gpu_available(), reason="Mosaic GPU kernels need jax >= 0.12")

MARKER = "mosaic_gpu_v2"

# (shape, dtype): (kernels the forward and backward take). M = rows, N = features.
CASES = [
    ((200, 768), jnp.bfloat16),  # GPT-2 width, 6 column chunks; last row block 8 of 64 rows
    ((3, 40, 1000), jnp.bfloat16),  # M = 120; 9 chunks of 112, the last ragged; backward too wide: jnp
    ((72, 104), jnp.float32),  # one chunk, ragged last row block
    ((80, 296), jnp.float32),  # 3 chunks of 104: the last one ragged (TMA zero padding masked)
    ((5, 7, 100), jnp.float32),  # M = 35: jnp
    ((9, 8, 129), jnp.bfloat16),  # N = 129: jnp
    ((64, 7), jnp.float32),  # N = 7: jnp
]
IDS = [f"{'x'.join(map(str, s))}-{jnp.dtype(d).name}" for s, d in CASES]


def _takes(shape, dtype):
    m, n = int(np.prod(shape[:-1])), shape[-1]
    return lnm.supported(m, n, [dtype]), lnm.supported(m, n, [dtype, dtype])


def test_cases_cover_kernels_and_fallbacks():
    taken = [_takes(s, d) for s, d in CASES]
    assert taken == [(True, True), (True, False), (True, True), (True, True)] + [(False, False)] * 3


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("shape,dtype", CASES, ids=IDS)
def test_vjp_matches_float64_and_reference(shape, dtype, rms):
    x, scale, bias, dy = tln._inputs(shape, dtype, seed=len(shape) + shape[-1])
    if rms:
        f, ref = (lambda x, s, b: ln.rms_norm(x, s)), (lambda x, s, b: ln.rms_norm_reference(x, s))
    else:
        f, ref = ln.layer_norm, ln.layer_norm_reference
    tln._check_vjp(f, ref, x, scale, bias, dy, rms, ("mosaic_gpu_interpret",))


def test_fwd_statistics_and_bwd_from_saved_stats():
    shape, dtype = (72, 104), jnp.float32
    x, scale, bias, dy = tln._inputs(shape, dtype, seed=5)
    eps = 1e-5
    with use_backend("mosaic_gpu_interpret"):
        y, mean, rstd = ln.layer_norm_fwd(x, scale, bias, epsilon=eps)
        dx, ds, db = ln.layer_norm_bwd(x, scale, mean, rstd, dy)
        y_rms, rstd_rms = ln.rms_norm_fwd(x, scale, epsilon=eps)
        dx_rms, ds_rms = ln.rms_norm_bwd(x, scale, rstd_rms, dy)
    assert mean.dtype == rstd.dtype == jnp.float32 and mean.shape == shape[:-1]
    exact, scales = tln._exact(x, scale, bias, dy, eps, False)
    tln._check({"y": y, "mean": mean, "rstd": rstd, "dx": dx, "dscale": ds, "dbias": db}, exact, scales, shape, {})
    exact, scales = tln._exact(x, scale, bias, dy, eps, True)
    tln._check({"y": y_rms, "rstd": rstd_rms, "dx": dx_rms, "dscale": ds_rms}, exact, scales, shape, {})


@pytest.mark.parametrize(
    "ours,theirs", [(onn.LayerNorm, nnx.LayerNorm), (onn.RMSNorm, nnx.RMSNorm)], ids=["layer", "rms"]
)
def test_layers_match_flax(ours, theirs):
    """optax_ext.nn's layers in the kernels and Flax's, both against float64 (bf16, 120 ragged rows)."""
    shape, dtype = (3, 40, 64), jnp.bfloat16
    assert _takes(shape, dtype) == (True, True)
    x = (jax.random.normal(jax.random.key(1), shape) * 2.0 + 3.0).astype(dtype)
    dy = jax.random.normal(jax.random.key(2), shape).astype(dtype)
    a, b = (cls(shape[-1], use_fast_variance=False, dtype=dtype, rngs=nnx.Rngs(0)) for cls in (ours, theirs))
    for layer in (a, b):  # non-trivial scale/bias, the same in both
        params = nnx.state(layer, nnx.Param)
        nnx.update(layer, jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(3), p.shape), params))

    def loss(model, x):
        y = model(x)
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32)), y

    with use_backend("mosaic_gpu_interpret"):
        (_, ya), (ga, gxa) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(a, x)
    (_, yb), (gb, gxb) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(b, x)
    params = {k: np.asarray(jnp.asarray(v[...], dtype), np.float64) for k, v in nnx.state(a, nnx.Param).items()}
    rms = ours is onn.RMSNorm
    exact, scales = tln._exact(x, params["scale"], params.get("bias", np.zeros(shape[-1])), dy, a.epsilon, rms)
    for label, y, grads, gx in (("ours", ya, ga, gxa), ("flax", yb, gb, gxb)):
        results = {"y": y, "dx": gx, **{f"d{k}": g[...] for k, g in nnx.state(grads, nnx.Param).items()}}
        if label == "flax":  # Flax rounds dx's three paths to bf16 separately (see tests/test_nn.py)
            del results["dx"]
        dtypes = {name: dtype for name in results}
        tln._check(results, exact, scales, shape, dtypes, err_msg=label)


def _grad_of(f):
    return jax.grad(lambda x, s, b: jnp.sum(f(x, s, b).astype(jnp.float32)), argnums=(0, 1, 2))


@pytest.mark.parametrize("shape,dtype", CASES, ids=IDS)
def test_lowers_for_cuda(shape, dtype):
    """Forward and backward are Mosaic GPU calls wherever `supported` says so, jnp elsewhere."""
    x = jax.ShapeDtypeStruct(shape, dtype)
    s = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)
    fwd, bwd = _takes(shape, dtype)
    ln_f = lambda x, s, b: ln.layer_norm(x, s, b)  # noqa: E731
    rms_f = lambda x, s, b: ln.rms_norm(x, s)  # noqa: E731
    for f in (ln_f, rms_f):
        assert lower_for(f, x, s, s, platform="cuda", backend="mosaic_gpu").as_text().count(MARKER) == fwd
        text = lower_for(_grad_of(f), x, s, s, platform="cuda", backend="mosaic_gpu").as_text()
        assert text.count(MARKER) == fwd + bwd


def test_nn_layer_norm_grad_lowers_to_two_mosaic_gpu_calls():
    """The issue's check: `ox.nn.LayerNorm` under `jax.grad`, lowered for CUDA on the mosaic_gpu backend."""
    x = jax.ShapeDtypeStruct((8, 512, 768), jnp.bfloat16)
    for cls in (onn.LayerNorm, onn.RMSNorm):
        graphdef, state = nnx.split(cls(768, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))

        def loss(state, x, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, state)(x).astype(jnp.float32))

        text = lower_for(jax.grad(loss, argnums=(0, 1)), state, x, platform="cuda", backend="mosaic_gpu").as_text()
        assert text.count(MARKER) == 2, cls
        assert "layer_norm_bwd" in text or "rms_norm_bwd" in text


# BatchNorm (rows = all axes but the last): (shape, dtype), whether the kernels take it.
BN_CASES = [
    ((2, 9, 8, 24), jnp.float32, True),  # R = 144: ragged last row block (16 of 64 rows)
    ((4, 6, 5, 40), jnp.bfloat16, True),  # R = 120
    ((4, 5, 7, 3), jnp.float32, False),  # C = 3 (and R = 140, not a multiple of 8): jnp
]
BN_IDS = [f"{'x'.join(map(str, s))}-{jnp.dtype(d).name}" for s, d, _ in BN_CASES]


def _bn_takes(shape, dtype):
    r, c = int(np.prod(shape[:-1])), shape[-1]
    return lnm.supported(r, c, [dtype, dtype], vectors=4)


@pytest.mark.parametrize("shape,dtype,kernels", BN_CASES, ids=BN_IDS)
def test_batch_norm_and_vjp_match_float64(shape, dtype, kernels):
    """batch_norm's (y, mean, var) and VJP, and batch_norm_stats' VJP (as tests/test_kernels_batch_norm.py)."""
    assert _bn_takes(shape, dtype) == kernels
    x, scale, bias, cts = tbn._inputs(shape, dtype, seed=1 + sum(shape))
    exact, scales = tbn._exact(x, scale, bias, cts)
    with use_backend("mosaic_gpu_interpret"):
        out, vjp = jax.vjp(bn.batch_norm, x, scale, bias)
        g = vjp(cts)
        s, svjp = jax.vjp(bn.batch_norm_stats, x)
        sg = svjp(cts[1:])
    assert out[0].dtype == dtype and g[0].dtype == dtype and g[1].dtype == jnp.float32
    results = {"y": out[0], "mean": out[1], "var": out[2], "dx": g[0], "dscale": g[1], "dbias": g[2]}
    tbn._check(results, exact, scales, shape, {"y": dtype, "dx": dtype}, shifted=kernels)
    stats = {"mean": s[0], "var": s[1], "sdx": sg[0]}
    tbn._check(stats, exact, scales, shape, {"sdx": dtype}, err_msg="stats", shifted=kernels)


@pytest.mark.parametrize("shape,dtype,kernels", BN_CASES, ids=BN_IDS)
def test_batch_norm_lowers_for_cuda(shape, dtype, kernels):
    """Forward: statistics + affine. Under grad: statistics, backward sums, the dx affine (y, unused, is
    dead code)."""
    x = jax.ShapeDtypeStruct(shape, dtype)
    s = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)
    f = lambda x, s, b: bn.batch_norm(x, s, b)[0]  # noqa: E731
    assert lower_for(f, x, s, s, platform="cuda", backend="mosaic_gpu").as_text().count(MARKER) == 2 * kernels
    text = lower_for(_grad_of(f), x, s, s, platform="cuda", backend="mosaic_gpu").as_text()
    assert text.count(MARKER) == 3 * kernels


SHARDED = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from optax_ext.kernels import batch_norm as bn, layer_norm as ln, lower_for

def norms(x, s, b):
    return jnp.sum(ln.layer_norm(x, s, b).astype(jnp.float32)) + jnp.sum(ln.rms_norm(x, s).astype(jnp.float32))

def batch(x, s, b):
    return jnp.sum(bn.batch_norm(x, s, b)[0].astype(jnp.float32))

# (loss, shape, partitioned calls (auto), kernels per device (explicit)): 128 rows per device take the
# kernels; 16 rows per device (of 128 global) run the jnp math on each shard.
CASES = [(norms, (16, 64, 768), 4, 4), (norms, (8, 16, 768), 4, 0), (batch, (16, 64, 96), 3, 3)]
for mode, axis_type in (("auto", AxisType.Auto), ("explicit", AxisType.Explicit)):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type, axis_type))
    for f, shape, partitioned, kernels in CASES:
        with jax.set_mesh(mesh):
            x = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P("data", "model")))
            s = jax.ShapeDtypeStruct(shape[-1:], jnp.float32, sharding=NamedSharding(mesh, P()))
            grad = jax.grad(f, argnums=(0, 1, 2))
            text = lower_for(grad, x, s, s, platform="cuda", backend="mosaic_gpu", mesh=mesh).as_text()
        counts = (text.count("CustomSPMDPartitioning"), text.count("mosaic_gpu_v2"))
        if mode == "auto":  # partitioned at compile time: the kernels are traced per shard then
            assert counts == (partitioned, 0), (mode, shape, counts)
        else:  # shard_map: the kernels sit inside the manual (per-device) computation
            assert "manual_computation" in text and counts == (0, kernels), (mode, shape, counts)
print("OK")
"""


def test_lowers_sharded_for_cuda():
    """Row-sharded (batch over "data", sequence over "model") LayerNorm, RMSNorm and BatchNorm fwd + bwd lower
    per device shard, on 8 fake
    CPU devices (a fresh process: the device count is fixed when jax starts). Mosaic GPU's interpreter
    cannot run under custom_partitioning (ordered io_callbacks), so lowering is the check here."""
    out = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]


def test_compiles_for_h100():
    """XLA compiles the Mosaic GPU kernels for an H100 (deviceless AOT, `optax_ext[gpu-aot]`): LayerNorm
    fwd + bwd and BatchNorm's three kernels under grad. Skips where the CUDA plugin is missing."""
    from optax_ext.kernels import aot
    from optax_ext.step_report import count_hlo

    if not aot.available():
        pytest.skip("compiling for an H100 needs optax_ext[gpu-aot]")
    x = jax.ShapeDtypeStruct((8, 512, 768), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((768,), jnp.float32)
    for f, calls in ((ln.layer_norm, 2), (lambda x, s, b: bn.batch_norm(x, s, b)[0], 3)):
        compiled = aot.compile_for(_grad_of(f), x, s, s, backend="mosaic_gpu")
        assert count_hlo(compiled.as_text()).custom_calls == calls
