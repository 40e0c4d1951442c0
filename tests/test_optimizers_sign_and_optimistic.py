"""noisy_sgd, sign_sgd, signum, rprop, optimistic_gradient_descent, optimistic_adam(_v2) and their
transformations: Optax's states and numbers over 60 steps, clear errors, one fused launch on CUDA/TPU."""

import functools
import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_rel_close, random_tree
from test_kernels_lowering import PARAMS, _count_kernels, _lower_step

import optax_ext as ox
import optax_ext.optimizers_sign_and_optimistic as opt
import optax_ext.transforms.sign_and_optimistic as tr

STEPS = 60
sched = optax.cosine_decay_schedule(1e-2, 40, alpha=0.1)


class _Ours:
    """Our aliases and transformations (this module's, then optax_ext's: ema, scale, chain)."""

    def __getattr__(self, name):
        for mod in (opt, tr, ox):
            if hasattr(mod, name):
                return getattr(mod, name)
        raise AttributeError(name)


OURS, THEIRS = _Ours(), optax

# name -> build(m), m being our namespace or optax; both built from the same arguments.
PAIRS = {
    "noisy_sgd": lambda m: m.noisy_sgd(0.05, key=3),
    "noisy_sgd_typed_key_schedule": lambda m: m.noisy_sgd(sched, eta=0.3, gamma=0.8, key=jax.random.key(11)),
    "sign_sgd": lambda m: m.sign_sgd(1e-2),
    "sign_sgd_schedule": lambda m: m.sign_sgd(sched),
    "signum": lambda m: m.signum(1e-2),
    "signum_f32_acc": lambda m: m.signum(1e-2, accumulator_dtype=jnp.float32),
    "signum_beta_bf16_acc_schedule": lambda m: m.signum(sched, beta=0.5, accumulator_dtype=jnp.bfloat16),
    "rprop": lambda m: m.rprop(1e-2),
    "rprop_args": lambda m: m.rprop(3e-2, eta_minus=0.3, eta_plus=1.5, min_step_size=1e-3, max_step_size=0.05),
    "optimistic_gradient_descent": lambda m: m.optimistic_gradient_descent(1e-2),
    "optimistic_gradient_descent_args_schedule": lambda m: m.optimistic_gradient_descent(sched, 0.7, -0.2),
    "optimistic_adam": lambda m: m.optimistic_adam(1e-2),
    "optimistic_adam_args": lambda m: m.optimistic_adam(1e-2, 0.5, 0.8, 0.99, 1e-6, 1e-8, nesterov=False),
    "optimistic_adam_v2": lambda m: m.optimistic_adam_v2(1e-2),
    "optimistic_adam_v2_args_schedule": lambda m: m.optimistic_adam_v2(
        sched, alpha=0.5, beta=2.0, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-8, nesterov=False
    ),
    # Transformations alone (scaled where the raw output would blow the params up).
    "add_noise": lambda m: m.add_noise(0.1, 0.3, 5),
    "scale_by_sign": lambda m: m.chain(m.scale_by_sign(), m.scale(-1e-2)),
    "scale_by_rprop": lambda m: m.scale_by_rprop(1e-2, 0.4, 1.3, 1e-4, 1.0),
    "scale_by_optimistic_gradient": lambda m: m.chain(m.scale_by_optimistic_gradient(0.5, 1.5), m.scale(-1e-2)),
}
# The ones whose every part is a per-element Rule (all but the noise).
ELEMENTWISE = [n for n in PAIRS if "noise" not in n and "noisy" not in n]


def _build(name, m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # optimistic_adam (v1) is deprecated in both
        return PAIRS[name](m)


def _grads(key, params, t):
    scale = 0.5 + 2.0 * (t % 3)
    g = random_tree(jax.random.fold_in(key, t), [p.shape for p in params.values()], scale=scale)
    return jax.tree.map(lambda x, p: x.astype(p.dtype), g, params)


def _all_grads(key, params, steps=STEPS):
    return [_grads(key, params, t) for t in range(steps)]


def _run(tx, params, grads):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _unkey(tree):
    """Typed PRNG keys as their uint32 data, for numerical comparison."""
    is_key = lambda x: isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)  # noqa: E731
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def _dtypes(tree):
    return [jnp.result_type(x) for x in jax.tree.leaves(tree)]


