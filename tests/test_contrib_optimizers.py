"""optax.contrib's schedule-free, ADOPT, AdEMAMix and Prodigy: same states, same numbers, one fused pass."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_rel_close, random_tree
from test_kernels_lowering import PARAMS, _count_kernels, _lower_step

import optax_ext as ox
from optax_ext.contrib import _ademamix, _adopt, _prodigy, _schedule_free

STEPS = 60
sched = optax.cosine_decay_schedule(1e-2, 40, alpha=0.1)
warm = optax.linear_schedule(0.0, 0.1, 10)
mask = lambda p: {k: v.ndim > 1 for k, v in p.items()}  # noqa: E731


class _Ours:
    """Our contrib modules first, then optax_ext (base optimizers); one lambda builds both versions."""

    def __getattr__(self, name):
        for module in (_schedule_free, _adopt, _ademamix, _prodigy, ox):
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(name)


class _Theirs:
    def __getattr__(self, name):
        return getattr(optax.contrib, name) if hasattr(optax.contrib, name) else getattr(optax, name)


OURS, THEIRS = _Ours(), _Theirs()

PAIRS = {
    "adopt": lambda m: m.adopt(1e-2),
    "adopt_nesterov_schedule": lambda m: m.adopt(sched, b1=0.8, b2=0.99, eps=1e-5, nesterov=True),
    "adopt_no_clip": lambda m: m.adopt(1e-2, use_clipping=False),
    "adopt_clip_fn": lambda m: m.adopt(1e-2, clip_value_fn=lambda c: 0.5 + c**0.5),
    "scale_by_adopt": lambda m: m.chain(m.scale_by_adopt(b1=0.85), m.scale(-1e-2)),
    "ademamix": lambda m: m.ademamix(1e-2),
    "ademamix_schedules_wd_mask": lambda m: m.ademamix(
        sched,
        b1=0.8,
        b2=0.99,
        b3=optax.linear_schedule(0.9, 0.999, 30),
        alpha=optax.linear_schedule(0.0, 5.0, 20),
        eps_root=1e-8,
        weight_decay=0.05,
        mask=mask,
    ),
    "scale_by_ademamix": lambda m: m.chain(m.scale_by_ademamix(b3=0.99, alpha=2.0), m.scale(-1e-2)),
    "simplified_ademamix": lambda m: m.simplified_ademamix(1e-3),
    "simplified_ademamix_kw": lambda m: m.simplified_ademamix(
        sched, b1=0.9, b2=0.99, alpha=optax.linear_schedule(0.0, 2.0, 20), eps_root=1e-8, weight_decay=0.1, mask=mask
    ),
    "scale_by_simplified_ademamix": lambda m: m.chain(m.scale_by_simplified_ademamix(alpha=1.0), m.scale(-1e-3)),
    "prodigy": lambda m: m.prodigy(),
    "prodigy_kw": lambda m: m.prodigy(
        optax.linear_schedule(1.0, 0.1, 60),
        betas=(0.8, 0.99),
        beta3=0.9,
        eps=1e-6,
        estim_lr0=1e-3,
        estim_lr_coef=0.5,
        weight_decay=0.01,
    ),
    "prodigy_safeguard": lambda m: m.prodigy(estim_lr0=1e-4, safeguard_warmup=True),
    "schedule_free_adamw": lambda m: m.schedule_free_adamw(),
    "schedule_free_adamw_kw": lambda m: m.schedule_free_adamw(
        1e-2, warmup_steps=10, b1=0.95, b2=0.99, eps=1e-6, weight_decay=0.01, weight_lr_power=1.0
    ),
    "schedule_free_sgd": lambda m: m.schedule_free_sgd(0.1),
    "schedule_free_sgd_kw": lambda m: m.schedule_free_sgd(0.1, warmup_steps=5, b1=0.8, weight_decay=1e-3),
    # schedule_free around other bases: ours (fused with the interpolation), an Optax one (opaque),
    # a chain with a global-norm clip (a reduction first), apply_if_finite (a gate inside the base).
    "schedule_free_adam": lambda m: m.schedule_free(m.adam(warm, b1=0.0), warm, b1=0.9),
    "schedule_free_clip_sgd": lambda m: m.schedule_free(
        m.chain(m.clip_by_global_norm(1.0), m.sgd(0.05)), 0.05, b1=0.8, weight_lr_power=0.5
    ),
    "schedule_free_gated_rmsprop": lambda m: m.schedule_free(m.apply_if_finite(m.rmsprop(1e-2), 2), 1e-2),
    "schedule_free_optax_base": lambda m: m.schedule_free(optax.adam(1e-2, b1=0.0), 1e-2),
}


def _grads(key, params, t):
    k = jax.random.fold_in(key, t)
    scale = 0.5 + 2.0 * (t % 3)  # varying scale: global-norm clipping triggers on some steps only
    return random_tree(k, [p.shape for p in params.values()], dtype=next(iter(params.values())).dtype, scale=scale)


def _run(tx, params, key, steps=STEPS):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(steps):
        updates, state = update(_grads(key, params, t), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_matches_optax(name, key):
    params = random_tree(key)
    ours, theirs = PAIRS[name](OURS), PAIRS[name](THEIRS)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
    assert [x.dtype for x in jax.tree.leaves(s_ours)] == [x.dtype for x in jax.tree.leaves(s_theirs)]
    p_ours, st_ours = _run(ours, params, key)
    p_theirs, st_theirs = _run(theirs, params, key)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((p_theirs, st_theirs))), name
    assert_trees_rel_close(p_ours, p_theirs, rel=1e-6, err_msg=name)
    assert_trees_rel_close(st_ours, st_theirs, rel=1e-6, err_msg=name)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(params)))
    # Prodigy's default steps are d = 1e-6 times Adam's until d grows (on random gradients it need
    # not: test_prodigy_estimate_grows_on_a_quadratic).
    assert moved > (1e-5 if name == "prodigy" else 1e-4), moved


def test_prodigy_estimate_grows_on_a_quadratic(key):
    """On f(p) = |p - target|^2 / 2 the distance estimate d grows by orders of magnitude (the max
    branch and both reductions at work), identically to Optax's."""
    params = random_tree(key)
    target = random_tree(jax.random.fold_in(key, 1), scale=3.0)
    runs = []
    for m in (OURS, THEIRS):
        tx = m.prodigy(betas=(0.9, 0.99), weight_decay=1e-3)
        p, state = params, tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(STEPS):
            u, state = update(jax.tree.map(jnp.subtract, p, target), state, p)
            p = optax.apply_updates(p, u)
        runs.append((p, state))
    (p_ours, s_ours), (p_theirs, s_theirs) = runs
    assert float(s_ours.estim_lr) > 1e-3  # from 1e-6
    assert_trees_rel_close(p_ours, p_theirs, rel=1e-6)
    assert_trees_rel_close(s_ours, s_theirs, rel=1e-6)


