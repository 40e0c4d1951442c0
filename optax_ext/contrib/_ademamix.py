"""AdEMAMix and Simplified AdEMAMix: Adam with a mixture of a fast and a slow momentum, fused.

Same names, arguments and states as `optax.contrib` (`ScaleByAdemamixState(count, count_m2, m1,
m2, nu)`, `ScaleBySimplifiedAdEMAMixState(t, m, n)`, Optax's own classes). Every EMA is per
element; bias corrections, the mixing weight and the slow decay (schedules allowed) are step-wide
scalars, so each optimizer is one fused pass with its weight decay and learning rate.
"""

from typing import Any, NamedTuple

import jax.numpy as jnp
import optax
from optax.contrib import ScaleByAdemamixState, ScaleBySimplifiedAdEMAMixState

from optax_ext import _validate as check
from optax_ext.fusion import FusableTransformation, Rule, chain, fusable
from optax_ext.transforms import add_decayed_weights, scale_by_learning_rate
from optax_ext.transforms._common import abs_sq, increment, scalar, value_at, zero_count, zeros_like_params

__all__ = ["ademamix", "scale_by_ademamix", "scale_by_simplified_ademamix", "simplified_ademamix"]


class _AdemamixScalars(NamedTuple):
    b1: Any
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    b3: Any  # the slow EMA's decay at count_m2
    one_minus_b3: Any
    alpha: Any  # the slow EMA's weight at count_m2
    eps: Any
    eps_root: Any
    bc1: Any  # 1 - b1^t
    bc2: Any  # 1 - b2^t


def scale_by_ademamix(
    b1=0.9, b2=0.999, b3=0.9999, alpha=6.0, eps=1e-8, eps_root=0.0, mu_dtype=None, *, nu_dtype=None
) -> optax.GradientTransformation:
    r"""AdEMAMix scaling: a fast EMA :math:`m_1`, a slow EMA :math:`m_2` and Adam's second moment,

    .. math::
      m_{1,t} = \beta_1 m_{1,t-1} + (1-\beta_1) g_t,\quad
      m_{2,t} = \beta_3 m_{2,t-1} + (1-\beta_3) g_t,\quad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,

    :math:`u = (\hat m_{1,t} + \alpha\, m_{2,t}) / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)` with
    :math:`\hat m_1, \hat v` bias-corrected (:math:`m_2` is not: the slow EMA fills up slowly).
    `b3` and `alpha` may be schedules (evaluated at `count_m2`). All three slots are stored in
    `mu_dtype` as in Optax, unless `nu_dtype` (ours) sets :math:`v`'s. State:
    `optax.contrib.ScaleByAdemamixState(count, count_m2, m1, m2, nu)`.

    References:
      Pagliardini, Ablin & Grangier, *The AdEMAMix Optimizer: Better, Faster, Older*, ICLR 2025
      (arXiv:2409.03137).
    """
    name = "scale_by_ademamix"
    b1 = check.unit_interval(name, "b1", b1, schedule=True)
    b2 = check.unit_interval(name, "b2", b2, schedule=True)
    b3 = check.unit_interval(name, "b3", b3, schedule=True)
    alpha = check.finite(name, "alpha", alpha, schedule=True)
    eps = check.non_negative(name, "eps", eps, schedule=True)
    eps_root = check.non_negative(name, "eps_root", eps_root, schedule=True)
    check.storage(name, "mu_dtype", mu_dtype)
    check.storage(name, "nu_dtype", nu_dtype)
    nu_storage = mu_dtype if nu_dtype is None else nu_dtype

    def init(params):
        return ScaleByAdemamixState(
            count=zero_count(),
            count_m2=zero_count(),
            m1=zeros_like_params(params, mu_dtype),
            m2=zeros_like_params(params, mu_dtype),
            nu=zeros_like_params(params, nu_storage, signed=False),
        )

    def scalars(state, updates, params):
        t = increment(state.count)
        b1_t, b2_t = value_at(b1, state.count), value_at(b2, state.count)
        b3_t = value_at(b3, state.count_m2)
        return _AdemamixScalars(
            b1=b1_t,
            one_minus_b1=1 - b1_t,
            b2=b2_t,
            one_minus_b2=1 - b2_t,
            b3=b3_t,
            one_minus_b3=1 - b3_t,
            alpha=value_at(alpha, state.count_m2),
            eps=value_at(eps, state.count),
            eps_root=value_at(eps_root, state.count),
            bc1=1 - scalar(b1_t) ** t,
            bc2=1 - scalar(b2_t) ** t,
        )

    def element(g, p, slots, s: _AdemamixScalars):
        m1, m2, v = slots
        m1 = s.one_minus_b1 * g + s.b1 * m1
        m2 = s.one_minus_b3 * g + s.b3 * m2
        v = s.one_minus_b2 * abs_sq(g) + s.b2 * v
        u = (m1 / s.bc1 + s.alpha * m2) / (jnp.sqrt(v / s.bc2 + s.eps_root) + s.eps)
        return u, (m1, m2, v)

    def next_state(state, new_slots):
        m1, m2, v = new_slots
        return ScaleByAdemamixState(
            count=increment(state.count), count_m2=increment(state.count_m2), m1=m1, m2=m2, nu=v
        )

    return fusable(
        init,
        Rule(
            name,
            ScaleByAdemamixState,
            ("m1", "m2", "nu"),
            scalars,
            element,
            next_state,
            scalars_type=_AdemamixScalars,
        ),
    )


