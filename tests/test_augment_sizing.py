"""crop, center_crop, pad, resize and random_resized_crop against float64 NumPy references.

The references are written from torchvision's documented algorithms (crop-then-resize, PIL's antialiased
bilinear coefficients, torch's align_corners=False bilinear, center_crop's pad-then-round anchor), not from
the library's code; Pillow, when installed, is a second, independent reference for resize.
"""

import math
from fractions import Fraction
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_ext.augment as A
from optax_ext.augment import geometric, sizing


def rand_image(seed, shape, dtype=np.float32):
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(dtype)


# ----------------------------------------------------------------------------
# float64 references.
# ----------------------------------------------------------------------------


def weights_antialias(n, m):
    """PIL's ImagingResample coefficients (bilinear, support 1 scaled by the reduction), n -> m."""
    scale = n / m
    fs = max(scale, 1.0)
    wts = np.zeros((m, n))
    for i in range(m):
        center = (i + 0.5) * scale
        xmin = max(int(center - fs + 0.5), 0)
        xmax = min(int(center + fs + 0.5), n)
        for k in range(xmin, xmax):
            wts[i, k] = max(0.0, 1.0 - abs((k - center + 0.5) / fs))
        wts[i] /= wts[i].sum()
    return wts


def weights_bilinear(n, m):
    """torch upsample_bilinear2d, align_corners=False: source clamped at 0, last pixel repeated."""
    scale = n / m
    wts = np.zeros((m, n))
    for i in range(m):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = int(src)
        i1 = i0 + 1 if i0 < n - 1 else i0
        lam = src - i0
        wts[i, i0] += 1.0 - lam
        wts[i, i1] += lam
    return wts


def weights_nearest(n, m):
    """Nearest-exact: the input pixel whose span holds the output centre, in exact rationals."""
    wts = np.zeros((m, n))
    for i in range(m):
        wts[i, math.floor(Fraction(2 * i + 1, 2 * m) * n)] = 1.0
    return wts


def ref_resize(x, out_h, out_w, interpolation="bilinear", antialias=True):
    """Resizes the whole of x (float64): rows, then columns."""
    h, w, _ = x.shape
    if interpolation == "nearest":
        make = weights_nearest
    else:
        make = weights_antialias if antialias else weights_bilinear
    x = np.asarray(x, np.float64)
    y = np.einsum("ik,kjc->ijc", make(h, out_h), x)
    return np.einsum("jl,ilc->ijc", make(w, out_w), y)


def ref_resized_crop(x, top, left, bh, bw, out_h, out_w, interpolation, antialias):
    """torchvision's resized_crop: crop the box first, then resize the crop."""
    return ref_resize(x[top : top + bh, left : left + bw], out_h, out_w, interpolation, antialias)


def ref_crop(x, top, left, height, width):
    """torchvision crop_image: slice the part inside, zero-pad the rest."""
    h, w, c = x.shape
    out = np.zeros((height, width, c), x.dtype)
    for i in range(height):
        for j in range(width):
            if 0 <= top + i < h and 0 <= left + j < w:
                out[i, j] = x[top + i, left + j]
    return out


def ref_center_crop(x, ch, cw):
    """torchvision center_crop_image, step by step: zero-pad if the crop is larger, then round the anchor."""
    h, w, _ = x.shape
    if ch > h or cw > w:
        pl = (cw - w) // 2 if cw > w else 0
        pt = (ch - h) // 2 if ch > h else 0
        pr = (cw - w + 1) // 2 if cw > w else 0
        pb = (ch - h + 1) // 2 if ch > h else 0
        x = np.pad(x, ((pt, pb), (pl, pr), (0, 0)))
        h, w, _ = x.shape
    top = round((h - ch) / 2.0)
    left = round((w - cw) / 2.0)
    return x[top : top + ch, left : left + cw]


# ----------------------------------------------------------------------------
# resize.
# ----------------------------------------------------------------------------

RESIZE_CASES = [
    ((17, 23, 3), (7, 9)),  # downscale by non-integer factors
    ((17, 23, 3), (40, 31)),  # upscale
    ((17, 23, 3), (5, 50)),  # down rows, up columns
    ((32, 32, 1), (8, 8)),  # integer 4x reduction
    ((9, 6, 3), (9, 4)),  # one axis unchanged
    ((1, 7, 2), (3, 2)),  # a single row
]


