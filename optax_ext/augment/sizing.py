"""Deterministic crop, center crop, pad and resize: the pieces of an evaluation pipeline.

torchvision ``transforms.v2.functional`` semantics (``crop``, ``center_crop``, ``pad``, ``resize``) on
(H, W, C) float images, so ``resize(x, 256)`` then ``center_crop(x, 224)`` is the usual ImageNet evaluation
transform. Output shapes are static (Python ints), so every op runs under ``jax.jit`` and ``jax.vmap``;
``crop`` also takes traced ``top`` / ``left``. ``crop``, ``center_crop`` and ``pad`` copy values bit-exactly
(any float dtype, no round trip through float32); ``resize`` computes in float32 and casts back.

Resampling (shared with ``random_resized_crop``) is separable, one axis at a time, on half-pixel centres
(pixel ``k`` spans ``[k, k + 1)``, centre ``k + 0.5``; ``align_corners=False``). Resizing a box of ``L``
input pixels starting at ``s`` to ``m`` output pixels, with ``scale = L / m``, output pixel ``i`` has
centre ``c_i = s + (i + 0.5) scale`` in input coordinates and is

* bilinear: ``out_i = sum_k w_ik x_k / sum_k w_ik`` with the triangle filter
  ``w_ik = max(0, 1 - |k + 0.5 - c_i| / f)`` over the pixels ``k`` of the box only, where ``f = max(scale, 1)``
  with ``antialias`` and ``f = 1`` without. ``f = 1`` is plain bilinear interpolation with the edge pixels
  repeated (``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``); ``f = scale`` widens
  the filter when downscaling so every input pixel contributes (PIL's and torchvision's antialiased
  bilinear: Pillow ``Image.resize(BILINEAR)``, ``interpolate(..., antialias=True)``). Upscaling is the same
  either way.
* nearest: ``out_i = x[s + floor((i + 0.5) scale)]``, the input pixel whose span contains ``c_i``. This is
  PIL's ``NEAREST`` and torchvision's ``InterpolationMode.NEAREST_EXACT``; it is computed in integers,
  ``((2 i + 1) L) // (2 m)``, so where ``c_i`` falls exactly on the boundary of two input pixels it takes the
  later one every time (PIL and torch multiply in floating point and sometimes land on the earlier one).
  torchvision's ``NEAREST`` on tensors is the legacy ``floor(i * scale)``, which shifts the image by up to
  half an output pixel towards the top-left (for a 3x reduction it takes the first of every three pixels,
  not the middle one), so it is not offered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_ext.augment import _validate as v

__all__ = ["crop", "center_crop", "pad", "resize"]

PADDING_MODES = ("constant", "edge", "reflect", "symmetric")


# ----------------------------------------------------------------------------
# Argument parsing.
# ----------------------------------------------------------------------------


def padding_ltrb(fn: str, padding: Any) -> tuple[int, int, int, int]:
    """torchvision's padding spec as (left, top, right, bottom) Python ints >= 0.

    ``p`` or ``[p]``: all four sides; ``(x, y)``: left/right ``x``, top/bottom ``y``;
    ``(left, top, right, bottom)`` as given.
    """
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, bool):
        padding = (padding,) * 4
    elif isinstance(padding, Sequence) and len(padding) == 1:
        padding = (padding[0],) * 4
    elif isinstance(padding, Sequence) and len(padding) == 2:
        padding = (padding[0], padding[1], padding[0], padding[1])
    if not isinstance(padding, Sequence) or len(padding) != 4:
        raise TypeError(
            f"{fn}: padding must be an int or a sequence of 1, 2 or 4 ints (left, top, right, bottom), got {padding!r}"
        )
    return tuple(v.check_static_int(fn, "padding", q, minimum=0) for q in padding)  # type: ignore[return-value]


def check_padding_mode(fn: str, padding_mode: Any) -> str:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"{fn}: padding_mode must be one of {list(PADDING_MODES)}, got {padding_mode!r}")
    return padding_mode


def _offset(fn: str, name: str, x: Any) -> Any:
    """A crop offset: a Python int (any sign) or a traced / concrete integer scalar."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return int(x)
    dtype = getattr(x, "dtype", None)
    if dtype is not None and getattr(x, "ndim", None) == 0 and jnp.issubdtype(dtype, jnp.integer):
        return x
    raise TypeError(f"{fn}: {name} must be an int or an integer scalar array, got {x!r}")


def _crop_size(fn: str, output_size: Any) -> tuple[int, int]:
    """torchvision's crop size: ``s``, ``[s]`` or ``(h, w)``."""
    if isinstance(output_size, Sequence) and len(output_size) == 1:
        output_size = output_size[0]
    return v.size_pair(fn, "output_size", output_size)


