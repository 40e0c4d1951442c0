"""Image augmentation for JAX: per-image ops that run under ``jit`` and ``vmap``.

Images are float arrays in [0, 1] of shape (H, W, C). Deterministic
primitives take ``(image, ...)``; random ops take ``(key, image, ...)`` — same
key, same output; map a batch with ``batched(op)`` or ``jax.vmap`` over split
keys. Batch ops (``mixup``, ``cutmix``, ``mixup_or_cutmix``) take
``(key, images, labels)`` and return ``(images, soft_labels)``. Build
pipelines with ``compose`` and ``random_apply``::

    from functools import partial
    import optax_ext.augment as aug
    pipeline = aug.batched(aug.compose([
        partial(aug.random_crop, size=32, padding=4),
        aug.random_flip,
        partial(aug.color_jitter, brightness=0.4, contrast=0.4, saturation=0.4),
    ]))
    images = jax.jit(pipeline)(key, images)
"""

from optax_ext.augment.geometric import (
    affine, elastic_deform, flip_left_right, flip_up_down, random_affine,
    random_crop, random_flip, random_resized_crop, random_rotation, rotate)
from optax_ext.augment.mixing import (
    cutmix, mixup, mixup_or_cutmix, soft_labels)
from optax_ext.augment.occlusion import cutout, random_erasing
from optax_ext.augment.photometric import (
    adjust_brightness, adjust_contrast, adjust_gamma, adjust_hue,
    adjust_saturation, adjust_sharpness, autocontrast, blend, color_jitter,
    equalize, grayscale, hsv_to_rgb, invert, posterize, random_gamma,
    random_grayscale, rgb_to_grayscale, rgb_to_hsv, solarize)
from optax_ext.augment.policies import (
    AUGMIX_OPS, RAND_AUGMENT_OPS, augmix, augmix_js_loss, batched, compose,
    rand_augment, rand_augment_magnitudes, random_apply)

__all__ = [
    # geometric
    "random_crop", "random_resized_crop", "flip_left_right", "flip_up_down",
    "random_flip", "rotate", "random_rotation", "affine", "random_affine",
    "elastic_deform",
    # photometric
    "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue",
    "adjust_gamma", "adjust_sharpness", "grayscale", "rgb_to_grayscale",
    "invert", "solarize", "posterize", "equalize", "autocontrast", "blend",
    "rgb_to_hsv", "hsv_to_rgb", "color_jitter", "random_gamma",
    "random_grayscale",
    # occlusion
    "cutout", "random_erasing",
    # mixing
    "mixup", "cutmix", "mixup_or_cutmix", "soft_labels",
    # policies and pipelines
    "rand_augment", "rand_augment_magnitudes", "RAND_AUGMENT_OPS", "augmix",
    "AUGMIX_OPS", "augmix_js_loss", "compose", "random_apply", "batched",
]