@pytest.mark.parametrize("shape,out", RESIZE_CASES)
@pytest.mark.parametrize("interpolation,antialias", [("bilinear", True), ("bilinear", False), ("nearest", True)])
def test_resize_matches_reference(shape, out, interpolation, antialias):
    x = rand_image(hash((shape, out)) % 2**31, shape)
    got = A.resize(x, out, interpolation=interpolation, antialias=antialias)
    assert got.shape == out + shape[2:] and got.dtype == x.dtype
    ref = ref_resize(x, *out, interpolation, antialias)
    if interpolation == "nearest":
        np.testing.assert_array_equal(got, ref.astype(np.float32))
    else:
        np.testing.assert_allclose(got, ref, atol=2e-6)


def test_resize_antialias_only_matters_when_downscaling():
    x = rand_image(1, (11, 13, 3))
    up = A.resize(x, (20, 30))
    np.testing.assert_array_equal(up, A.resize(x, (20, 30), antialias=False))
    down_aa = np.asarray(A.resize(x, (4, 5)))
    down = np.asarray(A.resize(x, (4, 5), antialias=False))
    assert np.abs(down_aa - down).max() > 1e-2
    # Antialiasing is a low-pass filter: a checkerboard reduced 3x is near its mean, not aliased.
    board = (np.indices((30, 30)).sum(0) % 2).astype(np.float32)[..., None]
    np.testing.assert_allclose(A.resize(board, (10, 10)), 0.5, atol=0.12)
    assert np.ptp(np.asarray(A.resize(board, (10, 10), antialias=False))) > 0.9


def test_resize_matches_pillow():
    image = pytest.importorskip("PIL.Image")
    x = rand_image(2, (19, 26, 1))
    pil = image.fromarray(x[..., 0].astype(np.float32), mode="F")
    for out_h, out_w in [(7, 9), (40, 33), (19, 11)]:
        ref = np.asarray(pil.resize((out_w, out_h), image.Resampling.BILINEAR))
        np.testing.assert_allclose(A.resize(x, (out_h, out_w))[..., 0], ref, atol=1e-5)
        # Nearest: equal except at exact ties ((i + 0.5) * in / out an integer: the output centre is on the
        # boundary of two input pixels), where Pillow's float64 product may land on the pixel before ours.
        got = np.asarray(A.resize(x, (out_h, out_w), interpolation="nearest")[..., 0])
        ref = np.asarray(pil.resize((out_w, out_h), image.Resampling.NEAREST))
        tie_r = (2 * np.arange(out_h) + 1) * 19 % (2 * out_h) == 0
        tie_c = (2 * np.arange(out_w) + 1) * 26 % (2 * out_w) == 0
        tie = tie_r[:, None] | tie_c[None, :]
        np.testing.assert_array_equal(got[~tie], ref[~tie])
        rows = (2 * np.arange(out_h) + 1) * 19 // (2 * out_h) - tie_r
        cols = (2 * np.arange(out_w) + 1) * 26 // (2 * out_w) - tie_c
        before = x[rows][:, cols, 0]
        assert np.all((ref == got) | (ref == before))


def test_resize_output_size_semantics():
    x = rand_image(3, (12, 20, 3))
    # An int (or [int]) is the shorter side; the longer is int(s * long / short), as torchvision.
    assert A.resize(x, 6).shape == (6, 10, 3)
    assert A.resize(x, [9]).shape == (9, 15, 3)
    assert A.resize(x.transpose(1, 0, 2), 9).shape == (15, 9, 3)
    assert A.resize(x, 7).shape == (7, int(7 * 20 / 12), 3)
    # max_size caps the longer side; size=None sets it.
    assert A.resize(x, 9, max_size=12).shape == (int(12 * 9 / 15), 12, 3)
    assert A.resize(x, 9, max_size=16).shape == (9, 15, 3)
    assert A.resize(x, None, max_size=10).shape == (6, 10, 3)
    # A pair is (h, w); the same size returns the image itself.
    assert A.resize(x, (5, 5)).shape == (5, 5, 3)
    assert A.resize(x, (12, 20)) is x
    assert A.resize(x, 12) is x


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_resize_dtype_range_jit_vmap(dtype):
    xs = jnp.asarray(np.stack([rand_image(s, (13, 10, 3)) for s in range(3)]), dtype)
    fn = jax.jit(jax.vmap(partial(A.resize, size=(6, 17))))
    out = fn(xs)
    assert out.shape == (3, 6, 17, 3) and out.dtype == dtype
    single = np.stack([np.asarray(A.resize(x, (6, 17)), np.float32) for x in xs])
    np.testing.assert_allclose(np.asarray(out, np.float32), single, atol=1e-6 if dtype == jnp.float32 else 1e-2)
    ref = np.stack([ref_resize(np.asarray(x, np.float64), 6, 17) for x in np.asarray(xs, np.float32)])
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=1e-5 if dtype == jnp.float32 else 1e-2)
    # Convex weights: the output stays inside the input's range.
    o = np.asarray(out, np.float32)
    assert o.min() >= float(jnp.min(xs)) and o.max() <= float(jnp.max(xs))


