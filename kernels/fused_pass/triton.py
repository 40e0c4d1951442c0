"""The multi-tensor fused pass as generic Pallas kernels: Triton on CUDA and ROCm, and Pallas' interpreter.

The "triton" and "interpret" backends of `fused_pass_pallas` (same contract). Up to `mt.MAX_LEAVES`
leaves per launch, each leaf its own refs (whole arrays, `pl.ANY`), one program per `GPU_BLOCK`
elements of any leaf; only the loads and stores switch on the leaf (a bisection,
`optax_ext.kernels.multi_tensor`), the body is emitted once per launch. Outputs overwrite their
inputs in place (`input_output_aliases`).

Quantized storage (8-bit optimizer states) is on this backend: a `QuantizedArray` input passes its
codes and absmax as two refs (`multi_tensor.Packed`), dequantized after the load and requantized
before the store, outside the leaf switch; every launch block holds whole quantization blocks, so a
block's new absmax is a max over the block in registers. One launch mixes quantized and plain
leaves, so an 8-bit step has no more launches than an f32 one.

Tunables: `GPU_BLOCK` elements per Triton program (a power of 2); with `GPU_NUM_WARPS` = 8 warps a
thread holds 16 elements per array (four 128-bit loads of f32), which keeps a 4-input/3-output
Adam body in registers.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_ext import quantization as q8
from optax_ext.kernels import backend as _backend
from optax_ext.kernels import multi_tensor as mt
from optax_ext.kernels.elementwise import Job, quantized_formats, storage_avals
from optax_ext.kernels.fused_pass.scalars import ScalarRef, check_outputs, scalar_vector

__all__ = ["GPU_BLOCK", "GPU_NUM_WARPS", "INTERPRET_BLOCK", "fused_pass_triton"]

GPU_BLOCK = 4096
GPU_NUM_WARPS = 8
GPU_NUM_STAGES = 1
INTERPRET_BLOCK = 4096


def _shape(x) -> tuple[int, ...]:
    return x.shape if isinstance(x, q8.QuantizedArray) else jnp.shape(x)


def _size(x) -> int:
    return x.size if isinstance(x, q8.QuantizedArray) else jnp.size(x)


def _compiler_params(backend: str):
    if backend == "triton":
        return _backend.compiler_params("triton", num_warps=GPU_NUM_WARPS, num_stages=GPU_NUM_STAGES)
    return None


def _group_refs(refs, formats_per_leaf):
    """Leaf k's operands from the flat refs: a ref, or `mt.Packed(codes, absmax, format)`."""
    it, out = iter(refs), []
    for formats in formats_per_leaf:
        out.append([mt.Packed(next(it), next(it), f) if f is not None else next(it) for f in formats])
    return out


def _kernel(body, launch: mt.Launch, in_formats, out_formats, n_shared, width):
    """in_formats[k][i]: the QuantFormat of leaf k's input i, or None (plain); likewise outputs."""
    n_in_refs = sum(1 + (f is not None) for formats in in_formats for f in formats)
    n_out = len(out_formats[0])
    packs_outputs = any(f is not None for formats in out_formats for f in formats)

    def kernel(*refs):
        ins, s_ref, t_ref, outs = refs[:n_in_refs], refs[n_in_refs], refs[n_in_refs + 1], refs[n_in_refs + 2 :]
        leaf, program = mt.locate(launch)
        xs, limit = mt.load_blocks(launch, _group_refs(ins, in_formats), leaf, program, with_limit=True)
        # The body is emitted once per launch, not once per leaf: only loads and stores switch.
        ys = list(body(xs, ScalarRef(s_ref, n_shared), ScalarRef(t_ref, width, leaf * width)))
        check_outputs(ys, n_out)
        ys = [jnp.broadcast_to(jnp.asarray(y, jnp.float32), (launch.block,)) for y in ys]
        mt.store_blocks(launch, _group_refs(outs, out_formats), leaf, program, ys, limit if packs_outputs else None)

    return kernel


