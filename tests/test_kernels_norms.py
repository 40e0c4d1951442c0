"""Sum-of-squares kernels in the Pallas interpreter against float64 numpy.

Both forms ("multi_tensor": Triton's multi-leaf launches with masked 1-D blocks; "per_leaf":
Mosaic's (rows, 128) slabs and 1-D blocks), with blocks small enough that every leaf spans several
programs and ends in a partial block whose out-of-range elements must read as zero. The
interpreter fills out-of-range reads with NaN (jax/_src/pallas/hlo_interpreter.py, "pad with NaN"),
so a missing mask shows up as a NaN sum.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from optax_ext.kernels import multi_tensor as mt
from optax_ext.kernels import reductions, use_backend
from optax_ext.kernels.norms import global_sq_norm_pallas, leaf_sq_norms_pallas

SHAPES = [(), (1,), (7,), (1000,), (1031,), (3, 5, 7), (3 * 1024 + 5,), (130, 128), (0, 4)]
FORMS = [("multi_tensor", 256), ("per_leaf", 8), ("multi_tensor", None), ("per_leaf", None)]


def _f64_sq_norm(x):
    x = np.asarray(x, np.float64)
    return float(np.sum(x * x))


def _leaves(key, shapes, dtypes=(jnp.float32,)):
    keys = jax.random.split(key, len(shapes))
    return [
        (3.0 * jax.random.normal(k, s) + 0.5).astype(dtypes[i % len(dtypes)])
        for i, (k, s) in enumerate(zip(keys, shapes))
    ]


def _count_pallas_calls(fn):
    def count(jaxpr):
        return sum(
            (eqn.primitive.name == "pallas_call") + sum(count(j) for j in jax.extend.core.jaxprs_in_params(eqn.params))
            for eqn in jaxpr.eqns
        )

    return count(jax.make_jaxpr(lambda: fn())().jaxpr)


@pytest.mark.parametrize(
    "dtypes", [(jnp.float32,), (jnp.bfloat16,), (jnp.float32, jnp.bfloat16, jnp.float16)], ids=["f32", "bf16", "mixed"]
)
@pytest.mark.parametrize("form,block", FORMS)
def test_leaf_sq_norms_match_float64(key, form, block, dtypes):
    leaves = _leaves(key, SHAPES, dtypes)
    got = leaf_sq_norms_pallas(leaves, backend="interpret", form=form, block=block)
    assert len(got) == len(leaves)
    for g, x in zip(got, leaves):
        assert g.dtype == jnp.float32 and g.shape == ()
        # f32 accumulation of up to ~17K positive terms, blockwise: well inside 1e-6 relative.
        np.testing.assert_allclose(float(g), _f64_sq_norm(x), rtol=1e-6)
        np.testing.assert_allclose(float(g), float(reductions.sq_norm_reference(x)), rtol=1e-6)
    total = global_sq_norm_pallas(leaves, backend="interpret", form=form, block=block)
    np.testing.assert_allclose(float(total), sum(_f64_sq_norm(x) for x in leaves), rtol=1e-6)


def test_big_leaf_default_blocks(key):
    (x,) = _leaves(key, [(2**17 + 3,)], (jnp.bfloat16,))
    for form in ("multi_tensor", "per_leaf"):
        (got,) = leaf_sq_norms_pallas([x], backend="interpret", form=form)
        np.testing.assert_allclose(float(got), _f64_sq_norm(x), rtol=1e-6)


def test_launches(key, monkeypatch):
    leaves = _leaves(key, SHAPES)
    multi = lambda: global_sq_norm_pallas(leaves, backend="interpret", block=256)
    assert _count_pallas_calls(multi) == 1  # 8 non-empty leaves, one launch
    monkeypatch.setattr("optax_ext.kernels.norms.triton.NORM_MAX_LEAVES", 3)
    assert _count_pallas_calls(multi) == 3
    np.testing.assert_allclose(float(multi()), sum(_f64_sq_norm(x) for x in leaves), rtol=1e-6)
    per_leaf = lambda: leaf_sq_norms_pallas(leaves, backend="interpret", form="per_leaf")
    assert _count_pallas_calls(per_leaf) == 8


def test_huge_leaf_through_its_2d_view(key, monkeypatch):
    monkeypatch.setattr(mt, "INDEX_LIMIT", 3000)
    monkeypatch.setattr(mt, "MIN_HUGE_COLS", 64)
    leaves = _leaves(key, [(5, 1031), (7,), (3001,)])  # (3001,): prime, over the limit: jnp
    got = leaf_sq_norms_pallas(leaves, backend="interpret", block=256)
    np.testing.assert_allclose([float(v) for v in got], [_f64_sq_norm(x) for x in leaves], rtol=1e-6)
    total = global_sq_norm_pallas(leaves, backend="interpret", block=256)
    np.testing.assert_allclose(float(total), sum(_f64_sq_norm(x) for x in leaves), rtol=1e-6)


def test_public_entry_points(key):
    leaves = _leaves(key, [(), (7,), (3, 5, 7), (1031,), (0, 4)], (jnp.float32, jnp.bfloat16, jnp.float16))
    want = [_f64_sq_norm(x) for x in leaves]
    with use_backend("interpret"):
        via_public = reductions.leaf_sq_norms(leaves)
        total = reductions.global_sq_norm(leaves)
    np.testing.assert_allclose([float(v) for v in via_public], want, rtol=1e-6)
    np.testing.assert_allclose(float(total), sum(want), rtol=1e-6)
    assert leaf_sq_norms_pallas([], backend="interpret") == []
    assert float(global_sq_norm_pallas([], backend="interpret")) == 0.0


def test_deterministic_and_jittable(key):
    leaves = _leaves(key, [(3 * 1024 + 5,), (1000,)])
    f = jax.jit(lambda xs: global_sq_norm_pallas(xs, backend="interpret", block=256))
    a, b = f(leaves), f(leaves)
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    np.testing.assert_allclose(float(a), sum(_f64_sq_norm(x) for x in leaves), rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_triton_on_gpu_matches_float64(key):
    leaves = _leaves(key, [(7,), (1_000_003,), (4096, 1000), (768,)], (jnp.bfloat16, jnp.float32))
    got = jax.jit(lambda xs: leaf_sq_norms_pallas(xs, backend="triton"))(leaves)
    total = jax.jit(lambda xs: global_sq_norm_pallas(xs, backend="triton"))(leaves)
    np.testing.assert_allclose([float(v) for v in got], [_f64_sq_norm(x) for x in leaves], rtol=1e-5)
    np.testing.assert_allclose(float(total), sum(_f64_sq_norm(x) for x in leaves), rtol=1e-5)


def test_bad_arguments():
    x = [jnp.ones((100,))]
    with pytest.raises(ValueError, match="backend='gpu'"):
        leaf_sq_norms_pallas(x, backend="gpu")
    with pytest.raises(TypeError, match="leaf 1 has dtype int32"):
        leaf_sq_norms_pallas(x + [jnp.ones((3,), jnp.int32)], backend="interpret")
    with pytest.raises(ValueError, match="form='cols'"):
        leaf_sq_norms_pallas(x, backend="interpret", form="cols")
    with pytest.raises(ValueError, match="multiple of 8"):
        global_sq_norm_pallas(x, backend="interpret", form="per_leaf", block=4)
    with pytest.raises(ValueError, match="power of 2"):
        leaf_sq_norms_pallas(x, backend="triton", block=100)
    with pytest.raises(ValueError, match="block=0"):
        leaf_sq_norms_pallas(x, backend="interpret", block=0)
