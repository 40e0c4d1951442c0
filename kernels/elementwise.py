"""Run one composed per-element rule over many leaves: the fused optimizer pass.

`run_fused(body, jobs, shared)` is the single entry point every fused run of `optax_ext.chain`
goes through. `body(inputs, shared, leaf) -> outputs` is pure per-element math on f32 values:
each input upcast to f32, `shared[j]` a step-wide scalar (a bias correction, the learning rate),
`leaf[j]` one of this leaf's own scalars (a mask, a trust ratio); outputs are cast to the job's
`out_dtypes`. On the "xla" backend the body is traced as plain jnp per leaf and XLA fuses it; the
Pallas backends run the same body inside multi-tensor kernels (one read, one write per element,
many leaves per launch; see `optax_ext.kernels.fused_pass`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_ext.kernels import backend as _backend

Body = Callable[[Sequence[jax.Array], Any, Any], Sequence[jax.Array]]


class Job(NamedTuple):
    """One leaf's share of a fused pass.

    Attributes:
      inputs: arrays of one shape (g, then p and the slots, as the body reads them).
      out_dtypes: the storage dtype of each output.
      scalars: 1-D f32 vector of this leaf's own scalars (`leaf[j]` in the body); may be empty.
      aliases: `{input index: output index}`: the output is written into that input's buffer
        (Pallas backends; in place when the caller donates the input under jit).
    """

    inputs: Sequence[jax.Array]
    out_dtypes: Sequence[Any]
    scalars: jax.Array
    aliases: Mapping[int, int] = {}


PALLAS_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
"""Storage dtypes the Pallas kernels read and write (math in f32); other leaves run the reference."""


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


def run_elementwise_reference(body: Body, inputs: Sequence[jax.Array], shared: jax.Array, leaf: jax.Array,
                              out_dtypes: Sequence[Any]) -> list[jax.Array]:
    """The jnp reference (and the "xla" backend): the body applied to whole arrays.

    Math in `compute_dtype` of the inputs (f32 for the kernels' storage dtypes), scalars in its
    real counterpart.
    """
    dtype = compute_dtype([jnp.result_type(x) for x in inputs])
    real = jnp.finfo(dtype).dtype
    outs = body([jnp.asarray(x, dtype) for x in inputs], jnp.asarray(shared, real), jnp.asarray(leaf, real))
    return [jnp.broadcast_to(jnp.asarray(o), jnp.shape(inputs[0])).astype(d)
            for o, d in zip(outs, out_dtypes, strict=True)]


def run_fused(body: Body, jobs: Sequence[Job], shared: jax.Array, *,
              backend: str | None = None) -> list[list[jax.Array]]:
    """Apply `body` elementwise to every job's leaf with the backend in force; outputs per job.

    On the Pallas backends the kernels run on each device's shard of sharded leaves
    (`optax_ext.kernels.sharding`): elementwise work needs no communication, and each output
    keeps its leaf's sharding. Leaves the kernels cannot address (see `fused_pass_pallas`) run
    through the jnp reference, per shard likewise.
    """
    name = backend or _backend.get_backend()

    def reference(job):
        return run_elementwise_reference(body, job.inputs, shared, job.scalars, job.out_dtypes)

    on_kernels = [] if name == "xla" else [
        i for i, job in enumerate(jobs)
        if all(jnp.dtype(jnp.result_type(x)) in PALLAS_DTYPES for x in job.inputs)
        and all(jnp.dtype(d) in PALLAS_DTYPES for d in job.out_dtypes)]
    results = [None if i in set(on_kernels) else reference(job) for i, job in enumerate(jobs)]
    if not on_kernels:
        return results
    for i, outs in zip(on_kernels, _run_kernels(body, [jobs[i] for i in on_kernels], shared, name)):
        results[i] = outs
    return results


def _run_kernels(body, jobs, shared, name):
    """The Pallas kernels on every job, per device shard (see run_fused)."""
    from optax_ext.kernels import fused_pass, sharding  # Pallas path; imported lazily.

    shared = jnp.asarray(shared, jnp.float32)
    jobs = [job._replace(scalars=jnp.asarray(job.scalars, jnp.float32)) for job in jobs]
    n_in = [len(job.inputs) for job in jobs]

    def local(operands, axes):
        it = iter(operands)
        local_jobs = [job._replace(inputs=[next(it) for _ in range(n)]) for job, n in zip(jobs, n_in)]
        local_shared = next(it)
        local_jobs = [job._replace(scalars=next(it)) for job in local_jobs]
        outs = fused_pass.fused_pass_pallas(body, local_jobs, local_shared, backend=name)
        flat = []
        for job, o in zip(local_jobs, outs):
            flat.extend(o if o is not None else
                        run_elementwise_reference(body, job.inputs, local_shared, job.scalars, job.out_dtypes))
        return flat

    # Leaf k's inputs and outputs share its dims' factors; scalar vectors are never split.
    operands, op_factors, res_factors, res_avals = [], [], [], []
    for k, job in enumerate(jobs):
        dims = tuple(f"l{k}d{d}" for d in range(jnp.ndim(job.inputs[0])))
        operands.extend(job.inputs)
        op_factors.extend([dims] * len(job.inputs))
        res_factors.extend([dims] * len(job.out_dtypes))
        res_avals.extend(jax.ShapeDtypeStruct(jnp.shape(job.inputs[0]), d) for d in job.out_dtypes)
    scalar_factors = ("shared",) + tuple(f"scalars{k}" for k in range(len(jobs)))
    operands += [shared] + [job.scalars for job in jobs]
    op_factors += [(f,) for f in scalar_factors]
    rule = sharding.Rule(tuple(op_factors), tuple(res_factors), need_replication=scalar_factors, name="fused pass")
    flat = sharding.per_shard(local, operands, rule, res_avals)
    results, it = [], iter(flat)
    for job in jobs:
        results.append([next(it) for _ in job.out_dtypes])
    return results
