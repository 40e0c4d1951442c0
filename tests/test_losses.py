"""Losses against float64 references written from the formulas, Optax's equivalents, and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_ext import losses as L


def _softmax64(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ce64(z, y_soft):
    z = np.asarray(z, np.float64)
    log_p = z - z.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    return -(y_soft * log_p).sum(-1)


# --------------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("shape", [(1, 2), (13, 10), (2, 3, 7)])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])
def test_cross_entropy_integer_labels(key, shape, alpha):
    k1, k2 = jax.random.split(key)
    logits = 3.0 * jax.random.normal(k1, shape)
    labels = jax.random.randint(k2, shape[:-1], 0, shape[-1])
    out = jax.jit(L.softmax_cross_entropy, static_argnames="label_smoothing")(logits, labels, label_smoothing=alpha)
    K = shape[-1]
    y = (1 - alpha) * np.eye(K)[np.asarray(labels)] + alpha / K
    np.testing.assert_allclose(out, _ce64(logits, y), rtol=1e-5, atol=1e-6)
    assert out.shape == shape[:-1] and out.dtype == jnp.float32
    # Optax: one-hot + optax.smooth_labels
    ref = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, K), alpha))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_cross_entropy_soft_labels_and_gradient(key):
    k1, k2, k3 = jax.random.split(key, 3)
    logits = jax.random.normal(k1, (9, 5))
    lam = 0.3  # mixup of two one-hot rows
    a, b = jax.random.randint(k2, (9,), 0, 5), jax.random.randint(k3, (9,), 0, 5)
    soft = lam * jax.nn.one_hot(a, 5) + (1 - lam) * jax.nn.one_hot(b, 5)
    alpha = 0.2
    out = L.softmax_cross_entropy(logits, soft, label_smoothing=alpha)
    y = (1 - alpha) * np.asarray(soft, np.float64) + alpha / 5
    np.testing.assert_allclose(out, _ce64(logits, y), rtol=1e-5)
    # mixing the losses == loss of the mixed labels (linearity in the labels)
    mixed = lam * L.softmax_cross_entropy(logits, a, label_smoothing=alpha) + (1 - lam) * L.softmax_cross_entropy(
        logits, b, label_smoothing=alpha
    )
    np.testing.assert_allclose(out, mixed, rtol=1e-5)
    # d/dz sum CE = softmax(z) - y (y sums to 1)
    g = jax.grad(lambda z: L.softmax_cross_entropy(z, soft, label_smoothing=alpha).sum())(logits)
    np.testing.assert_allclose(g, _softmax64(logits) - y, atol=1e-6)


def test_cross_entropy_bf16_logits(key):
    logits = jax.random.normal(key, (6, 11)).astype(jnp.bfloat16)
    labels = jnp.arange(6) % 11
    out = L.softmax_cross_entropy(logits, labels, label_smoothing=0.1)
    y = 0.9 * np.eye(11)[np.arange(6)] + 0.1 / 11
    np.testing.assert_allclose(out, _ce64(np.float64(logits.astype(jnp.float32)), y), rtol=1e-5)


def test_cross_entropy_bad_input():
    z = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match="num_classes=5"):
        L.softmax_cross_entropy(z, jnp.zeros(4, int), num_classes=5)
    with pytest.raises(ValueError, match=r"shape of logits without the class axis, \(4,\)"):
        L.softmax_cross_entropy(z, jnp.zeros((4, 1), int))
    with pytest.raises(ValueError, match="soft labels"):
        L.softmax_cross_entropy(z, jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="label_smoothing"):
        L.softmax_cross_entropy(z, jnp.zeros(4, int), label_smoothing=1.5)
    with pytest.raises(TypeError, match="dtype bool"):
        L.softmax_cross_entropy(z, jnp.zeros((4, 3), bool))


# --------------------------------------------------------------------------------- NT-Xent


def _nt_xent64(z1, z2, tau):
    """Eq. (18)'s term per view, averaged over the 2N views, in float64 with explicit loops."""
    z = np.concatenate([np.asarray(z1, np.float64), np.asarray(z2, np.float64)])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        denom = sum(np.exp(z[i] @ z[k] / tau) for k in range(n2) if k != i)
        total += -np.log(np.exp(z[i] @ z[j] / tau) / denom)
    return total / n2


