"""The fusable transformation core: per-element rules, `chain`, and the fused pass.

Every per-element transformation of optax_ext carries, beside `init`/`update`, its math as a
`Rule`: a function of one element `(g, p, slots, scalars) -> (u, new_slots)` plus how to read its
per-parameter slots (m, v, ...) and its step-wide scalars (bias corrections, learning rate, clip
factor: a NamedTuple the rule declares) from its state. `chain` composes the rules of adjacent
transformations into one rule and runs it over every leaf through
`optax_ext.kernels.elementwise.run_fused`: plain XLA per leaf on CPU, a few multi-tensor Pallas
launches on GPU (many leaves per launch), one Pallas call per leaf on TPU. Transformations without
a rule (Optax's own, Adafactor's factored moments) run through their own `update` and simply end a
fused run.

State layout is unchanged by fusion: `chain(a, b).init(params) == (a.init(params), b.init(params))`,
exactly as `optax.chain`, and each transformation keeps Optax's NamedTuple state where Optax has
the same transformation.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax

from optax_ext.kernels import elementwise as _elementwise
from optax_ext.kernels import reductions
from optax_ext.quantization import QuantizedArray, variables_inside, variables_outside
from optax_ext.rule import ElementFn, NoScalars, PerLeaf, Rule, Scalars, next_state_of, scalar
from optax_ext.tree_checks import check_trees, tree_difference

__all__ = [
    "ElementFn",
    "FusableTransformation",
    "Gate",
    "NoScalars",
    "PerLeaf",
    "Rule",
    "Scalars",
    "apply_if_finite",
    "chain",
    "fusable",
    "scalar",
    "update_and_apply",
]


@dataclasses.dataclass(frozen=True)
class Gate:
    """Skip the next `span` atoms' step unless the incoming updates are finite (`apply_if_finite`).

    The atom's state is an `optax.ApplyIfFiniteState` whose `inner_state` holds the span's states.
    """

    max_consecutive_errors: int
    span: int


@dataclasses.dataclass(frozen=True)
class _Atom:
    """One transformation inside a (possibly nested) chain: its rule, its opaque update, or a gate."""

    rule: Rule | None
    update: Callable | None
    path: tuple[int, ...]
    gate: Gate | None = None


# The fusion metadata (the atoms) of a transformation is keyed by its `update` function, not stored
# on the transformation. `tx._replace(init=...)`, `optax.GradientTransformationExtraArgs(tx.init,
# tx.update)` and any helper that rebuilds a transformation from its two fields drop whatever was
# set on the instance, but keep the update function; and the atoms describe exactly what that
# function computes (it is `_execute(atoms, ...)`). So any transformation whose update is ours fuses,
# and one whose update was replaced (`tx._replace(update=f)`, `optax.masked(tx)`) is opaque, as it
# must be. Weak keys: a dropped optimizer drops its entry. Not an attribute of the function:
# `functools.wraps` copies a function's `__dict__`, which would make a wrapper that changes the
# updates look fusable.
_ATOMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _atoms_of(tx) -> tuple[_Atom, ...] | None:
    """The atoms of `tx` when its `update` is one of ours, else None (an opaque transformation)."""
    try:
        return _ATOMS.get(tx.update)
    except TypeError:  # an update that cannot be weakly referenced or hashed is not ours
        return None


class FusableTransformation(optax.GradientTransformationExtraArgs):
    """An `optax.GradientTransformationExtraArgs` that knows its per-element parts.

    It is a plain `(init, update)` NamedTuple to Optax (works in `optax.chain`, `optax.masked`,
    `optax.inject_hyperparams`, ...); `optax_ext.chain` reads its `atoms` to fuse adjacent rules.
    """

    @property
    def atoms(self) -> tuple[_Atom, ...] | None:
        """The per-element parts of `update` (None once `update` was replaced by another function)."""
        return _atoms_of(self)

    def update_and_apply(self, updates, state, params, **extra_args):
        """Return `(new_params, new_state)`; the last fused run writes the parameters directly.

        Equivalent to `u, s = tx.update(updates, state, params); optax.apply_updates(params, u)`
        but without materializing `u` when the chain ends with per-element transformations: on the
        Pallas backends the new parameters and slots overwrite the old ones in place.

        Jit the step with params and state donated, `jax.jit(step, donate_argnums=(0, 1))`: a
        kernel that writes into a buffer the caller did not donate makes XLA copy that buffer
        first, which adds about 24 bytes per parameter to a 28-byte AdamW step.
        """
        return update_and_apply(self, updates, state, params, **extra_args)


def _make(init: Callable, atoms: tuple[_Atom, ...]) -> FusableTransformation:
    def update(updates, state, params=None, **extra_args):
        return _execute(atoms, updates, state, params, apply=False, extra_args=extra_args)

    _ATOMS[update] = atoms
    return FusableTransformation(init, update)


def fusable(init: Callable, rule: Rule) -> FusableTransformation:
    """Build a transformation from its `init` and its per-element `rule`."""
    return _make(init, (_Atom(rule, None, ()),))


def chain(*transformations: optax.GradientTransformation) -> FusableTransformation:
    """Apply transformations in sequence, fusing adjacent per-element ones into one pass.

    Drop-in for `optax.chain` (same state: a tuple of the inner states), accepting Optax's own
    transformations anywhere: they run unfused and break the fused run around them.

    Example:
      >>> tx = chain(clip_by_global_norm(1.0), scale_by_adam(), scale_by_learning_rate(1e-3))
    """
    if not transformations:
        raise ValueError("chain() needs at least one transformation.")
    atoms: list[_Atom] = []
    for i, tx in enumerate(transformations):
        if not (hasattr(tx, "init") and hasattr(tx, "update")):
            raise TypeError(
                f"chain(): argument {i} must be a GradientTransformation (with init and update), "
                f"got {type(tx).__name__}."
            )
        inner = _atoms_of(tx)
        if inner is not None:
            atoms.extend(dataclasses.replace(a, path=(i,) + a.path) for a in inner)
        else:
            atoms.append(_Atom(None, optax.with_extra_args_support(tx).update, (i,)))
    inits = tuple(tx.init for tx in transformations)

    def init(params):
        return tuple(fn(params) for fn in inits)

    return _make(init, tuple(atoms))


def apply_if_finite(inner: optax.GradientTransformation, max_consecutive_errors: int) -> FusableTransformation:
    r"""Skip `inner`'s step when the incoming updates hold a NaN or an infinity; Optax's name,
    arguments, state (`optax.ApplyIfFiniteState`) and semantics.

    A step is applied when every update is finite, or when more than `max_consecutive_errors`
    steps in a row were not (then it is applied anyway, NaNs included, as Optax does). A skipped
    step returns zero updates, and leaves every moment, every step count (schedules do not
    advance) and, with `update_and_apply`, the parameters bit-identical.

    When `inner` is ours the test costs no extra pass: it is the same multi-tensor reduction as
    the global norm (a `clip_by_global_norm` right after it reuses its sum of squares), counting
    non-finite elements beside the squares; and the keep-or-apply select happens inside the fused
    pass, which reads the old moments anyway. Optax transformations inside `inner` are skipped with
    `lax.cond`, as in Optax.

    References:
      `optax.apply_if_finite`; Micikevicius et al., *Mixed Precision Training*, ICLR 2018 (skipping
      steps with overflowed gradients).
    """
    if (
        isinstance(max_consecutive_errors, bool)
        or not isinstance(max_consecutive_errors, (int, np.integer))
        or max_consecutive_errors < 0
    ):
        raise ValueError(
            f"apply_if_finite: max_consecutive_errors must be an integer >= 0, got {max_consecutive_errors!r}."
        )
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(f"apply_if_finite: inner must be a GradientTransformation, got {type(inner).__name__}.")
    inner_atoms = _atoms_of(inner) or (_Atom(None, optax.with_extra_args_support(inner).update, ()),)
    at = optax.ApplyIfFiniteState._fields.index("inner_state")
    atoms = (
        _Atom(None, None, (), Gate(int(max_consecutive_errors), len(inner_atoms))),
        *(dataclasses.replace(a, path=(at,) + a.path) for a in inner_atoms),
    )

    def init(params):
        return optax.ApplyIfFiniteState(
            notfinite_count=jnp.zeros([], jnp.int32),
            last_finite=jnp.array(True),
            total_notfinite=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
        )

    return _make(init, atoms)


def update_and_apply(tx: optax.GradientTransformation, updates, state, params, **extra_args):
    """`(new_params, new_state)` for any transformation; fused when `tx`'s update is ours."""
    atoms = _atoms_of(tx)
    if atoms is not None:
        return _execute(atoms, updates, state, params, apply=True, extra_args=extra_args)
    updates, state = tx.update(updates, state, params, **extra_args)
    return optax.apply_updates(params, updates), state


