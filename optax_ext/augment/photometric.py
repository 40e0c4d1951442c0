"""Photometric augmentations on float images in [0, 1] (torchvision formulas).

Deterministic primitives take ``(image, ...)``; random ops take
``(key, image, ...)``. Math runs in float32 and the result is cast back to the
input dtype. Images are (H, W, C); colour ops need C == 3 except where noted:
for C == 1, ``adjust_saturation`` and ``adjust_hue`` are the identity (as in
torchvision), grayscale is the image itself, and any other C raises.

Blend (torchvision ``_blend``): ``blend(a, b, r) = clip(r a + (1 - r) b, 0, 1)``.
Luma (ITU-R 601-2): ``Y = 0.299 R + 0.587 G + 0.114 B``.
8-bit quantisation (torchvision ``convert_image_dtype``):
``q = floor(x * (256 - 1e-3))`` in {0, ..., 255}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_ext.augment import _validate as v

__all__ = [
    "blend",
    "rgb_to_grayscale",
    "grayscale",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "adjust_gamma",
    "adjust_sharpness",
    "invert",
    "solarize",
    "posterize",
    "equalize",
    "autocontrast",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "color_jitter",
    "random_gamma",
    "random_grayscale",
]

_LUMA = (0.299, 0.587, 0.114)


def _check_color(fn: str, image) -> int:
    _, _, c = v.check_image(fn, image)
    if c not in (1, 3):
        raise ValueError(f"{fn}: image must have 1 or 3 channels, got shape {tuple(image.shape)}")
    return c


def blend(img1: jax.Array, img2: jax.Array, ratio: Any) -> jax.Array:
    """``clip(ratio * img1 + (1 - ratio) * img2, 0, 1)`` in float32."""
    return jnp.clip(ratio * img1 + (1.0 - ratio) * img2, 0.0, 1.0)


def _luma(x: jax.Array) -> jax.Array:
    """(H, W, 1) luma of a float32 (H, W, 1|3) image."""
    if x.shape[-1] == 1:
        return x
    return _LUMA[0] * x[..., 0:1] + _LUMA[1] * x[..., 1:2] + _LUMA[2] * x[..., 2:3]


@v.keeps_uint8
def rgb_to_grayscale(image: jax.Array) -> jax.Array:
    """ITU-R 601-2 luma ``0.299 R + 0.587 G + 0.114 B``; returns (H, W, 1)."""
    _check_color("rgb_to_grayscale", image)
    return _luma(v.as_float32(image)).astype(image.dtype)


@v.keeps_uint8
def grayscale(image: jax.Array) -> jax.Array:
    """Luma replicated to the input's channel count (shape preserved)."""
    _check_color("grayscale", image)
    x = v.as_float32(image)
    return jnp.broadcast_to(_luma(x), x.shape).astype(image.dtype)


@v.keeps_uint8
def adjust_brightness(image: jax.Array, factor: Any) -> jax.Array:
    """``blend(image, 0, factor) = clip(factor * image, 0, 1)``; 1 = identity."""
    v.check_image("adjust_brightness", image)
    v.check_nonnegative("adjust_brightness", "factor", factor)
    x = v.as_float32(image)
    return blend(x, jnp.zeros_like(x), factor).astype(image.dtype)


@v.keeps_uint8
def adjust_contrast(image: jax.Array, factor: Any) -> jax.Array:
    """``blend(image, mean(luma(image)), factor)``; 1 = identity, 0 = flat grey."""
    _check_color("adjust_contrast", image)
    v.check_nonnegative("adjust_contrast", "factor", factor)
    x = v.as_float32(image)
    return blend(x, jnp.mean(_luma(x)), factor).astype(image.dtype)


@v.keeps_uint8
def adjust_saturation(image: jax.Array, factor: Any) -> jax.Array:
    """``blend(image, luma(image), factor)``; 1 = identity, 0 = grayscale.

    Identity for single-channel images (torchvision's behaviour).
    """
    c = _check_color("adjust_saturation", image)
    v.check_nonnegative("adjust_saturation", "factor", factor)
    if c == 1:
        return image
    x = v.as_float32(image)
    return blend(x, _luma(x), factor).astype(image.dtype)


def _wrap(a, period):
    """``a mod period`` as ``a - period * floor(a / period)``: XLA's CPU fmod
    is ~10x slower than this (the result may round to ``period``, which every
    caller treats like 0)."""
    return a - period * jnp.floor(a / period)


