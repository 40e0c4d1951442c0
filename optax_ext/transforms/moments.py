"""Moment-based scalings: momentum, RMSprop, Adam and its family (AdaBelief, Yogi, Lion, AMSGrad).

Each is a pure `optax.GradientTransformation` whose math is a per-element `Rule`, so adjacent
ones fuse inside `optax_ext.chain`. States are Optax's own NamedTuples (same fields, same order),
so checkpoints and `optax.tree.get(state, "mu")` work across the two libraries. Math is f32 whatever
the storage dtype (f64 for f64 leaves, complex for complex ones, with second moments of |g|^2);
`mu_dtype`/`nu_dtype` set the storage of the moments.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext import _validate as check
from optax_ext._compat import ScaleByRmsWithCountState, ScaleByRStdDevWithCountState  # Optax's, not exported
from optax_ext.fusion import Rule, fusable
from optax_ext.quantization import Int8Blockwise
from optax_ext.transforms._common import abs_sq, increment, scalar, value_at, zero_count, zeros_like_params


def _unquantized(dtype):
    """AMSGrad's running max stays f32 under 8-bit storage: requantizing max(v_max, v) each step
    would round it up about half the time, and the max keeps every upward rounding (it ratchets)."""
    return jnp.float32 if isinstance(dtype, Int8Blockwise) else dtype


def _check_storage(fn, **dtypes):
    for name, value in dtypes.items():
        check.storage(fn, name, value)


# Complements (`one_minus_b1 = 1 - b1`) are taken before any cast to f32, as Optax does, so that a
# Python float keeps full precision (1 - 0.999 rounds differently in f32).


def _first_moment_hat(g, m, s: _AdamScalars, nesterov):
    """Bias-corrected first moment; Dozat's Nesterov form looks one step ahead."""
    if nesterov:
        return s.b1 * (m / s.bc1_next) + s.one_minus_b1 * (g / s.bc1)
    return m * s.inv_bc1


# ---------------------------------------------------------------------------------- momentum


class _MomentumScalars(NamedTuple):
    decay: Any  # heavy ball has no (1 - decay) factor


def scale_by_momentum(momentum=0.9, nesterov: bool = False, accumulator_dtype=None) -> optax.GradientTransformation:
    r"""Heavy-ball momentum: :math:`v_t = \rho v_{t-1} + g_t`, update :math:`v_t`.

    With `nesterov=True` the update is :math:`g_t + \rho v_t`. Same as `optax.trace`
    (state `optax.TraceState(trace)`). `momentum` is a number: the state has no step count to
    evaluate a schedule at (cyclic momentum: `optax.inject_hyperparams(optax_ext.sgd)(..., momentum=schedule)`).

    References:
      Polyak, *Some methods of speeding up the convergence of iteration methods*, 1964;
      Sutskever et al., *On the importance of initialization and momentum in deep learning*, 2013.
    """
    momentum = check.unit_interval("scale_by_momentum", "momentum", momentum)
    _check_storage("scale_by_momentum", accumulator_dtype=accumulator_dtype)

    def init(params):
        return optax.TraceState(trace=zeros_like_params(params, accumulator_dtype))

    def scalars(state, updates, params):
        return _MomentumScalars(decay=momentum)

    def element(g, p, slots, s: _MomentumScalars):
        (t,) = slots
        t = g + s.decay * t
        return (g + s.decay * t if nesterov else t), (t,)

    return fusable(
        init,
        Rule(
            "scale_by_momentum",
            optax.TraceState,
            ("trace",),
            scalars,
            element,
            lambda st, sl: optax.TraceState(trace=sl[0]),
            scalars_type=_MomentumScalars,
        ),
    )


# ---------------------------------------------------------------------------------- RMSprop


class _RmsScalars(NamedTuple):
    decay: Any
    one_minus_decay: Any
    eps: Any
    bc: Any = None  # 1 - decay^t, with bias_correction