def _moved(p, params):
    return max(
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params))
    )


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_matches_optax_f32(name, key):
    params = random_tree(key)
    ours, theirs = _build(name, OURS), _build(name, THEIRS)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
    assert [type(s) for s in jax.tree.leaves(s_ours, is_leaf=lambda x: hasattr(x, "_fields"))] == [
        type(s) for s in jax.tree.leaves(s_theirs, is_leaf=lambda x: hasattr(x, "_fields"))
    ]
    grads = _all_grads(key, params)
    p_ours, st_ours = _run(ours, params, grads)
    p_theirs, st_theirs = _run(theirs, params, grads)
    assert jax.tree.structure(st_ours) == jax.tree.structure(st_theirs)
    assert _dtypes(st_ours) == _dtypes(st_theirs), name
    st_ours, st_theirs = _unkey(st_ours), _unkey(st_theirs)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((p_theirs, st_theirs))), name
    assert_trees_rel_close(p_ours, p_theirs, rel=1e-6, err_msg=name)
    assert_trees_rel_close(st_ours, st_theirs, rel=1e-6, err_msg=name)
    assert _moved(p_ours, params) > 1e-3, name


# bf16 params (and grads): Optax's arithmetic partly runs in bf16 (its learning rate times a bf16
# update is a bf16 product, its EMAs are bf16 sums), ours in f32 rounded once per stored value. In
# a step each side rounds a weight by up to one unit roundoff u = 2^-8 of the leaf's scale, so the
# two differ by a random amount of standard deviation about sqrt(2/3) u ~ 0.8 u; over 60 steps a
# random walk of sqrt(60) 0.8 u ~ 6 u, and the largest of up to 1000 elements ~ 3.3 of that:
# 3 sqrt(60) u ~ 23 u ~ 9% bounds the parameters (measured: up to 11 u). A wrong formula (a missing
# optimistic term, the wrong step-size rule) moves them by tens of percent. States are compared
# where they are well-conditioned: step sizes, previous gradients, an f32 EMA. Not Adam's direction
# of a small leaf (optimistic_adam_v2's previous_gradient), a ratio of a near-zero first moment
# that a bf16 rounding upstream changes by any relative amount; nor Signum's default bf16 EMA,
# whose sign near zero depends on those roundings (one flipped sign moves a weight by 2 lr).
BF16_REL = 3 * np.sqrt(STEPS) * 2.0**-8
BF16_CASES = {  # name -> compare the states too
    "noisy_sgd": True,
    "sign_sgd_schedule": True,
    "signum_f32_acc": True,
    "rprop_args": True,
    "optimistic_gradient_descent": True,
    "optimistic_adam_v2": False,
}


@pytest.mark.parametrize("name", sorted(BF16_CASES))
def test_matches_optax_bf16_params(name, key):
    params = random_tree(key, dtype=jnp.bfloat16)
    ours, theirs = _build(name, OURS), _build(name, THEIRS)
    grads = _all_grads(key, params)
    p_ours, st_ours = _run(ours, params, grads)
    p_theirs, st_theirs = _run(theirs, params, grads)
    assert jax.tree.structure(st_ours) == jax.tree.structure(st_theirs)
    assert _dtypes(p_ours) == _dtypes(p_theirs) == [jnp.dtype(jnp.bfloat16)] * len(params)
    assert _dtypes(st_ours) == _dtypes(st_theirs), name
    assert_trees_rel_close(p_ours, p_theirs, rel=BF16_REL, err_msg=name)
    if BF16_CASES[name]:
        assert_trees_rel_close(_unkey(st_ours), _unkey(st_theirs), rel=BF16_REL, err_msg=name)
    assert _moved(p_ours, params) > 0.1, name


