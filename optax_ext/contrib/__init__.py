"""Optimizers from `optax.contrib`, fused: same names, signatures and states as Optax's.

Schedule-free learning (`schedule_free`, `schedule_free_adamw`, `schedule_free_sgd`,
`schedule_free_eval_params`), ADOPT, AdEMAMix (and its simplified form), Prodigy, and Muon with
its Newton-Schulz iterations batched per matrix shape and, under sharding, run on whole matrices.
Also exported flat from `optax_ext` (`ox.schedule_free_adamw`).
"""

from optax_ext.contrib._ademamix import ademamix, scale_by_ademamix, scale_by_simplified_ademamix, simplified_ademamix
from optax_ext.contrib._adopt import adopt, scale_by_adopt
from optax_ext.contrib._muon import MuonDimensionNumbers, MuonState, muon, scale_by_muon, scale_by_shape
from optax_ext.contrib._prodigy import prodigy
from optax_ext.contrib._schedule_free import (
    schedule_free,
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_sgd,
)

__all__ = [
    "MuonDimensionNumbers",
    "MuonState",
    "ademamix",
    "adopt",
    "muon",
    "prodigy",
    "scale_by_ademamix",
    "scale_by_adopt",
    "scale_by_muon",
    "scale_by_shape",
    "scale_by_simplified_ademamix",
    "schedule_free",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "schedule_free_sgd",
    "simplified_ademamix",
]
