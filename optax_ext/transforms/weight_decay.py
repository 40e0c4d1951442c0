"""Weight decay in its two forms: decoupled (AdamW, Loshchilov & Hutter, 2019) and coupled L2 (into the gradient).

Both add :math:`\\lambda\\theta` to the incoming update; what differs is *where* they sit in a
chain. Decoupled weight decay goes after the adaptive scaling (so the decay is not rescaled by
:math:`1/\\sqrt{\\hat v}`), coupled L2 goes before it (it is the gradient of
:math:`\\tfrac{\\lambda}{2}\\|\\theta\\|^2`). The rule is one per-element line either way, so both fuse.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from optax_ext import _validate as check
from optax_ext._compat import WeightDecaySchedule  # Optax's state class, not exported
from optax_ext.fusion import PerLeaf, Rule, fusable
from optax_ext.transforms._common import increment, init_checking_mask, mask_leaves, per_leaf_tree, value_at, zero_count


class _WeightDecay(NamedTuple):
    wd: Any  # a scalar, or PerLeaf (0 where masked out)


def _add_scaled_params(name: str, weight_decay, mask) -> optax.GradientTransformation:
    weight_decay = check.finite(name, "weight_decay", weight_decay, schedule=True)
    scheduled = callable(weight_decay)
    is_zero = isinstance(weight_decay, (int, float)) and weight_decay == 0.0
    inner_type = WeightDecaySchedule if scheduled else optax.EmptyState
    state_type = optax.MaskedState if mask is not None else inner_type

    def init(params):
        inner = WeightDecaySchedule(count=zero_count()) if scheduled else optax.EmptyState()
        return optax.MaskedState(inner_state=inner) if mask is not None else inner

    def inner_state(state):
        return state.inner_state if mask is not None else state

    def scalars(state, updates, params):
        wd = value_at(weight_decay, inner_state(state).count) if scheduled else weight_decay
        if mask is None:
            return _WeightDecay(wd=wd)
        flags = mask_leaves(mask, params)
        return _WeightDecay(wd=PerLeaf(per_leaf_tree(params, [jax.numpy.where(m, wd, 0.0) for m in flags])))

    def element(g, p, slots, s: _WeightDecay):
        return (g if is_zero else g + s.wd * p), ()

    def next_state(state, new_slots):
        inner = inner_state(state)
        if scheduled:
            inner = WeightDecaySchedule(count=increment(inner.count))
        return optax.MaskedState(inner_state=inner) if mask is not None else inner

    return fusable(
        init_checking_mask(init, mask),
        Rule(name, state_type, (), scalars, element, next_state, needs_params=not is_zero, scalars_type=_WeightDecay),
    )


def decoupled_weight_decay(weight_decay=1e-4, mask=None) -> optax.GradientTransformation:
    r"""Decoupled weight decay (AdamW): :math:`u \leftarrow u + \lambda\theta`.

    Placed after the adaptive scaling and before `scale_by_learning_rate(lr)`, it gives
    :math:`\theta \leftarrow (1 - \eta_t\lambda)\theta - \eta_t u`, the learning rate's schedule
    included. `weight_decay` may be a schedule; `mask` (a tree of bools, a prefix, or a function of
    the params) selects the leaves that decay. Same state as `optax.add_decayed_weights`.

    References:
      Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
    """
    return _add_scaled_params("decoupled_weight_decay", weight_decay, mask)


def add_decayed_weights(weight_decay=0.0, mask=None) -> optax.GradientTransformation:
    r"""Optax's name for :func:`decoupled_weight_decay`: :math:`u \leftarrow u + \lambda\theta`."""
    return _add_scaled_params("add_decayed_weights", weight_decay, mask)


def add_l2(weight_decay, mask=None) -> optax.GradientTransformation:
    r"""Coupled L2 regularization: the gradient of :math:`\tfrac{\lambda}{2}\|\theta\|^2` added to the gradient,

    :math:`g \leftarrow g + \lambda\theta`. Place it *first* in a chain (before Adam): the decay is
    then rescaled by the adaptive denominator, the contrast case to :func:`decoupled_weight_decay`.

    References:
      Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019 (Sec. 2).
    """
    return _add_scaled_params("add_l2", weight_decay, mask)