# ----------------------------------------------------------------------------
# Pad and crop.
# ----------------------------------------------------------------------------


def pad_ltrb(x: jax.Array, ltrb: tuple[int, int, int, int], fill: jax.Array, padding_mode: str) -> jax.Array:
    """Pads an (H, W, C) array by static (left, top, right, bottom); ``fill`` is a (C,) vector."""
    left, top, right, bottom = ltrb
    pads = ((top, bottom), (left, right), (0, 0))
    if padding_mode != "constant":
        return jnp.pad(x, pads, mode=padding_mode)
    # A padded validity mask gives a per-channel fill (jnp.pad takes one scalar) and keeps x bit-exact.
    h, w, _ = x.shape
    inside = jnp.pad(jnp.ones((h, w, 1), bool), pads)
    return jnp.where(inside, jnp.pad(x, pads), fill.astype(x.dtype))


@v.keeps_uint8
def pad(image: jax.Array, padding: int | Sequence[int], fill: Any = 0.0, padding_mode: str = "constant") -> jax.Array:
    """Pads the image borders (torchvision ``F.pad`` / ``transforms.v2.Pad``).

    With ``padding = (l, t, r, b)`` the output is (H + t + b, W + l + r, C) and ``out[t + i, l + j] = x[i, j]``;
    the border is, per ``padding_mode`` (numpy's ``np.pad`` modes of the same meaning):

    * ``"constant"``: ``fill`` (a scalar or one value per channel; may be traced);
    * ``"edge"``: the nearest edge pixel (torch's ``replicate``), ``[1 2 3] -> 1 1 [1 2 3] 3 3``;
    * ``"reflect"``: mirrored without repeating the edge, ``[1 2 3] -> 3 2 [1 2 3] 2 1``;
    * ``"symmetric"``: mirrored with the edge repeated, ``[1 2 3] -> 2 1 [1 2 3] 3 2``.

    ``fill`` is used only in ``"constant"`` mode. Where torchvision raises (``"reflect"`` padding not smaller
    than the image side), the reflection is continued periodically as in ``np.pad``; negative padding (which
    ``torch.nn.functional.pad`` treats as cropping) is rejected, use ``crop``.

    Args:
      image: (H, W, C) float image.
      padding: ``p``, ``[p]``, ``(x, y)`` (left/right ``x``, top/bottom ``y``) or ``(left, top, right,
        bottom)``, non-negative Python ints (they set the output shape).
      fill: constant-mode value, a scalar or one per channel.
      padding_mode: ``"constant"``, ``"edge"``, ``"reflect"`` or ``"symmetric"``.
    """
    fn = "pad"
    _, _, c = v.check_image(fn, image)
    ltrb = padding_ltrb(fn, padding)
    padding_mode = check_padding_mode(fn, padding_mode)
    return pad_ltrb(jnp.asarray(image), ltrb, v.fill_vector(fn, fill, c), padding_mode)


@v.keeps_uint8
def crop(image: jax.Array, top: Any, left: Any, height: int, width: int) -> jax.Array:
    """The ``height`` x ``width`` window whose top-left pixel is ``(top, left)`` (torchvision ``F.crop``).

    ``out[i, j] = x[top + i, left + j]`` where that pixel exists and 0 elsewhere: like torchvision, a window
    that sticks out of the image (negative ``top`` / ``left``, or past the far edge) is zero-padded, never
    shifted back inside. ``height`` and ``width`` are Python ints (the output shape); ``top`` and ``left`` are
    ints or integer scalar arrays, traced values included (e.g. per image under ``vmap``).
    """
    fn = "crop"
    h, w, _ = v.check_image(fn, image)
    top = _offset(fn, "top", top)
    left = _offset(fn, "left", left)
    height = v.check_static_int(fn, "height", height, minimum=1)
    width = v.check_static_int(fn, "width", width, minimum=1)
    x = jnp.asarray(image)
    if isinstance(top, int) and isinstance(left, int) and 0 <= top <= h - height and 0 <= left <= w - width:
        return x[top : top + height, left : left + width]
    # General case (traced or out-of-range offsets): gather clamped rows and columns, zero what lies outside.
    rows = top + jnp.arange(height)
    cols = left + jnp.arange(width)
    out = jnp.take(jnp.take(x, jnp.clip(rows, 0, h - 1), axis=0), jnp.clip(cols, 0, w - 1), axis=1)
    inside = ((rows >= 0) & (rows < h))[:, None, None] & ((cols >= 0) & (cols < w))[None, :, None]
    return jnp.where(inside, out, jnp.zeros((), x.dtype))


