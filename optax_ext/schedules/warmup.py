"""Warm-up: linear warm-up of any schedule (Goyal et al., 2017), warm-up +
cosine, and the Transformer's inverse square-root schedule."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_ext.schedules import base as b
from optax_ext.schedules.decay import constant, cosine_decay


def linear_warmup(
    schedule_or_value: b.Schedule | Any,
    warmup_steps: int,
    init_value: Any = 0.0,
) -> b.Schedule:
    r"""Linear warm-up to a target, then the wrapped schedule (Goyal et al., 2017).

    .. math::
      \eta_t = \begin{cases}
        \eta_{init} + (\eta_{target} - \eta_{init})\, t / T_w & 0 \le t < T_w \\
        S(t - T_w) & t \ge T_w
      \end{cases}, \qquad \eta_{target} = S(0)

    The common form :math:`\eta_t = \eta\, t / T_w` is the case :math:`\eta_{init} = 0`; at :math:`t = T_w`
    both branches equal :math:`S(0)`. The wrapped schedule is shifted by the
    warm-up length, so it starts its own count when the ramp ends (as
    ``optax.join_schedules`` does).

    References:
      Goyal et al., `Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour
      <https://arxiv.org/abs/1706.02677>`_, 2017.

    Args:
      schedule_or_value: a schedule :math:`S` (any callable ``step -> value``),
        or a number for a constant target.
      warmup_steps: :math:`T_w`, an integer ``>= 0`` (0: no warm-up, ``S``
        itself).
      init_value: value at ``t = 0``.

    Returns:
      A schedule ``step -> float32``.
    """
    fn = "linear_warmup"
    if callable(schedule_or_value):
        target = schedule_or_value
    else:
        b.real_arg(fn, "schedule_or_value", schedule_or_value)
        target = constant(schedule_or_value)
    w = b.int_arg(fn, "warmup_steps", warmup_steps, minimum=0)
    b.real_arg(fn, "init_value", init_value)

    def schedule(step):
        t = b.steps(step)
        after = b.like_steps(target(jnp.maximum(t - w, 0)), t)
        if w == 0:
            return after
        peak = b.like_steps(target(jnp.zeros_like(t)), t)
        init = b.f32(init_value)
        ramp = init + (peak - init) * (b.as_float(t) / w)
        return jnp.where(t < w, ramp, after)

    return b.jitted(schedule)


def warmup_cosine(
    peak_value: Any,
    warmup_steps: int,
    decay_steps: int,
    init_value: Any = 0.0,
    end_value: Any = 0.0,
    *,
    increasing: bool = False,
) -> b.Schedule:
    r"""Linear warm-up to ``peak_value``, then cosine decay to ``end_value``.

    ``linear_warmup(cosine_decay(peak_value, decay_steps - warmup_steps,
    end_value), warmup_steps, init_value)``:

    .. math::
      \eta_t = \begin{cases}
        \eta_{init} + (\eta_{peak} - \eta_{init})\, t / T_w & t < T_w \\
        \eta_{end} + \tfrac12 (\eta_{peak} - \eta_{end})
          \left(1 + \cos \frac{\pi \min(t - T_w,\, T - T_w)}{T - T_w}\right)
          & t \ge T_w
      \end{cases}

    ``decay_steps`` :math:`T` is the whole length including the warm-up, as in
    ``optax.warmup_cosine_decay_schedule(init_value, peak_value, warmup_steps,
    decay_steps, end_value)``, whose values this matches.

    References:
      Loshchilov & Hutter, `SGDR <https://arxiv.org/abs/1608.03983>`_, 2017;
      Goyal et al., `Accurate, Large Minibatch SGD
      <https://arxiv.org/abs/1706.02677>`_, 2017.

    Args:
      peak_value: :math:`\eta_{peak}`, reached at ``t = warmup_steps``.
      warmup_steps: :math:`T_w`, an integer ``>= 0``.
      decay_steps: :math:`T > T_w`, total length of warm-up plus decay.
      init_value: :math:`\eta_{init}`, value at ``t = 0``.
      end_value: :math:`\eta_{end}`, held from ``t = T`` on; above ``peak_value`` it is an error
        unless ``increasing``.
      increasing: allow ``end_value > peak_value``.

    Returns:
      A schedule ``step -> float32``.
    """
    fn = "warmup_cosine"
    w = b.int_arg(fn, "warmup_steps", warmup_steps, minimum=0)
    T = b.int_arg(fn, "decay_steps", decay_steps)
    if T <= w:
        raise ValueError(
            f"{fn}: decay_steps (total length, warm-up included) must exceed"
            f" warmup_steps={w}, got decay_steps={decay_steps!r}"
        )
    b.real_arg(fn, "peak_value", peak_value)
    b.real_arg(fn, "end_value", end_value)
    b.decay_floor_arg(fn, "peak_value", peak_value, "end_value", end_value, increasing)
    return linear_warmup(cosine_decay(peak_value, T - w, end_value, increasing=True), w, init_value)


def inverse_sqrt(peak_value: Any, warmup_steps: int, init_value: Any = 0.0) -> b.Schedule:
    r"""Linear warm-up then inverse square-root decay (Transformer / fairseq).

    .. math::
      \eta_t = \begin{cases}
        \eta_{init} + (\eta_{peak} - \eta_{init})\, t / T_w & t < T_w \\
        \eta_{peak} \sqrt{T_w / t} & t \ge T_w
      \end{cases}

    Continuous at :math:`t = T_w` (value :math:`\eta_{peak}`); this is fairseq's
    ``inverse_sqrt`` scheduler. For :func:`noam`'s ``d_model ** -0.5`` form,
    ``peak_value = (d_model * warmup_steps) ** -0.5``.

    References:
      Vaswani et al., `Attention Is All You Need
      <https://arxiv.org/abs/1706.03762>`_, NeurIPS 2017, section 5.3.

    Args:
      peak_value: :math:`\eta_{peak}`, reached at ``t = warmup_steps``.
      warmup_steps: :math:`T_w`, a positive integer.
      init_value: :math:`\eta_{init}`, value at ``t = 0``.

    Returns:
      A schedule ``step -> float32``.
    """
    fn = "inverse_sqrt"
    b.real_arg(fn, "peak_value", peak_value)
    w = b.int_arg(fn, "warmup_steps", warmup_steps)
    b.real_arg(fn, "init_value", init_value)

    def schedule(step):
        t = b.as_float(b.steps(step))
        peak, init = b.f32(peak_value), b.f32(init_value)
        ramp = init + (peak - init) * (t / w)
        # max() keeps the unselected branch finite at t = 0.
        decay = peak * jnp.sqrt(w / jnp.maximum(t, w))
        return jnp.where(t < w, ramp, decay)

    return b.jitted(schedule)


def noam(d_model: int, warmup_steps: int, scale: Any = 1.0) -> b.Schedule:
    r"""The Transformer's schedule in its ``d_model ** -0.5`` form.

    .. math::
      \eta_t = s\, d_{model}^{-1/2} \min\!\left(n^{-1/2},\ n\, T_w^{-3/2}\right),
      \qquad n = t + 1

    Vaswani et al. count ``step_num`` from 1 and Optax counts from 0, hence
    :math:`n = t + 1`: the first update uses ``step_num = 1`` and the peak
    :math:`s (d_{model} T_w)^{-1/2}` is at :math:`t = T_w - 1`. Equals
    ``inverse_sqrt(s * (d_model * warmup_steps) ** -0.5, warmup_steps)(t + 1)``.

    References:
      Vaswani et al., `Attention Is All You Need
      <https://arxiv.org/abs/1706.03762>`_, NeurIPS 2017, section 5.3.

    Args:
      d_model: model width, a positive integer.
      warmup_steps: :math:`T_w`, a positive integer.
      scale: :math:`s`, an overall factor (the annotated Transformer's
        ``factor``).

    Returns:
      A schedule ``step -> float32``.
    """
    fn = "noam"
    d = b.int_arg(fn, "d_model", d_model)
    w = b.int_arg(fn, "warmup_steps", warmup_steps)
    b.real_arg(fn, "scale", scale)

    def schedule(step):
        n = b.as_float(b.steps(step)) + 1.0
        return b.f32(scale) * d**-0.5 * jnp.minimum(jax.lax.rsqrt(n), n * w**-1.5)

    return b.jitted(schedule)
