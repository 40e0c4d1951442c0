"""Monotone decays and restarts: constant, step, multistep, exponential,
polynomial and cosine decay, and SGDR (Loshchilov & Hutter, 2017)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from optax_ext.schedules import base as b


def constant(value: Any) -> b.Schedule:
    r"""Constant schedule :math:`\eta_t = \eta`.

    Args:
      value: the value held at every step (may be a traced scalar).

    Returns:
      A schedule ``step -> float32`` (same shape as ``step``).
    """
    b.real_arg("constant", "value", value)

    def schedule(step):
        return b.like_steps(value, b.steps(step))

    return b.jitted(schedule)


def join(schedules: Sequence[b.Schedule], boundaries: Sequence[int]) -> b.Schedule:
    r"""Runs ``schedules[i]`` between ``boundaries[i-1]`` and ``boundaries[i]``.

    .. math::
      \eta_t = s_i(t - B_{i-1}) \quad \text{for } B_{i-1} \le t < B_i,
      \qquad B_{-1} = 0,\ B_{n-1} = \infty

    Each schedule restarts its own count at its boundary, as in
    ``optax.join_schedules`` (same semantics).

    Args:
      schedules: ``n >= 1`` callables ``step -> value`` (ours or Optax's).
      boundaries: ``n - 1`` strictly increasing positive steps.

    Returns:
      A schedule ``step -> float32``.
    """
    fn = "join"
    if isinstance(schedules, (str, bytes)) or not hasattr(schedules, "__iter__"):
        raise TypeError(f"{fn}: schedules must be a sequence of callables, got {schedules!r}")
    scheds = tuple(b.schedule_arg(fn, f"schedules[{i}]", s) for i, s in enumerate(schedules))
    if not scheds:
        raise ValueError(f"{fn}: schedules must hold at least one schedule, got {schedules!r}")
    bounds = b.boundaries_arg(fn, "boundaries", boundaries)
    if len(bounds) != len(scheds) - 1:
        raise ValueError(
            f"{fn}: boundaries must have len(schedules) - 1 = {len(scheds) - 1}"
            f" entries, got {len(bounds)}: {list(bounds)!r}"
        )

    def schedule(step):
        t = b.steps(step)
        out = b.like_steps(scheds[0](t), t)
        for boundary, s in zip(bounds, scheds[1:]):
            # Clamped so that a foreign schedule never sees a negative count.
            later = b.like_steps(s(jnp.maximum(t - boundary, 0)), t)
            out = jnp.where(t < boundary, out, later)
        return out

    return b.jitted(schedule)


def step_decay(init_value: Any, step_size: int, gamma: Any) -> b.Schedule:
    r"""Step decay: :math:`\eta_t = \eta_0\,\gamma^{\lfloor t/k \rfloor}`.

    PyTorch's ``StepLR`` semantics (the value changes at ``t = k, 2k, ...``).

    Args:
      init_value: :math:`\eta_0`.
      step_size: :math:`k`, a positive integer.
      gamma: multiplicative factor, ``>= 0``.

    Returns:
      A schedule ``step -> float32``.
    """
    fn = "step_decay"
    b.real_arg(fn, "init_value", init_value)
    k = b.int_arg(fn, "step_size", step_size)
    b.real_arg(fn, "gamma", gamma, low=0.0)

    def schedule(step):
        n = b.as_float(b.floordiv(b.steps(step), k))
        return b.f32(init_value) * jnp.power(b.f32(gamma), n)

    return b.jitted(schedule)


def multistep_decay(init_value: Any, boundaries: Sequence[int], gamma: Any) -> b.Schedule:
    r"""Multistep decay: :math:`\eta_t = \eta_0\,\gamma^{\#\{i : B_i \le t\}}`.

    PyTorch's ``MultiStepLR`` semantics (milestones must be strictly increasing
    here, where PyTorch counts a repeated milestone twice).

    Args:
      init_value: :math:`\eta_0`.
      boundaries: strictly increasing positive steps :math:`B_i`.
      gamma: multiplicative factor applied at each boundary, ``>= 0``.

    Returns:
      A schedule ``step -> float32``.
    """
    fn = "multistep_decay"
    b.real_arg(fn, "init_value", init_value)
    bounds = b.boundaries_arg(fn, "boundaries", boundaries)
    b.real_arg(fn, "gamma", gamma, low=0.0)

    def schedule(step):
        t = b.steps(step)
        n = jnp.zeros(t.shape, jnp.float32)
        for boundary in bounds:
            n = n + (t >= boundary).astype(jnp.float32)
        return b.f32(init_value) * jnp.power(b.f32(gamma), n)

    return b.jitted(schedule)


def exponential_decay(
    init_value: Any,
    transition_steps: int = 1,
    decay_rate: Any = None,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: Any = None,
    *,
    rate: Any = None,
    gamma: Any = None,
) -> b.Schedule:
    r"""Exponential decay, continuous or staircase; Optax's arguments in Optax's order.

    .. math::
      \eta_t = \eta_0\, \gamma^{p} = \eta_0 \exp(-\lambda\, p), \qquad
      p = (t - t_0) / K \ \ (\text{or } \lfloor (t - t_0) / K \rfloor \text{ with staircase}),
      \quad \eta_t = \eta_0 \text{ for } t \le t_0

    Give exactly one of ``decay_rate`` (:math:`\gamma`, as ``optax.exponential_decay``;
    ``gamma`` is the same, PyTorch ``ExponentialLR``'s name) or ``rate`` (:math:`\lambda`, the
    continuous form :math:`\gamma = e^{-\lambda}`). With ``decay_rate`` the values are
    ``optax.exponential_decay``'s. Unlike Optax, a non-positive ``transition_steps``, a zero
    ``decay_rate`` or a negative ``transition_begin`` is an error, not a silent constant schedule.

    Args:
      init_value: :math:`\eta_0`.
      transition_steps: :math:`K`, a positive integer (default 1: per step).
      decay_rate: decay base :math:`\gamma > 0` per ``transition_steps`` (> 1 grows).
      transition_begin: :math:`t_0 \ge 0`, steps before the decay starts.
      staircase: decay at discrete intervals of ``K`` steps.
      end_value: optional bound where the decay stops (a floor when decaying, a
        ceiling when growing), as in Optax.
      rate: decay rate :math:`\lambda` per ``transition_steps`` (negative grows).
      gamma: another name for ``decay_rate``.

    Returns:
      A schedule ``step -> float32``.
    """
    fn = "exponential_decay"
    b.real_arg(fn, "init_value", init_value)
    given = {k: v for k, v in (("decay_rate", decay_rate), ("gamma", gamma), ("rate", rate)) if v is not None}
    if len(given) != 1:
        raise ValueError(
            f"{fn}: give exactly one of decay_rate (or its alias gamma) or rate (lambda, with decay_rate ="
            f" exp(-lambda)), got {given or 'none'}"
        )
    if rate is not None:
        b.real_arg(fn, "rate", rate)
    else:
        name, base = next(iter(given.items()))
        b.real_arg(fn, name, base, low=0.0, low_open=True)
    k = b.int_arg(fn, "transition_steps", transition_steps)
    begin = b.int_arg(fn, "transition_begin", transition_begin, minimum=0)
    if not isinstance(staircase, (bool, np.bool_)):
        raise TypeError(f"{fn}: staircase must be a bool, got {staircase!r}")
    if end_value is not None:
        b.real_arg(fn, "end_value", end_value)
    base = decay_rate if decay_rate is not None else gamma

    def schedule(step):
        t = b.steps(step) - begin
        p = b.as_float(b.floordiv(jnp.maximum(t, 0), k)) if staircase else b.as_float(jnp.maximum(t, 0)) / k
        if rate is not None:
            value = b.f32(init_value) * jnp.exp(-b.f32(rate) * p)
            decaying = b.f32(rate) >= 0
        else:
            value = b.f32(init_value) * jnp.power(b.f32(base), p)
            decaying = b.f32(base) < 1
        if end_value is not None:
            end = b.f32(end_value)
            value = jnp.where(decaying, jnp.maximum(value, end), jnp.minimum(value, end))
        return value

    return b.jitted(schedule)


def polynomial_decay(init_value: Any, end_value: Any, power: Any, decay_steps: int) -> b.Schedule:
    r"""Polynomial decay, held at ``end_value`` after ``T`` steps.

    .. math::
      \eta_t = \eta_{end} + (\eta_0 - \eta_{end})
               \left(1 - \frac{\min(t, T)}{T}\right)^p

    Same values as ``optax.polynomial_schedule(init_value, end_value, power, T)``.

    Args:
      init_value: :math:`\eta_0`.
      end_value: :math:`\eta_{end}`.
      power: :math:`p > 0`.
      decay_steps: :math:`T`, a positive integer.

    Returns:
      A schedule ``step -> float32``.
    """
    fn = "polynomial_decay"
    b.real_arg(fn, "init_value", init_value)
    b.real_arg(fn, "end_value", end_value)
    b.real_arg(fn, "power", power, low=0.0, low_open=True)
    T = b.int_arg(fn, "decay_steps", decay_steps)

    def schedule(step):
        # (T - t) / T rather than 1 - t / T: XLA may rewrite the division as a
        # multiply by 1/T, and a -1e-8 remainder raised to a fractional power is NaN.
        frac = jnp.maximum(T - b.as_float(b.steps(step)), 0.0) / T
        init, end = b.f32(init_value), b.f32(end_value)
        return end + (init - end) * jnp.power(frac, b.f32(power))

    return b.jitted(schedule)


def cosine_decay(init_value: Any, decay_steps: int, min_value: Any = 0.0, *, increasing: bool = False) -> b.Schedule:
    r"""Cosine annealing (Loshchilov & Hutter, 2017), held at ``min_value`` after ``T`` steps.

    .. math::
      \eta_t = \eta_{min} + \tfrac12 (\eta_0 - \eta_{min})
               \left(1 + \cos \frac{\pi \min(t, T)}{T}\right)

    Same values as ``optax.cosine_decay_schedule(init_value, T,
    alpha=min_value / init_value)`` and PyTorch's ``CosineAnnealingLR`` for
    ``t <= T`` (PyTorch keeps following the cosine back up after ``T``; we hold).

    References:
      Loshchilov & Hutter, `SGDR: Stochastic Gradient Descent with Warm Restarts
      <https://arxiv.org/abs/1608.03983>`_, ICLR 2017.

    Args:
      init_value: :math:`\eta_0`.
      decay_steps: :math:`T`, a positive integer.
      min_value: :math:`\eta_{min}`, the absolute final value (Optax's ``alpha`` is a fraction:
        see :func:`cosine_decay_schedule`). Above ``init_value`` it is an error unless ``increasing``.
      increasing: allow ``min_value > init_value`` (a rising half cosine).

    Returns:
      A schedule ``step -> float32``.
    """
    fn = "cosine_decay"
    b.real_arg(fn, "init_value", init_value)
    T = b.int_arg(fn, "decay_steps", decay_steps)
    b.real_arg(fn, "min_value", min_value)
    b.decay_floor_arg(fn, "init_value", init_value, "min_value", min_value, increasing)
    T = float(T)  # float math: a step count past int32 would overflow a jnp int operand

    def schedule(step):
        t = jnp.minimum(b.as_float(b.steps(step)), T)
        lo = b.f32(min_value)
        return lo + 0.5 * (b.f32(init_value) - lo) * (1.0 + jnp.cos(jnp.pi * t / T))

    return b.jitted(schedule)


# Cycle starts are tabulated up to the largest int32 step; past that a cycle
# simply continues (steps are int32 in Optax's counters).
_MAX_STEP = 2**31 - 1


def cosine_with_restarts(
    init_value: Any,
    first_period: int,
    period_mult: int = 1,
    min_value: Any = 0.0,
    decay_factor: Any = 1.0,
) -> b.Schedule:
    r"""SGDR: cosine annealing with warm restarts.

    Cycle :math:`i` lasts :math:`T_i = T_0 m^i` steps and starts at
    :math:`S_i = \sum_{j<i} T_j`; inside it, with :math:`t_c = t - S_i`,

    .. math::
      \eta_t = \eta_{min} + \tfrac12 (d^i \eta_0 - \eta_{min})
               \left(1 + \cos \frac{\pi t_c}{T_i}\right)

    With ``decay_factor`` :math:`d = 1` this is PyTorch's
    ``CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)``; with ``d != 1`` only
    the peak of each cycle is scaled, ``min_value`` stays fixed. Restarts go on
    forever (``optax.sgdr_schedule`` takes an explicit finite list of cycles
    and matches this one on those cycles).

    References:
      Loshchilov & Hutter, `SGDR: Stochastic Gradient Descent with Warm Restarts
      <https://arxiv.org/abs/1608.03983>`_, ICLR 2017.

    Args:
      init_value: peak of the first cycle, :math:`\eta_0`.
      first_period: :math:`T_0`, a positive integer.
      period_mult: :math:`m`, an integer ``>= 1`` (as in PyTorch).
      min_value: :math:`\eta_{min}`.
      decay_factor: :math:`d > 0`, peak multiplier per restart.

    Returns:
      A schedule ``step -> float32``.
    """
    fn = "cosine_with_restarts"
    b.real_arg(fn, "init_value", init_value)
    T0 = b.int_arg(fn, "first_period", first_period)
    m = b.int_arg(fn, "period_mult", period_mult)
    b.real_arg(fn, "min_value", min_value)
    b.real_arg(fn, "decay_factor", decay_factor, low=0.0, low_open=True)

    if m > 1:
        starts, periods = [0], [T0]
        while starts[-1] + periods[-1] <= _MAX_STEP:
            starts.append(starts[-1] + periods[-1])
            periods.append(periods[-1] * m)
        starts_np = np.asarray(starts, np.int64)
        periods_np = np.asarray(periods, np.float32)

    def schedule(step):
        t = b.steps(step)
        if m == 1:
            cycle = b.floordiv(t, T0)
            t_cur = b.as_float(t - cycle * T0)
            period = jnp.float32(T0)
        else:
            dtype = t.dtype if jnp.issubdtype(t.dtype, jnp.integer) else jnp.float32
            starts_arr = jnp.asarray(starts_np, dtype)
            cycle = jnp.sum(t[..., None] >= starts_arr[1:], axis=-1)
            t_cur = b.as_float(t - starts_arr[cycle])
            period = jnp.asarray(periods_np)[cycle]
        lo = b.f32(min_value)
        peak = b.f32(init_value) * jnp.power(b.f32(decay_factor), b.as_float(cycle))
        t_cur = jnp.minimum(t_cur, period)
        return lo + 0.5 * (peak - lo) * (1.0 + jnp.cos(jnp.pi * t_cur / period))

    return b.jitted(schedule)
