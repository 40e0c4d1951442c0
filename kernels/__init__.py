"""Pallas kernels and their jnp references, installed as `optax_ext.kernels`.

Backend selection lives in `optax_ext.kernels.backend`; see `use_backend` and `OPTAX_EXT_BACKEND`.
"""

from optax_ext.kernels import aot, batch_norm, layer_norm  # modules: layer_norm.layer_norm(x, ...), ...
from optax_ext.kernels._compat import TARGET_DEVICES, lowering_target
from optax_ext.kernels.aot import compile_for
from optax_ext.kernels.backend import BACKENDS, get_backend, platform_backend, use_backend
from optax_ext.kernels.batch_norm import batch_norm_reference, batch_norm_stats, batch_norm_stats_reference
from optax_ext.kernels.layer_norm import (
    layer_norm_bwd,
    layer_norm_fwd,
    layer_norm_reference,
    rms_norm,
    rms_norm_bwd,
    rms_norm_fwd,
    rms_norm_reference,
)
from optax_ext.kernels.lowering import lower_for
from optax_ext.kernels.reductions import global_sq_norm, leaf_sq_norms

__all__ = [
    "BACKENDS",
    "TARGET_DEVICES",
    "aot",
    "batch_norm",
    "batch_norm_reference",
    "batch_norm_stats",
    "batch_norm_stats_reference",
    "compile_for",
    "get_backend",
    "global_sq_norm",
    "layer_norm",
    "layer_norm_bwd",
    "layer_norm_fwd",
    "layer_norm_reference",
    "leaf_sq_norms",
    "lower_for",
    "lowering_target",
    "platform_backend",
    "rms_norm",
    "rms_norm_bwd",
    "rms_norm_fwd",
    "rms_norm_reference",
    "use_backend",
]
