"""A transformation's per-element math: `Rule`, its scalars, and the check that it is elementwise.

A `Rule` is what `optax_ext.chain` fuses: `element(g, p, slots, scalars) -> (u, new_slots)` on the
values of one element, the state fields holding its per-parameter slots, and its step-wide scalars
as a NamedTuple the rule declares (`scalars_type`). `element` is traced once when the rule is built
and must be elementwise: the kernels run it on blocks, XLA on whole leaves, and a reduction or a
gather inside it would give different answers on the two.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp

__all__ = ["ElementFn", "NoScalars", "PerLeaf", "Rule", "Scalars", "scalar"]

Scalars = tuple  # an instance of the rule's `scalars_type`, a NamedTuple
ElementFn = Callable[[jax.Array, jax.Array | None, tuple, Scalars], tuple[jax.Array, tuple]]


class PerLeaf(NamedTuple):
    """A scalar that differs per leaf (a trust ratio, a mask): a pytree shaped like the updates."""

    tree: Any


class NoScalars(NamedTuple):
    """The scalars of a rule that has none (the identity)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """The per-element math of one transformation.

    Attributes:
      name: the transformation's name, for error messages.
      state_type: the NamedTuple class (or tuple of classes) its state must be.
      slots: names of the state fields holding per-parameter arrays (e.g. ("mu", "nu")).
      scalars: `(state, updates, params) -> scalars_type(...)`: the step-wide values, each an f32
        scalar or a `PerLeaf` tree; a field left `None` is not sent to the kernel (a value this
        configuration does not use). `updates` is the input of the fused run: its structure is
        always the leaves'; its values are this rule's input only when `reads_updates` (which
        starts a run), so read them then only.
      element: `(g, p, slots, scalars) -> (u, new_slots)` on f32 values of one element; it reads
        `scalars.one_minus_b1`, names a linter checks against `scalars_type`. It must be
        elementwise (no reduction, gather, reshape, ...): the kernels run it on blocks of a leaf,
        the XLA path on the whole leaf, and only elementwise math agrees between the two. Checked
        when the rule is built, by tracing it on small vectors. A run using a primitive that the
        kernel backend cannot lower (`optax_ext.kernels.backend.CANNOT_LOWER`) runs on XLA there.
      next_state: `(state, new_slots) -> new state`, new_slots a tuple of trees (one per slot).
      reads_updates: the scalars reduce over the incoming updates (a global or per-leaf norm), so
        the rule must begin a fused run: the updates it sees must exist in memory.
      needs_params: `element` or `scalars` reads the parameters.
      readonly_slots: the slots are constants (anchors, a Fisher diagonal): the fused pass reads
        them but never writes them back; `element`'s returned slots are ignored.
      scalars_type: the NamedTuple class `scalars` returns, defined next to the rule.
      owns: the state fields the rule writes back (None: its whole state). For a rule whose state
        also holds another transformation's state, updated by that transformation in the same step
        (schedule-free learning around its base optimizer): the rule's new state replaces only
        these fields.
      next_state_reads_scalars: `next_state` is `(state, new_slots, scalars) -> new state`: a
        step-wide value computed in `scalars` is also part of the new state (Prodigy's step-size
        estimate, computed once, used by the pass and kept).
    """

    name: str
    state_type: type | tuple[type, ...]
    slots: tuple[str, ...]
    scalars: Callable[[Any, Any, Any], Scalars]
    element: ElementFn
    next_state: Callable[[Any, tuple], Any]
    reads_updates: bool = False
    needs_params: bool = False
    readonly_slots: bool = False
    scalars_type: type = NoScalars
    next_state_reads_scalars: bool = False
    owns: tuple[str, ...] | None = None

    def __post_init__(self):
        if not (
            isinstance(self.scalars_type, type)
            and issubclass(self.scalars_type, tuple)
            and hasattr(self.scalars_type, "_fields")
        ):
            raise TypeError(f"{self.name}: Rule.scalars_type must be a NamedTuple class, got {self.scalars_type!r}.")
        _check_elementwise(self)


def next_state_of(rule: Rule, state, new_slots: tuple, scalars: Scalars):
    """`rule.next_state` called with the scalars where the rule asks for them."""
    if rule.next_state_reads_scalars:
        return rule.next_state(state, new_slots, scalars)
    return rule.next_state(state, new_slots)


