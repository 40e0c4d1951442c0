"""Run one composed per-element rule over many leaves: the fused optimizer pass.

`run_fused(body, jobs, shared)` is the single entry point every fused run of `optax_ext.chain`
goes through. `body(inputs, shared, leaf) -> outputs` is pure per-element math on f32 values:
each input upcast to f32, `shared[j]` a step-wide scalar (a bias correction, the learning rate),
`leaf[j]` one of this leaf's own scalars (a mask, a trust ratio); outputs are cast to the job's
`out_dtypes`. On the "xla" backend the body is traced as plain jnp per leaf and XLA fuses it; the
Pallas backends run the same body inside multi-tensor kernels (one read, one write per element,
many leaves per launch; see `optax_ext.kernels.fused_pass`).

Quantized storage (8-bit optimizer states, `optax_ext.quantization`) is a property of an input or
output, not of the body: an input may be a `QuantizedArray` (dequantized to f32 before the body
sees it) and an output's dtype a `QuantFormat` (the body's f32 result is requantized, a new absmax
per block). The kernels do both inside the same pass; the reference does it with jnp.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_ext import quantization as q8
from optax_ext.kernels import backend as _backend

Body = Callable[[Sequence[jax.Array], Any, Any], Sequence[jax.Array]]


class Job(NamedTuple):
    """One leaf's share of a fused pass.

    Attributes:
      inputs: arrays of one shape (g, then p and the slots, as the body reads them); a slot may be
        a `QuantizedArray` of that shape.
      out_dtypes: the storage dtype of each output, or a `QuantFormat` (a `QuantizedArray` out).
      scalars: 1-D f32 vector of this leaf's own scalars (`leaf[j]` in the body); may be empty.
      aliases: `{input index: output index}`: the output is written into that input's buffer
        (Pallas backends; in place when the caller donates the input under jit).
    """

    inputs: Sequence[jax.Array | q8.QuantizedArray]
    out_dtypes: Sequence[Any]
    scalars: jax.Array
    aliases: Mapping[int, int] = {}


PALLAS_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
"""Storage dtypes the Pallas kernels read and write (math in f32); other leaves run the reference."""


def storage_of(x):
    """An input's storage: its dtype, or the `QuantFormat` of a `QuantizedArray`."""
    return x.format if isinstance(x, q8.QuantizedArray) else jnp.dtype(jnp.result_type(x))


def quantized_formats(job: Job) -> list[q8.QuantFormat]:
    """The quantization formats a job reads or writes (empty for plain float storage)."""
    return [x.format for x in job.inputs if isinstance(x, q8.QuantizedArray)] + [
        d for d in job.out_dtypes if isinstance(d, q8.QuantFormat)
    ]


def plain_kernel_jobs(jobs: Sequence[Job], max_size: int) -> tuple[list, list[int], list[tuple]]:
    """What a kernel backend takes of `jobs` in plain storage (TPU's fused pass; Mosaic GPU's, beside its 8-bit jobs).

    Returns (results, taken, signatures): per job its outputs where it needs no kernel (zeros for an
    empty leaf) and None otherwise; the indices of the jobs the kernels take (plain storage, 0 < size
    <= `max_size`), and per taken job its (input dtypes, output dtypes), which the launches group by.
    A job neither answered nor taken (quantized, or too large) stays None for the caller's XLA path.
    """
    results: list = [None] * len(jobs)
    taken = []
    for i, job in enumerate(jobs):
        if quantized_formats(job):
            continue
        n = jnp.size(job.inputs[0])
        if n == 0:
            results[i] = [jnp.zeros(jnp.shape(job.inputs[0]), d) for d in job.out_dtypes]
        elif n <= max_size:
            taken.append(i)
    signatures = [
        (
            tuple(jnp.dtype(jnp.result_type(x)) for x in jobs[i].inputs),
            tuple(jnp.dtype(d) for d in jobs[i].out_dtypes),
        )
        for i in taken
    ]
    return results, taken, signatures


def same_storage(a, b) -> bool:
    """Whether an output of storage `b` may overwrite an input of storage `a` (dtype or format)."""
    if isinstance(a, q8.QuantFormat) or isinstance(b, q8.QuantFormat):
        return a == b
    return jnp.dtype(a) == jnp.dtype(b)


def _values(x):
    return q8.dequantize_leaf(x) if isinstance(x, q8.QuantizedArray) else x


