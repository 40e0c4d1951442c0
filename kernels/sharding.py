"""Run a kernel on per-device shards under JAX sharding: custom_partitioning (Auto axes) or shard_map.

A `pallas_call` only ever sees the arrays it is given; under `jax.jit` over a mesh it would receive
the *global* arrays, and XLA would have to gather every sharded operand onto every device (a
Triton custom call has no partitioning rule of its own). `per_shard(fn, operands, rule, ...)`
makes the kernel run on each device's shard instead:

  * Auto axes (GSPMD/Shardy decide shardings after tracing): the call is wrapped in
    `jax.experimental.custom_partitioning`. Its `sharding_rule` (Shardy) ties the dims of operands
    and results through named factors, as in an einsum; its partition callback picks one mesh
    axis (or none) per factor from the operands' shardings, asks for exactly that layout, and
    traces `fn` on the shard shapes. On one device it is `fn` itself.
  * Explicit axes (`jax.set_mesh` with `AxisType.Explicit`): shardings are part of the arrays' types,
    so the call is wrapped in `jax.shard_map` with specs derived the same way.

`fn(local_operands, axes) -> local_results` receives `axes`: factor -> the tuple of mesh axes that
factor is split over, so a reduction can `psum` its partial sums over exactly the axes its operand
is sharded on (a replicated operand is not counted twice).

Per factor, the most-sharded layout among the operands that use it wins (e.g. ZeRO-1: params
replicated, moments sharded over "data": the update runs on the moments' shards and XLA slices the
params locally); an axis is used at most once per array; a factor whose size the axes' total does
not divide is left unsharded (`need_replication` factors always are). Explicit axes never reshard
silently onto a `need_replication` factor: that is an error naming the axis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.custom_batching
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["Rule", "check_whole", "may_be_sharded", "per_shard"]

Axes = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    """How the dims of a call's operands and results correspond, einsum style.

    Attributes:
      operands: per operand, one factor name per dim.
      results: per result, one factor name per dim.
      need_replication: factors that must not be split (a normalized axis, a vector of scalars).
      name: the caller, for error messages.
    """

    operands: tuple[tuple[str, ...], ...]
    results: tuple[tuple[str, ...], ...]
    need_replication: tuple[str, ...] = ()
    name: str = "kernel"


def may_be_sharded() -> bool:
    """Whether a call traced now can end up partitioned over several devices.

    A one-device abstract mesh in context (e.g. `lowering_target`'s, which only names the target
    device) cannot partition anything."""
    return jax.device_count() > 1 or jax.sharding.get_abstract_mesh().size > 1


def _entry_axes(entry) -> Axes:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _spec_axes(spec, ndim) -> list[Axes]:
    entries = list(spec) + [None] * (ndim - len(spec))
    return [_entry_axes(e) for e in entries[:ndim]]


def _choose_axes(rule: Rule, shapes: Sequence[tuple], specs: Sequence, axis_sizes: dict) -> dict[str, Axes]:
    """factor -> mesh axes: the most-sharded layout among the operands using it, where legal."""
    sizes: dict[str, int] = {}
    candidates: dict[str, list[Axes]] = {}
    for factors, shape, spec in zip(rule.operands, shapes, specs):
        for f, dim, axes in zip(factors, shape, _spec_axes(spec, len(shape))):
            sizes[f] = dim
            candidates.setdefault(f, []).append(axes)
    chosen: dict[str, Axes] = {}
    for f, options in candidates.items():
        best: Axes = ()
        if f not in rule.need_replication:
            for axes in sorted(options, key=lambda a: -math.prod(axis_sizes[x] for x in a)):
                if axes and sizes[f] % math.prod(axis_sizes[x] for x in axes) == 0:
                    best = axes
                    break
        chosen[f] = best
    # An axis may split at most one dim of any array: drop a later factor's claim on a used axis.
    for factors in rule.operands + rule.results:
        used: set[str] = set()
        for f in factors:
            if any(x in used for x in chosen.get(f, ())):
                chosen[f] = ()
            used.update(chosen.get(f, ()))
    return chosen


def _spec(factors, chosen) -> PartitionSpec:
    entries = []
    for f in factors:
        axes = chosen.get(f, ())
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def explicit_mesh(operands):
    """The mesh of the first operand sharded over Explicit axes, or None."""
    for x in operands:
        sharding = getattr(jax.typeof(x), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        spec = getattr(sharding, "spec", ())
        if mesh is None or mesh.empty or not any(p is not None for p in spec):
            continue
        explicit = {name for name, t in zip(mesh.axis_names, mesh.axis_types) if t == jax.sharding.AxisType.Explicit}
        if any(set(_entry_axes(p)) & explicit for p in spec):
            return mesh
    return None


def per_shard(
    fn: Callable, operands: Sequence[jax.Array], rule: Rule, result_avals: Sequence[jax.ShapeDtypeStruct]
) -> list[jax.Array]:
    """`fn(operands, axes)` run on each device's shard of the operands (see the module docstring).

    Args:
      fn: `(local operands, axes) -> local results`; `axes` maps each factor to its mesh axes. It
        may not close over array constants (custom_partitioning forbids them): build them from an
        iota or pass them as operands.
      operands: the global arrays.
      rule: dims of operands and results as factors.
      result_avals: the global results' shapes and dtypes.
    """
    operands = list(operands)
    mesh = explicit_mesh(operands)
    if mesh is not None:
        return _explicit(fn, operands, rule, mesh)
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and all(t == jax.sharding.AxisType.Explicit for t in context.axis_types):
        # Replicated operands under an all-Explicit mesh: still a shard_map (every spec replicated),
        # so the kernel is traced on per-device values. custom_partitioning would trace it with
        # Explicit-typed values that the partitioner (jax 0.12) and the Pallas interpreter reject.
        return _explicit(fn, operands, rule, context)
    if not may_be_sharded():
        return list(fn(operands, {}))
    return _auto(fn, operands, rule, result_avals)


def _explicit(fn, operands, rule: Rule, mesh):
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and (context.axis_names, context.axis_sizes) == (mesh.axis_names, mesh.axis_sizes):
        # The mesh in context, which may name another target device (`lowering_target`); shard_map
        # wants exactly that one (jax 0.10.2 compares the device too).
        mesh = context
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    specs = [jax.typeof(x).sharding.spec for x in operands]
    for factors, x, spec in zip(rule.operands, operands, specs):
        for f, axes in zip(factors, _spec_axes(spec, x.ndim)):
            if f in rule.need_replication and axes:
                raise _split_error(rule.name, x.shape, axes, spec)
    chosen = _choose_axes(rule, [x.shape for x in operands], specs, sizes)
    in_specs = [_spec(factors, chosen) for factors in rule.operands]
    # Operands laid out otherwise than the chosen factors (e.g. replicated params beside sharded
    # moments) are resharded first: a local slice, or an explicit collective the user can see.
    operands = [
        x if jax.typeof(x).sharding.spec == s else jax.sharding.reshard(x, s) for x, s in zip(operands, in_specs)
    ]
    out_specs = [_spec(factors, chosen) for factors in rule.results]
    mapped = jax.shard_map(
        lambda *xs: list(fn(list(xs), chosen)),
        mesh=mesh,
        in_specs=tuple(in_specs),
        out_specs=out_specs,
        check_vma=False,
    )
    return list(mapped(*operands))


def _split_error(name, shape, axes, spec) -> ValueError:
    return ValueError(
        f"{name}: an operand of shape {shape} is sharded over mesh axis "
        f"{axes if len(axes) > 1 else axes[0]!r} along a dimension the kernel needs whole "
        f"(spec {spec}); reshard it with that dimension replicated "
        f"(jax.sharding.reshard(x, P(...)) with None there) or shard another dimension."
    )


def check_whole(name: str, x, dims: Sequence[int]) -> None:
    """Under Explicit axes, the error `per_shard` gives when `x` is split along one of `dims`, for the
    paths that do not go through it (the XLA backend): the same program fails or runs the same way on
    every backend, and nothing is resharded behind the user's back."""
    if explicit_mesh([x]) is None:
        return
    spec = jax.typeof(x).sharding.spec
    per_dim = _spec_axes(spec, x.ndim)
    for d in dims:
        if per_dim[d % x.ndim]:
            raise _split_error(name, x.shape, per_dim[d % x.ndim], spec)


