"""The conventions the augment package documents where it departs from torchvision's arithmetic.

Nearest-neighbour warps round exact half-pixel ties up (torchvision's grid_sample: half to even), and a
bilinear warp blends ``fill`` as interpolation of the image extended by ``fill``; both are checked against
float64 references with exact sines and cosines.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_ext.augment as A


def rand_image(seed, shape):
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


def round_half_away(p):
    return np.where(p >= 0, np.floor(p + 0.5), np.ceil(p - 0.5)).astype(int)


def ref_rotate_nearest(x, cos, sin, fill):
    """Counter-clockwise rotation about the centre, nearest, ties half away from zero (float64)."""
    h, w, _ = x.shape
    yy, xx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    col = round_half_away(cos * xx - sin * yy + (w - 1) / 2)
    row = round_half_away(sin * xx + cos * yy + (h - 1) / 2)
    inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    out = x[np.clip(row, 0, h - 1), np.clip(col, 0, w - 1)]
    return np.where(inside[..., None], out, np.float32(fill))


@pytest.mark.parametrize(
    "shape,angle,cos,sin",
    [
        ((16, 23, 2), 90.0, 0.0, 1.0),  # sides of different parity: every column position is a tie
        ((16, 23, 2), -90.0, 0.0, -1.0),
        ((16, 23, 2), 270.0, 0.0, -1.0),
        ((17, 23, 2), 30.0, math.sqrt(3) / 2, 0.5),  # ties where a coordinate is a multiple of sin 30 = 1/2
        ((17, 23, 2), -30.0, math.sqrt(3) / 2, -0.5),
    ],
)
def test_nearest_ties_round_up_consistently(shape, angle, cos, sin):
    x = rand_image(0, shape)
    out = np.asarray(A.rotate(x, angle, fill=0.5))
    np.testing.assert_array_equal(out, ref_rotate_nearest(x, cos, sin, 0.5))


def test_quarter_turn_with_ties_is_a_shifted_rot90():
    # A 16 x 23 image turned 90 degrees: every tie rounds the same way, so each kept source column
    # appears once (a half-pixel shift of np.rot90), where half-to-even would read every other one twice.
    x = rand_image(1, (16, 23, 1))
    out = np.asarray(A.rotate(x, 90.0, fill=-1.0))[..., 0]
    rot = np.rot90(x[..., 0], 1)  # (23, 16), counter-clockwise
    kept = out[:, ~np.all(out == -1.0, axis=0)]
    kept = kept[~np.all(kept == -1.0, axis=1)]
    rows = [
        i
        for i in range(rot.shape[0] - kept.shape[0] + 1)
        for j in range(rot.shape[1] - kept.shape[1] + 1)
        if np.array_equal(rot[i : i + kept.shape[0], j : j + kept.shape[1]], kept)
    ]
    assert rows, "the kept part is not a window of np.rot90"


def test_bilinear_fill_is_interpolation_of_the_extended_image():
    # Filling a constant image with its own colour changes nothing at any angle (torchvision's fill=c
    # weights the image twice at the border and would darken a ring there).
    c = np.array([0.2, 0.6, 0.9], np.float32)
    x = np.broadcast_to(c, (15, 20, 3)).copy()
    for angle in (17.0, 45.0, 90.0, 133.0):
        np.testing.assert_allclose(A.rotate(x, angle, interpolation="bilinear", fill=c), x, atol=1e-6)
    out = A.affine(x, 20.0, (3.5, -2.25), 0.7, (10.0, 5.0), interpolation="bilinear", fill=c)
    np.testing.assert_allclose(out, x, atol=1e-6)
    out = A.elastic_deform(jax.random.key(0), x, alpha=30.0, sigma=3.0, fill=c)
    np.testing.assert_allclose(out, x, atol=1e-6)
    # fill=0 is plain zero padding (torchvision's fill=None): border values are S(image), S = bilinear
    # sampling with zeros outside; the fill term vanishes.
    y = rand_image(2, (9, 12, 1))
    ones = np.ones_like(y)
    a = np.asarray(A.rotate(y, 37.0, interpolation="bilinear", fill=0.0))
    b = np.asarray(A.rotate(y, 37.0, interpolation="bilinear", fill=1.0))
    mask = np.asarray(A.rotate(ones, 37.0, interpolation="bilinear", fill=0.0))
    np.testing.assert_allclose(b, a + (1.0 - mask), atol=1e-6)


def test_package_docstring_states_the_conventions():
    doc = " ".join(A.__doc__.split())
    for phrase in [
        "counter-clockwise",
        "F.affine(x, angle=a)",
        "half to even",
        "NEAREST_EXACT",
        "fill=None",
        "B - 1 - i",
        "i - 1",
        "posterize",
        "k / 2^bits",
        "cutout",
        "2 (size // 2)",
        "shorter side",
        "antialias",
    ]:
        assert phrase in doc, phrase
    for name in ["crop", "center_crop", "pad", "resize"]:
        assert name in A.__all__ and callable(getattr(A, name)) and getattr(A, name).__doc__


def test_warps_under_jit_and_vmap_keep_the_tie_rule():
    xs = jnp.asarray(np.stack([rand_image(s, (16, 23, 1)) for s in range(2)]))
    out = jax.jit(jax.vmap(lambda x, a: A.rotate(x, a)))(xs, jnp.array([90.0, -90.0]))
    for x, o, s in zip(np.asarray(xs), np.asarray(out), (1.0, -1.0)):
        np.testing.assert_array_equal(o, ref_rotate_nearest(x, 0.0, s, 0.0))