def _stored(value, storage):
    return q8.quantize_leaf(value, storage) if isinstance(storage, q8.QuantFormat) else value.astype(storage)


def compute_dtype(dtypes) -> jnp.dtype:
    """The dtype the math of a leaf runs in: f32 for f32/bf16/f16 storage, f64 when any input is
    64-bit, complex when any is complex (second moments then use |g|^2, as Optax)."""
    dtypes = [jnp.dtype(d) for d in dtypes]
    real = jnp.dtype(jnp.float32)
    for d in dtypes:
        part = jnp.finfo(d).dtype if jnp.issubdtype(d, jnp.complexfloating) else d
        if jnp.issubdtype(part, jnp.floating) or jnp.issubdtype(part, jnp.integer):
            real = jnp.promote_types(real, part)
    if any(jnp.issubdtype(d, jnp.complexfloating) for d in dtypes):
        return jnp.promote_types(real, jnp.complex64)
    return real


def run_elementwise_reference(
    body: Body, inputs: Sequence[jax.Array], shared: jax.Array, leaf: jax.Array, out_dtypes: Sequence[Any]
) -> list[jax.Array]:
    """The jnp reference (and the "xla" backend): the body applied to whole arrays.

    Math in `compute_dtype` of the inputs (f32 for the kernels' storage dtypes and for quantized
    inputs), scalars in its real counterpart.
    """
    inputs = [_values(x) for x in inputs]
    dtype = compute_dtype([jnp.result_type(x) for x in inputs])
    real = jnp.finfo(dtype).dtype
    outs = body([jnp.asarray(x, dtype) for x in inputs], jnp.asarray(shared, real), jnp.asarray(leaf, real))
    return [
        _stored(jnp.broadcast_to(jnp.asarray(o), jnp.shape(inputs[0])), d)
        for o, d in zip(outs, out_dtypes, strict=True)
    ]


def _on_kernels(job) -> bool:
    """Whether the kernels take this job: storage f32/bf16/f16, or quantized with a float32 body."""
    return all(isinstance(s, q8.QuantFormat) or s in PALLAS_DTYPES for s in map(storage_of, job.inputs)) and all(
        isinstance(d, q8.QuantFormat) or jnp.dtype(d) in PALLAS_DTYPES for d in job.out_dtypes
    )


def _kernel_jobs(jobs) -> list[int]:
    return [i for i, job in enumerate(jobs) if _on_kernels(job)]


_WARNED: set = set()


def _unlowerable(body: Body, jobs, shared, name: str) -> bool:
    """Whether `body` uses a primitive that backend `name`'s kernels cannot lower
    (`backend.CANNOT_LOWER`: floor or log1p in a user's `Rule` on Mosaic GPU, say); then it says so
    once per backend and primitives, and the caller runs the jobs on XLA."""
    if name not in _backend.CANNOT_LOWER or not jobs:
        return False
    from optax_ext.rule import primitive_names  # optax_ext imports this module: not at the top

    vec = jax.ShapeDtypeStruct((3,), jnp.float32)
    leaf = jax.ShapeDtypeStruct(jnp.shape(jobs[0].scalars), jnp.float32)
    traced = jax.make_jaxpr(lambda xs, s, t: body(list(xs), s, t))(
        [vec] * len(jobs[0].inputs), jax.ShapeDtypeStruct(jnp.shape(shared), jnp.float32), leaf
    )
    missing = _backend.unlowerable(name, primitive_names(traced.jaxpr))
    if missing and (name, missing) not in _WARNED:
        _WARNED.add((name, missing))
        warnings.warn(
            f"optax_ext: this fused update uses {', '.join(sorted(missing))}, which Pallas cannot lower on "
            f"the {name!r} kernel backend; it runs on XLA (as on the 'xla' backend) instead of in kernels.",
            stacklevel=2,
        )
    return bool(missing)


