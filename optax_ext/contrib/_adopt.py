"""ADOPT: Adam with the second moment of the *previous* step in the denominator, fused.

Same names, arguments and state as `optax.contrib.adopt` / `optax.contrib.scale_by_adopt`
(`optax.ScaleByAdamState(count, mu, nu)`). The whole step is one per-element `Rule`: the clip value
and the first-step switches (no momentum and no second-moment decay at step 0) are step-wide scalars.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext import _validate as check
from optax_ext.fusion import FusableTransformation, Rule, chain, fusable
from optax_ext.transforms import scale_by_learning_rate
from optax_ext.transforms._common import abs_sq, increment, value_at, zero_count, zeros_like_params

__all__ = ["adopt", "scale_by_adopt"]


def _quarter_root(count):
    return count**0.25


class _AdoptScalars(NamedTuple):
    b1: Any  # 1 at step 0 (the first moment stays 0), b1 after
    one_minus_b1: Any
    b2: Any  # 0 at step 0 (nu starts at g^2), b2 after
    one_minus_b2: Any
    eps: Any
    clip: Any = None  # clip_value_fn(count), with use_clipping


def scale_by_adopt(
    b1=0.9,
    b2=0.9999,
    eps=1e-6,
    mu_dtype=None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[jax.Array], jax.Array] = _quarter_root,
    nu_dtype=None,
) -> optax.GradientTransformation:
    r"""ADOPT scaling: normalize by the second moment of the steps *before* this one, then average.

    With :math:`v_{t-1}` the second moment before this step and :math:`c_t` = `clip_value_fn(t)`,

    .. math::
      \tilde g_t = \mathrm{clip}\big(g_t / \max(\sqrt{v_{t-1}}, \epsilon), -c_t, c_t\big),\quad
      m_t = \beta_1 m_{t-1} + (1-\beta_1)\tilde g_t,\quad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,

    update :math:`m_t` (Nesterov: :math:`\beta_1 m_t + (1-\beta_1)\tilde g_t`). At the first step
    (count 0) only :math:`v_0 = g_0^2` is recorded and the update is 0. `nu_dtype` (ours) sets the
    storage of :math:`v`. State: `optax.ScaleByAdamState(count, mu, nu)`.

    References:
      Taniguchi et al., *ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate*,
      NeurIPS 2024.
    """
    name = "scale_by_adopt"
    b1 = check.unit_interval(name, "b1", b1, schedule=True)
    b2 = check.unit_interval(name, "b2", b2, schedule=True)
    eps = check.non_negative(name, "eps", eps, schedule=True)
    check.storage(name, "mu_dtype", mu_dtype)
    check.storage(name, "nu_dtype", nu_dtype)
    if not isinstance(nesterov, bool):
        raise TypeError(f"{name}: nesterov must be True or False, got {nesterov!r}.")
    if not isinstance(use_clipping, bool):
        raise TypeError(f"{name}: use_clipping must be True or False, got {use_clipping!r}.")
    if use_clipping and not callable(clip_value_fn):
        raise TypeError(f"{name}: clip_value_fn must be a function of the step count, got {clip_value_fn!r}.")

    def init(params):
        return optax.ScaleByAdamState(
            count=zero_count(),
            mu=zeros_like_params(params, mu_dtype),
            nu=zeros_like_params(params, nu_dtype, signed=False),
        )

    def scalars(state, updates, params):
        started = state.count > 0
        b1_t = jnp.where(started, value_at(b1, state.count), 1)
        b2_t = jnp.where(started, value_at(b2, state.count), 0)
        return _AdoptScalars(
            b1=b1_t,
            one_minus_b1=1 - b1_t,
            b2=b2_t,
            one_minus_b2=1 - b2_t,
            eps=value_at(eps, state.count),
            clip=clip_value_fn(state.count) if use_clipping else None,
        )

    def element(g, p, slots, s: _AdoptScalars):
        m, v = slots
        normalized = g / jnp.maximum(jnp.sqrt(v), s.eps)  # the old second moment
        if use_clipping:
            normalized = jnp.clip(normalized, -s.clip, s.clip)
        m = s.one_minus_b1 * normalized + s.b1 * m
        v = s.one_minus_b2 * abs_sq(g) + s.b2 * v
        u = s.one_minus_b1 * normalized + s.b1 * m if nesterov else m
        return u, (m, v)

    def next_state(state, new_slots):
        return optax.ScaleByAdamState(count=increment(state.count), mu=new_slots[0], nu=new_slots[1])

    return fusable(
        init,
        Rule(name, optax.ScaleByAdamState, ("mu", "nu"), scalars, element, next_state, scalars_type=_AdoptScalars),
    )


def adopt(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    b2=0.9999,
    eps=1e-6,
    mu_dtype=None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[jax.Array], jax.Array] = _quarter_root,
    nu_dtype=None,
) -> FusableTransformation:
    r"""ADOPT: :func:`scale_by_adopt` then :math:`-\eta_t`, one fused pass.

    :math:`\theta_{t+1} = \theta_t - \eta_t m_t` with
    :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1)\,\mathrm{clip}(g_t/\max(\sqrt{v_{t-1}},\epsilon), \pm c_t)`.
    Same arguments and state as `optax.contrib.adopt`: `(ScaleByAdamState, EmptyState or
    ScaleByScheduleState)`.

    References:
      Taniguchi et al., *ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate*,
      NeurIPS 2024.
    """
    return chain(
        scale_by_adopt(
            b1,
            b2,
            eps,
            mu_dtype,
            nesterov=nesterov,
            use_clipping=use_clipping,
            clip_value_fn=clip_value_fn,
            nu_dtype=nu_dtype,
        ),
        scale_by_learning_rate(learning_rate),
    )
