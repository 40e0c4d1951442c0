"""Per-coordinate adaptive scalings: Adagrad, Adadelta, Adamax, Adan and Rectified Adam.

Each is a pure `optax.GradientTransformation` whose per-element math is a `Rule`, so it fuses with
its neighbours inside `optax_ext.chain` (clipping, weight decay, the learning rate: one pass).
States are Optax's own NamedTuples, same fields and order (`optax.ScaleByRssState`,
`optax.ScaleByAdaDeltaState`, `optax.ScaleByAdamState`, `optax.ScaleByAdanState`), so checkpoints
and `optax.tree.get(state, "mu")` work across the two libraries. Whatever depends on the step only
(bias corrections, RAdam's rectification and its threshold test, Adan's first-step flag) is a
step-wide scalar; the element does per-coordinate f32 math.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext import _validate as check
from optax_ext.fusion import Rule, fusable
from optax_ext.transforms._common import abs_sq, increment, scalar, value_at, zero_count, zeros_like_params
from optax_ext.transforms.moments import _check_storage, _first_moment_hat

__all__ = ["scale_by_adadelta", "scale_by_adamax", "scale_by_adan", "scale_by_radam", "scale_by_rss"]


# ---------------------------------------------------------------------------------- Adagrad


class _RssScalars(NamedTuple):
    eps: Any


def scale_by_rss(initial_accumulator_value=0.1, eps=1e-7, *, accumulator_dtype=None) -> optax.GradientTransformation:
    r"""Adagrad's scaling: divide by the root of the sum of all squared gradients so far,

    :math:`G_t = G_{t-1} + g_t^2` (with :math:`G_0` = `initial_accumulator_value`),
    :math:`u = g_t / \sqrt{G_t + \epsilon}` where :math:`G_t > 0`, and :math:`u = 0` where
    :math:`G_t = 0`. `accumulator_dtype` (ours) stores :math:`G` in another dtype; math is f32.
    State: `optax.ScaleByRssState(sum_of_squares)`.

    References:
      Duchi, Hazan & Singer, *Adaptive Subgradient Methods for Online Learning and Stochastic
      Optimization*, JMLR 2011.
    """
    fn = "scale_by_rss"
    initial_accumulator_value = check.non_negative(fn, "initial_accumulator_value", initial_accumulator_value)
    eps = check.non_negative(fn, "eps", eps)
    _check_storage(fn, accumulator_dtype=accumulator_dtype)

    def init(params):
        return optax.ScaleByRssState(
            sum_of_squares=zeros_like_params(params, accumulator_dtype, fill=initial_accumulator_value, signed=False)
        )

    def scalars(state, updates, params):
        return _RssScalars(eps=eps)

    def element(g, p, slots, s: _RssScalars):
        (acc,) = slots
        acc = abs_sq(g) + acc
        inv_root = jnp.where(acc > 0, jax.lax.rsqrt(acc + s.eps), 0.0)
        return inv_root * g, (acc,)

    return fusable(
        init,
        Rule(
            fn,
            optax.ScaleByRssState,
            ("sum_of_squares",),
            scalars,
            element,
            lambda st, sl: optax.ScaleByRssState(sum_of_squares=sl[0]),
            scalars_type=_RssScalars,
        ),
    )


# ---------------------------------------------------------------------------------- Adadelta


class _AdaDeltaScalars(NamedTuple):
    rho: Any
    one_minus_rho: Any
    eps: Any


def scale_by_adadelta(rho=0.9, eps=1e-6, *, accumulator_dtype=None) -> optax.GradientTransformation:
    r"""Adadelta: the step is the ratio of two running RMS values, of past updates and of gradients,

    :math:`E[g^2]_t = \rho E[g^2]_{t-1} + (1-\rho) g_t^2`,
    :math:`u_t = \frac{\sqrt{E[u^2]_{t-1} + \epsilon}}{\sqrt{E[g^2]_t + \epsilon}}\, g_t`,
    :math:`E[u^2]_t = \rho E[u^2]_{t-1} + (1-\rho) u_t^2`. `accumulator_dtype` (ours) stores both
    averages in another dtype. State: `optax.ScaleByAdaDeltaState(e_g, e_x)`.

    References:
      Zeiler, *ADADELTA: An Adaptive Learning Rate Method*, 2012.
    """
    fn = "scale_by_adadelta"
    rho = check.unit_interval(fn, "rho", rho, closed=True)
    eps = check.non_negative(fn, "eps", eps)
    _check_storage(fn, accumulator_dtype=accumulator_dtype)

    def init(params):
        return optax.ScaleByAdaDeltaState(
            e_g=zeros_like_params(params, accumulator_dtype, signed=False),
            e_x=zeros_like_params(params, accumulator_dtype, signed=False),
        )

    def scalars(state, updates, params):
        return _AdaDeltaScalars(rho=rho, one_minus_rho=1 - rho, eps=eps)

    def element(g, p, slots, s: _AdaDeltaScalars):
        e_g, e_x = slots
        # g * g, not |g|^2, as Optax (its moment of order 2 is the plain square, also for complex g).
        e_g = s.one_minus_rho * (g * g) + s.rho * e_g
        u = (jnp.sqrt(e_x + s.eps) / jnp.sqrt(e_g + s.eps)) * g
        e_x = s.one_minus_rho * (u * u) + s.rho * e_x
        return u, (e_g, e_x)

    return fusable(
        init,
        Rule(
            fn,
            optax.ScaleByAdaDeltaState,
            ("e_g", "e_x"),
            scalars,
            element,
            lambda st, sl: optax.ScaleByAdaDeltaState(e_g=sl[0], e_x=sl[1]),
            scalars_type=_AdaDeltaScalars,
        ),
    )


# ---------------------------------------------------------------------------------- Adamax


class _AdamaxScalars(NamedTuple):
    b1: Any
    one_minus_b1: Any
    b2: Any
    eps: Any
    inv_bc1: Any  # 1 / (1 - b1^t)


def scale_by_adamax(b1=0.9, b2=0.999, eps=1e-8, *, mu_dtype=None, nu_dtype=None) -> optax.GradientTransformation:
    r"""Adamax: Adam with the infinity norm in place of the second moment,

    :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t`,
    :math:`v_t = \max(|g_t| + \epsilon, \beta_2 v_{t-1})`,
    :math:`u = \frac{m_t}{1-\beta_1^t} / v_t` (the max needs no bias correction).
    `mu_dtype`/`nu_dtype` (ours) set the moments' storage. State: `optax.ScaleByAdamState(count, mu, nu)`.

    References:
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015 (Sec. 7.1).
    """
    fn = "scale_by_adamax"
    b1 = check.unit_interval(fn, "b1", b1, schedule=True)
    b2 = check.unit_interval(fn, "b2", b2, schedule=True)
    eps = check.non_negative(fn, "eps", eps, schedule=True)
    _check_storage(fn, mu_dtype=mu_dtype, nu_dtype=nu_dtype)

    def init(params):
        return optax.ScaleByAdamState(
            count=zero_count(),
            mu=zeros_like_params(params, mu_dtype),
            nu=zeros_like_params(params, nu_dtype, signed=False),
        )

    def scalars(state, updates, params):
        b1_t = value_at(b1, state.count)
        bc1 = 1 - scalar(b1_t) ** increment(state.count)
        return _AdamaxScalars(
            b1=b1_t,
            one_minus_b1=1 - b1_t,
            b2=value_at(b2, state.count),
            eps=value_at(eps, state.count),
            inv_bc1=1 / bc1,
        )

    def element(g, p, slots, s: _AdamaxScalars):
        m, v = slots
        m = s.one_minus_b1 * g + s.b1 * m
        v = jnp.maximum(jnp.abs(g) + s.eps, s.b2 * v)
        return (m * s.inv_bc1) / v, (m, v)

    return fusable(
        init,
        Rule(
            fn,
            optax.ScaleByAdamState,
            ("mu", "nu"),
            scalars,
            element,
            lambda st, sl: optax.ScaleByAdamState(count=increment(st.count), mu=sl[0], nu=sl[1]),
            scalars_type=_AdamaxScalars,
        ),
    )


# ---------------------------------------------------------------------------------- Adan


class _AdanScalars(NamedTuple):
    b1: Any
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    b3: Any
    one_minus_b3: Any
    eps: Any
    eps_root: Any
    inv_bc1: Any  # 1 / (1 - b_i^t) at t = count + 1
    inv_bc2: Any
    inv_bc3: Any
    has_prev: Any  # 1.0 once a previous gradient is stored (count > 0), else 0.0


def scale_by_adan(
    b1=0.98, b2=0.92, b3=0.99, eps=1e-8, eps_root=0.0, *, mu_dtype=None, nu_dtype=None
) -> optax.GradientTransformation:
    r"""Adan: Nesterov momentum estimated from gradient differences, without an extrapolated gradient.

    With :math:`\Delta_t = g_t - g_{t-1}` (0 at the first step):
    :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t`,
    :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2)\Delta_t`,
    :math:`n_t = \beta_3 n_{t-1} + (1-\beta_3)\,|g_t + (1-\beta_2)\Delta_t|^2`,
    :math:`u = (\hat m_t + (1-\beta_2)\hat v_t) / (\sqrt{\hat n_t + \epsilon_{root}} + \epsilon)` with
    the hats bias-corrected by :math:`1-\beta_i^t`. (Optax's convention: :math:`\beta_i` weighs the
    past, the paper's :math:`1-\beta_i`.) `mu_dtype` (ours) stores :math:`m, v`, `nu_dtype` :math:`n`.
    State: `optax.ScaleByAdanState(m, v, n, g, t)`, `g` the previous gradient.

    References:
      Xie et al., *Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models*,
      IEEE TPAMI 2024 (arXiv:2208.06677, Algorithm 1).
    """
    fn = "scale_by_adan"
    b1 = check.unit_interval(fn, "b1", b1, schedule=True)
    b2 = check.unit_interval(fn, "b2", b2, schedule=True)
    b3 = check.unit_interval(fn, "b3", b3, schedule=True)
    eps = check.non_negative(fn, "eps", eps, schedule=True)
    eps_root = check.non_negative(fn, "eps_root", eps_root, schedule=True)
    _check_storage(fn, mu_dtype=mu_dtype, nu_dtype=nu_dtype)

    def init(params):
        return optax.ScaleByAdanState(
            m=zeros_like_params(params, mu_dtype),
            v=zeros_like_params(params, mu_dtype),
            n=zeros_like_params(params, nu_dtype, signed=False),
            g=zeros_like_params(params),
            t=zero_count(),
        )

    def scalars(state, updates, params):
        t = increment(state.t)
        b1_t, b2_t, b3_t = (value_at(b, state.t) for b in (b1, b2, b3))
        return _AdanScalars(
            b1=b1_t,
            one_minus_b1=1 - b1_t,
            b2=b2_t,
            one_minus_b2=1 - b2_t,
            b3=b3_t,
            one_minus_b3=1 - b3_t,
            eps=value_at(eps, state.t),
            eps_root=value_at(eps_root, state.t),
            inv_bc1=1 / (1 - scalar(b1_t) ** t),
            inv_bc2=1 / (1 - scalar(b2_t) ** t),
            inv_bc3=1 / (1 - scalar(b3_t) ** t),
            has_prev=jnp.where(state.t > 0, scalar(1.0), scalar(0.0)),
        )

    def element(g, p, slots, s: _AdanScalars):
        m, v, n, g_prev = slots
        # A full-shape predicate: Mosaic GPU lowers no select with a scalar predicate.
        diff = jnp.where(jnp.broadcast_to(s.has_prev > 0.5, g.shape), g - g_prev, 0.0)
        m = s.one_minus_b1 * g + s.b1 * m
        v = s.one_minus_b2 * diff + s.b2 * v
        n = s.one_minus_b3 * abs_sq(g + s.one_minus_b2 * diff) + s.b3 * n
        direction = m * s.inv_bc1 + s.one_minus_b2 * (v * s.inv_bc2)
        return direction / (jnp.sqrt(n * s.inv_bc3 + s.eps_root) + s.eps), (m, v, n, g)

    return fusable(
        init,
        Rule(
            fn,
            optax.ScaleByAdanState,
            ("m", "v", "n", "g"),
            scalars,
            element,
            lambda st, sl: optax.ScaleByAdanState(m=sl[0], v=sl[1], n=sl[2], g=sl[3], t=increment(st.t)),
            scalars_type=_AdanScalars,
        ),
    )


# ---------------------------------------------------------------------------------- RAdam


class _RAdamScalars(NamedTuple):
    b1: Any
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    eps: Any
    eps_root: Any
    bc1: Any  # 1 - b1^t
    inv_bc1: Any
    inv_bc2: Any
    r: Any  # the variance rectification factor (0 where not rectified)
    rectified: Any  # 1.0 when rho_t >= threshold (the adaptive step), else 0.0 (momentum SGD)
    bc1_next: Any = None  # 1 - b1^(t+1), for Nesterov's look-ahead


def scale_by_radam(
    b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, threshold=5.0, *, nesterov: bool = False, mu_dtype=None, nu_dtype=None
) -> optax.GradientTransformation:
    r"""Rectified Adam: Adam's step times a factor correcting the variance of the adaptive rate.

    With :math:`\rho_\infty = 2/(1-\beta_2) - 1` and
    :math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)`, when :math:`\rho_t \ge` `threshold`
    :math:`u = r_t \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)`,
    :math:`r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}`;
    otherwise (early steps) :math:`u = \hat m_t`. The switch depends on the step only, so it is a
    step-wide scalar. `nesterov=True` uses NAdam's look-ahead :math:`\hat m_t`. `mu_dtype`/`nu_dtype`
    (ours) set the moments' storage. State: `optax.ScaleByAdamState(count, mu, nu)`.

    References:
      Liu et al., *On the Variance of the Adaptive Learning Rate and Beyond*, ICLR 2020.
    """
    fn = "scale_by_radam"
    b1 = check.unit_interval(fn, "b1", b1, schedule=True)
    b2 = check.unit_interval(fn, "b2", b2, schedule=True)
    eps = check.non_negative(fn, "eps", eps, schedule=True)
    eps_root = check.non_negative(fn, "eps_root", eps_root, schedule=True)
    threshold = check.finite(fn, "threshold", threshold, schedule=True)
    if not isinstance(nesterov, bool):
        raise TypeError(f"{fn}: nesterov must be True or False, got {nesterov!r}.")
    _check_storage(fn, mu_dtype=mu_dtype, nu_dtype=nu_dtype)

    def init(params):
        return optax.ScaleByAdamState(
            count=zero_count(),
            mu=zeros_like_params(params, mu_dtype),
            nu=zeros_like_params(params, nu_dtype, signed=False),
        )

    def scalars(state, updates, params):
        t = increment(state.count)
        b1_t, b2_t = value_at(b1, state.count), value_at(b2, state.count)
        # Same order of operations as Optax: rho_inf in Python floats for Python b2, then f32.
        rho_inf = 2.0 / (1.0 - b2_t) - 1.0
        b2_pow = scalar(b2_t) ** t
        rho = rho_inf - 2 * t * b2_pow / (1 - b2_pow)
        r = jnp.sqrt((rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho))
        on = rho >= value_at(threshold, state.count)
        bc1 = 1 - scalar(b1_t) ** t
        return _RAdamScalars(
            b1=b1_t,
            one_minus_b1=1 - b1_t,
            b2=b2_t,
            one_minus_b2=1 - b2_t,
            eps=value_at(eps, state.count),
            eps_root=value_at(eps_root, state.count),
            bc1=bc1,
            inv_bc1=1 / bc1,
            inv_bc2=1 / (1 - b2_pow),
            r=jnp.where(on, r, 0.0),
            rectified=jnp.where(on, scalar(1.0), scalar(0.0)),
            bc1_next=1 - scalar(b1_t) ** increment(t) if nesterov else None,
        )

    def element(g, p, slots, s: _RAdamScalars):
        m, v = slots
        m = s.one_minus_b1 * g + s.b1 * m
        v = s.one_minus_b2 * abs_sq(g) + s.b2 * v
        m_hat = _first_moment_hat(g, m, s, nesterov)
        adaptive = s.r * m_hat / (jnp.sqrt(v * s.inv_bc2 + s.eps_root) + s.eps)
        # A full-shape predicate: Mosaic GPU lowers no select with a scalar predicate.
        return jnp.where(jnp.broadcast_to(s.rectified > 0.5, m_hat.shape), adaptive, m_hat), (m, v)

    return fusable(
        init,
        Rule(
            fn,
            optax.ScaleByAdamState,
            ("mu", "nu"),
            scalars,
            element,
            lambda st, sl: optax.ScaleByAdamState(count=increment(st.count), mu=sl[0], nu=sl[1]),
            scalars_type=_RAdamScalars,
        ),
    )
