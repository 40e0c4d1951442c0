"""Augmentation policies (RandAugment, AugMix) and pipeline combinators.

Random ops in a policy are chosen with ``lax.switch`` on a random index, so a
policy is one traceable function that runs under ``jax.jit`` and ``jax.vmap``
(under ``vmap`` a switch evaluates every branch and selects; the geometric
ops therefore share a single resampling branch whose matrix is chosen first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_ext.augment import _validate as v
from optax_ext.augment import geometric as geo
from optax_ext.augment import photometric as pm

__all__ = [
    "RAND_AUGMENT_OPS",
    "AUGMIX_OPS",
    "rand_augment",
    "rand_augment_magnitudes",
    "augmix",
    "augmix_js_loss",
    "compose",
    "random_apply",
    "batched",
]

Op = Callable[[jax.Array, jax.Array], jax.Array]

RAND_AUGMENT_OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
# Ops whose magnitude gets a random sign (torchvision's ``signed`` flag).
_RA_SIGNED = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0], bool)


def rand_augment_magnitudes(num_bins: int, height: int, width: int) -> np.ndarray:
    """torchvision's RandAugment magnitude table, shape (14, num_bins).

    Row order is ``RAND_AUGMENT_OPS``; bin ``b`` of ``num_bins``:
    Shear 0.3 b/(n-1) (shear factor, angle atan of it); TranslateX
    (150/331) W b/(n-1) pixels (Y: H); Rotate 30 b/(n-1) degrees;
    Brightness / Color / Contrast / Sharpness 0.9 b/(n-1) (factor 1 +/- m);
    Posterize 8 - round(4 b/(n-1)) bits; Solarize threshold 1 - b/(n-1);
    Identity / AutoContrast / Equalize 0 (no magnitude).
    """
    t = np.linspace(0.0, 1.0, num_bins)
    z = np.zeros(num_bins)
    rows = [
        z,
        0.3 * t,
        0.3 * t,
        150.0 / 331.0 * width * t,
        150.0 / 331.0 * height * t,
        30.0 * t,
        0.9 * t,
        0.9 * t,
        0.9 * t,
        0.9 * t,
        8 - np.round(np.arange(num_bins) / ((num_bins - 1) / 4.0)),
        1.0 - t,
        z,
        z,
    ]
    return np.stack(rows).astype(np.float32)


def _geometric_branch(x, op, mag, fill, order, ids):
    """One resample for the shear / translate / rotate ops of a policy.

    ``ids`` = (shear_x, shear_y, translate_x, translate_y, rotate) op indices.
    Shears act about the top-left corner (torchvision's ``center=[0, 0]``),
    translations are truncated to whole pixels, rotation is counter-clockwise.
    """
    h, w, _ = x.shape
    i_sx, i_sy, i_tx, i_ty, i_rot = ids
    shear_deg = jnp.rad2deg(jnp.arctan(mag))
    is_shear = (op == i_sx) | (op == i_sy)
    matrix = geo.inverse_affine_matrix(
        angle=jnp.where(op == i_rot, -mag, 0.0),
        translate=(jnp.where(op == i_tx, jnp.trunc(mag), 0.0), jnp.where(op == i_ty, jnp.trunc(mag), 0.0)),
        scale=1.0,
        shear=(jnp.where(op == i_sx, shear_deg, 0.0), jnp.where(op == i_sy, shear_deg, 0.0)),
        center=(jnp.where(is_shear, -w / 2.0, 0.0), jnp.where(is_shear, -h / 2.0, 0.0)),
    )
    return geo.warp(x, matrix, order, fill)


@v.keeps_uint8
def rand_augment(
    key: jax.Array,
    image: jax.Array,
    num_ops: int = 2,
    magnitude: Any = 9,
    num_magnitude_bins: int = 31,
    *,
    interpolation: str = "nearest",
    fill: Any = 0.0,
) -> jax.Array:
    """RandAugment (Cubuk et al., 2020, "RandAugment: Practical automated data
    augmentation with a reduced search space"), torchvision's convention.

    ``num_ops`` times: an op is drawn uniformly from the 14 ops of
    ``RAND_AUGMENT_OPS`` and applied with the magnitude in bin ``magnitude`` of
    ``num_magnitude_bins`` (31 by default, so M in [0, 30]; see
    ``rand_augment_magnitudes``), negated with probability 1/2 for signed ops.
    Geometric ops use ``interpolation`` and ``fill``. Solarize thresholds are on
    the [0, 1] scale (torchvision v2). On single-channel images Color is the
    identity. ``magnitude`` may be traced.
    """
    fn = "rand_augment"
    h, w, c = v.check_image(fn, image)
    num_ops = v.check_static_int(fn, "num_ops", num_ops, minimum=0)
    bins = v.check_static_int(fn, "num_magnitude_bins", num_magnitude_bins, minimum=2)
    if v.is_static_number(magnitude):
        if not 0 <= magnitude <= bins - 1:
            raise ValueError(f"{fn}: magnitude must be in [0, {bins - 1}], got {magnitude}")
    order = v.interpolation_order(fn, interpolation)
    fill_v = v.fill_vector(fn, fill, c)
    table = jnp.asarray(rand_augment_magnitudes(bins, h, w))
    mags = jnp.take(table, jnp.asarray(magnitude, jnp.int32), axis=1)
    signed = jnp.asarray(_RA_SIGNED)

    branches = [
        lambda x, op, m: x,
        lambda x, op, m: _geometric_branch(x, op, m, fill_v, order, (1, 2, 3, 4, 5)),
        lambda x, op, m: pm.adjust_brightness(x, 1.0 + m),
        lambda x, op, m: pm.adjust_saturation(x, 1.0 + m),
        lambda x, op, m: pm.adjust_contrast(x, 1.0 + m),
        lambda x, op, m: pm.adjust_sharpness(x, 1.0 + m),
        lambda x, op, m: pm.posterize(x, m),
        lambda x, op, m: pm.solarize(x, m),
        lambda x, op, m: pm.autocontrast(x),
        lambda x, op, m: pm.equalize(x),
    ]
    branch_of_op = jnp.array([0, 1, 1, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    x = v.as_float32(image)
    if c not in (1, 3):
        raise ValueError(f"{fn}: image must have 1 or 3 channels, got shape {tuple(image.shape)}")
    if num_ops == 0:
        return image

    def step(x, k):
        k_op, k_sign = jax.random.split(k)
        op = jax.random.randint(k_op, (), 0, len(RAND_AUGMENT_OPS))
        flip = signed[op] & jax.random.bernoulli(k_sign)
        m = jnp.where(flip, -mags[op], mags[op])
        return jax.lax.switch(branch_of_op[op], branches, x, op, m), None

    # A scan (not a Python loop) so the op body is compiled once.
    x, _ = jax.lax.scan(step, x, jax.random.split(key, num_ops))
    return x.astype(image.dtype)


AUGMIX_OPS = (
    "AutoContrast",
    "Equalize",
    "Posterize",
    "Rotate",
    "Solarize",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
)
_AUGMIX_ALL_EXTRA = ("Color", "Contrast", "Brightness", "Sharpness")


def _augmix_step(key, x, all_ops, severity, fill, order):
    """One op of an AugMix chain, with the official code's level mapping:
    ``level ~ U(0.1, severity)``; posterize 4 - floor(0.4 level) bits; rotate
    floor(3 level) degrees; solarize 8-bit threshold 256 - floor(25.6 level);
    shear 0.03 level; translate floor(level W / 30) pixels (all +/- at
    random); colour/contrast/brightness/sharpness factor 0.18 level + 0.1."""
    h, w, _ = x.shape
    n_ops = len(AUGMIX_OPS) + (len(_AUGMIX_ALL_EXTRA) if all_ops else 0)
    k_op, k_level, k_sign = jax.random.split(key, 3)
    op = jax.random.randint(k_op, (), 0, n_ops)
    level = jax.random.uniform(k_level, (), minval=0.1, maxval=severity)
    sign = jnp.where(jax.random.bernoulli(k_sign), -1.0, 1.0)
    size = jnp.where(op == 7, w, h).astype(jnp.float32)
    # Geometric magnitude for ops 3 (rotate), 5/6 (shear), 7/8 (translate).
    geo_mag = sign * jnp.where(
        op == 3, jnp.floor(3.0 * level), jnp.where(op <= 6, 0.03 * level, jnp.floor(level * size / 30.0))
    )
    factor = 0.18 * level + 0.1
    branches = [
        lambda x: pm.autocontrast(x),
        lambda x: pm.equalize(x),
        lambda x: pm.posterize(x, 4.0 - jnp.floor(0.4 * level)),
        # RandAugment's ids: shear_x, shear_y, translate_x, translate_y, rotate.
        lambda x: _geometric_branch(x, op, geo_mag, fill, order, (5, 6, 7, 8, 3)),
        lambda x: pm.solarize(x, (256.0 - jnp.floor(25.6 * level)) / 255.0),
        lambda x: pm.adjust_saturation(x, factor),
        lambda x: pm.adjust_contrast(x, factor),
        lambda x: pm.adjust_brightness(x, factor),
        lambda x: pm.adjust_sharpness(x, factor),
    ]
    branch_of_op = jnp.array([0, 1, 2, 3, 4, 3, 3, 3, 3, 5, 6, 7, 8][:n_ops])
    if not all_ops:
        branches = branches[:5]
    return jax.lax.switch(branch_of_op[op], branches, x)


def _mixing_weights(key, width, alpha):
    """(w ~ Dirichlet(alpha * ones(width)), m ~ Beta(alpha, alpha)).

    One gamma draw gives both: with g_i ~ Gamma(alpha) i.i.d.,
    g[:W] / sum(g[:W]) is Dirichlet and g_W / (g_W + g_{W+1}) is Beta, so only
    one sampler is compiled; for alpha = 1 Gamma(1) = Exp(1), cheaper still.
    """
    if alpha == 1.0:
        g = jax.random.exponential(key, (width + 2,))
    else:
        g = jax.random.gamma(key, alpha, (width + 2,))
    return g[:width] / jnp.sum(g[:width]), g[width] / (g[width] + g[width + 1])


@v.keeps_uint8
def augmix(
    key: jax.Array,
    image: jax.Array,
    severity: Any = 3,
    width: int = 3,
    depth: int = -1,
    alpha: float = 1.0,
    *,
    all_ops: bool = False,
    interpolation: str = "bilinear",
    fill: Any = 0.0,
) -> jax.Array:
    """AugMix (Hendrycks et al., 2020, "AugMix: A Simple Data Processing Method
    to Improve Robustness and Uncertainty"), the official code's semantics.

    ``width`` chains, each of ``depth`` ops (``depth <= 0``: U{1, 2, 3} per
    chain) drawn from ``AUGMIX_OPS`` (plus Color/Contrast/Brightness/Sharpness
    when ``all_ops``), with weights ``w ~ Dirichlet(alpha)`` and
    ``m ~ Beta(alpha, alpha)``:
    ``out = (1 - m) x + m sum_i w_i chain_i(x)``. The official code mixes after
    mean/std normalisation; as the weights sum to 1 this is the same image,
    mixed here in [0, 1]. Levels are continuous, ``level ~ U(0.1, severity)``.
    """
    fn = "augmix"
    h, w, c = v.check_image(fn, image)
    if c not in (1, 3):
        raise ValueError(f"{fn}: image must have 1 or 3 channels, got shape {tuple(image.shape)}")
    if v.is_static_number(severity) and not 1 <= severity <= 10:
        raise ValueError(f"{fn}: severity must be in [1, 10], got {severity}")
    width = v.check_static_int(fn, "width", width, minimum=1)
    depth = v.check_static_int(fn, "depth", depth)
    if not v.is_static_number(alpha):
        raise TypeError(f"{fn}: alpha must be a Python number, got {alpha!r}")
    v.check_positive(fn, "alpha", alpha)
    order = v.interpolation_order(fn, interpolation)
    fill_v = v.fill_vector(fn, fill, c)
    k_g, k_chains = jax.random.split(key)
    ws, m = _mixing_weights(k_g, width, alpha)
    x = v.as_float32(image)
    steps = depth if depth > 0 else 3

    def chain(k):
        k_depth, k_steps = jax.random.split(k)
        d = depth if depth > 0 else jax.random.randint(k_depth, (), 1, 4)

        def step(y, inputs):
            s, ks = inputs
            y_new = _augmix_step(ks, y, all_ops, severity, fill_v, order)
            return (y_new if depth > 0 else jnp.where(s < d, y_new, y)), None

        # A scan (not a Python loop) so the op body is compiled once.
        y, _ = jax.lax.scan(step, x, (jnp.arange(steps), jax.random.split(k_steps, steps)))
        return y

    chains = jax.vmap(chain)(jax.random.split(k_chains, width))
    mix = jnp.tensordot(ws, chains, axes=1)
    out = jnp.clip((1.0 - m) * x + m * mix, 0.0, 1.0)
    return out.astype(image.dtype)


def augmix_js_loss(logits_clean: jax.Array, logits_aug1: jax.Array, logits_aug2: jax.Array) -> jax.Array:
    """AugMix's Jensen-Shannon consistency term (Hendrycks et al., 2020, eq. 3).

    With ``p_i = softmax(logits_i)`` and ``M = clip((p_c + p_1 + p_2) / 3,
    1e-7, 1)``: ``JS = mean_batch (KL(p_c||M) + KL(p_1||M) + KL(p_2||M)) / 3``,
    ``KL(p||M) = sum_k p_k (log p_k - log M_k)``. The paper adds ``12 * JS`` to
    the clean cross-entropy. Logits (..., K); the mean is over leading axes.
    """
    shapes = {tuple(np.shape(z)) for z in (logits_clean, logits_aug1, logits_aug2)}
    if len(shapes) != 1:
        raise ValueError(f"augmix_js_loss: the three logits must have the same shape, got {sorted(shapes)}")
    logps = [jax.nn.log_softmax(jnp.asarray(z, jnp.float32), axis=-1) for z in (logits_clean, logits_aug1, logits_aug2)]
    ps = [jnp.exp(lp) for lp in logps]
    log_m = jnp.log(jnp.clip((ps[0] + ps[1] + ps[2]) / 3.0, 1e-7, 1.0))
    kl = sum(jnp.sum(p * (lp - log_m), axis=-1) for p, lp in zip(ps, logps))
    return jnp.mean(kl) / 3.0


# ----------------------------------------------------------------------------
# Combinators.
# ----------------------------------------------------------------------------


def compose(ops: Sequence[Op]) -> Op:
    """Chains random ops: ``compose([f, g])(key, x) = g(k2, f(k1, x))`` with
    ``k1, k2 = split(key)``. Each op is ``op(key, image) -> image``; bind extra
    arguments with ``functools.partial``, wrap deterministic primitives as
    ``lambda key, x: invert(x)``."""
    ops = tuple(ops)
    for i, op in enumerate(ops):
        if not callable(op):
            raise TypeError(f"compose: ops[{i}] must be callable op(key, image), got {op!r}")

    def composed(key: jax.Array, image: jax.Array) -> jax.Array:
        if not ops:
            return image
        for k, op in zip(jax.random.split(key, len(ops)), ops):
            image = op(k, image)
        return image

    return composed


def random_apply(op: Op, p: float) -> Op:
    """``op`` with probability ``p``, else the identity (per key, so per image
    under ``vmap``). ``op`` must keep the shape and dtype."""
    if not callable(op):
        raise TypeError(f"random_apply: op must be callable op(key, image), got {op!r}")
    v.check_probability("random_apply", "p", p)

    def applied(key: jax.Array, image: jax.Array) -> jax.Array:
        k_apply, k_op = jax.random.split(key)
        return jax.lax.cond(jax.random.uniform(k_apply) < p, lambda: op(k_op, image), lambda: image)

    return applied


def batched(op: Op) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Applies a per-image op to a (B, H, W, C) batch with one key:
    ``batched(op)(key, images) = vmap(op)(split(key, B), images)``, so every
    image gets its own draw. Jit the result once and reuse it."""
    if not callable(op):
        raise TypeError(f"batched: op must be callable op(key, image), got {op!r}")

    def run(key: jax.Array, images: jax.Array) -> jax.Array:
        b = v.check_batch("batched", images)[0]
        return jax.vmap(op)(jax.random.split(key, b), images)

    return run
