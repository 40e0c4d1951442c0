"""Occlusion augmentations: Cutout and random erasing (static-shape masks)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_ext.augment import _validate as v

__all__ = ["cutout", "random_erasing", "box_mask"]


def box_mask(h: int, w: int, top, left, box_h, box_w) -> jax.Array:
    """(H, W, 1) boolean mask of rows [top, top + box_h) x cols [left, left +
    box_w); the box may be traced and may stick out of the image."""
    rows = jnp.arange(h)[:, None, None]
    cols = jnp.arange(w)[None, :, None]
    return (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)


@v.keeps_uint8
def cutout(key: jax.Array, image: jax.Array, size: int, fill: Any = 0.0) -> jax.Array:
    """Cutout (DeVries & Taylor, 2017, "Improved Regularization of
    Convolutional Neural Networks with Cutout").

    A ``size`` x ``size`` square whose centre is uniform over the image pixels
    is set to ``fill`` (scalar or per channel); the part outside the image is
    dropped, so the erased area can be smaller than ``size**2`` near a border.
    ``size = 0`` is the identity. Rows ``[cy - size // 2, cy - size // 2 +
    size)`` (columns likewise), so an odd size is centred on the drawn pixel.
    The paper's reference code erases ``[cy - size // 2, cy + size // 2)``, a
    side of ``2 (size // 2)``: ``size - 1`` for odd sizes (16 is the same in
    both; pass ``size - 1`` to reproduce the reference with an odd size).
    """
    fn = "cutout"
    h, w, c = v.check_image(fn, image)
    size = v.check_static_int(fn, "size", size, minimum=0)
    k_y, k_x = jax.random.split(key)
    cy = jax.random.randint(k_y, (), 0, h)
    cx = jax.random.randint(k_x, (), 0, w)
    mask = box_mask(h, w, cy - size // 2, cx - size // 2, size, size)
    fill_v = v.fill_vector(fn, fill, c)
    out = jnp.where(mask, fill_v, v.as_float32(image))
    return out.astype(image.dtype)


@v.keeps_uint8
def random_erasing(
    key: jax.Array,
    image: jax.Array,
    p: float = 0.5,
    scale: Sequence[float] = (0.02, 0.33),
    ratio: Sequence[float] = (0.3, 3.3),
    value: Any = 0.0,
    attempts: int = 10,
) -> jax.Array:
    """Random erasing (Zhong et al., 2020, "Random Erasing Data Augmentation"),
    torchvision ``RandomErasing`` semantics.

    With probability ``p``: up to ``attempts`` boxes are drawn with area
    ``A = U(scale) * H * W`` and aspect ratio ``r = exp(U(log ratio))``
    (log-uniform), ``h = round(sqrt(A r))``, ``w = round(sqrt(A / r))``; the
    first with ``h < H`` and ``w < W`` is placed uniformly and erased; if none
    fits, the image is returned unchanged.

    ``value``: a number or per-channel values, or ``"random"`` for per-pixel
    noise. torchvision's ``"random"`` draws N(0, 1) (meant for normalised
    tensors); here it is U(0, 1) so the output stays in [0, 1].
    """
    fn = "random_erasing"
    h, w, c = v.check_image(fn, image)
    v.check_probability(fn, "p", p)
    lo, hi = v.check_interval(fn, "scale", scale, 0.0, 1.0)
    r_lo, r_hi = v.check_interval(fn, "ratio", ratio)
    if r_lo <= 0:
        raise ValueError(f"{fn}: ratio must be positive, got {ratio!r}")
    attempts = v.check_static_int(fn, "attempts", attempts, minimum=1)
    k_apply, k_area, k_ratio, k_top, k_left, k_val = jax.random.split(key, 6)
    area = h * w
    target = area * jax.random.uniform(k_area, (attempts,), minval=lo, maxval=hi)
    aspect = jnp.exp(jax.random.uniform(k_ratio, (attempts,), minval=math.log(r_lo), maxval=math.log(r_hi)))
    bh = jnp.round(jnp.sqrt(target * aspect))
    bw = jnp.round(jnp.sqrt(target / aspect))
    ok = (bh < h) & (bw < w)
    first = jnp.argmax(ok)
    bh, bw = bh[first], bw[first]
    top = jnp.floor(jax.random.uniform(k_top, ()) * (h - bh + 1))
    left = jnp.floor(jax.random.uniform(k_left, ()) * (w - bw + 1))
    apply = (jax.random.uniform(k_apply) < p) & ok[first]
    mask = box_mask(h, w, top, left, bh, bw) & apply
    x = v.as_float32(image)
    if isinstance(value, str):
        if value != "random":
            raise ValueError(f"{fn}: value must be a number, per-channel values or 'random', got {value!r}")
        fill = jax.random.uniform(k_val, x.shape)
    else:
        fill = v.fill_vector(fn, value, c)
    return jnp.where(mask, fill, x).astype(image.dtype)