def ademamix(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    b2=0.999,
    b3=0.9999,
    alpha=5.0,
    eps=1e-8,
    eps_root=0.0,
    mu_dtype=None,
    weight_decay=0.0,
    mask=None,
    *,
    nu_dtype=None,
) -> FusableTransformation:
    r"""AdEMAMix: AdamW whose momentum mixes a fast and a slow EMA of the gradients,

    :math:`\theta_{t+1} = \theta_t - \eta_t\Big(\frac{\hat m_{1,t} + \alpha m_{2,t}}{\sqrt{\hat v_t +
    \epsilon_{root}} + \epsilon} + \lambda\theta_t\Big)` (see :func:`scale_by_ademamix`), one fused pass.
    Same arguments and state as `optax.contrib.ademamix`:
    `(ScaleByAdemamixState, add_decayed_weights' state, scale_by_learning_rate's state)`.

    References:
      Pagliardini, Ablin & Grangier, *The AdEMAMix Optimizer: Better, Faster, Older*, ICLR 2025
      (arXiv:2409.03137).
    """
    return chain(
        scale_by_ademamix(b1, b2, b3, alpha, eps, eps_root, mu_dtype, nu_dtype=nu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


class _SimplifiedScalars(NamedTuple):
    b1: Any
    b2: Any
    alpha: Any
    eps: Any
    eps_root: Any
    bc2: Any  # 1 - b2^t


def scale_by_simplified_ademamix(b1=0.99, b2=0.95, alpha=0.0, eps=1e-8, eps_root=0.0) -> optax.GradientTransformation:
    r"""Simplified AdEMAMix scaling: one undamped momentum and the current gradient, mixed,

    .. math::
      m_t = \beta_1 m_{t-1} + g_t,\quad n_t = \beta_2 n_{t-1} + (1-\beta_2) g_t^2,\quad
      u = \frac{m_t + \alpha g_t}{\sqrt{n_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}.

    `alpha` may be a schedule (evaluated at `t`). :math:`\alpha = 0` is Adam with a rescaled
    learning rate and :math:`\beta_1`. State: `optax.contrib.ScaleBySimplifiedAdEMAMixState(t, m, n)`.

    References:
      Morwani et al., *Connections between Schedule-Free Optimizers, AdEMAMix, and Accelerated SGD
      Variants*, 2025 (arXiv:2502.02431).
    """
    name = "scale_by_simplified_ademamix"
    b1 = check.unit_interval(name, "b1", b1, schedule=True)
    b2 = check.unit_interval(name, "b2", b2, schedule=True)
    alpha = check.finite(name, "alpha", alpha, schedule=True)
    eps = check.non_negative(name, "eps", eps, schedule=True)
    eps_root = check.non_negative(name, "eps_root", eps_root, schedule=True)

    def init(params):
        return ScaleBySimplifiedAdEMAMixState(t=zero_count(), m=zeros_like_params(params), n=zeros_like_params(params))

    def scalars(state, updates, params):
        b2_t = value_at(b2, state.t)
        return _SimplifiedScalars(
            b1=value_at(b1, state.t),
            b2=b2_t,
            alpha=value_at(alpha, state.t),
            eps=value_at(eps, state.t),
            eps_root=value_at(eps_root, state.t),
            bc2=1 - scalar(b2_t) ** increment(state.t),
        )

    def element(g, p, slots, s: _SimplifiedScalars):
        m, n = slots
        m = g + s.b1 * m
        g2 = g * g  # as Optax (g^2, also for complex g)
        n = g2 + s.b2 * (n - g2)  # lerp from g^2 towards n: b2 n + (1 - b2) g^2
        u = (m + s.alpha * g) / (jnp.sqrt(n / s.bc2 + s.eps_root) + s.eps)
        return u, (m, n)

    def next_state(state, new_slots):
        return ScaleBySimplifiedAdEMAMixState(t=increment(state.t), m=new_slots[0], n=new_slots[1])

    return fusable(
        init,
        Rule(
            name,
            ScaleBySimplifiedAdEMAMixState,
            ("m", "n"),
            scalars,
            element,
            next_state,
            scalars_type=_SimplifiedScalars,
        ),
    )


def simplified_ademamix(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.99,
    b2=0.95,
    alpha=0.0,
    eps=1e-8,
    eps_root=0.0,
    weight_decay=0.0,
    mask=None,
) -> FusableTransformation:
    r"""Simplified AdEMAMix: :func:`scale_by_simplified_ademamix`, decoupled weight decay and
    :math:`-\eta_t`, one fused pass:

    :math:`\theta_{t+1} = \theta_t - \eta_t\big((m_t + \alpha g_t)/(\sqrt{\hat n_t + \epsilon_{root}}
    + \epsilon) + \lambda\theta_t\big)`. Same arguments and state as
    `optax.contrib.simplified_ademamix`.

    References:
      Morwani et al., *Connections between Schedule-Free Optimizers, AdEMAMix, and Accelerated SGD
      Variants*, 2025 (arXiv:2502.02431).
    """
    return chain(
        scale_by_simplified_ademamix(b1, b2, alpha, eps, eps_root),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
