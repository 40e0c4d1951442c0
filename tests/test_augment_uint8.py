"""uint8 images in, uint8 images out (as torchvision's v2 transforms), with the math in f32 on value / 255:
exact for ops that move pixels, the nearest uint8 to the float64 formula for ops that compute them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_ext.augment as A

SHAPES = [(13, 17, 3), (8, 8, 3), (31, 5, 3)]


def _image(key, shape):
    return jax.random.randint(key, shape, 0, 256).astype(jnp.uint8)


def _u8(x64):
    return np.clip(np.round(x64), 0, 255).astype(np.uint8)


# op(key, image) -> image, for every public op that takes an image: uint8 result, equal (to one level
# of rounding) to the float op on value / 255, scaled back.
OPS = {
    "random_crop": lambda k, x: A.random_crop(k, x, (5, 4)),
    "random_resized_crop": lambda k, x: A.random_resized_crop(k, x, (6, 7)),
    "flip_left_right": lambda k, x: A.flip_left_right(x),
    "flip_up_down": lambda k, x: A.flip_up_down(x),
    "random_flip": lambda k, x: A.random_flip(k, x),
    "rotate": lambda k, x: A.rotate(x, 33.0),
    "random_rotation": lambda k, x: A.random_rotation(k, x, 20.0),
    "affine": lambda k, x: A.affine(x, 10.0, (1, 2), 1.1, 5.0),
    "random_affine": lambda k, x: A.random_affine(k, x, 15.0),
    "elastic_deform": lambda k, x: A.elastic_deform(k, x),
    "crop": lambda k, x: A.crop(x, 1, 2, 4, 3),
    "center_crop": lambda k, x: A.center_crop(x, 4),
    "pad": lambda k, x: A.pad(x, 2, 0.5),
    "resize": lambda k, x: A.resize(x, (9, 11)),
    "adjust_brightness": lambda k, x: A.adjust_brightness(x, 1.3),
    "adjust_contrast": lambda k, x: A.adjust_contrast(x, 0.7),
    "adjust_saturation": lambda k, x: A.adjust_saturation(x, 1.4),
    "adjust_hue": lambda k, x: A.adjust_hue(x, 0.1),
    "adjust_gamma": lambda k, x: A.adjust_gamma(x, 0.8),
    "adjust_sharpness": lambda k, x: A.adjust_sharpness(x, 1.5),
    "grayscale": lambda k, x: A.grayscale(x),
    "rgb_to_grayscale": lambda k, x: A.rgb_to_grayscale(x),
    "invert": lambda k, x: A.invert(x),
    "solarize": lambda k, x: A.solarize(x, 0.5),
    "posterize": lambda k, x: A.posterize(x, 3),
    "equalize": lambda k, x: A.equalize(x),
    "autocontrast": lambda k, x: A.autocontrast(x),
    "color_jitter": lambda k, x: A.color_jitter(k, x, 0.3, 0.3, 0.3, 0.05),
    "random_gamma": lambda k, x: A.random_gamma(k, x),
    "random_grayscale": lambda k, x: A.random_grayscale(k, x, 0.5),
    "cutout": lambda k, x: A.cutout(k, x, 4),
    "random_erasing": lambda k, x: A.random_erasing(k, x, 1.0),
    "rand_augment": lambda k, x: A.rand_augment(k, x),
    "augmix": lambda k, x: A.augmix(k, x),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(OPS))
def test_uint8_in_uint8_out_like_the_float_op(key, name, shape):
    k_img, k_op = jax.random.split(key)
    x = _image(k_img, shape)
    got = OPS[name](k_op, x)
    assert got.dtype == jnp.uint8, got.dtype
    as_float = OPS[name](k_op, x.astype(jnp.float32) / 255.0)
    expected = np.clip(np.round(np.asarray(as_float, np.float64) * 255.0), 0, 255)
    # Rounding of value / 255 in f32 may move a result that lies on a half level by one.
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, atol=1.0, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_pixel_moving_ops_are_exact(key, shape):
    x = _image(key, shape)
    xn = np.asarray(x)
    np.testing.assert_array_equal(A.flip_left_right(x), xn[:, ::-1])
    np.testing.assert_array_equal(A.flip_up_down(x), xn[::-1])
    np.testing.assert_array_equal(A.crop(x, 1, 2, 4, 3), xn[1:5, 2:5])
    np.testing.assert_array_equal(A.pad(x, 2, 0.0), np.pad(xn, ((2, 2), (2, 2), (0, 0))))
    if shape[0] == shape[1]:  # a quarter turn (counter-clockwise) of a square image moves every pixel
        np.testing.assert_array_equal(A.rotate(x, 90.0, interpolation="nearest"), np.rot90(xn))


@pytest.mark.parametrize("shape", SHAPES)
def test_computing_ops_give_the_nearest_uint8_of_the_formula(key, shape):
    """torchvision's formulas on the uint8 values, in float64, rounded to nearest."""
    x = _image(key, shape)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_array_equal(A.invert(x), 255 - np.asarray(x))
    np.testing.assert_array_equal(A.adjust_brightness(x, 1.3), _u8(x64 * 1.3))
    np.testing.assert_array_equal(A.adjust_gamma(x, 0.8, 1.1), _u8(255 * np.clip(1.1 * (x64 / 255) ** 0.8, 0, 1)))
    np.testing.assert_array_equal(A.solarize(x, 0.5), np.where(x64 / 255 >= 0.5, 255 - x64, x64).astype(np.uint8))
    # posterize on uint8 is torchvision's bitwise mask of the low bits
    np.testing.assert_array_equal(A.posterize(x, 3), np.asarray(x) & np.uint8(0b11100000))


def test_mixup_and_cutmix_return_uint8_images_and_float_labels(key):
    k_img, k_op = jax.random.split(key)
    images = jnp.stack([_image(k, (8, 9, 3)) for k in jax.random.split(k_img, 4)])
    labels = jax.nn.one_hot(jnp.arange(4) % 3, 3)
    for op in (A.mixup, A.cutmix, A.mixup_or_cutmix):
        mixed, soft = op(k_op, images, labels)
        assert mixed.dtype == jnp.uint8 and soft.dtype == jnp.float32
        fmixed, fsoft = op(k_op, images.astype(jnp.float32) / 255.0, labels)
        np.testing.assert_allclose(soft, fsoft, rtol=1e-6)
        np.testing.assert_allclose(
            np.asarray(mixed, np.float64), np.round(np.asarray(fmixed, np.float64) * 255), atol=1
        )


def test_uint8_works_under_jit_and_vmap(key):
    x = jnp.stack([_image(k, (8, 8, 3)) for k in jax.random.split(key, 3)])
    keys = jax.random.split(key, 3)
    out = jax.jit(jax.vmap(lambda k, im: A.random_resized_crop(k, im, (6, 6))))(keys, x)
    assert out.dtype == jnp.uint8 and out.shape == (3, 6, 6, 3)