# --------------------------------------------------------------------------------------------
# Execution


def _get(state, path):
    for i in path:
        state = state[i]
    return state


def _set(state, path, value):
    if not path:
        return value
    i = path[0]
    items = list(state)
    items[i] = _set(items[i], path[1:], value)
    return tuple(items) if type(state) is tuple else type(state)(*items)


def _stateless(atom) -> bool:
    """A rule with no state of its own (`optax.EmptyState`): like Optax's, it ignores the state given."""
    return atom.rule is not None and atom.rule.state_type is optax.EmptyState and not atom.rule.slots


def _check_state(atoms, state):
    if len(atoms) == 1 and _stateless(atoms[0]):
        return  # None, {}, EmptyState(), ... all fine
    if state is None:
        raise ValueError("update(): state is None. Call `state = tx.init(params)` first and pass it.")
    # Outer states first: a wrong state is named by the transformation it was given to.
    for atom in sorted(atoms, key=lambda a: len(a.path)):
        try:
            sub = _get(state, atom.path)
        except (IndexError, TypeError, KeyError):
            raise TypeError(
                f"update(): state does not match this transformation (no entry at {atom.path}); "
                f"got {type(state).__name__}. Pass the state returned by this transformation's "
                f"init (or its previous update)."
            ) from None
        if atom.gate is not None and not isinstance(sub, optax.ApplyIfFiniteState):
            raise TypeError(
                f"update(): apply_if_finite expected its state to be ApplyIfFiniteState, got "
                f"{type(sub).__name__}. Was `init` called with this transformation?"
            )
        if atom.rule is not None and not _stateless(atom) and not isinstance(sub, atom.rule.state_type):
            raise TypeError(
                f"update(): {atom.rule.name} expected its state to be {_type_names(atom.rule.state_type)}, "
                f"got {type(sub).__name__}. Was `init` called with this transformation?"
            )


