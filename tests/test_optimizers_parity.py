"""Every optimizer and transformation Optax also has: same states, same numbers over 50+ steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_rel_close, random_tree

import optax_ext as ox

STEPS = 60
sched = optax.cosine_decay_schedule(1e-2, 40, alpha=0.1)

# name -> (ours, optax's); both built from the same arguments.
PAIRS = {
    "sgd": lambda m: m.sgd(0.1),
    "sgd_momentum": lambda m: m.sgd(0.05, momentum=0.9),
    "sgd_nesterov": lambda m: m.sgd(0.05, momentum=0.9, nesterov=True),
    "rmsprop": lambda m: m.rmsprop(1e-2),
    "rmsprop_centered_momentum": lambda m: m.rmsprop(1e-2, decay=0.95, centered=True, momentum=0.9),
    "rmsprop_eps_outside_bias": lambda m: m.rmsprop(1e-2, eps_in_sqrt=False, bias_correction=True),
    "adam": lambda m: m.adam(1e-2),
    "adam_schedule": lambda m: m.adam(sched, b1=0.8, b2=0.99, eps_root=1e-8),
    "adamw": lambda m: m.adamw(1e-2, weight_decay=0.05),
    "adamw_mask": lambda m: m.adamw(1e-2, weight_decay=0.05, mask=lambda p: {k: v.ndim > 1 for k, v in p.items()}),
    "adamw_wd_schedule": lambda m: m.adamw(sched, weight_decay=optax.linear_schedule(0.1, 0.0, 30)),
    "nadam": lambda m: m.nadam(1e-2),
    "adabelief": lambda m: m.adabelief(1e-2),
    "yogi": lambda m: m.yogi(1e-2),
    "lion": lambda m: m.lion(1e-3, weight_decay=0.01),
    "amsgrad": lambda m: m.amsgrad(1e-2),
    "amsgrad_paper": lambda m: m.amsgrad(1e-2, bias_correction_mu=False, bias_correction_nu=False),
    "lars": lambda m: m.lars(0.5, weight_decay=1e-3, trust_coefficient=0.01),
    "lamb": lambda m: m.lamb(1e-2, weight_decay=0.01),
    "adafactor": lambda m: m.adafactor(1e-2, min_dim_size_to_factor=4),
    "adafactor_momentum_wd": lambda m: m.adafactor(
        1e-2, min_dim_size_to_factor=4, momentum=0.9, weight_decay_rate=1e-3
    ),
    "clip_adamw_schedule": lambda m: m.chain(m.clip_by_global_norm(1.0), m.adamw(sched, weight_decay=0.01)),
    "clip_value_momentum": lambda m: m.chain(m.clip(0.5), m.sgd(0.1, momentum=0.9)),
}

TRANSFORM_PAIRS = {
    "scale_by_adam": lambda m: m.scale_by_adam(b1=0.85, b2=0.98),
    "scale_by_rms": lambda m: m.scale_by_rms(decay=0.8, initial_scale=0.1),
    "scale_by_trust_ratio": lambda m: m.scale_by_trust_ratio(min_norm=1e-3, trust_coefficient=0.5, eps=1e-6),
    "scale_by_lion": lambda m: m.scale_by_lion(b1=0.8, b2=0.95),
    "scale_by_belief": lambda m: m.scale_by_belief(),
    "scale_by_yogi": lambda m: m.scale_by_yogi(),
    "scale_by_amsgrad": lambda m: m.scale_by_amsgrad(),
    "scale_by_factored_rms": lambda m: m.scale_by_factored_rms(min_dim_size_to_factor=3),
    "clip_by_block_rms": lambda m: m.clip_by_block_rms(0.5),
    # Alone it would grow params geometrically (u = g * rms(p)); with a step size it is a usable rule.
    "scale_by_param_block_rms": lambda m: m.chain(m.scale_by_param_block_rms(), m.scale(-1e-2)),
    "ema": lambda m: m.ema(0.9, debias=True),
}

_OPTAX_NAMES = {"scale_by_momentum": "trace"}


class _OptaxFacade:
    """Lets one lambda build both versions: attribute lookups go to optax."""

    def __getattr__(self, name):
        return getattr(optax, _OPTAX_NAMES.get(name, name))


def _grads(key, params, t):
    k = jax.random.fold_in(key, t)
    # Gradients of varying scale, so clipping triggers on some steps and not on others.
    scale = 0.5 + 2.0 * (t % 3)
    return random_tree(k, [p.shape for p in params.values()], scale=scale)


def _run(tx, params, key, steps=STEPS):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(steps):
        g = _grads(key, params, t)
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", sorted(PAIRS) + sorted(TRANSFORM_PAIRS))
def test_matches_optax(name, key):
    build = PAIRS.get(name) or TRANSFORM_PAIRS[name]
    params = random_tree(key)
    ours, theirs = build(ox), build(_OptaxFacade())
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    # Same state layout: same tree structure, same NamedTuple types, same leaves.
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
    p_ours, st_ours = _run(ours, params, key)
    p_theirs, st_theirs = _run(theirs, params, key)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((p_theirs, st_theirs))), name
    # Relative error <= 1e-6 (normwise per leaf) on parameters and every state array.
    assert_trees_rel_close(p_ours, p_theirs, rel=1e-6, err_msg=name)
    assert_trees_rel_close(st_ours, st_theirs, rel=1e-6, err_msg=name)
    # The run actually moved the parameters (a no-op optimizer would match a no-op).
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(params)))
    assert moved > 1e-4


@pytest.mark.parametrize("name", ["adamw", "lamb", "clip_adamw_schedule", "lars", "adafactor"])
def test_update_and_apply_matches_update_then_apply(name, key):
    tx = PAIRS[name](ox)
    params = random_tree(key)
    s1 = s2 = tx.init(params)
    p1 = p2 = params
    step = jax.jit(tx.update_and_apply)
    for t in range(5):
        g = _grads(key, params, t)
        p1, s1 = step(g, s1, p1)
        u, s2 = tx.update(g, s2, p2)
        p2 = optax.apply_updates(p2, u)
    assert_trees_rel_close(p1, p2, rel=1e-6)
    assert_trees_rel_close(s1, s2, rel=1e-6)


def test_state_fields_readable_with_optax_tree_get(key):
    params = random_tree(key)
    state = ox.adamw(1e-3).init(params)
    mu = optax.tree.get(state, "mu")
    assert jax.tree.structure(mu) == jax.tree.structure(params)
    # A state made by optax restores into ours and vice versa: run ours from optax's state.
    o_state = optax.adamw(1e-3).init(params)
    g = random_tree(jax.random.fold_in(key, 1))
    u_ours, _ = ox.adamw(1e-3).update(g, o_state, params)
    u_theirs, _ = optax.adamw(1e-3).update(g, o_state, params)
    assert_trees_rel_close(u_ours, u_theirs)
