"""Muon (optax_ext.contrib._muon) against optax.contrib.muon: states, numbers, batching, sharding, Optax's tests."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from conftest import assert_trees_rel_close, random_tree
from optax.contrib import _muon as optax_muon

import optax_ext as ox
from optax_ext import fusion
from optax_ext.contrib import _muon

HERE = Path(__file__).resolve().parent
STEPS = 50
# Matrices of a few shapes (square, wide, tall: the tall ones join the wide group transposed), and
# leaves Muon leaves to AdamW: 0-d, vectors, a 3-D array.
SHAPES = [(16, 24), (24, 16), (16, 24), (8, 8), (8, 8), (5, 9), (), (1,), (7,), (3, 5, 7), (16, 24)]


def _grads(key, params, t):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, t), len(leaves))
    scale = 0.5 + (t % 3)

    def one(k, x):
        g = scale * jax.random.normal(k, jnp.shape(x))
        if jnp.iscomplexobj(x):
            g = g + 1j * scale * jax.random.normal(jax.random.fold_in(k, 1), jnp.shape(x))
        return g

    return treedef.unflatten([one(k, x) for k, x in zip(keys, leaves)])


def _run(tx, params, key, steps=STEPS):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(steps):
        g = jax.tree.map(lambda g, p: g.astype(p.dtype), _grads(key, params, t), params)
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def _assert_same(ours, ref, params0, rel):
    (p, s), (rp, rs) = ours, ref
    assert jax.tree.structure(s) == jax.tree.structure(rs)
    assert_trees_rel_close(p, rp, rel=rel, err_msg="params")
    assert_trees_rel_close(s, rs, rel=rel, err_msg="state")
    moved = [
        np.max(np.abs(np.asarray(a) - np.asarray(b))) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params0))
    ]
    assert all(v > 0 for v in moved), moved


# name -> keyword arguments given to both muons.
CONFIGS = {
    "wd_mask_no_nesterov_adaptive": dict(
        weight_decay=0.1, weight_decay_mask=lambda p: {k: k != "w2" for k in p}, nesterov=False, adaptive=True
    ),
    "aol_dion_consistent_rms": dict(preconditioning="aol", ns_coeffs="dion", consistent_rms=0.2, beta=0.9),
    "schatten_adam_options": dict(
        preconditioning="schatten", adam_b1=0.8, adam_weight_decay=0.01, adam_learning_rate=3e-3, adam_eps_root=1e-9
    ),
    "spectral_schedule": dict(preconditioning="spectral", ns_steps=4),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_optax_with_optax_numerics(name, key):
    """ns_dtype=None iterates in the momentum's dtype, as Optax: the same numbers up to f32 rounding."""
    kw = CONFIGS[name]
    lr = optax.cosine_decay_schedule(1e-2, 40) if name == "spectral_schedule" else 1e-2
    params = random_tree(key, SHAPES)
    ours = _run(_muon.muon(lr, **kw, ns_dtype=None), params, key)
    ref = _run(optax_muon.muon(lr, **kw), params, key)
    _assert_same(ours, ref, params, rel=1e-5)


def _optax_muon_in_bf16(monkeypatch):
    """Optax's muon with its Newton-Schulz run on bfloat16 (its own code, input cast to bf16)."""
    original = optax_muon.orthogonalize_via_newton_schulz

    def in_bf16(x, *args, **kwargs):
        return original(x.astype(jnp.bfloat16), *args, **kwargs).astype(x.dtype)

    monkeypatch.setattr(optax_muon, "orthogonalize_via_newton_schulz", in_bf16)


def test_bf16_newton_schulz_matches_optax_in_bf16(key, monkeypatch):
    """Our default (bf16 iterations) against Optax's iterations run in bf16: within bf16 rounding
    (a step's update has a relative error of a few 2^-8; the params accumulate 55 of them)."""
    params = random_tree(key, SHAPES)
    ours = _run(_muon.muon(1e-2, weight_decay=0.05), params, key)
    _optax_muon_in_bf16(monkeypatch)
    ref = _run(optax_muon.muon(1e-2, weight_decay=0.05), params, key)
    (p, s), (rp, rs) = ours, ref
    assert jax.tree.structure(s) == jax.tree.structure(rs)
    # The moments do not depend on the orthogonalization: f32-close.
    assert_trees_rel_close(_muon_state(s).mu, _muon_state(rs).mu, rel=1e-5)
    # Displacement of the matrices: within bf16 rounding of the total motion.
    delta = jax.tree.map(lambda a, b: a - b, p, params)
    ref_delta = jax.tree.map(lambda a, b: a - b, rp, params)
    assert_trees_rel_close(delta, ref_delta, rel=2**-6)


def _muon_state(state):
    return state.inner_states["muon"].inner_state[0]


