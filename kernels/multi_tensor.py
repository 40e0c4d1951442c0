"""Many leaves, one launch: the block table and the leaf switch of the multi-tensor kernels.

A model is hundreds to thousands of leaves, and on a GPU a kernel launch costs a few microseconds,
as much as the memory traffic of a mid-size leaf. So, like PyTorch's `multi_tensor_apply`, one
`pallas_call` serves up to `MAX_LEAVES` leaves, each passed as its own ref (`memory_space=pl.ANY`:
the whole array, no blocking by Pallas). The launch's 1-D grid runs over every block of every leaf:

    leaf k owns programs [start[k], start[k] + num_blocks[k]),   start[k] = sum_{j<k} num_blocks[j]

Program i finds its leaf k by bisecting the static starts (`locate`); a switch on k
(`leaf_switch`, a balanced tree of conds) loads block i - start[k] of leaf k's refs
(`load_blocks`, masked when the leaf is not a whole number of blocks), the composed
per-element math runs once on the loaded values, and a second switch stores the results into
leaf k's outputs (`store_blocks`). Only loads and stores are
repeated per leaf, so a launch's code grows by a few ops per leaf, not by a copy of the math.
Nothing is concatenated, sliced or padded: every element is read once and written once, and
per-leaf scalars (a mask, a trust ratio) stay one value per leaf, read from a small table.

Leaf views. A leaf is a 1-D ref of its n elements (a free reshape). In-kernel element indices
are int32, so a leaf with n > `INDEX_LIMIT` is viewed as (rows, cols) (any split n = rows * cols
with cols <= `INDEX_LIMIT`, also a free reshape), each row cut into blocks like a small leaf;
Pallas' Triton lowering switches to 64-bit pointer offsets for arrays over 4 GiB. A huge leaf
with no such split into rows of at least `MIN_HUGE_COLS` elements (e.g. a prime count over 2^31)
cannot be addressed; `plan` leaves it out and the caller runs it on XLA.

Launch size. Each leaf adds its refs (XLA passes every buffer, input or output, as one 8-byte
kernel argument), a branch to each switch and a leaf to the search. So: `MAX_REFS` keeps a
launch's pointer arguments at 3.75 KiB, under CUDA's classic 4 KiB kernel-parameter limit, and
`MAX_LEAVES` (64) bounds the module size. Finding the leaf and switching on it are bisections
(`locate`, `leaf_switch`): ceil(log2 K) scalar comparisons per program each, nested as deep,
where an AdamW step has ~50 ops per element of a 4096-element block of its own and is
memory-bound. (The linear chain of `lax.switch` cost ~200 scalar ops per program at K = 64 and,
nested 64 deep, ~35 s of Triton compile time for an H100: 5 s with bisection.) An AdamW step
with the update applied (7 refs per leaf: g, p, m, v in; p, m, v out) takes 64 leaves per
launch; torch's `multi_tensor_apply` takes 36 (its tables share the same 4 KiB).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = [
    "INDEX_LIMIT",
    "MAX_LEAVES",
    "MAX_REFS",
    "MIN_HUGE_COLS",
    "Launch",
    "Packed",
    "Segment",
    "load_blocks",
    "leaf_switch",
    "locate",
    "plan",
    "pow2_at_least",
    "select_by_leaf",
    "store_blocks",
    "view_for",
]

INDEX_LIMIT = 2**31 - 2**24
"""Largest row (in elements) a kernel addresses with int32 indices, with room for a block past it."""

MIN_HUGE_COLS = 1 << 16
"""Rows of a huge leaf's 2-D view are at least this long (shorter rows would waste most of a block)."""

MAX_LEAVES = 64
"""Leaves (switch branches) per launch, unless a kernel asks otherwise."""

MAX_REFS = 480
"""Array refs (8-byte pointer arguments) per launch: 3.75 KiB, under CUDA's classic 4 KiB limit."""


def pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Segment:
    """One leaf's place in a launch: the shape of its refs in the kernel and its first program."""

    view: tuple[int, ...]  # (n,) or (rows, cols): a free reshape of the leaf
    start: int = 0  # the launch's first program for this leaf

    @property
    def rows(self) -> int:
        return 1 if len(self.view) == 1 else self.view[0]

    @property
    def cols(self) -> int:
        return self.view[-1]


