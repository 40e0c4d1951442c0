"""The dynamic 8-bit code and blockwise quantization, against a float64 numpy reference.

The map is built as in the reference code of Dettmers et al. (ICLR 2022); `encode`/`decode` compute
codes and values analytically (what a kernel can do without a table) and must agree with the float64
argmin over the map and with a table lookup.
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
    assert m[-1] == 1.0 and m[Q.zero_code(signed)] == 0.0
    if signed:
        assert np.allclose(m[:127], -m[128:255][::-1])
    # Seven decades: the smallest non-zero magnitude is 10^-6 times the mid of the first level.
    assert np.isclose(np.min(np.abs(m[m != 0])), 1e-6 * (0.1 + 0.9 / (2 if signed else 4)))


@pytest.mark.parametrize("signed", [True, False])
def test_decode_matches_the_table(signed):
    codes = np.arange(256)
    got = np.asarray(Q.decode(jnp.asarray(codes, jnp.uint8), signed), np.float64)
    want = Q.decode_reference(codes, signed)
    # Computed in f32 from the level structure: within an f32 rounding of the float64 table value.
    np.testing.assert_allclose(got, want, rtol=2 * np.finfo(np.float32).eps, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_matches_the_float64_argmin(key, signed):
    k1, k2 = jax.random.split(key)
    low = -1.0 if signed else 0.0
    x = jax.random.uniform(k1, (100_000,), minval=low, maxval=1.0) * 10.0 ** jax.random.uniform(
        k2, (100_000,), minval=-8, maxval=0
    )
    table = Q.dynamic_map(signed)
    x = jnp.concatenate([x, jnp.asarray(table, jnp.float32)])  # every map value maps to itself
    got = np.asarray(Q.encode(x, signed))
    want = Q.quantize_reference(np.asarray(x), signed)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[-256:], np.arange(256))
    # decode(encode(x)) is the nearest map value.
    np.testing.assert_allclose(np.asarray(Q.decode(got, signed)), table[want], rtol=2e-7)


@pytest.mark.parametrize("signed", [True, False])
def test_ties_are_within_one_code(signed):
    table = Q.dynamic_map(signed)
    mids = jnp.asarray((table[1:] + table[:-1]) / 2, jnp.float32)
    got = np.asarray(Q.encode(mids, signed)).astype(int)
    want = Q.quantize_reference(np.asarray(mids), signed).astype(int)
    assert np.max(np.abs(got - want)) <= 1


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(7,), (1000,), (3, 5, 70), (4096,)])
def test_blockwise_matches_reference_and_bounds_the_error(key, shape, signed):
    x = jax.random.normal(key, shape) * jnp.exp(jax.random.normal(jax.random.fold_in(key, 1), shape))
    if not signed:
        x = jnp.abs(x)
    fmt = Q.QuantFormat(256, signed)
    q = Q.quantize_leaf(x, fmt)
    assert q.codes.shape == x.shape and q.codes.dtype == jnp.uint8
    assert q.absmax.shape == (fmt.num_blocks(x.size),)
    codes, absmax = Q.quantize_blockwise_reference(np.asarray(x), 256, signed)
    np.testing.assert_allclose(np.asarray(q.absmax), absmax, rtol=1e-7)
    # The blocks are normalized in f32 (x / absmax), the reference in float64: a value within an
    # f32 rounding of a midpoint between two codes may land on either.
    assert np.max(np.abs(np.asarray(q.codes, int) - codes.astype(int))) <= 1
    assert np.mean(np.asarray(q.codes) == codes) > 0.999
    # Error per element: at most half the widest gap of the map times the block's absmax.
    back = np.asarray(Q.dequantize_leaf(q), np.float64)
    gaps = np.diff(Q.dynamic_map(signed)).max()
    per_block_max = np.repeat(absmax, 256)[: x.size].reshape(shape)
    x64 = np.asarray(x, np.float64)
    assert np.all(np.abs(back - x64) <= 0.5 * gaps * per_block_max + 2 * np.finfo(np.float32).eps * np.abs(x64))
    # Relative error of the dynamic code: about constant over decades (here: 10% of values at most
    # one code-width relative error of their own decade's step).
    big = np.abs(x64) > 1e-3 * per_block_max
    assert np.all(np.abs(back - x64)[big] <= 0.5 * 0.9 / (2 if signed else 4) * 10 * np.abs(x64)[big])


def test_zeros_are_exact_and_the_state_is_a_pytree():
    fmt = Q.QuantFormat(256, True)
    z = Q.zeros_quantized((3, 1000), fmt)
    np.testing.assert_array_equal(np.asarray(z.codes), 127)
    np.testing.assert_array_equal(np.asarray(Q.dequantize_leaf(z)), 0.0)
    for fill, signed in ((1e-6, False), (-0.3, True), (2.5, True), (0.0, False)):
        f = Q.QuantFormat(256, signed)
        got, want = Q.zeros_quantized((3, 1000), f, fill), Q.quantize_leaf(jnp.full((3, 1000), fill), f)
        np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
        np.testing.assert_array_equal(np.asarray(got.absmax), np.asarray(want.absmax))
    leaves, treedef = jax.tree.flatten(z)
    assert [x.dtype for x in leaves] == [jnp.uint8, jnp.float32]
    back = jax.tree.unflatten(treedef, leaves)
    assert isinstance(back, Q.QuantizedArray) and back.format == fmt
    shapes = jax.eval_shape(lambda: Q.zeros_quantized((3, 1000), fmt))
    assert shapes.codes.shape == (3, 1000) and shapes.absmax.shape == (12,)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(z)[0]]
    assert paths == [".codes", ".absmax"]
    assert z.nbytes == 3000 + 4 * 12


def test_spec_checks():
    with pytest.raises(ValueError, match="block_size must be a power of 2, got 100"):
        Q.Int8Blockwise(block_size=100)
    with pytest.raises(ValueError, match="min_size must be a positive int"):
        Q.Int8Blockwise(min_size=0)
    assert Q.int8_blockwise.applies_to(4096) and not Q.int8_blockwise.applies_to(4095)
    assert not Q.int8_blockwise.applies_to(10**6, jnp.complex64)
