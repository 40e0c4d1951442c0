"""Global reductions the fused pass needs first: sum of squares over all leaves, per leaf.

These produce the scalars a fused run reads (the global norm for `clip_by_global_norm`, the
per-leaf norms for the LARS/LAMB trust ratio, the per-leaf RMS for Adafactor's block clipping).
Sums accumulate in f32 whatever the storage dtype. On the Pallas backends all leaves share a few
multi-tensor launches (`optax_ext.kernels.norms`), on each device's shards when they are sharded.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from optax_ext.kernels import backend as _backend


def sq_norm_reference(x: jax.Array) -> jax.Array:
    """sum(x**2) of one array in f32."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.sum(x * x)


def _per_shard_sums(leaves, name, total: bool):
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
            out = jnp.zeros((), jnp.float32)
            for leaf_axes, ks in groups.items():
                part = norms.global_sq_norm_pallas([xs[k] for k in ks], backend=name)
                out = out + (jax.lax.psum(part, leaf_axes) if leaf_axes else part)
            return [out]
        sums = norms.leaf_sq_norms_pallas(xs, backend=name)
        for leaf_axes, ks in groups.items():
            if leaf_axes:
                summed = jax.lax.psum(jnp.stack([sums[k] for k in ks]), leaf_axes)
                for i, k in enumerate(ks):
                    sums[k] = summed[i]
        return sums

    results = ((),) if total else tuple(() for _ in leaves)
    rule = sharding.Rule(tuple(factors), results, name="sum of squares")
    avals = [jax.ShapeDtypeStruct((), jnp.float32)] * len(results)
    return sharding.per_shard(local, list(leaves), rule, avals)


def leaf_sq_norms(leaves: Sequence[jax.Array], *, backend: str | None = None) -> list[jax.Array]:
    """[sum(x**2) for x in leaves], each a f32 scalar."""
    name = backend or _backend.get_backend()
    if name == "xla" or not leaves:
        return [sq_norm_reference(x) for x in leaves]
    return _per_shard_sums(leaves, name, total=False)


def global_sq_norm(leaves: Sequence[jax.Array], *, backend: str | None = None) -> jax.Array:
    """sum over leaves of sum(x**2): the square of the global L2 norm, f32."""
    name = backend or _backend.get_backend()
    if name == "xla" or not leaves:
        return sum((sq_norm_reference(x) for x in leaves), jnp.zeros((), jnp.float32))
    (total,) = _per_shard_sums(leaves, name, total=True)
    return total