@dataclasses.dataclass(frozen=True)
class Launch:
    """The leaves of one launch: which leaves (indices into the caller's list), where, what block."""

    leaves: tuple[int, ...]
    segments: tuple[Segment, ...]
    block: int  # elements per program, a power of two, the same for every leaf of the launch

    def blocks_per_row(self, seg: Segment) -> int:
        return -(-seg.cols // self.block)

    def num_blocks(self, seg: Segment) -> int:
        return seg.rows * self.blocks_per_row(seg)

    @property
    def num_programs(self) -> int:
        return self.segments[-1].start + self.num_blocks(self.segments[-1])


def view_for(size: int) -> tuple[int, ...] | None:
    """The view of a leaf of `size` > 0 elements: (size,), (rows, cols) for huge leaves, or None.

    None: too large to address (over `INDEX_LIMIT` without a split into rows of >= `MIN_HUGE_COLS`).
    """
    if size <= INDEX_LIMIT:
        return (size,)
    rows = -(-size // INDEX_LIMIT)
    while rows * MIN_HUGE_COLS <= size:
        if size % rows == 0:
            return rows, size // rows
        rows += 1
    return None


def plan(
    sizes: Sequence[int],
    refs_per_leaf: int | Sequence[int],
    block: int,
    *,
    extra_refs: int = 0,
    max_leaves: int | None = None,
    max_refs: int | None = None,
    min_block: int = 1,
) -> list[Launch]:
    """Group leaves, in order, into launches.

    A launch takes leaves while it has fewer than `max_leaves` and its refs (`refs_per_leaf`, one
    count for all leaves or one per leaf, plus `extra_refs` shared ones, e.g. the scalar vectors)
    stay within `max_refs`. Leaves of size 0 and leaves too large to address (`view_for` -> None)
    are left out: the caller handles them. A launch's block is `block`, or less when all its leaves
    are smaller, but never below `min_block` (a power of 2: e.g. whole quantization blocks).
    """
    max_leaves = MAX_LEAVES if max_leaves is None else max_leaves
    max_refs = MAX_REFS if max_refs is None else max_refs
    refs = [refs_per_leaf] * len(sizes) if isinstance(refs_per_leaf, int) else list(refs_per_leaf)
    addressable = [(i, view_for(n)) for i, n in enumerate(sizes) if n > 0]
    addressable = [(i, v) for i, v in addressable if v is not None]
    groups, used = [], 0
    for i, v in addressable:
        if not groups or len(groups[-1]) >= max_leaves or used + refs[i] > max_refs - extra_refs:
            groups.append([])
            used = 0
        groups[-1].append((i, v))
        used += refs[i]
    launches = []
    for group in groups:
        b = max(min_block, min(block, pow2_at_least(max(v[-1] for _, v in group))))
        segments, start = [], 0
        for _, view in group:
            segments.append(Segment(view, start))
            rows = 1 if len(view) == 1 else view[0]
            start += rows * -(-view[-1] // b)
        launches.append(Launch(tuple(i for i, _ in group), tuple(segments), b))
    return launches


def _bisect(num: int, at_or_above: Callable, leaf_branch: Callable, *operands):
    """`leaf_branch(k, *operands)` for the leaf k that `at_or_above(mid)` (a traced bool: "k >= mid")
    singles out among `num`, by a balanced tree of `lax.cond`: ceil(log2 num) tests, nested as deep."""

    def between(lo: int, hi: int, *ops):
        if hi - lo == 1:
            return leaf_branch(lo, *ops)
        mid = (lo + hi) // 2
        return jax.lax.cond(
            at_or_above(mid), functools.partial(between, mid, hi), functools.partial(between, lo, mid), *ops
        )

    return between(0, num, *operands)


def select_by_leaf(launch: Launch, program, *columns) -> tuple[jax.Array, ...]:
    """`column[k]` of each static per-leaf column, for the leaf k of block `program` (traced): a chain
    of selects over the leaves' starts (K - 1 comparisons, no branch, no table in memory)."""
    values = [jnp.int32(column[0]) for column in columns]
    for k, seg in enumerate(launch.segments[1:], 1):
        later = program >= seg.start
        # `lax.select`, not `jnp.where`: a jnp.where is a nested jit in the kernel, which every
        # backend traces and lowers as a function of its own (~130 per 59-leaf launch).
        values = [jax.lax.select(later, jnp.int32(column[k]), v) for column, v in zip(columns, values)]
    return tuple(values)


def locate(launch: Launch) -> tuple[jax.Array, jax.Array]:
    """Inside a kernel: (leaf, program id). The leaf is the last one whose start is at or below the id.

    Found by bisection over the static starts (`_bisect`, no table in memory): a program runs
    ceil(log2 K) comparisons for a launch of K leaves, and the nesting is as shallow.
    """
    i = pl.program_id(0)
    starts = [seg.start for seg in launch.segments]
    if len(starts) == 1:
        return jnp.int32(0), i
    # `i * 0 + k`: a traced value, since a branch of Triton's scf.if cannot yield a literal.
    return _bisect(len(starts), lambda mid: i >= starts[mid], lambda k, i: i * 0 + k, i), i


def leaf_switch(leaf, branches: Sequence[Callable], *operands):
    """`branches[leaf](*operands)`, as a balanced tree of `lax.cond` (ceil(log2 K) deep, `_bisect`).

    `lax.switch` lowers to a chain of K nested ifs on Pallas' Triton backend: a program of the last
    leaf tests every case, and the nesting K deep is what Triton's compiler spends its time on (a
    64-leaf AdamW launch took ~35 s to compile for an H100). Bisection tests log2 K cases and nests
    log2 K deep, with the same branches.
    """
    return _bisect(len(branches), lambda mid: leaf >= mid, lambda k, *ops: branches[k](*ops), *operands)


class _Cursor(NamedTuple):
    """What every branch of a launch needs about the current program, computed once outside them."""

    program: jax.Array  # program id
    iota: jax.Array  # 0, 1, ..., block - 1


def _on_block(launch: Launch, seg: Segment, cur: _Cursor, full: Callable, ragged: Callable):
    """`full(index)` for a leaf whose rows are whole blocks, else `ragged(index, element < row length)`.

    A ragged leaf masks every block, not only its last: one code path per leaf keeps the kernel's
    size (and trace, lower and compile time) proportional to the number of leaves. Masking costs
    nothing where Triton can prove the mask constant over 16-byte groups (row lengths that are
    multiples of 16: every leaf of a typical model); a leaf of odd length loses vectorized loads.
    """
    b, bpr = launch.block, launch.blocks_per_row(seg)
    local = cur.program - seg.start
    if seg.rows == 1:
        row, col_start = None, local * b
    else:
        row, col_start = local // bpr, local % bpr * b
    index = (pl.ds(col_start, b),) if row is None else (row, pl.ds(col_start, b))
    offsets = col_start + cur.iota
    if seg.cols % b == 0:
        return full(index)
    return ragged(index, offsets < seg.cols)


class Packed(NamedTuple):
    """An operand stored as 8-bit codes plus one f32 absmax per quantization block (two refs).

    `format` is its `optax_ext.quantization.QuantFormat`. Kernels see the dequantized f32 values on
    load and hand f32 values to the store, which requantizes them (a new absmax per block): the
    per-element math never knows. A launch's block holds whole quantization blocks (`plan`'s
    `min_block`), and packed leaves use the 1-D view (leaves over `INDEX_LIMIT` run on XLA).
    """

    codes: Any
    absmax: Any
    format: Any


def _packed_positions(refs: Sequence[Sequence]) -> dict[int, tuple[Any, frozenset[int]]]:
    """{operand position: (its format, the leaves that store it packed)} for positions any leaf packs."""
    out: dict[int, tuple[Any, set[int]]] = {}
    for k, leaf_refs in enumerate(refs):
        for j, r in enumerate(leaf_refs):
            if isinstance(r, Packed):
                fmt, leaves = out.setdefault(j, (r.format, set()))
                if r.format != fmt:
                    raise ValueError(
                        f"operand {j}: packed leaves of one launch need one format, got {fmt} and {r.format}."
                    )
                leaves.add(k)
    return {j: (fmt, frozenset(leaves)) for j, (fmt, leaves) in out.items()}


def _is_one_of(leaf, leaves: frozenset[int], num: int):
    """Traced bool: leaf in `leaves`; None when every leaf of the launch is (no test needed)."""
    if len(leaves) == num:
        return None
    return functools.reduce(jnp.logical_or, [leaf == k for k in sorted(leaves)])


def _absmax_block(launch: Launch, seg: Segment, cur: _Cursor, fmt):
    """(index, mask or None) of the current block's absmax entries in a packed leaf's absmax ref."""
    per = launch.block // fmt.block_size
    first = (cur.program - seg.start) * per
    n_blocks = fmt.num_blocks(seg.cols)
    mask = None if n_blocks % per == 0 else first + jax.lax.broadcasted_iota(jnp.int32, (per,), 0) < n_blocks
    return (pl.ds(first, per),), mask


def load_blocks(launch: Launch, refs: Sequence[Sequence], leaf, program, *, with_limit: bool = False):
    """The current block of each of leaf `leaf`'s operands (`refs[k]`: leaf k's), as f32.

    An operand is a ref or a `Packed` (dequantized here). Lanes past a ragged block's end read 0.
    One `lax.switch` on the leaf; the loads are the only code repeated per leaf: dequantization and
    whatever the caller computes from the blocks are emitted once. With `with_limit`, also returns
    how many elements of the block exist (the block size but in a ragged block), as (values, limit).
    """
    from jax.experimental.pallas import triton as plt

    from optax_ext import quantization as q8

    packed = _packed_positions(refs)
    b = launch.block
    zeros = jnp.zeros((b,), jnp.float32)

    def branch(k):
        seg = launch.segments[k]

        def run(cur):
            def read(index, mask=None):
                values = []
                for j, r in enumerate(refs[k]):
                    if isinstance(r, Packed):
                        a_index, a_mask = _absmax_block(launch, seg, cur, r.format)
                        codes = _load(plt, r.codes.at[index], mask, q8.zero_code(r.format.signed))
                        absmax = _load(plt, r.absmax.at[a_index], a_mask, 0)
                        values.append((zeros, codes.astype(jnp.int32), absmax.astype(jnp.float32)))
                        continue
                    x = _load(plt, r.at[index], mask, 0).astype(jnp.float32)
                    if j in packed:  # a position other leaves pack: same structure in every branch
                        fmt = packed[j][0]
                        x = (x, jnp.zeros((b,), jnp.int32), jnp.zeros((b // fmt.block_size,), jnp.float32))
                    values.append(x)
                if with_limit:
                    # (A traced value in both cases: a branch of Triton's scf.if cannot yield a literal.)
                    full = cur.program * 0 + b
                    return values, (full if mask is None else jnp.sum(mask.astype(jnp.int32)))
                return values

            return _on_block(launch, seg, cur, read, read)

        return run

    cur = _Cursor(program, jax.lax.broadcasted_iota(jnp.int32, (b,), 0))
    if len(refs) == 1:
        out = branch(0)(cur)
    else:
        out = leaf_switch(leaf, [branch(k) for k in range(len(refs))], cur)
    values, limit = out if with_limit else (out, None)
    for j, (fmt, leaves) in packed.items():
        plain, codes, absmax = values[j]
        which = _is_one_of(leaf, leaves, len(refs))

        def dequantize(codes=codes, absmax=absmax, fmt=fmt):
            return q8.dequantize_blocks(codes, absmax, fmt.block_size, fmt.signed)

        values[j] = dequantize() if which is None else jax.lax.cond(which, dequantize, lambda plain=plain: plain)
    return (values, limit) if with_limit else values


def store_blocks(
    launch: Launch, refs: Sequence[Sequence], leaf, program, values: Sequence[jax.Array], limit=None
) -> None:
    """Store `values[j]` (f32, cast to the ref's dtype) into the current block of leaf `leaf`'s refs[j].

    A `Packed` operand is requantized first, once for the launch (outside the leaf switch): codes
    of each value over its block's new absmax; `limit` (from `load_blocks(..., with_limit=True)`)
    keeps the lanes past a ragged leaf's end out of the absmax.
    """
    from jax.experimental.pallas import triton as plt

    from optax_ext import quantization as q8

    packed = _packed_positions(refs)
    b = launch.block
    iota = jax.lax.broadcasted_iota(jnp.int32, (b,), 0)
    quantized = {}
    for j, (fmt, leaves) in packed.items():
        which = _is_one_of(leaf, leaves, len(refs))

        def quantize(v=values[j], fmt=fmt):
            valid = None if limit is None else iota < limit
            return q8.quantize_blocks(v, fmt.block_size, fmt.signed, valid)

        def skip(fmt=fmt):
            return jnp.zeros((b,), jnp.int32), jnp.zeros((b // fmt.block_size,), jnp.float32)

        quantized[j] = quantize() if which is None else jax.lax.cond(which, quantize, skip)

    def branch(k):
        seg = launch.segments[k]

        def write(index, mask, cur):
            for j, (r, v) in enumerate(zip(refs[k], values)):
                if isinstance(r, Packed):
                    codes, absmax = quantized[j]
                    a_index, a_mask = _absmax_block(launch, seg, cur, r.format)
                    _store(plt, r.codes.at[index], codes.astype(r.codes.dtype), mask)
                    _store(plt, r.absmax.at[a_index], absmax, a_mask)
                else:
                    _store(plt, r.at[index], v.astype(r.dtype), mask)

        return lambda cur: _on_block(
            launch, seg, cur, lambda index: write(index, None, cur), lambda index, mask: write(index, mask, cur)
        )

    cur = _Cursor(program, iota)
    if len(refs) == 1:
        branch(0)(cur)
        return
    leaf_switch(leaf, [branch(k) for k in range(len(refs))], cur)


def _load(plt, ref, mask, other):
    return plt.load(ref) if mask is None else plt.load(ref, mask=mask, other=other)


def _store(plt, ref, value, mask):
    if mask is None:
        plt.store(ref, value)
    else:
        plt.store(ref, value, mask=mask)
