"""The fusion core: runs, composition with Optax, pytrees, jit/vmap, dtypes, sharding."""

import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close, assert_trees_rel_close, random_tree

import optax_ext as ox
from optax_ext.kernels import elementwise


def _triton_kernels(tx, params):
    """Kernel launches of one `update` step, counted in its lowered CUDA module (no GPU needed)."""
    state = jax.eval_shape(tx.init, params)
    avals = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    text = ox.kernels.lower_for(lambda g, s, p: tx.update(g, s, p), avals, state, avals, platform="cuda").as_text()
    return text.count("__gpu$xla.gpu.triton")


def test_adjacent_rules_fuse_into_one_pass(key):
    params = random_tree(key)
    tx = ox.chain(
        ox.clip_by_global_norm(1.0), ox.scale_by_adam(), ox.decoupled_weight_decay(0.1), ox.scale_by_learning_rate(1e-3)
    )
    # One reduction launch (the global norm) and one fused launch for every leaf.
    assert _triton_kernels(tx, params) == 2
    assert _triton_kernels(ox.chain(ox.scale_by_adam(), ox.scale_by_learning_rate(1e-3)), params) == 1


def test_optax_transformation_breaks_the_run(key):
    params = random_tree(key)
    tx = ox.chain(ox.scale_by_adam(), optax.scale(0.5), ox.scale_by_learning_rate(1e-3))
    assert _triton_kernels(tx, params) == 2  # Optax's scale runs between two fused launches (in XLA)


def test_rule_that_reads_updates_starts_a_new_run(key):
    params = random_tree(key)
    # lamb: adam + weight decay | per-leaf norms of u and p | trust ratio + learning rate
    assert _triton_kernels(ox.lamb(1e-3), params) == 3


def test_mixed_chain_equals_optax_chain(key):
    params = random_tree(key)
    ours = ox.chain(
        ox.clip_by_global_norm(0.7), optax.scale_by_adam(), ox.add_decayed_weights(0.01), optax.scale(-1e-2)
    )
    theirs = optax.chain(
        optax.clip_by_global_norm(0.7), optax.scale_by_adam(), optax.add_decayed_weights(0.01), optax.scale(-1e-2)
    )
    s1, s2 = ours.init(params), theirs.init(params)
    p1 = p2 = params
    for t in range(10):
        g = random_tree(jax.random.fold_in(key, t), scale=3.0)
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = theirs.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    assert_trees_rel_close(p1, p2)
    # The moments are EMAs of clipped gradients, each element bounded by max_norm = 0.7: their
    # error is relative to that scale (a one-element leaf whose EMA cancels to ~1e-4 cannot have
    # a 1e-6 error relative to itself when the clip factor differs by one ulp).
    assert_trees_close(s1, s2, rtol=1e-6, atol=1e-6 * 0.7)


def test_nested_chains_flatten_and_keep_nested_state(key):
    params = random_tree(key)
    inner = ox.chain(ox.scale_by_adam(), ox.add_decayed_weights(0.1))
    tx = ox.chain(ox.clip_by_global_norm(1.0), inner, ox.scale_by_learning_rate(0.1))
    ref = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(0.1)),
        optax.scale_by_learning_rate(0.1),
    )
    s1, s2 = tx.init(params), ref.init(params)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    g = random_tree(jax.random.fold_in(key, 7))
    u1, s1 = tx.update(g, s1, params)
    u2, s2 = ref.update(g, s2, params)
    assert_trees_rel_close(u1, u2)
    assert_trees_rel_close(s1, s2)


def test_ours_inside_optax_chain_and_masked(key):
    params = random_tree(key)
    mask = {k: (i % 2 == 0) for i, k in enumerate(params)}
    ours = optax.chain(optax.masked(ox.scale_by_adam(), mask), ox.scale_by_learning_rate(0.1))
    theirs = optax.chain(optax.masked(optax.scale_by_adam(), mask), optax.scale_by_learning_rate(0.1))
    s1, s2 = ours.init(params), theirs.init(params)
    for t in range(3):
        g = random_tree(jax.random.fold_in(key, t))
        u1, s1 = jax.jit(ours.update)(g, s1, params)
        u2, s2 = jax.jit(theirs.update)(g, s2, params)
    assert_trees_rel_close(u1, u2)
    assert_trees_rel_close(s1, s2)


