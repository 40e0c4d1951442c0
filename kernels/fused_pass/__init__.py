"""The fused optimizer pass as Pallas kernels: every element read once and written once.

`fused_pass_pallas(body, jobs, shared, backend=...)` runs one composed per-element rule (the
`body` of an `optax_ext.chain` run, see `optax_ext.kernels.elementwise`) over many leaves. Each
`Job` is one leaf: its input arrays (g, p, slots; any float storage dtype), its output dtypes, its
own scalars (a mask, a trust ratio: one value per leaf) and which inputs its outputs overwrite.
For every element e of leaf k:

    outs_k[j][e] = body([x[e] as f32 for x in inputs_k], shared, leaf_scalars_k)[j]  cast to out_dtypes_k[j]

exactly `run_elementwise_reference`, computed blockwise (mixed precision: storage in f32, bf16 or
f16, math in f32, as in Micikevicius et al., 2018, "Mixed Precision Training").

Two forms:
  * "multi_tensor" (every backend by default): up to `MAX_LEAVES` leaves per
    launch, each leaf its own refs, one program per block of any leaf, a switch on the leaf
    (a bisection, `optax_ext.kernels.multi_tensor.leaf_switch`). Outputs overwrite their inputs in place
    (`input_output_aliases`, in place when the caller donates them under jit). A GPT-2-small
    AdamW step is 3 launches instead of 148; nothing is concatenated, sliced or padded. Mosaic GPU
    ("mosaic_gpu", `optax_ext.kernels.fused_pass.mosaic_gpu`) and TPU ("mosaic", and TPU's
    interpreter "mosaic_interpret": `optax_ext.kernels.fused_pass.mosaic_tpu`) run it with their
    own copies: TMA through SMEM, double-buffered DMA through VMEM.
  * "per_leaf" (Mosaic, TPU, on request: `form="per_leaf"`): one call per leaf, BlockSpec'd refs
    that Mosaic pipelines through VMEM itself. A leaf whose size is a multiple of 128 is viewed as a
    lane-dense (rows, 128) slab in (`TPU_BLOCK_ROWS`, 128) blocks; any other leaf as 1-D blocks of
    `TPU_FLAT_BLOCK` elements (a multiple of 1024, one f32 vreg), whose partial last block Pallas
    reads padded and writes clipped. Kept beside the multi-tensor form as a comparison point for a
    TPU: it has no leaf switch and no hand-written DMA, at one call per leaf.

Quantized storage (8-bit optimizer states): an input may be a `QuantizedArray` and an output's
dtype a `QuantFormat`. The multi-tensor form passes its codes and absmax as two refs
(`multi_tensor.Packed`), dequantizes after the load and requantizes before the store, once per
launch (outside the leaf switch); every launch block holds whole quantization blocks, so the new
absmax of a block is a max over the block in registers. One launch mixes quantized and plain leaves
(small leaves stay f32), so an 8-bit step has no more launches than an f32 one. The TPU kernels
(both forms) and Mosaic GPU's leave quantized jobs to the XLA reference: on TPU, regrouping a
block into quantization blocks is a relayout in Mosaic that we cannot check without a TPU.

Scalars are two small f32 vectors per launch: `shared` (the same for every leaf: bias corrections,
learning rate, clip factor) and a per-leaf table (leaf k's values at [k * width, (k + 1) * width)),
in SMEM on TPU and as whole-array (`pl.ANY`) refs read one scalar at a time on GPU. The body receives
indexable objects whose `[j]`
reads one scalar from those refs, so scalars stay scalars inside the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_ext import quantization as q8
from optax_ext.kernels import backend as _backend
from optax_ext.kernels import multi_tensor as mt
from optax_ext.kernels.elementwise import PALLAS_DTYPES, Job, quantized_formats, same_storage, storage_of

__all__ = [
    "FORMS",
    "GPU_BLOCK",
    "GPU_NUM_WARPS",
    "LANES",
    "TPU_BLOCK_ROWS",
    "TPU_FLAT_BLOCK",
    "ScalarRef",
    "default_form",
    "fused_pass_pallas",
]

# Tunables. GPU: elements per Triton program (power of 2); with 8 warps a thread holds 16
# elements per array (four 128-bit loads of f32), which keeps a 4-input/3-output Adam body in
# registers. TPU: 512 rows of f32 (or 64K elements of a 1-D view) = 256 KiB per buffer, so even
# a 5-input/4-output body double-buffered stays below 5 MiB of VMEM.
GPU_BLOCK = 4096
GPU_NUM_WARPS = 8
GPU_NUM_STAGES = 1
TPU_BLOCK_ROWS = 512
TPU_FLAT_BLOCK = 512 * 128
TPU_FLAT_ALIGN = 1024
LANES = 128
INTERPRET_BLOCK = 4096

FORMS = ("multi_tensor", "per_leaf")
BACKENDS = ("interpret", "triton", "mosaic", "mosaic_interpret", "mosaic_gpu", "mosaic_gpu_interpret")


class ScalarRef:
    """`s[j]` inside a kernel: scalar `offset + j` of a f32 scalar ref (SMEM on TPU)."""

    def __init__(self, ref, size: int, offset: int = 0):
        self._ref, self._size, self._offset = ref, size, offset

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, j):
        if not isinstance(j, int) or not -self._size <= j < self._size:
            raise IndexError(f"scalar index {j!r} out of range for {self._size} scalars.")
        return self._ref[self._offset + j % self._size]


def default_form(backend: str) -> str:
    """Every backend runs multi-tensor launches unless asked for the "per_leaf" form (Mosaic TPU only)."""
    return "multi_tensor"


def _validate(jobs: Sequence[Job], shared, backend: str, form: str, block):
    if backend not in BACKENDS:
        raise ValueError(f"fused_pass_pallas(backend={backend!r}): expected one of {', '.join(BACKENDS)}.")
    if form not in FORMS:
        raise ValueError(f"fused_pass_pallas(form={form!r}): expected 'multi_tensor' or 'per_leaf'.")
    if form == "per_leaf" and (_backend.is_mosaic_gpu(backend) or backend == "mosaic_interpret"):
        raise ValueError(f"fused_pass_pallas(form='per_leaf'): backend {backend!r} runs the 'multi_tensor' form.")
    if block is not None and (not isinstance(block, int) or block < 1):
        raise ValueError(f"fused_pass_pallas(block={block!r}): expected a positive int.")
    if block is not None and form == "multi_tensor" and block & (block - 1):
        raise ValueError(f"fused_pass_pallas(block={block}): multi-tensor blocks must be a power of 2.")
    if block is not None and form == "per_leaf" and block % 8:
        raise ValueError(f"fused_pass_pallas(block={block}): per-leaf blocks (rows) must be a multiple of 8.")
    if jnp.ndim(shared) != 1:
        raise ValueError(f"fused_pass_pallas(shared): expected a 1-D vector, got shape {jnp.shape(shared)}.")
    if not jobs:
        return
    n_in, n_out, width = len(jobs[0].inputs), len(jobs[0].out_dtypes), jnp.shape(jobs[0].scalars)
    for k, job in enumerate(jobs):
        where = f"fused_pass_pallas(jobs[{k}])"
        if not job.inputs:
            raise ValueError(f"{where}: expected at least one input array.")
        if not job.out_dtypes:
            raise ValueError(f"{where}: expected at least one output dtype.")
        if (len(job.inputs), len(job.out_dtypes), jnp.shape(job.scalars)) != (n_in, n_out, width):
            raise ValueError(
                f"{where}: every job of one body needs the same number of inputs, outputs and scalars; job 0 "
                f"has {n_in}, {n_out}, {width}, this one {len(job.inputs)}, {len(job.out_dtypes)}, "
                f"{jnp.shape(job.scalars)}."
            )
        if jnp.ndim(job.scalars) != 1:
            raise ValueError(f"{where}.scalars: expected a 1-D vector, got shape {jnp.shape(job.scalars)}.")
        shape = _shape(job.inputs[0])
        for i, x in enumerate(job.inputs):
            if _shape(x) != shape:
                raise ValueError(
                    f"{where}.inputs: all inputs must have one shape; input 0 has {shape}, input {i} has {_shape(x)}."
                )
            if not _storable(storage_of(x)):
                raise TypeError(
                    f"{where}.inputs: input {i} has dtype {storage_of(x)}; expected one of float32, "
                    f"bfloat16, float16 (or a QuantizedArray)."
                )
        for j, d in enumerate(job.out_dtypes):
            if not _storable(d):
                raise TypeError(
                    f"{where}.out_dtypes: output {j} has dtype {d}; expected one of float32, "
                    f"bfloat16, float16 (or a QuantFormat)."
                )
        for i, o in job.aliases.items():
            if not (0 <= i < n_in and 0 <= o < n_out):
                raise ValueError(f"{where}.aliases: {{{i}: {o}}} out of range for {n_in} inputs and {n_out} outputs.")
            if not same_storage(storage_of(job.inputs[i]), job.out_dtypes[o]):
                raise ValueError(
                    f"{where}.aliases: input {i} ({storage_of(job.inputs[i])}) cannot alias output {o} "
                    f"({job.out_dtypes[o]}); dtypes must match."
                )
        if len(set(job.aliases.values())) != len(job.aliases):
            raise ValueError(f"{where}.aliases={dict(job.aliases)}: an output is aliased twice.")


def _shape(x) -> tuple[int, ...]:
    return x.shape if isinstance(x, q8.QuantizedArray) else jnp.shape(x)


def _size(x) -> int:
    return x.size if isinstance(x, q8.QuantizedArray) else jnp.size(x)


def _storable(storage) -> bool:
    return isinstance(storage, q8.QuantFormat) or jnp.dtype(storage) in PALLAS_DTYPES


def _scalar_vector(values: jax.Array) -> jax.Array:
    """A f32 vector of at least one element (a kernel operand may not be empty)."""
    values = jnp.asarray(values, jnp.float32).reshape(-1)
    return values if values.shape[0] else jnp.zeros((1,), jnp.float32)


def _compiler_params(backend: str):
    if backend == "triton":
        return _backend.compiler_params("triton", num_warps=GPU_NUM_WARPS, num_stages=GPU_NUM_STAGES)
    if backend == "mosaic":
        return _backend.compiler_params("mosaic", dimension_semantics=("parallel",))
    return None


def _check_outputs(outs, n_out):
    if len(outs) != n_out:
        raise ValueError(f"fused_pass_pallas(body): body returned {len(outs)} outputs, out_dtypes has {n_out}.")


# --------------------------------------------------------------------------------------------
# "multi_tensor": many leaves per launch (Triton, interpreter)


def _group_refs(refs, formats_per_leaf):
    """Leaf k's operands from the flat refs: a ref, or `mt.Packed(codes, absmax, format)`."""
    it, out = iter(refs), []
    for formats in formats_per_leaf:
        out.append([mt.Packed(next(it), next(it), f) if f is not None else next(it) for f in formats])
    return out