def scale_by_rms(
    decay=0.9,
    eps=1e-8,
    initial_scale=0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    centered: bool = False,
) -> optax.GradientTransformation:
    r"""RMSprop scaling: :math:`v_t = \rho v_{t-1} + (1-\rho) g_t^2`, :math:`u = g_t/\sqrt{v_t+\epsilon}`.

    `eps_in_sqrt=False` gives the other placement found in the literature, :math:`g/(\sqrt{v}+\epsilon)`.
    `centered=True` subtracts the squared mean (Graves 2013): :math:`u = g/\sqrt{v - m^2 + \epsilon}`
    with :math:`m` the EMA of :math:`g`. `bias_correction=True` divides the EMAs by :math:`1-\rho^t`.
    States match `optax.scale_by_rms` / `optax.scale_by_stddev`.

    References:
      Tieleman & Hinton, *Lecture 6.5 - RMSProp*, 2012; Graves, *Generating Sequences With
      Recurrent Neural Networks*, 2013.
    """
    decay = check.unit_interval("scale_by_rms", "decay", decay)
    eps = check.non_negative("scale_by_rms", "eps", eps)

    if centered:
        state_type = ScaleByRStdDevWithCountState if bias_correction else optax.ScaleByRStdDevState
        slots = ("mu", "nu")
    else:
        state_type = ScaleByRmsWithCountState if bias_correction else optax.ScaleByRmsState
        slots = ("nu",)

    def init(params):
        nu = zeros_like_params(params, fill=initial_scale)
        fields = {"nu": nu}
        if centered:
            fields["mu"] = zeros_like_params(params)
        if bias_correction:
            fields["count"] = zero_count()
        return state_type(**fields)

    def scalars(state, updates, params):
        bc = 1 - scalar(decay) ** increment(state.count) if bias_correction else None
        return _RmsScalars(decay=decay, one_minus_decay=1 - decay, eps=eps, bc=bc)

    def element(g, p, slots, s: _RmsScalars):
        d, one_minus_d = s.decay, s.one_minus_decay
        nu = one_minus_d * abs_sq(g) + d * slots[-1]
        nu_hat = nu / s.bc if bias_correction else nu
        if centered:
            mu = one_minus_d * g + d * slots[0]
            mu_hat = mu / s.bc if bias_correction else mu
            var = nu_hat - mu_hat * mu_hat
            new = (mu, nu)
        else:
            var, new = nu_hat, (nu,)
        scaling = jax.lax.rsqrt(var + s.eps) if eps_in_sqrt else 1 / (jnp.sqrt(var) + s.eps)
        return scaling * g, new

    def next_state(state, new_slots):
        fields = dict(zip(slots, new_slots))
        if bias_correction:
            fields["count"] = increment(state.count)
        return state_type(**fields)

    return fusable(
        init, Rule("scale_by_rms", state_type, slots, scalars, element, next_state, scalars_type=_RmsScalars)
    )


# ---------------------------------------------------------------------------------- Adam family


class _AdamScalars(NamedTuple):
    """The step-wide values of the Adam family at step t = count + 1 (schedules are evaluated at count)."""

    b1: Any
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    eps: Any
    eps_root: Any
    bc1: Any  # 1 - b1^t
    bc2: Any  # 1 - b2^t
    # Reciprocals once per step: the element multiplies instead of dividing (divides dominate an
    # optimizer step on CPU).
    inv_bc1: Any
    inv_bc2: Any
    bc1_next: Any = None  # 1 - b1^(t+1), for Nesterov's look-ahead


def _adam_like(name, state_type, init_slots, element, b1, b2, eps, eps_root, nesterov=False):
    b1 = check.unit_interval(name, "b1", b1, schedule=True)
    b2 = check.unit_interval(name, "b2", b2, schedule=True)
    eps = check.non_negative(name, "eps", eps, schedule=True)
    eps_root = check.non_negative(name, "eps_root", eps_root, schedule=True)
    slots = tuple(init_slots)

    def init(params):
        return state_type(count=zero_count(), **{k: f(params) for k, f in init_slots.items()})

    def scalars(state, updates, params):
        t = increment(state.count)
        b1_t, b2_t = value_at(b1, state.count), value_at(b2, state.count)
        bc1, bc2 = 1 - scalar(b1_t) ** t, 1 - scalar(b2_t) ** t
        return _AdamScalars(
            b1=b1_t,
            one_minus_b1=1 - b1_t,
            b2=b2_t,
            one_minus_b2=1 - b2_t,
            eps=value_at(eps, state.count),
            eps_root=value_at(eps_root, state.count),
            bc1=bc1,
            bc2=bc2,
            inv_bc1=1 / bc1,
            inv_bc2=1 / bc2,
            bc1_next=1 - scalar(b1_t) ** increment(t) if nesterov else None,
        )

    def next_state(state, new_slots):
        return state_type(count=increment(state.count), **dict(zip(slots, new_slots)))

    return fusable(init, Rule(name, state_type, slots, scalars, element, next_state, scalars_type=_AdamScalars))


