"""Schedule-Free: interpolation and averaging instead of momentum and a decaying schedule, fused.

Same names, arguments and state as `optax.contrib.schedule_free` and its shortcuts
(`optax.contrib.ScheduleFreeState(b1, weight_sum, step_count, max_lr, base_optimizer_state, z)`).

The y/z/x interpolation is per element with step-wide scalars (the averaging weight :math:`c_t`),
so it is a `Rule` that runs *after* the base optimizer's rules in the same fused pass: gradients,
the base's moments, z and the parameters are each read and written once. How: the base
optimizer's per-element parts (its atoms, when it is one of ours) are re-rooted under a private
two-part view of the state, `(base_optimizer_state, the schedule-free fields)`, whose second part
is a NamedTuple that the schedule-free `Rule` owns (its slot `z`, its scalars and step count);
`update` converts Optax's `ScheduleFreeState` to that view and back around one call of the fused
executor. An Optax (opaque) base runs through its own `update`, followed by the fused rule.

The view is internal, so a `schedule_free` transformation is opaque to an enclosing
`optax_ext.chain`: it fuses inside, not with its neighbours (in `chain(clip_by_global_norm(1.0),
schedule_free(...))` the clip is a pass of its own; put it inside: `schedule_free(chain(clip, base))`).
Lifting that needs `fusion` to let a rule at a state's root own only some of its fields (set back
with `_replace`, so that the base's new state under `base_optimizer_state` is kept).
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import ScheduleFreeState

from optax_ext import _validate as check
from optax_ext import fusion
from optax_ext.fusion import FusableTransformation, Rule, chain
from optax_ext.transforms import add_decayed_weights, scale_by_learning_rate, scale_by_rms
from optax_ext.transforms._common import increment
from optax_ext.tree_checks import tree_difference

__all__ = [
    "schedule_free",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "schedule_free_sgd",
]


# ------------------------------------------------------------------------------------ helpers


def lowest_dtype(params):
    """The lowest-precision dtype among the params' leaves (Optax's `tree.dtype(params, "lowest")`),
    also for `jax.ShapeDtypeStruct` trees: the dtype of schedule-free's and Prodigy's scalar state."""
    dtypes = [getattr(x, "dtype", None) or jnp.result_type(x) for x in jax.tree.leaves(params)]
    return optax.tree.dtype([np.zeros((), d) for d in dtypes], "lowest")


def copy_params(params, dtype=None):
    """A copy of the params in buffers of their own (optionally cast): a state leaf that is the params'
    own buffer could not be donated together with the params."""
    return jax.tree.map(lambda p: jnp.array(p, dtype=dtype, copy=True), params)


# ------------------------------------------------------------------------------ schedule_free


class _ScheduleFreeScalars(NamedTuple):
    ck: Any  # the averaging weight c_t = w_t / sum w
    one_minus_ck: Any
    b1: Any
    one_minus_b1: Any


def _positive_fraction(name, b1):
    b1 = check.unit_interval(name, "b1", b1)
    v = check._concrete(b1)
    if v is not None and v == 0.0:
        raise ValueError(f"{name}: b1 must be in (0, 1) (the interpolation divides by it), got {b1!r}.")
    return b1


def _check_state_dtype(name, state_dtype):
    if state_dtype is None:
        return None
    try:
        dtype = jnp.dtype(state_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"{name}: state_dtype must be None or a floating-point dtype, got {state_dtype!r}.")
    return dtype


def schedule_free(
    base_optimizer: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    weight_lr_power=2.0,
    state_dtype=None,
) -> FusableTransformation:
    r"""Make `base_optimizer` schedule-free: its updates move :math:`z`, the parameters are the
    interpolation :math:`y` of :math:`z` and the running average :math:`x`.

    With :math:`u_t` the base optimizer's update at :math:`y_t` (the parameters), :math:`\gamma_t` the
    learning rate, :math:`w_t = (\max_{s\le t}\gamma_s)^{p}` (`weight_lr_power` :math:`p`) and
    :math:`c_t = w_t / \sum_{s\le t} w_s`:

    .. math::
      z_{t+1} = z_t + u_t,\quad
      x_t = (y_t - (1-\beta_1) z_t)/\beta_1,\quad
      x_{t+1} = (1-c_t)\, x_t + c_t z_{t+1},\quad
      y_{t+1} = \beta_1 x_{t+1} + (1-\beta_1) z_{t+1}.

    Evaluate at :math:`x` (:func:`schedule_free_eval_params`). Turn the base optimizer's momentum
    off (e.g. `adam(..., b1=0)`): the interpolation replaces it. When `base_optimizer` is one of
    ours, the base's per-element math and the interpolation are one fused pass, which also fuses
    with its neighbours in an `optax_ext.chain` (`update_and_apply` writes the new parameters in
    it); an Optax base runs unfused, then the fused interpolation. `state_dtype` stores :math:`z`
    in another dtype. State: `optax.contrib.ScheduleFreeState`.

    References:
      Defazio et al., *The Road Less Scheduled*, NeurIPS 2024 (arXiv:2405.15682).
    """
    name = "schedule_free"
    if not (hasattr(base_optimizer, "init") and hasattr(base_optimizer, "update")):
        raise TypeError(
            f"{name}: base_optimizer must be a GradientTransformation (with init and update), "
            f"got {type(base_optimizer).__name__}."
        )
    if not callable(learning_rate):
        learning_rate = check.non_negative(name, "learning_rate", learning_rate)
    b1 = _positive_fraction(name, b1)
    weight_lr_power = check.finite(name, "weight_lr_power", weight_lr_power)
    state_dtype = _check_state_dtype(name, state_dtype)

    def init(params):
        dtype = lowest_dtype(params)
        return ScheduleFreeState(
            b1=jnp.asarray(b1, dtype),
            weight_sum=jnp.zeros([], dtype),
            step_count=jnp.ones([], jnp.int32),
            max_lr=jnp.zeros([], dtype),
            base_optimizer_state=base_optimizer.init(params),
            z=copy_params(params, state_dtype),
        )

    def averaging(st: ScheduleFreeState):
        """(max lr so far, new weight sum, c_t), in the state's dtype as Optax computes them."""
        lr = learning_rate
        if callable(learning_rate):
            lr = jnp.asarray(learning_rate(st.step_count), dtype=jnp.result_type(st.max_lr))
        max_lr = jnp.maximum(st.max_lr, lr)
        weight = max_lr**weight_lr_power
        total = st.weight_sum + weight
        # A NaN weight stays NaN; 0 / 0 (zero learning rate so far) is 0.
        ck = jnp.where(
            jnp.logical_or(jnp.isnan(weight), jnp.isnan(total)),
            jnp.full(jnp.shape(weight), jnp.nan),
            jnp.nan_to_num(weight / total, nan=0.0, posinf=jnp.inf),
        )
        return max_lr, total, ck

    def scalars(st, updates, params):
        _, _, ck = averaging(st)
        return _ScheduleFreeScalars(ck=ck, one_minus_ck=1.0 - ck, b1=b1, one_minus_b1=1.0 - b1)

    def element(u, y, slots, s: _ScheduleFreeScalars):
        (z,) = slots
        z_next = z + u
        if state_dtype is not None:  # as Optax: the interpolation reads z as stored
            stored = z_next.astype(state_dtype)
            # A complex z for real params holds real values: take them (casting complex to real is
            # deprecated in jax).
            z_next = (stored if jnp.iscomplexobj(u) else jnp.real(stored)).astype(u.dtype)
        x = (y - s.one_minus_b1 * z) / s.b1
        x = s.one_minus_ck * x + s.ck * z_next
        y_next = s.b1 * x + s.one_minus_b1 * z_next
        return y_next - y, (z_next,)

    def next_state(st, new_slots):
        max_lr, total, _ = averaging(st)
        return st._replace(weight_sum=total, step_count=increment(st.step_count), max_lr=max_lr, z=new_slots[0])

    # The rule holds the base optimizer's state (its field base_optimizer_state), which the base's own
    # atoms update in the same step: the rule writes back only its fields (Rule.owns). With a base of
    # ours, base and interpolation are one fused run, which also fuses with neighbours in a chain.
    rule = Rule(
        name,
        ScheduleFreeState,
        ("z",),
        scalars,
        element,
        next_state,
        needs_params=True,
        scalars_type=_ScheduleFreeScalars,
        owns=("weight_sum", "step_count", "max_lr", "z"),
    )
    inner = fusion._atoms_of(base_optimizer) or (
        fusion._Atom(None, optax.with_extra_args_support(base_optimizer).update, ()),
    )
    base_at = (ScheduleFreeState._fields.index("base_optimizer_state"),)
    atoms = (*(dataclasses.replace(a, path=base_at + a.path) for a in inner), fusion._Atom(rule, None, ()))
    return fusion._make(init, atoms)