def test_prodigy_keeps_its_estimate_through_a_zero_learning_rate_warmup(key):
    """A warm-up from 0 makes the first step's gradient sum all zero: d stays (PyTorch's Prodigy skips
    the update there too) where Optax's becomes 0/0 = NaN; afterwards it grows as without the warm-up."""
    params = random_tree(key)
    target = random_tree(jax.random.fold_in(key, 1), scale=3.0)
    warmup = optax.linear_schedule(0.0, 1.0, 5)
    out = {}
    for name, m in (("ours", OURS), ("optax", THEIRS)):
        tx = m.prodigy(warmup)
        p, state = params, tx.init(params)
        for _ in range(20):
            u, state = tx.update(jax.tree.map(jnp.subtract, p, target), state, p)
            p = optax.apply_updates(p, u)
        out[name] = (p, state)
    assert np.isnan(float(out["optax"][1].estim_lr))  # what we do better
    p, state = out["ours"]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((p, state)))
    assert float(state.estim_lr) > 1e-5  # from 1e-6


@pytest.mark.parametrize(
    "name", ["schedule_free_adamw_kw", "schedule_free_optax_base", "adopt", "prodigy_kw", "ademamix"]
)
def test_update_and_apply_matches_update_then_apply(name, key):
    """The fused apply (params written in the pass) under a jit that donates params and state."""
    tx = PAIRS[name](OURS)
    params = random_tree(key)
    s1, s2 = tx.init(params), tx.init(params)
    p1 = jax.tree.map(jnp.copy, params)
    p2 = params
    step, update = jax.jit(tx.update_and_apply, donate_argnums=(1, 2)), jax.jit(tx.update)
    for t in range(5):
        g = _grads(key, params, t)
        p1, s1 = step(g, s1, p1)
        u, s2 = update(g, s2, p2)
        p2 = optax.apply_updates(p2, u)
    assert_trees_rel_close(p1, p2, rel=1e-6)
    assert_trees_rel_close(s1, s2, rel=1e-6)