def _multi_tensor_kernel(body, launch: mt.Launch, in_formats, out_formats, n_shared, width):
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
        _check_outputs(ys, n_out)
        ys = [jnp.broadcast_to(jnp.asarray(y, jnp.float32), (launch.block,)) for y in ys]
        mt.store_blocks(launch, _group_refs(outs, out_formats), leaf, program, ys, limit if packs_outputs else None)

    return kernel


def _multi_tensor_launch(body, jobs: Sequence[Job], launch: mt.Launch, shared, backend):
    """One pallas_call over the leaves of `launch` (indices into `jobs`); outputs per leaf."""
    members = [jobs[i] for i in launch.leaves]
    width = members[0].scalars.shape[0]
    table = _scalar_vector(jnp.concatenate([job.scalars for job in members]) if width else jnp.zeros((0,)))
    svec = _scalar_vector(shared)
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
            if isinstance(d, q8.QuantFormat):
                out_shape.extend(
                    [
                        jax.ShapeDtypeStruct(seg.view, jnp.uint8),
                        jax.ShapeDtypeStruct((d.num_blocks(seg.cols),), jnp.float32),
                    ]
                )
            else:
                out_shape.append(jax.ShapeDtypeStruct(seg.view, jnp.dtype(d)))
        for i, o in job.aliases.items():
            aliases[starts_in[i]] = starts_out[o]
            if isinstance(job.out_dtypes[o], q8.QuantFormat):
                aliases[starts_in[i] + 1] = starts_out[o] + 1
        in_formats.append([x.format if isinstance(x, q8.QuantizedArray) else None for x in job.inputs])
        out_formats.append([d if isinstance(d, q8.QuantFormat) else None for d in job.out_dtypes])
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    outs = pl.pallas_call(
        _multi_tensor_kernel(body, launch, in_formats, out_formats, shared.shape[0], width),
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


# --------------------------------------------------------------------------------------------
# "per_leaf": one call per leaf (Mosaic)


def _per_leaf_kernel(body, n_in, n_out, n_shared, width, block_shape):
    def kernel(*refs):
        ins, s_ref, t_ref, outs = refs[:n_in], refs[n_in], refs[n_in + 1], refs[n_in + 2 :]
        ys = list(body([r[...].astype(jnp.float32) for r in ins], ScalarRef(s_ref, n_shared), ScalarRef(t_ref, width)))
        _check_outputs(ys, n_out)
        for r, y in zip(outs, ys):
            r[...] = jnp.broadcast_to(jnp.asarray(y, jnp.float32), block_shape).astype(r.dtype)

    return kernel


def per_leaf_view(n: int, block: int | None) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(view, block shape) of an n-element leaf on TPU: (rows, 128) slabs or 1-D blocks; None if too big."""
    rows, tail = divmod(n, LANES)
    if not tail:
        r = block or TPU_BLOCK_ROWS
        return (rows, LANES), (min(r, rows), LANES)  # a block equal to the full array is always legal
    if n > mt.INDEX_LIMIT:
        return None
    b = (block * LANES) if block else TPU_FLAT_BLOCK
    # Below one aligned block, the whole array is the block (always legal); above, aligned blocks
    # and a partial last block.
    return (n,), ((n,) if n < TPU_FLAT_ALIGN else (min(b, n // TPU_FLAT_ALIGN * TPU_FLAT_ALIGN),))


def _per_leaf_call(body, job, shared, backend, block):
    shape = jnp.shape(job.inputs[0])
    n = job.inputs[0].size
    view, block_shape = per_leaf_view(n, block)
    grid = pl.cdiv(view[0], block_shape[0])
    index_map = (lambda i: (i,)) if len(view) == 1 else (lambda i: (i, 0))
    data_spec = pl.BlockSpec(block_shape, index_map)
    svec, table = _scalar_vector(shared), _scalar_vector(job.scalars)
    if backend == "mosaic":
        from jax.experimental.pallas import tpu as pltpu

        s_specs = [pl.BlockSpec(memory_space=pltpu.SMEM)] * 2
    else:
        s_specs = [pl.BlockSpec(svec.shape, lambda i: (0,)), pl.BlockSpec(table.shape, lambda i: (0,))]
    n_in, n_out = len(job.inputs), len(job.out_dtypes)
    outs = pl.pallas_call(
        _per_leaf_kernel(body, n_in, n_out, shared.shape[0], job.scalars.shape[0], block_shape),
        out_shape=[jax.ShapeDtypeStruct(view, jnp.dtype(d)) for d in job.out_dtypes],
        grid=(grid,),
        in_specs=[data_spec] * n_in + s_specs,
        out_specs=[data_spec] * n_out,
        input_output_aliases=dict(job.aliases),
        interpret=backend == "interpret",
        compiler_params=_compiler_params(backend),
        name="fused_pass_rows" if len(view) == 2 else "fused_pass_flat",
    )(*[jnp.reshape(x, view) for x in job.inputs], svec, table)
    return [o.reshape(shape) for o in outs]


# --------------------------------------------------------------------------------------------


def fused_pass_pallas(
    body: Callable,
    jobs: Sequence[Job],
    shared: jax.Array,
    *,
    backend: str,
    form: str | None = None,
    block: int | None = None,
) -> list[list[jax.Array] | None]:
    """Apply `body` elementwise to every job's leaf with Pallas kernels; same result as the reference.

    Args:
      body: `(list of f32 blocks, shared, leaf) -> list of f32 blocks`; `shared[j]` and `leaf[j]` are
        scalars (leaf: this job's `scalars[j]`).
      jobs: one `Job` per leaf; every job has the same number of inputs, outputs and scalars. Input
        dtypes, output dtypes and shapes may differ between jobs.
      shared: 1-D f32 vector of step-wide values (may be empty).
      backend: "interpret" (Pallas interpreter, any device), "triton", "mosaic" or
        "mosaic_interpret" (TPU's interpreter, any device; see
        `optax_ext.kernels.fused_pass.mosaic_tpu`), "mosaic_gpu" or "mosaic_gpu_interpret" (Mosaic
        GPU's interpreter, any device; see `optax_ext.kernels.fused_pass.mosaic_gpu`).
      form: "multi_tensor" or "per_leaf" (see the module docstring); default: per backend.
      block: elements per program (multi_tensor, a power of 2) or rows per block (per_leaf, a
        multiple of 8; 1-D views use `block * 128` elements); default: the tunables above.

    Returns:
      Per job, its outputs shaped like its inputs (a `QuantizedArray` for a `QuantFormat` output);
      None for a job the kernels cannot address, which the caller runs on XLA: a leaf over 2^31
      elements without a usable 2-D view (on Mosaic GPU and TPU's multi-tensor form: any leaf over
      `mt.INDEX_LIMIT` elements), and on Mosaic GPU and TPU (both forms) any job with quantized
      storage (see the module docstring).
    """
    form = form or default_form(backend)
    _validate(jobs, shared, backend, form, block)
    shared = jnp.asarray(shared, jnp.float32)
    jobs = [job._replace(scalars=jnp.asarray(job.scalars, jnp.float32)) for job in jobs]
    if _backend.is_mosaic_gpu(backend):
        from optax_ext.kernels.fused_pass.mosaic_gpu import fused_pass_mosaic_gpu

        _backend.require_mosaic_gpu(backend)
        return fused_pass_mosaic_gpu(body, jobs, shared, interpret=backend == "mosaic_gpu_interpret", block=block)
    if _backend.is_mosaic_tpu(backend) and form == "multi_tensor":
        from optax_ext.kernels.fused_pass.mosaic_tpu import fused_pass_mosaic_tpu

        return fused_pass_mosaic_tpu(body, jobs, shared, interpret=backend == "mosaic_interpret", block=block)
    results: list = [None] * len(jobs)
    kernel_jobs = []  # indices of the jobs the multi-tensor launches take
    for i, job in enumerate(jobs):
        quantized = quantized_formats(job)
        if _size(job.inputs[0]) == 0:
            if not quantized:
                results[i] = [jnp.zeros(_shape(job.inputs[0]), d) for d in job.out_dtypes]
        elif form == "per_leaf":
            if not quantized and per_leaf_view(job.inputs[0].size, block) is not None:
                results[i] = _per_leaf_call(body, job, shared, backend, block)
        elif not quantized or _size(job.inputs[0]) <= mt.INDEX_LIMIT:
            kernel_jobs.append(i)
    if form == "multi_tensor" and kernel_jobs:
        sub = [jobs[i] for i in kernel_jobs]
        refs = [len(job.inputs) + len(job.out_dtypes) + len(quantized_formats(job)) for job in sub]
        b = block or (GPU_BLOCK if backend == "triton" else INTERPRET_BLOCK)
        min_block = max([f.block_size for job in sub for f in quantized_formats(job)], default=1)
        for launch in mt.plan([_size(job.inputs[0]) for job in sub], refs, b, extra_refs=2, min_block=min_block):
            for i, outs in zip(launch.leaves, _multi_tensor_launch(body, sub, launch, shared, backend)):
                results[kernel_jobs[i]] = outs
    return results