def schedule_free_eval_params(state, params):
    r"""The parameters to evaluate a schedule-free model at: the average :math:`x = (y - (1-\beta_1) z)/\beta_1`.

    `state` is the `ScheduleFreeState` of :func:`schedule_free` (or its shortcuts), `params` the
    current parameters :math:`y`. Same as `optax.contrib.schedule_free_eval_params`.

    References:
      Defazio et al., *The Road Less Scheduled*, NeurIPS 2024 (arXiv:2405.15682).
    """
    b1 = getattr(state, "b1", None)
    z = getattr(state, "z", None)
    if b1 is None or z is None:
        raise ValueError(
            "schedule_free_eval_params: state must be the ScheduleFreeState of schedule_free "
            f"(with fields b1 and z), got {type(state).__name__}."
        )
    where = tree_difference(z, params, "state.z", "params")
    if where is not None:
        raise ValueError(f"schedule_free_eval_params: state.z and params differ in structure ({where}).")
    return jax.tree.map(lambda y, z: (y - (1.0 - b1) * z) / b1, params, z)


# ---------------------------------------------------------------------------------- shortcuts


def _warmed_up(name, learning_rate, warmup_steps):
    if warmup_steps is None:
        return learning_rate
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, np.integer)) or warmup_steps <= 0:
        raise ValueError(f"{name}: warmup_steps must be None or a positive integer, got {warmup_steps!r}.")
    from optax_ext.schedules import warmup_constant_schedule

    return warmup_constant_schedule(init_value=0, peak_value=learning_rate, warmup_steps=int(warmup_steps))