# Scalar state fields Optax keeps in the params' (lowest) dtype; the rest is per-parameter storage.
_SCALAR_FIELDS = {"estim_lr", "numerator_weighted", "b1", "weight_sum", "max_lr"}


def _f32_storage(tree):
    def up(path, x):
        if any(getattr(k, "name", None) in _SCALAR_FIELDS for k in path):
            return x
        return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map_with_path(up, tree)


@pytest.mark.parametrize(
    "name", ["schedule_free_adamw", "schedule_free_sgd_kw", "adopt", "ademamix", "simplified_ademamix", "prodigy_kw"]
)
def test_bf16_params_are_f32_math_stored_in_bf16(name, key):
    """bf16 params: each step equals Optax's step computed in f32 on the same values, rounded to bf16.

    Step by step from our state (trajectories of rounded values diverge). Optax's own bf16 run
    computes in bf16; ours computes in f32 and stores bf16, so that is the reference.
    """
    params = random_tree(key, dtype=jnp.bfloat16)
    ours, theirs = PAIRS[name](OURS), PAIRS[name](THEIRS)
    state = ours.init(params)
    o_state = theirs.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(o_state)
    assert [x.dtype for x in jax.tree.leaves(state)] == [x.dtype for x in jax.tree.leaves(o_state)]

    @jax.jit
    def reference(g, state, params):
        p32 = _f32_storage(params)
        u, new = theirs.update(_f32_storage(g), _f32_storage(state), p32)
        cast = lambda new, old: jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)  # noqa: E731
        return cast(optax.apply_updates(p32, u), params), cast(new, state)

    step = jax.jit(ours.update_and_apply)
    p = params
    for t in range(20):
        g = _grads(key, params, t)
        p_new, s_new = step(g, state, p)
        p_ref, s_ref = reference(g, state, p)
        assert [x.dtype for x in jax.tree.leaves(p_new)] == [jnp.bfloat16] * len(params)
        assert_trees_rel_close(p_new, p_ref, rel=2.0**-8, err_msg=f"step {t}")
        assert_trees_rel_close(s_new, s_ref, rel=2.0**-8, err_msg=f"step {t}")
        p, state = p_new, s_new
    moved = max(
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params))
    )
    assert moved > 1e-3


def test_schedule_free_state_dtype(key):
    """z stored in bf16 (f32 params): the interpolation reads z as stored, as Optax's.

    Optax also rounds the products (1 - b1) z to bf16 (Python-float times bf16 array); we compute
    them in f32, so the two agree to bf16's precision of that term, not to f32's.
    """
    params = random_tree(key)
    ours, theirs = (m.schedule_free_sgd(0.1, state_dtype=jnp.bfloat16) for m in (OURS, THEIRS))
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
    assert [x.dtype for x in jax.tree.leaves(s_ours)] == [x.dtype for x in jax.tree.leaves(s_theirs)]
    assert all(z.dtype == jnp.bfloat16 for z in jax.tree.leaves(s_ours.z))
    p_ours, st_ours = _run(ours, params, key, steps=20)
    p_theirs, st_theirs = _run(theirs, params, key, steps=20)
    assert_trees_rel_close(p_ours, p_theirs, rel=2.0**-8)
    assert_trees_rel_close(st_ours, st_theirs, rel=2.0**-8)
    # The z of a step is the previous z plus the base's update, rounded once to bf16.
    g = _grads(key, params, 99)
    _, new = ours.update(g, st_ours, p_ours)
    expected = jax.tree.map(lambda z, g: (z.astype(jnp.float32) - 0.1 * g).astype(jnp.bfloat16), st_ours.z, g)
    assert_trees_rel_close(new.z, expected, rel=0.0)


