"""What a jitted training step compiles to: launches, copies, temp memory and donation, from XLA's program.

    step = jax.jit(train_step, donate_argnums=(0, 1))       # train_step(params, opt_state, grads)
    print(ox.inspect_step(step, params, opt_state, grads))                   # on this device
    print(ox.inspect_step(step, params, opt_state, grads, target="h100"))    # an H100, no GPU needed

The report reads the compiled, optimized HLO (not the lowered StableHLO): each fusion, custom call
(Pallas kernels, cuBLAS) and copy there is one kernel launch on a GPU; `memory_analysis()` gives
the temp buffers; the module's `input_output_alias` says which donated input each output was
written into.

The donation-order rule. JAX pairs each output leaf, in order, with the first not yet paired
donated input leaf of the same shape and dtype. A step `step(grads, opt_state, params) ->
(params, opt_state)` with `donate_argnums=(1, 2)` pairs the new params with the first Adam
moments (same shapes), the moments with the params, and so on: every in-place update is then
crossed, and XLA copies buffers to make the program correct (5 elements per parameter for an
AdamW step). List donated arguments in the order the outputs come back: `step(params,
opt_state, grads) -> (params, opt_state)` with `donate_argnums=(0, 1)`. `inspect_step` warns,
naming the leaves, when it finds crossed pairs in a program with copies.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable

import jax
import numpy as np

__all__ = ["HloCounts", "StepReport", "count_hlo", "inspect_step"]

# Instructions that launch nothing: they name or regroup buffers.
_FREE_OPS = frozenset(
    {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier", "after-all", "partition-id"}
)
# Instructions that run other computations on the host's schedule: their bodies are counted (once).
_CONTROL_ATTRS = ("condition", "body", "to_apply", "branch_computations", "true_computation", "false_computation")
_COMPUTATION_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_SHAPE_RE = re.compile(r"^([a-z]+\d*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class HloCounts:
    """Launch-level counts of a compiled HLO module (entry and control-flow bodies, each once)."""

    fusions: int
    custom_calls: int
    copies: int
    other: int
    copied_elements: int
    aliases: dict[int, int]  # flat output index -> entry parameter number
    parameter_names: dict[int, str]  # entry parameter number -> the name JAX gave it ("params['w']")

    @property
    def launches(self) -> int:
        return self.fusions + self.custom_calls + self.copies + self.other


def _split_instruction(line: str) -> tuple[str, str, str] | None:
    """(result type, opcode, rest) of an HLO instruction line, or None."""
    m = re.match(r"\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*", line)
    if m is None:
        return None
    rest = line[m.end() :]
    if rest.startswith("("):  # a tuple type: skip to its closing parenthesis
        depth, end = 0, 0
        while True:
            depth += {"(": 1, ")": -1}.get(rest[end], 0)
            end += 1
            if depth == 0 or end == len(rest):
                break
        type_, rest = rest[:end], rest[end:].lstrip()
    else:
        type_, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    return (type_, op.group(1), rest) if op else None


def _elements(type_: str) -> int:
    """Elements of an array type `f32[1024,512]{1,0}` (a tuple type: its arrays summed)."""
    total = 0
    for m in re.finditer(r"[a-z]+\d*\[([\d,]*)\]", type_):
        dims = [int(d) for d in m.group(1).split(",") if d]
        total += math.prod(dims)
    return total


def _parse_aliases(header: str) -> dict[int, int]:
    m = re.search(r"input_output_alias=\{(.*?)\}\s*,\s*(?:entry_computation_layout|\w+=)", header)
    if m is None:
        return {}
    out = {}
    for idx, param in re.findall(r"\{([\d,\s]*)\}:\s*\((\d+),", m.group(1)):
        out[int(idx.split(",")[0]) if idx.strip() else 0] = int(param)
    return out


def count_hlo(text: str) -> HloCounts:
    """Count launches, copies and aliases in a compiled HLO module's text (`compiled.as_text()`)."""
    lines = text.splitlines()
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in lines:
        if current is None:
            m = _COMPUTATION_RE.match(line)
            if m and not line.startswith("HloModule"):
                current = m.group(2)
                computations[current] = []
                entry = current if m.group(1) else entry
        elif line.strip() == "}":
            current = None
        else:
            computations[current].append(line)
    if entry is None:
        raise ValueError("count_hlo: no ENTRY computation in the module text.")
    counts = {"fusion": 0, "custom-call": 0, "copy": 0, "other": 0, "copied": 0}
    names: dict[int, str] = {}
    seen: set[str] = set()

    def visit(name: str, is_entry: bool):
        if name in seen or name not in computations:
            return
        seen.add(name)
        for line in computations[name]:
            parts = _split_instruction(line)
            if parts is None:
                continue
            type_, op, rest = parts
            if op == "parameter" and is_entry:
                number = int(re.match(r"parameter\((\d+)\)", rest).group(1))
                label = re.search(r'op_name="((?:[^"\\]|\\.)*)"', rest)
                names[number] = label.group(1).replace("\\'", "'") if label else f"parameter {number}"
            if op in _FREE_OPS or op.endswith("-done"):
                continue
            if op in ("while", "conditional", "call"):
                for attr in _CONTROL_ATTRS:
                    for m in re.finditer(rf"\b{attr}=\{{?([%\w.\-,\s]+)\}}?", rest):
                        for callee in m.group(1).split(","):
                            visit(callee.strip().lstrip("%"), False)
                continue
            if op in ("copy", "copy-start"):
                counts["copy"] += 1
                counts["copied"] += _elements(type_.split(",")[0] if op == "copy-start" else type_)
            elif op == "fusion":
                counts["fusion"] += 1
            elif op == "custom-call":
                counts["custom-call"] += 1
            else:
                counts["other"] += 1

    visit(entry, True)
    header = next((line for line in lines if line.startswith("HloModule")), "")
    return HloCounts(
        fusions=counts["fusion"],
        custom_calls=counts["custom-call"],
        copies=counts["copy"],
        other=counts["other"],
        copied_elements=counts["copied"],
        aliases=_parse_aliases(header),
        parameter_names=names,
    )


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What `inspect_step` found. Per-parameter figures divide by `params` (elements)."""

    target: str
    counts: HloCounts
    params: int
    temp_bytes: int
    pairs: tuple[tuple[str, str], ...]  # (donated input, output written into it)
    crossed: tuple[tuple[str, str], ...]  # the pairs across different leaves

    @property
    def launches(self) -> int:
        return self.counts.launches

    @property
    def copies(self) -> int:
        return self.counts.copies

    @property
    def copied_per_param(self) -> float:
        return self.counts.copied_elements / max(self.params, 1)

    @property
    def temp_bytes_per_param(self) -> float:
        return self.temp_bytes / max(self.params, 1)

    def __str__(self) -> str:
        c = self.counts
        lines = [
            f"step compiled for {self.target}: {c.launches} launches "
            f"({c.fusions} fusions, {c.custom_calls} custom calls, {c.copies} copies, {c.other} other)",
            f"  copied: {self.copied_per_param:.3f} elements/param; temp: {self.temp_bytes_per_param:.3f} B/param "
            f"({self.params:,} params)",
            f"  donated inputs written in place: {len(self.pairs)}; across different leaves: {len(self.crossed)}",
        ]
        lines += [f"    {out} -> donated {inp}" for inp, out in self.crossed[:5]]
        return "\n".join(lines)


def _suffix(path: tuple, drop: int) -> tuple:
    return tuple(str(k) for k in path[drop:])


def inspect_step(step: Callable, *args, target: str | None = None, params=None, warn: bool = True) -> StepReport:
    """Compile `step(*args)` and report its launches, copies, temp memory and donation pairs.

    Args:
      step: the jitted step as you run it (its `donate_argnums` are what is inspected); a plain
        function is jitted without donation.
      *args: its arguments (arrays or `jax.ShapeDtypeStruct`s).
      target: None compiles for this machine's default device; "h100" for an H100 without one
        (`optax_ext.kernels.aot`, needs `optax_ext[gpu-aot]`).
      params: what "per parameter" divides by: a pytree (its element count) or an int. Default: the
        argument with the same tree structure as the step's first output (params and grads
        qualify alike), else the first output's element count.
      warn: warn (`UserWarning`) when the program copies buffers and donated inputs hold outputs
        of other leaves: the donation-order rule in this module's docstring.
    """
    jitted = step if hasattr(step, "trace") else jax.jit(step)
    if target is None:
        compiled = jitted.trace(*args).lower().compile()
        where = jax.devices()[0].device_kind
    else:
        from optax_ext.kernels import aot

        compiled = aot.compile_for(jitted, *args, target=target)
        where = target
    counts = count_hlo(compiled.as_text())
    memory = compiled.memory_analysis()
    temp = int(getattr(memory, "temp_size_in_bytes", 0)) if memory is not None else 0

    out_struct = compiled.out_info
    out_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(out_struct)[0]]
    in_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(args)[0]]
    out_drop = 1 if isinstance(out_struct, (tuple, list)) else 0
    pairs, crossed = [], []
    same_count = len(counts.parameter_names) == len(in_paths)
    for out_index, param in sorted(counts.aliases.items()):
        if out_index >= len(out_paths):
            continue
        out_path = out_paths[out_index]
        out_name = "output" + jax.tree_util.keystr(out_path)
        in_name = counts.parameter_names.get(param, f"parameter {param}")
        pairs.append((in_name, out_name))
        if same_count and _suffix(in_paths[param], 1) != _suffix(out_path, out_drop):
            crossed.append((in_name, out_name))

    report = StepReport(where, counts, _param_count(params, args, out_struct), temp, tuple(pairs), tuple(crossed))
    if warn and counts.copies and crossed:
        first = "; ".join(f"{out} is written into donated {inp}" for inp, out in crossed[:3])
        warnings.warn(
            f"inspect_step: the compiled step copies {report.copied_per_param:.2f} elements per parameter "
            f"({counts.copies} copies) and {len(crossed)} donated inputs hold outputs of other leaves: {first}. "
            "JAX pairs each output with the first donated input of the same shape and dtype, in order: pass the "
            "donated arguments in the order of the outputs, e.g. step(params, opt_state, grads) -> "
            "(params, opt_state) with donate_argnums=(0, 1).",
            UserWarning,
            stacklevel=2,
        )
    return report


def _param_count(params, args, out_struct) -> int:
    if isinstance(params, int):
        return params
    if params is None:
        first = out_struct[0] if isinstance(out_struct, (tuple, list)) and out_struct else out_struct
        target = jax.tree.structure(first)
        params = next((a for a in args if jax.tree.structure(a) == target), first)
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(params)))
