"""Fromage, NovoGrad, Polyak SGD, SM3, L-BFGS and their transformations: Optax's states and numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_rel_close, random_tree
from test_kernels_lowering import PARAMS, _count_kernels, _lower

import optax_ext as ox
from optax_ext import optimizers_norm_based as onb
from optax_ext.transforms import norm_based as tnb

STEPS = 60
SHAPES = [(), (1,), (7,), (1000,), (3, 5, 7)]
SHAPES_1D_UP = [(1,), (7,), (1000,), (3, 5, 7), (4, 1, 6)]  # SM3 keeps one accumulator per axis: no 0-d
sched = optax.cosine_decay_schedule(5e-2, 40, alpha=0.1)


class _Ours:
    """Our names: the aliases and transformations of this part, then the rest of optax_ext."""

    def __getattr__(self, name):
        for mod in (onb, tnb, ox):
            if hasattr(mod, name):
                return getattr(mod, name)
        raise AttributeError(name)


OURS, THEIRS = _Ours(), optax

# name -> (build from a module, shapes); both libraries build from the same arguments.
PAIRS = {
    "fromage": (lambda m: m.fromage(0.05), SHAPES),
    "fromage_schedule_min_norm": (lambda m: m.fromage(sched, min_norm=1e-3), SHAPES),
    "novograd": (lambda m: m.novograd(1e-2), SHAPES),
    "novograd_args_schedule": (
        lambda m: m.novograd(sched, b1=0.8, b2=0.5, eps=1e-5, eps_root=1e-7, weight_decay=1e-3),
        SHAPES,
    ),
    "polyak_sgd": (lambda m: m.polyak_sgd(), SHAPES),
    "polyak_sgd_args_schedule": (
        lambda m: m.polyak_sgd(0.5, sched, f_min=-1.0, eps=1e-3, variant="sps+"),
        SHAPES,
    ),
    "sm3": (lambda m: m.sm3(0.1), SHAPES_1D_UP),
    "sm3_momentum": (lambda m: m.sm3(0.05, momentum=0.5), SHAPES_1D_UP),
}
TRANSFORM_PAIRS = {
    "scale_by_novograd": (
        lambda m: m.scale_by_novograd(0.7, 0.9, 1e-4, 1e-6, 0.01, jnp.float32),
        SHAPES,
    ),
    "scale_by_polyak": (
        lambda m: m.chain(m.scale_by_polyak(0.2, 0.3, 1e-4, "sps+"), m.scale(-1.0)),
        SHAPES,
    ),
    "scale_by_sm3": (lambda m: m.chain(m.scale_by_sm3(0.5, 0.9, 1e-6), m.scale(-0.05)), SHAPES_1D_UP),
    "scale_by_lbfgs": (lambda m: m.chain(m.scale_by_lbfgs(3, False), m.scale(-1e-2)), SHAPES),
    "clip_novograd_schedule_chain": (
        lambda m: m.chain(m.clip_by_global_norm(2.0), m.scale_by_novograd(), m.scale_by_learning_rate(sched)),
        SHAPES,
    ),
}
ALL = {**PAIRS, **TRANSFORM_PAIRS}


def _grads(key, shapes, t, dtype=jnp.float32):
    scale = 0.5 + 2.0 * (t % 3)  # norms that vary from step to step
    return random_tree(jax.random.fold_in(key, t), shapes, dtype=dtype, scale=scale)


def _loss(params, t):
    """A loss value for Polyak's step: above f_min on most steps, below it on some."""
    sq = sum(jnp.sum(jnp.asarray(x, jnp.float32) ** 2) for x in jax.tree.leaves(params))
    return 0.05 * sq + jnp.sin(0.7 * t)


def _run(tx, params, key, shapes, steps=STEPS, dtype=jnp.float32, grad_dtype=None):
    """`steps` steps on fresh grads of `dtype` (cast to `grad_dtype` when given); returns (params, state)."""
    state = tx.init(params)
    update = jax.jit(optax.with_extra_args_support(tx).update)  # Optax's plain transformations drop value=
    for t in range(steps):
        g = _grads(key, shapes, t, dtype)
        if grad_dtype is not None:
            g = jax.tree.map(lambda x: x.astype(grad_dtype), g)
        updates, state = update(g, state, params, value=_loss(params, t))
        params = optax.apply_updates(params, updates)
    return params, state


