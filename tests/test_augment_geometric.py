"""Geometric ops: exact inverses, numpy / scipy references, jit and vmap."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage as sp_ndimage

import optax_ext.augment as A

SHAPES = [(17, 23, 3), (8, 8, 3), (32, 32, 1)]


def rand_image(seed, shape, dtype=np.float32):
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_flips_exact(shape):
    x = rand_image(0, shape)
    np.testing.assert_array_equal(A.flip_left_right(x), x[:, ::-1])
    np.testing.assert_array_equal(A.flip_up_down(x), x[::-1])
    np.testing.assert_array_equal(A.flip_left_right(A.flip_left_right(x)), x)
    np.testing.assert_array_equal(A.flip_up_down(A.flip_up_down(x)), x)
    k = jax.random.key(0)
    np.testing.assert_array_equal(A.random_flip(k, x, p=0.0), x)
    np.testing.assert_array_equal(A.random_flip(k, x, p=1.0), x[:, ::-1])
    np.testing.assert_array_equal(A.random_flip(k, x, p=1.0, direction="vertical"), x[::-1])
    np.testing.assert_array_equal(A.random_flip(k, x, p=1.0, direction="both"), x[::-1, ::-1])


def test_random_flip_frequency():
    x = rand_image(1, (5, 6, 1))
    outs = jax.jit(jax.vmap(lambda k: A.random_flip(k, x, p=0.3)))(jax.random.split(jax.random.key(1), 400))
    flipped = np.all(np.asarray(outs) == x[:, ::-1], axis=(1, 2, 3))
    kept = np.all(np.asarray(outs) == x, axis=(1, 2, 3))
    assert np.all(flipped | kept)
    assert 0.22 < flipped.mean() < 0.38


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_rotate_identities(shape, interpolation):
    x = rand_image(2, shape)
    atol = 0 if interpolation == "nearest" else 1e-5
    for angle in (0.0, 360.0, -360.0):
        np.testing.assert_allclose(A.rotate(x, angle, interpolation=interpolation), x, atol=atol)
    np.testing.assert_allclose(A.rotate(x, 180.0, interpolation=interpolation), x[::-1, ::-1], atol=1e-5)
    if shape[0] == shape[1]:
        # Counter-clockwise quarter turn == np.rot90 (from axis 0 towards axis 1).
        np.testing.assert_allclose(A.rotate(x, 90.0, interpolation=interpolation), np.rot90(x, 1), atol=1e-5)
        np.testing.assert_allclose(A.rotate(x, -90.0, interpolation=interpolation), np.rot90(x, -1), atol=1e-5)


def forward_affine(angle_ccw, translate, scale, shear, center):
    """3x3 forward map in centred pixel coordinates, from the documented
    composition T C R S SHy SHx C^-1 (independent of the library's closed form)."""
    th = math.radians(angle_ccw)
    rot = np.array([[math.cos(th), math.sin(th), 0], [-math.sin(th), math.cos(th), 0], [0, 0, 1]])
    sc = np.diag([scale, scale, 1.0])
    shx = np.array([[1, -math.tan(math.radians(shear[0])), 0], [0, 1, 0], [0, 0, 1]])
    shy = np.array([[1, 0, 0], [-math.tan(math.radians(shear[1])), 1, 0], [0, 0, 1]])
    c = np.array([[1, 0, center[0]], [0, 1, center[1]], [0, 0, 1]])
    t = np.array([[1, 0, translate[0]], [0, 1, translate[1]], [0, 0, 1]])
    return t @ c @ rot @ sc @ shy @ shx @ np.linalg.inv(c)


def scipy_affine(x, fwd, order, fill):
    """Reference resampler: inverse map in float64, scipy map_coordinates."""
    h, w, ch = x.shape
    inv = np.linalg.inv(fwd)
    yy, xx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel(), np.ones(xx.size)])
    src = inv @ pts
    xi = src[0].reshape(h, w) + (w - 1) / 2
    yi = src[1].reshape(h, w) + (h - 1) / 2
    return np.stack(
        [
            sp_ndimage.map_coordinates(
                x[..., c].astype(np.float64), [yi, xi], order=order, mode="grid-constant", cval=fill
            )
            for c in range(ch)
        ],
        -1,
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_affine_matches_scipy_reference(shape):
    x = rand_image(3, shape)
    h, w, _ = shape
    cases = [
        dict(angle=25.0, translate=(2.0, -3.0), scale=1.2, shear=(10.0, -7.0)),
        dict(angle=-40.0, translate=(0.0, 1.0), scale=0.8, shear=(0.0, 0.0)),
        dict(angle=0.0, translate=(0.0, 0.0), scale=1.0, shear=(15.0, 0.0), center=(0.0, 0.0)),
    ]
    for case in cases:
        center = case.pop("center", None)
        cf = (0.0, 0.0) if center is None else (center[0] - w / 2, center[1] - h / 2)
        fwd = forward_affine(case["angle"], case["translate"], case["scale"], case["shear"], cf)
        out = A.affine(x, **case, interpolation="bilinear", fill=0.25, center=center)
        np.testing.assert_allclose(out, scipy_affine(x, fwd, 1, 0.25), atol=1e-4)


def test_affine_special_cases():
    x = rand_image(4, (17, 23, 3))
    np.testing.assert_allclose(
        A.affine(x, 33.0, interpolation="bilinear"), A.rotate(x, 33.0, interpolation="bilinear"), atol=1e-6
    )
    np.testing.assert_array_equal(A.affine(x), x)
    # Integer translation with per-channel fill: an exact shift.
    fill = np.array([0.1, 0.2, 0.3], np.float32)
    out = np.asarray(A.affine(x, translate=(3, -2), fill=fill))
    ref = np.broadcast_to(fill, x.shape).copy()
    ref[:-2, 3:] = x[2:, :-3]
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_random_rotation_and_affine_ranges():
    x = rand_image(5, (12, 12, 3))
    k = jax.random.key(2)
    np.testing.assert_array_equal(A.random_rotation(k, x, 0.0), x)
    np.testing.assert_array_equal(A.random_affine(k, x), x)
    # A random rotation by U(-d, d) must equal rotate by some angle in range:
    # recover it by a fine 1-D search.
    out = np.asarray(A.random_rotation(k, x, (10.0, 20.0), interpolation="bilinear"))
    angles = np.linspace(9.0, 21.0, 241)
    errs = [np.abs(np.asarray(A.rotate(x, a, interpolation="bilinear")) - out).max() for a in angles]
    best = angles[int(np.argmin(errs))]
    assert min(errs) < 1e-2 and 10.0 - 0.05 <= best <= 20.0 + 0.05
    # Random translation only: an exact integer shift within +-20% of the size.
    out = np.asarray(A.random_affine(k, x, translate=(0.2, 0.2)))
    found = [
        (tx, ty)
        for tx in range(-3, 4)
        for ty in range(-3, 4)
        if np.array_equal(out, np.asarray(A.affine(x, translate=(tx, ty))))
    ]
    assert len(found) >= 1


def test_random_crop_is_a_window_of_the_padded_image():
    x = rand_image(6, (17, 23, 3))
    pad = 4
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), constant_values=0.5)
    fn = jax.jit(jax.vmap(lambda k: A.random_crop(k, x, (17, 23), padding=pad, fill=0.5)))
    outs = np.asarray(fn(jax.random.split(jax.random.key(3), 64)))
    offsets = set()
    for out in outs:
        hits = [
            (i, j)
            for i in range(2 * pad + 1)
            for j in range(2 * pad + 1)
            if np.array_equal(out, padded[i : i + 17, j : j + 23])
        ]
        assert len(hits) >= 1
        offsets.add(hits[0])
    assert len(offsets) > 20  # offsets vary across keys
    # Crop smaller than the image, no padding; reflect padding keeps the range.
    out = A.random_crop(jax.random.key(0), x, (8, 5))
    assert out.shape == (8, 5, 3)
    out = A.random_crop(jax.random.key(0), x, 20, padding=(3, 2), padding_mode="reflect")
    assert out.shape == (20, 20, 3)


