"""The fused pass on Mosaic GPU for launches with 8-bit (blockwise-quantized) operands.

Same contract and plan as `fused_pass.mosaic_gpu` (TMA copies of a block's 256-element chunks
through SMEM, only the copies switch on the leaf); what differs is that a quantized operand is
dequantized after the load and requantized before the store, one quantization block at a time:

    TMA: leaf k's block of every input, GMEM -> SMEM      (codes as uint8 chunks)
    scalar loads: the block's absmax of each quantized input, GMEM -> SMEM
    for each row r of the block (256 elements = one quantization block), in a loop:
        x_j = row r of input j as f32, or decode(codes) * absmax_j[r]
        y = body(x, shared, leaf scalars)
        y_j -> row r of output j, or: m = max |y_j| over the row's elements that exist,
               codes = encode(y_j / m) -> row r, absmax_j[r] = m
    TMA: SMEM -> leaf k's block of every output; scalar stores: the block's new absmax

Why rows. Lane semantics reduces a strided register array only as a whole, so a quantization
block's absmax is a whole-row reduction: quantization blocks of `CHUNK` = 256 elements (the
default `Int8Blockwise.block_size`), one per SMEM row; other block sizes are left to XLA. The body
is traced once, inside the row loop. An absmax is read and written with scalar GMEM accesses: a
block's 8 absmax are 32 bytes, under the 128 bytes a TMA copy moves in lane semantics. The absmax
of a ragged leaf's last row counts only its elements (an iota against the leaf's size), as
`quantization.quantize_leaf` pads with zeros. These kernels keep Pallas' automatic barriers: the
absmax vectors in SMEM are written and read by the same threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_ext import quantization as q8
from optax_ext.kernels import mosaic_gpu_blocks as mgb
from optax_ext.kernels import multi_tensor as mt
from optax_ext.kernels.elementwise import Job, quantized_formats, storage_avals, storage_of
from optax_ext.kernels.fused_pass.scalars import ScalarRef, check_outputs

__all__ = ["launch", "takes"]


def takes(job: Job) -> bool:
    """Whether these kernels run a quantized job: every format's block is one SMEM row (256)."""
    formats = quantized_formats(job)
    return bool(formats) and all(f.block_size == mgb.CHUNK for f in formats)


def _fmt(storage):
    return storage if isinstance(storage, q8.QuantFormat) else None


