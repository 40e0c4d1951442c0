"""What optax_ext needs from its dependencies that they do not export publicly, in one place.

Every item here leans on something a dependency may change without notice; tests/test_compat.py
checks each one and fails with a message naming the item when it does. Tested with optax 0.2.8
(flax 0.12.8, jax 0.10.2).

Items (all Optax state classes; no import of `optax._src` or any other private module):

- `ScaleByRmsWithCountState(count, nu)`: the state of `optax.scale_by_rms(bias_correction=True)`.
- `ScaleByRStdDevWithCountState(count, mu, nu)`: the state of
  `optax.scale_by_stddev(bias_correction=True)`.
- `WeightDecaySchedule(count)`: the state of `optax.add_decayed_weights(schedule)` with a
  callable (scheduled) weight decay.
- `ScaleByOptimisticGradientState(is_initial_step, previous_gradient)`: the state of
  `optax.scale_by_optimistic_gradient()`.

Why: optax_ext's transformations return Optax's own state classes (same class, fields and order),
so a state is interchangeable with Optax's (`isinstance`, `optax.tree.get(state, "nu")`,
checkpoints restored into either library). Optax defines these in private modules
(`optax._src.transform`, `optax.transforms._adding`) and exports none of them, so each is taken
from the public transformation that makes it: the type of its `init` output, traced with
`jax.eval_shape` (no device work at import time). Should Optax return another class or other
fields, a local NamedTuple with the tested layout stands in, so optax_ext keeps working with the
same state layout (then no longer Optax's class), and tests/test_compat.py fails.

Not here, because a public API does the job: the float-state classes without a count
(`optax.ScaleByRmsState`, `optax.ScaleByRStdDevState`), flax's `first_from` and dtype promotion
(plain Python and `jnp.result_type` in `optax_ext.nn`), and the manual-axis annotation of a Pallas
output (`jax.sharding.ManualAxisType`, `jax.ShapeDtypeStruct(manual_axis_type=...)`,
`jax.typeof(x).manual_axis_type`, in `optax_ext.kernels.blocks`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

__all__ = ["ScaleByRStdDevWithCountState", "ScaleByRmsWithCountState", "WeightDecaySchedule"]


def _state_class(name: str, make, fields: tuple[str, ...]) -> type:
    """The class of `make().init({})` if it is a NamedTuple with `fields`, else a local NamedTuple
    `name` with those fields (the layout tested)."""
    try:
        cls = type(jax.eval_shape(make().init, {}))
    except (TypeError, ValueError, AttributeError):  # pragma: no cover - the transformation changed
        cls = None
    if getattr(cls, "_fields", None) == fields:
        return cls
    return NamedTuple(name, [(f, Any) for f in fields])  # pragma: no cover - Optax changed


ScaleByRmsWithCountState = _state_class(
    "ScaleByRmsWithCountState", lambda: optax.scale_by_rms(bias_correction=True), ("count", "nu")
)
ScaleByRStdDevWithCountState = _state_class(
    "ScaleByRStdDevWithCountState", lambda: optax.scale_by_stddev(bias_correction=True), ("count", "mu", "nu")
)
WeightDecaySchedule = _state_class(
    "WeightDecaySchedule", lambda: optax.add_decayed_weights(lambda count: 0.0), ("count",)
)
ScaleByOptimisticGradientState = _state_class(
    "ScaleByOptimisticGradientState",
    lambda: optax.scale_by_optimistic_gradient(),
    ("is_initial_step", "previous_gradient"),
)
