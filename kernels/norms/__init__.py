"""Sums of squares over many leaves as Pallas kernels: the reductions that feed the fused pass.

`leaf_sq_norms_pallas(leaves, backend=...)` returns `[sum(x**2) in f32 for x in leaves]` and
`global_sq_norm_pallas` their total; the square roots are global-norm clipping (Pascanu et al.,
2013, "On the difficulty of training recurrent neural networks") and the LARS/LAMB trust ratios
(You et al., 2017/2019).

Every program writes the f32 partial sum of one block to its own slot of a `partials` vector;
a tiny jnp reduction adds the partials, leaf by leaf for per-leaf norms (a static slice of the
partials per leaf) or all at once for the global norm. No atomics and a fixed order: the result
is deterministic run to run. Same two forms as `optax_ext.kernels.fused_pass`:
  * "multi_tensor" (every backend by default): up to `NORM_MAX_LEAVES` leaves per launch, each
    its own `pl.ANY` ref, one program per block of any leaf, a switch on the leaf; elements past
    a ragged block's end are masked to zero. Mosaic GPU and TPU (and their interpreters) run it
    with their own copies: `norms.mosaic_gpu`, `norms.mosaic_tpu`.
  * "per_leaf" (Mosaic, TPU, on request): one call per leaf, as a (rows, 128) slab reduced over
    sublanes to one (1, 128) partial per block, or (sizes not divisible by 128) as 1-D blocks whose
    partial sum is stored in lane 0 of a (1, 128) row; Pallas pads the last block's reads, the mask
    zeroes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_ext.kernels import backend as _backend
from optax_ext.kernels import multi_tensor as mt
from optax_ext.kernels.elementwise import PALLAS_DTYPES
from optax_ext.kernels.fused_pass import BACKENDS, FORMS, default_form
from optax_ext.kernels.fused_pass.per_leaf import LANES, per_leaf_view

__all__ = ["NORM_GPU_BLOCK", "global_sq_norm_pallas", "leaf_sq_norms_pallas"]

# One input and one scalar out per block: blocks can be larger than the fused pass's.
NORM_GPU_BLOCK = 8192
NORM_GPU_NUM_WARPS = 8
NORM_TPU_BLOCK_ROWS = 1024
NORM_INTERPRET_BLOCK = 4096
# Four times the fused pass's leaves per launch (257 refs, under multi_tensor.MAX_REFS): a branch
# is one load, so the module stays small, and finding the leaf is a bisection (8 comparisons per
# program, see multi_tensor.locate). GPT-2 small's 148 leaves are one launch.
NORM_MAX_LEAVES = 256


def _validate(leaves, backend, form, block):
    if backend not in BACKENDS:
        raise ValueError(f"leaf_sq_norms_pallas(backend={backend!r}): expected one of {', '.join(BACKENDS)}.")
    if form == "per_leaf" and (_backend.is_mosaic_gpu(backend) or backend == "mosaic_interpret"):
        raise ValueError(f"leaf_sq_norms_pallas(form='per_leaf'): backend {backend!r} runs the 'multi_tensor' form.")
    _backend.require_mosaic_gpu(backend)
    if form not in FORMS:
        raise ValueError(f"leaf_sq_norms_pallas(form={form!r}): expected 'multi_tensor' or 'per_leaf'.")
    if block is not None and (not isinstance(block, int) or block < 1):
        raise ValueError(f"leaf_sq_norms_pallas(block={block!r}): expected a positive int.")
    if block is not None and form == "multi_tensor" and block & (block - 1):
        raise ValueError(f"leaf_sq_norms_pallas(block={block}): multi-tensor blocks must be a power of 2.")
    if block is not None and form == "per_leaf" and block % 8:
        raise ValueError(f"leaf_sq_norms_pallas(block={block}): per-leaf blocks (rows) must be a multiple of 8.")
    for i, x in enumerate(leaves):
        if jnp.result_type(x) not in PALLAS_DTYPES:
            raise TypeError(
                f"leaf_sq_norms_pallas(leaves): leaf {i} has dtype {jnp.result_type(x)}; expected one of "
                f"float32, bfloat16, float16."
            )


# --------------------------------------------------------------------------------------------
# "multi_tensor"


def _nonfinite(x):
    """How many elements are NaN or infinite (f32 count of one block)."""
    return jnp.sum(jnp.where(jnp.isfinite(x), 0.0, 1.0))


def _multi_tensor_kernel(launch: mt.Launch, count_nonfinite: bool):
    num = len(launch.segments)

    def kernel(*refs):
        ins, o_ref = refs[:num], refs[num]
        leaf, program = mt.locate(launch)
        (x,) = mt.load_blocks(launch, [[r] for r in ins], leaf, program)  # lanes past a leaf's end read 0
        o_ref[...] = jnp.broadcast_to(jnp.sum(x * x), (1,))
        if count_nonfinite:  # same pass, no second read: apply_if_finite's test
            refs[num + 1][...] = jnp.broadcast_to(_nonfinite(x), (1,))

    return kernel


def _default_block(backend: str) -> int:
    """Elements per program of a multi-tensor launch on `backend`."""
    if _backend.is_mosaic_gpu(backend):
        from optax_ext.kernels.norms.mosaic_gpu import NORM_MOSAIC_GPU_BLOCK

        return NORM_MOSAIC_GPU_BLOCK
    if _backend.is_mosaic_tpu(backend):
        from optax_ext.kernels.norms.mosaic_tpu import NORM_MOSAIC_TPU_BLOCK

        return NORM_MOSAIC_TPU_BLOCK
    return NORM_GPU_BLOCK if backend == "triton" else NORM_INTERPRET_BLOCK


def _multi_tensor_partials(leaves, backend, block, count_nonfinite=False) -> list[tuple[mt.Launch, list, list]]:
    """Per launch: its plan, its leaves (indices into `leaves`) and `[partials]` (+ `nonfinite`
    partials): the sums of program j's block. Mosaic GPU and TPU group leaves by dtype, so a
    launch's leaves need not be consecutive."""
    if _backend.is_mosaic_gpu(backend):
        from optax_ext.kernels.norms import mosaic_gpu as norms_mosaic_gpu

        interpret = backend == "mosaic_gpu_interpret"
        return norms_mosaic_gpu.partials(leaves, interpret=interpret, block=block, count_nonfinite=count_nonfinite)
    if _backend.is_mosaic_tpu(backend):
        from optax_ext.kernels.norms import mosaic_tpu as norms_mosaic_tpu

        interpret = backend == "mosaic_interpret"
        return norms_mosaic_tpu.partials(leaves, interpret=interpret, block=block, count_nonfinite=count_nonfinite)
    params = (
        _backend.compiler_params("triton", num_warps=NORM_GPU_NUM_WARPS, num_stages=1) if backend == "triton" else None
    )
    outputs = 2 if count_nonfinite else 1
    out = []
    for launch in mt.plan([x.size for x in leaves], 1, block, extra_refs=outputs, max_leaves=NORM_MAX_LEAVES):
        grid = launch.num_programs
        partials = pl.pallas_call(
            _multi_tensor_kernel(launch, count_nonfinite),
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


# --------------------------------------------------------------------------------------------
# "per_leaf"


def _per_leaf_kernel(view, block_shape, count_nonfinite):
    def kernel(x_ref, *o_refs):
        x = x_ref[...].astype(jnp.float32)
        first = pl.program_id(0) * block_shape[0]
        if view[0] % block_shape[0]:  # ragged last block: Pallas pads its reads; zero them
            pos = first + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
            x = jnp.where(pos < view[0], x, 0.0)
        values = [x * x] + ([jnp.where(jnp.isfinite(x), 0.0, 1.0)] if count_nonfinite else [])
        for o_ref, v in zip(o_refs, values):
            if len(view) == 2:
                # Sublane reduction to one (1, 128) row per block; lanes are added in jnp afterwards.
                o_ref[...] = jnp.sum(v, axis=0, keepdims=True).reshape(o_ref.shape)
            else:
                lane = jax.lax.broadcasted_iota(jnp.int32, o_ref.shape, len(o_ref.shape) - 1)
                o_ref[...] = jnp.where(lane == 0, jnp.sum(v), 0.0)

    return kernel


def _per_leaf_sq_norm(x, backend, block, count_nonfinite=False):
    view, block_shape = per_leaf_view(x.size, block)
    grid = pl.cdiv(view[0], block_shape[0])
    params = _backend.compiler_params("mosaic", dimension_semantics=("parallel",)) if backend == "mosaic" else None
    index_map = (lambda i: (i,)) if len(view) == 1 else (lambda i: (i, 0))
    outputs = 2 if count_nonfinite else 1
    # (grid, 1, 128): a (1, 128) block whose last two dims equal the array's, as Mosaic needs.
    partials = pl.pallas_call(
        _per_leaf_kernel(view, block_shape, count_nonfinite),
        out_shape=[jax.ShapeDtypeStruct((grid, 1, LANES), jnp.float32)] * outputs,
        grid=(grid,),
        in_specs=[pl.BlockSpec(block_shape, index_map)],
        out_specs=[pl.BlockSpec((None, 1, LANES), lambda i: (i, 0, 0))] * outputs,
        interpret=backend == "interpret",
        compiler_params=params,
        name="sq_norm_rows" if len(view) == 2 else "sq_norm_flat",
    )(jnp.reshape(x, view))
    sums = [jnp.sum(p) for p in partials]
    return tuple(sums) if count_nonfinite else sums[0]


# --------------------------------------------------------------------------------------------


def _reference(x):
    x = jnp.asarray(x, jnp.float32)
    return jnp.sum(x * x)


def leaf_sq_norms_pallas(
    leaves: Sequence[jax.Array], *, backend: str, form: str | None = None, block: int | None = None
) -> list[jax.Array]:
    """`[sum(x**2) for x in leaves]`, each a f32 scalar, from deterministic Pallas kernels.

    Args:
      leaves: arrays of any shapes (0-d and empty included), dtypes f32/bf16/f16.
      backend: "interpret", "triton", "mosaic", "mosaic_interpret", "mosaic_gpu" or
        "mosaic_gpu_interpret".
      form: "multi_tensor" or "per_leaf" (see the module docstring); default: per backend.
      block: elements per program (multi_tensor, a power of 2) or rows per block (per_leaf, a
        multiple of 8; 1-D views use `block * 128` elements); default: the tunables above.
    """
    form = form or default_form(backend)
    _validate(leaves, backend, form, block)
    sums: list = [None] * len(leaves)
    if form == "per_leaf":
        rows = block or NORM_TPU_BLOCK_ROWS
        for i, x in enumerate(leaves):
            if x.size and per_leaf_view(x.size, rows) is not None:
                sums[i] = _per_leaf_sq_norm(x, backend, rows)
    else:
        for launch, members, (partials,) in _multi_tensor_partials(leaves, backend, block or _default_block(backend)):
            for i, seg in zip(members, launch.segments):
                sums[i] = jnp.sum(partials[seg.start : seg.start + launch.num_blocks(seg)])
    # Empty leaves, and a huge leaf the kernels cannot address, in jnp.
    return [s if s is not None else _reference(x) for s, x in zip(sums, leaves)]


def global_sq_norm_pallas(
    leaves: Sequence[jax.Array],
    *,
    backend: str,
    form: str | None = None,
    block: int | None = None,
    count_nonfinite: bool = False,
):
    """`sum over leaves of sum(x**2)` in f32: one partial per block, one reduction per launch.

    With `count_nonfinite`, returns `(sum, count)` where `count` is the number of NaN or infinite
    elements, from the same pass over the data (`apply_if_finite`'s test: a sum of squares alone
    would also overflow on large finite values).
    """
    form = form or default_form(backend)
    _validate(leaves, backend, form, block)
    total, count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    covered = set()
    if form == "per_leaf":
        rows = block or NORM_TPU_BLOCK_ROWS
        for i, x in enumerate(leaves):
            if x.size and per_leaf_view(x.size, rows) is not None:
                out = _per_leaf_sq_norm(x, backend, rows, count_nonfinite)
                total, count = (total + out[0], count + out[1]) if count_nonfinite else (total + out, count)
                covered.add(i)
    else:
        b = block or _default_block(backend)
        for _, members, partials in _multi_tensor_partials(leaves, backend, b, count_nonfinite):
            total = total + jnp.sum(partials[0])
            if count_nonfinite:
                count = count + jnp.sum(partials[1])
            covered.update(members)
    for i, x in enumerate(leaves):
        if i not in covered:
            total = total + _reference(x)
            count = count + jnp.sum(jnp.where(jnp.isfinite(x), 0.0, 1.0))
    return (total, count) if count_nonfinite else total
