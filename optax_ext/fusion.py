"""The fusable transformation core: per-element rules, `chain`, and the fused pass.

Every per-element transformation of optax_ext carries, beside `init`/`update`, its math as a
`Rule`: a function of one element `(g, p, slots, scalars) -> (u, new_slots)` plus how to read its
per-parameter slots (m, v, ...) and its step-wide scalars (bias corrections, learning rate, clip
factor) from its state. `chain` composes the rules of adjacent transformations into one rule and
runs it over every leaf through `optax_ext.kernels.elementwise.run_fused`: plain XLA per leaf on
CPU, a few multi-tensor Pallas launches on GPU (many leaves per launch), one Pallas call per leaf
on TPU. Transformations without a rule (Optax's own, Adafactor's factored
moments) run through their own `update` and simply end a fused run.

State layout is unchanged by fusion: `chain(a, b).init(params) == (a.init(params), b.init(params))`,
exactly as `optax.chain`, and each transformation keeps Optax's NamedTuple state where Optax has
the same transformation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext.kernels import elementwise as _elementwise

Scalars = dict[str, Any]
ElementFn = Callable[[jax.Array, jax.Array | None, tuple, Scalars], tuple[jax.Array, tuple]]


class PerLeaf(NamedTuple):
    """A scalar that differs per leaf (a trust ratio, a mask): a pytree shaped like the updates."""

    tree: Any


@dataclasses.dataclass(frozen=True)
class Rule:
    """The per-element math of one transformation.

    Attributes:
      name: the transformation's name, for error messages.
      state_type: the NamedTuple class (or tuple of classes) its state must be.
      slots: names of the state fields holding per-parameter arrays (e.g. ("mu", "nu")).
      scalars: `(state, updates, params) -> dict` of step-wide f32 scalars (or `PerLeaf` trees).
        `updates` is the input of the fused run when `reads_updates`, else None.
      element: `(g, p, slots, scalars) -> (u, new_slots)` on f32 values of one element.
      next_state: `(state, new_slots) -> new state`, new_slots a tuple of trees (one per slot).
      reads_updates: the scalars reduce over the incoming updates (a global or per-leaf norm), so
        the rule must begin a fused run: the updates it sees must exist in memory.
      needs_params: `element` or `scalars` reads the parameters.
      readonly_slots: the slots are constants (anchors, a Fisher diagonal): the fused pass reads
        them but never writes them back; `element`'s returned slots are ignored.
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


@dataclasses.dataclass(frozen=True)
class _Atom:
    """One transformation inside a (possibly nested) chain: its rule or its opaque update."""

    rule: Rule | None
    update: Callable | None
    path: tuple[int, ...]


class FusableTransformation(optax.GradientTransformationExtraArgs):
    """An `optax.GradientTransformationExtraArgs` that knows its per-element parts.

    It is a plain `(init, update)` NamedTuple to Optax (works in `optax.chain`, `optax.masked`,
    `optax.inject_hyperparams`, ...); `optax_ext.chain` reads `atoms` to fuse adjacent rules.
    """

    atoms: tuple[_Atom, ...]

    def update_and_apply(self, updates, state, params, **extra_args):
        """Return `(new_params, new_state)`; the last fused run writes the parameters directly.

        Equivalent to `u, s = tx.update(updates, state, params); optax.apply_updates(params, u)`
        but without materializing `u` when the chain ends with per-element transformations: on the
        Pallas backends the new parameters and slots overwrite the old ones in place.

        Jit the step with params and state donated, `jax.jit(step, donate_argnums=(0, 1))`: a
        kernel that writes into a buffer the caller did not donate makes XLA copy that buffer
        first, which adds about 24 bytes per parameter to a 28-byte AdamW step.
        """
        return _execute(self.atoms, updates, state, params, apply=True, extra_args=extra_args)


def _make(init: Callable, atoms: tuple[_Atom, ...]) -> FusableTransformation:
    def update(updates, state, params=None, **extra_args):
        return _execute(atoms, updates, state, params, apply=False, extra_args=extra_args)

    tx = FusableTransformation(init, update)
    tx.atoms = atoms
    return tx


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
                f"got {type(tx).__name__}.")
        inner = getattr(tx, "atoms", None)
        if inner is not None:
            atoms.extend(_Atom(a.rule, a.update, (i,) + a.path) for a in inner)
        else:
            atoms.append(_Atom(None, optax.with_extra_args_support(tx).update, (i,)))
    inits = tuple(tx.init for tx in transformations)

    def init(params):
        return tuple(fn(params) for fn in inits)

    return _make(init, tuple(atoms))


