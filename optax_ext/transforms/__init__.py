"""Gradient transformations, each a pure `optax.GradientTransformation`; per-element ones fuse."""

from optax_ext.transforms.adaptive import (
    scale_by_adadelta,
    scale_by_adamax,
    scale_by_adan,
    scale_by_radam,
    scale_by_rss,
)
from optax_ext.transforms.clipping import clip, clip_by_block_rms, clip_by_global_norm
from optax_ext.transforms.factored import scale_by_factored_rms
from optax_ext.transforms.kahan import KahanSummationState, kahan_summation
from optax_ext.transforms.moments import (
    ema,
    scale_by_adam,
    scale_by_amsgrad,
    scale_by_belief,
    scale_by_lion,
    scale_by_momentum,
    scale_by_rms,
    scale_by_yogi,
)
from optax_ext.transforms.norm_based import scale_by_lbfgs, scale_by_novograd, scale_by_polyak, scale_by_sm3
from optax_ext.transforms.scaling import scale, scale_by_learning_rate, scale_by_param_block_rms, scale_by_trust_ratio
from optax_ext.transforms.sign_and_optimistic import (
    add_noise,
    scale_by_optimistic_gradient,
    scale_by_rprop,
    scale_by_sign,
)
from optax_ext.transforms.weight_decay import add_decayed_weights, add_l2, decoupled_weight_decay

__all__ = [
    "scale_by_adadelta",
    "scale_by_adamax",
    "scale_by_adan",
    "scale_by_radam",
    "scale_by_rss",
    "scale_by_lbfgs",
    "scale_by_novograd",
    "scale_by_polyak",
    "scale_by_sm3",
    "add_noise",
    "scale_by_optimistic_gradient",
    "scale_by_rprop",
    "scale_by_sign",
    "add_decayed_weights",
    "add_l2",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "decoupled_weight_decay",
    "KahanSummationState",
    "ema",
    "kahan_summation",
    "scale",
    "scale_by_adam",
    "scale_by_amsgrad",
    "scale_by_belief",
    "scale_by_factored_rms",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_momentum",
    "scale_by_param_block_rms",
    "scale_by_rms",
    "scale_by_trust_ratio",
    "scale_by_yogi",
]
