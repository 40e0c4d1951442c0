"""Photometric ops vs float64 numpy references written from the formulas
(torchvision's), colorsys for hue, and PIL for the 8-bit ops."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

import optax_ext.augment as A

SHAPES = [(17, 23, 3), (8, 8, 3), (32, 32, 1)]
LUMA = np.array([0.299, 0.587, 0.114])


def rand_image(seed, shape, dtype=np.float32):
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(dtype)


def luma(x):
    x = np.asarray(x, np.float64)
    return x if x.shape[-1] == 1 else (x @ LUMA)[..., None]


def np_blend(a, b, r):
    return np.clip(r * a + (1 - r) * b, 0, 1)


def close(out, ref, atol=1e-5):
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=atol, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_blend_family_matches_numpy(shape):
    x = rand_image(1, shape)
    xd = x.astype(np.float64)
    for f in (0.0, 0.3, 1.0, 1.7):
        close(A.adjust_brightness(x, f), np.clip(f * xd, 0, 1))
        close(A.adjust_contrast(x, f), np_blend(xd, luma(xd).mean(), f))
        sat_ref = xd if shape[-1] == 1 else np_blend(xd, luma(xd), f)
        close(A.adjust_saturation(x, f), sat_ref)
    close(A.grayscale(x), np.broadcast_to(luma(xd), shape))
    close(A.rgb_to_grayscale(x), luma(xd))
    close(A.invert(x), 1 - xd)


@pytest.mark.parametrize("shape", [(17, 23, 3), (8, 8, 3)])
def test_adjust_hue_matches_colorsys(shape):
    x = rand_image(2, shape)
    x[0, 0] = [0.5, 0.5, 0.5]  # grey pixel: hue undefined, must stay grey
    x[0, 1] = [0.8, 0.8, 0.2]  # ties for the max: sector choice must agree
    x[0, 2] = [0.3, 0.7, 0.7]
    x[0, 3] = [0.6, 0.1, 0.6]
    x[0, 4] = [1.0, 0.0, 0.0]
    for f in (-0.5, -0.2, 0.0, 0.13, 0.5):
        ref = np.empty(shape)
        for i in range(shape[0]):
            for j in range(shape[1]):
                h, s, val = colorsys.rgb_to_hsv(*x[i, j].astype(np.float64))
                ref[i, j] = colorsys.hsv_to_rgb((h + f) % 1.0, s, val)
        close(A.adjust_hue(x, f), ref, atol=2e-5)


def test_hsv_round_trip_and_single_channel_identity():
    x = rand_image(3, (9, 11, 3))
    close(A.hsv_to_rgb(A.rgb_to_hsv(x)), x.astype(np.float64))
    g = rand_image(4, (9, 11, 1))
    np.testing.assert_array_equal(A.adjust_hue(g, 0.3), g)
    np.testing.assert_array_equal(A.adjust_saturation(g, 0.0), g)


@pytest.mark.parametrize("shape", SHAPES)
def test_gamma_solarize_posterize_match_numpy(shape):
    x = rand_image(5, shape)
    xd = x.astype(np.float64)
    for g, gain in ((0.5, 1.0), (1.0, 1.0), (2.2, 0.8)):
        close(A.adjust_gamma(x, g, gain), np.clip(gain * xd**g, 0, 1))
    for t in (0.0, 0.4, 1.01):
        close(A.solarize(x, t), np.where(xd >= t, 1 - xd, xd))
    q = np.floor(x * (256 - 1e-3)).astype(np.uint8)
    for bits in range(8):
        mask = np.uint8((0xFF << (8 - bits)) & 0xFF)
        close(A.posterize(x, bits), (q & mask) / 255.0)
    np.testing.assert_array_equal(A.posterize(x, 8), x)  # 8 bits: identity


def np_sharpness(x, f):
    x = np.asarray(x, np.float64)
    k = np.ones((3, 3)) / 13.0
    k[1, 1] = 5 / 13.0
    deg = x.copy()
    h, w, _ = x.shape
    for i in range(1, h - 1):
        for j in range(1, w - 1):
            deg[i, j] = np.einsum("ijc,ij->c", x[i - 1 : i + 2, j - 1 : j + 2], k)
    return np_blend(x, deg, f)


@pytest.mark.parametrize("shape", SHAPES + [(2, 5, 3)])
def test_sharpness_matches_numpy(shape):
    x = rand_image(6, shape)
    for f in (0.0, 0.5, 1.0, 2.0):
        close(A.adjust_sharpness(x, f), np_sharpness(x, f))


def np_autocontrast(x):
    x = np.asarray(x, np.float64)
    lo, hi = x.min((0, 1)), x.max((0, 1))
    flat = hi == lo
    scale = np.where(flat, 1.0, 1.0 / np.where(flat, 1.0, hi - lo))
    return np.clip((x - np.where(flat, 0.0, lo)) * scale, 0, 1)


def test_autocontrast_matches_numpy_and_pil():
    x = 0.2 + 0.5 * rand_image(7, (17, 23, 3))
    x[..., 2] = 0.3  # a flat channel is left unchanged
    close(A.autocontrast(x), np_autocontrast(x))
    out = np.asarray(A.autocontrast(x))
    np.testing.assert_allclose(out.min((0, 1))[:2], 0, atol=1e-6)
    np.testing.assert_allclose(out.max((0, 1))[:2], 1, atol=1e-6)
    # PIL works on 8-bit levels and truncates: agree to within one level.
    q = np.round(x[..., :2] * 255).astype(np.uint8)
    pil = pil_per_channel(q, ImageOps.autocontrast) / 255.0
    close(A.autocontrast(q.astype(np.float32) / 255.0), pil, atol=1.0 / 255)


def pil_per_channel(q, fn):
    return np.stack([np.asarray(fn(Image.fromarray(q[..., c]))) for c in range(q.shape[-1])], -1)


@pytest.mark.parametrize("shape", SHAPES)
def test_8bit_ops_match_pil_exactly(shape):
    rng = np.random.default_rng(8)
    # A skewed histogram so that equalize actually moves levels.
    q = (255 * rng.beta(2, 5, shape)).astype(np.uint8)
    x = q.astype(np.float32) / 255.0  # exact 8-bit levels
    close(A.equalize(x), pil_per_channel(q, ImageOps.equalize) / 255.0, atol=1e-6)
    for bits in (1, 3, 4, 7):
        ref = pil_per_channel(q, lambda im, bits=bits: ImageOps.posterize(im, bits))
        close(A.posterize(x, bits), ref / 255.0, atol=1e-6)
    for t in (0, 64, 128, 200):
        ref = pil_per_channel(q, lambda im, t=t: ImageOps.solarize(im, t))
        close(A.solarize(x, t / 255.0), ref / 255.0, atol=1e-6)


def test_equalize_constant_channel_unchanged():
    x = np.full((6, 7, 3), 0.4, np.float32)
    np.testing.assert_array_equal(A.equalize(x), x)


def test_identity_at_neutral_parameters():
    x = rand_image(9, (17, 23, 3))
    for out in (
        A.adjust_brightness(x, 1.0),
        A.adjust_contrast(x, 1.0),
        A.adjust_saturation(x, 1.0),
        A.adjust_gamma(x, 1.0),
        A.adjust_sharpness(x, 1.0),
        A.solarize(x, 1.01),
        A.posterize(x, 8),
        A.invert(A.invert(x)),
    ):
        close(out, x.astype(np.float64), atol=1e-6)
    close(A.adjust_hue(x, 0.0), x.astype(np.float64), atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_shape_range_preserved(dtype):
    key = jax.random.key(0)
    for shape in ((17, 23, 3), (8, 8, 1)):
        x = jnp.asarray(rand_image(10, shape), dtype)
        outs = [
            A.adjust_brightness(x, 1.5),
            A.adjust_contrast(x, 1.5),
            A.adjust_saturation(x, 1.5),
            A.adjust_hue(x, 0.2),
            A.adjust_gamma(x, 0.5),
            A.adjust_sharpness(x, 2.0),
            A.grayscale(x),
            A.invert(x),
            A.solarize(x, 0.5),
            A.posterize(x, 3),
            A.equalize(x),
            A.autocontrast(x),
            A.color_jitter(key, x, 0.5, 0.5, 0.5, 0.2),
            A.random_gamma(key, x),
            A.random_grayscale(key, x, 0.5),
        ]
        for out in outs:
            assert out.shape == shape and out.dtype == dtype
            o = np.asarray(out, np.float32)
            assert o.min() >= 0 and o.max() <= 1


def test_color_jitter_factors_lie_in_ranges():
    """brightness <= 1 and saturation <= 1 never clip, so
    out = b (s x + (1 - s) luma(x)) in either order: regress out on (x, luma)
    to recover b and s exactly and check they lie in the ranges."""
    x = rand_image(11, (8, 9, 3))
    xd = x.astype(np.float64)
    fn = jax.jit(lambda k, im: A.color_jitter(k, im, brightness=(0.5, 1.0), saturation=(0.2, 1.0)))
    design = np.stack([xd.ravel(), np.broadcast_to(luma(xd), xd.shape).ravel()], 1)
    draws = []
    for seed in range(4):
        out = np.asarray(fn(jax.random.key(seed), x), np.float64).ravel()
        (a, b_), res, *_ = np.linalg.lstsq(design, out, rcond=None)
        assert np.abs(design @ [a, b_] - out).max() < 1e-5
        bright, sat = a + b_, a / (a + b_)
        assert 0.5 - 1e-5 <= bright <= 1.0 + 1e-5 and 0.2 - 1e-5 <= sat <= 1 + 1e-5
        draws.append((bright, sat))
    assert len({round(b, 4) for b, _ in draws}) == 4  # fresh draw per key
    k = jax.random.key(5)
    np.testing.assert_array_equal(fn(k, x), fn(k, x))


def test_color_jitter_random_order():
    """Fixed factors that clip: the two orders give different images and both
    occur across keys; nothing else occurs."""
    x = rand_image(12, (8, 9, 3))
    xd = x.astype(np.float64)
    fn = jax.jit(jax.vmap(lambda k: A.color_jitter(k, x, brightness=(2.0, 2.0), contrast=(0.5, 0.5))))
    b_first = np.clip(2 * xd, 0, 1)
    b_first = np_blend(b_first, luma(b_first).mean(), 0.5)
    c_first = np.clip(2 * np_blend(xd, luma(xd).mean(), 0.5), 0, 1)
    assert np.abs(b_first - c_first).max() > 0.05
    outs = np.asarray(fn(jax.random.split(jax.random.key(0), 32)), np.float64)
    is_b = np.abs(outs - b_first).max((1, 2, 3)) < 1e-5
    is_c = np.abs(outs - c_first).max((1, 2, 3)) < 1e-5
    assert np.all(is_b | is_c) and is_b.any() and is_c.any()


def test_random_ops_under_jit_and_vmap_match_per_image():
    # One image repeated: differences between rows come from the keys only.
    xs = jnp.broadcast_to(rand_image(12, (9, 10, 3)), (4, 9, 10, 3))
    keys = jax.random.split(jax.random.key(1), 4)
    ops = [
        lambda k, im: A.color_jitter(k, im, 0.4, 0.4, 0.4, 0.1),
        lambda k, im: A.random_gamma(k, im, (0.5, 2.0)),
        lambda k, im: A.random_grayscale(k, im, 0.5),
    ]
    for op in ops:
        batched = jax.jit(jax.vmap(op))(keys, xs)
        single = np.stack([op(k, x) for k, x in zip(keys, xs)])
        np.testing.assert_allclose(batched, single, atol=1e-5)
        assert any(not np.allclose(batched[0], b) for b in batched[1:])