def test_schedule_free_eval_params_matches_optax(key):
    params = random_tree(key)
    ours, theirs = PAIRS["schedule_free_adamw_kw"](OURS), PAIRS["schedule_free_adamw_kw"](THEIRS)
    p_ours, s_ours = _run(ours, params, key, steps=15)
    p_theirs, s_theirs = _run(theirs, params, key, steps=15)
    x_ours = _schedule_free.schedule_free_eval_params(s_ours, p_ours)
    x_theirs = optax.contrib.schedule_free_eval_params(s_theirs, p_theirs)
    assert_trees_rel_close(x_ours, x_theirs, rel=1e-6)
    # The states are interchangeable: Optax's eval reads ours, and ours reads Optax's.
    assert_trees_rel_close(optax.contrib.schedule_free_eval_params(s_ours, p_ours), x_ours, rel=0.0)
    assert_trees_rel_close(_schedule_free.schedule_free_eval_params(s_theirs, p_theirs), x_theirs, rel=0.0)
    # x is the average, not the interpolation y (the params): they differ after some steps.
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(x_ours), jax.tree.leaves(p_ours))) > 1e-4


def test_schedule_free_eval_params_errors(key):
    params = random_tree(key)
    with pytest.raises(ValueError, match="ScheduleFreeState"):
        _schedule_free.schedule_free_eval_params(ox.adam(1e-3).init(params), params)
    state = _schedule_free.schedule_free_sgd().init(params)
    with pytest.raises(ValueError, match="structure"):
        _schedule_free.schedule_free_eval_params(state, {"other": params["w0"]})


def test_schedule_free_from_optax_state(key):
    """A state made by Optax's schedule_free runs in ours (same layout), with the same result."""
    params = random_tree(key)
    g = _grads(key, params, 0)
    state = optax.contrib.schedule_free_adamw(1e-2).init(params)
    u_ours, s_ours = jax.jit(_schedule_free.schedule_free_adamw(1e-2).update)(g, state, params)
    u_theirs, s_theirs = jax.jit(optax.contrib.schedule_free_adamw(1e-2).update)(g, state, params)
    assert_trees_rel_close(u_ours, u_theirs, rel=1e-6)
    assert_trees_rel_close(s_ours, s_theirs, rel=1e-6)


def test_z_and_params0_are_their_own_buffers(key):
    params = random_tree(key)
    z = _schedule_free.schedule_free_adamw().init(params).z
    p0 = _prodigy.prodigy().init(params).params0
    for p, a, b in zip(jax.tree.leaves(params), jax.tree.leaves(z), jax.tree.leaves(p0)):
        assert a is not p and b is not p
        assert a.unsafe_buffer_pointer() != p.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
        np.testing.assert_array_equal(a, p)
    # init on abstract params (jax.eval_shape) works too
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    for make in (PAIRS["schedule_free_adamw"], PAIRS["prodigy"], PAIRS["adopt"], PAIRS["ademamix"]):
        shapes = jax.eval_shape(make(OURS).init, abstract)
        assert jax.tree.structure(shapes) == jax.tree.structure(make(THEIRS).init(params))


BAD_ARGS = [
    (lambda: _adopt.adopt(1e-3, b1=1.5), ValueError, "b1"),
    (lambda: _adopt.scale_by_adopt(b2=-0.1), ValueError, "b2"),
    (lambda: _adopt.adopt(1e-3, eps=-1.0), ValueError, "eps"),
    (lambda: _adopt.adopt(1e-3, clip_value_fn=0.5), TypeError, "clip_value_fn"),
    (lambda: _adopt.adopt(-1e-3), ValueError, "learning_rate"),
    (lambda: _ademamix.ademamix(1e-3, b3=1.0), ValueError, "b3"),
    (lambda: _ademamix.scale_by_ademamix(alpha=float("nan")), ValueError, "alpha"),
    (lambda: _ademamix.ademamix(1e-3, mu_dtype=jnp.int32), TypeError, "mu_dtype"),
    (lambda: _ademamix.simplified_ademamix(1e-3, b2="0.9"), TypeError, "b2"),
    (lambda: _ademamix.simplified_ademamix(1e-3, weight_decay=float("inf")), ValueError, "weight_decay"),
    (lambda: _prodigy.prodigy(betas=(0.9,)), TypeError, "betas"),
    (lambda: _prodigy.prodigy(betas=(0.9, 1.2)), ValueError, r"betas\[1\]"),
    (lambda: _prodigy.prodigy(beta3=-0.5), ValueError, "beta3"),
    (lambda: _prodigy.prodigy(estim_lr0=0.0), ValueError, "estim_lr0"),
    (lambda: _prodigy.prodigy(learning_rate=-1.0), ValueError, "learning_rate"),
    (lambda: _prodigy.prodigy(safeguard_warmup=1), TypeError, "safeguard_warmup"),
    (lambda: _schedule_free.schedule_free(ox.sgd(0.1), 0.1, b1=0.0), ValueError, "b1"),
    (lambda: _schedule_free.schedule_free(ox.sgd(0.1), 0.1, b1=1.0), ValueError, "b1"),
    (lambda: _schedule_free.schedule_free("sgd", 0.1), TypeError, "base_optimizer"),
    (lambda: _schedule_free.schedule_free(ox.sgd(0.1), -0.1), ValueError, "learning_rate"),
    (lambda: _schedule_free.schedule_free_sgd(state_dtype=jnp.int32), TypeError, "state_dtype"),
    (lambda: _schedule_free.schedule_free_adamw(warmup_steps=0), ValueError, "warmup_steps"),
    (lambda: _schedule_free.schedule_free_adamw(b2=1.0), ValueError, "b2"),
    (lambda: _schedule_free.schedule_free_adamw(weight_lr_power=float("nan")), ValueError, "weight_lr_power"),
]


