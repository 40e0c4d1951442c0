"""Run one composed per-element rule over arrays of one shape: the fused optimizer pass.

`run_elementwise(body, inputs, scalars, out_dtypes)` is the single entry point every fused run
of `optax_ext.chain` goes through. `body(inputs, scalars) -> outputs` is pure per-element math on
f32 values (each input upcast to f32, `scalars` a f32 vector of step-wide values); the outputs are
cast to `out_dtypes`. On the "xla" backend the body is traced as plain jnp and XLA fuses it; the
Pallas backends run the same body as the body of one kernel (one read, one write per element).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from optax_ext.kernels import backend as _backend

Body = Callable[[Sequence[jax.Array], jax.Array], Sequence[jax.Array]]


def run_elementwise_reference(body: Body, inputs: Sequence[jax.Array], scalars: jax.Array,
                              out_dtypes: Sequence[jnp.dtype]) -> list[jax.Array]:
    """The jnp reference (and the "xla" backend): the body applied to whole arrays."""
    outs = body([jnp.asarray(x, jnp.float32) for x in inputs], jnp.asarray(scalars, jnp.float32))
    return [jnp.asarray(o).astype(d) for o, d in zip(outs, out_dtypes, strict=True)]


def run_elementwise(body: Body, inputs: Sequence[jax.Array], scalars: jax.Array,
                    out_dtypes: Sequence[jnp.dtype], *, aliases: dict[int, int] | None = None,
                    backend: str | None = None) -> list[jax.Array]:
    """Apply `body` elementwise to `inputs` (all of one shape) with the backend in force.

    `aliases` maps an input index to the output written into its buffer (Pallas backends; in place
    when the caller donates the input under jit). XLA decides buffer reuse itself.
    """
    name = backend or _backend.get_backend()
    if name == "xla" or _backend.explicitly_sharded(*inputs):
        return run_elementwise_reference(body, inputs, scalars, out_dtypes)
    from optax_ext.kernels import fused_pass  # Pallas path; imported lazily.

    return fused_pass.run_elementwise_pallas(body, inputs, scalars, out_dtypes, backend=name, aliases=aliases)