def _launch(body, jobs: Sequence[Job], launch: mt.Launch, shared, backend):
    """One pallas_call over the leaves of `launch` (indices into `jobs`); outputs per leaf."""
    members = [jobs[i] for i in launch.leaves]
    width = members[0].scalars.shape[0]
    table = scalar_vector(jnp.concatenate([job.scalars for job in members]) if width else jnp.zeros((0,)))
    svec = scalar_vector(shared)
    inputs, out_shape, aliases, in_formats, out_formats = [], [], {}, [], []
    for job, seg in zip(members, launch.segments):
        starts_in, starts_out = [], []  # each operand's first flat ref (a packed one has two)
        for x in job.inputs:
            starts_in.append(len(inputs))
            if isinstance(x, q8.QuantizedArray):
                inputs.extend([x.codes.reshape(seg.view), x.absmax])
            else:
                inputs.append(jnp.reshape(x, seg.view))
        for d in job.out_dtypes:
            starts_out.append(len(out_shape))
            out_shape.extend(storage_avals(d, seg.view))
        for i, o in job.aliases.items():
            aliases[starts_in[i]] = starts_out[o]
            if isinstance(job.out_dtypes[o], q8.QuantFormat):
                aliases[starts_in[i] + 1] = starts_out[o] + 1
        in_formats.append([x.format if isinstance(x, q8.QuantizedArray) else None for x in job.inputs])
        out_formats.append([d if isinstance(d, q8.QuantFormat) else None for d in job.out_dtypes])
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    outs = pl.pallas_call(
        _kernel(body, launch, in_formats, out_formats, shared.shape[0], width),
        out_shape=out_shape,
        grid=(launch.num_programs,),
        in_specs=[any_spec] * (len(inputs) + 2),  # scalars too: read one at a time, any length
        out_specs=[any_spec] * len(out_shape),
        input_output_aliases=aliases,
        interpret=backend == "interpret",
        compiler_params=_compiler_params(backend),
        name=f"fused_pass_{len(members)}_leaves",
    )(*inputs, svec, table)
    results, it = [], iter(outs)
    for job in members:
        shape = _shape(job.inputs[0])
        results.append(
            [
                q8.QuantizedArray(next(it).reshape(shape), next(it), d)
                if isinstance(d, q8.QuantFormat)
                else next(it).reshape(shape)
                for d in job.out_dtypes
            ]
        )
    return results


def fused_pass_triton(body, jobs: Sequence[Job], shared, *, backend: str, block: int | None = None) -> list:
    """`fused_pass_pallas` on Triton ("triton") or Pallas' interpreter ("interpret"). Jobs are
    validated by the caller. Per job its outputs, or None for a quantized leaf over `mt.INDEX_LIMIT`
    elements (or an empty quantized one), which the caller runs on XLA."""
    results: list = [None] * len(jobs)
    kernel_jobs = []  # indices of the jobs the launches take
    for i, job in enumerate(jobs):
        quantized = quantized_formats(job)
        if _size(job.inputs[0]) == 0:
            if not quantized:
                results[i] = [jnp.zeros(_shape(job.inputs[0]), d) for d in job.out_dtypes]
        elif not quantized or _size(job.inputs[0]) <= mt.INDEX_LIMIT:
            kernel_jobs.append(i)
    if not kernel_jobs:
        return results
    sub = [jobs[i] for i in kernel_jobs]
    refs = [len(job.inputs) + len(job.out_dtypes) + len(quantized_formats(job)) for job in sub]
    b = block or (GPU_BLOCK if backend == "triton" else INTERPRET_BLOCK)
    min_block = max([f.block_size for job in sub for f in quantized_formats(job)], default=1)
    for launch in mt.plan([_size(job.inputs[0]) for job in sub], refs, b, extra_refs=2, min_block=min_block):
        for i, outs in zip(launch.leaves, _launch(body, sub, launch, shared, backend)):
            results[kernel_jobs[i]] = outs
    return results