def run_fused(
    body: Body, jobs: Sequence[Job], shared: jax.Array, *, backend: str | None = None
) -> list[list[jax.Array]]:
    """Apply `body` elementwise to every job's leaf with the backend in force; outputs per job.

    On the Pallas backends the kernels run on each device's shard of sharded leaves
    (`optax_ext.kernels.sharding`): elementwise work needs no communication, and each output
    keeps its leaf's sharding. Leaves the kernels cannot address (see `fused_pass_pallas`) run
    through the jnp reference, per shard likewise; so do all the jobs when the body uses a
    primitive the backend cannot lower (`backend.CANNOT_LOWER`), with a warning.
    """
    name = backend or _backend.get_backend()
    jobs, layouts = _gather_explicit_quantized(list(jobs), name)

    def reference(job):
        return run_elementwise_reference(body, job.inputs, shared, job.scalars, job.out_dtypes)

    on_kernels = [] if name == "xla" or _unlowerable(body, jobs, shared, name) else _kernel_jobs(jobs)
    results = [None if i in set(on_kernels) else reference(job) for i, job in enumerate(jobs)]
    if on_kernels:
        for i, outs in zip(on_kernels, _run_kernels(body, [jobs[i] for i in on_kernels], shared, name)):
            results[i] = outs
    for i, specs in layouts.items():
        results[i] = [_reshard(o, spec) for o, spec in zip(results[i], specs)]
    return results


def _reshard(x, spec):
    if isinstance(x, q8.QuantizedArray):
        return q8.QuantizedArray(jax.sharding.reshard(x.codes, spec), x.absmax, x.format)
    return jax.sharding.reshard(x, spec)


def blocks_per_row(job) -> int | None:
    """Quantization blocks per row (first-axis slice) of a quantized job's leaf, when its rows hold
    whole blocks of every format it uses; else None.

    Then a shard along the first axis is a run of whole blocks (its absmax a run of whole rows of the
    (rows, blocks per row) view), so the kernel can run on each device's rows like on a leaf of its
    own. A leaf split along another axis, or whose row length is not a multiple of the block size
    (256 by default), does not follow the blocks: it runs whole.
    """
    formats = quantized_formats(job)
    shape = jnp.shape(job.inputs[0])
    if not formats or len(shape) < 1 or shape[0] == 0:
        return None
    row = int(np.prod(shape[1:], dtype=np.int64))
    if row == 0 or any(row % f.block_size for f in formats) or len({f.block_size for f in formats}) != 1:
        return None
    return row // formats[0].block_size


def _gather_explicit_quantized(jobs, backend: str):
    """Quantized jobs whose arrays are sharded over Explicit axes, laid out so that they can run.

    On the kernels' backends a leaf whose rows hold whole blocks (`blocks_per_row`) keeps its first
    axis' sharding (the kernel runs per shard); its other axes, and every axis of any other quantized
    leaf (and on the XLA backend, whose reference math reshapes the flattened leaf into blocks),
    are made whole. Returns the jobs and, per changed job, the layout each output goes back to: its
    aliased input's, else the leaf's (input 0).
    """
    from jax.sharding import PartitionSpec

    from optax_ext.kernels import sharding

    layouts = {}
    for i, job in enumerate(jobs):
        arrays = jax.tree.leaves(list(job.inputs))
        if not quantized_formats(job) or sharding.explicit_mesh(arrays) is None:
            continue

        def spec(x):
            return jax.typeof(x.codes if isinstance(x, q8.QuantizedArray) else x).sharding.spec

        leaf_spec = spec(job.inputs[0])
        first = leaf_spec[0] if len(leaf_spec) else None
        keep = PartitionSpec(first) if backend != "xla" and blocks_per_row(job) is not None else PartitionSpec()

        def relaid(x, keep=keep):
            if isinstance(x, q8.QuantizedArray):  # absmax follows the rows: same first-axis split
                return q8.QuantizedArray(
                    jax.sharding.reshard(x.codes, keep), jax.sharding.reshard(x.absmax, keep), x.format
                )
            return jax.sharding.reshard(x, keep)

        source = {o: a for a, o in job.aliases.items()}
        layouts[i] = [spec(job.inputs[source.get(o, 0)]) for o in range(len(job.out_dtypes))]
        jobs[i] = job._replace(inputs=[relaid(x) for x in job.inputs])
    return jobs, layouts


def storage_avals(storage, shape) -> list[jax.ShapeDtypeStruct]:
    """The arrays an output of `storage` is stored as, for a leaf of `shape`: one of its dtype, or
    (uint8 codes, f32 absmax per quantization block) for a `QuantFormat`."""
    if isinstance(storage, q8.QuantFormat):
        size = int(np.prod(shape, dtype=np.int64))
        return [jax.ShapeDtypeStruct(shape, jnp.uint8), jax.ShapeDtypeStruct((storage.num_blocks(size),), jnp.float32)]
    return [jax.ShapeDtypeStruct(shape, jnp.dtype(storage))]


