"""Geometric augmentations: crops, flips, rotation, affine, elastic deformation.

Coordinate convention (torchvision's): pixel ``(i, j)`` (row, column) has its
centre at continuous position ``(x, y) = (j + 0.5, i + 0.5)``; the image centre
is ``(W / 2, H / 2)``. Every warp (rotation, affine, elastic) builds the
*inverse* map from an output pixel to an input position and samples there with
``jax.scipy.ndimage.map_coordinates`` (order 0 = nearest, 1 = bilinear) — see
``sample`` for the two places where this differs from torchvision's
``grid_sample``: the tie rule of ``"nearest"`` and how ``fill`` enters a
bilinear border. Crops that resize (``random_resized_crop``) read only the
box, as torchvision's crop-then-resize does (``optax_ext.augment.sizing``).
All shapes are static, so every op runs under ``jax.jit`` and ``jax.vmap``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import ndimage

from optax_ext.augment import _validate as v
from optax_ext.augment import sizing as sz

__all__ = [
    "flip_left_right",
    "flip_up_down",
    "random_flip",
    "random_crop",
    "random_resized_crop",
    "rotate",
    "random_rotation",
    "affine",
    "random_affine",
    "elastic_deform",
]


# ----------------------------------------------------------------------------
# Flips.
# ----------------------------------------------------------------------------


@v.keeps_uint8
def flip_left_right(image: jax.Array) -> jax.Array:
    """Mirrors an (H, W, C) image horizontally: ``out[i, j] = image[i, W-1-j]``."""
    v.check_image("flip_left_right", image)
    return image[:, ::-1, :]


@v.keeps_uint8
def flip_up_down(image: jax.Array) -> jax.Array:
    """Mirrors an (H, W, C) image vertically: ``out[i, j] = image[H-1-i, j]``."""
    v.check_image("flip_up_down", image)
    return image[::-1, :, :]


@v.keeps_uint8
def random_flip(key: jax.Array, image: jax.Array, p: float = 0.5, direction: str = "horizontal") -> jax.Array:
    """Flips with probability ``p`` (torchvision ``RandomHorizontalFlip``).

    Args:
      key: PRNG key.
      image: (H, W, C) float image.
      p: flip probability in [0, 1].
      direction: ``"horizontal"`` (left-right), ``"vertical"`` (up-down) or
        ``"both"`` (each axis flipped independently with probability ``p``).
    """
    fn = "random_flip"
    v.check_image(fn, image)
    v.check_probability(fn, "p", p)
    if direction not in ("horizontal", "vertical", "both"):
        raise ValueError(f"{fn}: direction must be 'horizontal', 'vertical' or 'both', got {direction!r}")
    k_h, k_v = jax.random.split(key)
    out = image
    if direction in ("horizontal", "both"):
        out = jnp.where(jax.random.uniform(k_h) < p, out[:, ::-1, :], out)
    if direction in ("vertical", "both"):
        out = jnp.where(jax.random.uniform(k_v) < p, out[::-1, :, :], out)
    return out


# ----------------------------------------------------------------------------
# Crops.
# ----------------------------------------------------------------------------


@v.keeps_uint8
def random_crop(
    key: jax.Array,
    image: jax.Array,
    size: int | Sequence[int],
    padding: int | Sequence[int] = 0,
    *,
    fill: Any = 0.0,
    padding_mode: str = "constant",
) -> jax.Array:
    """Pads, then crops a ``size`` window at a uniformly random offset.

    torchvision ``RandomCrop`` semantics: the padded image has shape
    ``(H + top + bottom, W + left + right)``; the window's top-left corner is
    uniform over all positions that keep it inside. The usual CIFAR recipe is
    ``random_crop(key, x, 32, padding=4)`` (He et al., 2016, "Deep Residual
    Learning for Image Recognition").

    Args:
      key: PRNG key.
      image: (H, W, C) float image.
      size: output size, an int or (h, w); static.
      padding: int, [p], (x, y) or (left, top, right, bottom) pixels; static
        (torchvision's spec, see ``pad``).
      fill: value for ``padding_mode="constant"``, scalar or one per channel.
      padding_mode: ``"constant"``, ``"edge"``, ``"reflect"`` or ``"symmetric"``.
    """
    fn = "random_crop"
    h, w, c = v.check_image(fn, image)
    out_h, out_w = v.size_pair(fn, "size", size)
    left, top, right, bottom = sz.padding_ltrb(fn, padding)
    padding_mode = sz.check_padding_mode(fn, padding_mode)
    ph, pw = h + top + bottom, w + left + right
    if out_h > ph or out_w > pw:
        raise ValueError(f"{fn}: size {(out_h, out_w)} is larger than the padded image {(ph, pw)}")
    x = sz.pad_ltrb(v.as_float32(image), (left, top, right, bottom), v.fill_vector(fn, fill, c), padding_mode)
    k_y, k_x = jax.random.split(key)
    y0 = jax.random.randint(k_y, (), 0, ph - out_h + 1)
    x0 = jax.random.randint(k_x, (), 0, pw - out_w + 1)
    out = jax.lax.dynamic_slice(x, (y0, x0, 0), (out_h, out_w, c))
    return out.astype(image.dtype)


def _resized_crop_box(key, h, w, scale, log_ratio, attempts=10):
    """torchvision ``RandomResizedCrop.get_params``, vectorised over attempts.

    Draws ``attempts`` boxes at once and keeps the first valid one; if none is
    valid, falls back to the largest central box with a clamped aspect ratio.
    Returns integer-valued (top, left, box_h, box_w) as float32 scalars.
    """
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = h * w
    target = area * jax.random.uniform(k_area, (attempts,), minval=scale[0], maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(k_ratio, (attempts,), minval=log_ratio[0], maxval=log_ratio[1]))
    bw = jnp.round(jnp.sqrt(target * aspect))
    bh = jnp.round(jnp.sqrt(target / aspect))
    valid = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)
    first = jnp.argmax(valid)
    # Fallback: central crop with the ratio clamped into the allowed range.
    in_ratio = w / h
    r_lo, r_hi = math.exp(log_ratio[0]), math.exp(log_ratio[1])
    if in_ratio < r_lo:
        fb_w, fb_h = w, round(w / r_lo)
    elif in_ratio > r_hi:
        fb_h, fb_w = h, round(h * r_hi)
    else:
        fb_w, fb_h = w, h
    any_valid = jnp.any(valid)
    box_h = jnp.where(any_valid, bh[first], float(fb_h))
    box_w = jnp.where(any_valid, bw[first], float(fb_w))
    u_top = jax.random.uniform(k_top, (attempts,))[first]
    u_left = jax.random.uniform(k_left, (attempts,))[first]
    top = jnp.where(any_valid, jnp.floor(u_top * (h - box_h + 1)), float((h - fb_h) // 2))
    left = jnp.where(any_valid, jnp.floor(u_left * (w - box_w + 1)), float((w - fb_w) // 2))
    return top, left, box_h, box_w


@v.keeps_uint8
def random_resized_crop(
    key: jax.Array,
    image: jax.Array,
    size: int | Sequence[int],
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    *,
    interpolation: str = "bilinear",
    antialias: bool = True,
) -> jax.Array:
    """Crops a random box and resizes it to ``size`` (Inception-style crop).

    Box (torchvision ``RandomResizedCrop``, Szegedy et al., 2015, "Going Deeper
    with Convolutions"): area ``= U(scale) * H * W``, aspect ratio
    ``w / h = exp(U(log ratio))``, ``w = round(sqrt(area * r))``,
    ``h = round(sqrt(area / r))``, top-left uniform; 10 attempts, then a central
    fallback. ``size``: an int ``s`` gives ``s x s`` (as torchvision's
    ``RandomResizedCrop``, unlike ``resize``), or ``(h, w)``.

    The box is then resized as torchvision's ``resized_crop`` does, which crops
    first and resizes the crop: only pixels inside the box are read, so an
    upscaled box repeats its own edge pixels, never the pixels next to it. With
    output pixel ``i`` centred at ``c_i = top + (i + 0.5) * box_h / out_h``
    (half-pixel centres, ``align_corners=False``; columns likewise):
    ``"bilinear"`` weighs box pixel ``k`` by ``max(0, 1 - |k + 0.5 - c_i| / f)``,
    renormalised over the box, with ``f = max(box_h / out_h, 1)`` when
    ``antialias`` (torchvision's default: a reduced box is low-pass filtered)
    and ``f = 1`` otherwise (plain bilinear); ``"nearest"`` takes box pixel
    ``floor((i + 0.5) * box_h / out_h)`` (torchvision's ``NEAREST_EXACT``, see
    ``optax_ext.augment.sizing``).
    """
    fn = "random_resized_crop"
    h, w, _ = v.check_image(fn, image)
    out_h, out_w = v.size_pair(fn, "size", size)
    scale = v.check_interval(fn, "scale", scale, 0.0, 1.0)
    ratio = v.check_interval(fn, "ratio", ratio, 0.0)
    if ratio[0] <= 0:
        raise ValueError(f"{fn}: ratio must be positive, got {ratio}")
    order = v.interpolation_order(fn, interpolation)
    if not isinstance(antialias, (bool, np.bool_)):
        raise TypeError(f"{fn}: antialias must be a bool, got {antialias!r}")
    box = _resized_crop_box(key, h, w, scale, (math.log(ratio[0]), math.log(ratio[1])))
    # Every box (fallback included) fits in the image: box_h / out_h <= H / out_h.
    out = sz.resample_box(v.as_float32(image), (out_h, out_w), box, order, bool(antialias), (h / out_h, w / out_w))
    return out.astype(image.dtype)


# ----------------------------------------------------------------------------
# Affine family.
# ----------------------------------------------------------------------------


def inverse_affine_matrix(angle, translate, scale, shear, center):
    """torchvision's ``_get_inverse_affine_matrix``, in jnp (traceable).

    The forward map is ``T * C * R(a) * S(s) * SHy(sy) * SHx(sx) * C^-1`` with
    ``SHx(s) = [[1, -tan s], [0, 1]]``, ``SHy(s) = [[1, 0], [-tan s, 1]]``; this
    returns its inverse as a (2, 3) matrix acting on centred coordinates. Here
    ``angle`` is in torchvision's *affine* convention (clockwise on screen).

    Args:
      angle: rotation in degrees.
      translate: (tx, ty) in pixels.
      scale: isotropic scale.
      shear: (sx, sy) in degrees.
      center: (cx, cy) relative to the image centre, in pixels.
    """
    rot = jnp.deg2rad(jnp.asarray(angle, jnp.float32))
    sx = jnp.deg2rad(jnp.asarray(shear[0], jnp.float32))
    sy = jnp.deg2rad(jnp.asarray(shear[1], jnp.float32))
    cx, cy = center
    tx, ty = translate
    a = jnp.cos(rot - sy) / jnp.cos(sy)
    b = -jnp.cos(rot - sy) * jnp.tan(sx) / jnp.cos(sy) - jnp.sin(rot)
    c = jnp.sin(rot - sy) / jnp.cos(sy)
    d = -jnp.sin(rot - sy) * jnp.tan(sx) / jnp.cos(sy) + jnp.cos(rot)
    # det([[a, b], [c, d]]) == 1, so the inverse is the adjugate (over scale).
    m0, m1, m3, m4 = d / scale, -b / scale, -c / scale, a / scale
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    return jnp.stack([jnp.stack([m0, m1, m2]), jnp.stack([m3, m4, m5])])


def warp(image: jax.Array, matrix: jax.Array, order: int, fill: jax.Array) -> jax.Array:
    """Samples ``image`` at ``matrix @ [x, y, 1]`` for every output pixel.

    ``matrix`` maps centred output coordinates to centred input coordinates;
    ``fill`` is a (C,) vector used outside the input. Input/output float32.
    """
    h, w, _ = image.shape
    ys = jnp.arange(h, dtype=jnp.float32) - (h - 1) / 2.0
    xs = jnp.arange(w, dtype=jnp.float32) - (w - 1) / 2.0
    yy, xx = jnp.meshgrid(ys, xs, indexing="ij")
    x_in = matrix[0, 0] * xx + matrix[0, 1] * yy + matrix[0, 2] + (w - 1) / 2.0
    y_in = matrix[1, 0] * xx + matrix[1, 1] * yy + matrix[1, 2] + (h - 1) / 2.0
    return sample(image, y_in, x_in, order, fill)


def sample(image, y_in, x_in, order, fill):
    """map_coordinates per channel with a constant (per-channel) fill.

    Positions are in index coordinates (pixel ``(i, j)`` at ``(i, j)``).

    Bilinear (order 1): ``out = S(image) + (1 - S(1)) * fill`` where ``S``
    samples with zeros outside: inside the image it is plain interpolation
    (bit-exact at integer points), at the border the weights of outside taps go
    to ``fill`` — bilinear interpolation of the image extended by a constant
    ``fill`` (SciPy's ``grid-constant`` mode with ``cval = fill``). torchvision's
    ``fill=c`` computes ``S(image) * S(1) + (1 - S(1)) * c`` instead: the image
    part is weighted by ``S(1)`` twice, so even filling a constant image with
    its own colour darkens the border ring. Ours keeps a constant image constant
    for any angle; with ``fill=0`` it equals torchvision's ``fill=None``
    (zeros padding), not its ``fill=0``, which darkens border pixels by the extra
    factor ``S(1)``.

    Nearest (order 0): the tap is ``round(position)`` with exact ties (a
    position ``k + 0.5``) rounded half away from zero — towards ``+inf``
    everywhere inside the image, so on a tie the whole output moves by the same
    half pixel, and a tie on the outer edge (``-0.5`` or ``n - 0.5``) takes
    ``fill`` on both sides. torchvision's ``grid_sample`` rounds half to even
    (``std::nearbyint``): on a row of ties ``0.5, 1.5, 2.5, 3.5`` it reads
    pixels ``0, 2, 2, 4`` (every other pixel twice, the rest dropped) where ours
    reads ``1, 2, 3, 4``. Ties are common: a 90 degree turn of an image whose
    height and width differ in parity, or 30 degrees on odd sizes. Positions are
    first snapped to 1/256 pixel so that float32 noise in cos/sin
    (``cos(pi/2) = -4.4e-8`` in float32) cannot break a tie one way or the
    other at random.
    """
    if order == 0:
        y_in = jnp.round(y_in * 256.0) / 256.0
        x_in = jnp.round(x_in * 256.0) / 256.0

    def one(ch):
        return ndimage.map_coordinates(ch, [y_in, x_in], order, mode="constant", cval=0.0)

    values = jax.vmap(one, in_axes=2, out_axes=2)(image)
    weight = one(jnp.ones(image.shape[:2], image.dtype))[..., None]
    return values + (1.0 - weight) * fill


def _center_f(fn, center, h, w):
    if center is None:
        return (0.0, 0.0)
    if not isinstance(center, Sequence) or len(center) != 2:
        raise TypeError(f"{fn}: center must be None or (x, y), got {center!r}")
    return (center[0] - w / 2.0, center[1] - h / 2.0)


def _pair(fn, name, x):
    if isinstance(x, Sequence):
        if len(x) != 2:
            raise ValueError(f"{fn}: {name} must be a number or a pair, got {x!r}")
        return x[0], x[1]
    return x, 0.0


@v.keeps_uint8
def affine(
    image: jax.Array,
    angle: Any = 0.0,
    translate: Sequence[Any] = (0.0, 0.0),
    scale: Any = 1.0,
    shear: Any = (0.0, 0.0),
    *,
    interpolation: str = "nearest",
    fill: Any = 0.0,
    center: Sequence[float] | None = None,
) -> jax.Array:
    """Rotation, scale, shear and translation in one resample.

    Forward map about ``center`` (default: the image centre):
    ``p_out = T + C + R(angle) S(scale) SHy(shear_y) SHx(shear_x) (p_in - C)``,
    as torchvision ``F.affine``, except that ``angle`` is **counter-clockwise**
    here (as in ``rotate`` and torchvision ``F.rotate``), so
    ``affine(x, angle=a) == rotate(x, a)``; torchvision's ``F.affine`` rotates
    clockwise (``F.affine(x, angle=-a)`` is this op). Arguments may be traced.

    Args:
      image: (H, W, C) float image.
      angle: degrees, counter-clockwise.
      translate: (tx, ty) in pixels (positive = right / down).
      scale: isotropic scale factor (> 0).
      shear: degrees; a number (x shear) or (shear_x, shear_y).
      interpolation: ``"nearest"`` or ``"bilinear"``; nearest rounds exact
        half-pixel ties up (torchvision: half to even), see ``sample``.
      fill: value for pixels mapped from outside, scalar or per channel; a
        bilinear border blends it as interpolation of the image extended by
        ``fill`` (``fill=0`` is torchvision's ``fill=None``), see ``sample``.
      center: (x, y) in continuous pixel coordinates, (0, 0) = top-left corner
        of the image; ``None`` = image centre.
    """
    fn = "affine"
    h, w, c = v.check_image(fn, image)
    order = v.interpolation_order(fn, interpolation)
    v.check_positive(fn, "scale", scale)
    shear = _pair(fn, "shear", shear)
    translate = _pair(fn, "translate", translate)
    matrix = inverse_affine_matrix(
        -jnp.asarray(angle, jnp.float32), translate, scale, shear, _center_f(fn, center, h, w)
    )
    out = warp(v.as_float32(image), matrix, order, v.fill_vector(fn, fill, c))
    return out.astype(image.dtype)


@v.keeps_uint8
def rotate(
    image: jax.Array,
    angle: Any,
    *,
    interpolation: str = "nearest",
    fill: Any = 0.0,
    center: Sequence[float] | None = None,
) -> jax.Array:
    """Rotates by ``angle`` degrees counter-clockwise (torchvision ``F.rotate``).

    Inverse map about the centre ``c``: ``p_in = R(-angle) (p_out - c) + c``;
    the output keeps the input size (corners are cut, uncovered pixels take
    ``fill``). ``rotate(x, 0)`` and ``rotate(x, 360)`` are the identity (up to
    float rounding of cos/sin for bilinear; exactly for nearest).

    Where this differs from torchvision (details in ``sample``): ``"nearest"``
    rounds an exact half-pixel tie up, so a 90 degree turn of an image whose
    sides differ in parity is ``np.rot90`` shifted by half a pixel, where
    torchvision's half-to-even reads every other source column twice; a
    bilinear border blends ``fill`` as interpolation of the image extended by
    ``fill`` (our ``fill=0`` is torchvision's ``fill=None``; its ``fill=c``
    weights the image part twice and darkens the border ring).
    """
    fn = "rotate"
    h, w, c = v.check_image(fn, image)
    order = v.interpolation_order(fn, interpolation)
    matrix = inverse_affine_matrix(
        -jnp.asarray(angle, jnp.float32), (0.0, 0.0), 1.0, (0.0, 0.0), _center_f(fn, center, h, w)
    )
    out = warp(v.as_float32(image), matrix, order, v.fill_vector(fn, fill, c))
    return out.astype(image.dtype)


def _symmetric_range(fn, name, x):
    if isinstance(x, Sequence):
        return v.check_interval(fn, name, x)
    v.check_nonnegative(fn, name, x)
    return (-float(x), float(x))


@v.keeps_uint8
def random_rotation(
    key: jax.Array,
    image: jax.Array,
    degrees: float | Sequence[float],
    *,
    interpolation: str = "nearest",
    fill: Any = 0.0,
    center: Sequence[float] | None = None,
) -> jax.Array:
    """Rotates by an angle ~ U(degrees) (torchvision ``RandomRotation``).

    ``degrees`` is a number d >= 0 (range (-d, d)) or a (min, max) pair.
    """
    fn = "random_rotation"
    v.check_image(fn, image)
    lo, hi = _symmetric_range(fn, "degrees", degrees)
    angle = jax.random.uniform(key, (), minval=lo, maxval=hi)
    return rotate(image, angle, interpolation=interpolation, fill=fill, center=center)


@v.keeps_uint8
def random_affine(
    key: jax.Array,
    image: jax.Array,
    degrees: float | Sequence[float] = 0.0,
    translate: Sequence[float] | None = None,
    scale: Sequence[float] | None = None,
    shear: float | Sequence[float] | None = None,
    *,
    interpolation: str = "nearest",
    fill: Any = 0.0,
    center: Sequence[float] | None = None,
) -> jax.Array:
    """Random affine map, torchvision ``RandomAffine`` semantics.

    angle ~ U(degrees) (counter-clockwise, see ``affine``);
    ``translate=(a, b)``: tx = round(U(-a W, a W)), ty = round(U(-b H, b H));
    ``scale=(lo, hi)``: s ~ U(lo, hi); ``shear``: a number s gives
    shear_x ~ U(-s, s), a pair gives shear_x ~ U(pair), four numbers give
    shear_x ~ U(first two) and shear_y ~ U(last two). All in one resample.
    """
    fn = "random_affine"
    h, w, _ = v.check_image(fn, image)
    deg = _symmetric_range(fn, "degrees", degrees)
    k_a, k_tx, k_ty, k_s, k_shx, k_shy = jax.random.split(key, 6)
    angle = jax.random.uniform(k_a, (), minval=deg[0], maxval=deg[1])
    tx = ty = jnp.float32(0.0)
    if translate is not None:
        if not isinstance(translate, Sequence) or len(translate) != 2:
            raise TypeError(f"{fn}: translate must be a pair of fractions (a, b), got {translate!r}")
        fa, fb = translate
        v.check_probability(fn, "translate[0]", fa)
        v.check_probability(fn, "translate[1]", fb)
        tx = jnp.round(jax.random.uniform(k_tx, (), minval=-fa * w, maxval=fa * w))
        ty = jnp.round(jax.random.uniform(k_ty, (), minval=-fb * h, maxval=fb * h))
    s = jnp.float32(1.0)
    if scale is not None:
        lo, hi = v.check_interval(fn, "scale", scale)
        v.check_positive(fn, "scale[0]", lo)
        s = jax.random.uniform(k_s, (), minval=lo, maxval=hi)
    shx = shy = jnp.float32(0.0)
    if shear is not None:
        if isinstance(shear, Sequence) and len(shear) == 4:
            rx = v.check_interval(fn, "shear[:2]", shear[:2])
            ry = v.check_interval(fn, "shear[2:]", shear[2:])
            shy = jax.random.uniform(k_shy, (), minval=ry[0], maxval=ry[1])
        else:
            rx = _symmetric_range(fn, "shear", shear)
        shx = jax.random.uniform(k_shx, (), minval=rx[0], maxval=rx[1])
    return affine(image, angle, (tx, ty), s, (shx, shy), interpolation=interpolation, fill=fill, center=center)


# ----------------------------------------------------------------------------
# Elastic deformation.
# ----------------------------------------------------------------------------


def gaussian_blur_2d(field: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian blur of an (H, W) field, kernel size 8*sigma+1 (odd),
    reflect padding (torchvision ``gaussian_blur``)."""
    radius = max(int(4.0 * sigma), 1)
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (t / sigma) ** 2)
    k = k / jnp.sum(k)
    mode = "reflect" if min(field.shape) > 1 else "edge"
    p = jnp.pad(field, radius, mode=mode)
    rows = jax.vmap(lambda r: jnp.convolve(r, k, mode="valid"))(p)
    return jax.vmap(lambda col: jnp.convolve(col, k, mode="valid"), in_axes=1, out_axes=1)(rows)


@v.keeps_uint8
def elastic_deform(
    key: jax.Array,
    image: jax.Array,
    alpha: Any = 34.0,
    sigma: float = 4.0,
    *,
    interpolation: str = "bilinear",
    fill: Any = 0.0,
) -> jax.Array:
    """Elastic deformation (Simard, Steinkraus & Platt, 2003, "Best Practices
    for Convolutional Neural Networks Applied to Visual Document Analysis").

    Displacements ``dx, dy = alpha * G_sigma * U(-1, 1)`` per pixel (a uniform
    random field smoothed by a Gaussian of std ``sigma`` pixels), then
    ``out[i, j] = image(i + dy[i, j], j + dx[i, j])``. ``alpha`` is in pixels
    here (Simard's convention; torchvision's ``ElasticTransform`` scales alpha by
    the image size instead). ``sigma`` is static (it sets the kernel size).
    """
    fn = "elastic_deform"
    h, w, c = v.check_image(fn, image)
    v.check_nonnegative(fn, "alpha", alpha)
    if not v.is_static_number(sigma) or not float(sigma) > 0:
        raise ValueError(f"{fn}: sigma must be a Python number > 0, got {sigma!r}")
    order = v.interpolation_order(fn, interpolation)
    k_x, k_y = jax.random.split(key)
    dx = gaussian_blur_2d(jax.random.uniform(k_x, (h, w), minval=-1.0, maxval=1.0), float(sigma))
    dy = gaussian_blur_2d(jax.random.uniform(k_y, (h, w), minval=-1.0, maxval=1.0), float(sigma))
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    out = sample(v.as_float32(image), yy + alpha * dy, xx + alpha * dx, order, v.fill_vector(fn, fill, c))
    return out.astype(image.dtype)
