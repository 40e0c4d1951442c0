"""optax_ext: composable, fused Optax transformations for JAX and Flax.

Every optimizer is a pure `optax.GradientTransformation`; adjacent per-element transformations in
`optax_ext.chain` run as one fused pass (one Pallas kernel per leaf on GPU/TPU, one XLA fusion on
CPU). Import as `import optax_ext as ox`.
"""

from optax_ext import augment, kernels, losses, nn, quantization, regularizers, schedules, transfer
from optax_ext.fusion import FusableTransformation, PerLeaf, Rule, apply_if_finite, chain, fusable, update_and_apply
from optax_ext.losses import jensen_shannon_consistency, nt_xent, softmax_cross_entropy
from optax_ext.optimizers import (
    adabelief,
    adafactor,
    adam,
    adamw,
    amsgrad,
    lamb,
    lars,
    lion,
    nadam,
    rmsprop,
    sgd,
    yogi,
)
from optax_ext.quantization import Int8Blockwise, QuantizedArray, int8_blockwise
from optax_ext.regularizers import (
    EWCState,
    L2SPState,
    add_l1,
    ewc,
    ewc_penalty,
    fisher_diagonal,
    l1_penalty,
    l1_shrinkage,
    l2_penalty,
    l2_sp,
    l2_sp_penalty,
)
from optax_ext.schedules import (
    constant,
    cosine_decay,
    cosine_with_restarts,
    cyclical,
    cyclical_momentum,
    exponential_decay,
    inverse_sqrt,
    join,
    linear_warmup,
    multistep_decay,
    noam,
    one_cycle,
    one_cycle_momentum,
    polynomial_decay,
    step_decay,
    warmup_cosine,
)
from optax_ext.transfer import (
    fine_tune,
    freeze,
    label_fn,
    label_params,
    layerwise_lr_decay,
    layerwise_multipliers,
    load_pretrained,
    partition_by_path,
)
from optax_ext.transforms import (
    add_decayed_weights,
    add_l2,
    clip,
    clip_by_block_rms,
    clip_by_global_norm,
    decoupled_weight_decay,
    ema,
    scale,
    scale_by_adam,
    scale_by_amsgrad,
    scale_by_belief,
    scale_by_factored_rms,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_momentum,
    scale_by_param_block_rms,
    scale_by_rms,
    scale_by_trust_ratio,
    scale_by_yogi,
)
from optax_ext.transforms.kahan import KahanSummationState, kahan_summation

__version__ = "0.1.0"

__all__ = [
    # core
    "FusableTransformation", "PerLeaf", "Rule", "apply_if_finite", "chain", "fusable", "kernels", "update_and_apply",
    # subpackages: image augmentation and Flax NNX normalization layers
    "augment", "nn",
    # transformations
    "add_decayed_weights", "add_l2", "clip", "clip_by_block_rms", "clip_by_global_norm", "decoupled_weight_decay",
    "ema", "scale", "scale_by_adam", "scale_by_amsgrad", "scale_by_belief", "scale_by_factored_rms",
    "scale_by_learning_rate", "scale_by_lion", "scale_by_momentum", "scale_by_param_block_rms", "scale_by_rms",
    "scale_by_trust_ratio", "scale_by_yogi",
    # low-memory states: 8-bit blockwise moments, Kahan-compensated low-precision params
    "Int8Blockwise", "KahanSummationState", "QuantizedArray", "int8_blockwise", "kahan_summation", "quantization",
    # schedules (plotting: optax_ext.schedules.plot)
    "constant", "cosine_decay", "cosine_with_restarts", "cyclical", "cyclical_momentum",
    "exponential_decay", "inverse_sqrt", "join", "linear_warmup", "multistep_decay", "noam", "one_cycle",
    "one_cycle_momentum", "polynomial_decay", "schedules", "step_decay", "warmup_cosine",
    # regularizers
    "EWCState", "L2SPState", "add_l1", "ewc", "ewc_penalty", "fisher_diagonal", "l1_penalty", "l1_shrinkage",
    "l2_penalty", "l2_sp", "l2_sp_penalty", "regularizers",
    # transfer learning
    "fine_tune", "freeze", "label_fn", "label_params", "layerwise_lr_decay", "layerwise_multipliers",
    "load_pretrained", "partition_by_path", "transfer",
    # losses
    "jensen_shannon_consistency", "losses", "nt_xent", "softmax_cross_entropy",
    # optimizers
    "adabelief", "adafactor", "adam", "adamw", "amsgrad", "lamb", "lars", "lion", "nadam", "rmsprop", "sgd", "yogi",
]
