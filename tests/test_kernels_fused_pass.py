"""The fused elementwise Pallas kernels, run in the Pallas interpreter on CPU.

Checked against `run_elementwise_reference` (the body applied to whole arrays by jnp) on fresh
random inputs: many leaves of ragged sizes per call, in both forms ("multi_tensor": Triton's
multi-leaf launches with masked 1-D blocks; "per_leaf": Mosaic's (rows, 128) slabs and 1-D
blocks), with blocks small enough that leaves span several programs and end in a partial block.
Then: launch grouping, every element written (NaN-poisoned aliased outputs), aliasing with buffer
donation under jit, huge leaves through their 2-D view, and whole optimizers through the
interpreter against the "xla" backend and against Optax.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import optax_ext as ox
from optax_ext.kernels import multi_tensor as mt
from optax_ext.kernels import use_backend
from optax_ext.kernels.elementwise import Job, run_elementwise_reference, run_fused
from optax_ext.kernels.fused_pass import fused_pass_pallas

SHAPES = [(), (1,), (7,), (1000,), (1031,), (3, 5, 7), (3 * 1024 + 5,), (16, 128)]
BIG = (2**17 + 3,)  # with the default blocks only: 33 programs, not 513, in the (slow) interpreter
# (form, block). Small blocks make every size above > 1 block, ragged: 256 elements or 8 rows.
FORMS = [("multi_tensor", 256), ("per_leaf", 8), ("multi_tensor", None), ("per_leaf", None)]


def adam_body(xs, shared, leaf):
    """Adam (Kingma & Ba, 2015) with decoupled decay: 2 slots, 6 shared scalars, a per-leaf decay."""
    g, p, m, v = xs
    m = shared[0] * m + shared[1] * g  # b1, 1 - b1
    v = shared[2] * v + shared[3] * (g * g)  # b2, 1 - b2
    u = (m / shared[4]) / (jnp.sqrt(v) + shared[5])  # bias correction 1, eps
    return [p - 1e-2 * (u + leaf[0] * p), m, v]


def clip_body(xs, shared, leaf):
    """No scalars at all: clip to [-0.5, 0.5] and double."""
    (g,) = xs
    return [2.0 * jnp.clip(g, -0.5, 0.5)]


ADAM_SHARED = jnp.array([0.9, 0.1, 0.999, 0.001, 0.271, 1e-8], jnp.float32)
NO_SCALARS = jnp.zeros((0,), jnp.float32)


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


def _adam_jobs(key, shapes, dtypes=((jnp.float32,) * 3,), aliases=None):
    """One Adam job per shape; dtypes cycle over (grad, param, slot) triples; decay 0.1 k per leaf."""
    jobs = []
    for k, (shape, kk) in enumerate(zip(shapes, jax.random.split(key, len(shapes)))):
        g_dt, p_dt, s_dt = dtypes[k % len(dtypes)]
        inputs = _adam_inputs(kk, shape, g_dt, p_dt, s_dt)
        jobs.append(Job(inputs, [p_dt, s_dt, s_dt], jnp.array([0.1 * k], jnp.float32), aliases or {}))
    return jobs


def _check_jobs(body, jobs, shared, got, ulps=4):
    assert len(got) == len(jobs)
    for job, outs in zip(jobs, got):
        want = run_elementwise_reference(body, job.inputs, shared, job.scalars, job.out_dtypes)
        assert len(outs) == len(want)
        for a, e in zip(outs, want, strict=True):
            assert a.shape == jnp.shape(job.inputs[0])
            assert_close_in_dtype(a, e, ulps)


def _count_pallas_calls(fn, *args):
    """Launches in the traced function: pallas_call equations of its jaxpr (nested ones included).

    Traces a fresh wrapper each time: tracing is cached per function object, and the launch plan
    read from module constants at trace time may have changed since.
    """

    def count(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == "pallas_call"
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                n += count(sub)
        return n

    return count(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)


@pytest.mark.parametrize("form,block", FORMS)
def test_many_leaves_match_reference(key, form, block):
    # Every ragged shape in one call; per-leaf scalars differ per leaf.
    jobs = _adam_jobs(key, SHAPES + ([BIG] if block is None else []))
    got = fused_pass_pallas(adam_body, jobs, ADAM_SHARED, backend="interpret", form=form, block=block)
    _check_jobs(adam_body, jobs, ADAM_SHARED, got)


@pytest.mark.parametrize("form,block", FORMS[:2])
def test_leaves_of_different_dtypes_share_a_launch(key, form, block):
    # bf16 params and grads with f32 or bf16 slots, f16 grads, f32: upcast inside, round once on the way out.
    dtypes = (
        (jnp.bfloat16, jnp.bfloat16, jnp.float32),
        (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
        (jnp.float16, jnp.float32, jnp.float16),
        (jnp.float32, jnp.float32, jnp.float32),
    )
    jobs = _adam_jobs(key, [(1031,), (3, 5, 7), (3 * 1024 + 5,), (7,), (130, 128)], dtypes)
    got = fused_pass_pallas(adam_body, jobs, ADAM_SHARED, backend="interpret", form=form, block=block)
    for job, outs in zip(jobs, got):
        assert [o.dtype for o in outs] == [jnp.dtype(d) for d in job.out_dtypes]
    _check_jobs(adam_body, jobs, ADAM_SHARED, got)
    if form == "multi_tensor":
        f = lambda: fused_pass_pallas(adam_body, jobs, ADAM_SHARED, backend="interpret", form=form, block=block)
        assert _count_pallas_calls(f) == 1


@pytest.mark.parametrize("form,block", FORMS[:2])
def test_body_without_scalars(key, form, block):
    shapes = [(), (7,), (3, 5, 7), (3 * 1024 + 5,)]
    xs = [0.5 * jax.random.normal(k, s) for k, s in zip(jax.random.split(key, len(shapes)), shapes)]
    jobs = [Job([x], [jnp.float32], NO_SCALARS) for x in xs]
    got = fused_pass_pallas(clip_body, jobs, NO_SCALARS, backend="interpret", form=form, block=block)
    for x, (out,) in zip(xs, got):
        np.testing.assert_array_equal(out, 2.0 * np.clip(np.asarray(x), -0.5, 0.5))


def test_launches_are_grouped_by_leaves_and_refs(key, monkeypatch):
    # 8 leaves, 7 refs each: at most 3 leaves per launch by count, or 2 by refs (2 * 7 + 2 <= 16).
    jobs = _adam_jobs(key, SHAPES)
    run = lambda: fused_pass_pallas(adam_body, jobs, ADAM_SHARED, backend="interpret", block=256)
    assert _count_pallas_calls(run) == 1
    monkeypatch.setattr(mt, "MAX_LEAVES", 3)
    assert _count_pallas_calls(run) == 3
    _check_jobs(adam_body, jobs, ADAM_SHARED, run())
    monkeypatch.setattr(mt, "MAX_LEAVES", 64)
    monkeypatch.setattr(mt, "MAX_REFS", 2 + 7 * 2)  # two leaves per launch
    assert _count_pallas_calls(run) == 4
    _check_jobs(adam_body, jobs, ADAM_SHARED, run())
    # Mosaic's form is one call per leaf.
    per_leaf = lambda: fused_pass_pallas(adam_body, jobs, ADAM_SHARED, backend="interpret", form="per_leaf")
    assert _count_pallas_calls(per_leaf) == len(SHAPES)


def test_huge_leaves_run_through_their_2d_view(key, monkeypatch):
    # Shrink the index limit so that a 5 x 1031 leaf is "huge": it runs as 5 rows of 1031, each
    # cut into ragged 256-element blocks; a leaf of prime size over the limit runs on XLA.
    monkeypatch.setattr(mt, "INDEX_LIMIT", 3000)
    monkeypatch.setattr(mt, "MIN_HUGE_COLS", 64)
    assert mt.view_for(5 * 1031) == (5, 1031) and mt.view_for(3001) is None
    jobs = _adam_jobs(key, [(5, 1031), (7,), (3001,)])
    got = fused_pass_pallas(adam_body, jobs, ADAM_SHARED, backend="interpret", block=256)
    assert got[2] is None
    _check_jobs(adam_body, jobs[:2], ADAM_SHARED, got[:2])
    with use_backend("interpret"):
        public = run_fused(adam_body, jobs, ADAM_SHARED)
    _check_jobs(adam_body, jobs, ADAM_SHARED, public)


@pytest.mark.parametrize("form,block", FORMS)
def test_every_element_written(key, form, block):
    # Output 0 of each leaf is written into input 1's buffer, which is all NaN and never read by the
    # body: any element the kernel skips (a ragged tail, a last partial block, a whole leaf) stays NaN.
    shapes = [(), (7,), (1031,), (3 * 1024 + 5,), (16, 128)] + ([BIG] if block is None else [])
    gs = [jax.random.normal(k, s) for k, s in zip(jax.random.split(key, len(shapes)), shapes)]

    def body(xs, shared, leaf):
        return [xs[0] * shared[0] + leaf[0]]

    def run(gs, outs):
        jobs = [Job([g, o], [jnp.float32], jnp.array([k + 1.0]), {1: 0}) for k, (g, o) in enumerate(zip(gs, outs))]
        return fused_pass_pallas(body, jobs, jnp.array([3.0]), backend="interpret", form=form, block=block)

    got = jax.jit(run, donate_argnums=1)(gs, [jnp.full(s, jnp.nan, jnp.float32) for s in shapes])
    for k, (g, (out,)) in enumerate(zip(gs, got)):
        assert not np.isnan(np.asarray(out)).any()
        assert_close_in_dtype(out, 3.0 * np.asarray(g) + np.float32(k + 1.0))


@pytest.mark.parametrize("form,block", FORMS[:2])
def test_aliases_with_donation_under_jit(key, form, block):
    # The params and slots p, m, v are updated in place: donated inputs 1, 2, 3 become outputs 0, 1, 2.
    jobs = _adam_jobs(key, [(3 * 1024 + 5,), (1000,)], aliases={1: 0, 2: 1, 3: 2})
    want = [
        [np.asarray(x) for x in run_elementwise_reference(adam_body, j.inputs, ADAM_SHARED, j.scalars, j.out_dtypes)]
        for j in jobs
    ]

    def step(gs, rest, shared):
        js = [j._replace(inputs=[g, *r]) for j, g, r in zip(jobs, gs, rest)]
        return fused_pass_pallas(adam_body, js, shared, backend="interpret", form=form, block=block)

    gs = [j.inputs[0] for j in jobs]
    rest = [list(j.inputs[1:]) for j in jobs]
    got = jax.jit(step, donate_argnums=1)(gs, rest, ADAM_SHARED)
    for outs, w in zip(got, want):
        for a, e in zip(outs, w):
            assert_close_in_dtype(a, e)
    assert not any(g.is_deleted() for g in gs)  # not donated: still usable
    # Donation took effect: the donated buffers were consumed by the in-place kernel.
    assert all(x.is_deleted() for r in rest for x in r)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_triton_on_gpu_matches_reference(key):
    shapes = [(7,), (1_000_003,), (4096, 1000), (3, 5, 7), (768,), (2**17 + 3,)]
    jobs = _adam_jobs(key, shapes, ((jnp.bfloat16, jnp.float32, jnp.float32),), aliases={1: 0, 2: 1, 3: 2})
    inputs = [j.inputs for j in jobs]

    def with_inputs(xs):
        return [j._replace(inputs=x) for j, x in zip(jobs, xs)]

    got = jax.jit(lambda xs, s: fused_pass_pallas(adam_body, with_inputs(xs), s, backend="triton"))(inputs, ADAM_SHARED)
    want = jax.jit(
        lambda xs, s: [
            run_elementwise_reference(adam_body, j.inputs, s, j.scalars, j.out_dtypes) for j in with_inputs(xs)
        ]
    )(inputs, ADAM_SHARED)
    for outs, w in zip(got, want):
        for a, e in zip(outs, w):
            assert_close_in_dtype(a, e)


def test_run_fused_dispatches_to_pallas(key):
    # The public entry point with the interpreter forced must give the kernel's answer.
    jobs = _adam_jobs(key, [(1031,), (3, 5, 7)])
    with use_backend("interpret"):
        got = run_fused(adam_body, jobs, ADAM_SHARED)
    want = fused_pass_pallas(adam_body, jobs, ADAM_SHARED, backend="interpret")
    for outs, w in zip(got, want):
        for a, e in zip(outs, w):
            np.testing.assert_array_equal(a, e)
    assert _count_pallas_calls(lambda: run_fused(adam_body, jobs, ADAM_SHARED, backend="xla")) == 0


def test_size_zero_inputs():
    x = jnp.zeros((0, 3), jnp.bfloat16)
    ((out,),) = fused_pass_pallas(clip_body, [Job([x], [jnp.float32], NO_SCALARS)], NO_SCALARS, backend="interpret")
    assert out.shape == (0, 3) and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(backend="cuda"), ValueError, "backend='cuda'"),
        (dict(backend="interpret", form="tiles"), ValueError, "form='tiles'"),
        (dict(backend="mosaic_interpret", form="per_leaf"), ValueError, "multi_tensor"),
        (dict(backend="interpret", block=0), ValueError, "block=0"),
        (dict(backend="interpret", form="per_leaf", block=12), ValueError, "multiple of 8"),
        (dict(backend="triton", block=1000), ValueError, "power of 2"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    jobs = [Job([jnp.ones((2000,))], [jnp.float32], NO_SCALARS)]
    with pytest.raises(exc, match=match):
        fused_pass_pallas(clip_body, jobs, NO_SCALARS, **kwargs)


def test_bad_jobs():
    x, y = jnp.ones((7,)), jnp.ones((8,))

    def run(*jobs, shared=NO_SCALARS, body=clip_body):
        return fused_pass_pallas(body, list(jobs), shared, backend="interpret")

    with pytest.raises(ValueError, match=r"jobs\[0\]\)\.inputs: .* input 1 has \(8,\)"):
        run(Job([x, y], [jnp.float32], NO_SCALARS))
    with pytest.raises(TypeError, match="int32"):
        run(Job([jnp.ones((7,), jnp.int32)], [jnp.float32], NO_SCALARS))
    with pytest.raises(ValueError, match="dtypes must match"):
        run(Job([x.astype(jnp.bfloat16)], [jnp.float32], NO_SCALARS, {0: 0}))
    with pytest.raises(ValueError, match="out of range"):
        run(Job([x], [jnp.float32], NO_SCALARS, {0: 5}))
    with pytest.raises(ValueError, match="1-D vector"):
        run(Job([x], [jnp.float32], NO_SCALARS), shared=jnp.zeros(()))
    with pytest.raises(ValueError, match=r"jobs\[1\]\): every job of one body needs the same number"):
        run(Job([x], [jnp.float32], NO_SCALARS), Job([x, x], [jnp.float32], NO_SCALARS))
    with pytest.raises(ValueError, match="body returned 1 outputs"):
        run(Job([x], [jnp.float32] * 2, NO_SCALARS))


# --------------------------------------------------------------------------------------------
# Whole optimizers through the interpreter: same params as the "xla" backend and as Optax.

E2E_SHAPES = [(), (1,), (7,), (1000,), (3, 5, 7), (2**17 + 3,)]
E2E = {
    "adamw": lambda m: m.adamw(1e-2, weight_decay=0.05),
    "adamw_masked": lambda m: m.adamw(1e-2, weight_decay=0.05, mask=lambda p: {k: v.ndim > 1 for k, v in p.items()}),
    "lamb": lambda m: m.lamb(1e-2, weight_decay=0.01),
    "sgd_momentum": lambda m: m.sgd(0.05, momentum=0.9),
    "lion": lambda m: m.lion(1e-3, weight_decay=0.01),
    "rmsprop": lambda m: m.rmsprop(1e-2),
    "clip_adamw": lambda m: m.chain(m.clip_by_global_norm(1.0), m.adamw(1e-2)),
    "clip_adamw_schedule": lambda m: m.chain(
        m.clip_by_global_norm(1.0), m.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10))
    ),
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
    params = {
        f"w{i}": jax.random.normal(k, s).astype(dtype)
        for i, (k, s) in enumerate(zip(jax.random.split(kp, len(E2E_SHAPES)), E2E_SHAPES))
    }
    grads = [
        jax.tree.map(lambda p, k=k: jax.random.normal(jax.random.fold_in(k, p.size), p.shape).astype(dtype), params)
        for k in jax.random.split(kg, 5)
    ]
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
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=2 * 2.0**-8, atol=1e-3)