@pytest.mark.parametrize("shape", SHAPES)
def test_random_resized_crop(shape):
    x = rand_image(7, shape)
    h, w, _ = shape
    k = jax.random.key(4)
    # Full box, output at input size: the identity (bilinear at integer points).
    full = A.random_resized_crop(k, x, (h, w), scale=(1.0, 1.0), ratio=(w / h, w / h))
    np.testing.assert_allclose(full, x, atol=1e-6)
    out = A.random_resized_crop(k, x, (16, 12))
    assert out.shape == (16, 12, shape[2])
    # Nearest, integer upscale of a box: each output pixel is an input pixel.
    out = np.asarray(A.random_resized_crop(k, x, (40, 40), scale=(0.2, 0.5), interpolation="nearest"))
    assert np.isin(out, x).all()
    # Impossible ratios: torchvision's central fallback with the clamped ratio.
    fb = np.asarray(
        A.random_resized_crop(k, x, (h, h), scale=(1.0, 1.0), ratio=(100.0, 100.0) if h > w else (0.01, 0.01))
    )
    assert fb.shape == (h, h, shape[2])


def test_elastic_deform():
    x = rand_image(8, (17, 23, 3))
    k = jax.random.key(5)
    np.testing.assert_allclose(A.elastic_deform(k, x, alpha=0.0), x, atol=1e-6)
    a = np.asarray(A.elastic_deform(k, x, alpha=34.0, sigma=4.0))
    b = np.asarray(A.elastic_deform(jax.random.key(6), x, alpha=34.0, sigma=4.0))
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert not np.allclose(a, x) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, A.elastic_deform(k, x, alpha=34.0, sigma=4.0))


