"""Optax's schedules under Optax's names, with Optax's arguments in Optax's order and Optax's values.

Our own schedules name things differently where Optax's names mislead (``cosine_decay``'s floor is
an absolute ``min_value``; ``optax.cosine_decay_schedule``'s third argument is the *fraction*
``alpha``). Code written for Optax keeps its meaning here: ``ox.cosine_decay_schedule(1e-3, 100, 0.1)``
ends at 1e-4, as ``optax.cosine_decay_schedule`` does. Values are computed in float32 (steps clamped
at 0, as all our schedules); they equal Optax's to float32 rounding.

Where Optax silently builds a constant schedule from a meaningless argument (a non-positive
``transition_steps`` or ``decay_steps``, a negative ``transition_begin``), these raise instead,
naming the argument, as ``exponential_decay`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from optax_ext.schedules import base as b
from optax_ext.schedules.decay import constant, join

__all__ = [
    "constant_schedule",
    "cosine_decay_schedule",
    "join_schedules",
    "linear_schedule",
    "piecewise_constant_schedule",
    "polynomial_schedule",
    "warmup_constant_schedule",
    "warmup_cosine_decay_schedule",
]


def constant_schedule(value: Any) -> b.Schedule:
    r""":math:`\eta_t = \eta`, as ``optax.constant_schedule`` (our :func:`constant`)."""
    return constant(value)


def join_schedules(schedules: Sequence[b.Schedule], boundaries: Sequence[int]) -> b.Schedule:
    """``schedules[i]`` between ``boundaries[i-1]`` and ``boundaries[i]``, each restarting its count at
    its boundary, as ``optax.join_schedules`` (our :func:`join`)."""
    return join(schedules, boundaries)


def polynomial_schedule(
    init_value: Any, end_value: Any, power: Any, transition_steps: int, transition_begin: int = 0
) -> b.Schedule:
    r"""Polynomial transition from ``init_value`` to ``end_value``, as ``optax.polynomial_schedule``.

    .. math::
      \eta_t = (\eta_0 - \eta_{end}) \left(1 - \frac{c}{T}\right)^p + \eta_{end},
      \qquad c = \min(\max(t - t_0, 0), T)

    Args:
      init_value: :math:`\eta_0`.
      end_value: :math:`\eta_{end}`.
      power: :math:`p`.
      transition_steps: :math:`T`, a positive integer.
      transition_begin: :math:`t_0`, an integer ``>= 0``: steps held at ``init_value`` first.
    """
    fn = "polynomial_schedule"
    b.real_arg(fn, "init_value", init_value)
    b.real_arg(fn, "end_value", end_value)
    b.real_arg(fn, "power", power)
    # As floats: a step count past int32 (Optax's test uses 1e10) would overflow a jnp int operand.
    T = float(b.int_arg(fn, "transition_steps", transition_steps))
    t0 = float(b.int_arg(fn, "transition_begin", transition_begin, minimum=0))

    def schedule(step):
        c = jnp.clip(b.as_float(b.steps(step)) - t0, 0.0, T)
        init, end = b.f32(init_value), b.f32(end_value)
        # XLA turns `/ T` into `* (1 / T)`, so c / T is not exactly 1 at c = T (Optax then ends at
        # end + (init - end) * 6e-8 ** power, 1e-4 off for power 0.5): the ends are set exactly.
        inside = (init - end) * jnp.power((T - c) / T, b.f32(power)) + end
        return jnp.where(c <= 0, init, jnp.where(c >= T, end, inside))

    return b.jitted(schedule)


def linear_schedule(init_value: Any, end_value: Any, transition_steps: int, transition_begin: int = 0) -> b.Schedule:
    """Linear transition from ``init_value`` to ``end_value``, as ``optax.linear_schedule``
    (:func:`polynomial_schedule` with power 1)."""
    return _named("linear_schedule", polynomial_schedule, init_value, end_value, 1, transition_steps, transition_begin)


def cosine_decay_schedule(init_value: Any, decay_steps: int, alpha: Any = 0.0, exponent: Any = 1.0) -> b.Schedule:
    r"""Cosine decay to the fraction ``alpha`` of ``init_value``, as ``optax.cosine_decay_schedule``.

    .. math::
      \eta_t = \eta_0 \left((1 - \alpha) \left(\tfrac12 \left(1 + \cos \frac{\pi \min(t, T)}{T}\right)\right)^e
               + \alpha\right)

    References:
      Loshchilov & Hutter, `SGDR: Stochastic Gradient Descent with Warm Restarts
      <https://arxiv.org/abs/1608.03983>`_, ICLR 2017.

    Args:
      init_value: :math:`\eta_0`.
      decay_steps: :math:`T`, a positive integer.
      alpha: the final value as a fraction of ``init_value`` (not an absolute floor: that is our
        :func:`cosine_decay`'s ``min_value``).
      exponent: :math:`e`, the power of the cosine factor.
    """
    fn = "cosine_decay_schedule"
    b.real_arg(fn, "init_value", init_value)
    T = float(b.int_arg(fn, "decay_steps", decay_steps))  # float: may exceed int32
    b.real_arg(fn, "alpha", alpha)
    b.real_arg(fn, "exponent", exponent)

    def schedule(step):
        t = jnp.minimum(b.as_float(b.steps(step)), T)
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * t / T))
        a = b.f32(alpha)
        return b.f32(init_value) * ((1.0 - a) * jnp.power(cosine, b.f32(exponent)) + a)

    return b.jitted(schedule)


def warmup_cosine_decay_schedule(
    init_value: Any, peak_value: Any, warmup_steps: int, decay_steps: int, end_value: Any = 0.0, exponent: Any = 1.0
) -> b.Schedule:
    r"""Linear warm-up from ``init_value`` to ``peak_value``, then cosine decay to ``end_value``, as
    ``optax.warmup_cosine_decay_schedule``.

    ``decay_steps`` counts the warm-up too: the cosine runs for ``decay_steps - warmup_steps`` steps
    (its fraction is ``end_value / peak_value``, 0 for a zero peak), then holds at ``end_value``.

    References:
      Goyal et al., `Accurate, Large Minibatch SGD <https://arxiv.org/abs/1706.02677>`_, 2017;
      Loshchilov & Hutter, `SGDR <https://arxiv.org/abs/1608.03983>`_, ICLR 2017.

    Args:
      init_value: value at step 0.
      peak_value: value at the end of the warm-up.
      warmup_steps: an integer ``>= 0``.
      decay_steps: total steps of warm-up and decay, ``> warmup_steps``.
      end_value: the value held after ``decay_steps``.
      exponent: power of the cosine factor (see :func:`cosine_decay_schedule`).
    """
    fn = "warmup_cosine_decay_schedule"
    b.real_arg(fn, "init_value", init_value)
    b.real_arg(fn, "peak_value", peak_value)
    b.real_arg(fn, "end_value", end_value)
    w = b.int_arg(fn, "warmup_steps", warmup_steps, minimum=0)
    total = b.int_arg(fn, "decay_steps", decay_steps)
    if total <= w:
        raise ValueError(f"{fn}: decay_steps must be > warmup_steps (it counts the warm-up), got {total} <= {w}")
    # Optax's convention: the fraction is 0 for a zero peak (the peak may be traced).
    peak = b.f32(peak_value)
    alpha = jnp.where(peak == 0, 0.0, b.f32(end_value) / jnp.where(peak == 0, 1.0, peak))
    decay = cosine_decay_schedule(peak_value, total - w, alpha, exponent)
    return _after_warmup(init_value, peak_value, w, decay)


def warmup_constant_schedule(init_value: Any, peak_value: Any, warmup_steps: int) -> b.Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value``, then ``peak_value`` held, as
    ``optax.warmup_constant_schedule``."""
    fn = "warmup_constant_schedule"
    b.real_arg(fn, "init_value", init_value)
    b.real_arg(fn, "peak_value", peak_value)
    w = b.int_arg(fn, "warmup_steps", warmup_steps, minimum=0)
    return _after_warmup(init_value, peak_value, w, constant(peak_value))


def piecewise_constant_schedule(init_value: Any, boundaries_and_scales: Mapping[int, Any] | None = None) -> b.Schedule:
    r"""``init_value`` multiplied by every scale whose boundary the step has reached, as
    ``optax.piecewise_constant_schedule``: :math:`\eta_t = \eta_0 \prod_{b_i \le t} s_i`.

    Args:
      init_value: :math:`\eta_0`.
      boundaries_and_scales: ``{boundary step: scale}``, boundaries integers ``>= 0``, scales
        ``>= 0`` (None or empty: constant).
    """
    fn = "piecewise_constant_schedule"
    b.real_arg(fn, "init_value", init_value)
    items = dict(boundaries_and_scales or {})
    bounds = [b.int_arg(fn, f"boundaries_and_scales key {k!r}", k, minimum=0) for k in items]
    scales = list(items.values())
    for k, s in items.items():
        b.real_arg(fn, f"boundaries_and_scales[{k!r}]", s, low=0.0)
    pairs = sorted(zip(bounds, scales), key=lambda p: p[0])

    def schedule(step):
        t = b.steps(step)
        value = b.like_steps(init_value, t)
        for boundary, scale in pairs:
            value = jnp.where(t >= boundary, value * b.f32(scale), value)
        return value

    return b.jitted(schedule)


def _after_warmup(init_value, peak_value, warmup_steps: int, then: b.Schedule) -> b.Schedule:
    if warmup_steps == 0:  # Optax: no warm-up, the decay from step 0
        return then
    ramp = polynomial_schedule(init_value, peak_value, 1, warmup_steps)
    return join([ramp, then], [warmup_steps])


def _named(fn: str, factory, *args):
    """`factory(*args)` with errors naming `fn` (the public function) instead of the factory."""
    try:
        return factory(*args)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace(factory.__name__, fn, 1)) from None