def _dtypes(tree):
    return jax.tree.map(lambda x: jnp.asarray(x).dtype, tree)


@pytest.mark.parametrize("name", sorted(ALL))
def test_matches_optax(name, key):
    build, shapes = ALL[name]
    params = random_tree(key, shapes)
    ours, theirs = build(OURS), build(THEIRS)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
    assert _dtypes(s_ours) == _dtypes(s_theirs)
    p_ours, st_ours = _run(ours, params, key, shapes)
    p_theirs, st_theirs = _run(theirs, params, key, shapes)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((p_theirs, st_theirs))), name
    assert_trees_rel_close(p_ours, p_theirs, rel=1e-6, err_msg=name)
    assert_trees_rel_close(st_ours, st_theirs, rel=1e-6, err_msg=name)
    assert _dtypes(st_ours) == _dtypes(st_theirs)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(params)))
    assert moved > 1e-4


def _rel_errors(actual, expected):
    out = []
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        out.append(float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-30)) if e.size else 0.0)
    return np.array(out)


@pytest.mark.parametrize("name", ["fromage", "novograd", "polyak_sgd", "sm3"])
def test_bf16_params_match_optax(name, key):
    """bf16 params and grads: Optax's state dtypes, and a trajectory as close to the f32 one as Optax's.

    Optax forms some statistics in bf16 (NovoGrad's per-leaf norms: the norm rounded, then squared,
    in bf16), we form them in f32, so bit-equality is not the target; both runs are compared with
    the same optimizer run in f32 from the same (bf16-valued) params and grads, over 10 steps."""
    build, shapes = ALL[name]
    params = random_tree(key, shapes, dtype=jnp.bfloat16)
    ours, theirs = build(OURS), build(THEIRS)
    p_ours, st_ours = _run(ours, params, key, shapes, steps=10, dtype=jnp.bfloat16)
    p_theirs, st_theirs = _run(theirs, params, key, shapes, steps=10, dtype=jnp.bfloat16)
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    p_ref, _ = _run(theirs, f32, key, shapes, steps=10, dtype=jnp.bfloat16, grad_dtype=jnp.float32)
    assert _dtypes(p_ours) == _dtypes(p_theirs) == _dtypes(params)
    assert _dtypes(st_ours) == _dtypes(st_theirs)
    err_ours, err_theirs = _rel_errors(p_ours, p_ref), _rel_errors(p_theirs, p_ref)
    assert np.all(err_ours <= np.maximum(1.5 * err_theirs, 2.0**-7)), (err_ours, err_theirs)
    assert_trees_rel_close(p_ours, p_theirs, rel=5e-2, err_msg=name)


def test_novograd_f32_moment_with_bf16_params(key):
    """mu_dtype=f32 with bf16 params (Optax 0.2.8's lax.cond rejects the mixed dtypes; we allow it)."""
    params = random_tree(key, SHAPES, dtype=jnp.bfloat16)
    tx = tnb.scale_by_novograd(mu_dtype=jnp.float32)
    p, st = _run(tx, params, key, SHAPES, steps=3, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(st.mu))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((p, st.nu)))
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    _, st_ref = _run(ox.chain(tnb.scale_by_novograd()), f32, key, SHAPES, steps=3, dtype=jnp.bfloat16)
    assert_trees_rel_close(st.mu, st_ref[0].mu, rel=3e-2)


def test_novograd_first_step_and_nu(key):
    """Step 1 by hand: nu = ||g||^2 per leaf, mu = g / (sqrt(nu) + eps) + wd * p (no b1 term)."""
    params = random_tree(key, SHAPES)
    g = _grads(key, SHAPES, 0)
    tx = tnb.scale_by_novograd(b1=0.9, b2=0.5, eps=1e-3, weight_decay=0.1)
    u, st = tx.update(g, tx.init(params), params)
    for k in params:
        nu = float(np.sum(np.asarray(g[k], np.float64) ** 2))
        np.testing.assert_allclose(float(st.nu[k]), nu, rtol=1e-6)
        want = np.asarray(g[k], np.float64) / (np.sqrt(nu) + 1e-3) + 0.1 * np.asarray(params[k], np.float64)
        np.testing.assert_allclose(np.asarray(u[k]), want, rtol=1e-5, atol=1e-7)
    assert int(st.count) == 1


