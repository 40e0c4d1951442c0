"""RandAugment, AugMix, the JS consistency loss and the pipeline combinators."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_ext.augment as A


def rand_image(seed, shape, dtype=np.float32):
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(dtype)


def test_rand_augment_magnitude_table_is_torchvision():
    h, w, n = 17, 23, 31
    t = A.rand_augment_magnitudes(n, h, w)
    assert t.shape == (14, n)
    b = 9  # bin 9 of 31, from torchvision's linspace / arange formulas
    expect = {
        "Identity": 0.0,
        "ShearX": 0.3 * b / 30,
        "ShearY": 0.3 * b / 30,
        "TranslateX": 150 / 331 * w * b / 30,
        "TranslateY": 150 / 331 * h * b / 30,
        "Rotate": 30 * b / 30,
        "Brightness": 0.9 * b / 30,
        "Color": 0.9 * b / 30,
        "Contrast": 0.9 * b / 30,
        "Sharpness": 0.9 * b / 30,
        "Posterize": 8 - round(b / 7.5),
        "Solarize": 1 - b / 30,
        "AutoContrast": 0.0,
        "Equalize": 0.0,
    }
    for i, name in enumerate(A.RAND_AUGMENT_OPS):
        np.testing.assert_allclose(t[i, b], expect[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(t[10, [0, 30]], [8, 4])  # posterize 8..4 bits


def rand_augment_candidates(x, bin_, bins=31):
    """Every possible single-op RandAugment output, built from the public
    primitives with torchvision's _apply_op."""
    h, w, _ = x.shape
    t = A.rand_augment_magnitudes(bins, h, w)[:, bin_]
    out = {"Identity": [x]}
    for s in (1, -1):
        sh = math.degrees(math.atan(s * t[1]))
        out.setdefault("ShearX", []).append(A.affine(x, shear=(sh, 0.0), center=(0, 0)))
        out.setdefault("ShearY", []).append(A.affine(x, shear=(0.0, sh), center=(0, 0)))
        out.setdefault("TranslateX", []).append(A.affine(x, translate=(int(s * t[3]), 0)))
        out.setdefault("TranslateY", []).append(A.affine(x, translate=(0, int(s * t[4]))))
        out.setdefault("Rotate", []).append(A.rotate(x, s * t[5]))
        out.setdefault("Brightness", []).append(A.adjust_brightness(x, 1 + s * t[6]))
        out.setdefault("Color", []).append(A.adjust_saturation(x, 1 + s * t[7]))
        out.setdefault("Contrast", []).append(A.adjust_contrast(x, 1 + s * t[8]))
        out.setdefault("Sharpness", []).append(A.adjust_sharpness(x, 1 + s * t[9]))
    out["Posterize"] = [A.posterize(x, int(t[10]))]
    out["Solarize"] = [A.solarize(x, t[11])]
    out["AutoContrast"] = [A.autocontrast(x)]
    out["Equalize"] = [A.equalize(x)]
    return {k: [np.asarray(c) for c in v] for k, v in out.items()}


@pytest.mark.parametrize("shape", [(17, 23, 3), (16, 16, 1)])
def test_rand_augment_one_op_is_one_of_the_14(shape):
    x = rand_image(0, shape)
    cands = rand_augment_candidates(x, 9)
    fn = jax.jit(jax.vmap(lambda k: A.rand_augment(k, x, num_ops=1, magnitude=9)))
    outs = np.asarray(fn(jax.random.split(jax.random.key(0), 80)))
    seen = set()
    for out in outs:
        dist = {k: min(np.abs(out - c).max() for c in v) for k, v in cands.items()}
        best = min(dist, key=dist.get)
        assert dist[best] < 1e-5, dist
        seen.add(best)
    assert len(seen) >= 10  # ops are drawn uniformly from 14


