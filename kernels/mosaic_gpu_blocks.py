"""The block machinery of the Mosaic GPU kernels: many leaves per launch, moved by TMA through SMEM.

Mosaic GPU (JAX's maintained Pallas backend for NVIDIA GPUs) programs a thread block per grid
point with explicit memory spaces: leaves stay in global memory (GMEM) and a block is copied into
shared memory (SMEM) by the Tensor Memory Accelerator (TMA), computed on in registers, written back
to SMEM and copied out by TMA. The multi-tensor plan is the one of `optax_ext.kernels.multi_tensor`
(a 1-D grid over every block of every leaf); what differs is how a block moves, and that finding
the leaf and switching on it are a chain of selects and a two-level `lax.switch` (`locate`, `_switch`):

  * Only the copies switch on the leaf. Every leaf of a launch shares one SMEM buffer per operand,
    so `copy_in`/`copy_out` issue leaf k's TMA copies inside `_switch` and everything between
    them (the loads from SMEM, the math, the stores to SMEM) is emitted once per launch.
  * No masks. A TMA copy clips at the array's end: elements past it read as zero and are not
    written. A ragged leaf, a 0-d leaf, a leaf smaller than a block need no special case.
  * A TMA box has at most 256 elements per dimension, so a block of `B` elements is `B / CHUNK`
    1-D copies of `CHUNK` = 256 elements into the rows of a (B / 256, 256) SMEM buffer; one barrier
    counts them all (`num_arrivals` = copies per block).

Leaves stay 1-D views (a free reshape): TMA coordinates are int32, so a leaf over `mt.INDEX_LIMIT`
elements is left to the caller (XLA). Leaves of a launch share SMEM buffers, so they share dtypes
too: `plan_by_dtype` groups leaves by the dtypes of their operands first (one launch for a model stored in
one dtype).

Kernels are lowered with Mosaic GPU's lane semantics (`run_kernel`: the copies are emitted as they
are written, with no layout inference over them) and load SMEM blocks in one strided layout
(`load_block`).

Requires jax >= 0.12 (`plgpu.kernel` with `jax.new_ref` operands for in-place outputs, and Mosaic
GPU's interpreter `plgpu.InterpretGPUParams`, the API this module is written and tested against).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_ext.kernels import multi_tensor as mt

__all__ = [
    "CHUNK",
    "Block",
    "MAX_TMA_REFS",
    "copy_in",
    "copy_out",
    "load_block",
    "locate",
    "plan_by_dtype",
    "run_kernel",
]

CHUNK = 256
"""Elements per TMA copy (a TMA box has at most 256 elements per dimension); also the smallest block."""

GRID_AXIS = "blocks"

MAX_TMA_REFS = 240
"""Refs a launch copies with TMA. Each gets a 128-byte TMA descriptor among the kernel's parameters,
and a kernel's parameters are at most 32,764 bytes (ptxas: "uses too much parameter space" at 270
descriptors). An AdamW launch (g, p, m, v: outputs reuse their input's ref) takes 59 leaves."""


class Block(NamedTuple):
    """Inside a kernel: this thread block's leaf, its index in the grid, and its first element in the leaf."""

    leaf: jax.Array
    program: jax.Array
    first: jax.Array


def locate(launch: mt.Launch) -> Block:
    """Inside a kernel: where this thread block is, from the static block table (`mt.select_by_leaf`:
    K - 1 comparisons, no branch; see `_switch` for the switch)."""
    i = jax.lax.axis_index(GRID_AXIS)
    segs = launch.segments
    leaf, start = mt.select_by_leaf(launch, i, range(len(segs)), [seg.start for seg in segs])
    return Block(leaf, i, (i - start) * launch.block)


def _each_chunk(launch: mt.Launch, refs: Sequence[Sequence], smem: Sequence, at: Block, copy) -> None:
    """`copy(refs[leaf][j].at[chunk c of the block], smem[j].at[c])` for every operand j and chunk c.

    One loop over the chunks with the leaf switch inside it, and the chunk's offset computed before
    the switch: a branch holds its leaf's copies and nothing else (Mosaic GPU's trace and lowering
    time grows with every op of the kernel; a loop per leaf made ~7% more of it on 2,000 leaves).
    """
    num_chunks = launch.block // CHUNK

    def chunk(c, carry):
        index = pl.ds(at.first + c * CHUNK, CHUNK)

        def branch(k):
            def run():
                for ref, buf in zip(refs[k], smem):
                    copy(ref.at[index], buf.at[c])

            return run

        _switch(at.leaf, [branch(k) for k in range(len(refs))])
        return carry

    if num_chunks == 1:
        chunk(0, None)
    else:
        jax.lax.fori_loop(0, num_chunks, chunk, None)


def copy_in(launch: mt.Launch, refs: Sequence[Sequence], smem: Sequence, barrier, at: Block) -> None:
    """Start the TMA copies of block `at` of its leaf of each operand (`refs[k][j]`) into `smem[j]`.

    `barrier` (`num_arrivals` = len(smem) * block / CHUNK) completes when all have landed.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _each_chunk(launch, refs, smem, at, lambda g, s: plgpu.copy_gmem_to_smem(g, s, barrier))


def copy_out(launch: mt.Launch, refs: Sequence[Sequence], smem: Sequence, at: Block) -> None:
    """Copy `smem[j]` into block `at` of its leaf of `refs[k][j]` (TMA; clipped at the leaf's end)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    plgpu.commit_smem()  # make the register -> SMEM stores visible to the TMA unit
    _each_chunk(launch, refs, smem, at, lambda g, s: plgpu.copy_smem_to_gmem(s, g))
    plgpu.wait_smem_to_gmem(0)


def _switch(leaf, branches: Sequence[Callable]) -> None:
    """`branches[leaf]()` as `lax.switch`es: Mosaic GPU lowers one to a single `scf.index_switch` (a
    jump, not the chain of ifs Triton makes of it). Not a bisection of `lax.cond`s, as on Triton.

    Lowering cost. Every branch of a switch takes the refs that any branch closes over (JAX merges
    the branches' constants), so a K-way switch over leaves of n refs each traces K branches of
    K * n inputs, O(K^2): two levels, a switch over groups of ~sqrt(K) leaves and one inside each,
    trace O(K^1.5). And Mosaic GPU lowers the first branch of a switch twice (once in a throw-away
    module, to learn the result types), so each switch's first branch is an empty one (index 0,
    never taken): the branches that copy are lowered once.
    """
    k = len(branches)
    if k == 1:
        branches[0]()
        return
    group = math.isqrt(k - 1) + 1
    if k > 2 * group:
        members = [branches[i : i + group] for i in range(0, k, group)]
        branches = [functools.partial(_switch, leaf - i * group, m) for i, m in enumerate(members)]
        leaf = jax.lax.div(leaf, jnp.int32(group))  # leaf >= 0: truncation is floor, with no nested jit
    jax.lax.switch(leaf + 1, [_nothing, *branches])


def _nothing() -> None:
    pass


def plan_by_dtype(
    signatures: Sequence[tuple], sizes: Sequence[int], refs_per_leaf, block: int, **kwargs
) -> list[tuple[tuple, mt.Launch, list[int]]]:
    """Launches for leaves grouped by `signatures[i]` (their operands' dtypes), in order within a group.

    Returns (signature, launch, leaf indices into the caller's list) per launch; the launch's own
    `leaves` index into that list. Blocks are at least `CHUNK`.
    """
    refs = [refs_per_leaf] * len(sizes) if isinstance(refs_per_leaf, int) else list(refs_per_leaf)
    groups: dict[tuple, list[int]] = {}
    for i, sig in enumerate(signatures):
        groups.setdefault(sig, []).append(i)
    out = []
    for sig, members in groups.items():
        for launch in mt.plan(
            [sizes[i] for i in members],
            [refs[i] for i in members],
            block,
            min_block=CHUNK,
            max_refs=MAX_TMA_REFS,
            **kwargs,
        ):
            out.append((sig, launch, [members[j] for j in launch.leaves]))
    return out


def smem_block(launch: mt.Launch, dtype):
    """The SMEM scratch type of one operand's block: (block / CHUNK, CHUNK) of `dtype`."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.SMEM((launch.block // CHUNK, CHUNK), jnp.dtype(dtype))


def load_block(buf, dtypes) -> jax.Array:
    """`buf[...]` (an SMEM block) as f32 in registers, in the strided layout shared by every block of
    a kernel whose operands have `dtypes`: lane semantics picks a block's layout from its own dtype
    (8 bytes per thread and vector: 2 f32, 4 bf16), and arrays of two layouts do not combine."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    size = math.prod(buf.shape)
    vec = min([size // 128] + [8 // jnp.dtype(d).itemsize for d in dtypes])
    return plgpu.load(buf, layout=plgpu.Layout.WG_STRIDED(tuple(buf.shape), vec_size=vec)).astype(jnp.float32)


def run_kernel(
    body, launch: mt.Launch, operands, out_type, scratch, *, interpret: bool, name: str, auto_barriers: bool = False
):
    """`plgpu.kernel(body)` over the launch's blocks, in Mosaic GPU's interpreter when `interpret`.

    Lowered with Mosaic GPU's lane semantics, not its default (warpgroup) semantics. These kernels
    need none of what warpgroup semantics adds (register layouts inferred for WGMMA operands): a
    block is loaded from SMEM into the strided layout, computed on elementwise and stored back, and
    the many TMA copies (one site per leaf and operand) are emitted directly instead of as Mosaic
    GPU dialect ops that a layout inference pass and a dialect lowering pass walk afterwards: a
    2,000-leaf clip+adamw step traces and lowers in 36 s instead of 51 s (Optax: 18.5 s). Lane
    semantics asks that each copy move a multiple of 128 bytes (a chunk does: 256 elements of at
    least 2 bytes; scalar vectors are padded to 32 f32).

    Without Pallas' automatic barriers (`unsafe_no_auto_barriers`): it puts a warpgroup barrier
    before every TMA load and around every SMEM store, 42 per block of an AdamW launch (one before
    each of its 32 chunk loads, two around each of its 3 output stores, ...; 2 without them), which
    these kernels do not need. What makes that safe is what Pallas asks: no thread reads and writes one
    memory region (SMEM input blocks are written by TMA and read by threads, SMEM output blocks
    written by threads and read by TMA, each thread block handles one block), and the one hand-off
    from threads to TMA (the stores before `copy_out`) goes through `commit_smem`, a fence and a
    warpgroup barrier. Reductions (the norm kernels) synchronize their scratch themselves. A kernel
    that does write and read one region (the 8-bit one's absmax vectors) asks for `auto_barriers`.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.kernel(
        body,
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Lane, unsafe_no_auto_barriers=not auto_barriers
        ),
        out_type=out_type,
        scratch_types=scratch,
        grid=(launch.num_programs,),
        grid_names=(GRID_AXIS,),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name=name,
    )(*operands)