def test_inject_hyperparams_traces_hyperparameters(key):
    params = random_tree(key)
    ours = optax.inject_hyperparams(ox.adamw)(learning_rate=1e-2, b1=0.9, weight_decay=0.1)
    theirs = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, b1=0.9, weight_decay=0.1)
    s1, s2 = ours.init(params), theirs.init(params)
    for t in range(5):
        g = random_tree(jax.random.fold_in(key, t))
        # Change a hyperparameter between steps without recompiling.
        s1.hyperparams["b1"] = s2.hyperparams["b1"] = jnp.asarray(0.9 - 0.1 * t)
        u1, s1 = jax.jit(ours.update)(g, s1, params)
        u2, s2 = jax.jit(theirs.update)(g, s2, params)
        assert_trees_rel_close(u1, u2)


def test_init_on_shape_dtype_structs_under_eval_shape():
    shapes = {"a": jax.ShapeDtypeStruct((3, 5), jnp.bfloat16), "b": jax.ShapeDtypeStruct((), jnp.float32)}
    state = jax.eval_shape(ox.adamw(1e-3, mu_dtype=jnp.float32).init, shapes)
    mu, nu = optax.tree.get(state, "mu"), optax.tree.get(state, "nu")
    assert mu["a"].shape == (3, 5) and mu["a"].dtype == jnp.float32
    assert nu["a"].shape == (3, 5) and nu["a"].dtype == jnp.bfloat16
    assert mu["b"].shape == ()


def test_none_leaves_pass_through(key):
    params = {"a": jnp.ones((3,)), "frozen": None, "b": jnp.ones((2, 2))}
    tx = ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(0.1))
    state = tx.init(params)
    grads = {"a": jnp.full((3,), 2.0), "frozen": None, "b": jnp.full((2, 2), -1.0)}
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert updates["frozen"] is None
    new_params, _ = tx.update_and_apply(grads, state, params)
    assert new_params["frozen"] is None and new_params["a"].shape == (3,)


def test_vmap_over_independent_problems(key):
    batch = 4
    params = jax.vmap(lambda k: random_tree(k))(jax.random.split(key, batch))
    grads = jax.vmap(lambda k: random_tree(k))(jax.random.split(jax.random.fold_in(key, 1), batch))
    tx = ox.chain(ox.clip_by_global_norm(1.0), ox.lamb(1e-2, weight_decay=0.1))
    states = jax.vmap(tx.init)(params)
    u_batched, _ = jax.vmap(tx.update)(grads, states, params)
    for i in range(batch):
        p_i = jax.tree.map(lambda x, i=i: x[i], params)
        g_i = jax.tree.map(lambda x, i=i: x[i], grads)
        u_i, _ = tx.update(g_i, tx.init(p_i), p_i)
        assert_trees_close(jax.tree.map(lambda x, i=i: x[i], u_batched), u_i, rtol=1e-6, atol=1e-8)


def test_dtypes_preserved_moments_in_requested_dtype(key):
    params = random_tree(key, dtype=jnp.bfloat16)
    tx = ox.adamw(1e-2, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
    state = tx.init(params)
    grads = random_tree(jax.random.fold_in(key, 1), dtype=jnp.bfloat16)
    new_params, state = jax.jit(tx.update_and_apply)(grads, state, params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new_params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(optax.tree.get(state, "mu")))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(optax.tree.get(state, "nu")))
    default = ox.adam(1e-2).init(params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(optax.tree.get(default, "mu")))


def _adamw_f64(p, g, m, v, t, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.01):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * p
    return p - lr * u, m, v


def test_bf16_params_within_bf16_storage_error(key):
    """bf16 params, f32 moments: compare with a float64 run of the same formula that rounds the
    stored params to bf16 after every step; the only difference allowed is that rounding."""
    params = random_tree(key, dtype=jnp.bfloat16)
    tx = ox.adamw(1e-2, weight_decay=0.01, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
    state = tx.init(params)
    step = jax.jit(tx.update_and_apply)
    ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
    ref_f64 = dict(ref)
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v_ = {k: np.zeros_like(v) for k, v in ref.items()}
    m64, v64 = dict(m), dict(v_)
    for t in range(1, 31):
        grads = random_tree(jax.random.fold_in(key, t), dtype=jnp.bfloat16)
        params, state = step(grads, state, params)
        for k in ref:
            g = np.asarray(grads[k], np.float64)
            p, m[k], v_[k] = _adamw_f64(ref[k], g, m[k], v_[k], t, 1e-2)
            ref[k] = np.asarray(jnp.asarray(p, jnp.float32).astype(jnp.bfloat16), np.float64)
            ref_f64[k], m64[k], v64[k] = _adamw_f64(ref_f64[k], g, m64[k], v64[k], t, 1e-2)
    for k in ref:
        ours = np.asarray(params[k], np.float64)
        # One bf16 ulp at |x|: 8 significant bits.
        ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref[k]), 1e-3))) - 7)
        # Same rounding as the emulated bf16 storage, to within one bf16 ulp (f32 vs f64 math can
        # land on the other side of a rounding boundary).
        np.testing.assert_array_less(np.abs(ours - ref[k]), ulp + 1e-12)
        # Against pure f64 arithmetic: bounded by the accumulated storage rounding, half an ulp
        # (<= 2**-8 |p_t|) per step, where |p_t| <= |p_final| + (steps left) * lr (Adam moves <= ~lr per step).
        bound = 30 * 2.0**-8 * (np.abs(ref_f64[k]) + 30 * 1e-2 * 1.01)
        np.testing.assert_array_less(np.abs(ours - ref_f64[k]), bound)