def _auto(fn, operands, rule: Rule, result_avals):
    from jax.experimental.custom_partitioning import SdyShardingRule, custom_partitioning

    def impl(*xs):
        return tuple(fn(list(xs), {}))

    wrapped = custom_partitioning(impl)

    def layout(mesh, arg_shapes):
        sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
        specs = [getattr(a.sharding, "spec", PartitionSpec()) for a in arg_shapes]
        chosen = _choose_axes(rule, [a.shape for a in arg_shapes], specs, sizes)
        args = tuple(NamedSharding(mesh, _spec(f, chosen)) for f in rule.operands)
        results = tuple(NamedSharding(mesh, _spec(f, chosen)) for f in rule.results)
        return chosen, args, results

    def partition(mesh, arg_shapes, result_shape):
        chosen, args, results = layout(mesh, arg_shapes)
        return mesh, (lambda *xs: tuple(fn(list(xs), chosen))), results, args

    def infer(mesh, arg_shapes, result_shape):
        return layout(mesh, arg_shapes)[2]

    # Shardy numbers factors in order of first appearance and wants special factors in that order.
    used = list(dict.fromkeys(f for factors in rule.operands + rule.results for f in factors))
    sdy_rule = SdyShardingRule(
        tuple(rule.operands),
        tuple(rule.results),
        need_replication_factors=tuple(f for f in used if f in rule.need_replication),
    )
    wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=sdy_rule)

    # custom_partitioning has no batching rule: under `jax.vmap` the kernels are vmapped directly
    # (a batch of independent problems; pallas_call batches itself).
    @jax.custom_batching.custom_vmap
    def call(*xs):
        return wrapped(*xs)

    @call.def_vmap
    def _batched(axis_size, in_batched, *xs):
        in_axes = [0 if b else None for b in in_batched]
        outs = jax.vmap(impl, in_axes=in_axes, axis_size=axis_size)(*xs)
        return outs, (True,) * len(outs)

    # Under jit, so that an eager call with committed sharded arrays is partitioned like a traced one.
    return list(jax.jit(call)(*operands))