def _upcast(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, tree)


def _rel_err(a, b):
    """The largest normwise relative error over the leaves."""
    errs = [
        np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
        / np.max(np.abs(np.asarray(y, np.float64)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        if np.size(y) and np.max(np.abs(np.asarray(y, np.float64))) > 0
    ]
    return max(errs)


def test_bf16_params_as_accurate_as_optax(key):
    """bf16 params: Optax iterates in bf16 (its momentum is bf16); so do we, by default. Newton-
    Schulz in bf16 amplifies input roundings (slope 3.4 at 0, five times), so two bf16 runs do not
    agree to a few ulps; instead, each of 50 steps is taken by both from Optax's state (same
    layout) and compared with the exact (f32) update from the same inputs: our error is Optax's."""
    params = random_tree(key, SHAPES, dtype=jnp.bfloat16)
    ours, ref = _muon.muon(1e-2, weight_decay=0.01), optax_muon.muon(1e-2, weight_decay=0.01)
    ours_update, ref_update = jax.jit(ours.update), jax.jit(ref.update)
    state = ref.init(params)
    errs_ours, errs_optax = [], []
    for t in range(50):
        g = jax.tree.map(lambda g: g.astype(jnp.bfloat16), _grads(key, params, t))
        u, s = ours_update(g, state, params)
        ru, new_state = ref_update(g, state, params)
        exact, _ = ref_update(_upcast(g), _upcast(state), _upcast(params))
        assert jax.tree.structure(s) == jax.tree.structure(new_state)
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
        assert_trees_rel_close(_muon_state(s).mu, _muon_state(new_state).mu, rel=2**-7)
        errs_ours.append(_rel_err(u, exact))
        errs_optax.append(_rel_err(ru, exact))
        state, params = new_state, optax.apply_updates(params, ru)
    assert np.mean(errs_ours) <= 1.25 * np.mean(errs_optax), (np.mean(errs_ours), np.mean(errs_optax))
    assert max(errs_ours) <= 1.5 * max(errs_optax), (max(errs_ours), max(errs_optax))


def test_dimension_numbers_and_callables_match_optax(key):
    """Batch axes, several output axes, a prefix None, a callable; Optax's state layout (MaskedNode)."""
    k = jax.random.split(key, 5)
    params = {
        "stack": jax.random.normal(k[0], (3, 8, 12)),  # 3 matrices (8, 12): batch axis 0
        "conv": jax.random.normal(k[1], (3, 3, 4, 8)),  # (kh, kw, in, out): reduction (0, 1, 2)
        "plain": jax.random.normal(k[2], (12, 8)),
        "skip": {"a": jax.random.normal(k[3], (8, 12)), "b": jax.random.normal(k[4], (5,))},
    }
    dims = {
        "stack": _muon.MuonDimensionNumbers(1, 2),
        "conv": _muon.MuonDimensionNumbers((0, 1, 2), 3),
        "plain": _muon.MuonDimensionNumbers(),
        "skip": None,
    }
    for spec in (dims, lambda p: dims):
        ours = _run(_muon.muon(1e-2, muon_weight_dimension_numbers=spec, ns_dtype=None), params, key, steps=50)
        ref = _run(optax_muon.muon(1e-2, muon_weight_dimension_numbers=spec), params, key, steps=50)
        _assert_same(ours, ref, params, rel=1e-5)


def test_scale_by_muon_alone_matches_optax(key):
    params = random_tree(key, [(16, 24), (24, 16), (8, 8)])
    # (Optax's own scale_by_muon needs the dimension numbers as a tree when params are a tree.)
    dims = jax.tree.map(lambda _: _muon.MuonDimensionNumbers(), params)
    for kw in (dict(weight_dimension_numbers=dims), dict(nesterov=False, adaptive=True, weight_dimension_numbers=dims)):
        ours = _run(_muon.scale_by_muon(**kw, ns_dtype=None), params, key, steps=50)
        ref = _run(optax_muon.scale_by_muon(**kw), params, key, steps=50)
        assert jax.tree.structure(ours[1]) == jax.tree.structure(ref[1])
        assert_trees_rel_close(ours, ref, rel=1e-5)
    # bf16 momentum storage: step by step from Optax's state (a bf16 rounding flip would otherwise
    # be amplified by Newton-Schulz along the trajectory).
    ours = _muon.scale_by_muon(mu_dtype=jnp.bfloat16, weight_dimension_numbers=dims, ns_dtype=None)
    ref = optax_muon.scale_by_muon(mu_dtype=jnp.bfloat16, weight_dimension_numbers=dims)
    state = ref.init(params)
    for t in range(50):
        g = _grads(key, params, t)
        u, s = jax.jit(ours.update)(g, state)
        ru, state = jax.jit(ref.update)(g, state)
        # Optax rounds beta * mu to bf16 before adding the f32 gradient term, we add in f32: the
        # momenta agree to a bf16 ulp; Newton-Schulz amplifies that difference in small directions.
        assert_trees_rel_close(s, state, rel=2**-7, err_msg=f"state, step {t}")
        assert_trees_rel_close(u, ru, rel=2**-4, err_msg=f"step {t}")
        assert s.mu["w0"].dtype == jnp.bfloat16


def test_state_is_optax_layout():
    params = {"w": jnp.zeros((4, 6)), "b": jnp.zeros((6,)), "s": jnp.zeros(())}
    ours, ref = _muon.muon(1e-3).init(params), optax.contrib.muon(1e-3).init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(ref)
    assert isinstance(ours.inner_states["muon"].inner_state[0], optax.contrib.MuonState)
    assert _muon.MuonState is optax.contrib.MuonState
    assert _muon.MuonDimensionNumbers is optax.contrib.MuonDimensionNumbers
    # init on shapes only (jax.eval_shape), as Optax.
    shapes = jax.eval_shape(_muon.muon(1e-3).init, params)
    assert jax.tree.structure(shapes) == jax.tree.structure(ref)


def _count(jaxpr, name):
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    n += _count(sub.jaxpr, name)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    n += _count(sub, name)
    return n


@pytest.mark.parametrize("ns_steps", [3, 5])
def test_newton_schulz_is_one_batched_call_per_shape(ns_steps):
    """Ten leaves of two matrix shapes (tall ones transposed into the wide group): 2 groups, each
    3 dots per iteration, not 3 per leaf; and the dots run in bf16."""
    shapes = [(32, 64)] * 4 + [(64, 32)] * 3 + [(16, 16)] * 3
    params = {f"w{i}": jnp.ones(s) for i, s in enumerate(shapes)}
    tx = _muon.muon(1e-2, ns_steps=ns_steps)
    jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params).jaxpr
    assert _count(jaxpr, "dot_general") == 2 * 3 * ns_steps
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in dots)
    assert {e.outvars[0].aval.shape[0] for e in dots} == {7, 3}  # 4 + 3 stacked, 3 stacked


