"""Adafactor's factored second moment: row and column statistics instead of a full matrix.

Not per-element (each element reads its row and column means), so it is an ordinary
`GradientTransformation` with no `Rule`: inside `optax_ext.chain` it ends a fused run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ext import _validate as check
from optax_ext.transforms._common import abs_sq, full_like_dims, increment, zero_count


def adafactor_decay_rate(step, exponent=0.8):
    r"""Adafactor's increasing decay :math:`\hat\beta_{2,t} = 1 - (t+1)^{-c}`."""
    t = jnp.asarray(step + 1, jnp.float32)
    return 1.0 - t ** (-exponent)


def _factored_axes(shape, factored: bool, min_dim_size_to_factor: int):
    """(row-reduced axis, col-reduced axis): the two largest axes, when both are large enough."""
    if not factored or len(shape) < 2:
        return None
    order = np.argsort(shape)
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return int(order[-2]), int(order[-1])


def scale_by_factored_rms(
    factored: bool = True,
    decay_rate=0.8,
    step_offset=0,
    min_dim_size_to_factor: int = 128,
    epsilon=1e-30,
    decay_rate_fn=adafactor_decay_rate,
) -> optax.GradientTransformation:
    r"""Adafactor's second-moment scaling with factored statistics for large matrices.

    For a matrix leaf with large axes (r, c):
    :math:`R_t = \hat\beta_t R_{t-1} + (1-\hat\beta_t)\,\mathrm{mean}_c(g^2+\epsilon)`,
    :math:`C_t` likewise over r, and :math:`u = g / \sqrt{(R_t/\bar R_t) \otimes C_t}`; other leaves
    keep a full :math:`v_t` and :math:`u = g/\sqrt{v_t}`. State: `optax.FactoredState(count, v_row, v_col, v)`
    with the same per-leaf shapes as Optax (size-1 placeholders where a statistic is unused).

    References:
      Shazeer & Stern, *Adafactor: Adaptive Learning Rates with Sublinear Memory Cost*, ICML 2018.
    """
    epsilon = check.non_negative("scale_by_factored_rms", "epsilon", epsilon)

    def init(params):
        def one(p):
            p = p if hasattr(p, "shape") else jnp.asarray(p)  # Python scalars, as Optax takes them
            axes = _factored_axes(p.shape, factored, min_dim_size_to_factor)
            small = jnp.zeros((1,), p.dtype)
            # Statistics laid out like the dims of p they keep (sharded like p under jit too).
            zeros = (
                full_like_dims
                if isinstance(p, jax.Array)
                else (lambda p, dims: jnp.zeros(tuple(p.shape[i] for i in dims), p.dtype))
            )
            if axes is None:
                return small, small, zeros(p, range(p.ndim))
            d1, d0 = axes
            row = zeros(p, [i for i in range(p.ndim) if i != d0])
            col = zeros(p, [i for i in range(p.ndim) if i != d1])
            return row, col, small

        out = jax.tree.map(one, params)
        is_triple = lambda x: isinstance(x, tuple) and len(x) == 3 and all(hasattr(a, "shape") for a in x)
        pick = lambda k: jax.tree.map(lambda t: t[k], out, is_leaf=is_triple)
        return optax.FactoredState(count=zero_count(), v_row=pick(0), v_col=pick(1), v=pick(2))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("scale_by_factored_rms requires params: call update(updates, state, params).")
        if not isinstance(state, optax.FactoredState):
            raise TypeError(
                f"update(): scale_by_factored_rms expected optax.FactoredState, got {type(state).__name__}."
            )
        beta = decay_rate_fn(state.count - step_offset, decay_rate)

        def one(g, v_row, v_col, v, p):
            g, p = jnp.asarray(g), jnp.asarray(p)
            dtype = p.dtype
            g2 = abs_sq(g) + epsilon
            axes = _factored_axes(p.shape, factored, min_dim_size_to_factor)
            small = jnp.zeros((1,), dtype)
            if axes is None:
                v = (beta * v + (1.0 - beta) * g2).astype(dtype)
                return g * v**-0.5, small, small, v
            d1, d0 = axes
            v_row = (beta * v_row + (1.0 - beta) * jnp.mean(g2, axis=d0)).astype(dtype)
            v_col = (beta * v_col + (1.0 - beta) * jnp.mean(g2, axis=d1)).astype(dtype)
            row_axis_in_row = d1 - 1 if d1 > d0 else d1
            row_factor = (v_row / jnp.mean(v_row, axis=row_axis_in_row, keepdims=True)) ** -0.5
            col_factor = v_col**-0.5
            u = g * jnp.expand_dims(row_factor, d0) * jnp.expand_dims(col_factor, d1)
            return u, v_row, v_col, small

        leaves, treedef = jax.tree.flatten(grads)
        rows, cols, vs, ps = (treedef.flatten_up_to(t) for t in (state.v_row, state.v_col, state.v, params))
        outs = [one(*a) for a in zip(leaves, rows, cols, vs, ps)]
        unflat = lambda k: treedef.unflatten([o[k] for o in outs])
        new_state = optax.FactoredState(count=increment(state.count), v_row=unflat(1), v_col=unflat(2), v=unflat(3))
        return unflat(0), new_state

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # accepted, as every Optax transformation does
        return update(updates, state, params)

    return optax.GradientTransformationExtraArgs(init, update_fn)