# ----------------------------------------------------------------------------
# crop, center_crop, pad.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_crop_matches_torchvision(dtype):
    x = np.asarray(rand_image(4, (9, 14, 3)), dtype)
    cases = [(0, 0, 9, 14), (2, 3, 5, 7), (8, 13, 1, 1), (-2, 4, 6, 3), (5, -3, 7, 20), (-4, -4, 2, 2), (20, 1, 3, 3)]
    for top, left, ch, cw in cases:
        out = A.crop(x, top, left, ch, cw)
        assert out.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(out), ref_crop(x, top, left, ch, cw))
    # Traced offsets, one per image under vmap (zero where the window leaves the image).
    tops = jnp.array([0, -3, 6, 2])
    lefts = jnp.array([5, 1, -2, 12])
    fn = jax.jit(jax.vmap(lambda top, left: A.crop(x, top, left, 5, 4)))
    out = np.asarray(fn(tops, lefts))
    for k in range(4):
        np.testing.assert_array_equal(out[k], ref_crop(x, int(tops[k]), int(lefts[k]), 5, 4))


def test_center_crop_matches_torchvision():
    # Even and odd margins of both signs, per axis and mixed (one axis cropped, the other padded).
    for shape, sizes in [
        ((9, 14, 3), [(1, 1), (4, 14), (5, 11), (9, 14), (9, 15), (12, 3), (2, 19), (14, 21)]),
        ((10, 7, 1), [(7, 4), (3, 6), (10, 7), (13, 2), (11, 10)]),
    ]:
        x = rand_image(5, shape)
        for ch, cw in sizes:
            out = np.asarray(A.center_crop(x, (ch, cw)))
            np.testing.assert_array_equal(out, ref_center_crop(x, ch, cw), err_msg=str((shape, ch, cw)))
    x = rand_image(6, (9, 14, 3))
    np.testing.assert_array_equal(A.center_crop(x, 4), ref_center_crop(x, 4, 4))
    np.testing.assert_array_equal(A.center_crop(x, [5]), ref_center_crop(x, 5, 5))
    # Odd margins round half to even, as torchvision: 7 -> 4 starts at row 2 (1.5), 9 -> 4 also at 2 (2.5).
    assert sizing.center_offset(7, 4) == 2 and sizing.center_offset(9, 4) == 2
    assert sizing.center_offset(4, 7) == -1


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "symmetric"])
def test_pad_matches_numpy(mode):
    x = rand_image(7, (6, 5, 3))
    for padding, ltrb in [
        (2, (2, 2, 2, 2)),
        ([3], (3, 3, 3, 3)),
        ((1, 4), (1, 4, 1, 4)),
        ((0, 2, 3, 1), (0, 2, 3, 1)),
        ((4, 0, 0, 5), (4, 0, 0, 5)),
    ]:
        left, t, r, b = ltrb
        out = np.asarray(A.pad(x, padding, fill=0.25, padding_mode=mode))
        kw = {"constant_values": 0.25} if mode == "constant" else {}
        ref = np.pad(x.astype(np.float64), ((t, b), (left, r), (0, 0)), mode=mode, **kw)
        np.testing.assert_array_equal(out, ref.astype(np.float32))
    # torchvision's documented examples on a row [1 2 3] padded by 2.
    row = np.array([1.0, 2.0, 3.0], np.float32).reshape(1, 3, 1)
    expect = {
        "constant": [0, 0, 1, 2, 3, 0, 0],
        "edge": [1, 1, 1, 2, 3, 3, 3],
        "reflect": [3, 2, 1, 2, 3, 2, 1],
        "symmetric": [2, 1, 1, 2, 3, 3, 2],
    }[mode]
    np.testing.assert_array_equal(A.pad(row, (2, 0), padding_mode=mode)[0, :, 0], expect)