def scale_by_adam(
    b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, *, nesterov: bool = False, nu_dtype=None
) -> optax.GradientTransformation:
    r"""Adam scaling: moments :math:`m_t, v_t`, bias-corrected :math:`\hat m_t, \hat v_t`,

    :math:`u = \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)`. `nesterov=True` is NAdam's
    look-ahead :math:`\hat m = \beta_1 m_t/(1-\beta_1^{t+1}) + (1-\beta_1) g_t/(1-\beta_1^t)`.
    `mu_dtype`/`nu_dtype` store the moments in another dtype (e.g. bf16); math stays f32.
    State: `optax.ScaleByAdamState(count, mu, nu)`.

    References:
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015;
      Dozat, *Incorporating Nesterov Momentum into Adam*, 2016.
    """

    def element(g, p, slots, s: _AdamScalars):
        m, v = slots
        m = s.one_minus_b1 * g + s.b1 * m
        v = s.one_minus_b2 * abs_sq(g) + s.b2 * v
        m_hat = _first_moment_hat(g, m, s, nesterov)
        v_hat = v * s.inv_bc2
        return m_hat / (jnp.sqrt(v_hat + s.eps_root) + s.eps), (m, v)

    _check_storage("scale_by_adam", mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    init_slots = {
        "mu": lambda p: zeros_like_params(p, mu_dtype),
        "nu": lambda p: zeros_like_params(p, nu_dtype, signed=False),
    }
    return _adam_like("scale_by_adam", optax.ScaleByAdamState, init_slots, element, b1, b2, eps, eps_root, nesterov)


def scale_by_amsgrad(
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    mu_dtype=None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    nu_dtype=None,
) -> optax.GradientTransformation:
    r"""AMSGrad: Adam with a non-decreasing second moment, :math:`\hat v^{max}_t = \max(\hat v^{max}_{t-1}, \hat v_t)`,

    :math:`u = \hat m_t / (\sqrt{\hat v^{max}_t + \epsilon_{root}} + \epsilon)`. The bias corrections can be
    turned off (`bias_correction_mu/nu=False`) to match the original paper, as in Optax.
    State: `optax.ScaleByAmsgradState(count, mu, nu, nu_max)`.

    References:
      Reddi, Kale & Kumar, *On the Convergence of Adam and Beyond*, ICLR 2018.
    """

    def element(g, p, slots, s: _AdamScalars):
        m, v, v_max = slots
        m = s.one_minus_b1 * g + s.b1 * m
        v = s.one_minus_b2 * abs_sq(g) + s.b2 * v
        v_max = jnp.maximum(v_max, v * s.inv_bc2 if bias_correction_nu else v)
        m_hat = m * s.inv_bc1 if bias_correction_mu else m
        return m_hat / (jnp.sqrt(v_max + s.eps_root) + s.eps), (m, v, v_max)

    _check_storage("scale_by_amsgrad", mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    init_slots = {
        "mu": lambda p: zeros_like_params(p, mu_dtype),
        "nu": lambda p: zeros_like_params(p, nu_dtype, signed=False),
        "nu_max": lambda p: zeros_like_params(p, _unquantized(nu_dtype), signed=False),
    }
    return _adam_like("scale_by_amsgrad", optax.ScaleByAmsgradState, init_slots, element, b1, b2, eps, eps_root)


def scale_by_belief(
    b1=0.9, b2=0.999, eps=1e-16, eps_root=1e-16, *, nesterov: bool = False, mu_dtype=None, nu_dtype=None
) -> optax.GradientTransformation:
    r"""AdaBelief: the second moment tracks the *belief* :math:`(g_t - m_t)^2` instead of :math:`g_t^2`:

    :math:`s_t = \beta_2 s_{t-1} + (1-\beta_2)(g_t - m_t)^2 + \epsilon_{root}`,
    :math:`u = \hat m_t / (\sqrt{\hat s_t} + \epsilon)`. State: `optax.ScaleByBeliefState(count, mu, nu)`.

    References:
      Zhuang et al., *AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients*,
      NeurIPS 2020.
    """

    def element(g, p, slots, s: _AdamScalars):
        m, v = slots
        m = s.one_minus_b1 * g + s.b1 * m
        err = g - m
        v = s.one_minus_b2 * abs_sq(err) + s.b2 * v + s.eps_root
        m_hat = _first_moment_hat(g, m, s, nesterov)
        return m_hat / (jnp.sqrt(v * s.inv_bc2) + s.eps), (m, v)

    _check_storage("scale_by_belief", mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    init_slots = {
        "mu": lambda p: zeros_like_params(p, mu_dtype),
        "nu": lambda p: zeros_like_params(p, nu_dtype, signed=False),
    }
    return _adam_like("scale_by_belief", optax.ScaleByBeliefState, init_slots, element, b1, b2, eps, eps_root, nesterov)


def scale_by_yogi(
    b1=0.9, b2=0.999, eps=1e-3, eps_root=0.0, initial_accumulator_value=1e-6, *, mu_dtype=None, nu_dtype=None
) -> optax.GradientTransformation:
    r"""Yogi: an additive second-moment update that cannot blow up,

    :math:`v_t = v_{t-1} - (1-\beta_2)\,\mathrm{sign}(v_{t-1} - g_t^2)\, g_t^2`,
    :math:`u = \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)`. Moments start at
    `initial_accumulator_value`. State: `optax.ScaleByAdamState(count, mu, nu)`.

    References:
      Zaheer et al., *Adaptive Methods for Nonconvex Optimization*, NeurIPS 2018.
    """

    def element(g, p, slots, s: _AdamScalars):
        m, v = slots
        m = s.one_minus_b1 * g + s.b1 * m
        g2 = abs_sq(g)
        v = v - s.one_minus_b2 * jnp.sign(v - g2) * g2
        return (m * s.inv_bc1) / (jnp.sqrt(v * s.inv_bc2 + s.eps_root) + s.eps), (m, v)

    _check_storage("scale_by_yogi", mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    init_slots = {
        "mu": lambda p: zeros_like_params(p, mu_dtype, fill=initial_accumulator_value),
        "nu": lambda p: zeros_like_params(p, nu_dtype, fill=initial_accumulator_value, signed=False),
    }
    return _adam_like("scale_by_yogi", optax.ScaleByAdamState, init_slots, element, b1, b2, eps, eps_root)


_LION_MODES = ("hard", "smooth", "refined")


class _LionScalars(NamedTuple):
    b1: Any
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    beta: Any  # the smooth mode's tanh sharpness


def scale_by_lion(
    b1=0.9, b2=0.99, mu_dtype=None, *, mode: str = "hard", smooth_beta=1.0
) -> optax.GradientTransformation:
    r"""Lion: the sign of an interpolation, :math:`u = \mathrm{sign}((1-\beta_1) g_t + \beta_1 m_{t-1})`,

    then :math:`m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t`. `mode="smooth"` uses
    :math:`\tanh(\beta_s x)`, `"refined"` is linear inside [-1, 1]. State:
    `optax.ScaleByLionState(count, mu)`.

    References:
      Chen et al., *Symbolic Discovery of Optimization Algorithms*, 2023.
    """
    b1 = check.unit_interval("scale_by_lion", "b1", b1, schedule=True)
    b2 = check.unit_interval("scale_by_lion", "b2", b2, schedule=True)
    check.one_of("scale_by_lion", "mode", mode, _LION_MODES)
    _check_storage("scale_by_lion", mu_dtype=mu_dtype)

    def init(params):
        return optax.ScaleByLionState(count=zero_count(), mu=zeros_like_params(params, mu_dtype))

    def scalars(state, updates, params):
        b1_t, b2_t = value_at(b1, state.count), value_at(b2, state.count)
        return _LionScalars(b1=b1_t, one_minus_b1=1 - b1_t, b2=b2_t, one_minus_b2=1 - b2_t, beta=smooth_beta)

    def element(g, p, slots, s: _LionScalars):
        (m,) = slots
        if jnp.iscomplexobj(g):
            raise TypeError(
                "scale_by_lion: complex updates are not supported (as in Optax): the sign of a "
                "complex number is not a per-coordinate direction."
            )
        x = s.one_minus_b1 * g + s.b1 * m
        if mode == "hard":
            u = jnp.sign(x)
        elif mode == "smooth":
            u = jnp.tanh(s.beta * x)
        else:
            u = jnp.where(jnp.abs(x) < 1.0, x, jnp.sign(x))
        return u, (s.one_minus_b2 * g + s.b2 * m,)

    return fusable(
        init,
        Rule(
            "scale_by_lion",
            optax.ScaleByLionState,
            ("mu",),
            scalars,
            element,
            lambda st, sl: optax.ScaleByLionState(count=increment(st.count), mu=sl[0]),
            scalars_type=_LionScalars,
        ),
    )


class _EmaScalars(NamedTuple):
    decay: Any
    one_minus_decay: Any
    bc: Any = None  # 1 - decay^t, with debias


def ema(decay, debias: bool = True, accumulator_dtype=None) -> optax.GradientTransformation:
    r"""Exponential moving average of the updates, :math:`e_t = \beta e_{t-1} + (1-\beta) u_t`.

    With `debias`, the output is :math:`e_t/(1-\beta^t)`. State: `optax.EmaState(count, ema)`.
    """
    decay = check.unit_interval("ema", "decay", decay, schedule=True)

    def init(params):
        return optax.EmaState(count=zero_count(), ema=zeros_like_params(params, accumulator_dtype))

    def scalars(state, updates, params):
        d = value_at(decay, state.count)
        bc = 1 - scalar(d) ** increment(state.count) if debias else None
        return _EmaScalars(decay=d, one_minus_decay=1 - d, bc=bc)

    def element(g, p, slots, s: _EmaScalars):
        e = s.one_minus_decay * g + s.decay * slots[0]
        return (e / s.bc if debias else e), (e,)

    return fusable(
        init,
        Rule(
            "ema",
            optax.EmaState,
            ("ema",),
            scalars,
            element,
            lambda st, sl: optax.EmaState(count=increment(st.count), ema=sl[0]),
            scalars_type=_EmaScalars,
        ),
    )
