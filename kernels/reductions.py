"""Global reductions the fused pass needs first: sum of squares over all leaves, per leaf.

These produce the scalars a fused run reads (the global norm for `clip_by_global_norm`, the
per-leaf norms for the LARS/LAMB trust ratio, the per-leaf RMS for Adafactor's block clipping).
Sums accumulate in f32 whatever the storage dtype.
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


def leaf_sq_norms(leaves: Sequence[jax.Array], *, backend: str | None = None) -> list[jax.Array]:
    """[sum(x**2) for x in leaves], each a f32 scalar."""
    name = backend or _backend.get_backend()
    if name == "xla" or not leaves or _backend.explicitly_sharded(*leaves):
        return [sq_norm_reference(x) for x in leaves]
    from optax_ext.kernels import norms  # Pallas path; imported lazily.

    return norms.leaf_sq_norms_pallas(leaves, backend=name)


def global_sq_norm(leaves: Sequence[jax.Array], *, backend: str | None = None) -> jax.Array:
    """sum over leaves of sum(x**2): the square of the global L2 norm, f32."""
    parts = leaf_sq_norms(leaves, backend=backend)
    return sum(parts, jnp.zeros((), jnp.float32))