def test_update_and_apply_for_optax_transformations(key):
    params = random_tree(key)
    g = random_tree(jax.random.fold_in(key, 1))
    tx = optax.sgd(0.1)
    new, _ = ox.update_and_apply(tx, g, tx.init(params), params)
    assert_trees_close(new, jax.tree.map(lambda p, g: p - 0.1 * g, params, g))


def test_extra_args_are_forwarded_to_optax_parts(key):
    params = random_tree(key)
    seen = {}

    def update(updates, state, params=None, *, loss=None, **kw):
        seen["loss"] = loss
        return updates, state

    probe = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    tx = ox.chain(ox.scale_by_adam(), probe, ox.scale_by_learning_rate(0.1))
    tx.update(params, tx.init(params), params, loss=3.0)
    assert seen["loss"] == 3.0


def test_inputs_are_not_mutated(key):
    params = random_tree(key)
    grads = random_tree(jax.random.fold_in(key, 1))
    copies = jax.tree.map(np.array, (params, grads))
    tx = ox.adamw(0.1)
    state = tx.init(params)
    state_copy = jax.tree.map(np.array, state)
    tx.update_and_apply(grads, state, params)
    assert_trees_close((params, grads), copies, rtol=0)
    assert_trees_close(state, state_copy, rtol=0)


SHARDING_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import optax_ext as ox
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    shard = {"w": NamedSharding(mesh, P("data", "model")), "b": NamedSharding(mesh, P("model"))}
    params = {"w": jax.device_put(jnp.ones((16, 6)), shard["w"]), "b": jax.device_put(jnp.ones((6,)), shard["b"])}
    grads = jax.tree.map(lambda p: p * 0.5, params)
    tx = ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-2, weight_decay=0.1))
    state = tx.init(params)  # eager init keeps each leaf's sharding (under jit, pass out_shardings)
    for leaf, ref in [(state[1][0].mu["w"], shard["w"]), (state[1][0].nu["b"], shard["b"])]:
        assert leaf.sharding.is_equivalent_to(ref, leaf.ndim), leaf.sharding
    new_params, state = jax.jit(tx.update_and_apply)(grads, state, params)
    assert new_params["w"].sharding.is_equivalent_to(shard["w"], 2), new_params["w"].sharding
    assert state[1][0].mu["w"].sharding.is_equivalent_to(shard["w"], 2), state[1][0].mu["w"].sharding
    ref_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    u, _ = ref_tx.update(grads, ref_tx.init(params), params)
    np.testing.assert_allclose(new_params["w"], optax.apply_updates(params, u)["w"], rtol=1e-6)
    print("OK")