@pytest.mark.parametrize("name", ["signum", "rprop_args", "optimistic_adam_v2_args_schedule", "noisy_sgd"])
def test_update_and_apply_matches_update_then_apply(name, key):
    tx = _build(name, OURS)
    params = random_tree(key)
    s1 = s2 = tx.init(params)
    p1 = p2 = params
    fused = jax.jit(tx.update_and_apply)
    for t in range(6):
        g = _grads(key, params, t)
        p1, s1 = fused(g, s1, p1)
        u, s2 = tx.update(g, s2, p2)
        p2 = optax.apply_updates(p2, u)
    assert_trees_rel_close(p1, p2, rel=1e-6)
    assert_trees_rel_close(_unkey(s1), _unkey(s2), rel=1e-6)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_ones_are_fully_fused(name):
    atoms = _build(name, OURS).atoms
    assert atoms and all(a.rule is not None for a in atoms), name


@pytest.mark.parametrize("name", ["sign_sgd", "optimistic_gradient_descent_args_schedule", "optimistic_adam_v2"])
def test_complex_params_as_optax(name, key):
    """What Optax accepts, we accept: complex params (sign = g / |g|, Adam's |g|^2)."""
    k1, k2 = jax.random.split(key)
    params = jax.tree.map(lambda a, b: (a + 1j * b).astype(jnp.complex64), random_tree(k1), random_tree(k2))
    grads = [jax.tree.map(lambda x: 1j * x + 0.5, g) for g in _all_grads(key, params, steps=5)]
    p1, s1 = _run(_build(name, OURS), params, grads)
    p2, s2 = _run(_build(name, THEIRS), params, grads)
    parts = lambda t: jax.tree.map(lambda x: (jnp.real(x), jnp.imag(x)), t)  # noqa: E731  (NumPy drops imag)
    assert_trees_rel_close(parts(p1), parts(p2))
    assert_trees_rel_close(parts(s1), parts(s2))
    assert _moved(parts(p1), parts(params)) > 1e-3


def test_add_noise_is_exactly_optax_and_anneals(key):
    """The same draws as Optax (bit for bit, eager), with variance eta / t^gamma."""
    n = 200_000
    g = {"a": jnp.zeros((n,)), "b": jnp.zeros((3, 4))}
    ours, theirs = tr.add_noise(0.5, 1.0, 7), optax.add_noise(0.5, 1.0, 7)
    s1, s2 = ours.init(g), theirs.init(g)
    for t in range(1, 4):
        u1, s1 = ours.update(g, s1)
        u2, s2 = theirs.update(g, s2)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        var = float(jnp.var(u1["a"]))
        assert abs(var - 0.5 / t) < 0.02 * 0.5 / t, (t, var)  # 200k samples: ~0.3% standard error
    np.testing.assert_array_equal(jax.random.key_data(s1.rng_key), jax.random.key_data(s2.rng_key))


def test_rprop_state_as_optax_first_steps(key):
    """Step sizes grow where the sign repeats, shrink where it flips, stay where the product is 0."""
    tx = tr.scale_by_rprop(0.1, eta_minus=0.5, eta_plus=2.0, min_step_size=0.02, max_step_size=0.3)
    p = {"w": jnp.zeros(4)}
    s = tx.init(p)
    g1 = {"w": jnp.array([1.0, -1.0, 1.0, 0.0])}
    u, s = tx.update(g1, s)
    np.testing.assert_array_equal(u["w"], np.zeros(4))  # the first update is the (zero) stored step
    np.testing.assert_allclose(s.step_sizes["w"], [0.1] * 4)
    np.testing.assert_allclose(s.prev_updates["w"], [0.1, -0.1, 0.1, 0.0])
    g2 = {"w": jnp.array([2.0, 1.0, 1.0, 1.0])}
    u, s = tx.update(g2, s)
    np.testing.assert_allclose(u["w"], [0.1, 0.0, 0.1, 0.0])
    np.testing.assert_allclose(s.step_sizes["w"], [0.2, 0.05, 0.2, 0.1])
    np.testing.assert_allclose(s.prev_updates["w"], [0.2, 0.0, 0.2, 0.1])