def test_rand_augment_keys_identity_and_traced_magnitude():
    x = rand_image(1, (17, 23, 3))
    fn = jax.jit(lambda k, m: A.rand_augment(k, x, num_ops=2, magnitude=m))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(fn(k1, 9), fn(k1, 9))
    outs = np.asarray(jax.vmap(fn, in_axes=(0, None))(jax.random.split(k2, 8), 15))
    assert len({o.tobytes() for o in outs}) >= 6
    np.testing.assert_array_equal(A.rand_augment(k1, x, num_ops=0), x)
    # Magnitude 0: every op except the four magnitude-free ones is the identity.
    cands = rand_augment_candidates(x, 0)
    for name in (
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
    ):
        for c in cands[name]:
            np.testing.assert_allclose(c, x, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_policies_jit_vmap_dtype(dtype):
    shape = (12, 14, 3)
    xs = jnp.broadcast_to(jnp.asarray(rand_image(2, shape), dtype), (4,) + shape)
    keys = jax.random.split(jax.random.key(3), 4)
    for op in (partial(A.rand_augment, num_ops=2, magnitude=12), partial(A.augmix, severity=3)):
        fn = jax.jit(jax.vmap(op))
        out = fn(keys, xs)
        assert out.shape == xs.shape and out.dtype == dtype
        o = np.asarray(out, np.float32)
        assert o.min() >= 0 and o.max() <= 1
        one = jax.jit(op)
        for i in range(2 if dtype == jnp.float32 else 0):
            np.testing.assert_allclose(
                o[i], np.asarray(one(keys[i], xs[i]), np.float32), atol=1e-5 if dtype == jnp.float32 else 1e-2
            )
        again = np.asarray(fn(keys[np.array([0, 0, 1, 2])], xs), np.float32)
        np.testing.assert_array_equal(again[0], again[1])
        assert len({r.tobytes() for r in o}) == 4


def test_augmix_properties():
    x = rand_image(4, (16, 16, 3))
    keys = jax.random.split(jax.random.key(5), 48)
    fn = jax.jit(jax.vmap(lambda k, sev: A.augmix(k, x, severity=sev, width=3, depth=-1, alpha=1.0), in_axes=(0, None)))
    dev = {}
    for sev in (1.0, 8.0):
        outs = np.asarray(fn(keys, sev))
        assert outs.min() >= 0 and outs.max() <= 1
        dev[sev] = np.abs(outs - x).mean()
    assert 0 < dev[1.0] < dev[8.0]  # stronger ops at higher severity
    # Fixed depth, the extended op list, a Gamma-sampled alpha and a single
    # channel image also run, and change the image.
    g = rand_image(6, (10, 9, 1))
    f2 = jax.jit(lambda k: (A.augmix(k, x, width=2, depth=2, all_ops=True, alpha=0.5), A.augmix(k, g)))
    out, out_g = f2(keys[0])
    assert out.shape == x.shape and not np.allclose(out, x)
    assert out_g.shape == g.shape and not np.allclose(out_g, g)


@pytest.mark.parametrize("alpha,width", [(0.5, 3), (1.0, 4)])
def test_augmix_mixing_weights_law(alpha, width):
    """w ~ Dirichlet(alpha): mean 1/W, var (1/W)(1 - 1/W)/(W alpha + 1);
    m ~ Beta(alpha, alpha): mean 1/2, var 1/(4 (2 alpha + 1))."""
    from optax_ext.augment.policies import _mixing_weights

    keys = jax.random.split(jax.random.key(11), 4000)
    ws, m = jax.jit(jax.vmap(lambda k: _mixing_weights(k, width, alpha)))(keys)
    ws, m = np.asarray(ws, np.float64), np.asarray(m, np.float64)
    np.testing.assert_allclose(ws.sum(1), 1.0, atol=1e-5)
    assert np.all(ws >= 0) and np.all((0 <= m) & (m <= 1))
    e = 1 / width
    np.testing.assert_allclose(ws.mean(0), e, atol=0.02)
    np.testing.assert_allclose(ws.var(0), e * (1 - e) / (width * alpha + 1), rtol=0.15)
    assert abs(m.mean() - 0.5) < 0.02
    np.testing.assert_allclose(m.var(), 1 / (4 * (2 * alpha + 1)), rtol=0.1)


def np_js(l0, l1, l2):
    ps = [np.exp(z - z.max(-1, keepdims=True)) for z in (np.float64(l0), np.float64(l1), np.float64(l2))]
    ps = [p / p.sum(-1, keepdims=True) for p in ps]
    m = np.clip((ps[0] + ps[1] + ps[2]) / 3, 1e-7, 1)
    kl = [np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(m)), 0), -1) for p in ps]
    return np.mean(kl[0] + kl[1] + kl[2]) / 3


def test_augmix_js_loss_matches_float64_numpy():
    rng = np.random.default_rng(7)
    for shape, scale in (((7, 10), 1.0), ((5, 3), 20.0), ((4, 2, 6), 3.0)):
        ls = [(scale * rng.normal(size=shape)).astype(np.float32) for _ in range(3)]
        np.testing.assert_allclose(A.augmix_js_loss(*ls), np_js(*ls), rtol=1e-5, atol=1e-6)
    z = rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(A.augmix_js_loss(z, z, z), 0.0, atol=1e-6)
    g = jax.jit(jax.grad(A.augmix_js_loss))(z, z + 1, 2 * z)
    assert g.shape == z.shape and np.all(np.isfinite(g))


def test_compose_random_apply_batched():
    x = rand_image(8, (12, 12, 3))
    crop = partial(A.random_crop, size=12, padding=2)
    jitter = partial(A.color_jitter, brightness=0.5, contrast=0.5)
    pipe = A.compose([crop, A.random_flip, jitter])
    k = jax.random.key(9)
    k1, k2, k3 = jax.random.split(k, 3)
    np.testing.assert_allclose(pipe(k, x), jitter(k3, A.random_flip(k2, crop(k1, x))), atol=1e-6)
    np.testing.assert_array_equal(A.compose([])(k, x), x)
    inv = lambda key, im: A.invert(im)
    np.testing.assert_array_equal(A.random_apply(inv, 0.0)(k, x), x)
    np.testing.assert_allclose(A.random_apply(inv, 1.0)(k, x), 1 - x, atol=1e-7)
    half = jax.jit(jax.vmap(A.random_apply(inv, 0.5), in_axes=(0, None)))
    outs = np.asarray(half(jax.random.split(k, 300), x))
    inverted = np.all(np.abs(outs - (1 - x)) < 1e-6, axis=(1, 2, 3))
    assert 0.38 < inverted.mean() < 0.62
    # batched: one key for the whole batch == vmap over split keys.
    xs = jnp.broadcast_to(x, (5, 12, 12, 3))
    run = jax.jit(A.batched(pipe))
    out = run(k, xs)
    ref = jax.jit(jax.vmap(pipe))(jax.random.split(k, 5), xs)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert len({np.asarray(r).tobytes() for r in out}) == 5
