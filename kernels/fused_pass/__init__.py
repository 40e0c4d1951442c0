"""The fused optimizer pass as Pallas kernels: every element read once and written once.

`fused_pass_pallas(body, jobs, shared, backend=...)` runs one composed per-element rule (the
`body` of an `optax_ext.chain` run, see `optax_ext.kernels.elementwise`) over many leaves. Each
`Job` is one leaf: its input arrays (g, p, slots; any float storage dtype), its output dtypes, its
own scalars (a mask, a trust ratio: one value per leaf) and which inputs its outputs overwrite.
For every element e of leaf k:

    outs_k[j][e] = body([x[e] as f32 for x in inputs_k], shared, leaf_scalars_k)[j]  cast to out_dtypes_k[j]

exactly `run_elementwise_reference`, computed blockwise (mixed precision: storage in f32, bf16 or
f16, math in f32, as in Micikevicius et al., 2018, "Mixed Precision Training").

One package, one file per backend (each backend's kernels, block sizes and plan are in its file):

  * `triton` ("triton", and Pallas' interpreter "interpret"): the "multi_tensor" form as generic
    Pallas kernels: up to `multi_tensor.MAX_LEAVES` leaves per launch, each leaf its own refs, one program per
    block of any leaf, a switch on the leaf around the loads and stores. Quantized storage (8-bit
    states) is packed into the same launches.
  * `mosaic_gpu` ("mosaic_gpu", "mosaic_gpu_interpret"): the multi-tensor form on Mosaic GPU, TMA
    copies through SMEM; `mosaic_gpu_8bit` its launches with 8-bit operands.
  * `mosaic_tpu` ("mosaic", "mosaic_interpret"): the multi-tensor form on TPU, double-buffered DMA
    through VMEM.
  * `per_leaf` (`form="per_leaf"`, TPU on request): one call per leaf, BlockSpec'd refs that
    Mosaic pipelines itself; a comparison point for a TPU.
  * `scalars`: how a body reads its scalars on all of them.

Every multi-tensor form overwrites inputs in place (in place when the caller donates them under
jit) and concatenates, slices or pads nothing: a GPT-2-small AdamW step is 3 launches instead of
148. 8-bit (quantized) jobs run in Triton's kernels and, with 256-element quantization blocks
(the default), in Mosaic GPU's (`mosaic_gpu_8bit`: one quantization block per SMEM row); TPU and
the per-leaf form leave them to the XLA reference (regrouping a block into quantization blocks is
a relayout in Mosaic that we cannot check without a TPU), as Mosaic GPU does other block sizes.

Scalars are two small f32 vectors per launch: `shared` (the same for every leaf: bias corrections,
learning rate, clip factor) and a per-leaf table (leaf k's values at [k * width, (k + 1) * width));
the body receives indexable objects whose `[j]` reads one scalar (`scalars.ScalarRef`), so scalars
stay scalars inside the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from optax_ext import quantization as q8
from optax_ext.kernels import backend as _backend
from optax_ext.kernels.elementwise import PALLAS_DTYPES, Job, same_storage, storage_of
from optax_ext.kernels.fused_pass.per_leaf import LANES, TPU_BLOCK_ROWS, TPU_FLAT_BLOCK, fused_pass_per_leaf
from optax_ext.kernels.fused_pass.scalars import ScalarRef
from optax_ext.kernels.fused_pass.triton import GPU_BLOCK, GPU_NUM_WARPS, fused_pass_triton

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

FORMS = ("multi_tensor", "per_leaf")
BACKENDS = ("interpret", "triton", "mosaic", "mosaic_interpret", "mosaic_gpu", "mosaic_gpu_interpret")


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


def _storable(storage) -> bool:
    return isinstance(storage, q8.QuantFormat) or jnp.dtype(storage) in PALLAS_DTYPES


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
        multiple of 8; 1-D views use `block * 128` elements); default: the backend's own.

    Returns:
      Per job, its outputs shaped like its inputs (a `QuantizedArray` for a `QuantFormat` output);
      None for a job the kernels cannot address, which the caller runs on XLA: a leaf over 2^31
      elements without a usable 2-D view (on Mosaic GPU and TPU's multi-tensor form: any leaf over
      `mt.INDEX_LIMIT` elements), on TPU (both forms) any job with quantized storage, and on Mosaic
      GPU one whose quantization blocks are not 256 elements (see the module docstring).
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
    if form == "per_leaf":
        return fused_pass_per_leaf(body, jobs, shared, backend=backend, block=block)
    return fused_pass_triton(body, jobs, shared, backend=backend, block=block)
