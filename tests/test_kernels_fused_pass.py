"""The fused elementwise Pallas kernel, run in the Pallas interpreter on CPU.

Checked against `run_elementwise_reference` (the body applied to whole arrays by jnp) on fresh
random inputs of ragged sizes, in both memory layouts ("flat": Triton's masked 1-D blocks;
"rows": Mosaic's (rows, 128) blocks plus a jnp tail), with blocks small enough that the arrays span
several programs and end in a partial block. Then: every element is written (NaN-poisoned aliased
outputs), aliasing with buffer donation under jit, and whole optimizers through the interpreter
against the "xla" backend and against Optax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ext as ox
from conftest import assert_trees_close
from optax_ext.kernels import use_backend
from optax_ext.kernels.elementwise import run_elementwise, run_elementwise_reference
from optax_ext.kernels.fused_pass import run_elementwise_pallas

SHAPES = [(), (1,), (7,), (1000,), (1031,), (3, 5, 7), (3 * 1024 + 5,), (16, 128)]
# (layout, block). Small blocks: 256 elements / 8 rows make every size above > 1 block, ragged.
LAYOUTS = [("flat", 256), ("rows", 8)]
# Default blocks (one program for these sizes), on the sizes where the layouts differ most.
DEFAULT_LAYOUT_CASES = [(s, lay, None) for s in [(), (1031,), (16, 128)] for lay in ("flat", "rows")]


def adam_body(xs, s):
    """Adam (Kingma & Ba, 2015) with decoupled decay: 2 slots, 6 scalars, writes p, m, v."""
    g, p, m, v = xs
    m = s[0] * m + s[1] * g            # b1, 1 - b1
    v = s[2] * v + s[3] * (g * g)      # b2, 1 - b2
    u = (m / s[4]) / (jnp.sqrt(v) + s[5])  # bias correction 1, eps
    return [p - 1e-2 * (u + 0.1 * p), m, v]


def clip_body(xs, s):
    """No scalars at all: clip to [-0.5, 0.5] and double."""
    (g,) = xs
    return [2.0 * jnp.clip(g, -0.5, 0.5)]


ADAM_SCALARS = jnp.array([0.9, 0.1, 0.999, 0.001, 0.271, 1e-8], jnp.float32)


def assert_close_in_dtype(actual, expected, ulps=4):
    """Same dtype and shape, no NaN, and within a few ulps (of the output dtype) of each other.

    Ulps of the array's scale, not of each element: the kernel and the reference may contract
    `a * b + c` into an FMA differently, and where a result cancels to near zero (m = b1 m +
    (1 - b1) g) one rounding of an O(1) intermediate is many ulps of the tiny result.
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not np.isnan(expected).any()
    assert not np.isnan(actual).any(), "kernel output has NaN where the reference has none"
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    eps = float(jnp.finfo(actual.dtype).eps)
    scale = np.abs(e).max(initial=0.0)
    np.testing.assert_allclose(a, e, rtol=ulps * eps, atol=ulps * eps * scale)


def _adam_inputs(key, shape, g_dtype, p_dtype, slot_dtype):
    kg, kp, km, kv = jax.random.split(key, 4)
    g = jax.random.normal(kg, shape).astype(g_dtype)
    p = jax.random.normal(kp, shape).astype(p_dtype)
    m = (0.1 * jax.random.normal(km, shape)).astype(slot_dtype)
    v = (0.01 * jax.random.uniform(kv, shape)).astype(slot_dtype)
    return [g, p, m, v]


@pytest.mark.parametrize("shape,layout,block",
                         [(s, lay, b) for s in SHAPES for lay, b in LAYOUTS] + DEFAULT_LAYOUT_CASES)
def test_adam_body_matches_reference(key, shape, layout, block):
    inputs = _adam_inputs(key, shape, jnp.float32, jnp.float32, jnp.float32)
    dts = [jnp.float32] * 3
    got = run_elementwise_pallas(adam_body, inputs, ADAM_SCALARS, dts, backend="interpret",
                                 layout=layout, block=block)
    want = run_elementwise_reference(adam_body, inputs, ADAM_SCALARS, dts)
    for a, e in zip(got, want, strict=True):
        assert a.shape == shape
        assert_close_in_dtype(a, e)