def test_update_and_apply_matches_update(key):
    """The fused apply (new params written by the last fused run) equals update + apply_updates."""
    for tx in (onb.novograd(1e-2, weight_decay=1e-3), onb.fromage(0.05), onb.polyak_sgd(0.5, 0.3)):
        params = random_tree(key, SHAPES)
        s1 = s2 = tx.init(params)
        p1 = p2 = params
        step = jax.jit(tx.update_and_apply)
        for t in range(4):
            g = _grads(key, SHAPES, t)
            p1, s1 = step(g, s1, p1, value=_loss(p1, t))
            u, s2 = tx.update(g, s2, p2, value=_loss(p2, t))
            p2 = optax.apply_updates(p2, u)
        assert_trees_rel_close(p1, p2, rel=1e-6)
        assert_trees_rel_close(s1, s2, rel=1e-6)


def test_polyak_value_reaches_it_in_any_chain(key):
    """`value=` passes through optax_ext.chain, optax.chain, and apply_if_finite around it."""
    params = random_tree(key, SHAPES)
    g = _grads(key, SHAPES, 1)
    v = _loss(params, 1)
    want, _ = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_polyak(max_learning_rate=10.0)).update(
        g, (optax.EmptyState(), optax.EmptyState()), params, value=v
    )
    for tx in (
        ox.chain(ox.clip_by_global_norm(1.0), tnb.scale_by_polyak(max_learning_rate=10.0)),
        optax.chain(ox.clip_by_global_norm(1.0), tnb.scale_by_polyak(max_learning_rate=10.0)),
        ox.chain(ox.clip_by_global_norm(1.0), ox.apply_if_finite(tnb.scale_by_polyak(max_learning_rate=10.0), 3)),
    ):
        u, _ = jax.jit(tx.update)(g, tx.init(params), params, value=v)
        assert_trees_rel_close(u, want, rel=1e-6)
    with pytest.raises(TypeError, match="value"):
        tnb.scale_by_polyak().update(g, optax.EmptyState(), params)


def test_novograd_under_apply_if_finite_skips_nonfinite(key):
    params = random_tree(key, SHAPES)
    tx = ox.apply_if_finite(onb.novograd(1e-2), 2)
    st = tx.init(params)
    g = _grads(key, SHAPES, 0)
    p1, st = tx.update_and_apply(g, st, params)
    bad = dict(g, w3=g["w3"].at[5].set(jnp.nan))
    p2, st2 = tx.update_and_apply(bad, st, p1)
    assert_trees_rel_close(p2, p1, rel=0.0)
    assert_trees_rel_close(st2.inner_state, st.inner_state, rel=0.0)
    assert int(st2.inner_state[0].count) == 1


INJECT = {
    "fromage": (lambda m: optax.inject_hyperparams(m.fromage)(learning_rate=0.05, min_norm=1e-4), SHAPES),
    "novograd": (lambda m: optax.inject_hyperparams(m.novograd)(sched, b1=0.8, weight_decay=1e-3), SHAPES),
    "polyak_sgd": (lambda m: optax.inject_hyperparams(m.polyak_sgd)(0.5, sched, f_min=-0.5), SHAPES),
    "sm3": (lambda m: optax.inject_hyperparams(m.sm3)(0.05, momentum=0.7), SHAPES_1D_UP),
}


@pytest.mark.parametrize("name", sorted(INJECT))
def test_inject_hyperparams_matches_optax(name, key):
    """Traced hyperparameters (optax.inject_hyperparams re-builds the optimizer inside the step)."""
    build, shapes = INJECT[name]
    params = random_tree(key, shapes)
    ours, theirs = build(OURS), build(THEIRS)
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(theirs.init(params))
    p_ours, st_ours = _run(ours, params, key, shapes, steps=12)
    p_theirs, st_theirs = _run(theirs, params, key, shapes, steps=12)
    assert_trees_rel_close(p_ours, p_theirs, rel=1e-6, err_msg=name)
    assert_trees_rel_close(st_ours, st_theirs, rel=1e-6, err_msg=name)


