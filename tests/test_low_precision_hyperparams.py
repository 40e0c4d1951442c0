"""Hyperparameters stored in bfloat16, float16 or float8 are numbers like any other (jnp.issubdtype, not
NumPy's, classifies them), as Optax accepts them: passed directly, and through
`optax.inject_hyperparams`, which casts every hyperparameter to the params' dtype."""

import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import assert_trees_close, assert_trees_rel_close, random_tree

import optax_ext as ox

LOW = [jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn]
SHAPES = [(), (7,), (3, 5), (129,)]


def _step(tx, params, grads):
    state = tx.init(params)
    return tx.update(grads, state, params)[0]


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda lr: ox.adamw(lr, weight_decay=0.1), lambda lr: optax.adamw(lr, weight_decay=0.1)),
        (lambda lr: ox.sgd(lr, 0.9), lambda lr: optax.sgd(lr, 0.9)),
        (ox.lion, optax.lion),
        (ox.scale_by_learning_rate, optax.scale_by_learning_rate),
    ],
    ids=["adamw", "sgd", "lion", "scale_by_learning_rate"],
)
def test_low_precision_learning_rate_matches_optax(key, dtype, ours, theirs):
    lr = jnp.asarray(3e-3, dtype)
    params = random_tree(key, SHAPES)
    grads = random_tree(jax.random.fold_in(key, 1), SHAPES)
    # The reference gets the same value in f32 (Optax itself refuses to promote a float8 implicitly).
    expected = _step(theirs(lr.astype(jnp.float32)), params, grads)
    assert_trees_close(_step(ours(lr), params, grads), expected, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: jnp.dtype(d).name)
def test_low_precision_clip_threshold_matches_optax(key, dtype):
    params = random_tree(key, SHAPES)
    grads = random_tree(jax.random.fold_in(key, 1), SHAPES, scale=3.0)
    c = jnp.asarray(0.5, dtype)
    expected = _step(optax.clip_by_global_norm(c.astype(jnp.float32)), params, grads)
    assert_trees_close(_step(ox.clip_by_global_norm(c), params, grads), expected, rtol=2e-6)


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: jnp.dtype(d).name)
def test_low_precision_schedule_arguments(dtype):
    ours = ox.cosine_decay(jnp.asarray(1e-3, dtype), 100)
    theirs = optax.cosine_decay_schedule(jnp.asarray(1e-3, dtype).astype(jnp.float32), 100)
    for step in (0, 37, 100):
        assert float(ours(step)) == pytest.approx(float(theirs(step)), rel=1e-6)


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adafactor", "lion", "adamw", "lamb"])
def test_inject_hyperparams_with_low_precision_params_matches_optax(key, name, param_dtype):
    """`hyperparam_dtype=jnp.float32`: every optimizer, same update as Optax's. Hyperparameters in the
    params' dtype (the default): the same too, except where rounding breaks an optimizer (below)."""
    params = random_tree(key, SHAPES, dtype=param_dtype)
    grads = random_tree(jax.random.fold_in(key, 1), SHAPES, dtype=param_dtype)
    for hyperparam_dtype in (jnp.float32, None):
        ours = optax.inject_hyperparams(getattr(ox, name), hyperparam_dtype=hyperparam_dtype)(learning_rate=1e-3)
        theirs = optax.inject_hyperparams(getattr(optax, name), hyperparam_dtype=hyperparam_dtype)(learning_rate=1e-3)
        if hyperparam_dtype is None and name in ("adamw", "lamb") and param_dtype != jnp.float32:
            continue  # b2 = 0.999 rounds to 1 in the params' dtype: see the next test
        ours_h, theirs_h = ours.init(params).hyperparams, theirs.init(params).hyperparams
        # (Optax's adafactor also "injects" dtype_momentum=jnp.float32, a callable it takes for a schedule.)
        assert {k: v.dtype for k, v in ours_h.items()} == {k: theirs_h[k].dtype for k in ours_h}
        got, expected = _step(ours, params, grads), _step(theirs, params, grads)
        if param_dtype == jnp.float32:
            assert_trees_close(got, expected, rtol=1e-6, atol=1e-9)
        else:
            # Optax keeps its intermediate moments in the params' dtype (float16 subnormals for tiny
            # gradients; with default hyperparam_dtype also sqrt(nu) + eps in float16), we compute in
            # f32: up to ~1.3% apart on single elements, normwise.
            assert_trees_rel_close(got, expected, rel=0.02)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_b2_rounded_to_one_is_an_error_naming_the_cause(key, name):
    """In bfloat16, Adam's default b2 = 0.999 is 1: Optax then divides 0 by 0 in the bias correction and
    returns NaN updates; we refuse at init, saying why and what to pass."""
    params = random_tree(key, SHAPES, dtype=jnp.bfloat16)
    grads = random_tree(jax.random.fold_in(key, 1), SHAPES, dtype=jnp.bfloat16)
    theirs = optax.inject_hyperparams(getattr(optax, name))(learning_rate=1e-3)
    assert any(jnp.isnan(u).any() for u in jax.tree.leaves(_step(theirs, params, grads)))
    ours = optax.inject_hyperparams(getattr(ox, name))(learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"b2 must be in \[0, 1\).*bfloat16.*hyperparam_dtype=jnp.float32"):
        ours.init(params)


@pytest.mark.parametrize("bad", ["1e-3", True, jnp.asarray(1e-3 + 0j), jnp.ones(3, jnp.bfloat16)])
def test_non_numbers_are_still_refused(bad):
    with pytest.raises((TypeError, ValueError), match="learning_rate"):
        ox.adamw(bad)
