"""Global reductions the fused pass needs first: sum of squares over all leaves, per leaf.

These produce the scalars a fused run reads (the global norm for `clip_by_global_norm`, the
per-leaf norms for the LARS/LAMB trust ratio, the per-leaf RMS for Adafactor's block clipping).
Sums accumulate in f32 whatever the storage dtype. On the Pallas backends all leaves share a few
multi-tensor launches (`optax_ext.kernels.norms`); leaves sharded over explicit mesh axes are
reduced in jnp, which XLA partitions.
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


def _split(leaves, name):
    """Indices of the leaves the kernels take, and of those jnp takes."""
    if name == "xla":
        return [], list(range(len(leaves)))
    sharded = [i for i, x in enumerate(leaves) if _backend.explicitly_sharded(x)]
    return [i for i in range(len(leaves)) if i not in set(sharded)], sharded


def leaf_sq_norms(leaves: Sequence[jax.Array], *, backend: str | None = None) -> list[jax.Array]:
    """[sum(x**2) for x in leaves], each a f32 scalar."""
    name = backend or _backend.get_backend()
    kernel, jnp_side = _split(leaves, name)
    out: list = [None] * len(leaves)
    if kernel:
        from optax_ext.kernels import norms  # Pallas path; imported lazily.

        for i, v in zip(kernel, norms.leaf_sq_norms_pallas([leaves[i] for i in kernel], backend=name)):
            out[i] = v
    for i in jnp_side:
        out[i] = sq_norm_reference(leaves[i])
    return out


def global_sq_norm(leaves: Sequence[jax.Array], *, backend: str | None = None) -> jax.Array:
    """sum over leaves of sum(x**2): the square of the global L2 norm, f32."""
    name = backend or _backend.get_backend()
    kernel, jnp_side = _split(leaves, name)
    total = jnp.zeros((), jnp.float32)
    if kernel:
        from optax_ext.kernels import norms  # Pallas path; imported lazily.

        total = norms.global_sq_norm_pallas([leaves[i] for i in kernel], backend=name)
    for i in jnp_side:
        total = total + sq_norm_reference(leaves[i])
    return total
