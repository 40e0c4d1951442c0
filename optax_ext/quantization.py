r"""Blockwise 8-bit storage of optimizer moments with the dynamic (non-linear) code of bitsandbytes.

Dettmers et al., *8-bit Optimizers via Block-wise Quantization*, ICLR 2022: a moment tensor is cut
into blocks of `block_size` elements; each block keeps one f32 `absmax` and one 8-bit code per
element, the index of the nearest value of a fixed 256-entry map to :math:`x / \mathrm{absmax}`.
The *dynamic* map (Dettmers, *8-Bit Approximations for Parallelism in Deep Learning*, ICLR 2016)
spends its codes where moments live: for exponent levels :math:`i = 0, \dots, 6`,

.. math::
    v_{ij} = 10^{\,i-6}\; \tfrac12\,(b_j + b_{j+1}),\qquad b = \mathrm{linspace}(0.1, 1, K_i + 1),

with :math:`K_i = 2^i` values per level and a sign (signed map, first moments) or
:math:`K_i = 2^{i+1}` values (unsigned map, second moments), plus 0 and 1. The relative error is
then about constant over seven decades instead of linear quantization's absolute error.

`dynamic_map(signed)` builds the map exactly as the paper's reference code; `quantize` finds the
nearest code analytically (the decade by comparisons with the level boundaries, the fraction by
rounding, the neighbours across a level boundary compared), so a kernel needs no table search;
`quantize_reference` is the float64 argmin over the map. `Int8Blockwise` is the storage spec an
optimizer's `mu_dtype`/`nu_dtype` accept; `QuantizedArray(codes, absmax)` is the stored pytree.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Int8Blockwise", "QuantizedArray", "dequantize", "dequantize_blockwise", "dynamic_map", "int8_blockwise",
           "quantize", "quantize_blockwise", "quantize_blockwise_reference", "quantize_reference"]

LEVELS = 7  # exponent levels: values from 10^-6 to 1


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 sorted values of the dynamic code (float64), as in Dettmers et al.'s reference code."""
    values = [0.0, 1.0]
    for i in range(LEVELS):
        items = 2**i if signed else 2 ** (i + 1)
        bounds = np.linspace(0.1, 1.0, items + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += list(10.0 ** (i - (LEVELS - 1)) * means)
        if signed:
            values += list(-(10.0 ** (i - (LEVELS - 1))) * means)
    assert len(values) == 256
    return np.sort(np.asarray(values, np.float64))


class QuantizedArray(NamedTuple):
    """A tensor stored as 8-bit codes (indices into the dynamic map) and one f32 absmax per block.

    `codes` has the tensor's shape (uint8); `absmax` has one entry per block of the flattened
    tensor. `signed` (first moments) or not (second moments) is static: it lives in the dtype spec.
    """

    codes: jax.Array
    absmax: jax.Array


@dataclasses.dataclass(frozen=True)
class Int8Blockwise:
    """Storage spec for a moment: 8-bit dynamic codes plus an f32 absmax per `block_size` elements.

    Accepted wherever a moment dtype is (`mu_dtype`, `nu_dtype`); leaves with fewer than `min_size`
    elements stay f32 (their absmax and code bookkeeping would cost more than they save).
    State bytes per element: 1 + 4 / block_size (1.016 at the default 256).
    """

    block_size: int = 256
    min_size: int = 4096

    def __post_init__(self):
        for name in ("block_size", "min_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Int8Blockwise: {name} must be a positive int, got {value!r}.")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"Int8Blockwise: block_size must be a power of 2, got {self.block_size}.")

    def applies_to(self, size: int) -> bool:
        return size >= self.min_size

    def num_blocks(self, size: int) -> int:
        return -(-size // self.block_size)


int8_blockwise = Int8Blockwise()


def _level_values(signed: bool):
    """Per level: (first value, step, count) of its arithmetic run of means, float64."""
    out = []
    for i in range(LEVELS):
        items = 2**i if signed else 2 ** (i + 1)
        scale = 10.0 ** (i - (LEVELS - 1))
        step = 0.9 / items
        out.append((scale * (0.1 + step / 2), scale * step, items))
    return out


def _positive_index(a, signed: bool):
    """Index into the *positive part* of the map (0 = the value 0.0) of the nearest value to a >= 0."""
    levels = _level_values(signed)
    best_i = jnp.zeros(a.shape, jnp.int32)
    best_d = jnp.abs(a)  # distance to 0.0
    offset = 1  # positive-part index of the first value of level i
    for first, step, count in levels:
        nearest = jnp.round((a - first) / step)
        # The neighbours too: f32 rounding of (a - first) / step can pick the wrong side near a midpoint.
        for shift in (-1.0, 0.0, 1.0):
            j = jnp.clip(nearest + shift, 0, count - 1)
            d = jnp.abs(a - (first + j * step))
            better = d < best_d
            best_i = jnp.where(better, offset + j.astype(jnp.int32), best_i)
            best_d = jnp.where(better, d, best_d)
        offset += count
    better = jnp.abs(a - 1.0) < best_d
    return jnp.where(better, offset, best_i)


def quantize(x: jax.Array, signed: bool) -> jax.Array:
    """uint8 codes of values x in [-1, 1] (or [0, 1] unsigned): the index of the nearest map value."""
    x = jnp.asarray(x, jnp.float32)
    if signed:
        zero = 127  # index of 0.0 in the signed map: 127 negative values below it
        pos = _positive_index(jnp.abs(x), True)
        # Negative values have no -1.0: the largest magnitude below zero is the last level's.
        index = jnp.where(x < 0, zero - jnp.minimum(pos, 127), zero + pos)
    else:
        index = _positive_index(jnp.maximum(x, 0.0), False)
    return index.astype(jnp.uint8)


def dequantize(codes: jax.Array, signed: bool) -> jax.Array:
    """The map values of `codes`, as f32 (a 256-entry table lookup)."""
    table = jnp.asarray(dynamic_map(signed), jnp.float32)
    return table[codes.astype(jnp.int32)]


def quantize_reference(x: np.ndarray, signed: bool) -> np.ndarray:
    """float64 numpy reference: argmin over the 256 map values (first minimum on ties)."""
    table = dynamic_map(signed)
    x = np.asarray(x, np.float64)
    return np.argmin(np.abs(x[..., None] - table), axis=-1).astype(np.uint8)


def quantize_blockwise(x: jax.Array, spec: Int8Blockwise, signed: bool) -> QuantizedArray:
    """Blockwise quantization of any-shape `x`: absmax per `spec.block_size` elements of the
    flattened tensor (the last block may be partial), codes of `x / absmax` (0 where absmax is 0)."""
    x = jnp.asarray(x, jnp.float32)
    n, b = x.size, spec.block_size
    nb = spec.num_blocks(n)
    flat = jnp.pad(x.reshape(-1), (0, nb * b - n)).reshape(nb, b)
    absmax = jnp.max(jnp.abs(flat), axis=1)
    normalized = flat / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    codes = quantize(normalized, signed).reshape(-1)[:n].reshape(x.shape)
    return QuantizedArray(codes, absmax)


def dequantize_blockwise(q: QuantizedArray, spec: Int8Blockwise, signed: bool) -> jax.Array:
    """f32 values of a `QuantizedArray`: map value of each code times its block's absmax."""
    n, b = q.codes.size, spec.block_size
    scale = jnp.repeat(q.absmax, b, total_repeat_length=q.absmax.shape[0] * b)[:n].reshape(q.codes.shape)
    return dequantize(q.codes, signed) * scale


def quantize_blockwise_reference(x: np.ndarray, block_size: int, signed: bool):
    """float64 numpy reference of `quantize_blockwise`: (codes, absmax)."""
    x = np.asarray(x, np.float64)
    flat = x.reshape(-1)
    codes = np.zeros(flat.shape, np.uint8)
    absmax = []
    for start in range(0, flat.size, block_size):
        block = flat[start:start + block_size]
        m = float(np.max(np.abs(block))) if block.size else 0.0
        absmax.append(m)
        codes[start:start + block_size] = quantize_reference(block / m if m > 0 else block, signed)
    return codes.reshape(x.shape), np.asarray(absmax)