def test_inject_hyperparams_traced_arguments(key):
    params = random_tree(key)
    grads = _all_grads(key, params, steps=8)
    ours = optax.inject_hyperparams(opt.rprop)(learning_rate=0.02, eta_plus=1.3)
    theirs = optax.inject_hyperparams(optax.rprop)(learning_rate=0.02, eta_plus=1.3)
    p1, s1 = _run(ours, params, grads)
    p2, s2 = _run(theirs, params, grads)
    assert_trees_rel_close(p1, p2)
    assert_trees_rel_close(s1, s2)
    ours = optax.inject_hyperparams(opt.optimistic_adam_v2)(learning_rate=1e-2, alpha=0.5, beta=2.0)
    theirs = optax.inject_hyperparams(optax.optimistic_adam_v2)(learning_rate=1e-2, alpha=0.5, beta=2.0)
    p1, s1 = _run(ours, params, grads)
    p2, s2 = _run(theirs, params, grads)
    assert_trees_rel_close(p1, p2)
    assert_trees_rel_close(s1, s2)


def test_kahan_sum_keeps_bf16_params_on_the_f32_trajectory(key):
    """lr 1e-3 is under half a bf16 ulp of |p| ~ 1: plain bf16 sign_sgd does not move such weights."""
    params32 = {"w": 1.0 + jax.random.uniform(key, (256,))}
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
    start = jax.tree.map(lambda x: x.astype(jnp.float32), params16)
    # Positive gradients: the f32 run moves every weight down by 30 lr = 0.03 (about 4 bf16 ulps).
    grads = [{"w": jnp.abs(jax.random.normal(jax.random.fold_in(key, t), (256,)))} for t in range(30)]

    def run(tx, p):
        s = tx.init(p)
        step = jax.jit(tx.update_and_apply)
        dtype = p["w"].dtype
        for g in grads:
            p, s = step({"w": g["w"].astype(dtype)}, s, p)
        return p, s

    ref, _ = run(opt.sign_sgd(1e-3), start)
    plain, _ = run(opt.sign_sgd(1e-3), params16)
    comp, s = run(opt.sign_sgd(1e-3, kahan_sum=True), params16)
    assert isinstance(s[-1], ox.KahanSummationState)
    err = lambda p: float(jnp.max(jnp.abs(p["w"].astype(jnp.float32) - ref["w"])))  # noqa: E731
    ulp = 2.0**-7  # a bf16 ulp at |p| in [1, 2)
    assert err(comp) <= ulp / 2 + 1e-6
    assert err(plain) > 4 * ulp / 2  # without compensation the weights do not move at all