@pytest.mark.parametrize("i", range(len(BAD_ARGS)))
def test_bad_arguments_name_the_argument(i):
    make, error, match = BAD_ARGS[i]
    with pytest.raises(error, match=match):
        make()


def test_bad_state_and_missing_params(key):
    params = random_tree(key)
    g = _grads(key, params, 0)
    tx = _schedule_free.schedule_free_adamw()
    with pytest.raises(TypeError, match="ScheduleFreeState"):
        tx.update(g, ox.adam(1e-3).init(params), params)
    with pytest.raises(ValueError, match="params"):
        tx.update(g, tx.init(params), None)
    prodigy = _prodigy.prodigy()
    with pytest.raises(ValueError, match="params"):
        prodigy.update(g, prodigy.init(params), None)
    adopt = _adopt.adopt(1e-3)
    with pytest.raises(TypeError, match="ScaleByAdamState"):
        adopt.update(g, (_ademamix.scale_by_ademamix().init(params), optax.EmptyState()), params)


@pytest.mark.parametrize("apply", [False, True], ids=["update", "update_and_apply"])
@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("name", ["schedule_free_adamw", "adopt"])
def test_lowers_to_as_many_kernels_as_adamw(name, backend, apply):
    """For CUDA (Triton) and TPU (Mosaic): the whole step is the fused pass adamw has (no extra launch)."""
    adamw = _count_kernels(_lower_step(ox.adamw(1e-3), PARAMS, backend, apply), backend)
    ours = _count_kernels(_lower_step(PAIRS[name](OURS), PARAMS, backend, apply), backend)
    assert ours == adamw == (1 if backend == "triton" else 2)


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_schedule_free_fuses_with_its_neighbours_in_a_chain(backend):
    """Clipping, the base AdamW and the interpolation: the norm and one fused pass, as clip + adamw
    (the schedule-free rule writes back only its own fields, so it sits in the chain like any rule)."""
    clip_adamw = ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3))
    clip_sf = ox.chain(ox.clip_by_global_norm(1.0), ox.schedule_free_adamw(1e-3, warmup_steps=10))
    expected = _count_kernels(_lower_step(clip_adamw, PARAMS, backend), backend)
    assert _count_kernels(_lower_step(clip_sf, PARAMS, backend), backend) == expected


def test_schedule_free_in_a_chain_matches_optax(key):
    params = random_tree(key)
    ours = ox.chain(ox.clip_by_global_norm(1.0), ox.schedule_free_adamw(1e-2, warmup_steps=5, weight_decay=1e-3))
    theirs = optax.chain(
        optax.clip_by_global_norm(1.0), optax.contrib.schedule_free_adamw(1e-2, warmup_steps=5, weight_decay=1e-3)
    )
    results = []
    for tx in (ours, theirs):
        p, state = params, tx.init(params)
        step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p))
        for t in range(30):
            g = random_tree(jax.random.fold_in(key, t), scale=2.0)
            u, state = step(g, state, p)
            p = optax.apply_updates(p, u)
        results.append((p, state))
    assert jax.tree.structure(results[0][1]) == jax.tree.structure(results[1][1])
    assert_trees_rel_close(results[0][0], results[1][0], rel=1e-6)
    assert_trees_rel_close(results[0][1], results[1][1], rel=1e-6)