def test_pad_fill_per_channel_jit_vmap_dtype():
    x = rand_image(8, (4, 7, 3))
    fill = np.array([0.1, 0.5, 0.9], np.float32)
    out = np.asarray(A.pad(x, (1, 2, 3, 0), fill=fill))
    assert out.shape == (6, 11, 3)
    np.testing.assert_array_equal(out[2:, 1:8], x)
    np.testing.assert_array_equal(out[:2], np.broadcast_to(fill, (2, 11, 3)))
    np.testing.assert_array_equal(out[:, 8:], np.broadcast_to(fill, (6, 3, 3)))
    xs = jnp.asarray(np.stack([x, x[::-1]]), jnp.bfloat16)
    fn = jax.jit(jax.vmap(lambda im, f: A.pad(im, 2, fill=f)))
    got = fn(xs, jnp.array([0.0, 1.0]))
    assert got.dtype == jnp.bfloat16 and got.shape == (2, 8, 11, 3)
    np.testing.assert_array_equal(got[1, 2:-2, 2:-2], xs[1])  # bit-exact copy
    assert np.all(np.asarray(got[1, :2], np.float32) == 1.0) and np.all(np.asarray(got[0, :2], np.float32) == 0)


def test_eval_pipeline_under_vmap():
    # The usual evaluation transform: shorter side to 16, centre 12 x 12.
    xs = jnp.asarray(np.stack([rand_image(s, (21, 30, 3)) for s in range(2)]))
    fn = jax.jit(jax.vmap(lambda x: A.center_crop(A.resize(x, 16), 12)))
    out = np.asarray(fn(xs))
    assert out.shape == (2, 12, 12, 3)
    for k in range(2):
        big = ref_resize(np.asarray(xs[k], np.float64), 16, int(16 * 30 / 21))
        np.testing.assert_allclose(out[k], ref_center_crop(big, 12, 12), atol=2e-6)


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (lambda: A.resize(np.zeros((8, 8, 3), np.int16), 4), TypeError, r"resize: image must have a floating dtype"),
        (lambda: A.resize(np.zeros((8, 8)), 4), ValueError, r"resize: image must be 3-D"),
        (lambda: A.resize(np.zeros((8, 8, 3)), 0), ValueError, r"resize: size must be >= 1, got 0"),
        (lambda: A.resize(np.zeros((8, 8, 3)), (4, 4, 4)), TypeError, r"resize: size must be an int or a pair"),
        (lambda: A.resize(np.zeros((8, 8, 3)), 4.5), TypeError, r"resize: size must be a Python int, got 4.5"),
        (lambda: A.resize(np.zeros((8, 8, 3)), None), ValueError, r"resize: max_size is required when size is None"),
        (
            lambda: A.resize(np.zeros((8, 8, 3)), 6, max_size=6),
            ValueError,
            r"resize: max_size must be > size \(the shorter side\), got max_size=6 and size=6",
        ),
        (
            lambda: A.resize(np.zeros((8, 8, 3)), (4, 6), max_size=9),
            ValueError,
            r"resize: max_size applies only when size is an int",
        ),
        (
            lambda: A.resize(np.zeros((8, 8, 3)), 4, interpolation="bicubic"),
            ValueError,
            r"resize: interpolation must be one of \['bilinear', 'nearest'\], got 'bicubic'",
        ),
        (
            lambda: A.resize(np.zeros((8, 8, 3)), 4, antialias="yes"),
            TypeError,
            r"resize: antialias must be a bool, got 'yes'",
        ),
        (
            lambda: A.crop(np.zeros((8, 8, 3)), 1.5, 0, 2, 2),
            TypeError,
            r"crop: top must be an int or an integer scalar array, got 1.5",
        ),
        (
            lambda: A.crop(np.zeros((8, 8, 3)), 0, jnp.zeros(2, jnp.int32), 2, 2),
            TypeError,
            r"crop: left must be an int",
        ),
        (lambda: A.crop(np.zeros((8, 8, 3)), 0, 0, 0, 2), ValueError, r"crop: height must be >= 1, got 0"),
        (lambda: A.crop(np.zeros((8, 8, 3)), 0, 0, 2, jnp.int32(2)), TypeError, r"crop: width must be a Python int"),
        (lambda: A.center_crop(np.zeros((8, 8, 3)), (0, 3)), ValueError, r"center_crop: output_size must be >= 1"),
        (
            lambda: A.center_crop(np.zeros((8, 8, 3), np.int32), 3),
            TypeError,
            r"center_crop: image must have a floating dtype",
        ),
        (lambda: A.pad(np.zeros((8, 8, 3)), -1), ValueError, r"pad: padding must be >= 0, got -1"),
        (
            lambda: A.pad(np.zeros((8, 8, 3)), (1, 2, 3)),
            TypeError,
            r"pad: padding must be an int or a sequence of 1, 2 or 4 ints",
        ),
        (
            lambda: A.pad(np.zeros((8, 8, 3)), 1, padding_mode="wrap"),
            ValueError,
            r"pad: padding_mode must be one of \['constant', 'edge', 'reflect', 'symmetric'\], got 'wrap'",
        ),
        (
            lambda: A.pad(np.zeros((8, 8, 3)), 1, fill=(0.0, 1.0)),
            ValueError,
            r"pad: fill must be a scalar or have one value per channel \(3\)",
        ),
        (
            lambda: A.random_resized_crop(jax.random.key(0), np.zeros((8, 8, 3)), 4, antialias=None),
            TypeError,
            r"random_resized_crop: antialias must be a bool",
        ),
        (
            lambda: A.random_crop(jax.random.key(0), np.zeros((8, 8, 3)), 4, padding=(1, 2, 3)),
            TypeError,
            r"random_crop: padding must be an int or a sequence of 1, 2 or 4 ints",
        ),
    ],
)
def test_bad_arguments_raise(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


# ----------------------------------------------------------------------------
# random_resized_crop: crop first, then resize.
# ----------------------------------------------------------------------------


@partial(jax.jit, static_argnums=(1, 2, 3))
def _boxes(keys, h, w, scale):
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    return jnp.stack(jax.vmap(lambda k: jnp.stack(geometric._resized_crop_box(k, h, w, scale, log_ratio)))(keys))


def draw_boxes(keys, h, w, scale):
    """The (top, left, height, width) boxes random_resized_crop draws for these keys."""
    return [tuple(int(b) for b in box) for box in np.asarray(_boxes(keys, h, w, scale))]


def test_resample_box_reads_only_the_box():
    # A box in the middle of an image whose outside is another constant colour, upscaled: the edge output
    # pixels sit half an output pixel from the box edge, so a sampler clamped to the image would mix in
    # the outside colour.
    x = np.full((20, 24, 3), 5.0, np.float32)
    inside = rand_image(9, (6, 7, 3))
    x[8:14, 9:16] = inside
    box = tuple(jnp.float32(b) for b in (8, 9, 6, 7))
    for order, antialias, interpolation in [(1, True, "bilinear"), (1, False, "bilinear"), (0, True, "nearest")]:
        fn = jax.jit(
            partial(
                sizing.resample_box, out_size=(25, 30), order=order, antialias=antialias, max_scale=(20 / 25, 24 / 30)
            )
        )
        out = np.asarray(fn(jnp.asarray(x), box=box))
        assert out.max() <= 1.0, (order, antialias)
        np.testing.assert_allclose(out, ref_resize(inside, 25, 30, interpolation, antialias), atol=2e-6)


@pytest.mark.parametrize("interpolation,antialias", [("bilinear", True), ("bilinear", False), ("nearest", True)])
def test_random_resized_crop_is_crop_then_resize(interpolation, antialias):
    h, w, out_h, out_w = 23, 29, 31, 27
    keys = jax.random.split(jax.random.key(10), 12)
    boxes = draw_boxes(keys, h, w, (0.05, 0.6))
    images = []
    for seed, (top, left, bh, bw) in enumerate(boxes):
        x = np.full((h, w, 3), 7.0, np.float32)  # a colour outside [0, 1] everywhere but the box
        x[top : top + bh, left : left + bw] = rand_image(seed, (bh, bw, 3))
        images.append(x)
    op = partial(
        A.random_resized_crop, size=(out_h, out_w), scale=(0.05, 0.6), interpolation=interpolation, antialias=antialias
    )
    outs = np.asarray(jax.jit(jax.vmap(op))(keys, jnp.asarray(np.stack(images))))
    assert outs.max() <= 1.0  # no output pixel contains the outside colour
    assert any(bh < out_h and top > 0 for top, _, bh, _ in boxes)  # upscaled boxes away from the edge
    for x, out, box in zip(images, outs, boxes):
        ref = ref_resized_crop(x, *box, out_h, out_w, interpolation, antialias)
        np.testing.assert_allclose(out, ref, atol=2e-6, err_msg=str(box))


def test_random_resized_crop_downscale_antialias():
    x = rand_image(11, (40, 36, 3))
    keys = jax.random.split(jax.random.key(3), 4)
    for antialias in (True, False):
        op = jax.jit(jax.vmap(partial(A.random_resized_crop, image=x, size=9, scale=(0.5, 1.0), antialias=antialias)))
        for out, box in zip(np.asarray(op(keys)), draw_boxes(keys, 40, 36, (0.5, 1.0))):
            np.testing.assert_allclose(out, ref_resized_crop(x, *box, 9, 9, "bilinear", antialias), atol=2e-6)
