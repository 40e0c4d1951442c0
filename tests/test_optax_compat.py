"""What Optax accepts, we accept, with Optax's results: complex and f64 parameters, Python scalars,
None update leaves, stateless transformations given any state, integer updates, Optax's positional
order, MultiSteps around Adafactor. Optax's own test files are run against our names in
test_optax_suite.py; these are the same behaviours, checked directly and on both backends."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ext as ox

OPTIMIZERS = ["sgd", "rmsprop", "adam", "adamw", "nadam", "adabelief", "yogi", "amsgrad", "lamb", "lars", "adafactor"]


def _run(tx, params, grads_fn, steps):
    state = tx.init(params)
    for i in range(steps):
        u, state = tx.update(grads_fn(params, i), state, params)
        params = optax.apply_updates(params, u)
    return params, state


def _kwargs(name):
    return {"momentum": 0.9} if name == "sgd" else {"min_dim_size_to_factor": 2} if name == "adafactor" else {}


@pytest.mark.parametrize("backend", ["xla", "interpret"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_complex_parameters_as_optax(key, name, backend):
    kr, ki = jax.random.split(key)
    params = {
        "z": (jax.random.normal(kr, (4, 3)) + 1j * jax.random.normal(ki, (4, 3))).astype(jnp.complex64),
        "r": jnp.linspace(-1.0, 1.0, 5),
    }
    grads = lambda p, i: jax.tree.map(lambda x: jnp.conj(jnp.sin(x * (i + 1))), p)  # noqa: E731
    with ox.kernels.use_backend(backend):
        ours, s_ours = _run(getattr(ox, name)(0.05, **_kwargs(name)), params, jax.jit(grads), 5)
    ref, s_ref = _run(getattr(optax, name)(0.05, **_kwargs(name)), params, grads, 5)
    for a, b in zip(jax.tree.leaves((ours, s_ours)), jax.tree.leaves((ref, s_ref))):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


_F64_SCRIPT = """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np, optax, optax_ext as ox
rng = np.random.default_rng(0)
params = {"w": jnp.asarray(rng.normal(size=(7, 5))), "b": jnp.asarray(rng.normal(size=(5,)))}
cases = {"adamw": lambda m: m.adamw(1e-2, weight_decay=0.1), "clip_adam": lambda m: m.chain(m.clip_by_global_norm(0.5),
         m.adam(1e-2)), "lamb": lambda m: m.lamb(1e-2), "rmsprop": lambda m: m.rmsprop(1e-2),
         "sgd": lambda m: m.sgd(1e-2, momentum=0.9), "yogi": lambda m: m.yogi(1e-2),
         "adafactor": lambda m: m.adafactor(1e-2, min_dim_size_to_factor=2)}
worst = 0.0
for name, make in cases.items():
    for backend in ("xla", "interpret"):
        ours, ref = make(ox), make(optax)
        pa = pb = params
        sa, sb = ours.init(params), ref.init(params)
        with ox.kernels.use_backend(backend):
            for i in range(20):
                g = jax.tree.map(lambda p: jnp.sin(p * (i + 1)), pa)
                u, sa = jax.jit(ours.update)(g, sa, pa)
                pa = optax.apply_updates(pa, u)
                g = jax.tree.map(lambda p: jnp.sin(p * (i + 1)), pb)
                u, sb = ref.update(g, sb, pb)
                pb = optax.apply_updates(pb, u)
        for x, y in zip(jax.tree.leaves((pa, sa)), jax.tree.leaves((pb, sb))):
            assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
            scale = float(jnp.max(jnp.abs(y))) or 1.0
            worst = max(worst, float(jnp.max(jnp.abs(x - y))) / scale)
