"""Cyclical schedules with PyTorch semantics: CLR (``CyclicLR``) and 1cycle
(``OneCycleLR``), each with its inverse momentum schedule."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_ext.schedules import base as b

_CLR_MODES = ("triangular", "triangular2", "exp_range")
_ANNEALS = ("cos", "linear")


def _clr_checks(fn, step_size_up, step_size_down, mode, gamma):
    up = b.int_arg(fn, "step_size_up", step_size_up)
    down = up if step_size_down is None else b.int_arg(fn, "step_size_down", step_size_down)
    b.choice_arg(fn, "mode", mode, _CLR_MODES)
    b.real_arg(fn, "gamma", gamma, low=0.0, low_open=True)
    return up, down


def _clr_height(t: jax.Array, up: int, down: int, mode: str, gamma: Any) -> jax.Array:
    """Fraction of the amplitude reached at step ``t``: triangle x amplitude scale.

    PyTorch's ``cycle = floor(1 + t/(u+d))`` and ``x = 1 + t/(u+d) - cycle``,
    written with the position ``r = t mod (u+d)`` inside the cycle so that
    integer steps stay exact: ``x <= u/(u+d)`` iff ``r <= u``.
    """
    total = up + down
    cycle0 = b.floordiv(t, total)  # cycle - 1
    r = b.as_float(t - cycle0 * total)
    tri = jnp.where(r <= up, r / up, (total - r) / down)
    if mode == "triangular":
        scale = 1.0
    elif mode == "triangular2":
        scale = jnp.power(0.5, b.as_float(cycle0))  # 1 / 2**(cycle - 1)
    else:  # exp_range scales by iteration, not by cycle
        scale = jnp.power(b.f32(gamma), b.as_float(t))
    return tri * scale


def cyclical(
    base_value: Any,
    max_value: Any,
    step_size_up: int,
    step_size_down: int | None = None,
    mode: str = "triangular",
    gamma: Any = 1.0,
) -> b.Schedule:
    r"""Cyclical learning rate (CLR) with PyTorch ``CyclicLR`` semantics.

    With :math:`u, d` the up/down lengths, :math:`c = \lfloor t/(u+d) \rfloor`
    (PyTorch's ``cycle - 1``) and :math:`r = t - c(u+d)`:

    .. math::
      \eta_t = \eta_{base} + (\eta_{max} - \eta_{base})\, h(r)\, s(t), \qquad
      h(r) = \begin{cases} r/u & r \le u \\ (u+d-r)/d & r > u \end{cases}

    with :math:`s = 1` (``"triangular"``), :math:`s = 2^{-c}`
    (``"triangular2"``), :math:`s = \gamma^t` (``"exp_range"``). Step ``t`` here
    is PyTorch's ``last_epoch`` (0 before the first ``scheduler.step()``).
    There is no Optax equivalent. Unlike PyTorch, ``max_value < base_value`` is
    rejected.

    References:
      Smith, `Cyclical Learning Rates for Training Neural Networks
      <https://arxiv.org/abs/1506.01186>`_, WACV 2017.

    Args:
      base_value: lower bound :math:`\eta_{base}` (the value at ``t = 0``).
      max_value: upper bound :math:`\eta_{max} \ge \eta_{base}`.
      step_size_up: :math:`u`, positive integer: steps from base to max.
      step_size_down: :math:`d`, positive integer (default: ``step_size_up``).
      mode: ``"triangular"``, ``"triangular2"`` or ``"exp_range"``.
      gamma: ``> 0``, base of the ``"exp_range"`` amplitude decay.

    Returns:
      A schedule ``step -> float32``.
    """
    fn = "cyclical"
    b.real_arg(fn, "base_value", base_value)
    b.real_arg(fn, "max_value", max_value)
    b.ordered_arg(fn, "base_value", base_value, "max_value", max_value)
    up, down = _clr_checks(fn, step_size_up, step_size_down, mode, gamma)

    def schedule(step):
        h = _clr_height(b.steps(step), up, down, mode, gamma)
        lo = b.f32(base_value)
        return lo + (b.f32(max_value) - lo) * h

    return b.jitted(schedule)


def cyclical_momentum(
    step_size_up: int,
    step_size_down: int | None = None,
    base_momentum: Any = 0.8,
    max_momentum: Any = 0.9,
    mode: str = "triangular",
    gamma: Any = 1.0,
) -> b.Schedule:
    r"""The momentum that ``CyclicLR(cycle_momentum=True)`` pairs with :func:`cyclical`.

    Cycled inversely to the learning rate, with the same :math:`h, s` as
    :func:`cyclical`:

    .. math::
      \beta_t = \beta_{max} - (\beta_{max} - \beta_{base})\, h(r)\, s(t)

    so it is ``max_momentum`` where the learning rate is at its base and
    ``base_momentum`` at its peak. Use it as SGD's ``momentum`` or Adam's ``b1``
    (e.g. through ``optax.inject_hyperparams``). Use the same ``step_size_up``,
    ``step_size_down``, ``mode`` and ``gamma`` as the learning-rate schedule.

    References:
      Smith, `A disciplined approach to neural network hyper-parameters: Part 1
      <https://arxiv.org/abs/1803.09820>`_, 2018.

    Args:
      step_size_up: positive integer, as in :func:`cyclical`.
      step_size_down: positive integer (default: ``step_size_up``).
      base_momentum: lower bound :math:`\beta_{base}` (PyTorch's default 0.8).
      max_momentum: upper bound :math:`\beta_{max} \ge \beta_{base}` (0.9).
      mode: ``"triangular"``, ``"triangular2"`` or ``"exp_range"``.
      gamma: ``> 0``, base of the ``"exp_range"`` amplitude decay.

    Returns:
      A schedule ``step -> float32``.
    """
    fn = "cyclical_momentum"
    b.real_arg(fn, "base_momentum", base_momentum)
    b.real_arg(fn, "max_momentum", max_momentum)
    b.ordered_arg(fn, "base_momentum", base_momentum, "max_momentum", max_momentum)
    up, down = _clr_checks(fn, step_size_up, step_size_down, mode, gamma)

    def schedule(step):
        h = _clr_height(b.steps(step), up, down, mode, gamma)
        hi = b.f32(max_momentum)
        return hi - (hi - b.f32(base_momentum)) * h

    return b.jitted(schedule)


def _anneal(kind: str, start, end, pct):
    if kind == "cos":
        return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * pct) + 1.0)
    return (end - start) * pct + start


def _one_cycle_ends(fn, total_steps, pct_start, three_phase) -> tuple[int, tuple[float, ...]]:
    """PyTorch's phase end steps, checked to be strictly increasing."""
    T = b.int_arg(fn, "total_steps", total_steps)
    pct = b.real_arg(fn, "pct_start", pct_start, low=0.0, low_open=True, high=1.0, high_open=True)
    if not isinstance(three_phase, bool):
        raise TypeError(f"{fn}: three_phase must be a bool, got {three_phase!r}")
    if pct is None:
        raise ValueError(f"{fn}: pct_start must be a concrete number, got a traced value")
    if three_phase:
        ends = (float(pct * T) - 1, float(2 * pct * T) - 2, float(T - 1))
    else:
        ends = (float(pct * T) - 1, float(T - 1))
    starts = (0.0,) + ends[:-1]
    for i, (s, e) in enumerate(zip(starts, ends)):
        if not e > s:
            raise ValueError(
                f"{fn}: phase {i + 1} of the cycle would be empty (ends at step {e:g},"
                f" after starting at {s:g}); got total_steps={total_steps!r},"
                f" pct_start={pct_start!r}, three_phase={three_phase!r}. Need"
                " pct_start * total_steps > 1 and a later phase of positive length."
            )
    return T, ends


def _one_cycle(T: int, ends, values_fn, anneal: str) -> b.Schedule:
    """Piecewise anneal between ``values_fn()`` at phase ends, PyTorch's ``get_lr``."""

    def schedule(step):
        # PyTorch raises past total_steps; we hold the final value from T - 1 on.
        t = jnp.minimum(b.as_float(b.steps(step)), float(T - 1))
        values = values_fn()
        start = 0.0
        pieces = []
        for i, end in enumerate(ends):
            pct = (t - start) / (end - start)
            v0, v1 = (b.f32(v) for v in values[i])
            pieces.append((end, _anneal(anneal, v0, v1, pct)))
            start = end
        # PyTorch takes the first phase with t <= end, else the last one.
        out = pieces[-1][1]
        for end, value in reversed(pieces[:-1]):
            out = jnp.where(t <= end, value, out)
        return out

    return b.jitted(schedule)


def one_cycle(
    max_value: Any,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: Any = 25.0,
    final_div_factor: Any = 1e4,
    anneal: str = "cos",
    three_phase: bool = False,
) -> b.Schedule:
    r"""The 1cycle policy with PyTorch ``OneCycleLR`` semantics.

    With :math:`\eta_{init} = \eta_{max}/\text{div}` and
    :math:`\eta_{min} = \eta_{init}/\text{final\_div}`, the value is annealed
    (``"cos"``: :math:`a_1 + \frac{a_0 - a_1}{2}(1 + \cos \pi p)`, ``"linear"``:
    :math:`a_0 + (a_1 - a_0)p`) through phases ending at PyTorch's steps

    * two phases: :math:`\eta_{init} \to \eta_{max}` until
      :math:`e_1 = p_s T - 1`, then :math:`\eta_{max} \to \eta_{min}` until
      :math:`T - 1`;
    * ``three_phase``: :math:`\eta_{init} \to \eta_{max}` until :math:`e_1`,
      :math:`\eta_{max} \to \eta_{init}` until :math:`2 p_s T - 2`, then
      :math:`\eta_{init} \to \eta_{min}` until :math:`T - 1`.

    Step ``t >= T - 1`` holds :math:`\eta_{min}` (PyTorch raises past ``T``).
    Differs from ``optax.cosine_onecycle_schedule`` /
    ``linear_onecycle_schedule``, whose phases end at ``int(p_s T)`` and ``T``.

    References:
      Smith & Topin, `Super-Convergence: Very Fast Training of Neural Networks
      Using Large Learning Rates <https://arxiv.org/abs/1708.07120>`_, 2017.

    Args:
      max_value: peak value :math:`\eta_{max}`.
      total_steps: :math:`T`, a positive integer.
      pct_start: :math:`p_s \in (0, 1)`, fraction of the cycle spent rising.
      div_factor: ``> 0``; :math:`\eta_{init} = \eta_{max}/\text{div}`.
      final_div_factor: ``> 0``; :math:`\eta_{min} = \eta_{init}/\text{final\_div}`.
      anneal: ``"cos"`` or ``"linear"``.
      three_phase: use the paper's symmetric three-phase variant.

    Returns:
      A schedule ``step -> float32``.
    """
    fn = "one_cycle"
    b.real_arg(fn, "max_value", max_value)
    b.real_arg(fn, "div_factor", div_factor, low=0.0, low_open=True)
    b.real_arg(fn, "final_div_factor", final_div_factor, low=0.0, low_open=True)
    b.choice_arg(fn, "anneal", anneal, _ANNEALS)
    T, ends = _one_cycle_ends(fn, total_steps, pct_start, three_phase)

    def values():
        peak = b.f32(max_value)
        init = peak / b.f32(div_factor)
        low = init / b.f32(final_div_factor)
        if three_phase:
            return ((init, peak), (peak, init), (init, low))
        return ((init, peak), (peak, low))

    return _one_cycle(T, ends, values, anneal)


def one_cycle_momentum(
    total_steps: int,
    base_momentum: Any = 0.85,
    max_momentum: Any = 0.95,
    pct_start: float = 0.3,
    anneal: str = "cos",
    three_phase: bool = False,
) -> b.Schedule:
    r"""The momentum that ``OneCycleLR(cycle_momentum=True)`` pairs with :func:`one_cycle`.

    Same phases and anneal as :func:`one_cycle`, inverse to the learning rate:
    :math:`\beta_{max} \to \beta_{base}` while the learning rate rises, then
    :math:`\beta_{base} \to \beta_{max}`; with ``three_phase`` the last phase
    holds :math:`\beta_{max}`. Use it as SGD's ``momentum`` or Adam's ``b1``
    (e.g. through ``optax.inject_hyperparams``), with the same ``total_steps``,
    ``pct_start``, ``anneal`` and ``three_phase`` as the learning rate.

    References:
      Smith, `A disciplined approach to neural network hyper-parameters: Part 1
      <https://arxiv.org/abs/1803.09820>`_, 2018.

    Args:
      total_steps: :math:`T`, a positive integer.
      base_momentum: :math:`\beta_{base}` (PyTorch's default 0.85).
      max_momentum: :math:`\beta_{max} \ge \beta_{base}` (0.95).
      pct_start: :math:`p_s \in (0, 1)`.
      anneal: ``"cos"`` or ``"linear"``.
      three_phase: the three-phase variant.

    Returns:
      A schedule ``step -> float32``.
    """
    fn = "one_cycle_momentum"
    b.real_arg(fn, "base_momentum", base_momentum)
    b.real_arg(fn, "max_momentum", max_momentum)
    b.ordered_arg(fn, "base_momentum", base_momentum, "max_momentum", max_momentum)
    b.choice_arg(fn, "anneal", anneal, _ANNEALS)
    T, ends = _one_cycle_ends(fn, total_steps, pct_start, three_phase)
    lo, hi = base_momentum, max_momentum
    if three_phase:
        values = ((hi, lo), (lo, hi), (hi, hi))
    else:
        values = ((hi, lo), (lo, hi))
    return _one_cycle(T, ends, lambda: values, anneal)
