"""Sums of squares over many leaves as Mosaic GPU kernels: the "mosaic_gpu" backend of `norms`.

Same plan and result as the multi-tensor form of `optax_ext.kernels.norms`: one thread block per
`NORM_MOSAIC_GPU_BLOCK` elements of any leaf, up to `NORM_MOSAIC_GPU_MAX_LEAVES` leaves per launch
(finding the leaf is K - 1 scalar comparisons per block here, `mosaic_gpu_blocks.locate`: at most
239 per 8192-element block; GPT-2 small's 148 leaves are one launch), and
each block writes the f32 sum of its squares (and, for `apply_if_finite`, its count of non-finite
elements) to its own slot of a partials vector; jnp adds the partials (no atomics: deterministic).
A block is copied GMEM -> SMEM by TMA (`optax_ext.kernels.mosaic_gpu_blocks`), which reads the
elements past a leaf's end as zero: no mask. One input and one scalar out per block, so blocks are
four times the fused pass's (32 KiB of SMEM for f32: 7 resident blocks per SM keep copies in flight).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from optax_ext.kernels import mosaic_gpu_blocks as mgb
from optax_ext.kernels import multi_tensor as mt

__all__ = ["NORM_MOSAIC_GPU_BLOCK", "NORM_MOSAIC_GPU_MAX_LEAVES", "partials"]

NORM_MOSAIC_GPU_BLOCK = 8192
NORM_MOSAIC_GPU_MAX_LEAVES = 240  # = mosaic_gpu_blocks.MAX_TMA_REFS: one TMA descriptor per leaf


def _kernel(launch: mt.Launch, count_nonfinite: bool):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    num = len(launch.segments)

    def kernel(*refs):
        ins, outs = refs[:num], refs[num : num + 1 + count_nonfinite]
        smem, bar = refs[num + 1 + count_nonfinite :]
        at = mgb.locate(launch)
        mgb.copy_in(launch, [[r] for r in ins], [smem], bar, at)
        plgpu.barrier_wait(bar)
        x = smem[...].astype(jnp.float32)
        outs[0][at.program] = jnp.sum(x * x)
        if count_nonfinite:  # same pass, no second read: apply_if_finite's test
            # |x| < inf is isfinite (NaN compares false), which Mosaic GPU has no lowering for
            outs[1][at.program] = jnp.sum(jnp.where(jnp.abs(x) < jnp.inf, 0.0, 1.0))

    return kernel


def partials(
    leaves: Sequence[jax.Array], *, interpret: bool, block: int, count_nonfinite: bool = False
) -> list[tuple[mt.Launch, list[int], list[jax.Array]]]:
    """Per launch: its plan, its leaves (indices into `leaves`) and `[partials]` (+ non-finite partials).

    Leaves of size 0 or over `mt.INDEX_LIMIT` elements are in no launch (the caller sums them).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    signatures = [jnp.dtype(x.dtype) for x in leaves]
    out = []
    plans = mgb.plan_by_dtype(
        signatures,
        [x.size for x in leaves],
        1,
        block,
        extra_refs=0,
        max_leaves=NORM_MOSAIC_GPU_MAX_LEAVES,
    )
    for dtype, launch, members in plans:
        grid = launch.num_programs
        sums = mgb.run_kernel(
            _kernel(launch, count_nonfinite),
            launch,
            [jnp.reshape(leaves[i], seg.view) for i, seg in zip(members, launch.segments)],
            [jax.ShapeDtypeStruct((grid,), jnp.float32)] * (1 + count_nonfinite),
            [mgb.smem_block(launch, dtype), plgpu.Barrier(num_arrivals=launch.block // mgb.CHUNK)],
            interpret=interpret,
            name=f"sq_norm_{len(members)}_leaves",
        )
        out.append((launch, members, list(sums)))
    return out