def test_elementwise_parts_are_fused_rules():
    """The momentum is a Rule (fuses with what comes before); after the orthogonalization, the
    shape scale, weight decay and learning rate are one fused run (which writes params in
    update_and_apply)."""
    tx = fusion.chain(
        _muon.scale_by_muon(),
        _muon.scale_by_shape(),
        ox.chain(ox.add_decayed_weights(0.1), ox.scale_by_learning_rate(1e-2)),
    )
    runs = fusion._runs(tx.atoms)
    assert [len(r) for _, r in runs] == [1, 1, 3]
    assert runs[0][1][0].rule is not None and runs[1][1][0].rule is None
    assert all(a.rule is not None for a in runs[2][1])
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 12))}
    grads = {"w": jax.random.normal(jax.random.PRNGKey(1), (8, 12))}
    new_p, _ = tx.update_and_apply(grads, tx.init(params), params)
    u, _ = tx.update(grads, tx.init(params), params)
    assert_trees_rel_close(new_p, optax.apply_updates(params, u), rel=1e-6)


def test_complex_leaves_iterate_in_their_own_dtype(key):
    w = (jax.random.normal(key, (6, 4)) + 1j * jax.random.normal(jax.random.fold_in(key, 1), (6, 4))).astype(
        jnp.complex64
    )
    params = {"w": w}
    ours = _run(_muon.muon(1e-2), params, key, steps=50)
    ref = _run(optax_muon.muon(1e-2), params, key, steps=50)
    assert ours[0]["w"].dtype == jnp.complex64

    def parts(tree):  # (conftest's comparisons are real: compare both parts)
        return jax.tree.map(lambda x: (jnp.real(x), jnp.imag(x)) if jnp.iscomplexobj(x) else x, tree)

    _assert_same(parts(ours), parts(ref), parts(params), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(preconditioning="polar"), "preconditioning"),
        (dict(ns_dtype=jnp.int32), "ns_dtype"),
        (dict(beta=1.5), "beta"),
        (dict(ns_steps=2.5), "ns_steps"),
        (dict(ns_coeffs="nope"), "preset"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _muon.muon(1e-2, **kwargs)


def test_bad_coefficients_fail_at_init_as_optax():
    params = {"w": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match="ns_coeffs"):
        _muon.muon(1e-2, ns_coeffs=(1.0, 2.0)).init(params)
    with pytest.raises(ValueError, match="Not enough coeffs"):
        _muon.muon(1e-2, ns_coeffs="dion", ns_steps=3).init(params)
    with pytest.raises(ValueError, match="rank >= 2|not a matrix"):
        tx = _muon.scale_by_muon()
        tx.update({"v": jnp.ones(3)}, tx.init({"v": jnp.ones(3)}))


# ------------------------------------------------------------------------- 8 devices, subprocess


def _run_script(args, timeout=600):
    out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=HERE)
    assert out.returncode == 0 and "OK" in out.stdout, (out.stdout[-2000:], out.stderr[-4000:])
    return out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "explicit"])
