"""The block machinery of the TPU (Mosaic) kernels: many leaves per launch, moved by DMA through VMEM.

A TPU core computes on VMEM; leaves stay in HBM (`memory_space=pl.ANY` refs, whole arrays) and a
block is copied in and out by the DMA engine. The plan is `optax_ext.kernels.multi_tensor`'s (a 1-D
grid over every block of every leaf, leaves grouped by the dtypes of their operands so that all
leaves of a launch share one VMEM buffer per operand); what is TPU-specific is how a block moves:

  * Only the copies switch on the leaf. Leaf k's DMA descriptors are issued inside a switch on
    the leaf, a bisection over the launch's static block starts (`mt._bisect`: log2 K scalar tests;
    Pallas lowers a K-way `lax.switch` on TPU to a chain of K nested ifs); the loads from VMEM,
    the math and the stores to VMEM are emitted once per launch. The block table is those static
    starts: no table in memory, no scalar prefetch.
  * No masks, no padding. Leaf k's size is static in its switch branch, so the copy of its last
    block has a static length (`lax.cond(last block, tail copy, full copy)`): elements past a
    leaf's end are neither read from HBM nor written back. The VMEM lanes past the tail hold
    stale values; kernels that reduce over a block mask them (`valid`).
  * Double buffering. Every operand has two VMEM slots of one block, and step i works in slot
    i % 2. The grid runs in order on one core ("arbitrary" semantics; a megacore chip's second
    core idles, v5e and v6e have one), and step i starts the input copies of block i + 1 into the
    other slot before waiting for its own, so the next block's reads overlap this block's math;
    block i's output copies are started at the end of step i and waited for at the end of step
    i + 1, before their slot is refilled (the last step waits for its own: no copy outlives the
    kernel). Each kind of copy (start in, wait in, start out, wait out) is issued from one site,
    a loop over the blocks it concerns.
  * Waits do not switch on the leaf. A DMA semaphore counts bytes, and a wait takes as many as
    its descriptor names, which need not be the started copy's: a block of n elements is waited
    for by descriptors on its VMEM slot, one of n elements when n is the block, else one per set
    bit of n (log2(block) static waits per site, where the starts need a branch per leaf). This
    halved the TPU lowering time of a 2,000-leaf step. Checked in TPU's interpreter, which counts
    semaphore bytes the same way (too short a wait fails the tests); not yet on a TPU.

Views and block sizes. A leaf is a 1-D view of its n elements (a free reshape), and a block is a
power of two of at least `ALIGN` = 1024 elements (one (8, 128) f32 vreg; 2048, one (16, 128) vreg,
where an operand is bf16 or f16), so block offsets are whole VMEM tiles; a slot of operand j is `[slot * block,
(slot + 1) * block)` of a 1-D VMEM buffer of two blocks (a (2, block) buffer would pad its 2 rows
to 8 sublanes). Copy offsets are int32: leaves over `mt.INDEX_LIMIT` elements are left to the
caller (XLA), as are quantized (8-bit) operands.

Checked without a TPU: TPU's interpreter (`pltpu.InterpretParams`, backend "mosaic_interpret")
runs these kernels' DMAs, semaphores and VMEM/SMEM on the CPU, and the Pallas -> Mosaic lowering
runs from a CPU (`optax_ext.kernels.lower_for(..., platform="tpu")`); Mosaic's own compiler
(layouts, DMA legality of the unaligned tail copies) runs only on a TPU and has not been.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_ext.kernels import multi_tensor as mt

__all__ = [
    "ALIGN",
    "INTERPRET_PARAMS",
    "Stream",
    "buffers",
    "locate",
    "pallas_call",
    "plan_by_dtype",
    "run_block",
    "semaphores",
    "valid",
]

ALIGN = 1024
"""The smallest block of 32-bit operands, and what every block is a multiple of: one (8, 128) vreg
of f32 (a launch with 16-bit operands takes twice as many: one (16, 128) vreg of bf16)."""

INTERPRET_PARAMS: dict = {}
"""Keyword arguments of `pltpu.InterpretParams` for "mosaic_interpret" (tests set e.g.
`dma_execution_mode="eager"` or `detect_races=True` to check the copies' ordering both ways)."""


def leaf_at(launch: mt.Launch, program) -> jax.Array:
    """The leaf of block `program` (traced), from the static block table (`mt.select_by_leaf`)."""
    (leaf,) = mt.select_by_leaf(launch, program, range(len(launch.segments)))
    return leaf


def locate(launch: mt.Launch) -> tuple[jax.Array, jax.Array]:
    """Inside a kernel: (leaf, block index) of this grid step."""
    i = pl.program_id(0)
    return leaf_at(launch, i), i


def valid(launch: mt.Launch, program) -> jax.Array:
    """How many elements of block `program` exist (the block size, but in a leaf's last block).

    Branch-free: the leaf's size and first block from the static block table (`mt.select_by_leaf`).
    """
    segs = launch.segments
    size, start = mt.select_by_leaf(launch, program, [seg.cols for seg in segs], [seg.start for seg in segs])
    return jnp.minimum(launch.block, size - (program - start) * launch.block)


def slot_of(program) -> jax.Array:
    return jax.lax.rem(program, 2)


class Stream(NamedTuple):
    """One direction of a launch's copies: `hbm[k][j]` leaf k's operand j, `vmem[j]` its two slots."""

    hbm: Sequence[Sequence]  # per leaf, per operand: a 1-D `pl.ANY` ref
    vmem: Sequence  # per operand: a 1-D VMEM buffer of 2 * block elements
    sems: object  # DMA semaphores, 2 * operands: slot s, operand j at s * operands + j
    inbound: bool  # HBM -> VMEM (True) or VMEM -> HBM


def _each_copy(stream: Stream, launch: mt.Launch, program, act: Callable) -> None:
    """`act(descriptor)` for each operand's copy of block `program` in slot `slot_of(program)`.

    Everything but the copies (the slot, the offsets, whether this is the leaf's last block) is
    computed before the leaf switch from the static block table, so a branch holds its leaf's
    copies and nothing else: the trace time of a launch grows with the code per leaf.
    """
    from jax.experimental.pallas import tpu as pltpu

    b, segs = launch.block, launch.segments
    slot = slot_of(program)
    # the leaf's first block, and the first block past it
    start, end = mt.select_by_leaf(
        launch, program, [seg.start for seg in segs], [seg.start + launch.num_blocks(seg) for seg in segs]
    )
    base = pl.multiple_of(slot * b, ALIGN)
    first = pl.multiple_of((program - start) * b, ALIGN)
    last = program == end - 1
    sems = [stream.sems.at[slot * len(stream.vmem) + j] for j in range(len(stream.vmem))]

    def branch(k):
        seg = launch.segments[k]
        num, tail = launch.num_blocks(seg), seg.cols - (launch.num_blocks(seg) - 1) * b

        def copies(length):
            def run():
                for ref, buf, sem in zip(stream.hbm[k], stream.vmem, sems):
                    far, near = ref.at[pl.ds(first, length)], buf.at[pl.ds(base, length)]
                    src, dst = (far, near) if stream.inbound else (near, far)
                    act(pltpu.make_async_copy(src, dst, sem))

            return run

        if tail == b:
            return copies(b)
        if num == 1:
            return copies(tail)
        return lambda: jax.lax.cond(last, copies(tail), copies(b))

    branches = [branch(k) for k in range(len(launch.segments))]
    if len(branches) == 1:
        branches[0]()
    else:
        # A bisection over the static starts: log2 K scalar tests per copy site. (Pallas lowers a
        # K-way `lax.switch` on TPU to a chain of K nested ifs; the trace and lowering cost the same.)
        starts = [seg.start for seg in launch.segments]
        mt._bisect(len(branches), lambda mid: program >= starts[mid], lambda k: branches[k]())


def _wait_block(stream: Stream, launch: mt.Launch, program) -> None:
    """Wait for the copies of block `program` (`_each_copy`), without switching on its leaf.

    A DMA semaphore counts bytes and a wait takes its descriptor's bytes, so the descriptor need
    not be the copy's: a block of n elements (`valid`, branch-free) is waited for as one slot when
    n is the block, else as the powers of two that sum to n (one wait per set bit of n). That is
    log2(block) static waits per site instead of a switch over every leaf's copies.
    """
    from jax.experimental.pallas import tpu as pltpu

    b, slot = launch.block, slot_of(program)
    base = pl.multiple_of(slot * b, ALIGN)
    n = valid(launch, program) if any(seg.cols % b for seg in launch.segments) else b
    sems = [stream.sems.at[slot * len(stream.vmem) + j] for j in range(len(stream.vmem))]

    def wait(length):
        def run():
            for buf, sem in zip(stream.vmem, sems):
                near = buf.at[pl.ds(base, length)]
                pltpu.make_async_copy(near, near, sem).wait()

        return run

    if isinstance(n, int):
        wait(b)()
        return

    def in_parts():
        for bit in range(b.bit_length() - 1):
            pl.when((n >> bit) & 1 == 1)(wait(1 << bit))

    jax.lax.cond(n == b, wait(b), in_parts)


def _each_block(stream: Stream, launch: mt.Launch, lo, hi, act: Callable | None) -> None:
    """`_each_copy(..., act)`, or `_wait_block` where `act` is None, for the blocks lo, ..., hi - 1
    (traced bounds): one site in the kernel."""

    def one(j, carry):
        if act is None:
            _wait_block(stream, launch, j)
        else:
            _each_copy(stream, launch, j, act)
        return carry

    jax.lax.fori_loop(lo, hi, one, 0)


def run_block(launch: mt.Launch, inputs: Stream, outputs: Stream | None, compute: Callable) -> None:
    """The double-buffered life of this grid step's block (see the module docstring).

    `compute(offset)` reads the inputs' VMEM buffers at `[offset, offset + block)` and writes the
    outputs' there (offset: this step's slot). Each kind of copy is issued from one place (a loop
    over the blocks it concerns at this step), since every copy site repeats the leaf switch.
    """
    i, last = pl.program_id(0), launch.num_programs - 1
    # Start the inputs of blocks 0 and 1 at the first step, of block i + 1 at the others: the next
    # block's copy lands while this one computes.
    _each_block(inputs, launch, jnp.where(i == 0, 0, i + 1), jnp.minimum(i + 2, last + 1), _start)
    _wait_block(inputs, launch, i)
    compute(pl.multiple_of(slot_of(i) * launch.block, ALIGN))
    if outputs is not None:
        _each_copy(outputs, launch, i, _start)
        # Wait for block i - 1's outputs (their slot is refilled next step), and at the last step
        # for block i's too: the kernel ends with no copy in flight.
        lo = jnp.where(i >= 1, i - 1, jnp.where(i == last, 0, 1))
        _each_block(outputs, launch, lo, jnp.where(i == last, i + 1, i), None)


def _start(descriptor) -> None:
    descriptor.start()


def buffers(launch: mt.Launch, dtypes: Sequence) -> list:
    """VMEM scratch: two slots of one block per operand."""
    from jax.experimental.pallas import tpu as pltpu

    return [pltpu.VMEM((2 * launch.block,), jnp.dtype(d)) for d in dtypes]


def semaphores(n_ops: int):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.SemaphoreType.DMA((2 * max(1, n_ops),))


def plan_by_dtype(
    signatures: Sequence[tuple], sizes: Sequence[int], refs_per_leaf, block: int, **kwargs
) -> list[tuple[tuple, mt.Launch, list[int]]]:
    """Launches for leaves grouped by `signatures[i]` (their operands' dtypes), in order within a group.

    Returns (signature, launch, leaf indices into the caller's list) per launch. Leaves of size 0
    or over `mt.INDEX_LIMIT` are in none. Blocks are powers of two of at least `ALIGN` (2 * `ALIGN`
    where an operand is 16-bit: block offsets stay whole VMEM tiles of every operand).
    """
    refs = [refs_per_leaf] * len(sizes) if isinstance(refs_per_leaf, int) else list(refs_per_leaf)
    groups: dict[tuple, list[int]] = {}
    for i, sig in enumerate(signatures):
        if 0 < sizes[i] <= mt.INDEX_LIMIT:
            groups.setdefault(sig, []).append(i)
    out = []
    for sig, members in groups.items():
        packing = 4 // min(jnp.dtype(d).itemsize for d in jax.tree.leaves(sig))
        min_block = ALIGN * max(1, packing)
        for launch in mt.plan(
            [sizes[i] for i in members],
            [refs[i] for i in members],
            max(block, min_block),
            min_block=min_block,
            **kwargs,
        ):
            out.append((sig, launch, [members[j] for j in launch.leaves]))
    return out


def pallas_call(
    kernel, launch: mt.Launch, operands, out_shape, scratch, *, n_any: int, interpret: bool, name: str, **kw
):
    """`pl.pallas_call` over the launch's blocks, in order: the first `n_any` operands are HBM
    (`pl.ANY`) refs, the rest SMEM scalar vectors. In TPU's interpreter when `interpret`."""
    from jax.experimental.pallas import tpu as pltpu

    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(launch.num_programs,),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * n_any + [smem] * (len(operands) - n_any),
        scratch_shapes=scratch,
        interpret=pltpu.InterpretParams(**INTERPRET_PARAMS) if interpret else False,
        # "arbitrary": in order on one core, which the prefetch of the next step's block relies on.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        name=name,
        **kw,
    )(*operands)
