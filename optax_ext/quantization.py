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

Everything a kernel needs is elementwise or a per-block max, with no table in memory:
`encode` finds the nearest code analytically (the decade by six comparisons, the position in it by
rounding, the neighbours on both sides compared, first minimum on ties like an argmin) and `decode`
inverts it; `quantize_blocks`/`dequantize_blocks` work on a run of whole blocks (a kernel's block, or
a padded leaf on XLA), so the fused pass and the XLA path compute the same codes.
`dynamic_map` builds the map exactly as the paper's reference code, and `quantize_reference` is the
float64 argmin over it: the tests' ground truth.

Storage: `Int8Blockwise` is the spec an optimizer's `mu_dtype`/`nu_dtype` accept;
`QuantizedArray(codes, absmax)` is the stored pytree (two arrays; sign and block size are static).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Int8Blockwise",
    "QuantFormat",
    "QuantizedArray",
    "decode",
    "decode_reference",
    "dequantize_blocks",
    "dequantize_leaf",
    "dynamic_map",
    "encode",
    "int8_blockwise",
    "quantize_blocks",
    "quantize_blockwise_reference",
    "quantize_leaf",
    "quantize_reference",
    "zero_code",
    "zeros_quantized",
]

LEVELS = 7  # exponent levels: values from 10^-7 to 1


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


