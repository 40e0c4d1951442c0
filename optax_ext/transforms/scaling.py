"""Scalings by step-wide or per-leaf factors: learning rate, a constant, LARS/LAMB trust ratio,
Adafactor's parameter-scale."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext import _validate as check
from optax_ext.fusion import NoScalars, PerLeaf, Rule, fusable
from optax_ext.kernels import reductions
from optax_ext.transforms._common import increment, init_checking_mask, mask_leaves, per_leaf_tree, zero_count


class _StepSize(NamedTuple):
    step_size: Any


def _scale_element(g, p, slots, s: _StepSize):
    return s.step_size * g, ()


def _identity() -> optax.GradientTransformation:
    """The fusable identity: no state (`optax.EmptyState()`), updates unchanged."""
    return fusable(
        lambda params: optax.EmptyState(),
        Rule(
            "identity",
            optax.EmptyState,
            (),
            lambda st, u, p: NoScalars(),
            lambda g, p, slots, s: (g, ()),
            lambda st, sl: st,
        ),
    )


def scale(step_size) -> optax.GradientTransformation:
    r"""Multiply by a constant: :math:`u \leftarrow s\,u`."""
    return fusable(
        lambda params: optax.EmptyState(),
        Rule(
            "scale",
            optax.EmptyState,
            (),
            lambda st, u, p: _StepSize(step_size),
            _scale_element,
            lambda st, sl: st,
            scalars_type=_StepSize,
        ),
    )


def scale_by_learning_rate(learning_rate=None, *, flip_sign: bool = True) -> optax.GradientTransformation:
    r"""Scale by :math:`-\eta_t` (descent), with :math:`\eta_t` a float or a schedule `step -> value`.

    A schedule is evaluated at the transformation's own step count (state
    `optax.ScaleByScheduleState(count)`, as Optax); a constant keeps `optax.EmptyState()`.
    `learning_rate=None` is the identity (as Optax: an optimizer built without a learning rate
    returns unscaled directions, to be scaled elsewhere).
    """
    if learning_rate is None:
        return _identity()
    if not callable(learning_rate):
        learning_rate = check.non_negative("scale_by_learning_rate", "learning_rate", learning_rate, schedule=True)
    sign = -1.0 if flip_sign else 1.0

    if callable(learning_rate):

        def scalars(state, updates, params):
            return _StepSize(sign * jnp.asarray(learning_rate(state.count)))

        rule = Rule(
            "scale_by_learning_rate",
            optax.ScaleByScheduleState,
            (),
            scalars,
            _scale_element,
            lambda st, sl: optax.ScaleByScheduleState(count=increment(st.count)),
            scalars_type=_StepSize,
        )
        return fusable(lambda params: optax.ScaleByScheduleState(count=zero_count()), rule)

    rule = Rule(
        "scale_by_learning_rate",
        optax.EmptyState,
        (),
        lambda st, u, p: _StepSize(sign * learning_rate),
        _scale_element,
        lambda st, sl: st,
        scalars_type=_StepSize,
    )
    return fusable(lambda params: optax.EmptyState(), rule)


class _TrustRatio(NamedTuple):
    ratio: Any  # PerLeaf


def scale_by_trust_ratio(min_norm=0.0, trust_coefficient=1.0, eps=0.0, *, mask=None) -> optax.GradientTransformation:
    r"""Layer-wise trust ratio (LARS/LAMB): per leaf,

    :math:`u \leftarrow u \cdot \tau\,\|\theta\| / (\|u\| + \epsilon)`,

    norms floored at `min_norm`, and a ratio of 1 where either norm is zero. The per-leaf norms are
    one reduction before the fused pass. `mask` selects the leaves that are scaled (the others keep
    ratio 1; state `optax.MaskedState(EmptyState())` as `optax.masked` would give).

    References:
      You, Gitman & Ginsburg, *Large Batch Training of Convolutional Networks* (LARS), 2017;
      You et al., *Large Batch Optimization for Deep Learning: Training BERT in 76 minutes* (LAMB), 2020.
    """
    min_norm = check.non_negative("scale_by_trust_ratio", "min_norm", min_norm)
    eps = check.non_negative("scale_by_trust_ratio", "eps", eps)
    state_type = optax.MaskedState if mask is not None else optax.EmptyState

    def init(params):
        return optax.MaskedState(inner_state=optax.EmptyState()) if mask is not None else optax.EmptyState()

    def scalars(state, updates, params):
        u_leaves = jax.tree.leaves(updates)
        p_leaves = jax.tree.leaves(params)
        # Both lists in one call: one multi-tensor launch reads the updates and the params.
        norms = [jnp.sqrt(x) for x in reductions.leaf_sq_norms(u_leaves + p_leaves)]
        u_norms, p_norms = norms[: len(u_leaves)], norms[len(u_leaves) :]
        flags = mask_leaves(mask, params) if mask is not None else [True] * len(u_leaves)
        ratios = []
        for un, pn, m in zip(u_norms, p_norms, flags):
            un, pn = jnp.maximum(un, min_norm), jnp.maximum(pn, min_norm)
            ratio = trust_coefficient * pn / (un + eps)
            ratio = jnp.where(jnp.logical_or(pn == 0.0, un == 0.0), 1.0, ratio)
            ratios.append(jnp.where(m, ratio, 1.0))
        return _TrustRatio(ratio=PerLeaf(per_leaf_tree(params, ratios)))

    def element(g, p, slots, s: _TrustRatio):
        return g * s.ratio, ()

    return fusable(
        init_checking_mask(init, mask),
        Rule(
            "scale_by_trust_ratio",
            state_type,
            (),
            scalars,
            element,
            lambda st, sl: st,
            reads_updates=True,
            needs_params=True,
            scalars_type=_TrustRatio,
        ),
    )


class _ParamRms(NamedTuple):
    rms: Any  # PerLeaf


def scale_by_param_block_rms(min_scale=1e-3) -> optax.GradientTransformation:
    r"""Scale each leaf by its parameters' RMS (Adafactor):

    :math:`u \leftarrow u \cdot \max(\mathrm{rms}(\theta), s_{min})`.

    References:
      Shazeer & Stern, *Adafactor: Adaptive Learning Rates with Sublinear Memory Cost*, ICML 2018.
    """
    min_scale = check.non_negative("scale_by_param_block_rms", "min_scale", min_scale)

    def scalars(state, updates, params):
        leaves = jax.tree.leaves(params)
        sq = reductions.leaf_sq_norms(leaves)
        rms = [jnp.maximum(jnp.sqrt(s / max(x.size, 1)), min_scale) for s, x in zip(sq, leaves)]
        return _ParamRms(rms=PerLeaf(per_leaf_tree(params, rms)))

    def element(g, p, slots, s: _ParamRms):
        return g * s.rms, ()

    return fusable(
        lambda params: optax.EmptyState(),
        Rule(
            "scale_by_param_block_rms",
            optax.EmptyState,
            (),
            scalars,
            element,
            lambda st, sl: st,
            needs_params=True,
            scalars_type=_ParamRms,
        ),
    )
