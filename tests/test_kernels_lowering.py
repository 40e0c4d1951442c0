"""Every kernel lowers for CUDA (Triton) and TPU (Mosaic), checked from a CPU.

`jax.jit(f).trace(*avals).lower(lowering_platforms=(...,))` runs the Pallas lowering to Triton or
Mosaic IR, which rejects any op, block shape or memory space the backend cannot handle. Only
abstract shapes are used (`jax.ShapeDtypeStruct`), so a 1e8-element array costs nothing.
"""

import jax
import jax.numpy as jnp
import pytest

import optax_ext as ox
from optax_ext import fusion
from optax_ext.kernels import use_backend
from optax_ext.kernels.fused_pass import LANES, run_elementwise_pallas
from optax_ext.kernels.norms import leaf_sq_norms_pallas

TRITON_MARKERS = ("__gpu$xla.gpu.triton", "triton_kernel_call")
TPU_MARKER = "tpu_custom_call"
PLATFORM = {"triton": "cuda", "mosaic": "tpu"}

SHAPES = [(), (1,), (7,), (1000,), (3, 5, 7), (3 * 1024 + 5,), (4096, 1000), (100_000_000,)]


@pytest.fixture(autouse=True)
def _pretend_cpu_is_a_tpu_v5e(monkeypatch):
    """A few Mosaic lowering rules (e.g. `sign`, used by Lion) ask the *current* device's TPU
    generation; from a CPU there is none, so register the CPU as a TPU v5e for lowering only.
    Private API, used by tests alone: nothing in the library depends on it."""
    try:
        from jax._src.pallas.mosaic import tpu_info
    except ImportError:  # pragma: no cover - layout of jax internals changed
        return
    kind = jax.devices()[0].device_kind
    if tpu_info.chip_version_from_device_kind(kind) is None and kind not in tpu_info.registry:
        monkeypatch.setitem(tpu_info.registry, kind,
                            lambda: tpu_info._get_tpu_info_impl(tpu_info.ChipVersion.TPU_V5E, 1))


def _count_kernels(text, backend):
    if backend == "triton":
        return sum(text.count(m) for m in TRITON_MARKERS)
    return text.count(TPU_MARKER)


def _expected_kernels(shape, backend):
    """Mosaic runs no kernel for arrays of < 128 elements (all tail, done in jnp)."""
    n = 1
    for d in shape:
        n *= d
    return 1 if backend == "triton" or n >= LANES else 0


def _lower(fn, avals, backend, donate=()):
    with use_backend(backend):
        return jax.jit(fn, donate_argnums=donate).trace(*avals).lower(
            lowering_platforms=(PLATFORM[backend],)).as_text()


def adam_body(xs, s):
    g, p, m, v = xs
    m = s[0] * m + s[1] * g
    v = s[2] * v + s[3] * (g * g)
    u = jnp.where(s[4] > 0, m / s[4], m) / (jnp.sqrt(v) + s[5])
    return [p - 1e-3 * u, m, v]


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_pass_lowers(shape, backend):
    # bf16 params and grads, f32 slots updated in place (aliased), 6 scalars.
    dts = [jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32]
    avals = [jax.ShapeDtypeStruct(shape, d) for d in dts] + [jax.ShapeDtypeStruct((6,), jnp.float32)]

    def f(g, p, m, v, s):
        return run_elementwise_pallas(adam_body, [g, p, m, v], s, [jnp.bfloat16, jnp.float32, jnp.float32],
                                      backend=backend, aliases={1: 0, 2: 1, 3: 2})

    text = _lower(f, avals, backend, donate=(1, 2, 3))
    expected = _expected_kernels(shape, backend)
    assert _count_kernels(text, backend) == expected
    if expected:
        assert "output_operand_aliases" in text


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_fused_pass_without_scalars_lowers(backend):
    def f(g):
        return run_elementwise_pallas(lambda xs, s: [jnp.clip(xs[0], -1.0, 1.0)], [g], jnp.zeros((0,)),
                                      [jnp.float16], backend=backend)

    text = _lower(f, [jax.ShapeDtypeStruct((4096, 1000), jnp.float32)], backend)
    assert _count_kernels(text, backend) == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_norms_lower(backend, dtype):
    avals = [jax.ShapeDtypeStruct(s, dtype) for s in SHAPES]
    text = _lower(lambda *xs: leaf_sq_norms_pallas(list(xs), backend=backend), avals, backend)
    assert _count_kernels(text, backend) == sum(_expected_kernels(s, backend) for s in SHAPES)


PARAMS = {
    "emb": jax.ShapeDtypeStruct((1000, 64), jnp.float32),      # 64000 = 500 * 128
    "w": jax.ShapeDtypeStruct((300, 129), jnp.float32),        # ragged: 38700 = 302 * 128 + 44
    "b": jax.ShapeDtypeStruct((129,), jnp.float32),
    "scale": jax.ShapeDtypeStruct((), jnp.float32),
    "head": jax.ShapeDtypeStruct((64, 3, 5), jnp.bfloat16),   # 960 = 7 * 128 + 64
}
OPTIMIZERS = {
    "clip_adamw": lambda: ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3)),
    "lamb": lambda: ox.lamb(1e-3, weight_decay=0.01),
    "sgd_momentum": lambda: ox.sgd(0.1, momentum=0.9),
    "lion": lambda: ox.lion(1e-4),
    "rmsprop": lambda: ox.rmsprop(1e-3),
}


@pytest.mark.parametrize("apply", [False, True], ids=["update", "update_and_apply"])
@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_step_lowers(name, backend, apply):
    tx = OPTIMIZERS[name]()
    state = jax.eval_shape(tx.init, PARAMS)

    # A fresh function per (backend, mode): jit caches traces by function, and the backend is
    # chosen at trace time.
    def step(grads, state, params):
        if apply:
            return tx.update_and_apply(grads, state, params)
        return tx.update(grads, state, params)

    text = _lower(step, (PARAMS, state, PARAMS), backend)
    leaves = jax.tree.leaves(PARAMS)
    # One fused pass per large leaf, and one per dtype group of small leaves (batched launch).
    big = [x for x in leaves if x.size >= fusion.SMALL_LEAF]
    small_groups = {x.dtype for x in leaves if x.size < fusion.SMALL_LEAF}
    expected = sum(_expected_kernels(x.shape, backend) for x in big) + len(small_groups)
    assert _count_kernels(text, backend) >= expected