def scalar(x) -> jax.Array:
    """A step-wide value in the widest float JAX allows now (f64 under `jax_enable_x64`, else f32):
    f64 leaves then get f64 bias corrections; the kernels read them as f32."""
    return jnp.asarray(x, jax.dtypes.canonicalize_dtype(jnp.float64))


# --------------------------------------------------------------------------------------------
# The elementwise check of Rule.element

# Primitives that map each element to the element at the same position (plus 0-d scalars).
_ELEMENTWISE = frozenset(
    """
    abs acos acosh add and asin asinh atan atan2 atanh bessel_i0e bessel_i1e cbrt ceil clamp clz complex
    conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt
    igamma igammac imag integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not
    or polygamma population_count pow real reduce_precision rem round rsqrt select_n shift_left
    shift_right_arithmetic shift_right_logical sign sin sinh sqrt square sub tan tanh xor zeta
""".split()
)
# Calls whose body is inlined in the caller's math: checked recursively.
_CALLS = frozenset(
    {
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
        "remat",
        "checkpoint",
    }
)
_CHECKED: set = set()  # cache keys of the element functions already found elementwise


def _check_elementwise(rule: Rule) -> None:
    """Raise ValueError unless `rule.element` is elementwise.

    A reduction or a gather inside the element would silently differ between the Pallas path (one
    block of a leaf) and the XLA path (the whole leaf). The element is traced on f32 vectors of 3
    elements, with f32 0-d placeholders for its scalars, and every primitive must be in an
    allow-list (or a call of such primitives, or a broadcast of a 0-d value). Optimizers are built
    often (`optax.inject_hyperparams` builds one per step traced), so the result is cached per
    element code and closure (the flags the element reads: `nesterov`, `mode`, ...).
    """
    key = _check_key(rule)
    if key is not None and key in _CHECKED:
        return
    vec, zero_d = jax.ShapeDtypeStruct((3,), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32)
    scalars = rule.scalars_type(*(zero_d for _ in rule.scalars_type._fields))
    p = vec if rule.needs_params else None
    try:
        closed = jax.make_jaxpr(rule.element)(vec, p, (vec,) * len(rule.slots), scalars)
    except Exception as e:
        raise TypeError(
            f"{rule.name}: could not trace Rule.element on f32 vectors, with {len(rule.slots)} "
            f"slot(s) and {rule.scalars_type.__name__} scalars: {type(e).__name__}: {e}"
        ) from e
    bad = _non_elementwise(closed.jaxpr)
    if bad is not None:
        raise ValueError(f"{rule.name}: Rule.element must be elementwise (it runs blockwise in kernels); found {bad}")
    if key is not None:
        _CHECKED.add(key)


def _check_key(rule: Rule):
    """What the traced element depends on, or None (then it is not cached).

    Cached only when the element closes over plain values (flags, numbers, strings): a key holding
    other objects (a helper function made per call, an array) would rarely hit again, and would
    keep those objects alive.
    """
    fn = rule.element
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    try:
        values = tuple(c.cell_contents for c in fn.__closure__ or ()) + (fn.__defaults__ or ())
    except ValueError:  # an empty cell
        return None
    if not all(_plain(v) for v in values):
        return None
    # Types too: True == 1 == 1.0, but an element may branch on `isinstance`.
    return code, values, tuple(map(type, values)), rule.scalars_type, len(rule.slots), rule.needs_params


def _plain(x) -> bool:
    if isinstance(x, tuple):
        return all(_plain(v) for v in x)
    return x is None or type(x) in (bool, int, float, str)


def primitive_names(jaxpr) -> set[str]:
    """The names of every primitive of `jaxpr`, and of the jaxprs in its equations' parameters."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
                    names |= primitive_names(getattr(sub, "jaxpr", sub))
    return names


def _non_elementwise(jaxpr) -> str | None:
    """The name of the first primitive of `jaxpr` that is not elementwise, or None."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in _ELEMENTWISE:
            continue
        if name == "broadcast_in_dim":  # a 0-d value to the leaf's shape; not a row to a matrix
            shape = eqn.invars[0].aval.shape
            if shape == () or math.prod(shape) == math.prod(eqn.outvars[0].aval.shape):
                continue
            return name
        if name not in _CALLS:
            return name
        for v in eqn.params.values():
            if isinstance(v, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
                bad = _non_elementwise(getattr(v, "jaxpr", v))
                if bad is not None:
                    return bad
    return None