def rgb_to_hsv(x: jax.Array) -> jax.Array:
    """RGB -> HSV on the last axis, all components in [0, 1] (torchvision
    ``_rgb2hsv``; hue 0 for grey pixels)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc = jnp.max(x, axis=-1)
    minc = jnp.min(x, axis=-1)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / jnp.where(eqc, 1.0, maxc)
    div = jnp.where(eqc, 1.0, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    # Sector from argmax (first max wins ties, as torchvision's maxc == r,
    # then maxc == g tests) rather than float equality with maxc: inside a
    # fused XLA kernel r may be recomputed with different rounding than maxc,
    # and an equality test then picks the wrong sector (a hue off by ~1/3).
    sector = jnp.argmax(x, axis=-1)
    h = jnp.where(sector == 0, bc - gc, jnp.where(sector == 1, 2.0 + rc - bc, 4.0 + gc - rc))
    h = _wrap(h / 6.0 + 1.0, 1.0)
    return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(x: jax.Array) -> jax.Array:
    """HSV -> RGB on the last axis, in closed form:
    ``c_n = v - v s clip(min(k_n, 4 - k_n), 0, 1)``, ``k_n = (n + 6 h) mod 6``
    with n = 5, 3, 1 for R, G, B — the same values as torchvision's
    six-sector ``_hsv2rgb`` without its per-pixel sector select (faster)."""
    h, s, val = x[..., 0:1], x[..., 1:2], x[..., 2:3]
    n = jnp.array([5.0, 3.0, 1.0], x.dtype)
    k = _wrap(n + 6.0 * h, 6.0)
    return jnp.clip(val - val * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0), 0.0, 1.0)


@v.keeps_uint8
def adjust_hue(image: jax.Array, hue_factor: Any) -> jax.Array:
    """Shifts the hue: HSV ``h -> (h + hue_factor) mod 1``, back to RGB.

    ``hue_factor`` in [-0.5, 0.5]; 0 = identity (up to float rounding of the
    HSV round trip). Identity for single-channel images (torchvision).
    """
    fn = "adjust_hue"
    c = _check_color(fn, image)
    if v.is_static_number(hue_factor) and not -0.5 <= float(hue_factor) <= 0.5:
        raise ValueError(f"{fn}: hue_factor must be in [-0.5, 0.5], got {hue_factor}")
    if c == 1:
        return image
    hsv = rgb_to_hsv(v.as_float32(image))
    hsv = hsv.at[..., 0].set(_wrap(hsv[..., 0] + hue_factor, 1.0))
    return hsv_to_rgb(hsv).astype(image.dtype)


@v.keeps_uint8
def adjust_gamma(image: jax.Array, gamma: Any, gain: Any = 1.0) -> jax.Array:
    """Gamma correction ``clip(gain * image ** gamma, 0, 1)``; gamma 1 = identity.

    gamma < 1 brightens, gamma > 1 darkens (torchvision ``adjust_gamma``).
    """
    v.check_image("adjust_gamma", image)
    v.check_nonnegative("adjust_gamma", "gamma", gamma)
    x = v.as_float32(image)
    return jnp.clip(gain * jnp.power(x, gamma), 0.0, 1.0).astype(image.dtype)


@v.keeps_uint8
def invert(image: jax.Array) -> jax.Array:
    """``1 - image``."""
    v.check_image("invert", image)
    return (1.0 - v.as_float32(image)).astype(image.dtype)


@v.keeps_uint8
def solarize(image: jax.Array, threshold: Any) -> jax.Array:
    """Inverts pixels at or above ``threshold``: ``x >= t ? 1 - x : x``.

    torchvision / PIL ``solarize``; a threshold above 1 is the identity.
    """
    v.check_image("solarize", image)
    v.check_nonnegative("solarize", "threshold", threshold)
    x = v.as_float32(image)
    return jnp.where(x >= threshold, 1.0 - x, x).astype(image.dtype)


def _quantize(x: jax.Array) -> jax.Array:
    """8-bit levels of a float32 image, as float32 integers in [0, 255]."""
    return jnp.floor(jnp.clip(x, 0.0, 1.0) * (256.0 - 1e-3))


@v.keeps_uint8
def posterize(image: jax.Array, bits: Any) -> jax.Array:
    """Keeps the top ``bits`` bits of the 8-bit value (torchvision ``posterize``).

    ``out = (q & ~(2^(8 - bits) - 1)) / 255`` with ``q`` the 8-bit level;
    ``bits`` in [0, 8] (may be traced); ``bits = 8`` returns the image itself
    unquantised (so magnitude 0 is the identity on any float image).

    This is torchvision on the uint8 image (``convert_image_dtype`` to uint8,
    posterize, back to float), the path RandAugment's and AugMix's magnitudes
    were defined on. torchvision v2's float-tensor path is different:
    ``floor(x * 2^bits) / 2^bits``, levels ``k / 2^bits`` (bits=1: 0 or 0.5)
    where ours are ``k 2^(8 - bits) / 255`` (bits=1: 0 or 128/255).
    """
    fn = "posterize"
    v.check_image(fn, image)
    if v.is_static_number(bits) and not 0 <= float(bits) <= 8:
        raise ValueError(f"{fn}: bits must be in [0, 8], got {bits}")
    x = v.as_float32(image)
    bits = jnp.asarray(bits, jnp.float32)
    step = jnp.exp2(8.0 - jnp.round(bits))
    out = jnp.floor(_quantize(x) / step) * step / 255.0
    return jnp.where(bits >= 8, x, out).astype(image.dtype)


@v.keeps_uint8
def autocontrast(image: jax.Array) -> jax.Array:
    """Per-channel stretch to [0, 1]: ``(x - min) / (max - min)``.

    Channels with max == min are left unchanged (torchvision ``autocontrast``).
    """
    v.check_image("autocontrast", image)
    x = v.as_float32(image)
    lo = jnp.min(x, axis=(0, 1), keepdims=True)
    hi = jnp.max(x, axis=(0, 1), keepdims=True)
    flat = hi <= lo
    scale = jnp.where(flat, 1.0, 1.0 / jnp.where(flat, 1.0, hi - lo))
    lo = jnp.where(flat, 0.0, lo)
    return jnp.clip((x - lo) * scale, 0.0, 1.0).astype(image.dtype)


def _equalize_channel(x: jax.Array) -> jax.Array:
    q = _quantize(x)
    qi = q.astype(jnp.int32).ravel()
    hist = jnp.bincount(qi, length=256).astype(jnp.float32)
    # Pixels in the top occupied bin do not count toward the step (PIL).
    step = jnp.floor((qi.size - hist[jnp.max(qi)]) / 255.0)
    safe = jnp.where(step == 0, 1.0, step)
    lut = jnp.floor((jnp.cumsum(hist) + jnp.floor(step / 2.0)) / safe)
    lut = jnp.clip(jnp.concatenate([jnp.zeros((1,)), lut[:-1]]), 0.0, 255.0)
    return jnp.where(step == 0, x, lut[q.astype(jnp.int32)] / 255.0)


@v.keeps_uint8
def equalize(image: jax.Array) -> jax.Array:
    """Histogram equalisation per channel on the 8-bit quantised image.

    torchvision / PIL ``equalize``: 256-bin histogram ``hist``;
    ``step = floor((N - hist[last occupied bin]) / 255)``;
    ``lut[k] = floor((cumsum(hist)[k-1] + floor(step / 2)) / step)``, lut[0] = 0;
    ``out = lut[q] / 255``. A channel with step 0 (nearly constant) is unchanged.
    """
    v.check_image("equalize", image)
    x = v.as_float32(image)
    return jax.vmap(_equalize_channel, in_axes=2, out_axes=2)(x).astype(image.dtype)


def _smooth(x: jax.Array) -> jax.Array:
    """torchvision's sharpness degenerate: 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]]/13
    on the interior, border pixels kept."""
    h, w, _ = x.shape
    if h <= 2 or w <= 2:
        return x
    acc = 4.0 * x[1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            acc = acc + x[dy : dy + h - 2, dx : dx + w - 2]
    return x.at[1:-1, 1:-1].set(acc / 13.0)


@v.keeps_uint8
def adjust_sharpness(image: jax.Array, factor: Any) -> jax.Array:
    """``blend(image, smooth(image), factor)``: 0 = blurred, 1 = identity,
    > 1 sharpened (torchvision ``adjust_sharpness``)."""
    v.check_image("adjust_sharpness", image)
    v.check_nonnegative("adjust_sharpness", "factor", factor)
    x = v.as_float32(image)
    return blend(x, _smooth(x), factor).astype(image.dtype)


# ----------------------------------------------------------------------------
# Random ops.
# ----------------------------------------------------------------------------


def _factor_range(fn, name, value, center, bound=None, clip_zero=True):
    """torchvision ColorJitter's ``_check_input``: a number d gives
    [center - d, center + d] (clipped at 0), a pair is used as is."""
    if isinstance(value, Sequence):
        lo, hi = v.check_interval(fn, name, value, *(bound or (None, None)))
    else:
        v.check_nonnegative(fn, name, value)
        lo, hi = center - float(value), center + float(value)
        if clip_zero:
            lo = max(lo, 0.0)
        if bound is not None and (lo < bound[0] or hi > bound[1]):
            raise ValueError(f"{fn}: {name} must be in [0, {bound[1]}], got {value}")
    if lo < 0 and clip_zero:
        raise ValueError(f"{fn}: {name} range must be non-negative, got {value!r}")
    return lo, hi


@v.keeps_uint8
def color_jitter(
    key: jax.Array, image: jax.Array, brightness: Any = 0.0, contrast: Any = 0.0, saturation: Any = 0.0, hue: Any = 0.0
) -> jax.Array:
    """Random brightness, contrast, saturation and hue in a random order.

    torchvision ``ColorJitter``: a number b gives a factor ~ U(max(0, 1 - b),
    1 + b) (hue h: shift ~ U(-h, h), h <= 0.5); a pair gives U(pair). Ops with
    range {1} (or {0} for hue) are skipped statically; the others run in a
    uniformly random order, chosen with ``lax.switch`` so it is jit/vmap-able.
    Saturation and hue are identity on single-channel images.
    """
    fn = "color_jitter"
    _check_color(fn, image)
    ranges = [
        ("brightness", _factor_range(fn, "brightness", brightness, 1.0), adjust_brightness),
        ("contrast", _factor_range(fn, "contrast", contrast, 1.0), adjust_contrast),
        ("saturation", _factor_range(fn, "saturation", saturation, 1.0), adjust_saturation),
        ("hue", _factor_range(fn, "hue", hue, 0.0, (-0.5, 0.5), False), adjust_hue),
    ]
    active = [(r, op) for name, r, op in ranges if r != ((0.0, 0.0) if name == "hue" else (1.0, 1.0))]
    if not active:
        return image
    k_perm, k_fac = jax.random.split(key)
    lo = jnp.array([r[0] for r, _ in active], jnp.float32)
    hi = jnp.array([r[1] for r, _ in active], jnp.float32)
    factors = jax.random.uniform(k_fac, (len(active),), minval=lo, maxval=hi)
    branches = [lambda x, f, i=i, op=op: op(x, f[i]) for i, (_, op) in enumerate(active)]
    x = v.as_float32(image)
    if len(active) == 1:
        return branches[0](x, factors).astype(image.dtype)
    order = jax.random.permutation(k_perm, len(active))
    for k in range(len(active)):
        x = jax.lax.switch(order[k], branches, x, factors)
    return x.astype(image.dtype)


@v.keeps_uint8
def random_gamma(key: jax.Array, image: jax.Array, gamma: Sequence[float] = (0.8, 1.25), gain: Any = 1.0) -> jax.Array:
    """``adjust_gamma`` with gamma log-uniform in ``gamma=(lo, hi)`` (so that
    (0.8, 1.25) brightens and darkens equally often)."""
    fn = "random_gamma"
    v.check_image(fn, image)
    lo, hi = v.check_interval(fn, "gamma", gamma)
    v.check_positive(fn, "gamma[0]", lo)
    g = jnp.exp(jax.random.uniform(key, (), minval=jnp.log(lo), maxval=jnp.log(hi)))
    return adjust_gamma(image, g, gain)


@v.keeps_uint8
def random_grayscale(key: jax.Array, image: jax.Array, p: float = 0.1) -> jax.Array:
    """``grayscale`` with probability ``p`` (torchvision ``RandomGrayscale``)."""
    fn = "random_grayscale"
    _check_color(fn, image)
    v.check_probability(fn, "p", p)
    return jnp.where(jax.random.uniform(key) < p, grayscale(image), image)