@pytest.mark.parametrize("n,d", [(1, 3), (4, 8), (9, 5)])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_nt_xent_against_formula_and_optax(key, n, d, tau):
    k1, k2 = jax.random.split(key)
    z1 = jax.random.normal(k1, (n, d))
    z2 = z1 + 0.5 * jax.random.normal(k2, (n, d))
    out = jax.jit(L.nt_xent)(z1, z2, tau)
    np.testing.assert_allclose(out, _nt_xent64(z1, z2, tau), rtol=2e-5, atol=1e-6)
    # optax.ntxent averages over positive pairs: 2N of them here, so the factor is exactly 1.
    labels = jnp.concatenate([jnp.arange(n), jnp.arange(n)])
    ref = optax.losses.ntxent(jnp.concatenate([z1, z2]), labels, temperature=tau)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=1e-6)


def test_nt_xent_gradient_matches_finite_differences(key):
    k1, k2 = jax.random.split(key)
    z1, z2 = jax.random.normal(k1, (3, 4)), jax.random.normal(k2, (3, 4))
    tau = 0.5
    g1, g2 = jax.grad(L.nt_xent, argnums=(0, 1))(z1, z2, tau)
    z1_64, z2_64 = np.float64(z1), np.float64(z2)
    h = 1e-6
    for grad, which in ((g1, 0), (g2, 1)):
        fd = np.zeros(z1.shape)
        for idx in np.ndindex(z1.shape):
            a, b = z1_64.copy(), z2_64.copy()
            target = a if which == 0 else b
            target[idx] += h
            up = _nt_xent64(a, b, tau)
            target[idx] -= 2 * h
            down = _nt_xent64(a, b, tau)
            fd[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, fd, atol=2e-5)


def test_nt_xent_default_temperature_and_errors(key):
    z = jax.random.normal(key, (5, 3))
    np.testing.assert_allclose(L.nt_xent(z, -z), _nt_xent64(z, -z, 0.5), rtol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        L.nt_xent(z, z, 0.0)
    with pytest.raises(ValueError, match=r"\(5, 3\) and \(4, 3\)"):
        L.nt_xent(z, z[:4])


# --------------------------------------------------------------------------------- Jensen-Shannon


def _js64(*logits):
    ps = [_softmax64(x) for x in logits]
    m = np.clip(sum(ps) / 3.0, 1e-7, 1.0)
    kl = [np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(m)), 0.0), -1) for p in ps]
    return sum(kl) / 3.0


@pytest.mark.parametrize("shape", [(1, 2), (8, 10), (3, 4, 7)])
def test_jensen_shannon_against_formula(key, shape):
    ks = jax.random.split(key, 3)
    logits = [2.0 * jax.random.normal(k, shape) for k in ks]
    out = jax.jit(L.jensen_shannon_consistency)(*logits)
    np.testing.assert_allclose(out, _js64(*logits), rtol=1e-4, atol=1e-6)
    assert out.shape == shape[:-1]
    # symmetric in its three arguments, zero for identical views, bounded by log 3
    np.testing.assert_allclose(L.jensen_shannon_consistency(logits[2], logits[0], logits[1]), out, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(L.jensen_shannon_consistency(*[logits[0]] * 3), 0.0, atol=1e-6)
    assert np.all(np.asarray(out) <= np.log(3.0) + 1e-6)


def test_jensen_shannon_extreme_logits_and_gradient(key):
    ks = jax.random.split(key, 3)
    logits = [30.0 * jax.random.normal(k, (4, 6)) for k in ks]  # near one-hot: M is clipped
    out = L.jensen_shannon_consistency(*logits)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, _js64(*logits), rtol=1e-4, atol=1e-5)
    small = [jax.random.normal(k, (2, 3)) for k in ks]
    g = jax.grad(lambda a: L.jensen_shannon_consistency(a, small[1], small[2]).sum())(small[0])
    x = np.float64(small[0])
    fd = np.zeros(x.shape)
    h = 1e-6
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        fd[idx] = (_js64(up, small[1], small[2]).sum() - _js64(down, small[1], small[2]).sum()) / (2 * h)
    np.testing.assert_allclose(g, fd, atol=2e-5)
    with pytest.raises(ValueError, match="same shape"):
        L.jensen_shannon_consistency(logits[0], logits[1], logits[2][:3])