def _type_names(t):
    return " or ".join(c.__name__ for c in (t if isinstance(t, tuple) else (t,)))


def _runs(atoms: Sequence[_Atom]) -> list[tuple[int, list[_Atom]]]:
    """Split atoms into fused runs `(index of the first atom, atoms)`: opaque atoms and gates alone;
    a rule that reads updates starts a run, and so do the first atom in and after a gate's span."""
    starts = set()
    for i, atom in enumerate(atoms):
        if atom.gate is not None:
            starts.update((i + 1, i + 1 + atom.gate.span))
    runs: list[tuple[int, list[_Atom]]] = []
    for i, atom in enumerate(atoms):
        mergeable = (
            atom.rule is not None
            and not atom.rule.reads_updates
            and i not in starts
            and runs
            and runs[-1][1][0].rule is not None
        )
        if mergeable:
            runs[-1][1].append(atom)
        else:
            runs.append((i, [atom]))
    return runs


def _execute(atoms, updates, state, params, *, apply: bool, extra_args):
    _check_state(atoms, state)
    check_trees(updates, params)
    if apply and params is None:
        raise ValueError("update_and_apply(): params are required.")
    with reductions.sharing():  # a gate's finiteness test and a global norm of the same grads: one pass
        return _execute_runs(atoms, updates, state, params, apply, extra_args)


