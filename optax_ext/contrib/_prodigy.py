"""Prodigy: learning-rate-free AdamW (a D-Adaptation variant), fused.

Same name, arguments and state as `optax.contrib.prodigy` (`optax.contrib.ProdigyState`). The
distance estimate :math:`d` needs two sums over every element of every leaf, which the `Rule`'s
`scalars` compute before the fused pass (as the global norm of `clip_by_global_norm` is): the
inner product :math:`\\langle g, \\theta_0 - \\theta\\rangle` and :math:`\\sum |s_t|` of the updated
weighted gradient sum. The moments, the gradient sum and the update are one elementwise pass.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import ProdigyState

from optax_ext import _validate as check
from optax_ext.contrib._schedule_free import copy_params, lowest_dtype
from optax_ext.fusion import FusableTransformation, Rule, fusable
from optax_ext.transforms._common import increment, value_at, zero_count, zeros_like_params

__all__ = ["prodigy"]


class _ProdigyScalars(NamedTuple):
    d: Any  # the distance estimate before this step (estim_lr)
    dlr: Any  # d * lr_t * sqrt(1 - b2^t) / (1 - b1^t)
    beta1: Any
    one_minus_beta1: Any
    beta2: Any
    one_minus_beta2: Any
    beta3: Any
    sum_coef: Any  # dlr (or d with safeguard_warmup): the weight of this step in the gradient sum
    d0: Any  # estim_lr0
    eps_d: Any  # eps * (the new distance estimate)
    neg_wd_dlr: Any  # -weight_decay * dlr
    # Kept in the new state (next_state reads the scalars); the element does not read them.
    new_d: Any = None
    numerator_weighted: Any = None


def _vdot(a, b):
    """<a, b> of one leaf in f32 (f64 for f64 leaves), at the highest matmul precision (as Optax)."""
    dtype = jnp.promote_types(jnp.float32, jnp.result_type(a))
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    return jnp.tensordot(a, b, a.ndim, precision=jax.lax.Precision.HIGHEST)


def prodigy(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    betas=(0.9, 0.999),
    beta3=None,
    eps=1e-8,
    estim_lr0=1e-6,
    estim_lr_coef=1.0,
    weight_decay=0.0,
    safeguard_warmup: bool = False,
) -> FusableTransformation:
    r"""Prodigy: AdamW whose step size :math:`d_t` is estimated from the distance travelled.

    With :math:`\eta_t` the learning-rate schedule (1 = the estimate itself),
    :math:`\hat\eta_t = d_t\eta_t\sqrt{1-\beta_2^t}/(1-\beta_1^t)` and :math:`\theta_0` the initial
    parameters:

    .. math::
      m_t = \beta_1 m_{t-1} + (1-\beta_1) d_t g_t,\quad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) d_t^2 g_t^2,\quad
      s_t = \beta_3 s_{t-1} + \hat\eta_t d_t g_t / d_0,

      r_t = \beta_3 r_{t-1} + (d_t/d_0)\,\hat\eta_t \langle g_t, \theta_0 - \theta_t\rangle,\quad
      d_{t+1} = \max\big(d_t, c\, r_t / \textstyle\sum |s_t|\big),

      \theta_{t+1} = \theta_t - \hat\eta_t\big(m_t / (\sqrt{v_t} + d_{t+1}\epsilon) + \lambda\theta_t\big),

    :math:`\beta_3 = \sqrt{\beta_2}` by default, :math:`c` = `estim_lr_coef`; `safeguard_warmup`
    uses :math:`d_t` instead of :math:`\hat\eta_t` in :math:`s_t`. The two sums are reductions before
    the fused pass. State: `optax.contrib.ProdigyState` (params0 is a copy of the initial params).

    References:
      Mishchenko & Defazio, *Prodigy: An Expeditiously Adaptive Parameter-Free Learner*, ICML 2024
      (arXiv:2306.06101).
    """
    name = "prodigy"
    if not callable(learning_rate):
        learning_rate = check.non_negative(name, "learning_rate", learning_rate)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}.")
    beta1 = check.unit_interval(name, "betas[0]", betas[0])
    beta2 = check.unit_interval(name, "betas[1]", betas[1])
    beta3 = beta2**0.5 if beta3 is None else check.unit_interval(name, "beta3", beta3)
    eps = check.non_negative(name, "eps", eps)
    estim_lr0 = check.positive(name, "estim_lr0", estim_lr0)
    estim_lr_coef = check.finite(name, "estim_lr_coef", estim_lr_coef)
    weight_decay = check.finite(name, "weight_decay", weight_decay)
    if not isinstance(safeguard_warmup, bool):
        raise TypeError(f"{name}: safeguard_warmup must be True or False, got {safeguard_warmup!r}.")

    def init(params):
        dtype = lowest_dtype(params)
        return ProdigyState(
            exp_avg=zeros_like_params(params),
            exp_avg_sq=zeros_like_params(params),
            grad_sum=zeros_like_params(params),
            params0=copy_params(params),  # a buffer of its own: params and state can both be donated
            estim_lr=jnp.asarray(estim_lr0, dtype),
            numerator_weighted=jnp.zeros((), dtype),
            count=zero_count(),
        )

    def step_values(state, updates, params):
        """dlr, the gradient sum's coefficient, and the new (d, numerator) of this step."""
        t = increment(state.count)
        d = jnp.asarray(state.estim_lr)
        lr = value_at(learning_rate, state.count)
        bc = ((1 - beta2**t) ** 0.5) / (1 - beta1**t)
        dlr = jnp.asarray(d * lr * bc, d.dtype)
        sum_coef = d if safeguard_warmup else dlr
        treedef = jax.tree.structure(updates)
        g_leaves = jax.tree.leaves(updates)
        p_leaves = treedef.flatten_up_to(params)
        p0_leaves = treedef.flatten_up_to(state.params0)
        s_leaves = treedef.flatten_up_to(state.grad_sum)
        numerator = 0
        denominator = 0
        for g, p, p0, s in zip(g_leaves, p_leaves, p0_leaves, s_leaves):
            numerator = numerator + _vdot(g, jnp.asarray(p0) - jnp.asarray(p))
            ct = jnp.promote_types(jnp.float32, jnp.result_type(g))  # as the fused pass computes it
            new_s = beta3 * jnp.asarray(s, ct) + sum_coef * (d * jnp.asarray(g, ct)) / estim_lr0
            denominator = denominator + jnp.sum(jnp.abs(new_s))
        weighted = beta3 * state.numerator_weighted + (d / estim_lr0) * dlr * numerator
        weighted = jnp.asarray(weighted, jnp.result_type(state.numerator_weighted))
        # A step with learning rate 0 (a warm-up's first) has an all-zero gradient sum: keep d there,
        # as the authors' PyTorch code does (Optax's d becomes 0/0 = NaN and every later step NaN).
        ratio = jnp.asarray(estim_lr_coef * weighted / jnp.where(denominator > 0, denominator, 1), d.dtype)
        new_d = jnp.where(denominator > 0, jnp.maximum(d, ratio), d)
        return dlr, sum_coef, new_d, weighted

    def scalars(state, updates, params):
        dlr, sum_coef, new_d, weighted = step_values(state, updates, params)
        return _ProdigyScalars(
            d=state.estim_lr,
            dlr=dlr,
            beta1=beta1,
            one_minus_beta1=1 - beta1,
            beta2=beta2,
            one_minus_beta2=1 - beta2,
            beta3=beta3,
            sum_coef=sum_coef,
            d0=estim_lr0,
            eps_d=new_d * eps,
            neg_wd_dlr=-weight_decay * dlr,
            new_d=new_d,
            numerator_weighted=weighted,
        )

    def element(g, p, slots, s: _ProdigyScalars):
        m, v, grad_sum = slots
        dg = s.d * g
        m = s.beta1 * m + s.one_minus_beta1 * dg
        v = s.beta2 * v + s.one_minus_beta2 * dg * dg
        grad_sum = s.beta3 * grad_sum + s.sum_coef * dg / s.d0
        u = s.neg_wd_dlr * p - s.dlr * m / (jnp.sqrt(v) + s.eps_d)
        return u, (m, v, grad_sum)

    def next_state(state, new_slots, s: _ProdigyScalars):
        m, v, grad_sum = new_slots
        return ProdigyState(
            exp_avg=m,
            exp_avg_sq=v,
            grad_sum=grad_sum,
            params0=state.params0,
            estim_lr=s.new_d,
            numerator_weighted=s.numerator_weighted,
            count=increment(state.count),
        )

    return fusable(
        init,
        Rule(
            name,
            ProdigyState,
            ("exp_avg", "exp_avg_sq", "grad_sum"),
            scalars,
            element,
            next_state,
            reads_updates=True,
            needs_params=True,
            scalars_type=_ProdigyScalars,
            next_state_reads_scalars=True,
        ),
    )
