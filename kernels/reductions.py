"""Global reductions the fused pass needs first: sum of squares over all leaves, per leaf.

These produce the scalars a fused run reads (the global norm for `clip_by_global_norm`, the
per-leaf norms for the LARS/LAMB trust ratio, the per-leaf RMS for Adafactor's block clipping).
Sums accumulate in f32 whatever the storage dtype. On the Pallas backends all leaves share a few
multi-tensor launches (`optax_ext.kernels.norms`), on each device's shards when they are sharded.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp

from optax_ext.kernels import backend as _backend


def sq_norm_reference(x: jax.Array) -> jax.Array:
    """sum(|x|**2) of one array: in f32, or f64 for 64-bit (and complex128) leaves, as Optax's global_norm."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.abs(x)
    x = x.astype(jnp.promote_types(jnp.float32, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)
    return jnp.sum(x * x)


def _on_kernels(x) -> bool:
    from optax_ext.kernels.elementwise import PALLAS_DTYPES

    return jnp.dtype(jnp.result_type(x)) in PALLAS_DTYPES


# Reductions of the same leaves within one optimizer step are computed once (apply_if_finite's test
# and clip_by_global_norm's norm read the gradients in one pass): keyed by the leaves' identities,
# alive for the duration of `sharing()`.
_shared: contextvars.ContextVar[dict | None] = contextvars.ContextVar("optax_ext_shared_norms", default=None)


@contextlib.contextmanager
def sharing() -> Iterator[None]:
    """Within this block, a global sum of squares of the same leaf objects is computed once."""
    token = _shared.set({})
    try:
        yield
    finally:
        _shared.reset(token)


def _per_shard_sums(leaves, name, total: bool, count_nonfinite: bool = False):
    """Per-leaf sums of squares (or their total) from the kernels on each device's shards.

    Each device sums its shard of every leaf; a leaf's partial sums are then `psum`-ed over
    exactly the mesh axes that leaf is split over (a replicated leaf is not counted twice).
    """
    from optax_ext.kernels import norms, sharding  # Pallas path; imported lazily.

    factors = [tuple(f"l{k}d{d}" for d in range(jnp.ndim(x))) for k, x in enumerate(leaves)]

    def local(xs, axes):
        groups: dict[tuple, list[int]] = {}  # mesh axes -> the leaves split over exactly those
        for k, dims in enumerate(factors):
            leaf_axes = tuple(sorted({a for f in dims for a in axes.get(f, ())}))
            groups.setdefault(leaf_axes, []).append(k)
        if total:
            out = [jnp.zeros((), jnp.float32)] * (2 if count_nonfinite else 1)
            for leaf_axes, ks in groups.items():
                part = norms.global_sq_norm_pallas([xs[k] for k in ks], backend=name, count_nonfinite=count_nonfinite)
                part = list(part) if count_nonfinite else [part]
                out = [o + (jax.lax.psum(v, leaf_axes) if leaf_axes else v) for o, v in zip(out, part)]
            return out
        sums = norms.leaf_sq_norms_pallas(xs, backend=name)
        for leaf_axes, ks in groups.items():
            if leaf_axes:
                summed = jax.lax.psum(jnp.stack([sums[k] for k in ks]), leaf_axes)
                for i, k in enumerate(ks):
                    sums[k] = summed[i]
        return sums

    results = ((),) * (2 if count_nonfinite else 1) if total else tuple(() for _ in leaves)
    rule = sharding.Rule(tuple(factors), results, name="sum of squares")
    avals = [jax.ShapeDtypeStruct((), jnp.float32)] * len(results)
    return sharding.per_shard(local, list(leaves), rule, avals)


def leaf_sq_norms(leaves: Sequence[jax.Array], *, backend: str | None = None) -> list[jax.Array]:
    """[sum(|x|**2) for x in leaves], each a scalar (f32; f64 for 64-bit leaves)."""
    name = backend or _backend.get_backend()
    kernel = [] if name == "xla" else [i for i, x in enumerate(leaves) if _on_kernels(x)]
    out = [None if i in set(kernel) else sq_norm_reference(x) for i, x in enumerate(leaves)]
    if kernel:
        for i, v in zip(kernel, _per_shard_sums([leaves[i] for i in kernel], name, total=False)):
            out[i] = v
    return out


def global_sq_norm(leaves: Sequence[jax.Array], *, backend: str | None = None) -> jax.Array:
    """sum over leaves of sum(|x|**2): the square of the global L2 norm (f32; f64 with 64-bit leaves)."""
    cache = _shared.get()
    key = tuple(id(x) for x in leaves)
    if cache is not None and key in cache:
        return cache[key]
    total, _ = _global(leaves, backend, count_nonfinite=False)
    if cache is not None:
        cache[key] = total
    return total


def global_sq_norm_and_finite(leaves: Sequence[jax.Array], *, backend: str | None = None):
    """(sum of |x|**2 over all leaves, whether every element is finite), from one pass over the data.

    The sum is shared with a later `global_sq_norm` of the same leaves inside `sharing()`.
    """
    total, nonfinite = _global(leaves, backend, count_nonfinite=True)
    cache = _shared.get()
    if cache is not None:
        cache[tuple(id(x) for x in leaves)] = total
    return total, nonfinite == 0


def _global(leaves, backend, count_nonfinite):
    name = backend or _backend.get_backend()
    kernel = [] if name == "xla" else [x for x in leaves if _on_kernels(x)]
    rest = [x for x in leaves if name == "xla" or not _on_kernels(x)]
    total, nonfinite = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    if kernel:
        out = _per_shard_sums(kernel, name, total=True, count_nonfinite=count_nonfinite)
        total = out[0]
        nonfinite = out[1] if count_nonfinite else nonfinite
    for x in rest:
        total = total + sq_norm_reference(x)
        if count_nonfinite:
            nonfinite = nonfinite + jnp.sum(jnp.where(jnp.isfinite(x), 0.0, 1.0))
    return total, nonfinite