def update_and_apply(tx: optax.GradientTransformation, updates, state, params, **extra_args):
    """`(new_params, new_state)` for any transformation; fused when `tx` is ours."""
    if isinstance(tx, FusableTransformation):
        return tx.update_and_apply(updates, state, params, **extra_args)
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


def _check_state(atoms, state):
    if state is None:
        raise ValueError("update(): state is None. Call `state = tx.init(params)` first and pass it.")
    for atom in atoms:
        try:
            sub = _get(state, atom.path)
        except (IndexError, TypeError, KeyError):
            raise TypeError(
                f"update(): state does not match this transformation (no entry at {atom.path}); "
                f"got {type(state).__name__}. Pass the state returned by this transformation's "
                f"init (or its previous update).") from None
        if atom.rule is not None and not isinstance(sub, atom.rule.state_type):
            raise TypeError(
                f"update(): {atom.rule.name} expected its state to be {_type_names(atom.rule.state_type)}, "
                f"got {type(sub).__name__}. Was `init` called with this transformation?")


def _type_names(t):
    return " or ".join(c.__name__ for c in (t if isinstance(t, tuple) else (t,)))


def _check_trees(updates, params):
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        if not jnp.issubdtype(jnp.result_type(u), jnp.floating):
            raise TypeError(
                f"update(): updates must be real floating point (f32, bf16, f16, f64); got "
                f"{jnp.result_type(u)} at {jax.tree_util.keystr(path)}. Integer or complex parameters "
                f"cannot be optimized by these transformations.")
    if params is None:
        return
    u_def, p_def = jax.tree.structure(updates), jax.tree.structure(params)
    if u_def != p_def:
        raise ValueError(
            "update(): updates and params must have the same tree structure; got\n"
            f"  updates: {u_def}\n  params:  {p_def}")
    for (path, u), p in zip(jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree.leaves(params)):
        if jnp.shape(u) != jnp.shape(p):
            raise ValueError(
                f"update(): updates and params differ in shape at {jax.tree_util.keystr(path)}: "
                f"updates {jnp.shape(u)}, params {jnp.shape(p)}.")


def _runs(atoms: Sequence[_Atom]) -> list[list[_Atom]]:
    """Split atoms into fused runs: opaque atoms alone; a rule that reads updates starts a run."""
    runs: list[list[_Atom]] = []
    for atom in atoms:
        if atom.rule is None:
            runs.append([atom])
        elif runs and runs[-1][0].rule is not None and not atom.rule.reads_updates:
            runs[-1].append(atom)
        else:
            runs.append([atom])
    return runs


def _execute(atoms, updates, state, params, *, apply: bool, extra_args):
    _check_state(atoms, state)
    _check_trees(updates, params)
    if apply and params is None:
        raise ValueError("update_and_apply(): params are required.")
    runs = _runs(atoms)
    for k, run in enumerate(runs):
        if run[0].rule is None:
            atom = run[0]
            updates, sub = atom.update(updates, _get(state, atom.path), params, **extra_args)
            state = _set(state, atom.path, sub)
            continue
        write_params = apply and k == len(runs) - 1
        subs = [_get(state, a.path) for a in run]
        out, new_subs = _fused_run([a.rule for a in run], subs, updates, params, write_params)
        for a, sub in zip(run, new_subs):
            state = _set(state, a.path, sub)
        if write_params:
            return out, state
        updates = out
    if apply:
        return optax.apply_updates(params, updates), state
    return updates, state


def _scalar_columns(rule: Rule, scalars: Scalars, treedef, shared: list, per_leaf: list) -> dict:
    """File a rule's scalars: step-wide values into `shared`, `PerLeaf` trees into `per_leaf` columns.

    Returns `{name: ("shared" | "leaf", index)}`: where the composed body reads each scalar.
    """
    where = {}
    for name in sorted(scalars):
        v = scalars[name]
        if isinstance(v, PerLeaf):
            leaves = treedef.flatten_up_to(v.tree)
            where[name] = ("leaf", len(per_leaf))
            per_leaf.append([jnp.asarray(x, jnp.float32).reshape(()) for x in leaves])
        else:
            v = jnp.asarray(v, jnp.float32)
            if v.shape != ():
                raise ValueError(f"{rule.name}: hyperparameter {name!r} must be a scalar, got shape {v.shape}.")
            where[name] = ("shared", len(shared))
            shared.append(v)
    return where


