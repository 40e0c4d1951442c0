"""Checks of the trees an update receives: clear errors before any math runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["check_trees", "tree_difference"]

_MAX_KEYS = 6  # keys listed when describing a subtree


def is_none(x) -> bool:
    return x is None


def _is_leaf(x) -> bool:
    leaves = jax.tree.leaves(x)
    return len(leaves) == 1 and leaves[0] is x


def _children(x) -> list:
    """[(key, child)] one level down (a leaf has none)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    return [(path[0], child) for path, child in flat if path]


def _key(k) -> str:
    return jax.tree_util.keystr((k,))


def _describe(x) -> str:
    """What `x` is, in a few words: never its values (they may be large, or secret)."""
    if x is None:
        return "None"
    if _is_leaf(x):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return f"an array {jnp.dtype(x.dtype).name}{tuple(x.shape)}"
        return f"a {type(x).__name__}"
    keys = [_key(k) for k, _ in _children(x)]
    shown = "".join(keys[:_MAX_KEYS]) + ("..." if len(keys) > _MAX_KEYS else "")
    return f"a {type(x).__name__} with {len(keys)} entr{'y' if len(keys) == 1 else 'ies'} {shown}".rstrip()


def tree_difference(a, b, a_name: str, b_name: str, *, prefix: bool = False, none_is_subtree: bool = False):
    """The first place where the trees `a` and `b` differ, as one short sentence, or None.

    Walks both trees together (in `b`'s key order) and names the path and what each side has there
    (a node type, its keys, or an array's dtype and shape). With `prefix`, a leaf of `a` may stand
    for a whole subtree of `b` (a mask); with `none_is_subtree`, so may a None of `a` (Optax's
    None updates).
    """

    def walk(x, y, path):
        where = f"at {a_name}{path}" if path else "at the root"
        if (prefix and _is_leaf(x)) or (none_is_subtree and x is None):
            return None
        if _is_leaf(x) and _is_leaf(y):
            return None
        if _is_leaf(x) != _is_leaf(y) or type(x) is not type(y):
            return f"{where}: {a_name} has {_describe(x)}, {b_name} has {_describe(y)}"
        xs, ys = dict((_key(k), c) for k, c in _children(x)), dict((_key(k), c) for k, c in _children(y))
        for k in ys:
            if k not in xs:
                return f"{where}: {b_name} has {k} ({_describe(ys[k])}), {a_name} does not"
        for k in xs:
            if k not in ys:
                return f"{where}: {a_name} has {k} ({_describe(xs[k])}), {b_name} does not"
        for k in ys:
            found = walk(xs[k], ys[k], path + k)
            if found:
                return found
        return None

    return walk(a, b, "")


def check_trees(updates, params):
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        dtype = jnp.result_type(u)
        if not (jnp.issubdtype(dtype, jnp.inexact) or jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(
                f"update(): updates must be numbers (floating point, complex or integer); got {dtype} at "
                f"{jax.tree_util.keystr(path)}."
            )
    if params is None:
        return
    # `None` update leaves (no update for that part of the params) may stand for whole subtrees.
    full = jax.tree.structure(updates, is_leaf=is_none)
    try:
        p_parts = full.flatten_up_to(params)
    except (ValueError, TypeError):
        where = tree_difference(updates, params, "updates", "params", none_is_subtree=True)
        raise ValueError(f"update(): updates and params must have the same tree structure; {where}.") from None
    u_parts = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_none)[0]
    for (path, u), p in zip(u_parts, p_parts):
        if u is None:
            continue
        if jnp.shape(u) != jnp.shape(p):
            raise ValueError(
                f"update(): updates and params differ in shape at {jax.tree_util.keystr(path)}: "
                f"updates {jnp.shape(u)}, params {jnp.shape(p)}."
            )
        if not jnp.issubdtype(jnp.result_type(p), jnp.inexact) and jnp.issubdtype(jnp.result_type(u), jnp.inexact):
            # optax.apply_updates would cast p + u back to the integer dtype: a small update rounds
            # to nothing, silently. Integer leaves belong outside the optimizer (optax.masked, freeze).
            raise TypeError(
                f"update(): params at {jax.tree_util.keystr(path)} are {jnp.result_type(p)} but their updates are "
                f"{jnp.result_type(u)}: applying them would round the updates away. Optimize floating-point or "
                f"complex parameters; keep integer leaves out of the optimizer (optax.masked, optax_ext.freeze)."
            )