@pytest.mark.parametrize("layout,block", LAYOUTS)
@pytest.mark.parametrize("shape", [(), (7,), (3, 5, 7), (3 * 1024 + 5,)])
def test_body_without_scalars(key, shape, layout, block):
    g = 0.5 * jax.random.normal(key, shape)
    got = run_elementwise_pallas(clip_body, [g], jnp.zeros((0,)), [jnp.float32], backend="interpret",
                                 layout=layout, block=block)[0]
    np.testing.assert_array_equal(got, 2.0 * np.clip(np.asarray(g), -0.5, 0.5))


@pytest.mark.parametrize("slot_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("layout,block", LAYOUTS)
@pytest.mark.parametrize("shape", [(1031,), (3, 5, 7), (3 * 1024 + 5,)])
def test_mixed_dtypes(key, shape, layout, block, slot_dtype):
    # bf16 params and grads, f32 or bf16 slots: upcast inside, round once on the way out.
    inputs = _adam_inputs(key, shape, jnp.bfloat16, jnp.bfloat16, slot_dtype)
    dts = [jnp.bfloat16, slot_dtype, slot_dtype]
    got = run_elementwise_pallas(adam_body, inputs, ADAM_SCALARS, dts, backend="interpret",
                                 layout=layout, block=block)
    want = run_elementwise_reference(adam_body, inputs, ADAM_SCALARS, dts)
    for a, e, d in zip(got, want, dts, strict=True):
        assert a.dtype == jnp.dtype(d)
        assert_close_in_dtype(a, e)


def test_float16_inputs(key):
    inputs = _adam_inputs(key, (1031,), jnp.float16, jnp.float32, jnp.float16)
    dts = [jnp.float32, jnp.float16, jnp.float16]
    got = run_elementwise_pallas(adam_body, inputs, ADAM_SCALARS, dts, backend="interpret", block=256)
    want = run_elementwise_reference(adam_body, inputs, ADAM_SCALARS, dts)
    for a, e in zip(got, want):
        assert_close_in_dtype(a, e)


@pytest.mark.parametrize("layout,block", LAYOUTS + [("flat", None), ("rows", None)])
@pytest.mark.parametrize("shape", [(), (7,), (1031,), (3 * 1024 + 5,), (16, 128)])
def test_every_element_written(key, shape, layout, block):
    # Output 0 is written into input 1's buffer, which is all NaN and never read by the body:
    # any element the kernel skips (a ragged tail, a last partial block) stays NaN.
    g = jax.random.normal(key, shape)
    poison = jnp.full(shape, jnp.nan, jnp.float32)

    def body(xs, s):
        return [xs[0] * s[0] + 1.0]

    f = jax.jit(lambda g, out: run_elementwise_pallas(body, [g, out], jnp.array([3.0]), [jnp.float32],
                                                      backend="interpret", aliases={1: 0},
                                                      layout=layout, block=block)[0],
                donate_argnums=1)
    got = f(g, poison)
    assert not np.isnan(np.asarray(got)).any()
    assert_close_in_dtype(got, 3.0 * np.asarray(g) + np.float32(1.0))


@pytest.mark.parametrize("layout,block", LAYOUTS)
def test_aliases_with_donation_under_jit(key, layout, block):
    # The slots m, v are updated in place: donated inputs 2, 3 become outputs 1, 2.
    shape = (3 * 1024 + 5,)
    inputs = _adam_inputs(key, shape, jnp.float32, jnp.float32, jnp.float32)
    dts = [jnp.float32] * 3
    want = [np.asarray(x) for x in run_elementwise_reference(adam_body, inputs, ADAM_SCALARS, dts)]
    f = jax.jit(lambda g, p, m, v, s: run_elementwise_pallas(
        adam_body, [g, p, m, v], s, dts, backend="interpret", aliases={1: 0, 2: 1, 3: 2},
        layout=layout, block=block), donate_argnums=(1, 2, 3))
    g, p, m, v = inputs
    got = f(g, p, m, v, ADAM_SCALARS)
    for a, e in zip(got, want):
        assert_close_in_dtype(a, e)
    assert not g.is_deleted()  # not donated: still usable
    # Donation took effect: the donated buffers were consumed by the in-place kernel.
    assert p.is_deleted() and m.is_deleted() and v.is_deleted()


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(7,), (1_000_003,), (4096, 1000)])
def test_triton_on_gpu_matches_reference(key, shape):
    inputs = _adam_inputs(key, shape, jnp.bfloat16, jnp.float32, jnp.float32)
    dts = [jnp.float32, jnp.float32, jnp.float32]
    got = jax.jit(lambda i, s: run_elementwise_pallas(adam_body, i, s, dts, backend="triton",
                                                      aliases={1: 0, 2: 1, 3: 2}))(inputs, ADAM_SCALARS)
    want = jax.jit(lambda i, s: run_elementwise_reference(adam_body, i, s, dts))(inputs, ADAM_SCALARS)
    for a, e in zip(got, want):
        assert_close_in_dtype(a, e)


