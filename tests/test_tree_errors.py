"""A tree that does not fit is named by its first differing path and what differs there, in a few
hundred characters, never with array values (the reproducers of a 2-layer NNX model)."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import optax_ext as ox
from optax_ext.tree_checks import tree_difference


class Block(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 8, rngs=rngs)


class Model(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([Block(rngs), Block(rngs)])


def _short_and_value_free(message: str):
    assert len(message) < 400, (len(message), message)
    assert "Array(" not in message and "0.0" not in message, message


@pytest.fixture
def model():
    return Model(nnx.Rngs(0))


def test_a_missing_gradient_leaf_is_named(model):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = jax.tree.map(jnp.ones_like, params)
    del grads["blocks"][1]["fc2"]
    tx = ox.adamw(1e-3)
    with pytest.raises(ValueError) as e:
        tx.update(grads, tx.init(params), params)
    _short_and_value_free(str(e.value))
    assert "at updates['blocks'][1]: params has ['fc2']" in str(e.value)


def test_an_nnx_state_against_a_dict_is_named(model):
    state = nnx.state(model, nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.to_pure_dict(state))
    tx = ox.adamw(1e-3)
    with pytest.raises(ValueError) as e:
        tx.update(grads, tx.init(state), state)
    _short_and_value_free(str(e.value))
    assert "updates has a dict" in str(e.value) and "params has a State" in str(e.value)


def test_a_mask_of_the_wrong_structure_fails_at_init(model):
    params = nnx.state(model, nnx.Param)
    for tx in (
        ox.adamw(1e-3, mask={"blocks": {0: True}}),
        ox.add_l1(0.1, mask={"blocks": True}),
        ox.lars(0.1, weight_decay_mask={"x": True}),
    ):
        with pytest.raises(ValueError, match="mask must have the structure of params") as e:
            tx.init(params)
        _short_and_value_free(str(e.value))
    # a prefix that fits is fine, as in Optax
    ox.adamw(1e-3, mask=jax.tree.map(lambda _: True, params)).init(params)


def test_a_state_from_other_params_is_named(model):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    other = {"blocks": {0: params["blocks"][0]}}
    tx = ox.adamw(1e-3)
    with pytest.raises(ValueError) as e:
        tx.update(params, tx.init(other), params)
    _short_and_value_free(str(e.value))
    assert "state.mu" in str(e.value) and "[1]" in str(e.value)


@pytest.mark.parametrize(
    "a,b,kw,expected",
    [
        ({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 2}}, {}, None),
        ({"a": 1}, {"a": 1, "b": 2}, {}, "at the root: y has ['b'] (a int), x does not"),
        ({"a": [1, 2]}, {"a": [1, 2, 3]}, {}, "at x['a']: y has [2] (a int), x does not"),
        ({"a": {"b": 1}}, {"a": 1}, {}, "at x['a']: x has a dict with 1 entry ['b'], y has a int"),
        ({"a": True}, {"a": {"b": 1, "c": 2}}, {"prefix": True}, None),
        ({"a": None}, {"a": {"b": 1}}, {"none_is_subtree": True}, None),
        (optax.EmptyState(), (), {}, "at the root: x has a EmptyState with 0 entries, y has a tuple with 0 entries"),
        ({"w": jnp.zeros((3, 2))}, {"w": {"k": 1}}, {}, "at x['w']: x has an array float32(3, 2), y has a dict"),
    ],
)
def test_tree_difference(a, b, kw, expected):
    got = tree_difference(a, b, "x", "y", **kw)
    if expected is None:
        assert got is None
    else:
        assert got.startswith(expected), got