BAD = [
    (lambda: opt.rprop(-0.1), ValueError, "learning_rate"),
    (lambda: opt.rprop(lambda c: 0.1), TypeError, "learning_rate"),
    (lambda: opt.rprop(0.1, eta_minus=-0.5), ValueError, "eta_minus"),
    (lambda: opt.rprop(0.1, eta_plus=float("nan")), ValueError, "eta_plus"),
    (lambda: opt.rprop(0.1, min_step_size=1.0, max_step_size=0.5), ValueError, "min_step_size"),
    (lambda: opt.rprop(0.1, max_step_size=float("inf")), ValueError, "max_step_size"),
    (lambda: opt.sign_sgd(-1e-3), ValueError, "learning_rate"),
    (lambda: opt.signum(1e-3, beta=1.5), ValueError, "beta"),
    (lambda: opt.signum(1e-3, accumulator_dtype="int8"), TypeError, "accumulator_dtype"),
    (lambda: opt.noisy_sgd(0.1, eta=-1.0, key=0), ValueError, "eta"),
    (lambda: opt.noisy_sgd(0.1, gamma=float("inf"), key=0), ValueError, "gamma"),
    (lambda: opt.noisy_sgd(0.1, key="zero"), TypeError, "key"),
    (lambda: opt.noisy_sgd(0.1, key=1, seed=2), ValueError, "seed"),
    (lambda: opt.optimistic_gradient_descent(0.1, alpha=lambda c: 1.0), TypeError, "alpha"),
    (lambda: opt.optimistic_gradient_descent(0.1, beta=float("inf")), ValueError, "beta"),
    (lambda: opt.optimistic_gradient_descent(-0.1), ValueError, "learning_rate"),
    (lambda: opt.optimistic_adam(lambda c: 0.1), ValueError, "learning_rate"),
    (lambda: opt.optimistic_adam(0.1, optimism=float("nan")), ValueError, "optimism"),
    (lambda: opt.optimistic_adam(0.1, b1=1.0), ValueError, "b1"),
    (lambda: opt.optimistic_adam_v2(0.1, b2=-0.1), ValueError, "b2"),
    (lambda: opt.optimistic_adam_v2(0.1, alpha="x"), TypeError, "alpha"),
    (lambda: opt.optimistic_adam_v2(0.1, eps=-1.0), ValueError, "eps"),
    (lambda: opt.sign_sgd(0.1, kahan_sum="yes"), TypeError, "kahan_sum"),
]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_arguments_name_the_argument(i):
    make, exc, name = BAD[i]
    with pytest.raises(exc, match=name):
        make()


def test_deprecations_and_default_key_warn_as_optax():
    with pytest.warns(DeprecationWarning, match="optimistic_adam_v2"):
        opt.optimistic_adam(0.1)
    with pytest.warns(UserWarning, match="key"):
        tx = opt.noisy_sgd(0.1)
    np.testing.assert_array_equal(jax.random.key_data(tx.init({})[0].rng_key), jax.random.key_data(jax.random.key(0)))
    with pytest.warns(DeprecationWarning, match="seed"):
        tx = opt.noisy_sgd(0.1, seed=4)
    np.testing.assert_array_equal(jax.random.key_data(tx.init({})[0].rng_key), jax.random.key_data(jax.random.key(4)))


def test_wrong_state_is_a_clear_error(key):
    params = random_tree(key)
    with pytest.raises(TypeError, match="ScaleByRpropState"):
        opt.rprop(0.1).update(params, (optax.EmptyState(), optax.EmptyState()), params)
    with pytest.raises(TypeError, match="AddNoiseState"):
        tr.add_noise(0.1, 0.5, 0).update(params, optax.EmptyState(), params)


# ------------------------------------------------------------------------- lowering for CUDA / TPU

LOWERED = ["rprop", "signum", "sign_sgd", "optimistic_gradient_descent", "optimistic_adam_v2", "noisy_sgd"]


@functools.cache
def _adamw_kernels(backend):
    return _count_kernels(_lower_step(ox.adamw(1e-3), PARAMS, backend), backend)


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("name", LOWERED)
def test_step_lowers_to_as_many_kernels_as_adamw(name, backend):
    """One fused launch per dtype group, as AdamW (noisy_sgd: the noise is XLA's, the rest one launch)."""
    text = _lower_step(_build(name, OURS), PARAMS, backend)
    expected = _adamw_kernels(backend)
    assert expected == (1 if backend == "triton" else 2)
    assert _count_kernels(text, backend) == expected


@pytest.mark.parametrize("name", opt.__all__ + [n for n in tr.__all__ if n[0].islower()])
def test_signature_is_optax_s(name):
    """Optax's parameters in Optax's order, kinds and defaults; ours (kahan_sum) keyword-only after them."""
    ours = [p for p in inspect.signature(getattr(OURS, name)).parameters.values() if p.name != "kahan_sum"]
    theirs = list(inspect.signature(getattr(optax, name)).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours] == [(p.name, p.kind, p.default) for p in theirs]
