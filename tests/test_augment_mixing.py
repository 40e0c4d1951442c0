"""Mixup / CutMix / mixup_or_cutmix against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_ext.augment as A

B, H, W, C, K = 6, 11, 13, 3, 5


def batch(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (B, H, W, C)).astype(dtype)
    y = rng.integers(0, K, B)
    return x, y


def smoothed(y, eps):
    return (1 - eps) * np.eye(K)[y] + eps / K


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mixup_matches_reference(eps):
    x, y = batch(0)
    for seed in range(3):
        xm, ym, lam = A.mixup(jax.random.key(seed), x, y, 0.4, num_classes=K, label_smoothing=eps, return_lambda=True)
        lam = float(lam)
        assert 0 <= lam <= 1
        xd = x.astype(np.float64)
        np.testing.assert_allclose(xm, lam * xd + (1 - lam) * xd[::-1], atol=1e-6)
        ys = smoothed(y, eps)
        np.testing.assert_allclose(ym, lam * ys + (1 - lam) * ys[::-1], atol=1e-6)
        np.testing.assert_allclose(np.sum(ym, 1), 1.0, atol=1e-6)
    # One-hot input gives the same as integer input; alpha 0 is the identity.
    a = A.mixup(jax.random.key(0), x, y, 0.4, num_classes=K)
    b = A.mixup(jax.random.key(0), x, np.eye(K, dtype=np.float32)[y], 0.4)
    np.testing.assert_allclose(a[1], b[1], atol=1e-7)
    np.testing.assert_array_equal(a[0], b[0])
    xm, ym = A.mixup(jax.random.key(0), x, y, 0.0, num_classes=K)
    np.testing.assert_array_equal(xm, x)
    np.testing.assert_allclose(ym, np.eye(K)[y])


def test_mixup_lambda_is_beta_distributed():
    x, y = batch(1)
    lam_fn = jax.jit(jax.vmap(lambda k: A.mixup(k, x, y, 0.5, num_classes=K, return_lambda=True)[2]))
    lams = np.asarray(lam_fn(jax.random.split(jax.random.key(0), 2000)))
    # Beta(0.5, 0.5): mean 1/2, variance 1/8.
    assert abs(lams.mean() - 0.5) < 0.03 and abs(lams.var() - 0.125) < 0.015


def pasted_mask(xm, x):
    """Pixels that come from the partner image (all channels)."""
    from_partner = np.all(xm == x[::-1], axis=-1)
    from_self = np.all(xm == x, axis=-1)
    assert np.all(from_partner | from_self)
    return from_partner & ~from_self


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_cutmix_lambda_equals_pasted_area(eps):
    x, y = batch(2)
    areas = []
    for seed in range(8):
        xm, ym, lam = A.cutmix(jax.random.key(seed), x, y, 1.0, num_classes=K, label_smoothing=eps, return_lambda=True)
        mask = pasted_mask(np.asarray(xm), x)
        # Same box in every image, and it is a rectangle.
        assert np.all(mask == mask[0])
        rows, cols = np.nonzero(mask[0].any(1))[0], np.nonzero(mask[0].any(0))[0]
        if rows.size:
            assert mask[0].sum() == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        area = mask[0].mean()
        areas.append(area)
        np.testing.assert_allclose(float(lam), 1 - area, atol=1e-6)
        ys = smoothed(y, eps)
        np.testing.assert_allclose(ym, float(lam) * ys + (1 - float(lam)) * ys[::-1], atol=1e-6)
        np.testing.assert_allclose(np.sum(ym, 1), 1.0, atol=1e-6)
    assert max(areas) > 0.05  # boxes are actually pasted


def test_mixup_or_cutmix_switch():
    x, y = batch(3)
    fn = jax.jit(
        jax.vmap(
            lambda k: A.mixup_or_cutmix(
                k, x, y, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5, num_classes=K, return_lambda=True
            )
        )
    )
    xms, yms, lams = (np.asarray(a) for a in fn(jax.random.split(jax.random.key(0), 40)))
    xd = x.astype(np.float64)
    kinds = []
    for xm, ym, lam in zip(xms, yms, lams):
        mix_ref = lam * xd + (1 - lam) * xd[::-1]
        if np.allclose(xm, mix_ref, atol=1e-6) and not (np.all((xm == x) | (xm == x[::-1]))):
            kinds.append("mixup")
        else:
            mask = pasted_mask(xm, x)
            np.testing.assert_allclose(lam, 1 - mask[0].mean(), atol=1e-6)
            kinds.append("cutmix")
        ys = np.eye(K)[y]
        np.testing.assert_allclose(ym, lam * ys + (1 - lam) * ys[::-1], atol=1e-6)
    assert 8 <= kinds.count("cutmix") <= 32
    # prob = 0: images untouched, labels only smoothed.
    xm, ym = A.mixup_or_cutmix(jax.random.key(1), x, y, prob=0.0, num_classes=K, label_smoothing=0.1)
    np.testing.assert_array_equal(xm, x)
    np.testing.assert_allclose(ym, smoothed(y, 0.1), atol=1e-7)
    # Only CutMix enabled: always a paste.
    xm, _, lam = A.mixup_or_cutmix(jax.random.key(2), x, y, mixup_alpha=0.0, num_classes=K, return_lambda=True)
    np.testing.assert_allclose(lam, 1 - pasted_mask(np.asarray(xm), x)[0].mean(), atol=1e-6)


def test_dtype_preserved_bf16():
    x, y = batch(4)
    xb = jnp.asarray(x, jnp.bfloat16)
    for op in (A.mixup, A.cutmix):
        xm, ym = op(jax.random.key(0), xb, y, 1.0, num_classes=K)
        assert xm.dtype == jnp.bfloat16 and xm.shape == x.shape
        assert ym.dtype == jnp.float32 and ym.shape == (B, K)
    xm, _ = A.mixup_or_cutmix(jax.random.key(0), xb, y, num_classes=K)
    assert xm.dtype == jnp.bfloat16