""")


def test_sharding_preserved_on_8_fake_devices():
    out = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize(
    "make,launches",
    [
        (
            lambda: ox.chain(
                ox.clip_by_global_norm(1.0),
                ox.adamw(1e-2, weight_decay=0.1, mask=lambda p: {k: v.ndim > 1 for k, v in p.items()}),
            ),
            2,
        ),
        (lambda: ox.lamb(1e-2, weight_decay=0.01), 3),
    ],
    ids=["clip_adamw_masked", "lamb"],
)
def test_pallas_path_runs_all_leaves_per_launch_with_per_leaf_scalars(make, launches, key):
    """Interpret backend: one multi-tensor launch per reduction and per fused run, whatever the
    number of leaves; per-leaf scalars (mask, trust ratio) stay per leaf; results equal the XLA path."""
    params = random_tree(key)
    tx = make()
    grads = random_tree(jax.random.fold_in(key, 1), scale=2.0)
    expected, _ = tx.update_and_apply(grads, tx.init(params), params)
    with ox.kernels.use_backend("interpret"):
        jaxpr = jax.make_jaxpr(tx.update_and_apply)(grads, tx.init(params), params)
        got, _ = jax.jit(tx.update_and_apply)(grads, tx.init(params), params)
    assert sum(eqn.primitive.name == "pallas_call" for eqn in jaxpr.jaxpr.eqns) == launches
    assert_trees_close(got, expected, rtol=1e-6, atol=1e-7)


def test_readonly_slots_are_read_not_written(monkeypatch, key):
    params = random_tree(key)
    anchor = jax.tree.map(lambda p: p + 1.0, params)
    outputs = []
    real = elementwise.run_fused

    def recording(body, jobs, shared, **kw):
        outputs.extend((len(job.inputs), len(job.out_dtypes)) for job in jobs)
        return real(body, jobs, shared, **kw)

    monkeypatch.setattr(elementwise, "run_fused", recording)
    tx = ox.chain(ox.l2_sp(0.1, anchor), ox.scale_by_adam(), ox.scale_by_learning_rate(0.1))
    state = tx.init(params)
    _, new_state = tx.update(params, state, params)
    # Inputs g, p, anchor, mu, nu; outputs u, mu, nu: the anchor is never written back.
    assert set(outputs) == {(5, 3)}
    assert new_state[0].anchor is state[0].anchor


# --------------------------------------------------------------------------------------------
# Fusion metadata survives rebuilds of the (init, update) pair


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _two_steps(tx, params, key):
    """(updates of step 2, state after step 2, params from update_and_apply of step 2)."""
    state = tx.init(params)
    g1, g2 = random_tree(jax.random.fold_in(key, 1)), random_tree(jax.random.fold_in(key, 2))
    _, state = tx.update(g1, state, params)
    updates, new_state = tx.update(g2, state, params)
    applied, _ = ox.update_and_apply(tx, g2, state, params)
    return updates, new_state, applied


def test_replace_init_keeps_fusing(key):
    params = random_tree(key)
    tx = ox.adamw(1e-2, weight_decay=0.1)
    replaced = tx._replace(init=lambda p: tx.init(p))
    assert isinstance(replaced, ox.FusableTransformation) and replaced.atoms == tx.atoms
    chained = ox.chain(replaced, ox.scale(0.5))
    assert all(a.rule is not None for a in chained.atoms)
    assert _triton_kernels(chained, params) == 1  # one fused pass, as for the original
    _assert_trees_equal(_two_steps(chained, params, key), _two_steps(ox.chain(tx, ox.scale(0.5)), params, key))
    g = random_tree(jax.random.fold_in(key, 3))
    _assert_trees_equal(
        replaced.update_and_apply(g, replaced.init(params), params), tx.update_and_apply(g, tx.init(params), params)
    )


def test_optax_rebuild_of_ours_still_fuses(key):
    params = random_tree(key)
    tx = ox.adam(1e-2)
    rebuilt = optax.GradientTransformationExtraArgs(tx.init, tx.update)
    assert not isinstance(rebuilt, ox.FusableTransformation)
    assert all(a.rule is not None for a in ox.chain(rebuilt).atoms)
    assert _triton_kernels(ox.chain(ox.clip(1.0), rebuilt), params) == 1
    _assert_trees_equal(_two_steps(rebuilt, params, key), _two_steps(tx, params, key))


def test_replaced_update_is_opaque(key):
    """A new update function computes something else for all we know: it must not fuse as the old one."""
    params = random_tree(key)
    tx = ox.adam(1e-2)

    def half(tree):
        return jax.tree.map(lambda x: x / 2, tree)

    halved = tx._replace(update=lambda u, s, p=None, **kw: tx.update(half(u), s, p))
    assert halved.atoms is None
    chained = ox.chain(halved)
    (atom,) = chained.atoms
    assert atom.rule is None and atom.update is not None
    g = random_tree(jax.random.fold_in(key, 1))
    expected_u, expected_s = tx.update(half(g), tx.init(params), params)
    _assert_trees_equal(chained.update(g, chained.init(params), params), (expected_u, (expected_s,)))
    new, _ = halved.update_and_apply(g, halved.init(params), params)
    _assert_trees_equal(new, optax.apply_updates(params, expected_u))
    # functools.wraps copies a function's attributes: the registry is keyed by the function itself.
    wrapped = functools.wraps(tx.update)(lambda u, s, p=None, **kw: tx.update(half(u), s, p))
    assert ox.chain(optax.GradientTransformationExtraArgs(tx.init, wrapped)).atoms[0].rule is None