def _execute_runs(atoms, updates, state, params, apply, extra_args):
    runs = _runs(atoms)
    gates: list[tuple[int, jax.Array]] = []  # (end of span, apply this step?) of the gates in force
    gate = None
    for k, (first, run) in enumerate(runs):
        gates = [(end, ok) for end, ok in gates if first < end]
        gate = _all(ok for _, ok in gates)
        atom = run[0]
        if atom.gate is not None:
            ok, sub = _gate_step(atom.gate, _get(state, atom.path), updates)
            state = _set(state, atom.path, sub)
            gates.append((first + 1 + atom.gate.span, ok))
            continue
        if atom.rule is None:
            updates, state = _opaque_step(atom, updates, state, params, extra_args, gate)
            continue
        write_params = apply and k == len(runs) - 1
        subs = [_get(state, a.path) for a in run]
        out, new_subs = _fused_run([a.rule for a in run], subs, updates, params, write_params, gate)
        for a, sub in zip(run, new_subs):
            if a.rule.owns is not None:  # the rest of its state was written by the atoms it holds
                sub = _get(state, a.path)._replace(**{f: getattr(sub, f) for f in a.rule.owns})
            state = _set(state, a.path, sub)
        if write_params:
            return out, state
        updates = out
    if apply:
        new = optax.apply_updates(params, updates)
        if gate is not None:  # bit-identical params on a skipped step (p + 0 turns -0.0 into +0.0)
            new = jax.tree.map(lambda n, p: jnp.where(gate, n, p), new, params)
        return new, state
    return updates, state


def _all(flags):
    out = None
    for f in flags:
        out = f if out is None else jnp.logical_and(out, f)
    return out


def _gate_step(gate: Gate, state, updates):
    """Optax's apply_if_finite bookkeeping: (apply this step?, the gate's new counters)."""
    leaves = jax.tree.leaves(updates)
    _, finite = reductions.global_sq_norm_and_finite(leaves)
    notfinite = jnp.where(finite, jnp.zeros([], jnp.int32), optax.safe_increment(state.notfinite_count))
    total = jnp.where(finite, state.total_notfinite, optax.safe_increment(state.total_notfinite))
    ok = jnp.logical_or(finite, notfinite > gate.max_consecutive_errors)
    return ok, state._replace(notfinite_count=notfinite, last_finite=finite, total_notfinite=total)


def _opaque_step(atom, updates, state, params, extra_args, gate):
    """An Optax transformation's own update; inside a gate, skipped (zeros, old state) by lax.cond."""
    old = _get(state, atom.path)
    if gate is None:
        updates, sub = atom.update(updates, old, params, **extra_args)
    else:
        updates, sub = jax.lax.cond(
            gate,
            lambda: atom.update(updates, old, params, **extra_args),
            lambda: (jax.tree.map(jnp.zeros_like, updates), old),
        )
    return updates, _set(state, atom.path, sub)


def _scalar_columns(rule: Rule, scalars: Scalars, treedef, shared: list, per_leaf: list) -> dict:
    """File a rule's scalars: step-wide values into `shared`, `PerLeaf` trees into `per_leaf` columns.

    Returns `{field: ("shared" | "leaf", index) or None}`: where the composed body reads each
    scalar (None: a field left None, which the body passes on as None).
    """
    if type(scalars) is not rule.scalars_type:
        raise TypeError(
            f"{rule.name}: Rule.scalars must return a {rule.scalars_type.__name__} (the rule's "
            f"scalars_type), got {type(scalars).__name__}."
        )
    where = {}
    for name, v in scalars._asdict().items():
        if v is None:
            where[name] = None
        elif isinstance(v, PerLeaf):
            leaves = treedef.flatten_up_to(v.tree)
            where[name] = ("leaf", len(per_leaf))
            per_leaf.append([scalar(x).reshape(()) for x in leaves])
        else:
            v = scalar(v)
            if v.shape != ():
                raise ValueError(f"{rule.name}: hyperparameter {name!r} must be a scalar, got shape {v.shape}.")
            where[name] = ("shared", len(shared))
            shared.append(v)
    return where


def _is_none(x) -> bool:
    return x is None


def _float_of(dtype):
    """Integer updates and slots come out as floats, as jnp's promotion (and Optax) gives them."""
    return jnp.result_type(dtype, float) if jnp.issubdtype(dtype, jnp.integer) else jnp.dtype(dtype)


def _storage(slot):
    """A slot's storage after the step: its quantization format, or its (float) dtype."""
    return slot.format if isinstance(slot, QuantizedArray) else _float_of(slot.dtype)


