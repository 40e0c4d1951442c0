"""Checks of the trees an update receives: clear errors before any math runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["check_trees"]


def is_none(x) -> bool:
    return x is None


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
        raise ValueError(
            "update(): updates and params must have the same tree structure; got\n"
            f"  updates: {jax.tree.structure(updates)}\n  params:  {jax.tree.structure(params)}"
        ) from None
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
