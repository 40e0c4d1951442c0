"""Bad input gets a clear error naming the argument and the received value."""

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_ext as ox
from conftest import random_tree


@pytest.mark.parametrize("factory, arg, value", [
    (ox.adam, "b1", 1.0), (ox.adam, "b1", -0.1), (ox.adam, "b2", 1.5), (ox.adamw, "b2", float("nan")),
    (ox.nadam, "b1", 2.0), (ox.adabelief, "b2", 1.0), (ox.yogi, "b1", -1.0), (ox.lion, "b1", 1.0),
    (ox.amsgrad, "b2", 1.0), (ox.lamb, "b1", 1.0), (ox.rmsprop, "decay", 1.0), (ox.sgd, "momentum", 1.0),
    (ox.lars, "momentum", -0.5),
])
def test_decay_outside_unit_interval(factory, arg, value):
    with pytest.raises(ValueError, match=rf"{arg} must be in \[0, 1\), got {value!r}"):
        factory(1e-3, **{arg: value})


@pytest.mark.parametrize("factory, arg", [
    (ox.adam, "eps"), (ox.adam, "eps_root"), (ox.adamw, "weight_decay"), (ox.rmsprop, "eps"),
    (ox.adabelief, "eps"), (ox.lion, "weight_decay"), (ox.lamb, "weight_decay"), (ox.lars, "weight_decay"),
    (ox.lars, "eps"),
])
def test_negative_values(factory, arg):
    with pytest.raises(ValueError, match=rf"{arg} must be a finite number >= 0, got -0.5"):
        factory(1e-3, **{arg: -0.5})


@pytest.mark.parametrize("factory", [ox.sgd, ox.adam, ox.adamw, ox.rmsprop, ox.lion, ox.lamb])
def test_negative_learning_rate(factory):
    with pytest.raises(ValueError, match=r"learning_rate must be a finite number >= 0, got -0.1"):
        factory(-0.1)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="max_norm must be a finite number >= 0, got -1"):
        ox.clip_by_global_norm(-1)
    with pytest.raises(ValueError, match="mode must be one of 'hard', 'smooth', 'refined', got 'soft'"):
        ox.scale_by_lion(mode="soft")
    with pytest.raises(ValueError, match="max_delta"):
        ox.clip(-0.1)
    with pytest.raises(TypeError, match="argument 1 must be a GradientTransformation"):
        ox.chain(ox.scale_by_adam(), "not a transform")
    with pytest.raises(ValueError, match="at least one"):
        ox.chain()


def test_mismatched_tree_structures(key):
    params = random_tree(key)
    grads = dict(params)
    grads.pop("w0")
    tx = ox.adamw(1e-3)
    with pytest.raises(ValueError, match="updates and params must have the same tree structure"):
        tx.update(grads, tx.init(params), params)


def test_mismatched_shapes_name_the_leaf(key):
    params = random_tree(key)
    grads = dict(params, w3=jnp.zeros((999,)))
    tx = ox.adam(1e-3)
    with pytest.raises(ValueError, match=r"differ in shape at \['w3'\]: updates \(999,\), params \(1000,\)"):
        tx.update(grads, tx.init(params), params)


def test_state_from_other_params(key):
    params = random_tree(key)
    other = {"x": jnp.zeros(3)}
    tx = ox.adam(1e-3)
    with pytest.raises(ValueError, match="state field 'mu' does not match"):
        tx.update(params, tx.init(other), params)


def test_update_before_init(key):
    params = random_tree(key)
    tx = ox.adamw(1e-3)
    with pytest.raises(ValueError, match=r"state is None. Call `state = tx.init\(params\)` first"):
        tx.update(params, None, params)
    with pytest.raises(TypeError, match="scale_by_adam expected its state to be ScaleByAdamState, got EmptyState"):
        ox.scale_by_adam().update(params, optax.EmptyState(), params)
    with pytest.raises(TypeError, match="state does not match this transformation"):
        tx.update(params, (), params)


def test_params_required(key):
    params = random_tree(key)
    tx = ox.adamw(1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match="add_decayed_weights requires params"):
        tx.update(params, tx.init(params), None)
    with pytest.raises(ValueError, match="update_and_apply\\(\\): params are required"):
        ox.adam(1e-3).update_and_apply(params, ox.adam(1e-3).init(params), None)


def test_unknown_backend_lists_valid_ones(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuda'; expected one of xla, interpret, triton, mosaic"):
        with ox.kernels.use_backend("cuda"):
            pass
    monkeypatch.setenv("OPTAX_EXT_BACKEND", "gpu")
    with pytest.raises(ValueError, match="OPTAX_EXT_BACKEND: unknown backend 'gpu'"):
        ox.kernels.get_backend()


def test_traced_hyperparameters_are_not_rejected():
    # Under inject_hyperparams / jit, values are only known at run time: construction must work.
    jax.jit(lambda b1: ox.adam(1e-3, b1=b1).init({"a": jnp.zeros(2)}))(jnp.asarray(0.9))


def test_non_float_updates_are_rejected(key):
    params = {"a": jnp.ones(3), "steps": jnp.zeros((2,), jnp.int32)}
    tx = ox.adam(1e-3)
    with pytest.raises(TypeError, match=r"updates must be real floating point .* got int32 at \['steps'\]"):
        tx.update(params, tx.init(params), params)