def _fused_run(rules: Sequence[Rule], states, updates, params, write_params: bool, gate=None):
    """Run the composition of `rules` once per leaf; return (updates or new params, new states).

    A `None` update leaf (no update for that part of the params, as in Optax) passes through: the
    run sees only the present leaves, and params and slots under a `None` update are kept.
    """
    full = jax.tree.structure(updates, is_leaf=_is_none)
    present = [i for i, u in enumerate(full.flatten_up_to(updates)) if u is not None]
    if len(present) == full.num_leaves:
        return _fused_run_leaves(rules, states, updates, params, write_params, gate)

    def prune(tree):
        parts = full.flatten_up_to(tree)
        return [parts[i] for i in present]

    def unprune(pruned, old):
        parts = full.flatten_up_to(old) if old is not None else [None] * full.num_leaves
        for j, i in enumerate(present):
            parts[i] = pruned[j]
        return full.unflatten(parts)

    pruned_states = [
        st._replace(**{f: prune(getattr(st, f)) for f in rule.slots}) if rule.slots else st
        for rule, st in zip(rules, states)
    ]
    out, new_pruned = _fused_run_leaves(
        rules, pruned_states, prune(updates), None if params is None else prune(params), write_params, gate
    )
    # The new states as the run made them (step counts gated too), with their slots whole again.
    new_states = [
        new._replace(
            **{
                f: getattr(st, f) if rule.readonly_slots else unprune(getattr(new, f), getattr(st, f))
                for f in rule.slots
            }
        )
        if rule.slots
        else new
        for rule, st, new in zip(rules, states, new_pruned)
    ]
    return unprune(out, params if write_params else None), new_states


def _fused_run_leaves(rules: Sequence[Rule], states, updates, params, write_params: bool, gate=None):
    """`_fused_run` on trees without `None` update leaves.

    With a `gate` (a traced bool), a skipped step writes zero updates (or the params unchanged)
    and every slot's old value, inside the same pass, and keeps every other state field.
    """
    updates = jax.tree.map(jnp.asarray, updates)  # Python scalars too, as Optax takes them
    params = None if params is None else jax.tree.map(jnp.asarray, params)
    leaves, treedef = jax.tree.flatten(updates)
    n = len(leaves)
    needs_params = write_params or any(r.needs_params for r in rules)
    if needs_params and params is None:
        names = ", ".join(r.name for r in rules if r.needs_params)
        raise ValueError(f"{names} requires params: call update(updates, state, params).")
    p_leaves = [jnp.asarray(p) for p in treedef.flatten_up_to(params)] if needs_params else [None] * n

    slot_leaves, positions, shared, per_leaf, scalars = [], [], [], [], []
    for rule, st in zip(rules, states):
        per_slot = []
        for field in rule.slots:
            tree = getattr(st, field)
            try:
                flat = treedef.flatten_up_to(variables_outside(tree))
                slot = [x if isinstance(x, QuantizedArray) else jnp.asarray(x) for x in flat]
            except (ValueError, TypeError):
                where = (
                    tree_difference(variables_outside(tree), updates, f"state.{field}", "updates", prefix=True)
                    or "another tree structure"
                )
                raise ValueError(
                    f"update(): {rule.name} state field {field!r} does not match the updates ({where}); "
                    f"was the state made by init on these params?"
                ) from None
            for (path, g), x in zip(jax.tree_util.tree_flatten_with_path(updates)[0], slot):
                if x.shape != jnp.shape(g):
                    raise ValueError(
                        f"update(): {rule.name} state field {field!r} has shape {x.shape} at "
                        f"{jax.tree_util.keystr(path)} where the updates have {jnp.shape(g)}; was the state "
                        f"made by init on these params?"
                    )
            per_slot.append(slot)
        slot_leaves.append(per_slot)
        scal = rule.scalars(st, updates, params)
        scalars.append(scal)
        positions.append(_scalar_columns(rule, scal, treedef, shared, per_leaf))

    gate_at = None
    if gate is not None:
        gate_at = len(shared)
        shared.append(jnp.where(gate, 1.0, 0.0).astype(jax.dtypes.canonicalize_dtype(jnp.float64)))
    body = _compose(rules, positions, needs_params, write_params, gate_at)

    jobs = []
    for i, g in enumerate(leaves):
        inputs, out_dtypes = [g], [p_leaves[i].dtype if write_params else _float_of(g.dtype)]
        aliases = {}
        if needs_params:
            inputs.append(p_leaves[i])
            if write_params:
                aliases[1] = 0  # new params overwrite the params' buffer
        for rule, per_slot in zip(rules, slot_leaves):
            for slot in per_slot:
                if not rule.readonly_slots:
                    aliases[len(inputs)] = len(out_dtypes)  # new slot overwrites the old slot
                    out_dtypes.append(_storage(slot[i]))
                inputs.append(slot[i])
        # An output may overwrite an input only of its own dtype (a bf16 slot written as f32 cannot).
        aliases = {
            a: o
            for a, o in aliases.items()
            if _elementwise.same_storage(_elementwise.storage_of(inputs[a]), out_dtypes[o])
        }
        jobs.append(_elementwise.Job(inputs, out_dtypes, _stack([col[i] for col in per_leaf]), aliases))

    outs = _elementwise.run_fused(body, jobs, _stack(shared))

    out_leaves = [o[0] for o in outs]
    new_states, j = [], 1
    for rule, st, scal in zip(rules, states, scalars):
        if rule.readonly_slots:
            trees = [getattr(st, field) for field in rule.slots]
        else:
            trees = [variables_inside(treedef.unflatten([o[j + k] for o in outs])) for k in range(len(rule.slots))]
            j += len(rule.slots)
        new = next_state_of(rule, st, tuple(trees), scal)
        if gate is not None:  # step counts and other fields: keep the old ones on a skipped step
            new = _keep_unless(gate, rule, new, st)
        new_states.append(new)
    return treedef.unflatten(out_leaves), new_states


