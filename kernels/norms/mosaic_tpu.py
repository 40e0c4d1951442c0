"""Sums of squares over many leaves as TPU (Mosaic) kernels: the "mosaic" backend of `norms`.

Same plan and result as the multi-tensor form of `optax_ext.kernels.norms`: one grid step per
`NORM_MOSAIC_TPU_BLOCK` elements of any leaf, up to `NORM_MOSAIC_TPU_MAX_LEAVES` leaves per launch
(leaves grouped by dtype; GPT-2 small's 148 leaves are one launch), and each step writes the f32
sum of its block's squares (and, for `apply_if_finite`, its count of non-finite elements) to its
own lane of a partials array: step i to lane i % 128 of row i // 128, a (1, 128) output block that
stays in VMEM for 128 consecutive steps (zeroed at the first) and is written back once, 4 bytes
per block; jnp adds the partials (no atomics: deterministic).
A block is copied HBM -> VMEM by double-buffered DMA (`optax_ext.kernels.mosaic_tpu_blocks`);
a leaf's last block copies only the leaf's elements, and the stale VMEM lanes past them are masked
to zero (`mosaic_tpu_blocks.valid`). One input and one scalar out per block, so blocks are twice
the fused pass's: 128K elements, 1 MiB of VMEM for the two f32 slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_ext.kernels import mosaic_tpu_blocks as mtb
from optax_ext.kernels import multi_tensor as mt

__all__ = ["NORM_MOSAIC_TPU_BLOCK", "NORM_MOSAIC_TPU_MAX_LEAVES", "partials"]

NORM_MOSAIC_TPU_BLOCK = 128 * 1024
NORM_MOSAIC_TPU_MAX_LEAVES = 256  # as norms.triton.NORM_MAX_LEAVES: a branch is one copy
LANES = 128


def _kernel(launch: mt.Launch, count_nonfinite: bool):
    num = len(launch.segments)

    def kernel(*refs):
        ins, outs = refs[:num], refs[num : num + 1 + count_nonfinite]
        vmem, sems = refs[num + 1 + count_nonfinite :]
        b = launch.block

        def compute(offset):
            i = pl.program_id(0)
            x = vmem[pl.ds(offset, b)].astype(jnp.float32)
            keep = jax.lax.broadcasted_iota(jnp.int32, (b,), 0) < mtb.valid(launch, i)
            values = [jnp.where(keep, x * x, 0.0)]
            if count_nonfinite:  # same pass, no second read: apply_if_finite's test
                values.append(jnp.where(keep & ~jnp.isfinite(x), 1.0, 0.0))
            lane = jax.lax.broadcasted_iota(jnp.int32, (1, LANES), 1)

            @pl.when(i % LANES == 0)
            def _():
                for o_ref in outs:  # lanes that no step writes (past the last block) add 0
                    o_ref[...] = jnp.zeros((1, LANES), jnp.float32)

            for o_ref, v in zip(outs, values):
                o_ref[...] = jnp.where(lane == i % LANES, jnp.sum(v), o_ref[...])

        mtb.run_block(launch, mtb.Stream([[r] for r in ins], [vmem], sems, True), None, compute)

    return kernel


def partials(
    leaves: Sequence[jax.Array], *, interpret: bool, block: int, count_nonfinite: bool = False
) -> list[tuple[mt.Launch, list[int], list[jax.Array]]]:
    """Per launch: its plan, its leaves (indices into `leaves`) and `[partials]` (+ non-finite
    partials), one per block, then zeros. Leaves of size 0 or over `mt.INDEX_LIMIT` elements are
    in no launch (the caller sums them)."""
    out = []
    plans = mtb.plan_by_dtype(
        [jnp.dtype(x.dtype) for x in leaves],
        [x.size for x in leaves],
        1,
        max(mtb.ALIGN, mt.pow2_at_least(block)),
        max_leaves=NORM_MOSAIC_TPU_MAX_LEAVES,
    )
    for dtype, launch, members in plans:
        rows = -(-launch.num_programs // LANES)
        # (rows, 1, 128) with (1, 128) blocks: the last two dims of a block equal the array's, as Mosaic needs.
        sums = mtb.pallas_call(
            _kernel(launch, count_nonfinite),
            launch,
            [jnp.reshape(leaves[i], seg.view) for i, seg in zip(members, launch.segments)],
            [jax.ShapeDtypeStruct((rows, 1, LANES), jnp.float32)] * (1 + count_nonfinite),
            [*mtb.buffers(launch, [dtype]), mtb.semaphores(1)],
            n_any=len(members),
            interpret=interpret,
            name=f"sq_norm_{len(members)}_leaves",
            out_specs=[pl.BlockSpec((None, 1, LANES), lambda i: (i // LANES, 0, 0))] * (1 + count_nonfinite),
        )
        # Block j's partial at [j]; zeros past the last block.
        out.append((launch, members, [s.reshape(-1) for s in sums]))
    return out
