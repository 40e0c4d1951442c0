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
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"tree structures differ: {a_def} vs {e_def} {err_msg}"
    for a, e in zip(a_leaves, e_leaves):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol,
                                   err_msg=err_msg)


@pytest.fixture
def key(request):
    # A fresh key per test, derived from its name: different across tests, reproducible across
    # runs (crc32, unlike hash(), does not change with PYTHONHASHSEED).
    return jax.random.PRNGKey(zlib.crc32(request.node.nodeid.encode()))
