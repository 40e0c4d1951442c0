"""Per-leaf sum-of-squares kernels in the Pallas interpreter against float64 numpy.

Both layouts ("flat": Triton's masked 1-D blocks; "rows": Mosaic's (rows, 128) blocks plus a jnp
tail), with blocks small enough that every size spans several programs and ends in a partial block
whose out-of-range elements must be masked to zero. The interpreter fills out-of-range reads with
NaN (jax/_src/pallas/hlo_interpreter.py, "pad with NaN"), so a missing mask shows up as a NaN sum.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_ext.kernels import reductions, use_backend
from optax_ext.kernels.norms import leaf_sq_norms_pallas, sq_norm_pallas

SHAPES = [(), (1,), (7,), (1000,), (1031,), (3, 5, 7), (3 * 1024 + 5,), (130, 128)]
LAYOUTS = [("flat", 256), ("rows", 8), ("flat", None), ("rows", None)]


def _f64_sq_norm(x):
    x = np.asarray(x, np.float64)
    return float(np.sum(x * x))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("layout,block", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_sq_norm_matches_float64(key, shape, layout, block, dtype):
    x = (3.0 * jax.random.normal(key, shape) + 0.5).astype(dtype)
    got = sq_norm_pallas(x, backend="interpret", layout=layout, block=block)
    assert got.dtype == jnp.float32 and got.shape == ()
    # f32 accumulation of up to ~17K positive terms, blockwise: well inside 1e-6 relative.
    np.testing.assert_allclose(float(got), _f64_sq_norm(x), rtol=1e-6)
    np.testing.assert_allclose(float(got), float(reductions.sq_norm_reference(x)), rtol=1e-6)


def test_leaf_sq_norms_list_and_dispatch(key):
    keys = jax.random.split(key, 4)
    leaves = [jax.random.normal(keys[0], ()), jax.random.normal(keys[1], (7,)).astype(jnp.bfloat16),
              jax.random.normal(keys[2], (3, 5, 7)), jax.random.normal(keys[3], (1031,)).astype(jnp.float16),
              jnp.zeros((0, 4))]
    want = [_f64_sq_norm(x) for x in leaves]
    got = leaf_sq_norms_pallas(leaves, backend="interpret")
    np.testing.assert_allclose([float(v) for v in got], want, rtol=1e-6)
    with use_backend("interpret"):
        via_public = reductions.leaf_sq_norms(leaves)
        total = reductions.global_sq_norm(leaves)
    np.testing.assert_array_equal([float(v) for v in via_public], [float(v) for v in got])
    np.testing.assert_allclose(float(total), sum(want), rtol=1e-6)
    assert leaf_sq_norms_pallas([], backend="interpret") == []


def test_deterministic_and_jittable(key):
    x = jax.random.normal(key, (3 * 1024 + 5,))
    f = jax.jit(lambda x: sq_norm_pallas(x, backend="interpret", block=256))
    a, b = f(x), f(x)
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    np.testing.assert_allclose(float(a), _f64_sq_norm(x), rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(7,), (1_000_003,), (4096, 1000)])
def test_triton_on_gpu_matches_float64(key, shape):
    x = jax.random.normal(key, shape).astype(jnp.bfloat16)
    got = jax.jit(lambda x: sq_norm_pallas(x, backend="triton"))(x)
    np.testing.assert_allclose(float(got), _f64_sq_norm(x), rtol=1e-5)


def test_bad_arguments():
    x = jnp.ones((100,))
    with pytest.raises(ValueError, match="backend='gpu'"):
        sq_norm_pallas(x, backend="gpu")
    with pytest.raises(TypeError, match="int32"):
        sq_norm_pallas(jnp.ones((3,), jnp.int32), backend="interpret")
    with pytest.raises(ValueError, match="layout='cols'"):
        sq_norm_pallas(x, backend="interpret", layout="cols")
    with pytest.raises(ValueError, match="multiple of 8"):
        sq_norm_pallas(jnp.ones((2048,)), backend="interpret", layout="rows", block=4)
    with pytest.raises(ValueError, match="power of 2"):
        sq_norm_pallas(x, backend="triton", block=100)
    with pytest.raises(ValueError, match="block=0"):
        sq_norm_pallas(x, backend="interpret", block=0)
