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


def run_elementwise_reference(body: Body, inputs: Sequence[jax.Array], shared: jax.Array, leaf: jax.Array,
                              out_dtypes: Sequence[Any]) -> list[jax.Array]:
    """The jnp reference (and the "xla" backend): the body applied to whole arrays."""
    outs = body([jnp.asarray(x, jnp.float32) for x in inputs], jnp.asarray(shared, jnp.float32),
                jnp.asarray(leaf, jnp.float32))
    return [jnp.broadcast_to(jnp.asarray(o), jnp.shape(inputs[0])).astype(d)
            for o, d in zip(outs, out_dtypes, strict=True)]


def run_fused(body: Body, jobs: Sequence[Job], shared: jax.Array, *,
              backend: str | None = None) -> list[list[jax.Array]]:
    """Apply `body` elementwise to every job's leaf with the backend in force; outputs per job.

    Leaves sharded over explicit mesh axes, and leaves the kernels cannot address, run on XLA
    (a `pallas_call` needs per-device data; XLA partitions the jnp form itself).
    """
    name = backend or _backend.get_backend()
    shared = jnp.asarray(shared, jnp.float32)
    results: list = [None] * len(jobs)
    pallas = [] if name == "xla" else [i for i, j in enumerate(jobs) if not _backend.explicitly_sharded(*j.inputs)]
    if pallas:
        from optax_ext.kernels import fused_pass  # Pallas path; imported lazily.

        outs = fused_pass.fused_pass_pallas(body, [jobs[i] for i in pallas], shared, backend=name)
        for i, o in zip(pallas, outs):
            results[i] = o
    for i, job in enumerate(jobs):
        if results[i] is None:
            results[i] = run_elementwise_reference(body, job.inputs, shared, job.scalars, job.out_dtypes)
    return results
