"""What a fused-pass kernel reads its scalars through, on every backend.

A body gets two indexable objects, `shared` (step-wide values: bias corrections, learning rate,
clip factor) and `leaf` (this leaf's values: a mask, a trust ratio), whose `[j]` reads one f32
scalar from a kernel ref (SMEM on TPU and Mosaic GPU, a whole-array ref on Triton): scalars stay
scalars inside the kernel instead of being broadcast to blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["ScalarRef", "check_outputs", "scalar_vector"]


class ScalarRef:
    """`s[j]` inside a kernel: scalar `offset + j` of a f32 scalar ref (SMEM on TPU)."""

    def __init__(self, ref, size: int, offset: int = 0):
        self._ref, self._size, self._offset = ref, size, offset

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, j):
        if not isinstance(j, int) or not -self._size <= j < self._size:
            raise IndexError(f"scalar index {j!r} out of range for {self._size} scalars.")
        return self._ref[self._offset + j % self._size]


def scalar_vector(values: jax.Array) -> jax.Array:
    """A f32 vector of at least one element (a kernel operand may not be empty)."""
    values = jnp.asarray(values, jnp.float32).reshape(-1)
    return values if values.shape[0] else jnp.zeros((1,), jnp.float32)


def check_outputs(outs, n_out):
    if len(outs) != n_out:
        raise ValueError(f"fused_pass_pallas(body): body returned {len(outs)} outputs, out_dtypes has {n_out}.")
