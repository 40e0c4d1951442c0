"""Small pieces every transformation uses: zeros like params, the step counter, hyperparameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from optax_ext.fusion import scalar  # noqa: F401  (re-exported: one definition of a step-wide scalar's dtype)
from optax_ext.quantization import Int8Blockwise, QuantFormat, variables_inside, zeros_quantized
from optax_ext.quantization import _is_variable as is_variable
from optax_ext.tree_checks import tree_difference


def full_like_dims(p, dims, fill=0.0, dtype=None) -> jax.Array:
    """`fill` in the shape of `p`'s dims `dims` (indices into p.shape), laid out like those dims of `p`.

    Under `jax.jit` over a mesh the result is sharded like `p`'s dims (Auto axes: a partitioned op
    whose sharding rule ties the dims; Explicit axes: per shard), so `jax.jit(tx.init)(params)`
    keeps the params' sharding in the optimizer state, as eager init does. Nothing of `p` is read.
    """
    from optax_ext.kernels import sharding

    dtype = jnp.dtype(dtype or p.dtype)
    factors = tuple(f"d{i}" for i in range(p.ndim))
    # The fill value is an operand: it may be traced (optax.inject_hyperparams' initial_scale).
    rule = sharding.Rule((factors, ()), (tuple(factors[i] for i in dims),), name="init")
    shape = tuple(p.shape[i] for i in dims)

    def local(xs, axes):
        return [jnp.full(tuple(xs[0].shape[i] for i in dims), xs[1], dtype)]

    (out,) = sharding.per_shard(local, [p, jnp.asarray(fill, dtype)], rule, [jax.ShapeDtypeStruct(shape, dtype)])
    return out


def zeros_like_params(params, dtype=None, fill=0.0, *, signed: bool = True):
    """A tree of `fill` shaped like `params`; keeps sharding (also under jit); works on ShapeDtypeStruct trees.

    `dtype` is a dtype, None (the params' own), or an `Int8Blockwise` spec: then real floating
    leaves of at least `spec.min_size` elements are `QuantizedArray`s (with the `signed` map: first
    moments; unsigned: second moments) and the others f32. `None` and `optax.MaskedNode` leaves
    pass through (they are empty pytree nodes).
    """
    if isinstance(dtype, Int8Blockwise):
        return jax.tree.map(lambda p: _quantized_in_wrapper(p, dtype, fill, signed), params, is_leaf=is_variable)
    dtype = None if dtype is None else jnp.dtype(dtype)

    def one(p):
        if not hasattr(p, "shape"):  # a Python or NumPy scalar, as Optax accepts: init(1.0)
            p = jnp.asarray(p)
        if isinstance(p, jax.Array):
            return full_like_dims(p, range(p.ndim), fill, dtype)
        return jnp.full(p.shape, fill, dtype or p.dtype)

    return jax.tree.map(one, params)


def _quantized_in_wrapper(p, spec: Int8Blockwise, fill, signed: bool):
    """`_quantized_like` of a leaf, or of a Flax NNX Variable's value, in the layout NNX round-trips:
    a Variable around each array of the `QuantizedArray` (see `optax_ext.quantization.variables_inside`)."""
    return variables_inside(jax.tree.map(lambda x: _quantized_like(x, spec, fill, signed), p))


def _quantized_like(p, spec: Int8Blockwise, fill, signed: bool):
    shape, p_dtype = jnp.shape(p), jnp.result_type(p)
    size = int(np.prod(shape, dtype=np.int64))
    if not spec.applies_to(size, p_dtype):
        return zeros_like_params(p, jnp.float32 if jnp.issubdtype(p_dtype, jnp.floating) else None, fill)
    # Codes laid out like the params (sharding kept), as every other slot.
    return zeros_quantized(
        shape,
        QuantFormat(spec.block_size, signed),
        fill,
        full=lambda code, dtype: zeros_like_params(p, dtype, fill=code),
    )


def zero_count() -> jax.Array:
    return jnp.zeros([], jnp.int32)


def increment(count: jax.Array) -> jax.Array:
    """count + 1, saturating at the dtype's maximum instead of wrapping around."""
    top = np.iinfo(jnp.asarray(count).dtype).max
    return jnp.where(count < top, count + 1, count)


def value_at(hyperparameter, count):
    """A hyperparameter's value at this step: schedules (callables) are called with the count."""
    return hyperparameter(count) if callable(hyperparameter) else hyperparameter


def abs_sq(x) -> jax.Array:
    """|x|^2: x * x for real x, Re(conj(x) x) for complex (second moments of complex gradients, as Optax)."""
    return (jnp.conj(x) * x).real if jnp.iscomplexobj(x) else x * x


def mask_leaves(mask, params) -> list[bool] | list[jax.Array]:
    """The mask as one boolean per leaf of `params` (mask: bool, callable, or a prefix tree)."""
    if callable(mask):
        mask = mask(params)
    leaves = jax.tree.leaves(params)
    if isinstance(mask, (bool, np.bool_)):
        return [bool(mask)] * len(leaves)
    mask_def = jax.tree.structure(mask)
    try:
        subtrees = mask_def.flatten_up_to(params)
    except (ValueError, TypeError):
        where = tree_difference(mask, params, "mask", "params", prefix=True) or "another tree structure"
        raise ValueError(f"mask must have the structure of params (or a prefix of it); {where}.") from None
    out = []
    for m, sub in zip(jax.tree.leaves(mask), subtrees):
        out.extend([m] * len(jax.tree.leaves(sub)))
    return out


def init_checking_mask(init, mask):
    """`init`, first checking that `mask` fits the params (as Optax's masked transformations do at
    init): a mask of the wrong structure fails where the optimizer is built, not at the first step."""
    if mask is None or isinstance(mask, (bool, np.bool_)):
        return init

    def checked(params):
        mask_leaves(mask, params)
        return init(params)

    return checked


def per_leaf_tree(params, values):
    """Put one value per leaf of `params` back into its tree structure."""
    return jax.tree.structure(params).unflatten(values)
