"""Row-block building blocks shared by the normalization kernels (`layer_norm`, `batch_norm`).

Both kernels view their input as (M, N) rows (features last) and run the same machinery: how the
rows are cut into blocks for each backend, masked loads and stores, the specs and compiler params
of a row grid, running a kernel on each device's rows of a sharded array, and the persistent grid
that reduces over rows. It lives here, defined once, so that neither kernel module reaches into the
other; each names what it uses from `__all__`.

Tiling. The input is viewed as (M, N) rows; one grid step handles a block of rows.
- "triton" layout: Triton needs power-of-two block shapes, so the feature block is N rounded up
  to a power of two and every load/store is masked (`plgpu.load/store(mask=...)`); padded lanes
  read as 0 and are never written.
- "mosaic" layout: TPU blocks must have their last two dims divisible by (8, 128) or equal to the
  array's, so the feature block is the whole row (N) and the row block a multiple of 32; ragged
  last row blocks are handled by Pallas and masked out of every reduction.
The "interpret" backend runs the layout `INTERPRET_LAYOUT` names (default "triton", so the masking
is exercised on CPU; tests switch it to "mosaic" to check that path too). The "xla" backend runs
the kernels' jnp twins instead (`use_pallas`). Arrays sharded over a mesh run the kernel on each
device's rows (`per_rows`), since a `pallas_call` needs per-device data.

Persistent grid for reductions over rows (`row_loop`, `persistent_row_call`): a fixed number of
programs P = min(`PERSISTENT_PROGRAMS[layout]`, row blocks). Program p owns a static set B_p of row
blocks, folds their (1, N) column reductions in a fixed order into one f32 (1, N) partial per
output, and the caller sums (or merges) the P partials:

    S = sum_p S_p,   S_p = sum_{i in B_p} sum_{r in block i} f(row r)

The partials take P * N * 4 bytes whatever M is. (One partial per row block took
cdiv(M, block_rows) * N * 4 bytes: at 8192 x 8192 on Triton, where a block is one row, 268 MB per
output, more than the bf16 activations.) The block-to-program map and every summation order are
static, so the result is deterministic (no atomics).
- triton (and the interpreter): grid (P,), B_p = {p, p + P, p + 2P, ...}. Triton runs the programs
  concurrently, so the loop over a program's blocks is inside the kernel (`pl.loop`), the
  accumulator in registers; row operands are single blocks spanning the array, sliced per step.
- mosaic: grid (P, J), J = cdiv(blocks, P), semantics ("parallel", "arbitrary"),
  B_p = {pJ, ..., pJ + J - 1}. A TPU core runs its grid steps in order and Pallas double-buffers
  each step's HBM<->VMEM copies, so the loop is the grid's second axis and the accumulator is p's
  (1, N) output block, resident in VMEM while its index (p, 0, 0) is unchanged. The Triton-style
  in-kernel loop lowers for TPU too (checked), but there its operand blocks, whole arrays, would
  have to sit in VMEM (16-128 MiB), or it would need hand-written DMAs; the grid axis keeps Pallas's
  pipelining. P = 2: the cores a megacore chip (v4, v5p) splits a "parallel" axis over;
  single-core chips run the two in sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from optax_ext.kernels.backend import compiler_params, is_mosaic_gpu

__all__ = [
    "INTERPRET_LAYOUT",
    "PERSISTENT_PROGRAMS",
    "RowLoop",
    "Tiling",
    "block_mask",
    "call_params",
    "check_operands",
    "col_mask",
    "feature_spec",
    "layout_for",
    "load_f32",
    "make_tiling",
    "out_struct",
    "per_rows",
    "persistent_row_call",
    "row_loop",
    "row_mask",
    "row_spec",
    "stat_spec",
    "store",
    "use_pallas",
]

_F32 = jnp.float32

# Which layout the Pallas interpreter runs; tests switch it to "mosaic" to check that path too.
INTERPRET_LAYOUT = "triton"


# --------------------------------------------------------------------------------------------
# Row-block tiling, masked access, specs and sharding
# --------------------------------------------------------------------------------------------


class Tiling(NamedTuple):
    """How an (M, N) array is cut into (block_rows, block_cols) blocks over a 1-D grid of rows."""

    layout: str  # "triton" (power-of-two blocks, masked access) or "mosaic" (whole rows)
    m: int
    n: int
    block_rows: int
    block_cols: int

    @property
    def grid(self) -> int:
        return pl.cdiv(self.m, self.block_rows)

    @property
    def ragged_rows(self) -> bool:
        return self.m % self.block_rows != 0

    @property
    def ragged_cols(self) -> bool:
        return self.block_cols != self.n


def layout_for(backend: str) -> str:
    """The block layout a Pallas backend runs ("interpret" follows `INTERPRET_LAYOUT`)."""
    if backend == "triton":
        return "triton"
    if backend in ("mosaic", "mosaic_interpret"):
        return "mosaic"
    return INTERPRET_LAYOUT


def interpret_mode(backend: str):
    """`pl.pallas_call(interpret=...)` for a backend: the generic Pallas interpreter for "interpret",
    TPU's own (`pltpu.InterpretParams`: VMEM, SMEM and the pipeline's DMAs as on a TPU) for
    "mosaic_interpret", else False (compiled)."""
    if backend == "mosaic_interpret":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams()
    return backend == "interpret"


def make_tiling(m: int, n: int, layout: str, *, block_elems: int) -> Tiling:
    """Row-block tiling with about `block_elems` elements per block."""
    if layout == "triton":
        bc = pl.next_power_of_2(n)
        br = max(1, min(pl.next_power_of_2(m), max(1, block_elems // bc)))
        br = 1 << (br.bit_length() - 1)  # round down to a power of two
        return Tiling(layout, m, n, br, bc)
    # Mosaic: whole rows; rows in multiples of 32 (sublane tiling of f32/bf16/int8) or all rows.
    br = max(32, (block_elems // max(n, 1)) // 32 * 32)
    if br >= m:
        br = m
    return Tiling(layout, m, n, br, n)


def row_mask(t: Tiling, cols: int, row0=None) -> jax.Array:
    """(block_rows, cols) bool: True on rows inside the array, for the block starting at row `row0`.

    `row0` defaults to the block of grid step `program_id(0)` (one block per grid step).
    """
    if row0 is None:
        row0 = pl.program_id(0) * t.block_rows
    rows = row0 + lax.broadcasted_iota(jnp.int32, (t.block_rows, cols), 0)
    return rows < t.m


def col_mask(t: Tiling, rows: int) -> jax.Array:
    """(rows, block_cols) bool: True on columns inside the array."""
    return lax.broadcasted_iota(jnp.int32, (rows, t.block_cols), 1) < t.n


def block_mask(t: Tiling, rows: int | None = None, cols: int | None = None, row0=None) -> jax.Array | None:
    """The validity mask of a (rows or block_rows, cols or block_cols) block, None if all valid.

    `rows=1` means a row-broadcast operand (scale, bias: no row mask); `cols=1` a per-row
    operand (mean, rstd: no column mask). `row0`: the block's first row (see `row_mask`).
    """
    r = t.block_rows if rows is None else rows
    c = t.block_cols if cols is None else cols
    mask = None
    if rows is None and t.ragged_rows:
        mask = row_mask(t, c, row0)
    if cols is None and t.ragged_cols:
        cm = col_mask(t, r)
        mask = cm if mask is None else mask & cm
    return mask


def load_f32(ref, t: Tiling, mask: jax.Array | None) -> jax.Array:
    """Load a block as f32 with every element outside the array replaced by 0."""
    if mask is None:
        return ref[...].astype(_F32)
    if t.layout == "triton":
        # Masked pointer load: out-of-bounds addresses are never touched.
        from jax.experimental.pallas import triton as plgpu

        return plgpu.load(ref, mask=mask, other=0).astype(_F32)
    # Mosaic/interpreter pad ragged blocks with unspecified values (possibly NaN): select them away.
    return jnp.where(mask, ref[...].astype(_F32), 0.0)


def store(ref, value: jax.Array, t: Tiling, mask: jax.Array | None) -> None:
    """Store a block, skipping elements outside the array."""
    value = value.astype(ref.dtype)
    if mask is not None and t.layout == "triton":
        from jax.experimental.pallas import triton as plgpu

        plgpu.store(ref, value, mask=mask)
    else:
        # Mosaic and the interpreter drop the out-of-bounds part of a ragged block themselves.
        ref[...] = value


def use_pallas(backend: str, *arrays, mosaic_gpu: bool = False) -> bool:
    """Whether to run the Pallas kernel rather than the jnp twin of its math.

    Not on the "xla" backend, on Mosaic GPU only for callers with kernels
    there, which pass `mosaic_gpu=True` (LayerNorm, RMSNorm, BatchNorm: `layer_norm.mosaic_gpu`,
    `batch_norm.mosaic_gpu`, which take only some shapes, see backend.py), and not for empty arrays.
    Sharded arrays take the kernel too, on each device's shard (`per_rows`).
    """
    if backend == "xla" or (is_mosaic_gpu(backend) and not mosaic_gpu):
        return False
    return not any(a is not None and a.size == 0 for a in arrays)


def per_rows(fn, operands, kinds, results, name, *, whole_rows=True):
    """Run `fn(local operands, row_axes)` on each device's rows of sharded (..., N) operands.

    `kinds[i]`/`results[j]` say what each array is: "rows" (..., N), "stat" (...,), "feat" (1, N)
    or "vec" (N,); the leading dims (...) are the rows, left unmerged until `fn` (merging dims
    sharded over different axes outside would make XLA gather them first). Rows may be split over any
    mesh axes (batch or sequence sharding): each device
    works on its own rows; `row_axes` names those axes, for the `psum` of sums over rows. With
    `whole_rows` (LayerNorm: a row's statistics need all of it) the feature axis is never split:
    Auto axes reshard it, Explicit axes raise an error naming the axis; without (BatchNorm's
    per-feature statistics) features may stay split too.
    """
    from optax_ext.kernels import sharding

    lead = tuple(f"m{d}" for d in range(operands[kinds.index("rows")].ndim - 1))
    factors = {"rows": (*lead, "n"), "stat": lead, "feat": ("o", "n"), "vec": ("n",)}
    rule = sharding.Rule(
        tuple(factors[k] for k in kinds),
        tuple(factors[k] for k, _ in results),
        need_replication=("n", "o") if whole_rows else ("o",),
        name=name,
    )
    avals = [jax.ShapeDtypeStruct(shape, dtype) for _, (shape, dtype) in results]

    def local(xs, axes):
        return fn(xs, tuple(sorted({a for f in lead for a in axes.get(f, ())})))

    return sharding.per_shard(local, operands, rule, avals)


def out_struct(shape, dtype, *like) -> jax.ShapeDtypeStruct:
    """`ShapeDtypeStruct` for a kernel output that varies over the manual mesh axes of `like`.

    Inside `shard_map(check_vma=True)` a `pallas_call` must say how its outputs vary across the
    mesh; outside it the set is empty and the annotation changes nothing. Public jax API (>= 0.10):
    `jax.typeof(a).manual_axis_type.varying` and `jax.ShapeDtypeStruct(manual_axis_type=...)`.
    """
    varying = frozenset()
    for a in like:
        if a is not None:
            varying |= jax.typeof(a).manual_axis_type.varying
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))


def call_params(backend: str, t: Tiling, semantics: tuple[str, ...] = ("parallel",)):
    """Compiler params for a row grid on `backend` (`semantics`: Mosaic's per-axis grid semantics)."""
    if backend == "triton":
        warps = min(max(t.block_rows * t.block_cols // 512, 1), 8)
        return compiler_params("triton", num_warps=warps, num_stages=1)
    if backend in ("mosaic", "mosaic_interpret"):
        return compiler_params("mosaic", dimension_semantics=semantics)
    return None


def row_spec(t: Tiling) -> pl.BlockSpec:
    return pl.BlockSpec((t.block_rows, t.block_cols), lambda i: (i, 0))


def stat_spec(t: Tiling) -> pl.BlockSpec:
    """Per-row statistics stored as (M, 1)."""
    return pl.BlockSpec((t.block_rows, 1), lambda i: (i, 0))


def feature_spec(t: Tiling) -> pl.BlockSpec:
    """A (1, N) per-feature operand broadcast to every grid step."""
    return pl.BlockSpec((1, t.block_cols), lambda i: (0, 0))


def check_operands(
    name: str,
    x,
    scale=None,
    bias=None,
    epsilon=1.0,
    *,
    min_ndim: int = 1,
    axes: str = "at least one axis (features last)",
):
    """Validate a normalization's arguments; returns x as an array.

    x: floating point with at least `min_ndim` axes (`axes` says which, in the error), features
    last; `scale`/`bias`: None or of shape (x.shape[-1],); a Python `epsilon` must be > 0 (a traced
    one is not checked).
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    if x.ndim < min_ndim:
        raise ValueError(f"{name}: x must have {axes}; got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: x must be a floating-point array; got dtype {x.dtype}.")
    n = x.shape[-1]
    for arg, v in (("scale", scale), ("bias", bias)):
        if v is not None and tuple(jnp.shape(v)) != (n,):
            raise ValueError(f"{name}: {arg} must have shape ({n},) to match x.shape[-1]; got {jnp.shape(v)}.")
    if isinstance(epsilon, (int, float)) and not epsilon > 0:
        raise ValueError(f"{name}: epsilon must be > 0; got {epsilon!r}.")
    return x


# --------------------------------------------------------------------------------------------
# Persistent grid for reductions over rows (LayerNorm's dscale/dbias, BatchNorm's statistics and sums)
# --------------------------------------------------------------------------------------------

# Programs of a persistent row reduction, per layout; a call uses P = min(this, row blocks), so its
# f32 partials take P * N * 4 bytes whatever M is.
# - triton: 132 SMs (H100 SXM) x 4. A single 1-8-warp program per SM cannot keep enough loads in
#   flight to saturate HBM; a few resident per SM can. 528 * 8192 * 4 B = 17 MB per partial at
#   N = 8192, where one partial per row block (8192 blocks of 1 row) took 268 MB. GPUs with fewer
#   SMs run the surplus programs as a second wave, which only costs a little balance.
# - mosaic: the TensorCores that split a "parallel" grid axis (2 on v4/v5p megacore chips; v5e/v6e
#   have 1 and run both programs in sequence). Each program walks its row blocks on an "arbitrary"
#   grid axis, so more programs would buy no parallelism, only partials.
PERSISTENT_PROGRAMS = {"triton": 132 * 4, "mosaic": 2}


class RowLoop(NamedTuple):
    """A persistent grid over the row blocks of `t`: `programs` programs of at most `steps` blocks each.

    triton layout: program p owns blocks p, p + P, p + 2P, ... (interleaved: the P programs sweep
    the rows together, and their block counts differ by at most one); grid (P,), loop in the kernel.
    mosaic layout: program p owns the contiguous blocks p*J, ..., p*J + J - 1 (J = `steps`); grid
    (P, J), the second axis "arbitrary" so the program's output block stays resident in VMEM.
    """

    t: Tiling
    programs: int
    steps: int

    def blocks(self, p: int) -> range:
        """Row blocks program `p` reduces, in the order it reduces them (static)."""
        nb = self.t.grid
        if self.t.layout == "triton":
            return range(p, nb, self.programs)
        return range(p * self.steps, min((p + 1) * self.steps, nb))

    def rows(self) -> np.ndarray:
        """(P,) f32: valid rows each program reduced (only the last row block can be ragged)."""
        t = self.t
        return np.asarray(
            [sum(min(t.block_rows, t.m - i * t.block_rows) for i in self.blocks(p)) for p in range(self.programs)],
            np.float32,
        )

    def rows_f32(self) -> jax.Array:
        """`rows()` computed from an iota, with no array constant: a function that custom_partitioning
        wraps (see kernels/sharding.py) may not close over one."""
        t, nb = self.t, self.t.grid
        p = jax.lax.iota(jnp.int32, self.programs)
        if t.layout == "triton":
            blocks, last = (nb - p + self.programs - 1) // self.programs, (nb - 1) % self.programs
        else:
            blocks, last = jnp.minimum(self.steps, nb - p * self.steps), (nb - 1) // self.steps
        short = nb * t.block_rows - t.m  # rows missing from the ragged last block
        return (blocks * t.block_rows - jnp.where(p == last, short, 0)).astype(jnp.float32)


def row_loop(t: Tiling) -> RowLoop:
    """The persistent grid for reductions over the rows of `t` (reads `PERSISTENT_PROGRAMS` now)."""
    nb = t.grid
    programs = max(1, min(PERSISTENT_PROGRAMS[t.layout], nb))
    steps = pl.cdiv(nb, programs)
    if t.layout == "mosaic":
        programs = pl.cdiv(nb, steps)  # contiguous runs of `steps` blocks: every program gets one
    return RowLoop(t, programs, steps)


def _sum_merge(acc, new, k, row0):
    del k, row0
    return tuple(a + b for a, b in zip(acc, new))


def persistent_row_call(
    body,
    loop: RowLoop,
    backend: str,
    *,
    rows=(),
    stats=(),
    feats=(),
    row_outs=(),
    num_partials: int,
    merge=None,
    name: str,
):
    """Run `body` on every row block over the persistent grid `loop`: returns (row outputs, partials).

    rows: (M, N) operands and stats: (M, 1) operands, both seen one row block at a time; feats:
    (1, N) operands seen whole by every block; row_outs: `ShapeDtypeStruct`s of (M, N) outputs,
    written block by block. `body(row0, row_refs, stat_refs, feat_refs, out_refs)` handles the block
    starting at row `row0` (refs are that block's views) and returns `num_partials` (1, block_cols)
    f32 reductions of it over rows (zero from rows and columns outside the array). Each program
    folds its blocks' reductions in a fixed order, acc = merge(acc, new, k, row0) from acc = 0
    (default: acc + new; k = blocks merged before, all of them full), and writes acc once: the
    partials are (P, 1, N) f32, P = `loop.programs`, left for the caller to combine. Deterministic.
    """
    t = loop.t
    nb, br, bc, num_programs = t.grid, t.block_rows, t.block_cols, loop.programs
    merge = merge or _sum_merge
    n_rows, n_stats, n_feats, n_outs = len(rows), len(stats), len(feats), len(row_outs)
    like = (*rows, *stats, *feats)
    part = out_struct((num_programs, 1, t.n), _F32, *like)

    def split(refs):
        a, b, c, d = n_rows, n_rows + n_stats, n_rows + n_stats + n_feats, n_rows + n_stats + n_feats + n_outs
        return refs[:a], refs[a:b], refs[b:c], refs[c:d], refs[d:]

    if t.layout == "triton":
        # Each (M, .) operand is a single block covering the whole array (rows padded to whole row
        # blocks, columns to a power of two) that the kernel slices its row blocks from. On Triton a
        # block is only a base address: the masked loads and stores never touch the padding (the
        # interpreter pads a copy). Triton runs all grid programs concurrently, so a program must own
        # its partial: the loop over row blocks is inside the kernel, the accumulator in registers.
        whole = nb * br
        grid = (num_programs,)
        row_s = pl.BlockSpec((whole, bc), lambda p: (0, 0))
        stat_s = pl.BlockSpec((whole, 1), lambda p: (0, 0))
        feat_s = pl.BlockSpec((1, bc), lambda p: (0, 0))
        part_s = pl.BlockSpec((pl.squeezed, 1, bc), lambda p: (p, 0, 0))
        params = call_params(backend, t)

        def kernel(*refs):
            row_refs, stat_refs, feat_refs, out_refs, part_refs = split(refs)

            def step(i, carry):
                k, acc = carry
                row0 = i * br

                def view(block_refs):
                    return [r.at[pl.ds(row0, br)] for r in block_refs]

                new = body(row0, view(row_refs), view(stat_refs), feat_refs, view(out_refs))
                return k + 1, tuple(merge(acc, tuple(new), k, row0))

            zero = tuple(jnp.zeros((1, bc), _F32) for _ in range(num_partials))
            _, acc = pl.loop(pl.program_id(0), nb, step=num_programs, init_carry=(jnp.int32(0), zero))(step)
            pmask = block_mask(t, rows=1)
            for ref, a in zip(part_refs, acc):
                store(ref, a, t, pmask)
    else:
        # Mosaic: a TPU core runs its grid steps in order and Pallas double-buffers each step's
        # HBM<->VMEM copies, so the loop is the grid's "arbitrary" axis j and the accumulator is the
        # program's (1, N) output block, resident while its index stays (p, 0, 0). An in-kernel loop
        # would need the whole array in VMEM or hand-written DMAs. The last program's steps past
        # block nb - 1 (at most J - 1) revisit it: they rewrite the same row outputs, merge nothing.
        steps = loop.steps
        grid = (num_programs, steps)

        def blk(p, j):
            return jnp.minimum(p * steps + j, nb - 1)

        row_s = pl.BlockSpec((br, bc), lambda p, j: (blk(p, j), 0))
        stat_s = pl.BlockSpec((br, 1), lambda p, j: (blk(p, j), 0))
        feat_s = pl.BlockSpec((1, bc), lambda p, j: (0, 0))
        part_s = pl.BlockSpec((pl.squeezed, 1, bc), lambda p, j: (p, 0, 0))
        params = call_params(backend, t, ("parallel", "arbitrary"))

        def kernel(*refs):
            row_refs, stat_refs, feat_refs, out_refs, part_refs = split(refs)
            p, j = pl.program_id(0), pl.program_id(1)
            row0 = blk(p, j) * br
            new = body(row0, row_refs, stat_refs, feat_refs, out_refs)

            @pl.when(j == 0)
            def _init():
                for ref in part_refs:
                    ref[...] = jnp.zeros(ref.shape, ref.dtype)

            @pl.when(p * steps + j < nb)
            def _merge():
                acc = merge(tuple(ref[...] for ref in part_refs), tuple(new), j, row0)
                for ref, a in zip(part_refs, acc):
                    ref[...] = a

    outs = pl.pallas_call(
        kernel,
        out_shape=[*row_outs] + [part] * num_partials,
        grid=grid,
        in_specs=[row_s] * n_rows + [stat_s] * n_stats + [feat_s] * n_feats,
        out_specs=[row_s] * n_outs + [part_s] * num_partials,
        compiler_params=params,
        interpret=interpret_mode(backend),
        name=name,
    )(*rows, *stats, *feats)
    return list(outs[:n_outs]), list(outs[n_outs:])
