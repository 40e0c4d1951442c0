"""Schedules plug into our optimizers' hyperparameters and change the applied update accordingly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import assert_trees_close, random_tree

import optax_ext as ox


def test_learning_rate_schedule_scales_each_step(key):
    params = random_tree(key)
    sched = ox.linear_warmup(ox.cosine_decay(1e-2, 20), 5)
    scheduled, unit = ox.adamw(sched, weight_decay=0.1), ox.adamw(1.0, weight_decay=0.1)
    s1, s2 = scheduled.init(params), unit.init(params)
    for t in range(12):
        g = random_tree(jax.random.fold_in(key, t))
        u1, s1 = scheduled.update(g, s1, params)
        u2, s2 = unit.update(g, s2, params)
        # Adam's direction is independent of the learning rate: the update is lr(t) times it.
        expected = jax.tree.map(lambda u, t=t: float(sched(t)) * u, u2)
        assert_trees_close(u1, expected, rtol=2e-6, atol=1e-12)
    assert float(sched(0)) == 0.0  # warm-up from zero: the first update is exactly zero
    u0, _ = scheduled.update(random_tree(key), scheduled.init(params), params)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(u0))


def test_momentum_schedule_as_b1(key):
    params = random_tree(key)
    b1 = ox.one_cycle_momentum(20)
    ours = ox.adam(1e-2, b1=b1)
    # b2 stays a Python float on both sides (static), only b1 is injected and traced.
    ref = optax.inject_hyperparams(optax.adam, static_args=("b2",))(learning_rate=1e-2, b1=0.9)
    s1, s2 = ours.init(params), ref.init(params)
    step1, step2 = jax.jit(ours.update), jax.jit(ref.update)
    for t in range(8):
        g = random_tree(jax.random.fold_in(key, t))
        s2.hyperparams["b1"] = jnp.asarray(b1(t))
        u1, s1 = step1(g, s1, params)
        u2, s2 = step2(g, s2, params)
        assert_trees_close(u1, u2, rtol=1e-6, atol=1e-9)
    assert not np.isclose(float(b1(0)), float(b1(7)))


def test_weight_decay_schedule(key):
    params = random_tree(key)
    wd = ox.step_decay(0.5, 3, 0.1)
    tx = ox.chain(ox.decoupled_weight_decay(wd), ox.scale_by_learning_rate(1.0))
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    for t in range(7):
        u, state = tx.update(zero, state, params)
        assert_trees_close(u, jax.tree.map(lambda p, t=t: -float(wd(t)) * p, params), rtol=1e-6)