def test_run_elementwise_dispatches_to_pallas(key):
    # The public entry point with the interpreter forced must give the kernel's answer.
    inputs = _adam_inputs(key, (1031,), jnp.float32, jnp.float32, jnp.float32)
    dts = [jnp.float32] * 3
    with use_backend("interpret"):
        got = run_elementwise(adam_body, inputs, ADAM_SCALARS, dts)
    want = run_elementwise_pallas(adam_body, inputs, ADAM_SCALARS, dts, backend="interpret")
    for a, e in zip(got, want):
        np.testing.assert_array_equal(a, e)


def test_size_zero_inputs():
    x = jnp.zeros((0, 3), jnp.bfloat16)
    (out,) = run_elementwise_pallas(clip_body, [x], jnp.zeros((0,)), [jnp.float32], backend="interpret")
    assert out.shape == (0, 3) and out.dtype == jnp.float32


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(backend="cuda"), ValueError, "backend='cuda'"),
    (dict(backend="interpret", layout="tiles"), ValueError, "layout='tiles'"),
    (dict(backend="interpret", block=0), ValueError, "block=0"),
    (dict(backend="interpret", layout="rows", block=12), ValueError, "multiple of 8"),
    (dict(backend="triton", block=1000), ValueError, "power of 2"),
    (dict(backend="interpret", aliases={0: 5}), ValueError, "out of range"),
])
def test_bad_arguments(kwargs, exc, match):
    x = jnp.ones((2000,))
    with pytest.raises(exc, match=match):
        run_elementwise_pallas(clip_body, [x], jnp.zeros((0,)), [jnp.float32], **kwargs)


def test_bad_inputs():
    x, y = jnp.ones((7,)), jnp.ones((8,))
    with pytest.raises(ValueError, match=r"input 1 has \(8,\)"):
        run_elementwise_pallas(clip_body, [x, y], jnp.zeros((0,)), [jnp.float32], backend="interpret")
    with pytest.raises(TypeError, match="int32"):
        run_elementwise_pallas(clip_body, [jnp.ones((7,), jnp.int32)], jnp.zeros((0,)), [jnp.float32],
                               backend="interpret")
    with pytest.raises(ValueError, match="dtypes must match"):
        run_elementwise_pallas(clip_body, [x.astype(jnp.bfloat16)], jnp.zeros((0,)), [jnp.float32],
                               backend="interpret", aliases={0: 0})
    with pytest.raises(ValueError, match="1-D vector"):
        run_elementwise_pallas(clip_body, [x], jnp.zeros(()), [jnp.float32], backend="interpret")
    with pytest.raises(ValueError, match="body returned 1 outputs"):
        run_elementwise_pallas(clip_body, [x], jnp.zeros((0,)), [jnp.float32] * 2, backend="interpret")


