"""Cutout and random erasing: the erased region is a box of the right size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_ext.augment as A


def erased_box(out, fill_value=0.0):
    """(top, left, h, w) of the erased region of an all-ones image, checking
    that the erased pixels form exactly one axis-aligned rectangle."""
    mask = np.all(np.asarray(out, np.float32) == fill_value, axis=-1)
    if not mask.any():
        return None
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    top, left = rows[0], cols[0]
    h, w = rows[-1] - top + 1, cols[-1] - left + 1
    assert mask.sum() == h * w, "erased pixels are not a rectangle"
    return top, left, h, w


@pytest.mark.parametrize("shape", [(17, 23, 3), (32, 32, 1), (8, 8, 3)])
def test_cutout_box(shape):
    h, w, c = shape
    x = jnp.ones(shape)
    size = 6
    k = jax.random.key(0)
    np.testing.assert_array_equal(A.cutout(k, x, 0), x)
    outs = np.asarray(jax.jit(jax.vmap(lambda k: A.cutout(k, x, size)))(jax.random.split(k, 64)))
    interior = 0
    for out in outs:
        top, left, bh, bw = erased_box(out)
        assert bh <= size and bw <= size
        # Sides are only shortened where the square sticks out of the image.
        assert bh == size or top == 0 or top + bh == h
        assert bw == size or left == 0 or left + bw == w
        interior += bh == size and bw == size
    assert interior > 0
    # Per-channel fill.
    fill = np.linspace(0.1, 0.3, c).astype(np.float32)
    out = np.asarray(A.cutout(k, x, size, fill=fill))
    erased = np.any(out != 1.0, axis=-1)
    np.testing.assert_allclose(out[erased], np.broadcast_to(fill, out[erased].shape))


@pytest.mark.parametrize("shape", [(64, 48, 3), (17, 23, 1)])
def test_random_erasing_area_and_ratio_in_range(shape):
    h, w, _ = shape
    scale, ratio = (0.05, 0.3), (0.5, 2.0)
    x = jnp.ones(shape)
    fn = jax.jit(jax.vmap(lambda k: A.random_erasing(k, x, p=1.0, scale=scale, ratio=ratio)))
    outs = np.asarray(fn(jax.random.split(jax.random.key(1), 100)))
    n_erased = 0
    for out in outs:
        box = erased_box(out)
        if box is None:
            continue  # no attempt fitted (possible on tiny images): unchanged
        n_erased += 1
        _, _, bh, bw = box
        assert bh < h and bw < w
        # h = round(sqrt(A r)), w = round(sqrt(A / r)) => A = sqrt(Ar) sqrt(A/r)
        # and r = sqrt(Ar) / sqrt(A/r) within half-pixel rounding of (bh, bw).
        a_lo, a_hi = (bh - 0.5) * (bw - 0.5), (bh + 0.5) * (bw + 0.5)
        assert a_hi >= scale[0] * h * w and a_lo <= scale[1] * h * w
        r_lo, r_hi = (bh - 0.5) / (bw + 0.5), (bh + 0.5) / max(bw - 0.5, 1e-9)
        assert r_hi >= ratio[0] and r_lo <= ratio[1]
    assert n_erased >= 80
    if shape == (64, 48, 3):
        # Mean erased fraction close to the mean of U(scale) (rounding aside).
        fracs = [np.mean(np.asarray(o)[..., 0] == 0) for o in outs]
        assert abs(np.mean(fracs) - np.mean(scale)) < 0.03


def test_random_erasing_probability_values_and_identity():
    x = jnp.asarray(np.random.default_rng(0).uniform(0.2, 0.8, (20, 20, 3)), jnp.float32)
    k = jax.random.key(2)
    np.testing.assert_array_equal(A.random_erasing(k, x, p=0.0), x)
    fn = jax.jit(jax.vmap(lambda k: A.random_erasing(k, x, p=0.5)))
    outs = np.asarray(fn(jax.random.split(k, 400)))
    changed = np.any(outs != np.asarray(x), axis=(1, 2, 3))
    assert 0.4 < changed.mean() < 0.6
    out = np.asarray(A.random_erasing(k, x, p=1.0, value="random"))
    diff = np.any(out != np.asarray(x), axis=-1)
    assert diff.any() and 0 <= out.min() and out.max() < 1
    assert np.unique(out[diff]).size > 3  # per-pixel noise, not a constant
    out = np.asarray(A.random_erasing(k, x, p=1.0, value=(0.0, 0.5, 1.0)))
    diff = np.any(out != np.asarray(x), axis=-1)
    np.testing.assert_array_equal(out[diff], np.broadcast_to([0, 0.5, 1], out[diff].shape))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_and_vmap_match_single(dtype):
    x = jnp.broadcast_to(jnp.asarray(np.random.default_rng(3).uniform(0, 1, (9, 11, 3)), dtype), (3, 9, 11, 3))
    keys = jax.random.split(jax.random.key(3), 3)
    for op in (
        lambda k, im: A.cutout(k, im, 4, fill=0.5),
        lambda k, im: A.random_erasing(k, im, p=1.0, value="random"),
    ):
        b = jax.jit(jax.vmap(op))(keys, x)
        assert b.dtype == dtype and b.shape == x.shape
        for i in range(3):
            np.testing.assert_array_equal(b[i], op(keys[i], x[i]))
        assert not np.array_equal(b[0], b[1])
