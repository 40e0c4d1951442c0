"""Pallas kernels and their jnp references, installed as `optax_ext.kernels`.

Backend selection lives in `optax_ext.kernels.backend`; see `use_backend` and `OPTAX_EXT_BACKEND`.
"""

from optax_ext.kernels.backend import BACKENDS, get_backend, platform_backend, use_backend

__all__ = ["BACKENDS", "get_backend", "platform_backend", "use_backend"]