@pytest.mark.parametrize("check", ["fsdp_step", "fsdp_step_2d"])
def test_fsdp_on_eight_devices(check, mode):
    """12 row-sharded (256, 512) matrices + 2 AdamW leaves: <= 8 collectives, same as one device."""
    out = _run_script([HERE / "muon_sharded_checks.py", check, mode])
    assert "COLLECTIVES" in out


# ------------------------------------------------------------------------- Optax's own tests

_SUITE = """
import functools, sys
import optax.contrib as oc
from optax.contrib import _muon as om
from optax_ext.contrib import _muon as ours
calls = []
def counted(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls.append(fn.__name__)
        return fn(*args, **kwargs)
    return wrapper
om.muon = oc.muon = counted(ours.muon)
om.scale_by_muon = oc.scale_by_muon = counted(ours.scale_by_muon)
import pytest
code = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=", sys.argv[1]])
print("OUR MUON CALLS", len(calls))
sys.exit(code)
"""


@pytest.mark.slow
def test_optax_muon_tests_pass_with_ours(tmp_path):
    """optax/contrib/_muon_test.py with optax.contrib.muon / scale_by_muon pointed at ours (bf16
    iterations, our default): every test passes."""
    test_file = Path(optax_muon.__file__).with_name("_muon_test.py")
    script = tmp_path / "run.py"
    script.write_text(_SUITE)
    out = subprocess.run(
        [sys.executable, str(script), str(test_file)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "failed" not in out.stdout and " passed" in out.stdout, out.stdout[-2000:]
    calls = int(out.stdout.split("OUR MUON CALLS")[1].split()[0])
    assert calls > 20, out.stdout[-2000:]


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_elementwise_parts_lower_to_three_kernels(backend):
    """Lowered for CUDA (Triton) and TPU (Mosaic) from a CPU: the momentum of all Muon leaves is one
    multi-tensor kernel, the scaled apply of all Muon leaves another, AdamW for the rest a third
    (AdamW alone on the same tree: 1); the Newton-Schulz dots are XLA dots between them."""
    from test_kernels_lowering import _count_kernels, _lower

    params = {f"w{i}": jax.ShapeDtypeStruct((256, 512), jnp.float32) for i in range(4)}
    params.update(b=jax.ShapeDtypeStruct((512,), jnp.float32), t=jax.ShapeDtypeStruct((512, 256), jnp.float32))
    tx = _muon.muon(1e-2, weight_decay=0.1)
    state = jax.eval_shape(tx.init, params)
    text = _lower(lambda p, s, g: tx.update(g, s, p), (params, state, params), backend)
    assert _count_kernels(text, backend) == 3
    assert "dot_general" in text


def test_update_and_apply_matches_update_then_apply(key):
    # As every optax_ext optimizer: tx.update_and_apply under a jit that donates params and state.
    params = random_tree(key, SHAPES)
    tx = ox.muon(0.02, weight_decay=0.01)
    step = jax.jit(tx.update_and_apply, donate_argnums=(1, 2))
    p1, s1 = jax.tree.map(jnp.copy, params), tx.init(params)
    p2, s2 = params, tx.init(params)
    update = jax.jit(tx.update)  # both jitted: eager and jitted math may round differently
    for t in range(3):
        g = _grads(key, params, t)
        p1, s1 = step(g, s1, p1)
        u, s2 = update(g, s2, p2)
        p2 = optax.apply_updates(p2, u)
    assert_trees_rel_close(p1, p2, rel=1e-6)
    assert_trees_rel_close(s1, s2, rel=1e-6)


def test_inject_hyperparams_gives_the_same_bf16_iterations(key):
    # Injected hyperparameters are traced f32 arrays; they must not promote the bf16 Newton-Schulz
    # iterations to f32 (Python floats do not), or the two would differ by bf16 rounding (~2%).
    params = random_tree(key, SHAPES)
    grads = _grads(key, params, 0)
    plain = ox.muon(0.01, weight_decay=0.01)
    injected = optax.inject_hyperparams(ox.muon, static_args=("ns_steps",))(0.01, weight_decay=0.01)
    u1, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    u2, _ = jax.jit(injected.update)(grads, injected.init(params), params)
    assert_trees_rel_close(u2, u1, rel=1e-5)
