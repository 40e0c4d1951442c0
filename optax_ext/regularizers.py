r"""Regularization as gradient transformations (fusable) and as penalty functions for losses.

The training objective is :math:`L(\theta) + \lambda R(\theta)`; its gradient adds
:math:`\lambda\nabla R` to the data gradient. Each transformation here adds that term per element,
so it fuses with the optimizer inside `optax_ext.chain`; each penalty function returns
:math:`\lambda R(\theta)` for a loss, and `jax.grad` of the penalty equals the transformation's
contribution (tested):

- `add_l1` adds :math:`\lambda\,\mathrm{sign}(\theta)`; `l1_penalty` is :math:`\lambda\|\theta\|_1`.
- `optax_ext.add_l2` adds :math:`\lambda\theta`; `l2_penalty` is :math:`\tfrac\lambda2\|\theta\|_2^2`.
- `l2_sp` adds :math:`\lambda(\theta-\theta_{pre})`; `l2_sp_penalty` is
  :math:`\tfrac\lambda2\|\theta-\theta_{pre}\|_2^2`.
- `ewc` adds :math:`\lambda F\odot(\theta-\theta^*)`; `ewc_penalty` is
  :math:`\tfrac\lambda2\sum_i F_i(\theta_i-\theta^*_i)^2`.

**Coupled or decoupled is a matter of placement**, as for weight decay
(`optax_ext.transforms.weight_decay`): placed *before* the adaptive scaling (first in the chain)
the term is part of the gradient and is rescaled by Adam's :math:`1/\sqrt{\hat v}`;
placed *after* it and before `scale_by_learning_rate`, it is decoupled (AdamW-style),
:math:`\theta \leftarrow \theta - \eta(\text{adam}(g) + \lambda(\theta - \theta_{pre}))`.

`l1_shrinkage` is different: the proximal step of :math:`\lambda\|\theta\|_1` applied to the
parameters *after* the step (ISTA / proximal SGD), which produces exact zeros (the sparsity of the
L1 ball's corners), where the subgradient `add_l1` only oscillates around zero. Place it last.

Anchors (:math:`\theta_{pre}`, :math:`\theta^*`) and the Fisher diagonal are per-parameter arrays:
they live in the transformation's state as slots (like Adam's moments), copied at `init` after a
check against the parameters (by path, every mismatch named), and are never changed by `update`.

References:
  Tibshirani, *Regression Shrinkage and Selection via the Lasso*, 1996 (L1);
  Duchi & Singer, *Efficient Online and Batch Learning Using Forward Backward Splitting*, JMLR 2009
  (proximal L1 step); Li, Grandvalet & Davoine, *Explicit Inductive Bias for Transfer Learning with
  Convolutional Networks* (L2-SP), ICML 2018; Kirkpatrick et al., *Overcoming catastrophic
  forgetting in neural networks* (EWC), PNAS 2017.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext import _validate as check
from optax_ext.fusion import PerLeaf, Rule, fusable
from optax_ext.transfer import match_by_path
from optax_ext.transforms._common import increment, init_checking_mask, mask_leaves, per_leaf_tree, value_at, zero_count

__all__ = [
    "EWCState",
    "L2SPState",
    "add_l1",
    "ewc",
    "ewc_penalty",
    "fisher_diagonal",
    "l1_penalty",
    "l1_shrinkage",
    "l2_penalty",
    "l2_sp",
    "l2_sp_penalty",
]


class L2SPState(NamedTuple):
    """State of :func:`l2_sp`: the anchor :math:`\\theta_{pre}`, shaped like the params."""

    anchor: optax.Params


class EWCState(NamedTuple):
    """State of :func:`ewc`: the Fisher diagonal :math:`F` and the anchor :math:`\\theta^*`."""

    fisher: optax.Params
    anchor: optax.Params


# --------------------------------------------------------------------------------- helpers


class _Strength(NamedTuple):
    lam: Any  # the penalty's strength (PerLeaf with a mask)


class _Threshold(NamedTuple):
    thr: Any  # lr * strength, the soft-thresholding level (PerLeaf with a mask)


def _masked_strength(strength, mask, params):
    """`strength`, or a per-leaf strength that is 0 where `mask` is False."""
    if mask is None:
        return strength
    flags = mask_leaves(mask, params)
    return PerLeaf(per_leaf_tree(params, [jnp.where(m, strength, 0.0) for m in flags]))


def _copy_like_params(fn_name: str, arg: str, tree, params):
    """`tree`'s arrays in the structure of `params` (matched by path; shapes checked).

    Extra entries in `tree` are ignored, so that a full anchor works inside `optax.masked` /
    `optax.partition`, which hide part of the params.
    """
    leaves = match_by_path(params, tree, fn_name, target_name="params", source_name=arg, allow_unexpected=True)
    # A copy, not a view: an anchor taken from the current params must survive a step that
    # donates (and overwrites in place) the params' buffers.
    return jax.tree.structure(params).unflatten([jnp.array(x, copy=True) for x in leaves])


# --------------------------------------------------------------------------------- L1


def add_l1(strength, mask=None) -> optax.GradientTransformation:
    r"""L1 subgradient: :math:`u \leftarrow u + \lambda\,\mathrm{sign}(\theta)` (0 at :math:`\theta = 0`).

    The gradient of :func:`l1_penalty`. A subgradient step does not produce exact zeros (the
    parameter oscillates around 0 with amplitude :math:`\eta\lambda`); for sparsity use
    :func:`l1_shrinkage`. `mask` (a tree of bools, a prefix, or a function of the params) selects
    the regularized leaves. State: `optax.EmptyState()`.

    References:
      Tibshirani, *Regression Shrinkage and Selection via the Lasso*, 1996.
    """
    strength = check.non_negative("add_l1", "strength", strength)

    def element(g, p, slots, s: _Strength):
        return g + s.lam * jnp.sign(p), ()

    rule = Rule(
        "add_l1",
        optax.EmptyState,
        (),
        lambda st, u, p: _Strength(_masked_strength(strength, mask, p)),
        element,
        lambda st, sl: st,
        needs_params=True,
        scalars_type=_Strength,
    )
    return fusable(init_checking_mask(lambda params: optax.EmptyState(), mask), rule)


def l1_shrinkage(strength, learning_rate, mask=None) -> optax.GradientTransformation:
    r"""Proximal L1 step on the applied parameters (soft-thresholding):

    with :math:`x = \theta + u` the parameters after the step, the update becomes :math:`u'` with
    :math:`\theta + u' = \mathrm{prox}(x) = \mathrm{sign}(x)\max(|x| - \eta\lambda, 0)`, i.e.
    :math:`u' = \mathrm{prox}(\theta + u) - \theta`. Where :math:`|x| \le \eta\lambda`,
    :math:`u' = -\theta` exactly, so the new parameter is exactly 0.0 (with `optax.apply_updates` and
    with `optax_ext.update_and_apply`). Place it *last* in the chain, after
    `scale_by_learning_rate(learning_rate)`, with the same `learning_rate` (a float or a schedule
    `step -> lr`, evaluated at this transformation's own count). Proximal SGD / ISTA; with Adam it
    is the common "Adam + proximal L1" heuristic (the threshold ignores the adaptive scaling).

    State: `optax.EmptyState()`, or `optax.ScaleByScheduleState(count)` for a schedule.

    References:
      Duchi & Singer, *Efficient Online and Batch Learning Using Forward Backward Splitting*, JMLR 2009;
      Beck & Teboulle, *A Fast Iterative Shrinkage-Thresholding Algorithm* (ISTA/FISTA), 2009.
    """
    strength = check.non_negative("l1_shrinkage", "strength", strength)
    scheduled = callable(learning_rate)
    if not scheduled:
        learning_rate = check.non_negative("l1_shrinkage", "learning_rate", learning_rate, schedule=True)
    state_type = optax.ScaleByScheduleState if scheduled else optax.EmptyState

    def init(params):
        return optax.ScaleByScheduleState(count=zero_count()) if scheduled else optax.EmptyState()

    def scalars(state, updates, params):
        lr = value_at(learning_rate, state.count) if scheduled else learning_rate
        return _Threshold(
            _masked_strength(jnp.asarray(lr, jnp.float32) * jnp.asarray(strength, jnp.float32), mask, params)
        )

    def element(g, p, slots, s: _Threshold):
        t = s.thr
        x = p + g
        shrink = jnp.abs(x) <= t
        # -p (not prox(x) - p) where the prox is 0: p + (-p) is exactly 0.0 in any float format.
        u = jnp.where(shrink, -p, (x - jnp.sign(x) * t) - p)
        return jnp.where(t > 0, u, g), ()  # no threshold (masked out): pass the update through

    def next_state(state, new_slots):
        return optax.ScaleByScheduleState(count=increment(state.count)) if scheduled else state

    return fusable(
        init_checking_mask(init, mask),
        Rule("l1_shrinkage", state_type, (), scalars, element, next_state, needs_params=True, scalars_type=_Threshold),
    )


# --------------------------------------------------------------------------------- L2-SP and EWC


def l2_sp(strength, anchor_params, mask=None) -> optax.GradientTransformation:
    r"""L2-SP: pull toward the pretrained weights, :math:`u \leftarrow u + \lambda(\theta - \theta_{pre})`.

    The gradient of :func:`l2_sp_penalty`, the starting-point regularizer of Li et al. (2018)
    (:math:`\mathcal R = \tfrac12\|\theta - \theta_{pre}\|^2`). Coupled when placed first in the
    chain (into the gradient, as in the paper), decoupled when placed after the adaptive scaling
    (see the module docstring). `anchor_params` has the parameters' paths and shapes (an
    `nnx.State`, its pure form, or a dict); `init` checks it and stores a copy in
    `L2SPState(anchor)`, which `update` never changes. `mask` selects the regularized leaves (e.g.
    the backbone; a new head has no pretrained value). With a `mask`, anchors are still stored
    for every leaf: for a model with a new head, take the anchor from the model right after
    loading the pretrained weights (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`, which is
    :math:`\theta_0 = \theta_{pre}`) and mask the head out.

    References:
      Li, Grandvalet & Davoine, *Explicit Inductive Bias for Transfer Learning with Convolutional
      Networks*, ICML 2018.
    """
    strength = check.non_negative("l2_sp", "strength", strength)

    def init(params):
        return L2SPState(anchor=_copy_like_params("l2_sp", "anchor_params", anchor_params, params))

    def element(g, p, slots, s: _Strength):
        (a,) = slots
        return g + s.lam * (p - a), (a,)

    # next_state keeps the old anchor: it is read-only (and under jit XLA drops the unused copy).
    rule = Rule(
        "l2_sp",
        L2SPState,
        ("anchor",),
        lambda st, u, p: _Strength(_masked_strength(strength, mask, p)),
        element,
        lambda st, sl: st,
        needs_params=True,
        readonly_slots=True,
        scalars_type=_Strength,
    )
    return fusable(init_checking_mask(init, mask), rule)


def ewc(fisher, anchor_params, strength, mask=None) -> optax.GradientTransformation:
    r"""Elastic weight consolidation: :math:`u \leftarrow u + \lambda\,F \odot (\theta - \theta^*)`.

    The gradient of :func:`ewc_penalty`, :math:`\tfrac\lambda2\sum_i F_i(\theta_i - \theta^*_i)^2`:
    parameters important for a previous task (large Fisher diagonal :math:`F`, see
    :func:`fisher_diagonal`) are held near that task's optimum :math:`\theta^*`. `fisher` and
    `anchor_params` are checked against the parameters at `init` and stored in
    `EWCState(fisher, anchor)`; `update` never changes them. Place it first (coupled, as in the
    paper) or after the adaptive scaling (decoupled).

    References:
      Kirkpatrick et al., *Overcoming catastrophic forgetting in neural networks*, PNAS 2017.
    """
    strength = check.non_negative("ewc", "strength", strength)

    def init(params):
        return EWCState(
            fisher=_copy_like_params("ewc", "fisher", fisher, params),
            anchor=_copy_like_params("ewc", "anchor_params", anchor_params, params),
        )

    def element(g, p, slots, s: _Strength):
        f, a = slots
        return g + s.lam * f * (p - a), (f, a)

    rule = Rule(
        "ewc",
        EWCState,
        ("fisher", "anchor"),
        lambda st, u, p: _Strength(_masked_strength(strength, mask, p)),
        element,
        lambda st, sl: st,
        needs_params=True,
        readonly_slots=True,
        scalars_type=_Strength,
    )
    return fusable(init_checking_mask(init, mask), rule)


def fisher_diagonal(loss_fn: Callable[[Any, Any], jax.Array], params, batches: Iterable, per_example: bool = False):
    r"""Empirical Fisher diagonal, :math:`F = \frac1B\sum_b \big(\nabla_\theta \ell(\theta, b)\big)^{\odot 2}`.

    `loss_fn(params, batch) -> scalar`; `batches` an iterable of batches (each a pytree of arrays).
    By default each batch contributes its squared (mini-batch) gradient. With `per_example=True`
    each batch is split along its leading axis and every example contributes its own squared
    gradient (`loss_fn` then sees batches of one example): the empirical Fisher of EWC proper,
    computed with `jax.vmap`. Returns a tree shaped like `params`, in f32.

    References:
      Kirkpatrick et al., *Overcoming catastrophic forgetting in neural networks*, PNAS 2017;
      Kunstner, Balles & Hennig, *Limitations of the Empirical Fisher Approximation*, NeurIPS 2019.
    """
    if not callable(loss_fn):
        raise TypeError(f"fisher_diagonal: loss_fn must be a function (params, batch) -> loss, got {loss_fn!r}.")
    if isinstance(batches, (jax.Array, dict)) or not isinstance(batches, Iterable):
        raise TypeError(
            "fisher_diagonal: batches must be an iterable of batches (a list or a generator), "
            f"got {type(batches).__name__}."
        )
    grad_fn = jax.grad(loss_fn)

    def squared(g):
        return jax.tree.map(lambda x: jnp.square(jnp.asarray(x, jnp.float32)), g)

    @jax.jit
    def batch_sum(p, batch):
        if not per_example:
            return squared(grad_fn(p, batch)), 1
        one = lambda ex: squared(grad_fn(p, jax.tree.map(lambda a: a[None], ex)))
        sq = jax.vmap(one)(batch)
        n = jax.tree.leaves(batch)[0].shape[0]
        return jax.tree.map(lambda x: jnp.sum(x, axis=0), sq), n

    total, count = None, 0
    for batch in batches:
        s, n = batch_sum(params, batch)
        total = s if total is None else jax.tree.map(jnp.add, total, s)
        count += int(n)
    if total is None or count == 0:
        raise ValueError("fisher_diagonal: batches is empty; pass at least one batch.")
    return jax.tree.map(lambda x: x / count, total)


# --------------------------------------------------------------------------------- penalties


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _masked_sum(terms, params, mask):
    """Sum of per-leaf f32 scalars `terms`, leaves with mask False left out."""
    flags = mask_leaves(mask, params) if mask is not None else [True] * len(terms)
    total = jnp.zeros([], jnp.float32)
    for t, m in zip(terms, flags):
        total = total + jnp.where(m, t, 0.0)
    return total


def l1_penalty(params, strength, mask=None) -> jax.Array:
    r""":math:`\lambda\|\theta\|_1 = \lambda\sum_i|\theta_i|` (f32 scalar); gradient
    :math:`\lambda\,\mathrm{sign}(\theta)`.

    Written as :math:`\sum \mathrm{sign}(\theta)\theta` so that `jax.grad` gives exactly
    :math:`\mathrm{sign}(\theta)`, 0 at 0 (the minimum-norm subgradient), as :func:`add_l1` adds
    (`jnp.abs` would give 1 at 0).
    """
    strength = check.non_negative("l1_penalty", "strength", strength)
    terms = [jnp.sum(jnp.sign(_f32(x)) * _f32(x)) for x in jax.tree.leaves(params)]
    return strength * _masked_sum(terms, params, mask)


def l2_penalty(params, strength, mask=None) -> jax.Array:
    r""":math:`\tfrac\lambda2\|\theta\|_2^2` (f32 scalar); gradient :math:`\lambda\theta`, what
    `optax_ext.add_l2(strength)` adds."""
    strength = check.non_negative("l2_penalty", "strength", strength)
    terms = [jnp.sum(jnp.square(_f32(x))) for x in jax.tree.leaves(params)]
    return 0.5 * strength * _masked_sum(terms, params, mask)


def l2_sp_penalty(params, strength, anchor_params, mask=None) -> jax.Array:
    r""":math:`\tfrac\lambda2\|\theta - \theta_{pre}\|_2^2` (f32 scalar); gradient
    :math:`\lambda(\theta - \theta_{pre})`, what :func:`l2_sp` adds (Li et al., ICML 2018)."""
    strength = check.non_negative("l2_sp_penalty", "strength", strength)
    anchors = match_by_path(
        params, anchor_params, "l2_sp_penalty", target_name="params", source_name="anchor_params", allow_unexpected=True
    )
    terms = [jnp.sum(jnp.square(_f32(x) - _f32(a))) for x, a in zip(jax.tree.leaves(params), anchors)]
    return 0.5 * strength * _masked_sum(terms, params, mask)


def ewc_penalty(params, fisher, anchor_params, strength, mask=None) -> jax.Array:
    r""":math:`\tfrac\lambda2\sum_i F_i(\theta_i - \theta^*_i)^2` (f32 scalar); gradient
    :math:`\lambda F\odot(\theta - \theta^*)`, what :func:`ewc` adds (Kirkpatrick et al., 2017)."""
    strength = check.non_negative("ewc_penalty", "strength", strength)
    fs = match_by_path(params, fisher, "ewc_penalty", target_name="params", source_name="fisher", allow_unexpected=True)
    anchors = match_by_path(
        params, anchor_params, "ewc_penalty", target_name="params", source_name="anchor_params", allow_unexpected=True
    )
    terms = [jnp.sum(_f32(f) * jnp.square(_f32(x) - _f32(a))) for x, f, a in zip(jax.tree.leaves(params), fs, anchors)]
    return 0.5 * strength * _masked_sum(terms, params, mask)