def center_offset(n: int, m: int) -> int:
    """torchvision ``center_crop``'s offset of an ``m`` window on an ``n`` axis.

    ``m <= n``: ``round((n - m) / 2)`` with Python's round, i.e. half to even (``n - m = 3`` gives 2,
    ``n - m = 5`` gives 2); ``m > n``: the image is zero-padded by ``(m - n) // 2`` before and
    ``(m - n + 1) // 2`` after, so the offset is ``-((m - n) // 2)``.
    """
    return round((n - m) / 2.0) if m <= n else -((m - n) // 2)


@v.keeps_uint8
def center_crop(image: jax.Array, output_size: int | Sequence[int]) -> jax.Array:
    """Crops the central ``output_size`` window (torchvision ``F.center_crop`` / ``CenterCrop``).

    ``top = round((H - h) / 2)``, ``left = round((W - w) / 2)`` with Python's ``round`` (half to even), as
    torchvision: when ``H - h`` is odd the extra row goes above or below depending on the parity of
    ``(H - h - 1) / 2``. A window larger than the image zero-pads it, ``(h - H) // 2`` rows above and
    ``(h - H + 1) // 2`` below (columns likewise). ``output_size``: ``s``, ``[s]`` or ``(h, w)``.
    """
    fn = "center_crop"
    h, w, _ = v.check_image(fn, image)
    out_h, out_w = _crop_size(fn, output_size)
    return crop(image, center_offset(h, out_h), center_offset(w, out_w), out_h, out_w)


# ----------------------------------------------------------------------------
# Resampling.
# ----------------------------------------------------------------------------


def _axis_taps(n: int, m: int, start: Any, length: Any, order: int, antialias: bool, max_scale: float):
    """Source indices (m, K) in [0, n) and weights (m, K) summing to 1 per row, for one axis.

    ``start`` and ``length`` (integer-valued) give the box; Python numbers make the taps NumPy float64
    constants, traced scalars make them float32 arrays. ``max_scale >= length / m`` bounds the tap count.
    """
    xp = np if isinstance(start, (int, float)) and isinstance(length, (int, float)) else jnp
    i = xp.arange(m)
    if order == 0:
        s = xp.asarray(start).astype(xp.int32)
        size = xp.asarray(length).astype(xp.int32)
        # floor((i + 0.5) L / m) in integers: exact even where (i + 0.5) L / m is an integer.
        return (s + ((2 * i + 1) * size) // (2 * m))[:, None], xp.ones((m, 1), np.float32)
    dtype = np.float64 if xp is np else jnp.float32
    s = xp.asarray(start, dtype)
    size = xp.asarray(length, dtype)
    scale = size / m
    f = xp.maximum(scale, 1.0) if antialias else xp.asarray(1.0, dtype)
    # Taps with a non-zero weight: |k + 0.5 - c| < f, an open interval of length 2 f, so at most ceil(2 f).
    taps = math.ceil(2.0 * max(max_scale, 1.0)) if antialias else 2
    centre = s + (i + 0.5) * scale
    k = xp.floor(centre - f + 0.5)[:, None] + xp.arange(taps)[None, :]
    wts = xp.maximum(0.0, 1.0 - xp.abs(k + 0.5 - centre[:, None]) / f)
    # Only pixels of the box count (torchvision crops first, then resizes): a tap outside it gets weight 0
    # and the rest are renormalised, which is bilinear interpolation with the box's edge pixels repeated.
    wts = xp.where((k >= s) & (k < s + size), wts, 0.0)
    wts = wts / xp.sum(wts, axis=1, keepdims=True)
    return xp.clip(k, 0, n - 1).astype(xp.int32), wts.astype(np.float32)


def _resample_axis(x: jax.Array, idx, wts, axis: int) -> jax.Array:
    if idx.shape[1] == 1:
        return jnp.take(x, idx[:, 0], axis=axis)
    taps = jnp.take(x, idx, axis=axis)  # the tap axis follows `axis`
    wts = jnp.asarray(wts).reshape(wts.shape + (1,) * (x.ndim - 1 - axis))
    return jnp.sum(taps * wts, axis=axis + 1)


def resample_box(
    x: jax.Array,
    out_size: tuple[int, int],
    box: tuple[Any, Any, Any, Any],
    order: int,
    antialias: bool,
    max_scale: tuple[float, float],
) -> jax.Array:
    """Resizes the box ``(top, left, height, width)`` of a float32 (H, W, C) image to ``out_size``.

    Samples only inside the box (see the module docstring for the filters). The box may be traced
    (integer-valued floats); ``max_scale`` = static upper bounds of ``height / out_h`` and ``width / out_w``.
    """
    h, w, _ = x.shape
    out_h, out_w = out_size
    top, left, box_h, box_w = box
    rows = _axis_taps(h, out_h, top, box_h, order, antialias, max_scale[0])
    cols = _axis_taps(w, out_w, left, box_w, order, antialias, max_scale[1])
    return _resample_axis(_resample_axis(x, *rows, axis=0), *cols, axis=1)


def resized_output_size(fn: str, h: int, w: int, size: Any, max_size: Any) -> tuple[int, int]:
    """torchvision ``_compute_resized_output_size``: (h, w) as given, or the shorter side set to ``size``."""
    if max_size is not None:
        max_size = v.check_static_int(fn, "max_size", max_size, minimum=1)
    short, long = (w, h) if w <= h else (h, w)
    if size is None:
        if max_size is None:
            raise ValueError(f"{fn}: max_size is required when size is None")
        new_short, new_long = int(max_size * short / long), max_size
    else:
        if isinstance(size, Sequence) and len(size) == 1:
            size = size[0]
        if isinstance(size, Sequence):
            out_h, out_w = v.size_pair(fn, "size", size)
            if max_size is not None:
                raise ValueError(
                    f"{fn}: max_size applies only when size is an int (the shorter side), got "
                    f"size={tuple(size)!r} and max_size={max_size}"
                )
            return out_h, out_w
        new_short = v.check_static_int(fn, "size", size, minimum=1)
        new_long = int(new_short * long / short)
        if max_size is not None:
            if max_size <= new_short:
                raise ValueError(
                    f"{fn}: max_size must be > size (the shorter side), got max_size={max_size} and size={new_short}"
                )
            if new_long > max_size:
                new_short, new_long = int(max_size * new_short / new_long), max_size
    if new_short < 1:
        raise ValueError(f"{fn}: the resized shorter side of a {h}x{w} image would be {new_short} pixels")
    return (new_long, new_short) if w <= h else (new_short, new_long)


@v.keeps_uint8
def resize(
    image: jax.Array,
    size: int | Sequence[int] | None,
    *,
    interpolation: str = "bilinear",
    max_size: int | None = None,
    antialias: bool = True,
) -> jax.Array:
    """Resizes an image (torchvision ``F.resize`` / ``transforms.v2.Resize``, default antialiased).

    Output size, as torchvision: ``size = (h, w)`` is used as given; an int ``s`` (or ``[s]``) sets the
    **shorter** side to ``s`` and the longer to ``int(s * long / short)`` (aspect ratio kept, so
    ``resize(x, 256)`` of a 480 x 640 image is 256 x 341, not 256 x 256); ``max_size`` then caps the
    longer side, scaling both down; ``size=None`` with ``max_size`` sets the longer side to ``max_size``.
    An unchanged size returns the image itself.

    Filters (module docstring): ``"bilinear"`` is the triangle filter on half-pixel centres, widened by the
    reduction factor when downscaling if ``antialias`` (torchvision's default since 0.17; ``antialias=False``
    is ``interpolate(mode="bilinear", align_corners=False)``, which aliases when reducing more than 2x);
    ``"nearest"`` takes the pixel containing the output centre, ``floor((i + 0.5) * H_in / H_out)``
    (torchvision's ``NEAREST_EXACT`` and PIL's ``NEAREST``), and ignores ``antialias`` as torchvision does.
    Values stay within the input range (the weights are non-negative and sum to 1).

    Args:
      image: (H, W, C) float image.
      size: ``(h, w)``, or an int / ``[int]`` for the shorter side, or ``None`` with ``max_size``.
      interpolation: ``"bilinear"`` or ``"nearest"``.
      max_size: cap on the longer side when ``size`` is an int or ``None``.
      antialias: widen the bilinear filter when downscaling.

    References: torchvision ``transforms.v2.functional.resize``; Pillow ``Image.resize`` (its
    ``ImagingResample`` coefficients are the antialiased filter above).
    """
    fn = "resize"
    h, w, _ = v.check_image(fn, image)
    order = v.interpolation_order(fn, interpolation)
    if not isinstance(antialias, (bool, np.bool_)):
        raise TypeError(f"{fn}: antialias must be a bool, got {antialias!r}")
    out_h, out_w = resized_output_size(fn, h, w, size, max_size)
    if (out_h, out_w) == (h, w):
        return image
    x = v.as_float32(image)
    # An axis whose length is unchanged is the identity under every filter here: skip it.
    if out_h != h:
        x = _resample_axis(x, *_axis_taps(h, out_h, 0, h, order, bool(antialias), h / out_h), axis=0)
    if out_w != w:
        x = _resample_axis(x, *_axis_taps(w, out_w, 0, w, order, bool(antialias), w / out_w), axis=1)
    return x.astype(image.dtype)
