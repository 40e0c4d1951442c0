"""Sums of squares over many leaves as generic Pallas kernels: Triton, and Pallas' interpreter.

The "multi_tensor" form of `optax_ext.kernels.norms` on "triton" and "interpret": up to
`NORM_MAX_LEAVES` leaves per launch, each its own `pl.ANY` ref, one program per block of any leaf,
a switch on the leaf around the load; elements past a ragged block's end read as zero (masked
load). Each program writes its block's f32 sum of squares (and, on request, its count of NaN or
infinite elements) to its own slot of a partials vector.

Tunables: one input and one scalar out per block, so blocks are larger than the fused pass's
(`NORM_GPU_BLOCK` = 8192 elements per Triton program). `NORM_MAX_LEAVES` is four times the fused
pass's leaves per launch (257 refs, under `multi_tensor.MAX_REFS`): a branch is one load, so the
module stays small, and finding the leaf is a bisection (8 comparisons per program,
`multi_tensor.locate`). GPT-2 small's 148 leaves are one launch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_ext.kernels import backend as _backend
from optax_ext.kernels import multi_tensor as mt

__all__ = ["NORM_GPU_BLOCK", "NORM_INTERPRET_BLOCK", "NORM_MAX_LEAVES", "partials"]

NORM_GPU_BLOCK = 8192
NORM_GPU_NUM_WARPS = 8
NORM_INTERPRET_BLOCK = 4096
NORM_MAX_LEAVES = 256


def _nonfinite(x):
    """How many elements are NaN or infinite (f32 count of one block)."""
    return jnp.sum(jnp.where(jnp.isfinite(x), 0.0, 1.0))


def _kernel(launch: mt.Launch, count_nonfinite: bool):
    num = len(launch.segments)

    def kernel(*refs):
        ins, o_ref = refs[:num], refs[num]
        leaf, program = mt.locate(launch)
        (x,) = mt.load_blocks(launch, [[r] for r in ins], leaf, program)  # lanes past a leaf's end read 0
        o_ref[...] = jnp.broadcast_to(jnp.sum(x * x), (1,))
        if count_nonfinite:  # same pass, no second read: apply_if_finite's test
            refs[num + 1][...] = jnp.broadcast_to(_nonfinite(x), (1,))

    return kernel


def partials(leaves, *, backend: str, block: int, count_nonfinite: bool = False) -> list[tuple[mt.Launch, list, list]]:
    """Per launch: its plan, its leaves (indices into `leaves`) and `[partials]` (+ `nonfinite`
    partials): the sums of program j's block."""
    params = (
        _backend.compiler_params("triton", num_warps=NORM_GPU_NUM_WARPS, num_stages=1) if backend == "triton" else None
    )
    outputs = 2 if count_nonfinite else 1
    out = []
    for launch in mt.plan([x.size for x in leaves], 1, block, extra_refs=outputs, max_leaves=NORM_MAX_LEAVES):
        grid = launch.num_programs
        partials = pl.pallas_call(
            _kernel(launch, count_nonfinite),
            out_shape=[jax.ShapeDtypeStruct((grid,), jnp.float32)] * outputs,
            grid=(grid,),
            in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * len(launch.leaves),
            out_specs=[pl.BlockSpec((1,), lambda i: (i,))] * outputs,
            interpret=backend == "interpret",
            compiler_params=params,
            name=f"sq_norm_{len(launch.leaves)}_leaves",
        )(*[jnp.reshape(leaves[i], seg.view) for i, seg in zip(launch.leaves, launch.segments)])
        out.append((launch, list(launch.leaves), list(partials)))
    return out