def _keep_unless(gate, rule: Rule, new, old):
    """`new` where `gate`, else `old`, for the state fields that are not slots (slots were selected
    in the fused pass)."""
    if not hasattr(new, "_fields") or type(new) is not type(old):
        return jax.tree.map(lambda n, o: jnp.where(gate, n, o), new, old)
    fields = {
        f: jax.tree.map(lambda n, o: jnp.where(gate, n, o), getattr(new, f), getattr(old, f))
        for f in new._fields
        if f not in rule.slots
    }
    return new._replace(**fields)


def _compose(rules, positions, needs_params, write_params, gate_at=None):
    """The composed per-element rule: `body(inputs, shared, leaf) -> [u or new p, *new slots]`.

    inputs = [g, (p), slots of rule 1, slots of rule 2, ...]; `positions[r][name]` says whether rule
    r's scalar `name` is `shared[j]` (step-wide), `leaf[j]` (this leaf's own value) or None; rule r's
    element gets them back as its `scalars_type`. Read-only slots are inputs only. With `gate_at`,
    `shared[gate_at]` is 1 to apply the step and 0 to skip it: then the outputs are zero updates (or
    the unchanged params) and the old slots.
    """

    def body(inputs, shared, leaf):
        def read(w):
            return None if w is None else (shared if w[0] == "shared" else leaf)[w[1]]

        it = iter(inputs)
        g = next(it)
        p = next(it) if needs_params else None
        new_slots_all, old_slots_all = [], []
        for rule, where in zip(rules, positions):
            slots = tuple(next(it) for _ in range(len(rule.slots)))
            s = rule.scalars_type(**{name: read(w) for name, w in where.items()})
            g, new_slots = rule.element(g, p, slots, s)
            if not rule.readonly_slots:
                new_slots_all.extend(new_slots)
                old_slots_all.extend(slots)
        out = p + g if write_params else g
        if gate_at is None:
            return [out, *new_slots_all]
        ok = shared[gate_at] > 0.5
        kept = p if write_params else jnp.zeros_like(g)
        return [jnp.where(ok, out, kept), *(jnp.where(ok, n, o) for n, o in zip(new_slots_all, old_slots_all))]

    return body


def _stack(scalars):
    return jnp.stack(scalars) if scalars else jnp.zeros((0,), jax.dtypes.canonicalize_dtype(jnp.float64))