def _fused_run(rules: Sequence[Rule], states, updates, params, write_params: bool):
    """Run the composition of `rules` once per leaf; return (updates or new params, new states)."""
    leaves, treedef = jax.tree.flatten(updates)
    n = len(leaves)
    needs_params = write_params or any(r.needs_params for r in rules)
    if needs_params and params is None:
        names = ", ".join(r.name for r in rules if r.needs_params)
        raise ValueError(f"{names} requires params: call update(updates, state, params).")
    p_leaves = treedef.flatten_up_to(params) if needs_params else [None] * n

    slot_leaves, positions, shared, per_leaf = [], [], [], []
    for rule, st in zip(rules, states):
        per_slot = []
        for field in rule.slots:
            tree = getattr(st, field)
            try:
                per_slot.append(treedef.flatten_up_to(tree))
            except (ValueError, TypeError) as e:
                raise ValueError(
                    f"update(): {rule.name} state field {field!r} does not match the updates' tree "
                    f"structure ({treedef}); was the state made by init on these params? ({e})") from None
        slot_leaves.append(per_slot)
        scal = rule.scalars(st, updates if rule.reads_updates else None, params)
        positions.append(_scalar_columns(rule, scal, treedef, shared, per_leaf))

    body = _compose(rules, positions, needs_params, write_params)

    jobs = []
    for i, g in enumerate(leaves):
        inputs, out_dtypes = [g], [p_leaves[i].dtype if write_params else g.dtype]
        aliases = {}
        if needs_params:
            inputs.append(p_leaves[i])
            if write_params:
                aliases[1] = 0  # new params overwrite the params' buffer
        for rule, per_slot in zip(rules, slot_leaves):
            for slot in per_slot:
                if not rule.readonly_slots:
                    aliases[len(inputs)] = len(out_dtypes)  # new slot overwrites the old slot
                    out_dtypes.append(slot[i].dtype)
                inputs.append(slot[i])
        # An output may overwrite an input only of its own dtype (a bf16 slot written as f32 cannot).
        aliases = {a: o for a, o in aliases.items() if inputs[a].dtype == jnp.dtype(out_dtypes[o])}
        jobs.append(_elementwise.Job(inputs, out_dtypes, _stack([col[i] for col in per_leaf]), aliases))

    outs = _elementwise.run_fused(body, jobs, _stack(shared))

    out_leaves = [o[0] for o in outs]
    new_states, j = [], 1
    for rule, st in zip(rules, states):
        if rule.readonly_slots:
            trees = [getattr(st, field) for field in rule.slots]
        else:
            trees = [treedef.unflatten([o[j + k] for o in outs]) for k in range(len(rule.slots))]
            j += len(rule.slots)
        new_states.append(rule.next_state(st, tuple(trees)))
    return treedef.unflatten(out_leaves), new_states


def _compose(rules, positions, needs_params, write_params):
    """The composed per-element rule: `body(inputs, shared, leaf) -> [u or new p, *new slots]`.

    inputs = [g, (p), slots of rule 1, slots of rule 2, ...]; `positions[r][name]` says whether rule
    r's scalar `name` is `shared[j]` (step-wide) or `leaf[j]` (this leaf's own value). Read-only
    slots are inputs only.
    """

    def body(inputs, shared, leaf):
        it = iter(inputs)
        g = next(it)
        p = next(it) if needs_params else None
        new_slots_all = []
        for rule, where in zip(rules, positions):
            slots = tuple(next(it) for _ in range(len(rule.slots)))
            s = {name: (shared if kind == "shared" else leaf)[j] for name, (kind, j) in where.items()}
            g, new_slots = rule.element(g, p, slots, s)
            if not rule.readonly_slots:
                new_slots_all.extend(new_slots)
        return [p + g if write_params else g, *new_slots_all]

    return body


def _stack(scalars):
    return jnp.stack(scalars) if scalars else jnp.zeros((0,), jnp.float32)