def _out_avals(job):
    """Per output, its arrays' avals: one, or (codes, absmax) for a quantized output."""
    return [storage_avals(d, jnp.shape(job.inputs[0])) for d in job.out_dtypes]


def _run_kernels(body, jobs, shared, name):
    """The Pallas kernels on every job, per device shard (see run_fused)."""
    from optax_ext.kernels import fused_pass, sharding  # Pallas path; imported lazily.

    shared = jnp.asarray(shared, jnp.float32)
    jobs = [job._replace(scalars=jnp.asarray(job.scalars, jnp.float32)) for job in jobs]

    # Quantized leaves whose rows hold whole blocks pass their absmax as (rows, blocks per row), so
    # that it splits with the codes' first axis (see blocks_per_row); the kernel sees it flat.
    per_row = [blocks_per_row(job) for job in jobs]

    def as_rows(q, bpr):
        return q8.QuantizedArray(q.codes, q.absmax.reshape(-1, bpr), q.format) if bpr else q

    def as_flat(q):
        return q8.QuantizedArray(q.codes, q.absmax.reshape(-1), q.format)

    def quantized_map(fn, xs):
        return [fn(x) if isinstance(x, q8.QuantizedArray) else x for x in xs]

    row_jobs = [
        job._replace(inputs=quantized_map(lambda q, b=b: as_rows(q, b), job.inputs)) for job, b in zip(jobs, per_row)
    ]
    in_defs = [jax.tree.structure(list(job.inputs)) for job in row_jobs]

    def local(operands, axes):
        it = iter(operands)
        local_jobs = [
            job._replace(inputs=quantized_map(as_flat, d.unflatten([next(it) for _ in range(d.num_leaves)])))
            for job, d in zip(jobs, in_defs)
        ]
        local_shared = next(it)
        local_jobs = [job._replace(scalars=next(it)) for job in local_jobs]
        outs = fused_pass.fused_pass_pallas(body, local_jobs, local_shared, backend=name)
        flat = []
        for job, o, bpr in zip(local_jobs, outs, per_row):
            if o is None:
                o = run_elementwise_reference(body, job.inputs, local_shared, job.scalars, job.out_dtypes)
            flat.extend(jax.tree.leaves(quantized_map(lambda q, b=bpr: as_rows(q, b), o)))
        return flat

    # Leaf k's inputs and outputs share its dims' factors; scalar vectors are never split. A
    # quantized leaf's absmax runs over blocks of the flattened leaf: when its rows hold whole
    # blocks, the absmax's (rows, blocks per row) view shares the first axis' factor and only the
    # other axes must stay whole; otherwise a shard does not follow the blocks, and the leaf runs
    # whole (replicated), correct at the cost of a gather.
    operands, op_factors, res_factors, res_avals, replicated = [], [], [], [], []
    for k, (job, bpr) in enumerate(zip(row_jobs, per_row)):
        dims = tuple(f"l{k}d{d}" for d in range(jnp.ndim(job.inputs[0])))
        absmax_factors = (dims[0], f"l{k}q") if bpr else (f"l{k}q",)
        outs = _out_avals(job)
        if bpr:
            replicated.extend(dims[1:] + (f"l{k}q",))
            outs = [[o[0], jax.ShapeDtypeStruct((o[0].shape[0], bpr), o[1].dtype)] if len(o) > 1 else o for o in outs]
        elif quantized_formats(job):
            replicated.extend(dims + (f"l{k}q",))
        for x in job.inputs:
            operands.extend(jax.tree.leaves(x))
            op_factors.extend([dims, absmax_factors] if isinstance(x, q8.QuantizedArray) else [dims])
        for o in outs:
            res_avals.extend(o)
            res_factors.extend([dims, absmax_factors] if len(o) > 1 else [dims])
    scalar_factors = ("shared",) + tuple(f"scalars{k}" for k in range(len(jobs)))
    operands += [shared] + [job.scalars for job in jobs]
    op_factors += [(f,) for f in scalar_factors]
    rule = sharding.Rule(
        tuple(op_factors), tuple(res_factors), need_replication=scalar_factors + tuple(replicated), name="fused pass"
    )
    flat = sharding.per_shard(local, operands, rule, res_avals)
    results, it = [], iter(flat)
    for job in jobs:
        results.append(
            [
                q8.QuantizedArray(next(it), next(it).reshape(-1), d) if isinstance(d, q8.QuantFormat) else next(it)
                for d in job.out_dtypes
            ]
        )
    return results
