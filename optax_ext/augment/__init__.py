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

An evaluation transform is deterministic: ``resize(x, 256)`` (shorter side to
256, antialiased) then ``center_crop(x, 224)``, under ``jax.vmap`` for a batch
of same-size images.

Conventions that differ from torchvision, or that torchvision users trip on:

* Layout and dtype: (H, W, C) float in [0, 1], not (C, H, W) uint8; the
  output has the input's dtype, math runs in float32; integer images raise.
* Angles: ``rotate``, ``random_rotation``, ``affine`` and ``random_affine``
  all take degrees counter-clockwise (torchvision's ``F.rotate`` convention).
  torchvision's ``F.affine`` / ``RandomAffine`` turn clockwise, so its
  ``F.affine(x, angle=a)`` is our ``affine(x, angle=-a)``.
* "nearest" in warps (rotate, affine, elastic) rounds an exact half-pixel tie
  up — a uniform half-pixel shift, so a 90 degree turn of an image with
  sides of different parity keeps every pixel once; torchvision's
  ``grid_sample`` rounds half to even and reads every other pixel twice. In
  resizes (``resize``, ``random_resized_crop``) "nearest" is the pixel
  containing the output pixel's centre, ``floor((i + 0.5) * in / out)``:
  torchvision's ``NEAREST_EXACT`` and PIL's ``NEAREST``, not torchvision's
  tensor ``NEAREST`` (``floor(i * in / out)``, shifted towards the top-left).
* Fill: out-of-image pixels of a warp take ``fill`` (default 0). Bilinear
  borders are interpolation of the image extended by ``fill``, so ``fill=0``
  equals torchvision's ``fill=None``; torchvision's ``fill=c`` (and v2's
  default ``fill=0``) weights the image twice there and darkens the border.
  ``crop`` and ``center_crop`` pad windows past the edge with 0, as
  torchvision does; ``pad`` and ``random_crop`` take ``fill`` and
  ``padding_mode`` ("constant", "edge", "reflect", "symmetric").
* Sizes: an int ``size`` is a square for the crops (``random_crop``,
  ``random_resized_crop``, ``center_crop``) but the *shorter side* for
  ``resize`` (aspect ratio kept), as in torchvision. ``resize`` and
  ``random_resized_crop`` antialias when downscaling by default, as
  torchvision since 0.17; ``random_resized_crop`` reads only its box (crop,
  then resize). ``center_crop`` rounds an odd margin half to even, as
  torchvision.
* Mixup / CutMix: image ``i`` is mixed with image ``B - 1 - i`` (timm's
  flip; an odd batch's middle image stays unmixed), one lambda per batch;
  torchvision's v2 ``MixUp`` / ``CutMix`` pair ``i`` with ``i - 1``. CutMix's
  lambda is corrected to the pasted area, labels are smoothed then mixed.
* ``posterize`` on float images quantises to 8 bits first, exactly as
  torchvision on the uint8 image (levels ``k 2^(8 - bits) / 255``);
  torchvision v2's float path uses levels ``k / 2^bits`` instead.
* ``cutout`` erases exactly ``size x size`` (clipped at the border) around
  the drawn pixel; the Cutout paper's code erases ``2 (size // 2)`` per side,
  one less for odd sizes. ``random_erasing(value="random")`` draws U(0, 1)
  noise, not torchvision's N(0, 1) (which is meant for normalised tensors).
"""

from optax_ext.augment.geometric import (
    affine,
    elastic_deform,
    flip_left_right,
    flip_up_down,
    random_affine,
    random_crop,
    random_flip,
    random_resized_crop,
    random_rotation,
    rotate,
)
from optax_ext.augment.mixing import cutmix, mixup, mixup_or_cutmix, soft_labels
from optax_ext.augment.occlusion import cutout, random_erasing
from optax_ext.augment.photometric import (
    adjust_brightness,
    adjust_contrast,
    adjust_gamma,
    adjust_hue,
    adjust_saturation,
    adjust_sharpness,
    autocontrast,
    blend,
    color_jitter,
    equalize,
    grayscale,
    hsv_to_rgb,
    invert,
    posterize,
    random_gamma,
    random_grayscale,
    rgb_to_grayscale,
    rgb_to_hsv,
    solarize,
)
from optax_ext.augment.policies import (
    AUGMIX_OPS,
    RAND_AUGMENT_OPS,
    augmix,
    augmix_js_loss,
    batched,
    compose,
    rand_augment,
    rand_augment_magnitudes,
    random_apply,
)
from optax_ext.augment.sizing import center_crop, crop, pad, resize

__all__ = [
    # geometric
    "random_crop",
    "random_resized_crop",
    "flip_left_right",
    "flip_up_down",
    "random_flip",
    "rotate",
    "random_rotation",
    "affine",
    "random_affine",
    "elastic_deform",
    # deterministic crop, pad and resize (evaluation pipelines)
    "crop",
    "center_crop",
    "pad",
    "resize",
    # photometric
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "adjust_gamma",
    "adjust_sharpness",
    "grayscale",
    "rgb_to_grayscale",
    "invert",
    "solarize",
    "posterize",
    "equalize",
    "autocontrast",
    "blend",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "color_jitter",
    "random_gamma",
    "random_grayscale",
    # occlusion
    "cutout",
    "random_erasing",
    # mixing
    "mixup",
    "cutmix",
    "mixup_or_cutmix",
    "soft_labels",
    # policies and pipelines
    "rand_augment",
    "rand_augment_magnitudes",
    "RAND_AUGMENT_OPS",
    "augmix",
    "AUGMIX_OPS",
    "augmix_js_loss",
    "compose",
    "random_apply",
    "batched",
]
