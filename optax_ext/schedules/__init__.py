"""Learning-rate (and other hyperparameter) schedules.

A schedule is a pure function ``step -> value``: jit-safe, elementwise over an
array of steps (``s(jnp.arange(n))`` and ``jax.vmap(s)(jnp.arange(n))`` agree),
float32 valued, with negative steps clamped to 0. It follows Optax's
``optax.Schedule`` convention, so it can be passed wherever a transformation
takes a hyperparameter: ``optax.adamw(learning_rate=s)``, or any
hyperparameter through ``optax.inject_hyperparams`` (e.g. ``b1`` from
:func:`one_cycle_momentum`).

Each schedule's docstring gives its formula and the paper (or PyTorch scheduler) it follows.
Where Optax has the same schedule, the docstring says whether values agree;
``cyclical`` and ``one_cycle`` follow PyTorch's ``CyclicLR`` / ``OneCycleLR``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from optax_ext.schedules.base import Schedule
from optax_ext.schedules.cyclic import (
    cyclical,
    cyclical_momentum,
    one_cycle,
    one_cycle_momentum,
)
from optax_ext.schedules.decay import (
    constant,
    cosine_decay,
    cosine_with_restarts,
    exponential_decay,
    join,
    multistep_decay,
    polynomial_decay,
    step_decay,
)
from optax_ext.schedules.optax_signatures import (
    constant_schedule,
    cosine_decay_schedule,
    join_schedules,
    linear_schedule,
    piecewise_constant_schedule,
    polynomial_schedule,
    warmup_constant_schedule,
    warmup_cosine_decay_schedule,
)
from optax_ext.schedules.warmup import (
    inverse_sqrt,
    linear_warmup,
    noam,
    warmup_cosine,
)

__all__ = [
    "Schedule",
    "constant",
    "join",
    "step_decay",
    "multistep_decay",
    "exponential_decay",
    "polynomial_decay",
    "cosine_decay",
    "cosine_with_restarts",
    "cyclical",
    "cyclical_momentum",
    "one_cycle",
    "one_cycle_momentum",
    "inverse_sqrt",
    "noam",
    "linear_warmup",
    "warmup_cosine",
    # Optax's names, arguments and values (optax_ext.schedules.optax_signatures)
    "constant_schedule",
    "cosine_decay_schedule",
    "join_schedules",
    "linear_schedule",
    "piecewise_constant_schedule",
    "polynomial_schedule",
    "warmup_constant_schedule",
    "warmup_cosine_decay_schedule",
    "plot",
]


def plot(
    schedules: Mapping[str, Schedule],
    steps: Any,
    *,
    title: str | None = None,
    ylabel: str = "value",
    log_y: bool = False,
):
    """Draws several schedules on one figure, one line per schedule.

    Matplotlib is optional (the ``examples`` extra); the figure is a bare
    ``matplotlib.figure.Figure`` (no pyplot state), so it can be saved with
    ``fig.savefig`` or shown in a notebook.

    Args:
      schedules: ``{label: schedule}``, in legend order.
      steps: an int ``n`` (steps ``0 .. n-1``) or a 1-D array of steps.
      title: optional axes title.
      ylabel: y-axis label.
      log_y: logarithmic y axis (for decays spanning decades).

    Returns:
      The ``matplotlib.figure.Figure``; ``fig.axes[0].lines[i]`` is the line of
      the i-th schedule.
    """
    try:
        from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError(
            "optax_ext.schedules.plot needs matplotlib, which is an optional"
            " dependency: install the `examples` extra, pip install"
            " 'optax_ext[examples]'"
        ) from e
    if not isinstance(schedules, Mapping):
        raise TypeError(f"plot: schedules must be a dict {{label: schedule}}, got {type(schedules).__name__}")
    if not schedules:
        raise ValueError("plot: schedules must hold at least one schedule, got {}")
    for name, s in schedules.items():
        if not callable(s):
            raise TypeError(f"plot: schedules[{name!r}] must be a callable step -> value, got {s!r}")
    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        if steps <= 0:
            raise ValueError(f"plot: steps must be a positive integer or a 1-D array, got {steps!r}")
        x = np.arange(int(steps))
    else:
        x = np.asarray(steps)
        real = jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
        if x.ndim != 1 or x.size == 0 or not real:
            raise ValueError(f"plot: steps must be a positive integer or a non-empty 1-D numeric array, got {steps!r}")

    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for name, s in schedules.items():
        y = np.broadcast_to(np.asarray(s(x), np.float64), x.shape)
        ax.plot(x, y, label=str(name))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    if title is not None:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig
