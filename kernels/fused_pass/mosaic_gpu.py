"""The fused optimizer pass as Mosaic GPU kernels: the "mosaic_gpu" backend of `fused_pass_pallas`.

Same contract as `optax_ext.kernels.fused_pass` (for every element e of leaf k,
`outs_k[j][e] = body([x[e] as f32 for x in inputs_k], shared, leaf_scalars_k)[j]`, stored in the
output's dtype), same multi-tensor plan: up to `mt.MAX_LEAVES` leaves per launch (fewer where
their TMA descriptors would overflow, `mosaic_gpu_blocks.MAX_TMA_REFS`), one thread block
per `MOSAIC_GPU_BLOCK` elements of any leaf. A block's life (`optax_ext.kernels.mosaic_gpu_blocks`):

    TMA: leaf k's block of every input, GMEM -> SMEM        (the only code that switches on k)
    registers: x_j = smem_in[j] as f32;  y = body(x, shared, leaf scalars);  smem_out[j] = y_j
    TMA: SMEM -> leaf k's block of every output, GMEM       (switches on k)

Outputs that overwrite an input (`Job.aliases`) are written into that input's buffer: the input is
passed as a `jax.new_ref`, which the kernel updates in place (JAX turns the write into an
input/output alias, in place when the caller donates the input under jit). The two scalar vectors
(`shared`, and the per-leaf table with leaf k's values at [k * width, (k + 1) * width)) are copied
into SMEM once per block and read one scalar at a time.

Block size and pipelining. A block is `MOSAIC_GPU_BLOCK` = 2048 elements: an AdamW step with the
update applied (4 inputs g, p, m, v; 3 outputs) holds 7 buffers of 8 KiB of f32 = 56 KiB of SMEM
per thread block, so an H100 SM (227 KiB of SMEM) runs 4 blocks at once, and while one computes,
the others' copies are in flight: 4 x 32 KiB of loads per SM against the ~25 KiB that Little's law
asks for at 3.35 TB/s over 132 SMs and ~1 us of memory latency. The pipelining is across resident
blocks rather than double buffers inside one, which keeps the kernel a straight line: the leaf
switch issues copies only. One warpgroup (128 threads) per block: 16 elements per thread per
operand.

Quantized storage (8-bit states): launches whose leaves have 8-bit operands run the row-wise kernel
of `fused_pass.mosaic_gpu_8bit` (quantization blocks of 256 elements, the default); a job with
another block size returns None and the caller runs it on XLA (the other leaves stay in the kernels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from optax_ext import quantization as q8
from optax_ext.kernels import mosaic_gpu_blocks as mgb
from optax_ext.kernels import multi_tensor as mt
from optax_ext.kernels.elementwise import Job, plain_kernel_jobs, storage_of
from optax_ext.kernels.fused_pass.scalars import ScalarRef, check_outputs

__all__ = ["MOSAIC_GPU_BLOCK", "fused_pass_mosaic_gpu"]

MOSAIC_GPU_BLOCK = 2048


def _padded_vector(values) -> jax.Array:
    """A f32 vector of a positive multiple of 32 elements: a TMA copy in lane semantics moves a
    multiple of 128 bytes (`mosaic_gpu_blocks.run_kernel`)."""
    values = jnp.asarray(values, jnp.float32).reshape(-1)
    n = max(32, -(-values.shape[0] // 32) * 32)
    return jnp.pad(values, (0, n - values.shape[0]))


def _vector_chunks(n: int, offset: int = 0) -> list:
    """(GMEM index, SMEM index) of each TMA copy of n scalars starting at `offset` of a GMEM vector."""
    from jax.experimental import pallas as pl

    return [(pl.ds(offset + c, min(mgb.CHUNK, n - c)), pl.ds(c, min(mgb.CHUNK, n - c))) for c in range(0, n, mgb.CHUNK)]


def _sources(job: Job) -> dict[int, int]:
    """{output: the input it overwrites} (the inverse of `job.aliases`)."""
    return {o: i for i, o in job.aliases.items()}


def _kernel(body: Callable, launch: mt.Launch, members: Sequence[Job], n_shared: int, width: int, vec_sizes):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    num = len(members)
    n_in, n_out = len(members[0].inputs), len(members[0].out_dtypes)
    n_fresh = sum(n_out - len(job.aliases) for job in members)  # outputs with a buffer of their own

    def kernel(*refs):
        ins = [refs[k * n_in : (k + 1) * n_in] for k in range(num)]
        s_gmem, t_gmem = refs[num * n_in], refs[num * n_in + 1]
        it = iter(refs[num * n_in + 2 : num * n_in + 2 + n_fresh])
        outs = []
        for k, job in enumerate(members):
            source = _sources(job)
            outs.append([ins[k][source[o]] if o in source else next(it) for o in range(n_out)])
        scratch = refs[num * n_in + 2 + n_fresh :]
        smem_in, smem_out = scratch[:n_in], scratch[n_in : n_in + n_out]
        s_smem, t_smem, bar, vec_bar = scratch[n_in + n_out :]

        at = mgb.locate(launch)
        for gmem, smem, (n, offset) in ((s_gmem, s_smem, vec_sizes[0]), (t_gmem, t_smem, vec_sizes[1])):
            for g_index, s_index in _vector_chunks(n, offset):
                plgpu.copy_gmem_to_smem(gmem.at[g_index], smem.at[s_index], vec_bar)
        mgb.copy_in(launch, ins, smem_in, bar, at)
        plgpu.barrier_wait(vec_bar)
        plgpu.barrier_wait(bar)
        xs = [mgb.load_block(buf, [b.dtype for b in smem_in + smem_out]) for buf in smem_in]
        # The body is emitted once per launch, not once per leaf: only the copies switch.
        ys = list(body(xs, ScalarRef(s_smem, n_shared), ScalarRef(t_smem, width, at.leaf * width)))
        check_outputs(ys, n_out)
        for buf, y in zip(smem_out, ys):
            buf[...] = jnp.broadcast_to(jnp.asarray(y, jnp.float32), buf.shape).astype(buf.dtype)
        mgb.copy_out(launch, outs, smem_out, at)

    return kernel


def _launch(body, members: Sequence[Job], launch: mt.Launch, shared, svec, table, table_at, interpret: bool):
    """One kernel over the leaves of `launch`. `svec`: the padded shared scalars; `table_at`: (size,
    offset) of this launch's leaf scalars in `table`, the padded tables of all launches of the call."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    width = members[0].scalars.shape[0]
    n_in, n_out = len(members[0].inputs), len(members[0].out_dtypes)
    operands, out_type = [], []
    for job, seg in zip(members, launch.segments):
        for i, x in enumerate(job.inputs):
            x = jnp.reshape(x, seg.view)
            operands.append(jax.new_ref(x) if i in job.aliases else x)
        source = _sources(job)
        out_type.extend(
            jax.ShapeDtypeStruct(seg.view, jnp.dtype(d)) for o, d in enumerate(job.out_dtypes) if o not in source
        )
    scratch = (
        [mgb.smem_block(launch, x.dtype) for x in members[0].inputs]
        + [mgb.smem_block(launch, d) for d in members[0].out_dtypes]
        + [
            plgpu.SMEM(svec.shape, jnp.float32),
            plgpu.SMEM((table_at[0],), jnp.float32),
            plgpu.Barrier(num_arrivals=n_in * (launch.block // mgb.CHUNK)),
            plgpu.Barrier(num_arrivals=len(_vector_chunks(svec.shape[0])) + len(_vector_chunks(table_at[0]))),
        ]
    )
    kernel = _kernel(body, launch, members, shared.shape[0], width, ((svec.shape[0], 0), table_at))
    fresh_outs = mgb.run_kernel(
        kernel,
        launch,
        [*operands, svec, table],
        out_type,
        scratch,
        interpret=interpret,
        name=f"fused_pass_{len(members)}_leaves",
    )
    fresh_it = iter(fresh_outs)
    results, pos = [], 0
    for job in members:
        source = _sources(job)
        shape = jnp.shape(job.inputs[0])
        leaf_outs = []
        for o in range(n_out):
            if o in source:
                leaf_outs.append(operands[pos + source[o]][...].reshape(shape))
            else:
                leaf_outs.append(next(fresh_it).reshape(shape))
        results.append(leaf_outs)
        pos += n_in
    return results


def fused_pass_mosaic_gpu(
    body: Callable, jobs: Sequence[Job], shared: jax.Array, *, interpret: bool, block: int | None = None
) -> list[list[jax.Array] | None]:
    """`fused_pass_pallas` on Mosaic GPU (`interpret`: in Mosaic GPU's interpreter, on any device).

    Jobs are validated by the caller. Returns per job its outputs, or None for a job left to the
    caller (quantization blocks other than 256 elements, or a leaf over `mt.INDEX_LIMIT` elements).
    """
    from optax_ext.kernels.fused_pass import mosaic_gpu_8bit

    results, kernel_jobs, signatures = plain_kernel_jobs(jobs, mt.INDEX_LIMIT)
    for i, job in enumerate(jobs):  # 8-bit jobs whose quantization blocks are SMEM rows
        n = jnp.size(job.inputs[0].codes if isinstance(job.inputs[0], q8.QuantizedArray) else job.inputs[0])
        if 0 < n <= mt.INDEX_LIMIT and mosaic_gpu_8bit.takes(job):
            kernel_jobs.append(i)
            signatures.append((tuple(map(storage_of, job.inputs)), tuple(job.out_dtypes)))
    if not kernel_jobs:
        return results
    sub = [jobs[i] for i in kernel_jobs]
    refs = [len(job.inputs) + len(job.out_dtypes) - len(job.aliases) for job in sub]
    b = block or MOSAIC_GPU_BLOCK
    sizes = [int(np.prod(getattr(job.inputs[0], "shape", jnp.shape(job.inputs[0])))) for job in sub]
    plans = mgb.plan_by_dtype(signatures, sizes, refs, b, extra_refs=2)
    # One padded vector of shared scalars and one table of every launch's leaf scalars (each launch's
    # part padded to 32 f32, `_padded_vector`) for the whole call: two XLA ops, not two per launch.
    svec = _padded_vector(shared)
    parts, places, offset = [], [], 0
    for _, _, members in plans:
        width = sub[members[0]].scalars.shape[0]
        # With no leaf scalars, the jobs' empty vectors are left unused (XLA drops them, not one op
        # each); zeros, not a constant array: the per-shard function may close over no constants.
        part = _padded_vector(jnp.concatenate([sub[i].scalars for i in members]) if width else jnp.zeros((0,)))
        parts.append(part)
        places.append((part.shape[0], offset))
        offset += part.shape[0]
    table = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
    for (sig, launch, members), at in zip(plans, places):
        quantized = any(isinstance(s, q8.QuantFormat) for s in jax.tree.leaves(sig))
        run = mosaic_gpu_8bit.launch if quantized else _launch
        outs = run(body, [sub[i] for i in members], launch, shared, svec, table, at, interpret)
        for i, o in zip(members, outs):
            results[kernel_jobs[i]] = o
    return results