def test_gaussian_blur_matches_scipy():
    from optax_ext.augment.geometric import gaussian_blur_2d

    f = np.random.default_rng(9).uniform(-1, 1, (13, 19)).astype(np.float32)
    for sigma in (1.0, 2.5):
        ref = sp_ndimage.gaussian_filter(f.astype(np.float64), sigma, mode="mirror", truncate=int(4 * sigma) / sigma)
        np.testing.assert_allclose(gaussian_blur_2d(f, sigma), ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_jit_vmap_dtype_range(dtype):
    shape = (9, 13, 3)
    xs = jnp.broadcast_to(jnp.asarray(rand_image(10, shape), dtype), (3,) + shape)
    keys = jax.random.split(jax.random.key(7), 3)
    ops = [
        partial(A.random_crop, size=(9, 13), padding=2),
        partial(A.random_resized_crop, size=(9, 13)),
        A.random_flip,
        partial(A.random_rotation, degrees=30.0, interpolation="bilinear"),
        partial(A.random_affine, degrees=10.0, translate=(0.1, 0.1), scale=(0.8, 1.2), shear=5.0),
        partial(A.elastic_deform, alpha=20.0, sigma=3.0),
    ]
    for op in ops:
        fn = jax.jit(jax.vmap(op))
        batched = fn(keys, xs)
        assert batched.shape == xs.shape and batched.dtype == dtype
        b = np.asarray(batched, np.float32)
        assert b.min() >= 0 and b.max() <= 1
        one = jax.jit(op)
        single = np.stack([np.asarray(one(k, x), np.float32) for k, x in zip(keys, xs)])
        np.testing.assert_allclose(b, single, atol=1e-5 if dtype == jnp.float32 else 1e-2)
        # Same key, same image: same output; different keys differ.
        again = fn(keys[np.array([0, 0, 1])], xs)
        np.testing.assert_array_equal(again[0], again[1])
        np.testing.assert_array_equal(again[0], batched[0])
        assert any(not np.array_equal(b[0], r) for r in b[1:])