def test_sm3_traced_b2_of_one_is_a_running_max(key):
    """b2 = 1 traced (inject_hyperparams): the same steps as Optax with b2 = 1.0 given as a number
    (Optax itself cannot trace b2: it compares it with 1.0 in Python)."""
    params = random_tree(key, SHAPES_1D_UP)
    ours = ox.chain(optax.inject_hyperparams(tnb.scale_by_sm3)(b1=0.6, b2=1.0), ox.scale(-0.05))
    theirs = optax.chain(optax.scale_by_sm3(b1=0.6, b2=1.0), optax.scale(-0.05))
    p_ours, st_ours = _run(ours, params, key, SHAPES_1D_UP, steps=12)
    p_theirs, st_theirs = _run(theirs, params, key, SHAPES_1D_UP, steps=12)
    assert_trees_rel_close(p_ours, p_theirs, rel=1e-6)
    assert_trees_rel_close(st_ours[0].inner_state, st_theirs[0], rel=1e-6)


# ------------------------------------------------------------------------------------- L-BFGS


def _rosenbrock(params):
    x = jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(params)])
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def _quadratic(params):
    x = jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(params)])
    diag = jnp.linspace(0.5, 4.0, x.size)
    return 0.5 * jnp.sum(diag * (x - 1.0) ** 2) + 0.3 * jnp.sum((x[1:] - x[:-1]) ** 2)  # minimum 0 at x = 1


def _solve(tx, fun, params, steps):
    state = tx.init(params)
    # A line search that stores the value and the gradient lets the step reuse them (Optax's recipe).
    from_state = optax.tree.get(state, "grad") is not None
    value_and_grad = optax.value_and_grad_from_state(fun) if from_state else jax.value_and_grad(fun)

    @jax.jit
    def step(params, state):
        value, grad = value_and_grad(params, state=state) if from_state else value_and_grad(params)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


LBFGS = {
    "default_rosenbrock": (lambda m: m.lbfgs(), _rosenbrock, 30),
    "memory3_no_scale_rosenbrock": (lambda m: m.lbfgs(None, 3, False), _rosenbrock, 30),
    "schedule_no_linesearch_quadratic": (
        lambda m: m.lbfgs(optax.linear_schedule(0.5, 0.9, 10), 5, True, None),
        _quadratic,
        25,
    ),
    "custom_linesearch_quadratic": (
        lambda m: m.lbfgs(
            memory_size=4, linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=15, store_grad=True)
        ),
        _quadratic,
        25,
    ),
}


@pytest.mark.parametrize("name", sorted(LBFGS))
def test_lbfgs_matches_optax(name, key):
    build, fun, steps = LBFGS[name]
    params = {"a": jax.random.uniform(key, (4,), minval=-1.5, maxval=1.5), "b": jnp.full((2, 3), -0.5)}
    ours, theirs = build(OURS), build(THEIRS)
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(theirs.init(params))
    p_ours, st_ours = _solve(ours, fun, params, steps)
    p_theirs, st_theirs = _solve(theirs, fun, params, steps)
    assert_trees_rel_close(p_ours, p_theirs, rel=1e-6, err_msg=name)
    assert_trees_rel_close(st_ours, st_theirs, rel=1e-6, err_msg=name)
    # It actually optimizes: the loss (0 at the minimum) fell by orders of magnitude.
    assert float(fun(p_ours)) < 1e-2 * float(fun(params)), (float(fun(p_ours)), float(fun(params)))


# ------------------------------------------------------------------------------------- errors

