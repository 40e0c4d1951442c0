"""The dynamic 8-bit code and blockwise quantization, against a float64 numpy reference.

Foundation of 8-bit optimizer states (Dettmers et al., ICLR 2022); the map is built as in the
paper's reference code, the quantizer finds the nearest code analytically (no table search).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_ext import quantization as Q


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map(signed):
    m = Q.dynamic_map(signed)
    assert m.shape == (256,) and np.all(np.diff(m) > 0)
    assert m[-1] == 1.0 and 0.0 in m
    if signed:
        assert m[127] == 0.0 and np.allclose(m[:127], -m[128:255][::-1])
    else:
        assert m[0] == 0.0 and m[1] > 0
    # Seven decades: the smallest non-zero magnitude is 10^-6 times the mid of the first level.
    assert np.isclose(np.min(np.abs(m[m != 0])), 1e-6 * (0.1 + 0.9 / (2 if signed else 4)))


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_matches_the_float64_argmin(key, signed):
    k1, k2 = jax.random.split(key)
    low = -1.0 if signed else 0.0
    x = jax.random.uniform(k1, (100_000,), minval=low, maxval=1.0) * 10.0 ** jax.random.uniform(k2, (100_000,),
                                                                                                minval=-7, maxval=0)
    table = Q.dynamic_map(signed)
    x = jnp.concatenate([x, jnp.asarray(table, jnp.float32)])  # every map value maps to itself
    got = np.asarray(Q.quantize(x, signed))
    want = Q.quantize_reference(np.asarray(x), signed)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[-256:], np.arange(256))


@pytest.mark.parametrize("signed", [True, False])
def test_ties_are_within_one_code(signed):
    table = Q.dynamic_map(signed)
    mids = jnp.asarray((table[1:] + table[:-1]) / 2, jnp.float32)
    got = np.asarray(Q.quantize(mids, signed)).astype(int)
    want = Q.quantize_reference(np.asarray(mids), signed).astype(int)
    assert np.max(np.abs(got - want)) <= 1


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(7,), (1000,), (3, 5, 70), (4096,)])
def test_blockwise_matches_reference_and_bounds_the_error(key, shape, signed):
    x = jax.random.normal(key, shape) * jnp.exp(jax.random.normal(jax.random.fold_in(key, 1), shape))
    if not signed:
        x = jnp.abs(x)
    spec = Q.Int8Blockwise(block_size=256)
    q = Q.quantize_blockwise(x, spec, signed)
    assert q.codes.shape == x.shape and q.codes.dtype == jnp.uint8
    assert q.absmax.shape == (spec.num_blocks(x.size),)
    codes, absmax = Q.quantize_blockwise_reference(np.asarray(x), 256, signed)
    np.testing.assert_allclose(np.asarray(q.absmax), absmax, rtol=1e-7)
    assert np.max(np.abs(np.asarray(q.codes, int) - codes.astype(int))) <= 1
    # Error per block: at most half the gap between neighbouring map values around the value,
    # times the block's absmax.
    back = np.asarray(Q.dequantize_blockwise(q, spec, signed), np.float64)
    table = Q.dynamic_map(signed)
    gaps = np.diff(table).max()
    per_block_max = np.repeat(absmax, 256)[:x.size].reshape(shape)
    # (-absmax itself sits exactly half a gap from the last negative code: the f32 product of code
    # value and absmax may add an ulp of x.)
    x64 = np.asarray(x, np.float64)
    assert np.all(np.abs(back - x64) <= 0.5 * gaps * per_block_max + 2 * np.finfo(np.float32).eps * np.abs(x64))


def test_spec_checks():
    with pytest.raises(ValueError, match="block_size must be a power of 2, got 100"):
        Q.Int8Blockwise(block_size=100)
    with pytest.raises(ValueError, match="min_size must be a positive int"):
        Q.Int8Blockwise(min_size=0)
    assert Q.int8_blockwise.applies_to(4096) and not Q.int8_blockwise.applies_to(4095)
