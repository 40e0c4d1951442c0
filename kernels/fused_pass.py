"""The fused optimizer pass as one Pallas kernel: read every input once, write every output once.

`run_elementwise_pallas(body, inputs, scalars, out_dtypes, backend=...)` runs a per-element
`body(inputs_f32, scalars) -> outputs_f32` (the composed rule of an `optax_ext.chain` run, see
`optax_ext.kernels.elementwise`) over arrays of one shape. Inputs are stored in any float dtype
(f32, bf16, f16); the kernel upcasts each block to f32, runs the body, and casts each output to
its storage dtype, so the math is the same as `run_elementwise_reference` (mixed precision as in
Micikevicius et al., 2018, "Mixed Precision Training").

Memory layout (why two):
  * "flat" (Triton, and the interpreter by default): every array is viewed as 1-D (a free
    reshape) and cut into blocks of `GPU_BLOCK` elements, one program each. A ragged last block
    is handled by masked loads and stores (`pallas.triton.load/store(mask=...)`), so no array
    is ever padded or sliced. Triton keeps a whole block in registers, hence blocks of a few
    thousand elements, not tens of thousands.
  * "rows" (Mosaic): the array is viewed as a lane-dense slab (n // 128, 128), blocks of
    (`TPU_BLOCK_ROWS`, 128) -- the native (8, 128) vreg tiling. Mosaic has no masked vector
    loads for a ragged lane dimension, but handles a ragged *row* count itself (padding reads,
    dropping out-of-bounds writes). So when n % 128 == 0 (every weight of a typical model, and
    every batch the caller pads) the reshape is free and there is no copy; otherwise the
    128-divisible prefix runs in the kernel and the < 128-element tail through the jnp
    reference (that slice and the final concatenate are copies: the price of ragged leaves on
    TPU; callers that batch leaves pad the batch to a multiple of 128 and never pay it).

Scalars (step-wide values: bias corrections, learning rate, clip factor) are one small f32 vector
input: in SMEM on TPU, a tiny full block on GPU. The body receives an object whose `[j]` reads
scalar `j` from that ref, so scalars stay scalars inside the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_ext.kernels import backend as _backend
from optax_ext.kernels.elementwise import run_elementwise_reference

__all__ = ["run_elementwise_pallas", "GPU_BLOCK", "GPU_NUM_WARPS", "TPU_BLOCK_ROWS", "LANES"]

# Tunables. GPU: elements per Triton program (power of 2); with 8 warps a thread holds
# 16 elements per array (four 128-bit loads of f32), which keeps a 4-input/3-output Adam body in
# registers. TPU: rows per (rows, 128) block; 512 rows of f32 = 256 KiB per buffer, so even a
# 5-input/4-output body double-buffered stays below 5 MiB of VMEM.
GPU_BLOCK = 4096
GPU_NUM_WARPS = 8
GPU_NUM_STAGES = 1
TPU_BLOCK_ROWS = 512
LANES = 128
INTERPRET_BLOCK = 4096

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)
_MAX_FLAT = 2**31 - 2**24  # element indices are int32 inside the kernel


class ScalarRef:
    """`svec[j]` inside a kernel: reads scalar j of the scalar input (SMEM on TPU) as f32."""

    def __init__(self, ref, size: int):
        self._ref = ref
        self._size = size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, j):
        if isinstance(j, int) and not -self._size <= j < self._size:
            raise IndexError(f"scalar index {j} out of range for {self._size} scalars.")
        return self._ref[j % self._size if isinstance(j, int) else j]


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _validate(inputs, scalars, out_dtypes, backend, aliases):
    if backend not in ("interpret", "triton", "mosaic"):
        raise ValueError(
            f"run_elementwise_pallas(backend={backend!r}): expected 'interpret', 'triton' or 'mosaic'.")
    if not inputs:
        raise ValueError("run_elementwise_pallas(inputs=[]): expected at least one input array.")
    shape = jnp.shape(inputs[0])
    for i, x in enumerate(inputs):
        if jnp.shape(x) != shape:
            raise ValueError(
                f"run_elementwise_pallas(inputs): all inputs must have one shape; input 0 has "
                f"{shape}, input {i} has {jnp.shape(x)}.")
        if jnp.result_type(x) not in _FLOATS:
            raise TypeError(
                f"run_elementwise_pallas(inputs): input {i} has dtype {jnp.result_type(x)}; "
                f"expected one of float32, bfloat16, float16.")
    if jnp.ndim(scalars) != 1:
        raise ValueError(
            f"run_elementwise_pallas(scalars): expected a 1-D vector, got shape {jnp.shape(scalars)}.")
    if not out_dtypes:
        raise ValueError("run_elementwise_pallas(out_dtypes=[]): expected at least one output dtype.")
    for j, d in enumerate(out_dtypes):
        if jnp.dtype(d) not in _FLOATS:
            raise TypeError(
                f"run_elementwise_pallas(out_dtypes): output {j} has dtype {jnp.dtype(d)}; "
                f"expected one of float32, bfloat16, float16.")
    aliases = dict(aliases or {})
    for i, o in aliases.items():
        if not (0 <= i < len(inputs) and 0 <= o < len(out_dtypes)):
            raise ValueError(
                f"run_elementwise_pallas(aliases): {{{i}: {o}}} out of range for "
                f"{len(inputs)} inputs and {len(out_dtypes)} outputs.")
        if jnp.result_type(inputs[i]) != jnp.dtype(out_dtypes[o]):
            raise ValueError(
                f"run_elementwise_pallas(aliases): input {i} ({jnp.result_type(inputs[i])}) cannot "
                f"alias output {o} ({jnp.dtype(out_dtypes[o])}); dtypes must match.")
    if len(set(aliases.values())) != len(aliases):
        raise ValueError(f"run_elementwise_pallas(aliases={aliases}): an output is aliased twice.")
    return shape, aliases


def _make_kernel(body, n_in, n_out, k, block_shape, n_valid, grid):
    """Kernel over one block. `n_valid` (flat layout, ragged size only) masks the last block."""

    def run(in_refs, s_ref, out_refs, mask):
        if mask is not None:
            from jax.experimental.pallas import triton as plt

            # Masked-off lanes hold garbage; they are never stored.
            xs = [plt.load(r, mask=mask).astype(jnp.float32) for r in in_refs]
        else:
            xs = [r[...].astype(jnp.float32) for r in in_refs]
        outs = list(body(xs, ScalarRef(s_ref, k)))
        if len(outs) != n_out:
            raise ValueError(
                f"run_elementwise_pallas(body): body returned {len(outs)} outputs, "
                f"out_dtypes has {n_out}.")
        for r, o in zip(out_refs, outs):
            o = jnp.broadcast_to(jnp.asarray(o, jnp.float32), block_shape).astype(r.dtype)
            if mask is not None:
                plt.store(r, o, mask=mask)
            else:
                r[...] = o

    def kernel(*refs):
        in_refs, s_ref, out_refs = refs[:n_in], refs[n_in], refs[n_in + 1:]
        if n_valid is None:
            run(in_refs, s_ref, out_refs, None)
            return
        # Only the last program masks: a mask against an odd bound would stop Triton from
        # vectorizing the loads of every block, not just the ragged one.
        last = pl.program_id(0) == grid - 1

        @pl.when(jnp.logical_not(last))
        def _():
            run(in_refs, s_ref, out_refs, None)

        @pl.when(last)
        def _():
            idx = (grid - 1) * block_shape[0] + jax.lax.broadcasted_iota(jnp.int32, block_shape, 0)
            run(in_refs, s_ref, out_refs, idx < n_valid)

    return kernel


def _pallas(body, flat_inputs, svec, out_dtypes, *, backend, aliases, block_shape, grid,
            n_valid, k, name):
    """One pallas_call over arrays already in their 1-D or (rows, 128) view."""
    arr_shape = flat_inputs[0].shape
    rank = len(block_shape)
    index_map = (lambda i: (i,)) if rank == 1 else (lambda i: (i, 0))
    data_spec = pl.BlockSpec(block_shape, index_map)
    if backend == "mosaic":
        from jax.experimental.pallas import tpu as pltpu

        s_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
    else:
        s_spec = pl.BlockSpec(svec.shape, lambda i: (0,))
    if backend == "triton":
        params = _backend.compiler_params("triton", num_warps=GPU_NUM_WARPS, num_stages=GPU_NUM_STAGES)
    elif backend == "mosaic":
        params = _backend.compiler_params("mosaic", dimension_semantics=("parallel",))
    else:
        params = None
    n_in = len(flat_inputs)
    call = pl.pallas_call(
        _make_kernel(body, n_in, len(out_dtypes), k, block_shape, n_valid, grid),
        out_shape=[jax.ShapeDtypeStruct(arr_shape, jnp.dtype(d)) for d in out_dtypes],
        grid=(grid,),
        in_specs=[data_spec] * n_in + [s_spec],
        out_specs=[data_spec] * len(out_dtypes),
        input_output_aliases=dict(aliases),
        interpret=backend == "interpret",
        compiler_params=params,
        name=name,
    )
    return call(*flat_inputs, svec)


def run_elementwise_pallas(body: Callable, inputs: Sequence[jax.Array], scalars: jax.Array,
                           out_dtypes: Sequence, *, backend: str,
                           aliases: Mapping[int, int] | None = None,
                           layout: str | None = None, block: int | None = None) -> list[jax.Array]:
    """Apply `body` elementwise to `inputs` in one Pallas kernel; same result as the reference.

    For every element index e: `outs[j][e] = body([x[e] as f32 for x in inputs], scalars)[j]`
    cast to `out_dtypes[j]` -- exactly `run_elementwise_reference`, computed blockwise.

    Args:
      body: `(list of f32 blocks, svec) -> list of f32 blocks`; `svec[j]` is scalar j.
      inputs: arrays of one shape (any rank, 0-d included), dtypes f32/bf16/f16.
      scalars: 1-D f32 vector of step-wide values (may be empty).
      out_dtypes: storage dtype of each output.
      backend: "interpret" (Pallas interpreter, any device), "triton" or "mosaic".
      aliases: `{input index: output index}` for `input_output_aliases`: the output is written
        into the input's buffer (in place when the caller donates it). Dtypes must match.
      layout: "flat" or "rows" (see the module docstring); default: "rows" on Mosaic, else "flat".
      block: elements per block ("flat") or rows per block ("rows"); default: the tunables above.

    Returns:
      The outputs, each shaped like the inputs.
    """
    shape, aliases = _validate(inputs, scalars, out_dtypes, backend, aliases)
    layout = layout or ("rows" if backend == "mosaic" else "flat")
    if layout not in ("flat", "rows"):
        raise ValueError(f"run_elementwise_pallas(layout={layout!r}): expected 'flat' or 'rows'.")
    if block is not None and (not isinstance(block, int) or block < 1):
        raise ValueError(f"run_elementwise_pallas(block={block!r}): expected a positive int.")
    scalars = jnp.asarray(scalars, jnp.float32)
    k = scalars.shape[0]
    n = 1
    for d in shape:
        n *= d
    if n == 0:
        return [jnp.zeros(shape, d) for d in out_dtypes]
    # Pad the scalar vector (a few floats) to a power of 2, at least 1: Triton blocks must be
    # powers of 2, and a 0-length input is not allowed.
    svec = jnp.zeros((_pow2_at_least(max(k, 1)),), jnp.float32).at[:k].set(scalars)
    flat = [jnp.reshape(x, (n,)) for x in inputs]

    if layout == "flat":
        if n > _MAX_FLAT:
            raise ValueError(
                f"run_elementwise_pallas(inputs): {n} elements exceed the int32 index range of "
                f"the flat layout ({_MAX_FLAT}); split the array.")
        b = block or (GPU_BLOCK if backend == "triton" else INTERPRET_BLOCK)
        if backend == "triton" and b & (b - 1):
            raise ValueError(f"run_elementwise_pallas(block={b}): Triton blocks must be a power of 2.")
        b = min(b, _pow2_at_least(n))
        grid = pl.cdiv(n, b)
        outs = _pallas(body, flat, svec, out_dtypes, backend=backend, aliases=aliases,
                       block_shape=(b,), grid=grid, n_valid=None if n % b == 0 else n, k=k,
                       name="fused_elementwise_flat")
        return [o.reshape(shape) for o in outs]

    # "rows": kernel over the 128-divisible prefix viewed as (rows, 128); tail via jnp.
    rows, tail = divmod(n, LANES)
    outs_main = []
    if rows:
        r = block or TPU_BLOCK_ROWS
        if r % 8:
            raise ValueError(f"run_elementwise_pallas(block={r}): rows per block must be a multiple of 8.")
        r = rows if rows <= r else r  # a block equal to the full array is always legal
        main = [(x if not tail else x[: rows * LANES]).reshape(rows, LANES) for x in flat]
        outs_main = _pallas(body, main, svec, out_dtypes, backend=backend,
                            aliases=aliases, block_shape=(r, LANES),
                            grid=pl.cdiv(rows, r), n_valid=None, k=k, name="fused_elementwise_rows")
        outs_main = [o.reshape(rows * LANES) for o in outs_main]
    if not tail:
        return [o.reshape(shape) for o in outs_main]
    outs_tail = run_elementwise_reference(body, [x[rows * LANES:] for x in flat], scalars, out_dtypes)
    if not rows:
        return [o.reshape(shape) for o in outs_tail]
    return [jnp.concatenate([a, b]).reshape(shape) for a, b in zip(outs_main, outs_tail)]