# --------------------------------------------------------------------------------------------
# Whole optimizers through the interpreter: same params as the "xla" backend and as Optax.

E2E_SHAPES = [(), (7,), (13, 11), (3 * 128 + 5,)]
E2E = {
    "adamw": lambda m: m.adamw(1e-2, weight_decay=0.05),
    "lamb": lambda m: m.lamb(1e-2, weight_decay=0.01),
    "sgd_momentum": lambda m: m.sgd(0.05, momentum=0.9),
    "lion": lambda m: m.lion(1e-3, weight_decay=0.01),
    "rmsprop": lambda m: m.rmsprop(1e-2),
    "clip_adamw": lambda m: m.chain(m.clip_by_global_norm(1.0), m.adamw(1e-2)),
    "clip_adamw_schedule": lambda m: m.chain(m.clip_by_global_norm(1.0),
                                             m.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10))),
    "nadam": lambda m: m.nadam(1e-2),
    "adabelief": lambda m: m.adabelief(1e-2),
    "yogi": lambda m: m.yogi(1e-2),
    "amsgrad": lambda m: m.amsgrad(1e-2),
    "lars": lambda m: m.lars(0.5, weight_decay=1e-3, trust_coefficient=0.01),
    "adafactor": lambda m: m.adafactor(1e-2, min_dim_size_to_factor=4),
}


def _run(tx, params, grads_seq, backend, apply):
    # A fresh function per backend: jit caches traces by function, not by backend in force.
    def step(p, s, g):
        if apply:
            return ox.update_and_apply(tx, g, s, p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    with use_backend(backend):
        step = jax.jit(step)
        state = tx.init(params)
        for g in grads_seq:
            params, state = step(params, state, g)
    return params, state


def _problem(key, dtype):
    kp, kg = jax.random.split(key)
    params = {f"w{i}": jax.random.normal(k, s).astype(dtype)
              for i, (k, s) in enumerate(zip(jax.random.split(kp, len(E2E_SHAPES)), E2E_SHAPES))}
    grads = [jax.tree.map(lambda p, k=k: jax.random.normal(jax.random.fold_in(k, p.size), p.shape).astype(dtype),
                          params) for k in jax.random.split(kg, 5)]
    return params, grads


class _Optax:
    def __getattr__(self, name):
        return getattr(optax, name)


@pytest.mark.slow
@pytest.mark.parametrize("apply", [False, True], ids=["update", "update_and_apply"])
@pytest.mark.parametrize("name", sorted(E2E))
def test_optimizer_interpret_matches_xla_and_optax(key, name, apply):
    params, grads = _problem(key, jnp.float32)
    tx = E2E[name](ox)
    p_int, s_int = _run(tx, params, grads, "interpret", apply)
    p_xla, s_xla = _run(tx, params, grads, "xla", apply)
    assert_trees_close(p_int, p_xla, rtol=1e-6, atol=1e-7)
    assert_trees_close(s_int, s_xla, rtol=1e-6, atol=1e-7)
    ref_tx = E2E[name](_Optax())
    p_ref, s_ref = params, ref_tx.init(params)
    for g in grads:
        u, s_ref = ref_tx.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
    assert_trees_close(p_int, p_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "lion", "clip_adamw"])
def test_optimizer_interpret_bf16_params(key, name):
    params, grads = _problem(key, jnp.bfloat16)
    tx = E2E[name](ox)
    p_int, _ = _run(tx, params, grads, "interpret", True)
    p_xla, _ = _run(tx, params, grads, "xla", True)
    for a, e in zip(jax.tree.leaves(p_int), jax.tree.leaves(p_xla)):
        assert a.dtype == jnp.bfloat16
        # Same math in f32, one rounding to bf16 per step: at most a couple of bf16 ulps apart.
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32),
                                   rtol=2 * 2.0**-8, atol=1e-3)