assert worst <= 1e-12, worst
print("OK", worst)
"""


def test_float64_parity_with_optax():
    # x64 is process-wide: a fresh interpreter. f64 leaves are computed in f64 (scalars too) on
    # every backend (the Pallas backends hand them to XLA).
    out = subprocess.run([sys.executable, "-c", _F64_SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "rmsprop", "nadam", "amsgrad"])
def test_python_scalar_params(name):
    ours, ref = getattr(ox, name)(0.1), getattr(optax, name)(0.1)
    for p in (1.0, 3):
        s_o, s_r = ours.init(p), ref.init(p)
        assert jax.tree.structure(s_o) == jax.tree.structure(s_r)
        u_o, _ = ours.update(0.5, s_o, float(p))
        u_r, _ = ref.update(0.5, s_r, float(p))
        np.testing.assert_allclose(u_o, u_r, rtol=1e-6)


@pytest.mark.parametrize("name", ["lamb", "adafactor"])
def test_python_scalar_params_where_optax_fails(name):
    # Optax's lamb and adafactor raise AttributeError on a Python float; ours run as for a 0-d array.
    tx = getattr(ox, name)(0.1)
    u, _ = tx.update(0.5, tx.init(1.0), 1.0)
    u_arr, _ = tx.update(jnp.float32(0.5), tx.init(jnp.float32(1.0)), jnp.float32(1.0))
    np.testing.assert_array_equal(u, u_arr)


def test_integer_updates_through_scale():
    u, _ = ox.scale(0.5).update({"a": jnp.arange(4)}, None)
    ref, _ = optax.scale(0.5).update({"a": jnp.arange(4)}, None)
    assert u["a"].dtype == jnp.float32
    np.testing.assert_array_equal(u["a"], ref["a"])


@pytest.mark.parametrize(
    "make",
    [
        lambda m: m.clip(0.5),
        lambda m: m.clip_by_global_norm(1.0),
        lambda m: m.scale(0.3),
        lambda m: m.add_decayed_weights(0.1),
        lambda m: m.clip_by_block_rms(0.2),
    ],
    ids=["clip", "clip_by_global_norm", "scale", "add_decayed_weights", "clip_by_block_rms"],
)
@pytest.mark.parametrize("state", [None, {}, optax.EmptyState(), ()], ids=["None", "dict", "EmptyState", "tuple"])
def test_stateless_transforms_ignore_their_state_and_pass_none_leaves(make, state):
    updates = {"a": jnp.array([3.0, -4.0]), "b": None, "c": {"d": jnp.array([0.5])}}
    params = {"a": jnp.ones(2), "b": jnp.ones(3), "c": {"d": jnp.ones(1)}}
    ours, new_state = make(ox).update(updates, state, params)
    ref, _ = make(optax).update(updates, optax.EmptyState(), params)
    assert new_state is state
    assert ours["b"] is None
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_none_update_leaves_keep_params_and_moments(key):
    params = {"a": jax.random.normal(key, (3,)), "frozen": jnp.arange(4.0)}
    tx = ox.adamw(0.1, weight_decay=0.1)
    state = tx.init(params)
    new, new_state = tx.update_and_apply({"a": jnp.ones(3), "frozen": None}, state, params)
    np.testing.assert_array_equal(new["frozen"], params["frozen"])
    np.testing.assert_array_equal(new_state[0].mu["frozen"], state[0].mu["frozen"])
    # The present leaves move as if the others were not there (Optax's adamw itself has no None leaves).
    ref = optax.adamw(0.1, weight_decay=0.1)
    ref_u, _ = ref.update({"a": jnp.ones(3)}, ref.init({"a": params["a"]}), {"a": params["a"]})
    np.testing.assert_allclose(new["a"], params["a"] + ref_u["a"], rtol=1e-6)


def test_scale_by_rms_takes_optax_positional_order(key):
    g = {"w": jax.random.normal(key, (5,))}
    ours, _ = ox.scale_by_rms(0.9, 1e-8, 0.5).update(g, ox.scale_by_rms(0.9, 1e-8, 0.5).init(g))
    ref, _ = optax.scale_by_rms(0.9, 1e-8, 0.5).update(g, optax.scale_by_rms(0.9, 1e-8, 0.5).init(g))
    np.testing.assert_allclose(ours["w"], ref["w"], rtol=1e-6)


def test_exponential_decay_takes_optax_positional_order():
    steps = jnp.arange(0, 60)
    for args in [(1.0, 10, 0.5), (2.0, 7, 0.9, 5, True), (1.0, 3, 1.5, 0, False, 4.0), (1.0, 10, 0.5, 0, False, 0.2)]:
        np.testing.assert_allclose(ox.exponential_decay(*args)(steps), optax.exponential_decay(*args)(steps), rtol=1e-6)


def test_learning_rate_none_is_the_identity(key):
    g = {"w": jax.random.normal(key, (5,))}
    for name in ["adam", "sgd", "rmsprop"]:
        ours, ref = getattr(ox, name)(None), getattr(optax, name)(None)
        assert jax.tree.structure(ours.init(g)) == jax.tree.structure(ref.init(g))
        np.testing.assert_allclose(
            ours.update(g, ours.init(g), g)[0]["w"], ref.update(g, ref.init(g), g)[0]["w"], rtol=1e-6
        )


def test_adafactor_takes_params_by_keyword_and_works_in_multisteps(key):
    params = {"w": jax.random.normal(key, (6, 4))}
    grads = jax.tree.map(jnp.cos, params)
    ours = optax.MultiSteps(ox.adafactor(1e-2, min_dim_size_to_factor=2), every_k_schedule=2)
    ref = optax.MultiSteps(optax.adafactor(1e-2, min_dim_size_to_factor=2), every_k_schedule=2)
    s_o, s_r = ours.init(params), ref.init(params)
    for _ in range(4):
        u_o, s_o = ours.update(grads, s_o, params=params)
        u_r, s_r = ref.update(grads, s_r, params=params)
        np.testing.assert_allclose(u_o["w"], u_r["w"], rtol=1e-6, atol=1e-8)


def test_freeze_takes_optax_masks():
    params = {"a": jnp.ones(1), "b": jnp.ones(2), "c": {"d": jnp.ones(3)}}
    for mask in [{"a": True, "b": False, "c": True}, True, False, {"a": False, "b": True, "c": {"d": False}}]:
        ours, s_ours = ox.freeze(mask).update(params, ox.freeze(mask).init(params))
        ref, s_ref = optax.freeze(mask).update(params, optax.freeze(mask).init(params))
        assert s_ours == s_ref
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(a, b)


def test_softmax_cross_entropy_takes_axis_and_where(key):
    logits = jax.random.normal(key, (4, 5, 3))
    labels = jax.nn.softmax(jax.random.normal(jax.random.fold_in(key, 1), (4, 5, 3)), axis=1)
    where = jnp.array([True, False, True, True, True])[None, :, None] * jnp.ones((4, 5, 3), bool)
    np.testing.assert_allclose(
        ox.softmax_cross_entropy(logits, labels, 1), optax.softmax_cross_entropy(logits, labels, 1), rtol=1e-6
    )
    np.testing.assert_allclose(
        ox.softmax_cross_entropy(logits, labels, 1, where),
        optax.softmax_cross_entropy(logits, labels, 1, where),
        rtol=1e-6,
    )
