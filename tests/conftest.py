"""Shared fixtures: random ragged pytrees, tolerances."""

import os
import zlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

RAGGED_SHAPES = [(), (1,), (7,), (1000,), (3, 5, 7)]


def random_tree(key, shapes=RAGGED_SHAPES, dtype=jnp.float32, scale=1.0):
    """A dict pytree with one leaf per shape, fresh normal values."""
    keys = jax.random.split(key, len(shapes))
    return {f"w{i}": (scale * jax.random.normal(k, s, jnp.float32)).astype(dtype)
            for i, (k, s) in enumerate(zip(keys, shapes))}


def assert_trees_close(actual, expected, rtol=1e-6, atol=0.0, err_msg=""):
    """Elementwise: |a - e| <= atol + rtol |e| for every element of every leaf."""
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"tree structures differ: {a_def} vs {e_def} {err_msg}"
    for a, e in zip(a_leaves, e_leaves):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol,
                                   err_msg=err_msg)


def assert_trees_rel_close(actual, expected, rel=1e-6, err_msg=""):
    """Normwise relative error per leaf: max|a - e| <= rel * max|e|.

    The relative error of a vector, as numerical analysis defines it. Elementwise relative error
    is ill-conditioned for optimizer outputs: Adam's update is a ratio, and an element crossing
    zero has an arbitrarily large relative error from a one-ulp difference upstream.
    """
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"tree structures differ: {a_def} vs {e_def} {err_msg}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape, (a.shape, e.shape, err_msg)
        scale = np.max(np.abs(e)) if e.size else 0.0
        err = np.max(np.abs(a - e)) if e.size else 0.0
        assert err <= rel * scale or err == 0.0, (
            f"leaf {i} {e.shape}: max abs error {err:.3e} > {rel:g} * max|expected| {scale:.3e} {err_msg}")


@pytest.fixture
def key(request):
    # A fresh key per test, derived from its name: different across tests, reproducible across
    # runs (crc32, unlike hash(), does not change with PYTHONHASHSEED).
    return jax.random.PRNGKey(zlib.crc32(request.node.nodeid.encode()))
