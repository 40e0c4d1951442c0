"""apply_if_finite: Optax's semantics, fused; skipped steps leave everything bit-identical."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_rel_close, random_tree

import optax_ext as ox

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lowering_report import analyze_stablehlo  # noqa: E402  (the report's StableHLO reader)

# Steps whose gradients hold a NaN or an infinity, and where: several in a row (2, 3, 4) exceed
# max_consecutive_errors=2 on the third, which Optax then applies anyway.
BAD = {2: ("w1", jnp.nan), 3: ("w3", jnp.inf), 4: ("w4", -jnp.inf), 7: ("w2", jnp.nan)}
STEPS = 10

OPTIMIZERS = {
    "adamw_schedule": lambda m: m.adamw(optax.linear_schedule(1e-2, 0.0, STEPS), weight_decay=0.1),
    "clip_adamw": lambda m: m.chain(m.clip_by_global_norm(1.0), m.adamw(1e-2)),
    "lamb": lambda m: m.lamb(1e-2, weight_decay=0.01),
    "sgd_momentum": lambda m: m.sgd(0.1, momentum=0.9),
    "with_optax_inside": lambda m: m.chain(
        m.scale_by_adam(), optax.scale_by_schedule(lambda t: 1.0 / (t + 1)), m.scale(-0.1)
    ),
}


def _grads(params, i):
    g = jax.tree.map(lambda p: jnp.cos(p * (i + 1)), params)
    if i in BAD:
        name, value = BAD[i]
        g[name] = g[name].reshape(-1).at[0].set(value).reshape(g[name].shape)
    return g


def _params(key):
    p = random_tree(key)
    p["w2"] = p["w2"].at[0].set(-0.0)  # -0.0 + 0.0 = +0.0: a skipped step must not touch it
    return p


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


# Every optimizer on XLA; the kernels (interpreter) on the two that exercise a shared reduction and
# an Optax transformation inside the gate.
CASES = [(n, e, "xla", a) for n in sorted(OPTIMIZERS) for e in (0, 2) for a in (False, True)] + [
    (n, 2, "interpret", a) for n in ("clip_adamw", "with_optax_inside") for a in (False, True)
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, max_errors, backend, apply", CASES, ids=[f"{n}-{e}-{b}-{'apply' if a else 'update'}" for n, e, b, a in CASES]
)
def test_matches_optax_apply_if_finite(key, name, max_errors, backend, apply):
    params = _params(key)
    ours = ox.apply_if_finite(OPTIMIZERS[name](ox), max_errors)
    ref = optax.apply_if_finite(OPTIMIZERS[name](optax), max_errors)
    p_ours, s_ours = params, ours.init(params)
    p_ref, s_ref = params, ref.init(params)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_ref)
    with ox.kernels.use_backend(backend):
        step = jax.jit(ours.update_and_apply if apply else ours.update)
        for i in range(STEPS):
            g = _grads(params, i)
            before = (p_ours, s_ours)
            if apply:
                p_ours, s_ours = step(g, s_ours, p_ours)
            else:
                u, s_ours = step(g, s_ours, p_ours)
                p_ours = optax.apply_updates(p_ours, u)
            u, s_ref = ref.update(g, s_ref, p_ref)
            p_ref = optax.apply_updates(p_ref, u)
            skipped = not bool(s_ref.last_finite) and int(s_ref.notfinite_count) <= max_errors
            if skipped and apply:
                # Params, moments and every step count bit-identical (schedules do not advance).
                assert _bits(p_ours) == _bits(before[0]), f"step {i}: params moved on a skipped step"
            if skipped:
                assert _bits(s_ours.inner_state) == _bits(before[1].inner_state), f"step {i}: state moved"
            for a, b in zip(jax.tree.leaves((p_ours, s_ours)), jax.tree.leaves((p_ref, s_ref))):
                assert a.dtype == b.dtype
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7, err_msg=f"step {i}")


def test_skipped_step_returns_zero_updates_and_counts(key):
    params = _params(key)
    tx = ox.apply_if_finite(ox.adam(1e-2), 3)
    state = tx.init(params)
    g = _grads(params, 2)  # has a NaN
    u, state = tx.update(g, state, params)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
    assert (int(state.notfinite_count), bool(state.last_finite), int(state.total_notfinite)) == (1, False, 1)
    assert int(state.inner_state[0].count) == 0
    u, state = tx.update(_grads(params, 0), state, params)
    assert (int(state.notfinite_count), bool(state.last_finite), int(state.total_notfinite)) == (0, True, 1)
    assert int(state.inner_state[0].count) == 1


def test_large_finite_gradients_are_finite(key):
    # 1e30 squared overflows f32: the finiteness test counts non-finite elements, not the norm.
    params = {"w": jnp.ones(4)}
    tx = ox.apply_if_finite(ox.sgd(1.0), 0)
    for backend in ("xla", "interpret"):
        with ox.kernels.use_backend(backend):
            _, state = tx.update({"w": jnp.full(4, 1e30)}, tx.init(params), params)
        assert bool(state.last_finite)


def _lowered_stats(tx, params):
    """Triton launches and bytes through the kernels of one donated update_and_apply step."""
    state = jax.eval_shape(tx.init, params)
    step = lambda p, s, g: tx.update_and_apply(g, s, p)
    text = ox.kernels.lower_for(step, params, state, params, platform="cuda", donate_argnums=(0, 1)).as_text()
    stats = analyze_stablehlo(text)
    return stats["triton_kernels"], stats["kernel_bytes"]


def test_the_finiteness_test_shares_the_clipping_reduction_or_costs_one_read_of_the_gradients():
    """What the gate costs (README): after clip_by_global_norm nothing (the finiteness count rides on
    the global norm's reduction, the select on the fused pass); without clipping one reduction launch
    that reads the gradients once more (4 B/param for f32 gradients, 2 for bf16)."""
    params = {"a": jax.ShapeDtypeStruct((1000, 64), jnp.float32), "b": jax.ShapeDtypeStruct((129,), jnp.bfloat16)}
    grad_bytes = 1000 * 64 * 4 + 129 * 2
    clip_adamw = lambda: ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3))  # noqa: E731
    plain, gated = _lowered_stats(clip_adamw(), params), _lowered_stats(ox.apply_if_finite(clip_adamw(), 3), params)
    assert plain[0] == gated[0] == 2
    assert gated[1] - plain[1] < 64  # a few scalars: the count of non-finite elements per block
    plain, gated = _lowered_stats(ox.adamw(1e-3), params), _lowered_stats(ox.apply_if_finite(ox.adamw(1e-3), 3), params)
    assert (plain[0], gated[0]) == (1, 2)
    assert grad_bytes <= gated[1] - plain[1] < grad_bytes + 4096  # the gradients once, plus per-block partials


def test_nested_in_a_chain(key):
    params = _params(key)
    ours = ox.chain(ox.apply_if_finite(ox.adam(1e-2), 1), ox.scale(0.5))
    ref = optax.chain(optax.apply_if_finite(optax.adam(1e-2), 1), optax.scale(0.5))
    s_o, s_r = ours.init(params), ref.init(params)
    for i in range(6):
        g = _grads(params, i)
        u_o, s_o = ours.update(g, s_o, params)
        u_r, s_r = ref.update(g, s_r, params)
        for a, b in zip(jax.tree.leaves((u_o, s_o)), jax.tree.leaves((u_r, s_r))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)


def test_a_skipped_step_keeps_the_step_count_with_none_update_leaves(key):
    # Updates with a None leaf (no update for that param) run the fused pass on the other leaves;
    # a skipped step must still keep every state field, step counts included, and the None leaf's moments.
    params = {"a": jax.random.normal(key, (5,)), "frozen": jnp.ones((3,))}
    tx = ox.apply_if_finite(ox.adam(1e-2), 3)
    state = tx.init(params)
    _, state = tx.update({"a": jnp.ones((5,)), "frozen": None}, state, params)
    bad = {"a": jnp.ones((5,)).at[2].set(jnp.nan), "frozen": None}
    updates, skipped = tx.update(bad, state, params)
    assert int(skipped.inner_state[0].count) == int(state.inner_state[0].count) == 1
    assert int(skipped.notfinite_count) == 1
    assert_trees_rel_close(skipped.inner_state, state.inner_state, rel=0.0)
    assert float(jnp.abs(updates["a"]).max()) == 0.0 and updates["frozen"] is None