def _kernel(body: Callable, launch: mt.Launch, members: Sequence[Job], n_shared: int, width: int, vec_sizes):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from optax_ext.kernels.fused_pass.mosaic_gpu import _sources, _vector_chunks

    job0 = members[0]
    in_fmts = [_fmt(storage_of(x)) for x in job0.inputs]
    out_fmts = [_fmt(d) for d in job0.out_dtypes]
    n_out = len(out_fmts)
    q_in = [j for j, f in enumerate(in_fmts) if f]
    q_out = [o for o, f in enumerate(out_fmts) if f]
    rows = launch.block // mgb.CHUNK
    in_refs = len(in_fmts) + len(q_in)  # per leaf: a ref per input, plus an absmax ref per quantized one
    # Every register row in one strided layout, 2 elements per thread and vector (`mgb.load_block`).
    layout = plgpu.Layout.WG_STRIDED((mgb.CHUNK,), vec_size=2)
    n_fresh_refs = sum(
        (1 + (out_fmts[o] is not None)) for job in members for o in range(n_out) if o not in _sources(job)
    )

    def kernel(*refs):
        num = len(members)
        flat_in = refs[: num * in_refs]
        s_gmem, t_gmem = refs[num * in_refs], refs[num * in_refs + 1]
        it = iter(refs[num * in_refs + 2 : num * in_refs + 2 + n_fresh_refs])
        ins, in_absmax, outs, out_absmax = [], [], [], []
        for k, job in enumerate(members):
            mine = flat_in[k * in_refs : (k + 1) * in_refs]
            data, absmax, at = [], {}, 0
            for j, f in enumerate(in_fmts):
                data.append(mine[at])
                if f:
                    absmax[j] = mine[at + 1]
                at += 1 + bool(f)
            ins.append(data)
            in_absmax.append(absmax)
            source = _sources(job)
            o_data, o_absmax = [], {}
            for o, f in enumerate(out_fmts):
                if o in source:
                    o_data.append(data[source[o]])
                    if f:
                        o_absmax[o] = absmax[source[o]]
                else:
                    o_data.append(next(it))
                    if f:
                        o_absmax[o] = next(it)
            outs.append(o_data)
            out_absmax.append(o_absmax)
        scratch = refs[num * in_refs + 2 + n_fresh_refs :]
        n_in = len(in_fmts)
        smem_in, smem_out = scratch[:n_in], scratch[n_in : n_in + n_out]
        a_in = scratch[n_in + n_out : n_in + n_out + len(q_in)]
        a_out = scratch[n_in + n_out + len(q_in) : n_in + n_out + len(q_in) + len(q_out)]
        s_smem, t_smem, bar, vec_bar = scratch[n_in + n_out + len(q_in) + len(q_out) :]

        at = mgb.locate(launch)
        segs = launch.segments
        (size,) = mt.select_by_leaf(launch, at.program, [seg.cols for seg in segs])
        first_row = jax.lax.div(at.first, jnp.int32(mgb.CHUNK))
        for gmem, smem, (n, offset) in ((s_gmem, s_smem, vec_sizes[0]), (t_gmem, t_smem, vec_sizes[1])):
            for g_index, s_index in _vector_chunks(n, offset):
                plgpu.copy_gmem_to_smem(gmem.at[g_index], smem.at[s_index], vec_bar)
        mgb.copy_in(launch, ins, smem_in, bar, at)

        def absmax_branch(k, read: bool):
            n_rows = -(-segs[k].cols // mgb.CHUNK)

            def run():
                pairs = zip(q_in, a_in) if read else zip(q_out, a_out)
                for j, buf in pairs:
                    ref = in_absmax[k][j] if read else out_absmax[k][j]
                    for r in range(rows):

                        def one(r=r, ref=ref, buf=buf):
                            if read:
                                buf[r] = ref[first_row + r]
                            else:
                                ref[first_row + r] = buf[r]

                        if n_rows % rows == 0:
                            one()
                        else:
                            pl.when(first_row + r < n_rows)(one)

            return run

        if q_in:
            mgb._switch(at.leaf, [absmax_branch(k, True) for k in range(len(segs))])
        plgpu.barrier_wait(vec_bar)
        plgpu.barrier_wait(bar)
        iota = plgpu.broadcasted_iota(jnp.int32, (mgb.CHUNK,), 0, layout=layout)

        def row(r, carry):
            xs = []
            for j, buf in enumerate(smem_in):
                v = plgpu.load(buf.at[r], layout=layout)
                if in_fmts[j]:
                    scale = a_in[q_in.index(j)][r]
                    v = q8.decode(v.astype(jnp.int32), in_fmts[j].signed) * scale
                xs.append(v.astype(jnp.float32))
            ys = list(body(xs, ScalarRef(s_smem, n_shared), ScalarRef(t_smem, width, at.leaf * width)))
            check_outputs(ys, n_out)
            exists = iota < size - at.first - r * mgb.CHUNK
            for o, (buf, y) in enumerate(zip(smem_out, ys)):
                y = jnp.broadcast_to(jnp.asarray(y, jnp.float32), (mgb.CHUNK,))
                f = out_fmts[o]
                if f is None:
                    buf[r] = y.astype(buf.dtype)
                    continue
                y = jnp.where(exists, y, 0.0)
                m = jnp.max(jnp.abs(y))
                buf[r] = q8.encode(y / jnp.where(m > 0, m, 1.0), f.signed).astype(jnp.uint8)
                a_out[q_out.index(o)][r] = m
            return carry

        jax.lax.fori_loop(0, rows, row, None)
        mgb.copy_out(launch, outs, smem_out, at)
        if q_out:
            mgb._switch(at.leaf, [absmax_branch(k, False) for k in range(len(segs))])

    return kernel


def launch(body, members: Sequence[Job], launch: mt.Launch, shared, svec, table, table_at, interpret: bool):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from optax_ext.kernels.fused_pass.mosaic_gpu import _sources, _vector_chunks

    width = members[0].scalars.shape[0]
    job0 = members[0]
    in_fmts = [_fmt(storage_of(x)) for x in job0.inputs]
    out_fmts = [_fmt(d) for d in job0.out_dtypes]
    rows = launch.block // mgb.CHUNK
    operands, out_type = [], []
    for job, seg in zip(members, launch.segments):
        for i, x in enumerate(job.inputs):
            wrap = jax.new_ref if i in job.aliases else (lambda a: a)
            if isinstance(x, q8.QuantizedArray):
                operands.extend([wrap(jnp.reshape(x.codes, seg.view)), wrap(x.absmax)])
            else:
                operands.append(wrap(jnp.reshape(x, seg.view)))
        source = _sources(job)
        for o, d in enumerate(job.out_dtypes):
            if o not in source:
                out_type.extend(storage_avals(d, seg.view))

    def smem_dtype(storage):
        return jnp.uint8 if isinstance(storage, q8.QuantFormat) else storage

    scratch = (
        [mgb.smem_block(launch, smem_dtype(storage_of(x))) for x in job0.inputs]
        + [mgb.smem_block(launch, smem_dtype(d)) for d in job0.out_dtypes]
        + [plgpu.SMEM((rows,), jnp.float32) for f in in_fmts if f]
        + [plgpu.SMEM((rows,), jnp.float32) for f in out_fmts if f]
        + [
            plgpu.SMEM(svec.shape, jnp.float32),
            plgpu.SMEM((table_at[0],), jnp.float32),
            plgpu.Barrier(num_arrivals=len(in_fmts) * rows),
            plgpu.Barrier(num_arrivals=len(_vector_chunks(svec.shape[0])) + len(_vector_chunks(table_at[0]))),
        ]
    )
    kernel = _kernel(body, launch, members, shared.shape[0], width, ((svec.shape[0], 0), table_at))
    fresh = iter(
        mgb.run_kernel(
            kernel,
            launch,
            [*operands, svec, table],
            out_type,
            scratch,
            interpret=interpret,
            name=f"fused_pass_8bit_{len(members)}_leaves",
            auto_barriers=True,
        )
    )
    results, pos = [], 0
    for job in members:
        source = _sources(job)
        shape = jnp.shape(job.inputs[0].codes if isinstance(job.inputs[0], q8.QuantizedArray) else job.inputs[0])
        starts = []
        for x in job.inputs:
            starts.append(pos)
            pos += 2 if isinstance(x, q8.QuantizedArray) else 1
        leaf_outs = []
        for o, d in enumerate(job.out_dtypes):
            if o in source:
                at = starts[source[o]]
                if isinstance(d, q8.QuantFormat):
                    leaf_outs.append(q8.QuantizedArray(operands[at][...].reshape(shape), operands[at + 1][...], d))
                else:
                    leaf_outs.append(operands[at][...].reshape(shape))
            elif isinstance(d, q8.QuantFormat):
                leaf_outs.append(q8.QuantizedArray(next(fresh).reshape(shape), next(fresh), d))
            else:
                leaf_outs.append(next(fresh).reshape(shape))
        results.append(leaf_outs)
    return results