BAD = [
    (lambda: onb.fromage(-0.1), ValueError, "fromage: learning_rate"),
    (lambda: onb.fromage(0.1, min_norm=-1.0), ValueError, "min_norm"),
    (lambda: onb.novograd(-1e-3), ValueError, "novograd: learning_rate"),
    (lambda: onb.novograd(1e-3, b1=1.0), ValueError, "b1"),
    (lambda: onb.novograd(1e-3, b2=1.5), ValueError, "b2"),
    (lambda: onb.novograd(1e-3, eps=-1e-6), ValueError, "eps"),
    (lambda: onb.novograd(1e-3, eps_root=float("nan")), ValueError, "eps_root"),
    (lambda: onb.novograd(1e-3, weight_decay=float("inf")), ValueError, "weight_decay"),
    (lambda: onb.novograd(1e-3, weight_decay=lambda c: 0.1), TypeError, "weight_decay"),
    (lambda: tnb.scale_by_novograd(mu_dtype=jnp.int32), TypeError, "mu_dtype"),
    (lambda: onb.polyak_sgd(-1.0), ValueError, "max_learning_rate"),
    (lambda: onb.polyak_sgd(scaling=-0.5), ValueError, "scaling"),
    (lambda: onb.polyak_sgd(f_min=float("inf")), ValueError, "f_min"),
    (lambda: onb.polyak_sgd(eps=-1.0), ValueError, "eps"),
    (lambda: onb.polyak_sgd(variant="sps-"), ValueError, "variant"),
    (lambda: tnb.scale_by_polyak(variant="polyak"), ValueError, "variant"),
    (lambda: onb.sm3(-0.1), ValueError, "sm3: learning_rate"),
    (lambda: onb.sm3(sched), TypeError, "learning_rate"),
    (lambda: onb.sm3(0.1, momentum=1.0), ValueError, "momentum"),
    (lambda: tnb.scale_by_sm3(b2=1.5), ValueError, "b2"),
    (lambda: tnb.scale_by_sm3(eps=-1.0), ValueError, "eps"),
    (lambda: onb.lbfgs(-1.0), ValueError, "lbfgs: learning_rate"),
    (lambda: onb.lbfgs(memory_size=0), ValueError, "memory_size"),
    (lambda: onb.lbfgs(memory_size=2.5), ValueError, "memory_size"),
    (lambda: onb.lbfgs(scale_init_precond="yes"), TypeError, "scale_init_precond"),
    (lambda: onb.lbfgs(linesearch=3), TypeError, "linesearch"),
    (lambda: tnb.scale_by_lbfgs(memory_size=-2), ValueError, "memory_size"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_arguments_name_the_argument(i):
    make, exc, match = BAD[i]
    with pytest.raises(exc, match=match):
        make()


def test_sm3_rejects_0d_and_complex_params():
    with pytest.raises(ValueError, match="0-d"):
        onb.sm3(0.1).init({"a": jnp.ones(3), "s": jnp.ones(())})
    with pytest.raises(ValueError, match="real"):
        onb.sm3(0.1).init({"a": jnp.ones(3, jnp.complex64)})


@pytest.mark.parametrize("name", sorted(PAIRS) + ["lbfgs"])
def test_init_on_shapes(name):
    """init under jax.eval_shape (ShapeDtypeStruct params): Optax's shapes and dtypes."""
    build = (lambda m: m.lbfgs()) if name == "lbfgs" else PAIRS[name][0]
    shapes = {"a": jax.ShapeDtypeStruct((3, 4), jnp.float32), "b": jax.ShapeDtypeStruct((5,), jnp.bfloat16)}
    ours = jax.eval_shape(build(OURS).init, shapes)
    theirs = jax.eval_shape(build(THEIRS).init, shapes)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(ours)] == [(x.shape, x.dtype) for x in jax.tree.leaves(theirs)]


# ------------------------------------------------------------------------------------- fusion


@pytest.mark.parametrize(
    "name, make, triton",
    [
        # One reduction (per-leaf norms of updates and params), one fused pass: as many as clip + AdamW.
        ("fromage", lambda: onb.fromage(0.05), 2),
        # Per-leaf gradient norms, then moment + learning rate in one fused pass.
        ("novograd", lambda: onb.novograd(1e-2, weight_decay=1e-3), 2),
        # SGD's scaling fused, then the global norm; the Polyak multiply is XLA's (no kernel).
        ("polyak_sgd", lambda: onb.polyak_sgd(), 2),
    ],
)
def test_lowers_to_few_kernels(name, make, triton):
    tx = make()
    state = jax.eval_shape(tx.init, PARAMS)

    def step(params, state, grads):
        return tx.update_and_apply(grads, state, params, value=jnp.float32(1.0))

    text = _lower(step, (PARAMS, state, PARAMS), "triton", donate=(0, 1))
    assert _count_kernels(text, "triton") == triton, name