def schedule_free_sgd(
    learning_rate=1.0,
    warmup_steps=None,
    b1=0.9,
    weight_decay=None,
    weight_lr_power=2.0,
    state_dtype=None,
) -> FusableTransformation:
    r"""Schedule-free SGD: :func:`schedule_free` around plain SGD (with :math:`\lambda\theta` added to
    the gradient when `weight_decay` is given), one fused pass.

    :math:`z_{t+1} = z_t - \gamma_t (g_t + \lambda y_t)`, then the interpolation of :func:`schedule_free`;
    `warmup_steps` ramps :math:`\gamma_t` linearly from 0. Same arguments and state as
    `optax.contrib.schedule_free_sgd`.

    References:
      Defazio et al., *The Road Less Scheduled*, NeurIPS 2024 (arXiv:2405.15682).
    """
    name = "schedule_free_sgd"
    if not callable(learning_rate):
        learning_rate = check.non_negative(name, "learning_rate", learning_rate)
    learning_rate = _warmed_up(name, learning_rate, warmup_steps)
    # `optax.sgd(lr)` without momentum: chain(identity, scale_by_learning_rate(lr)), same state. The
    # identity is our fusable one (scale_by_learning_rate(None)): an Optax identity would end the
    # fused run after the weight decay, which would then be written out (in the grads' dtype).
    optimizer = chain(scale_by_learning_rate(None), scale_by_learning_rate(learning_rate))
    if weight_decay is not None:
        optimizer = chain(add_decayed_weights(weight_decay), optimizer)
    return schedule_free(optimizer, learning_rate, b1, weight_lr_power, state_dtype)


def schedule_free_adamw(
    learning_rate=0.0025,
    warmup_steps=None,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    weight_lr_power=2.0,
    state_dtype=None,
) -> FusableTransformation:
    r"""Schedule-free AdamW: :func:`schedule_free` around AdamW without momentum, one fused pass.

    :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2`,
    :math:`z_{t+1} = z_t - \gamma_t\big(g_t / (\sqrt{v_t/(1-\beta_2^t)} + \epsilon) + \lambda y_t\big)`,
    then the interpolation of :func:`schedule_free` (the base is `scale_by_rms(eps_in_sqrt=False,
    bias_correction=True)`, Adam with :math:`\beta_1 = 0` without its zero first moment, as Optax).
    Same arguments and state as `optax.contrib.schedule_free_adamw`.

    References:
      Defazio et al., *The Road Less Scheduled*, NeurIPS 2024 (arXiv:2405.15682);
      Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
    """
    name = "schedule_free_adamw"
    if not callable(learning_rate):
        learning_rate = check.non_negative(name, "learning_rate", learning_rate)
    b2 = check.unit_interval(name, "b2", b2)
    eps = check.non_negative(name, "eps", eps)
    learning_rate = _warmed_up(name, learning_rate, warmup_steps)
    optimizer = chain(
        scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True),
        add_decayed_weights(weight_decay),
        scale_by_learning_rate(learning_rate),
    )
    return schedule_free(optimizer, learning_rate, b1, weight_lr_power, state_dtype)