@dataclasses.dataclass(frozen=True)
class Int8Blockwise:
    """Storage spec for a moment: 8-bit dynamic codes plus an f32 absmax per `block_size` elements.

    Accepted wherever a moment dtype is (`mu_dtype`, `nu_dtype`); real floating-point leaves with at
    least `min_size` elements are quantized, smaller (and complex) ones stay f32 (their absmax and
    code bookkeeping would cost more than they save). State bytes per element: 1 + 4 / block_size
    (1.016 at the default 256).
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

    def applies_to(self, size: int, dtype=jnp.float32) -> bool:
        return size >= self.min_size and jnp.issubdtype(dtype, jnp.floating)

    def num_blocks(self, size: int) -> int:
        return -(-size // self.block_size)


int8_blockwise = Int8Blockwise()


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """How one quantized array is stored: its block size and which map (signed: first moments)."""

    block_size: int
    signed: bool

    def num_blocks(self, size: int) -> int:
        return -(-size // self.block_size)


@jax.tree_util.register_pytree_with_keys_class
class QuantizedArray:
    """A tensor stored as 8-bit codes (indices into the dynamic map) and one f32 absmax per block.

    A pytree of two arrays: `codes` (uint8, the tensor's shape) and `absmax` (f32, one entry per
    `block_size` elements of the flattened tensor; the last block may be partial). The map (signed
    or not) and the block size are static (`format`), so the state works under `jax.jit`,
    `jax.eval_shape`, sharding, orbax checkpoints and `optax.tree.get`.
    """

    __slots__ = ("codes", "absmax", "format")

    def __init__(self, codes, absmax, format: QuantFormat):  # noqa: A002 - the natural name
        self.codes, self.absmax, self.format = codes, absmax, format

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.codes))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size + 4 * int(np.prod(np.shape(self.absmax)))

    def tree_flatten_with_keys(self):
        return (
            (jax.tree_util.GetAttrKey("codes"), self.codes),
            (jax.tree_util.GetAttrKey("absmax"), self.absmax),
        ), self.format

    @classmethod
    def tree_unflatten(cls, format, children):  # noqa: A002
        return cls(*children, format)

    def __repr__(self):
        fmt = f"block_size={self.format.block_size}, signed={self.format.signed}"
        if hasattr(self.codes, "shape"):
            return f"QuantizedArray(shape={tuple(self.codes.shape)}, {fmt})"
        return f"QuantizedArray(codes={self.codes!r}, absmax={self.absmax!r}, {fmt})"  # after a tree.map


# ---------------------------------------------------------------------------------------------
# The code, analytically: per level (first value, step, count, index of its first value among the
# non-negative part of the map, where 0.0 is index 0).


# --------------------------------------------------------------------------------------------
# Flax NNX Variables around quantized state
#
# Given params wrapped in NNX Variables (`nnx.split(model, nnx.Param)`), a moment slot has the same
# wrapping: each array leaf inside its Variable. A quantized moment is two arrays, so its Variable
# wraps each of them, `QuantizedArray(Param(codes), Param(absmax))` ("inside"): that is the layout
# `nnx.Optimizer` round-trips (a Variable holding a QuantizedArray comes back from `nnx.update`
# as an `nnx.State` of its two arrays). To match the state against the updates' tree, which has
# `Param(array)` at that position, the update uses the "outside" layout, `Param(QuantizedArray)`.


def _is_variable(x) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def _is_quantized(x) -> bool:
    return isinstance(x, QuantizedArray)


def variables_outside(tree):
    """`QuantizedArray(Variable(codes), Variable(absmax))` -> `Variable(QuantizedArray(codes, absmax))`."""

    def one(x):
        if not (_is_quantized(x) and _is_variable(x.codes)):
            return x
        (codes,), (absmax,) = jax.tree.leaves(x.codes), jax.tree.leaves(x.absmax)
        return jax.tree.map(lambda _: QuantizedArray(codes, absmax, x.format), x.codes)

    return jax.tree.map(one, tree, is_leaf=_is_quantized)


def variables_inside(tree):
    """`Variable(QuantizedArray(codes, absmax))` -> `QuantizedArray(Variable(codes), Variable(absmax))`."""

    def holds_quantized(x):
        return _is_variable(x) and any(map(_is_quantized, jax.tree.leaves(x, is_leaf=_is_quantized)))

    def one(x):
        if not holds_quantized(x):
            return x
        (q,) = jax.tree.leaves(x, is_leaf=_is_quantized)
        return jax.tree.map(lambda leaf: jax.tree.map(lambda _: leaf, x, is_leaf=_is_quantized), q)

    return jax.tree.map(one, tree, is_leaf=holds_quantized)


def _levels(signed: bool):
    out, offset = [], 1
    for i in range(LEVELS):
        count = 2**i if signed else 2 ** (i + 1)
        scale = 10.0 ** (i - (LEVELS - 1))
        step = scale * 0.9 / count
        out.append((scale * 0.1 + step / 2, step, count, offset))
        offset += count
    return out


def zero_code(signed: bool) -> int:
    """The code of 0.0: 127 in the signed map (127 negative values below it), 0 in the unsigned one."""
    return 127 if signed else 0


def _select(level, values, dtype):
    """values[level] for a traced int level, by comparisons (no table: kernels cannot gather)."""
    out = jnp.full(jnp.shape(level), values[0], dtype)
    for i, v in enumerate(values[1:], 1):
        out = jnp.where(level >= i, jnp.asarray(v, dtype), out)
    return out


def _nonnegative_index(a, signed: bool):
    """Index of the nearest value to a >= 0 in the non-negative part of the map (f32 math)."""
    levels = _levels(signed)
    f32 = jnp.float32
    # The decade: level i holds [10^(i-7), 10^(i-6)].
    level = sum((a >= f32(10.0 ** (i - LEVELS))).astype(jnp.int32) for i in range(1, LEVELS))
    first = _select(level, [lv[0] for lv in levels], f32)
    step = _select(level, [lv[1] for lv in levels], f32)
    count = _select(level, [lv[2] for lv in levels], jnp.int32)
    offset = _select(level, [lv[3] for lv in levels], jnp.int32)
    # Neighbours across the level's ends: the previous level's last value (0.0 below level 0) and
    # the next level's first value (1.0 above level 6).
    prev = _select(level, [0.0] + [lv[0] + (lv[2] - 1) * lv[1] for lv in levels[:-1]], f32)
    nxt = _select(level, [lv[0] for lv in levels[1:]] + [1.0], f32)
    best_i, best_d = offset - 1, jnp.abs(a - prev)
    # floor(t + 0.5) without floor or round (Triton has no round, Mosaic GPU neither): a cast
    # truncates, which is the floor for t + 0.5 >= 0; below, 0 instead of a negative index adds
    # only candidate 1, never nearer than 0 there. Exact ties are settled by the comparisons.
    nearest = jnp.maximum((a - first) / step + 0.5, 0.0).astype(jnp.int32)
    for shift in (-1, 0, 1):  # f32 rounding of (a - first) / step may pick the wrong side of a midpoint
        j = jnp.clip(nearest + shift, 0, count - 1)
        d = jnp.abs(a - (first + j.astype(f32) * step))
        better = d < best_d  # strict: the first minimum on ties, as an argmin
        best_i, best_d = jnp.where(better, offset + j, best_i), jnp.where(better, d, best_d)
    return jnp.where(jnp.abs(a - nxt) < best_d, offset + count, best_i)


def encode(x, signed: bool) -> jax.Array:
    """int32 codes (0..255) of values x in [-1, 1] ([0, 1] unsigned): the index of the nearest map value."""
    x = jnp.asarray(x, jnp.float32)
    if not signed:
        return _nonnegative_index(jnp.maximum(x, 0.0), False)
    pos = _nonnegative_index(jnp.abs(x), True)
    # No -1.0 in the signed map: the largest magnitude below zero is the last level's.
    return jnp.where(x < 0, 127 - jnp.minimum(pos, 127), 127 + pos)


def decode(codes, signed: bool) -> jax.Array:
    """f32 map values of integer codes, computed from the level structure (the inverse of `encode`)."""
    c = jnp.asarray(codes).astype(jnp.int32)
    levels = _levels(signed)
    pos = jnp.abs(c - 127) if signed else c
    top = levels[-1][3] + levels[-1][2]  # index of 1.0
    level = sum((pos >= lv[3]).astype(jnp.int32) for lv in levels[1:])
    first = _select(level, [lv[0] for lv in levels], jnp.float32)
    step = _select(level, [lv[1] for lv in levels], jnp.float32)
    offset = _select(level, [lv[3] for lv in levels], jnp.int32)
    value = first + (pos - offset).astype(jnp.float32) * step
    value = jnp.where(pos == 0, 0.0, jnp.where(pos >= top, 1.0, value))
    return jnp.where(c < 127, -value, value) if signed else value


def quantize_blocks(values, block_size: int, signed: bool, valid=None):
    """(int32 codes, f32 absmax) of a 1-D run of whole blocks (length a multiple of `block_size`).

    `valid` (bool, like `values`) marks the elements that exist: the others count as 0 in their
    block's absmax (the padded tail of a leaf's last block).
    """
    v = jnp.asarray(values, jnp.float32)
    if valid is not None:
        v = jnp.where(valid, v, 0.0)
    w = v.reshape(v.shape[0] // block_size, block_size)
    absmax = jnp.max(jnp.abs(w), axis=1)
    normalized = w / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    return encode(normalized, signed).reshape(v.shape[0]), absmax


def dequantize_blocks(codes, absmax, block_size: int, signed: bool):
    """f32 values of a 1-D run of whole blocks: map value of each code times its block's absmax."""
    v = decode(codes, signed)
    return (v.reshape(v.shape[0] // block_size, block_size) * absmax[:, None]).reshape(v.shape[0])


def quantize_leaf(x, fmt: QuantFormat) -> QuantizedArray:
    """Blockwise quantization of any-shape `x` (blocks over the flattened tensor)."""
    x = jnp.asarray(x, jnp.float32)
    n, b = x.size, fmt.block_size
    flat = jnp.pad(x.reshape(-1), (0, fmt.num_blocks(n) * b - n))
    codes, absmax = quantize_blocks(flat, b, fmt.signed)
    return QuantizedArray(codes[:n].astype(jnp.uint8).reshape(x.shape), absmax, fmt)


def dequantize_leaf(q: QuantizedArray) -> jax.Array:
    """f32 values of a `QuantizedArray`, shaped like the tensor."""
    fmt = q.format
    n, b = q.size, fmt.block_size
    flat = jnp.pad(q.codes.reshape(-1), (0, fmt.num_blocks(n) * b - n), constant_values=zero_code(fmt.signed))
    return dequantize_blocks(flat, q.absmax, b, fmt.signed)[:n].reshape(q.shape)


def zeros_quantized(shape, fmt: QuantFormat, fill=0.0, *, full=None) -> QuantizedArray:
    """`fill` everywhere, quantized without a pass over the array: every block's absmax is |fill|
    and every code that of sign(fill), as `quantize_leaf` of the full array gives (exactly 0.0 for
    fill 0). `full(value, dtype)` builds the codes (default `jnp.full(shape, ...)`): a caller may lay
    them out like another array (the params' sharding)."""
    fill = jnp.asarray(fill, jnp.float32)
    code = encode(jnp.sign(fill), fmt.signed).astype(jnp.uint8)
    codes = jnp.full(shape, code, jnp.uint8) if full is None else full(code, jnp.uint8)
    size = int(np.prod(shape, dtype=np.int64))
    return QuantizedArray(codes, jnp.full((fmt.num_blocks(size),), jnp.abs(fill), jnp.float32), fmt)


# ---------------------------------------------------------------------------------------------
# References for the tests: float64, table-based.


def decode_reference(codes, signed: bool) -> np.ndarray:
    """The map values of `codes`, float64, by table lookup."""
    return dynamic_map(signed)[np.asarray(codes).astype(np.int64)]


def quantize_reference(x: np.ndarray, signed: bool) -> np.ndarray:
    """float64 numpy reference: argmin over the 256 map values (first minimum on ties)."""
    table = dynamic_map(signed)
    x = np.asarray(x, np.float64)
    return np.argmin(np.abs(x[..., None] - table), axis=-1).astype(np.uint8)


def quantize_blockwise_reference(x: np.ndarray, block_size: int, signed: bool):
    """float64 numpy reference of `quantize_leaf`: (codes, absmax)."""
    x = np.asarray(x, np.float64)
    flat = x.reshape(-1)
    codes = np.zeros(flat.shape, np.uint8)
    absmax = []
    for start in range(0, flat.size, block_size):
        block = flat[start : start + block_size]
        m = float(np.max(np.abs(block))) if block.size else 0.0
        absmax.append(m)
        codes[start : start + block_size] = quantize_reference(block / m if m > 0 else block, signed)
    return codes.reshape(x.shape), np.asarray(absmax)
