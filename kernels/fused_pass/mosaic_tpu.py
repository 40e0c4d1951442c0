"""The fused optimizer pass as TPU (Mosaic) kernels: the "mosaic" backend of `fused_pass_pallas`.

Same contract as `optax_ext.kernels.fused_pass` (for every element e of leaf k,
`outs_k[j][e] = body([x[e] as f32 for x in inputs_k], shared, leaf_scalars_k)[j]`, stored in the
output's dtype), same multi-tensor plan: up to `mt.MAX_LEAVES` leaves per launch, leaves grouped by
the dtypes of their operands, one grid step per `MOSAIC_TPU_BLOCK` elements of any leaf. A step's
life (`optax_ext.kernels.mosaic_tpu_blocks`, double-buffered):

    DMA: leaf k's block of every input, HBM -> VMEM slot    (the only code that switches on k,
                                                              started one step ahead)
    VMEM: x_j = in_j[slot] as f32;  y = body(x, shared, leaf scalars);  out_j[slot] = y_j
    DMA: out_j[slot] -> leaf k's block of every output, HBM  (switches on k; waited two steps later)

Outputs that overwrite an input (`Job.aliases`) are `input_output_aliases` of the call: the output
ref is the input's HBM buffer, in place when the caller donates it under jit. The two scalar
vectors (`shared`, and the launch's leaf table: leaf k's values at [k * width, (k + 1) * width))
are whole arrays in SMEM, read one scalar at a time.

Block size: 64K elements (256 KiB of f32), the per-leaf form's 1-D block. An AdamW step with the
update applied (4 inputs g, p, m, v; 3 outputs) holds 7 buffers of two slots, 3.5 MiB of VMEM for
f32, plus the body's block-sized temporaries, under the 16 MiB that Mosaic allows a kernel by
default on a v5e. A launch whose leaves are all smaller takes the smallest power of two >= 1024
(2048 with 16-bit operands, `mosaic_tpu_blocks.ALIGN`) that holds its largest leaf (`mt.plan`),
so a launch of small leaves is one step per leaf.

Quantized storage (8-bit states) is not on this backend: such jobs return None and the caller runs
them on XLA (the other leaves stay in the kernels); likewise leaves over `mt.INDEX_LIMIT` elements.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_ext.kernels import mosaic_tpu_blocks as mtb
from optax_ext.kernels import multi_tensor as mt
from optax_ext.kernels.elementwise import Job, plain_kernel_jobs
from optax_ext.kernels.fused_pass.scalars import ScalarRef, check_outputs, scalar_vector

__all__ = ["MOSAIC_TPU_BLOCK", "fused_pass_mosaic_tpu"]

MOSAIC_TPU_BLOCK = 64 * 1024


def _kernel(body: Callable, launch: mt.Launch, n_in: int, n_out: int, n_shared: int, width: int):
    num = len(launch.segments)

    def kernel(*refs):
        ins = [refs[k * n_in : (k + 1) * n_in] for k in range(num)]
        s_ref, t_ref = refs[num * n_in], refs[num * n_in + 1]
        at = num * n_in + 2
        outs = [refs[at + k * n_out : at + (k + 1) * n_out] for k in range(num)]
        at += num * n_out
        vin, vout, sem_in, sem_out = refs[at : at + n_in], refs[at + n_in : at + n_in + n_out], *refs[-2:]
        leaf, _ = mtb.locate(launch)
        b = launch.block

        def compute(offset):
            xs = [buf[pl.ds(offset, b)].astype(jnp.float32) for buf in vin]
            # The body is emitted once per launch, not once per leaf: only the copies switch.
            ys = list(body(xs, ScalarRef(s_ref, n_shared), ScalarRef(t_ref, width, leaf * width)))
            check_outputs(ys, n_out)
            for buf, y in zip(vout, ys):
                buf[pl.ds(offset, b)] = jnp.broadcast_to(jnp.asarray(y, jnp.float32), (b,)).astype(buf.dtype)

        mtb.run_block(launch, mtb.Stream(ins, vin, sem_in, True), mtb.Stream(outs, vout, sem_out, False), compute)

    return kernel


def _launch(body, members: Sequence[Job], launch: mt.Launch, svec, interpret: bool):
    width = members[0].scalars.shape[0]
    n_in, n_out = len(members[0].inputs), len(members[0].out_dtypes)
    table = scalar_vector(jnp.concatenate([job.scalars for job in members]) if width else jnp.zeros((0,)))
    operands, out_shape, aliases = [], [], {}
    for k, (job, seg) in enumerate(zip(members, launch.segments)):
        operands.extend(jnp.reshape(x, seg.view) for x in job.inputs)
        out_shape.extend(jax.ShapeDtypeStruct(seg.view, jnp.dtype(d)) for d in job.out_dtypes)
        aliases.update({k * n_in + i: k * n_out + o for i, o in job.aliases.items()})
    scratch = [
        *mtb.buffers(launch, [x.dtype for x in members[0].inputs]),
        *mtb.buffers(launch, members[0].out_dtypes),
        mtb.semaphores(n_in),
        mtb.semaphores(n_out),
    ]
    outs = mtb.pallas_call(
        _kernel(body, launch, n_in, n_out, svec.shape[0], width),
        launch,
        [*operands, svec, table],
        out_shape,
        scratch,
        n_any=len(operands),
        interpret=interpret,
        name=f"fused_pass_{len(members)}_leaves",
        out_specs=[pl.BlockSpec(memory_space=pl.ANY)] * len(out_shape),
        input_output_aliases=aliases,
    )
    return [
        [o.reshape(jnp.shape(job.inputs[0])) for o in outs[k * n_out : (k + 1) * n_out]]
        for k, job in enumerate(members)
    ]


def fused_pass_mosaic_tpu(
    body: Callable, jobs: Sequence[Job], shared: jax.Array, *, interpret: bool, block: int | None = None
) -> list[list[jax.Array] | None]:
    """`fused_pass_pallas` on TPU (`interpret`: in TPU's interpreter, on any device).

    Jobs are validated by the caller. Returns per job its outputs, or None for a job left to the
    caller (quantized storage, or a leaf over `mt.INDEX_LIMIT` elements).
    """
    results, kernel_jobs, signatures = plain_kernel_jobs(jobs, mt.INDEX_LIMIT)
    if not kernel_jobs:
        return results
    sub = [jobs[i] for i in kernel_jobs]
    refs = [len(job.inputs) + len(job.out_dtypes) for job in sub]
    b = max(mtb.ALIGN, mt.pow2_at_least(block)) if block else MOSAIC_TPU_BLOCK
    svec = scalar_vector(shared)
    for _, launch, members in mtb.plan_by_dtype(
        signatures, [jnp.size(job.inputs[0]) for job in sub], refs, b, extra_refs=2
    ):
        for i, outs in zip(members, _launch(body, [sub[i] for i in members], launch, svec, interpret)):
            results[kernel_jobs[i]] = outs
    return results
