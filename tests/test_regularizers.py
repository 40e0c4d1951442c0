"""Regularizers: transformations vs float64 formulas, penalties' gradients vs the transformations,
exact zeros of the proximal L1 step, anchors checked and kept, the empirical Fisher."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import RAGGED_SHAPES, assert_trees_close, random_tree
from flax import nnx

import optax_ext as ox
from optax_ext import regularizers as R


def _f64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _trees(key, n, dtype=jnp.float32, shapes=RAGGED_SHAPES):
    return [random_tree(k, shapes, dtype) for k in jax.random.split(key, n)]


def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


# --------------------------------------------------------------------------------- add_l1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_l1_adds_sign_times_strength(key, dtype):
    g, p = _trees(key, 2, dtype)
    lam = 0.37
    tx = R.add_l1(lam)
    u, _ = jax.jit(tx.update)(g, tx.init(p), p)
    ref = jax.tree.map(lambda g, p: g + lam * np.sign(p), _f64(g), _f64(p))
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    assert_trees_close(u, ref, rtol=tol, atol=tol)
    assert all(x.dtype == dtype for x in jax.tree.leaves(u))


def test_add_l1_mask_and_zero_params(key):
    g, p = _trees(key, 2)
    p["w1"] = jnp.zeros((1,))  # sign(0) = 0: the minimum-norm subgradient
    mask = {k: k != "w2" for k in p}
    tx = R.add_l1(0.5, mask=mask)
    u, _ = tx.update(g, tx.init(p), p)
    for k in p:
        expect = np.asarray(g[k], np.float64) + (0.5 * np.sign(np.asarray(p[k], np.float64)) if mask[k] else 0.0)
        np.testing.assert_allclose(np.asarray(u[k], np.float64), expect, rtol=1e-6, err_msg=k)


def test_penalty_gradients_equal_transformation_contributions(key):
    p, a, f = _trees(key, 3)
    f = jax.tree.map(jnp.abs, f)
    lam = 0.23
    cases = [
        (R.add_l1(lam), lambda q: R.l1_penalty(q, lam)),
        (ox.add_l2(lam), lambda q: R.l2_penalty(q, lam)),
        (R.l2_sp(lam, a), lambda q: R.l2_sp_penalty(q, lam, a)),
        (R.ewc(f, a, lam), lambda q: R.ewc_penalty(q, f, a, lam)),
    ]
    for tx, penalty in cases:
        contribution, _ = tx.update(_zeros(p), tx.init(p), p)
        assert_trees_close(jax.grad(penalty)(p), contribution, rtol=2e-6, atol=1e-7)


def test_penalty_values_against_float64(key):
    p, a, f = _f64(_trees(key, 3))
    f = jax.tree.map(np.abs, f)
    lam = 0.7
    leaves = lambda t: jax.tree.leaves(t)
    l1 = lam * sum(np.abs(x).sum() for x in leaves(p))
    l2 = 0.5 * lam * sum((x**2).sum() for x in leaves(p))
    sp = 0.5 * lam * sum(((x - y) ** 2).sum() for x, y in zip(leaves(p), leaves(a)))
    ew = 0.5 * lam * sum((w * (x - y) ** 2).sum() for x, y, w in zip(leaves(p), leaves(a), leaves(f)))
    p32, a32, f32 = (jax.tree.map(jnp.float32, t) for t in (p, a, f))
    np.testing.assert_allclose(R.l1_penalty(p32, lam), l1, rtol=1e-5)
    np.testing.assert_allclose(R.l2_penalty(p32, lam), l2, rtol=1e-5)
    np.testing.assert_allclose(R.l2_sp_penalty(p32, lam, a32), sp, rtol=1e-5)
    np.testing.assert_allclose(R.ewc_penalty(p32, f32, a32, lam), ew, rtol=1e-5)
    # mask drops leaves
    mask = {k: k == "w3" for k in p}
    np.testing.assert_allclose(R.l2_penalty(p32, lam, mask=mask), 0.5 * lam * (p["w3"] ** 2).sum(), rtol=1e-5)


# --------------------------------------------------------------------------------- l1_shrinkage


def _prox64(x, t):
    return np.sign(x) * np.maximum(np.abs(x) - t, 0.0)


@pytest.mark.parametrize("shapes", [RAGGED_SHAPES, [(513,), (2, 3)]])
def test_l1_shrinkage_is_the_prox_of_the_applied_step(key, shapes):
    g, p = _trees(key, 2, shapes=shapes)
    lr, lam = 0.1, 3.0  # threshold 0.3: plenty of |p - lr g| below it
    tx = ox.chain(ox.sgd(lr), R.l1_shrinkage(lam, lr))
    state = tx.init(p)
    u, _ = jax.jit(tx.update)(g, state, p)
    new = optax.apply_updates(p, u)
    ref = jax.tree.map(lambda p, g: _prox64(p - lr * g, lr * lam), _f64(p), _f64(g))
    assert_trees_close(new, ref, rtol=1e-6, atol=1e-6)
    fused, _ = jax.jit(tx.update_and_apply)(g, state, p)
    zeros_seen = 0
    for n_a, n_f, r in zip(jax.tree.leaves(new), jax.tree.leaves(fused), jax.tree.leaves(ref)):
        # exact zeros, both through optax.apply_updates and through the fused apply
        assert np.all(np.asarray(n_a)[r == 0] == 0.0)
        assert np.all(np.asarray(n_f)[r == 0] == 0.0)
        assert np.all(np.asarray(n_a)[r != 0] != 0.0)
        zeros_seen += int((r == 0).sum())
    assert zeros_seen > 0


def test_l1_shrinkage_exact_zeros_bf16(key):
    g, p = _trees(key, 2, jnp.bfloat16)
    tx = ox.chain(ox.sgd(0.5), R.l1_shrinkage(1.0, 0.5))
    state = tx.init(p)
    u, _ = tx.update(g, state, p)
    new = optax.apply_updates(p, u)
    fused, _ = tx.update_and_apply(g, state, p)
    for n_a, n_f, p_, g_ in zip(jax.tree.leaves(new), jax.tree.leaves(fused), jax.tree.leaves(p), jax.tree.leaves(g)):
        x = np.asarray(p_, np.float64) - 0.5 * np.asarray(g_, np.float64)
        small = np.abs(x) < 0.45  # clear of the threshold 0.5 by more than bf16 rounding
        assert n_a.dtype == jnp.bfloat16
        assert np.all(np.asarray(n_a, np.float64)[small] == 0.0)
        assert np.all(np.asarray(n_f, np.float64)[small] == 0.0)


def test_ista_solves_orthonormal_lasso(key):
    # min_w 1/2 ||X w - y||^2 + lam ||w||_1 with X^T X = I has w* = soft_threshold(X^T y, lam).
    k1, k2 = jax.random.split(key)
    d = 37
    q, _ = np.linalg.qr(np.asarray(jax.random.normal(k1, (60, d)), np.float64))
    y = np.asarray(jax.random.normal(k2, (60,)), np.float64)
    lam, lr = 0.4, 0.5
    w_star = _prox64(q.T @ y, lam)
    X, Y = jnp.float32(q), jnp.float32(y)
    loss = lambda w: 0.5 * jnp.sum((X @ w - Y) ** 2)
    tx = ox.chain(ox.sgd(lr), R.l1_shrinkage(lam, lr))
    w = jnp.zeros((d,))
    state = tx.init(w)

    @jax.jit
    def step(w, state):
        return tx.update_and_apply(jax.grad(loss)(w), state, w)

    for _ in range(60):
        w, state = step(w, state)
    np.testing.assert_allclose(np.asarray(w), w_star, atol=1e-5)
    assert np.array_equal(np.asarray(w) == 0.0, w_star == 0.0)
    assert (w_star == 0.0).sum() > 0


def test_l1_shrinkage_schedule_mask_and_passthrough(key):
    g, p = _trees(key, 2)
    sched = lambda count: 0.1 * (count + 1)
    mask = {k: k != "w3" for k in p}
    tx = R.l1_shrinkage(2.0, sched, mask=mask)
    state = tx.init(p)
    assert isinstance(state, optax.ScaleByScheduleState)
    for step in range(3):
        u, state = tx.update(g, state, p)
        t = 0.1 * (step + 1) * 2.0
        for k in p:
            new = np.asarray(p[k], np.float64) + np.asarray(u[k], np.float64)
            x = np.asarray(p[k], np.float64) + np.asarray(g[k], np.float64)
            ref = _prox64(x, t) if mask[k] else x
            np.testing.assert_allclose(new, ref, rtol=1e-6, atol=1e-6, err_msg=f"{k} step {step}")
        assert int(state.count) == step + 1
    np.testing.assert_array_equal(np.asarray(u["w3"]), np.asarray(g["w3"]))  # masked: untouched


# --------------------------------------------------------------------------------- l2_sp / ewc


def test_l2_sp_coupled_and_decoupled(key):
    g, p, a = _trees(key, 3)
    lam, lr = 0.3, 1e-2
    # coupled: l2_sp first == Adam fed with g + lam (p - a)
    coupled = ox.chain(R.l2_sp(lam, a), ox.scale_by_adam(), ox.scale_by_learning_rate(lr))
    ref_tx = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(lr))
    g_reg = jax.tree.map(lambda g, p, a: g + lam * (p - a), g, p, a)
    u, state = coupled.update(g, coupled.init(p), p)
    u_ref, _ = ref_tx.update(g_reg, ref_tx.init(p), p)
    assert_trees_close(u, u_ref, rtol=1e-5, atol=1e-8)
    # decoupled: after Adam, before the learning rate
    dec = ox.chain(ox.scale_by_adam(), R.l2_sp(lam, a), ox.scale_by_learning_rate(lr))
    u, _ = jax.jit(dec.update)(g, dec.init(p), p)
    adam_u, _ = optax.scale_by_adam().update(g, optax.scale_by_adam().init(p), p)
    ref = jax.tree.map(lambda m, p, a: -lr * (m + lam * (p - a)), _f64(adam_u), _f64(p), _f64(a))
    assert_trees_close(u, ref, rtol=1e-5, atol=1e-8)


def test_anchor_is_copied_and_never_changes(key):
    g, p, a = _trees(key, 3)
    tx = ox.chain(R.l2_sp(0.1, a), ox.adam(1e-2))
    state = tx.init(p)
    step = jax.jit(tx.update_and_apply)
    for _ in range(5):
        p, state = step(g, state, p)
    for x, y in zip(jax.tree.leaves(state[0].anchor), jax.tree.leaves(a)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_ewc_update_against_float64(key):
    g, p, a, f = _trees(key, 4)
    f = jax.tree.map(jnp.square, f)
    lam = 5.0
    tx = R.ewc(f, a, lam)
    state = tx.init(p)
    assert isinstance(state, R.EWCState)
    u, new_state = jax.jit(tx.update)(g, state, p)
    ref = jax.tree.map(lambda g, p, a, f: g + lam * f * (p - a), _f64(g), _f64(p), _f64(a), _f64(f))
    assert_trees_close(u, ref, rtol=1e-5, atol=1e-6)
    assert_trees_close(new_state.fisher, f)


def test_anchor_mismatch_names_every_path(key):
    p, a = _trees(key, 2)
    bad = dict(a)
    bad["w3"] = jnp.zeros((999,))
    del bad["w4"]
    with pytest.raises(ValueError) as e:
        R.l2_sp(0.1, bad).init(p)
    msg = str(e.value)
    assert "w3" in msg and "(1000,)" in msg and "(999,)" in msg
    assert "missing" in msg and "w4" in msg
    with pytest.raises(ValueError, match="fisher"):
        R.ewc(bad, a, 1.0).init(p)
    with pytest.raises(ValueError, match="w3"):
        R.l2_sp_penalty(p, 0.1, bad)


def test_l2_sp_on_nnx_state_with_pure_dict_anchor():
    model = nnx.Sequential(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), nnx.Linear(5, 2, rngs=nnx.Rngs(1)))
    pre = nnx.Sequential(nnx.Linear(3, 5, rngs=nnx.Rngs(2)), nnx.Linear(5, 2, rngs=nnx.Rngs(3)))
    anchor = nnx.to_pure_dict(nnx.state(pre, nnx.Param))
    opt = nnx.Optimizer(model, ox.chain(R.l2_sp(1.0, anchor), ox.sgd(0.5)), wrt=nnx.Param)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    zero_grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    opt.update(model, zero_grads)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # theta - 0.5 (theta - theta_pre): halfway to the anchor
    ref = jax.tree.map(lambda t, a: 0.5 * (np.float64(t) + np.float64(a)), _f64(before), _f64(anchor))
    assert_trees_close(after, ref, rtol=1e-6, atol=1e-7)


def test_inside_optax_partition_and_inject_hyperparams(key):
    g, p, a = _trees(key, 3)
    labels = {k: ("reg" if k in ("w2", "w4") else "plain") for k in p}
    tx = optax.partition({"reg": ox.chain(R.l2_sp(0.5, a), ox.sgd(0.1)), "plain": ox.sgd(0.1)}, labels)
    u, _ = tx.update(g, tx.init(p), p)
    for k in p:
        extra = 0.5 * (np.float64(p[k]) - np.float64(a[k])) if labels[k] == "reg" else 0.0
        np.testing.assert_allclose(np.float64(u[k]), -0.1 * (np.float64(g[k]) + extra), rtol=1e-5, atol=1e-7)
    inj = optax.inject_hyperparams(R.add_l1)(strength=0.2)
    u, state = jax.jit(inj.update)(g, inj.init(p), p)
    assert_trees_close(u, jax.tree.map(lambda g, p: g + 0.2 * np.sign(p), _f64(g), _f64(p)), rtol=1e-6, atol=1e-7)


def test_bad_arguments():
    with pytest.raises(ValueError, match="strength"):
        R.add_l1(-1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        R.l1_shrinkage(0.1, -1.0)
    with pytest.raises(ValueError, match="strength"):
        R.ewc({}, {}, float("nan"))
    with pytest.raises(ValueError, match="empty"):
        R.fisher_diagonal(lambda p, b: 0.0, {"w": jnp.ones(2)}, [])
    with pytest.raises(TypeError, match="loss_fn"):
        R.fisher_diagonal(3, {"w": jnp.ones(2)}, [1])


# --------------------------------------------------------------------------------- Fisher


@pytest.mark.parametrize("per_example", [False, True])
def test_fisher_diagonal_linear_regression(key, per_example):
    # loss(w, b; X, y) = 1/2 mean((X w + b - y)^2): grad_w = X^T r / n, grad_b = mean(r), r = X w + b - y.
    kw, *kb = jax.random.split(key, 5)
    d = 7
    params = {"w": jax.random.normal(kw, (d,)), "b": jnp.float32(0.3)}
    batches = []
    for k in kb:
        k1, k2 = jax.random.split(k)
        batches.append((jax.random.normal(k1, (9, d)), jax.random.normal(k2, (9,))))

    def loss(p, batch):
        x, y = batch
        return 0.5 * jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    F = R.fisher_diagonal(loss, params, batches, per_example=per_example)
    w, b = np.float64(params["w"]), np.float64(params["b"])
    gw, gb = [], []
    for x, y in batches:
        x, y = np.float64(x), np.float64(y)
        r = x @ w + b - y
        if per_example:
            gw.extend(list(x * r[:, None]))
            gb.extend(list(r))
        else:
            gw.append(x.T @ r / len(r))
            gb.append(r.mean())
    ref = {"w": np.mean(np.square(gw), axis=0), "b": np.mean(np.square(gb))}
    assert_trees_close(F, ref, rtol=2e-5)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(F))


# --------------------------------------------------------------------------------- fusion


def test_regularizers_fuse_with_the_optimizer(monkeypatch, key):
    from optax_ext.kernels import elementwise

    g, p, a, f = _trees(key, 4)
    calls = []
    real = elementwise.run_fused

    def counting(body, jobs, shared, **kw):
        calls.append([len(job.inputs) for job in jobs])
        return real(body, jobs, shared, **kw)

    monkeypatch.setattr(elementwise, "run_fused", counting)
    tx = ox.chain(
        R.ewc(f, a, 0.1),
        R.add_l1(1e-3),
        ox.scale_by_adam(),
        R.l2_sp(1e-2, a),
        ox.scale_by_learning_rate(1e-3),
        R.l1_shrinkage(1e-2, 1e-3),
    )
    state = tx.init(p)
    calls.clear()
    with ox.kernels.use_backend("xla"):
        fused, _ = tx.update_and_apply(g, state, p)
    # one pass over every leaf, each reading g, p, fisher, anchor (ewc), mu, nu, anchor (l2_sp)
    assert calls == [[7] * len(RAGGED_SHAPES)]
    with ox.kernels.use_backend("interpret"):  # the same composed rule as one Pallas kernel
        fused_pallas, _ = tx.update_and_apply(g, state, p)
    assert_trees_close(fused_pallas, fused, rtol=1e-6, atol=1e-7)
    # and the same result as running the transformations one by one through optax.chain
    unfused = optax.chain(
        *[
            ox.chain(t)
            for t in (
                R.ewc(f, a, 0.1),
                R.add_l1(1e-3),
                ox.scale_by_adam(),
                R.l2_sp(1e-2, a),
                ox.scale_by_learning_rate(1e-3),
                R.l1_shrinkage(1e-2, 1e-3),
            )
        ]
    )
    u, _ = unfused.update(g, unfused.init(p), p)
    assert_trees_close(fused, optax.apply_updates(p, u), rtol=1e-6, atol=1e-7)


def test_anchors_are_copies_that_survive_a_donated_step(key):
    # The anchor is taken from the params being trained: a donated step overwrites the params'
    # buffers in place, so the state must hold its own copy ("donate the same buffer twice" else).
    g, p = _trees(key, 2)
    tx = ox.chain(R.l2_sp(0.1, p), ox.sgd(0.1))
    state = tx.init(p)
    anchor = jax.tree.map(np.asarray, p)
    step = jax.jit(tx.update_and_apply, donate_argnums=(1, 2))
    p, state = step(g, state, p)
    p, state = step(g, state, p)
    assert_trees_close(state[0].anchor, anchor, rtol=0, atol=0)
