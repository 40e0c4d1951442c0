"""Bad arguments raise clear errors naming the op, the argument and the value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_ext.augment as A

K = jax.random.key(0)
X = jnp.zeros((8, 8, 3))
XB = jnp.zeros((4, 8, 8, 3))
Y = jnp.arange(4) % 3


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        # images that are not 3-D, or not floating
        (
            lambda: A.flip_left_right(jnp.zeros((32, 32))),
            ValueError,
            r"flip_left_right: image must be 3-D \(H, W, C\), got shape \(32, 32\)",
        ),
        (lambda: A.rotate(jnp.zeros((2, 8, 8, 3)), 10.0), ValueError, r"rotate: image must be 3-D"),
        (lambda: A.rand_augment(K, jnp.zeros((8, 8))), ValueError, r"rand_augment: image must be 3-D"),
        (
            lambda: A.adjust_brightness(jnp.zeros((8, 8, 3), jnp.int32), 1.0),
            TypeError,
            r"adjust_brightness: image must have a floating dtype.*or be uint8 .*int32",
        ),
        (
            lambda: A.adjust_hue(jnp.zeros((8, 8, 4)), 0.1),
            ValueError,
            r"adjust_hue: image must have 1 or 3 channels, got shape \(8, 8, 4\)",
        ),
        # probabilities outside [0, 1]
        (lambda: A.random_erasing(K, X, p=1.5), ValueError, r"random_erasing: p must be in \[0, 1\], got 1.5"),
        (lambda: A.random_flip(K, X, p=-0.1), ValueError, r"random_flip: p must be in \[0, 1\], got -0.1"),
        (lambda: A.random_apply(lambda k, x: x, 2.0), ValueError, r"random_apply: p must be in \[0, 1\], got 2.0"),
        (lambda: A.random_grayscale(K, X, p=1.01), ValueError, r"random_grayscale: p must be in \[0, 1\], got 1.01"),
        (
            lambda: A.mixup_or_cutmix(K, XB, Y, num_classes=3, switch_prob=1.2),
            ValueError,
            r"mixup_or_cutmix: switch_prob must be in \[0, 1\], got 1.2",
        ),
        (
            lambda: A.mixup(K, XB, Y, num_classes=3, label_smoothing=-0.1),
            ValueError,
            r"mixup: label_smoothing must be in \[0, 1\], got -0.1",
        ),
        # negative magnitudes / factors
        (lambda: A.adjust_brightness(X, -0.5), ValueError, r"adjust_brightness: factor must be >= 0, got -0.5"),
        (lambda: A.adjust_gamma(X, -1.0), ValueError, r"adjust_gamma: gamma must be >= 0, got -1.0"),
        (lambda: A.adjust_hue(X, 0.7), ValueError, r"adjust_hue: hue_factor must be in \[-0.5, 0.5\], got 0.7"),
        (lambda: A.posterize(X, 9), ValueError, r"posterize: bits must be in \[0, 8\], got 9"),
        (
            lambda: A.rand_augment(K, X, magnitude=-1),
            ValueError,
            r"rand_augment: magnitude must be in \[0, 30\], got -1",
        ),
        (
            lambda: A.rand_augment(K, X, magnitude=31),
            ValueError,
            r"rand_augment: magnitude must be in \[0, 30\], got 31",
        ),
        (lambda: A.augmix(K, X, severity=0), ValueError, r"augmix: severity must be in \[1, 10\], got 0"),
        (lambda: A.augmix(K, X, alpha=-1.0), ValueError, r"augmix: alpha must be > 0, got -1.0"),
        (lambda: A.color_jitter(K, X, brightness=-0.2), ValueError, r"color_jitter: brightness must be >= 0, got -0.2"),
        (lambda: A.color_jitter(K, X, hue=0.6), ValueError, r"color_jitter: hue must be in \[0, 0.5\], got 0.6"),
        (lambda: A.random_rotation(K, X, degrees=-5.0), ValueError, r"random_rotation: degrees must be >= 0, got -5.0"),
        (lambda: A.elastic_deform(K, X, alpha=-1.0), ValueError, r"elastic_deform: alpha must be >= 0, got -1.0"),
        (
            lambda: A.elastic_deform(K, X, sigma=0.0),
            ValueError,
            r"elastic_deform: sigma must be a Python number > 0, got 0.0",
        ),
        (lambda: A.mixup(K, XB, Y, alpha=-0.2, num_classes=3), ValueError, r"mixup: alpha must be >= 0, got -0.2"),
        (lambda: A.cutout(K, X, -2), ValueError, r"cutout: size must be >= 0, got -2"),
        (lambda: A.affine(X, scale=0.0), ValueError, r"affine: scale must be > 0, got 0.0"),
        # ranges, sizes, options
        (
            lambda: A.random_erasing(K, X, scale=(0.5, 0.1)),
            ValueError,
            r"random_erasing: scale must satisfy min <= max",
        ),
        (
            lambda: A.random_resized_crop(K, X, 8, scale=(0.1, 1.5)),
            ValueError,
            r"random_resized_crop: scale must lie in \[0.0, 1.0\]",
        ),
        (
            lambda: A.random_crop(K, X, 12),
            ValueError,
            r"random_crop: size \(12, 12\) is larger than the padded image \(8, 8\)",
        ),
        (lambda: A.random_crop(K, X, 8.5), TypeError, r"random_crop: size must be an int or a pair"),
        (
            lambda: A.rotate(X, 10.0, interpolation="bicubic"),
            ValueError,
            r"rotate: interpolation must be one of \['bilinear', 'nearest'\], got "
            r"'bicubic'",
        ),
        (
            lambda: A.rotate(X, 10.0, fill=(0.0, 1.0)),
            ValueError,
            r"rotate: fill must be a scalar or have one value per channel \(3\)",
        ),
        (lambda: A.random_flip(K, X, direction="diagonal"), ValueError, r"random_flip: direction must be"),
        (lambda: A.random_erasing(K, X, value="noise"), ValueError, r"random_erasing: value must be .* got 'noise'"),
        # batch ops
        (
            lambda: A.mixup(K, X, Y, num_classes=3),
            ValueError,
            r"mixup: images must be 4-D \(B, H, W, C\), got shape \(8, 8, 3\)",
        ),
        (lambda: A.cutmix(K, XB, Y), ValueError, r"cutmix: num_classes is required with integer labels, got None"),
        (
            lambda: A.cutmix(K, XB, jnp.arange(3), num_classes=3),
            ValueError,
            r"cutmix: labels must have one row per image \(4\), got shape \(3,\)",
        ),
        (
            lambda: A.mixup(K, XB, jnp.eye(3)[Y], num_classes=5),
            ValueError,
            r"mixup: num_classes=5 does not match labels of shape \(4, 3\)",
        ),
        (lambda: A.compose([A.random_flip, 3]), TypeError, r"compose: ops\[1\] must be callable"),
        (lambda: A.batched(A.random_flip)(K, X), ValueError, r"batched: images must be 4-D"),
        (
            lambda: A.augmix_js_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 4))),
            ValueError,
            r"augmix_js_loss: the three logits must have the same shape",
        ),
    ],
)
def test_bad_arguments_raise(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_checks_run_at_trace_time_and_traced_values_pass():
    # Validation happens while tracing: errors surface from jax.jit too ...
    with pytest.raises(ValueError, match="random_erasing: p must be in"):
        jax.jit(lambda k, x: A.random_erasing(k, x, p=1.5))(K, X)
    # ... and traced (runtime) hyperparameters are accepted unchecked.
    out = jax.jit(lambda x, f: A.adjust_brightness(x, f))(X, 0.5)
    assert out.shape == X.shape


def test_inputs_not_mutated():
    x = np.random.default_rng(0).uniform(0, 1, (8, 8, 3)).astype(np.float32)
    x0 = x.copy()
    A.random_erasing(K, x, p=1.0)
    A.cutout(K, x, 4)
    A.rand_augment(K, x)
    np.testing.assert_array_equal(x, x0)
