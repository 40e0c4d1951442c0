"""Bad input: one catalogue. Each case gets a clear error naming the argument (or the leaf) and the value.

Every row is `(id, call, exception type, regex the message must match)`; the call is made as a
user would make it. Checks that need a fresh process (an invalid `OPTAX_EXT_BACKEND`, read once at
import) and the backend-dependent ones follow the table.
"""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_ext as ox
from optax_ext import augment, regularizers, schedules

P = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
G = {"w": jnp.full((3, 2), 0.1), "b": jnp.full((2,), -0.2)}


def _update(tx, grads=G, params=P, state_params=P, **kw):
    return lambda: tx.update(grads, tx.init(state_params), params, **kw)


def _sched(step):
    return 0.9


CATALOGUE = [
    # Hyperparameter ranges: name the argument and the value.
    ("adam b1 = 1", lambda: ox.adam(1e-3, b1=1.0), ValueError, r"adam: b1 must be in \[0, 1\), got 1.0"),
    ("adam b1 < 0", lambda: ox.adam(1e-3, b1=-0.1), ValueError, r"b1 must be in \[0, 1\), got -0.1"),
    ("adamw b2 nan", lambda: ox.adamw(1e-3, b2=math.nan), ValueError, r"b2 must be in \[0, 1\), got nan"),
    ("lion b1 = 1", lambda: ox.lion(1e-3, b1=1.0), ValueError, r"b1 must be in \[0, 1\)"),
    ("rmsprop decay = 1", lambda: ox.rmsprop(1e-3, decay=1.0), ValueError, r"decay must be in \[0, 1\), got 1.0"),
    ("sgd momentum = 1", lambda: ox.sgd(1e-3, momentum=1.0), ValueError, r"momentum must be in \[0, 1\), got 1.0"),
    ("lars momentum < 0", lambda: ox.lars(1e-3, momentum=-0.5), ValueError, r"momentum must be in \[0, 1\)"),
    ("adam eps < 0", lambda: ox.adam(1e-3, eps=-0.5), ValueError, r"eps must be a finite number >= 0, got -0.5"),
    ("adam eps_root < 0", lambda: ox.adam(1e-3, eps_root=-0.5), ValueError, r"eps_root must be a finite number >= 0"),
    ("lamb eps inf", lambda: ox.lamb(1e-3, eps=math.inf), ValueError, r"eps must be a finite number >= 0, got inf"),
    (
        "negative learning rate",
        lambda: ox.adamw(-0.1),
        ValueError,
        r"learning_rate must be a finite number >= 0, "
        r"got -0.1",
    ),
    ("infinite learning rate", lambda: ox.sgd(math.inf), ValueError, r"learning_rate must be a finite number >= 0"),
    (
        "nan learning rate",
        lambda: ox.lion(math.nan),
        ValueError,
        r"learning_rate must be a finite number >= 0, got nan",
    ),
    (
        "weight decay nan",
        lambda: ox.adamw(1e-3, weight_decay=math.nan),
        ValueError,
        r"weight_decay must be a finite number, got nan",
    ),
    ("weight decay inf", lambda: ox.add_decayed_weights(math.inf), ValueError, r"weight_decay must be a finite number"),
    # Kinds: a string is not a number; a schedule where the state has no step count says what to do.
    (
        "learning rate '0.1'",
        lambda: ox.adam("0.1"),
        TypeError,
        r"learning_rate must be a real number or a schedule .*got '0.1' of type str",
    ),
    ("b1 '0.9'", lambda: ox.adam(1e-3, b1="0.9"), TypeError, r"b1 must be a real number .*got '0.9' of type str"),
    ("weight decay True", lambda: ox.adamw(1e-3, weight_decay=True), TypeError, r"weight_decay must be a real number"),
    ("b1 an array", lambda: ox.adam(1e-3, b1=jnp.ones(2)), ValueError, r"b1 must be a scalar, got an array of shape"),
    (
        "rmsprop decay schedule",
        lambda: ox.rmsprop(1e-3, decay=_sched),
        TypeError,
        r"decay cannot be a schedule here .*optax.inject_hyperparams",
    ),
    ("rmsprop eps schedule", lambda: ox.rmsprop(1e-3, eps=_sched), TypeError, r"eps cannot be a schedule here"),
    (
        "sgd momentum schedule",
        lambda: ox.sgd(1e-3, momentum=_sched),
        TypeError,
        r"momentum cannot be a schedule here .*inject_hyperparams",
    ),
    ("clip max_norm schedule", lambda: ox.clip_by_global_norm(_sched), TypeError, r"max_norm cannot be a schedule"),
    (
        "clip max_norm < 0",
        lambda: ox.clip_by_global_norm(-1),
        ValueError,
        r"max_norm must be a finite number >= 0, "
        r"got -1",
    ),
    ("clip max_delta < 0", lambda: ox.clip(-0.1), ValueError, r"max_delta must be a finite number >= 0"),
    (
        "lion mode",
        lambda: ox.scale_by_lion(mode="soft"),
        ValueError,
        r"mode must be one of 'hard', 'smooth', 'refined', got 'soft'",
    ),
    (
        "apply_if_finite errors < 0",
        lambda: ox.apply_if_finite(ox.adam(1e-3), -1),
        ValueError,
        r"max_consecutive_errors must be an integer >= 0, got -1",
    ),
    (
        "apply_if_finite inner",
        lambda: ox.apply_if_finite("adam", 3),
        TypeError,
        r"inner must be a GradientTransformation",
    ),
    (
        "chain of a string",
        lambda: ox.chain(ox.scale_by_adam(), "not a transform"),
        TypeError,
        r"argument 1 must be a GradientTransformation",
    ),
    ("empty chain", lambda: ox.chain(), ValueError, r"at least one"),
    # Trees, shapes, dtypes and states, with and without params: name the leaf.
    (
        "mismatched trees",
        _update(ox.adamw(1e-3), grads={"w": G["w"]}),
        ValueError,
        r"updates and params must have the same tree structure; at the root: params has \['b'\]",
    ),
    (
        "mismatched shapes",
        _update(ox.adam(1e-3), grads={"w": G["w"], "b": jnp.zeros(5)}),
        ValueError,
        r"differ in shape at \['b'\]: updates \(5,\), params \(2,\)",
    ),
    (
        "mismatched trees, params=None",
        _update(ox.adam(1e-3), grads={"w": G["w"]}, params=None),
        ValueError,
        r"state field 'mu' does not match the updates \(at the root: state.mu has \['b'\]",
    ),
    (
        "mismatched shapes, params=None",
        _update(ox.adam(1e-3), grads={"w": G["w"], "b": jnp.zeros(5)}, params=None),
        ValueError,
        r"state field 'mu' has shape \(2,\) at \['b'\] where the updates have \(5,\)",
    ),
    (
        "state from other params",
        _update(ox.adam(1e-3), state_params={"x": jnp.zeros(3)}),
        ValueError,
        r"state field 'mu' does not match",
    ),
    (
        "update before init",
        lambda: ox.adamw(1e-3).update(G, None, P),
        ValueError,
        r"state is None. Call `state = tx.init\(params\)` first",
    ),
    (
        "wrong state type",
        lambda: ox.scale_by_adam().update(G, optax.EmptyState(), P),
        TypeError,
        r"scale_by_adam expected its state to be ScaleByAdamState, got EmptyState",
    ),
    (
        "state of another chain",
        lambda: ox.adamw(1e-3).update(G, (), P),
        TypeError,
        r"state does not match this transformation",
    ),
    (
        "params required",
        lambda: ox.adamw(1e-3, weight_decay=0.1).update(G, ox.adamw(1e-3).init(P), None),
        ValueError,
        r"add_decayed_weights requires params",
    ),
    (
        "apply without params",
        lambda: ox.adam(1e-3).update_and_apply(G, ox.adam(1e-3).init(P), None),
        ValueError,
        r"update_and_apply\(\): params are required",
    ),
    (
        "integer params, float grads",
        _update(ox.adam(1e-3), params=dict(P, b=jnp.zeros(2, jnp.int32)), state_params=P),
        TypeError,
        r"params at \['b'\] are int32 but their updates are float32: applying them would round the updates away",
    ),
    (
        "bool updates",
        _update(ox.sgd(1e-3), grads=dict(G, b=jnp.zeros(2, bool))),
        TypeError,
        r"updates must be numbers .*got bool at \['b'\]",
    ),
    (
        "complex lion",
        lambda: ox.scale_by_lion().update(
            {"z": jnp.ones(2, jnp.complex64)}, ox.scale_by_lion().init({"z": jnp.ones(2, jnp.complex64)})
        ),
        TypeError,
        r"scale_by_lion: complex updates are not supported",
    ),
    (
        "unknown backend",
        lambda: ox.kernels.use_backend("cuda").__enter__(),
        ValueError,
        r"unknown backend 'cuda'; expected one of xla, interpret, triton, mosaic",
    ),
    # The modules around the optimizers.
    (
        "schedule begin < 0",
        lambda: schedules.exponential_decay(1.0, 10, 0.5, -1),
        ValueError,
        r"transition_begin must be an integer >= 0, got -1",
    ),
    ("schedule steps 0", lambda: schedules.cosine_decay(1.0, 0), ValueError, r"cosine_decay: .* got 0"),
    ("l2_sp strength < 0", lambda: regularizers.l2_sp(-1.0, P), ValueError, r"strength must be a finite number >= 0"),
    (
        "l2_sp anchor shape",
        lambda: regularizers.l2_sp(0.1, {"w": jnp.ones((2, 2)), "b": P["b"]}).init(P),
        ValueError,
        r"(?s)anchor_params does not match params .*shape mismatch at w: params \(3, 2\), anchor_params \(2, 2\)",
    ),
    (
        "label smoothing 1.5",
        lambda: ox.softmax_cross_entropy(jnp.zeros((4, 3)), jnp.zeros(4, int), label_smoothing=1.5),
        ValueError,
        r"label_smoothing must be in \[0, 1\], got 1.5",
    ),
    (
        "nt_xent temperature 0",
        lambda: ox.nt_xent(jnp.ones((4, 3)), jnp.ones((4, 3)), temperature=0.0),
        ValueError,
        r"temperature must be a finite number > 0, got 0.0",
    ),
    (
        "crop larger than image",
        lambda: augment.random_crop(jax.random.PRNGKey(0), jnp.zeros((8, 8, 1)), (9, 9)),
        ValueError,
        r"random_crop",
    ),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_catalogue(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_catalogue_is_large():
    assert len(CATALOGUE) >= 30


@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_integer_params_are_an_error_on_every_backend(backend):
    params = dict(P, b=jnp.zeros(2, jnp.int32))
    with ox.kernels.use_backend(backend), pytest.raises(TypeError, match=r"params at \['b'\] are int32"):
        tx = ox.adamw(1e-3)
        tx.update_and_apply(G, tx.init(P), params)


def test_invalid_backend_variable_fails_at_import():
    out = subprocess.run(
        [sys.executable, "-c", "import optax_ext"],
        capture_output=True,
        text=True,
        env={"OPTAX_EXT_BACKEND": "gpu", "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode != 0
    assert "environment variable OPTAX_EXT_BACKEND: unknown backend 'gpu'" in out.stderr.strip().splitlines()[-1]


def test_traced_hyperparameters_are_not_rejected():
    # Under inject_hyperparams / jit, values are only known at run time: construction must work.
    jax.jit(lambda b1: ox.adam(1e-3, b1=b1).init({"a": jnp.zeros(2)}))(jnp.asarray(0.9))
    tx = optax.inject_hyperparams(ox.rmsprop)(learning_rate=0.1, decay=lambda step: 0.9 - 0.1 / (step + 1))
    updates, _ = tx.update(G, tx.init(P), P)
    assert jax.tree.structure(updates) == jax.tree.structure(G)


def test_schedules_where_the_state_has_a_count():
    # b1, b2, eps and eps_root of the Adam family, and weight decay, take schedules.
    tx = ox.adamw(1e-2, b1=lambda t: 0.9, b2=lambda t: 0.999, eps=lambda t: 1e-8, weight_decay=lambda t: 0.1)
    ref = ox.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
    a, _ = tx.update(G, tx.init(P), P)
    b, _ = ref.update(G, ref.init(P), P)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert jnp.allclose(x, y, rtol=1e-6)


def test_a_backend_change_retraces_jitted_functions():
    # The backend is part of jit's cache key: calling under another backend traces again.
    seen = []

    @jax.jit
    def step(x):
        seen.append(ox.kernels.get_backend())
        return x + 1

    with ox.kernels.use_backend("interpret"):
        step(1.0)
    with ox.kernels.use_backend("xla"):
        step(1.0)
    with ox.kernels.use_backend("interpret"):
        step(1.0)  # cached for this backend
    assert seen == ["interpret", "xla"]
