"""Batch-level mixing: Mixup, CutMix and timm's switch between them.

All three take ``(key, images, labels)`` with images (B, H, W, C) and labels
either integer class ids (B,) — then ``num_classes`` is required — or one-hot /
soft labels (B, K). Labels are first smoothed,
``y = (1 - eps) onehot + eps / K``, then mixed. Each image ``i`` is mixed with
image ``B - 1 - i`` (the batch flipped, timm's pairing: no permutation to
draw, and every image is used once as partner); one lambda per batch.
torchvision's v2 ``MixUp`` / ``CutMix`` pair ``i`` with ``i - 1`` instead
(``batch.roll(1, 0)``), so for the same lambda the two give different
batches. With the flip, an odd batch's middle image is its own partner and
comes out unmixed, with its label only smoothed (as in timm); use an even
batch size to mix every image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_ext.augment import _validate as v
from optax_ext.augment.occlusion import box_mask

__all__ = ["mixup", "cutmix", "mixup_or_cutmix", "soft_labels"]


def soft_labels(
    labels: jax.Array, num_classes: int | None = None, label_smoothing: float = 0.0, *, fn: str = "soft_labels"
) -> jax.Array:
    """(B, K) float32 targets ``(1 - eps) y + eps / K`` from integer ids (with
    ``num_classes``) or one-hot / soft labels."""
    v.check_probability(fn, "label_smoothing", label_smoothing)
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.ndim != 1:
            raise ValueError(f"{fn}: integer labels must be 1-D (B,), got shape {labels.shape}")
        if num_classes is None:
            raise ValueError(f"{fn}: num_classes is required with integer labels, got None")
        k = v.check_static_int(fn, "num_classes", num_classes, minimum=1)
        y = jax.nn.one_hot(labels, k, dtype=jnp.float32)
    else:
        if labels.ndim != 2:
            raise ValueError(f"{fn}: one-hot / soft labels must be 2-D (B, K), got shape {labels.shape}")
        k = labels.shape[1]
        if num_classes is not None and num_classes != k:
            raise ValueError(f"{fn}: num_classes={num_classes} does not match labels of shape {labels.shape}")
        y = labels.astype(jnp.float32)
    return (1.0 - label_smoothing) * y + label_smoothing / k


def _check(fn, images, labels, alpha_name, alpha):
    b = v.check_batch(fn, images)[0]
    if labels.shape[0] != b:
        raise ValueError(f"{fn}: labels must have one row per image ({b}), got shape {labels.shape}")
    if not v.is_static_number(alpha):
        raise TypeError(f"{fn}: {alpha_name} must be a Python number, got {alpha!r}")
    v.check_nonnegative(fn, alpha_name, alpha)


def _beta(key, alpha):
    if alpha == 0:
        return jnp.float32(1.0)  # timm: alpha = 0 disables the op (lambda = 1)
    if alpha == 1:  # Beta(1, 1) is U(0, 1): same law, cheaper to compile
        return jax.random.uniform(key, (), jnp.float32)
    return jax.random.beta(key, alpha, alpha).astype(jnp.float32)


def _mixup(key, x, y, alpha):
    lam = _beta(key, alpha)
    xm = lam * x + (1.0 - lam) * x[::-1]
    return xm, lam * y + (1.0 - lam) * y[::-1], lam


def _cutmix(key, x, y, alpha):
    _, h, w, _ = x.shape
    k_lam, k_y, k_x = jax.random.split(key, 3)
    lam = _beta(k_lam, alpha)
    cut = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(h * cut).astype(jnp.int32)
    cut_w = jnp.floor(w * cut).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, h)
    cx = jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
    mask = box_mask(h, w, y0, x0, y1 - y0, x1 - x0)
    xm = jnp.where(mask[None], x[::-1], x)
    # Lambda corrected to the pasted area (the box may be clipped at a border).
    lam = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
    return xm, lam * y + (1.0 - lam) * y[::-1], lam


def _finish(images, xm, ym, lam, return_lambda):
    xm = xm.astype(images.dtype)
    return (xm, ym, lam) if return_lambda else (xm, ym)


@v.keeps_uint8
def mixup(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    alpha: float = 1.0,
    *,
    num_classes: int | None = None,
    label_smoothing: float = 0.0,
    return_lambda: bool = False,
):
    """Mixup (Zhang et al., 2018, "mixup: Beyond Empirical Risk Minimization").

    ``lam ~ Beta(alpha, alpha)`` (``alpha = 0``: lam = 1, identity);
    ``x_i = lam x_i + (1 - lam) x_{B-1-i}``, ``y_i = lam y_i + (1 - lam)
    y_{B-1-i}`` with ``y`` the smoothed one-hot labels, so each row of the soft
    labels sums to 1.

    Returns:
      ``(images, soft_labels)``, plus ``lam`` if ``return_lambda``.
    """
    fn = "mixup"
    _check(fn, images, labels, "alpha", alpha)
    y = soft_labels(labels, num_classes, label_smoothing, fn=fn)
    xm, ym, lam = _mixup(key, v.as_float32(images), y, alpha)
    return _finish(images, xm, ym, lam, return_lambda)


@v.keeps_uint8
def cutmix(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    alpha: float = 1.0,
    *,
    num_classes: int | None = None,
    label_smoothing: float = 0.0,
    return_lambda: bool = False,
):
    """CutMix (Yun et al., 2019, "CutMix: Regularization Strategy to Train
    Strong Classifiers with Localizable Features"), timm's box sampling.

    ``lam ~ Beta(alpha, alpha)``; box sides ``floor(H sqrt(1 - lam))`` and
    ``floor(W sqrt(1 - lam))`` around a uniform centre, clipped to the image;
    the box of image ``B-1-i`` is pasted into image ``i``; lambda is then
    corrected to the true kept area ``lam = 1 - box_area / (H W)`` and labels
    are mixed with it.

    Returns:
      ``(images, soft_labels)``, plus the corrected ``lam`` if ``return_lambda``.
    """
    fn = "cutmix"
    _check(fn, images, labels, "alpha", alpha)
    y = soft_labels(labels, num_classes, label_smoothing, fn=fn)
    xm, ym, lam = _cutmix(key, v.as_float32(images), y, alpha)
    return _finish(images, xm, ym, lam, return_lambda)


@v.keeps_uint8
def mixup_or_cutmix(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    *,
    mixup_alpha: float = 1.0,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    num_classes: int | None = None,
    label_smoothing: float = 0.0,
    return_lambda: bool = False,
):
    """timm's ``Mixup`` (batch mode): Mixup or CutMix, switched at random.

    With probability ``prob`` the batch is mixed, otherwise only the labels are
    smoothed (lam = 1). When both alphas are > 0, CutMix is used with
    probability ``switch_prob`` and Mixup otherwise; when only one alpha is
    > 0, that op is used. (timm defaults ``label_smoothing=0.1``; 0 here.)
    """
    fn = "mixup_or_cutmix"
    _check(fn, images, labels, "mixup_alpha", mixup_alpha)
    _check(fn, images, labels, "cutmix_alpha", cutmix_alpha)
    v.check_probability(fn, "prob", prob)
    v.check_probability(fn, "switch_prob", switch_prob)
    y = soft_labels(labels, num_classes, label_smoothing, fn=fn)
    x = v.as_float32(images)
    k_apply, k_switch, k_op = jax.random.split(key, 3)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    index = jnp.where(jax.random.uniform(k_apply) < prob, jnp.where(use_cutmix, 2, 1), 0)
    branches = [
        lambda k: (x, y, jnp.float32(1.0)),
        lambda k: _mixup(k, x, y, mixup_alpha),
        lambda k: _cutmix(k, x, y, cutmix_alpha),
    ]
    if mixup_alpha == 0 and cutmix_alpha == 0:
        index = jnp.int32(0)
    xm, ym, lam = jax.lax.switch(index, branches, k_op)
    return _finish(images, xm, ym, lam, return_lambda)
