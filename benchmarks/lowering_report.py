"""What one optimizer step lowers to on a GPU or a TPU, per kernel backend, read from its StableHLO.

For each parameter tree (resnet50, gpt2, small2000 from `optimizer_step.py`, as ShapeDtypeStructs:
nothing is allocated), optimizer (adamw, clip+adamw, lion, lamb, sgd-momentum, adamw-int8) and kernel
backend (triton and mosaic_gpu lowered for CUDA, an H100 target; mosaic for TPU, a v5e), one training
step `tx.update_and_apply(grads, state, params)` is jitted with params and state donated, traced under
the backend and lowered for its platform from this machine (no accelerator needed):

    optax_ext.kernels.lower_for(step, *avals, platform="cuda", backend="mosaic_gpu", donate_argnums=(0, 1)).as_text()

and the StableHLO text is read for:
  kernels        kernel launches: custom calls to `__gpu$xla.gpu.triton` (triton), `mosaic_gpu_v2`
                 (mosaic_gpu) or `tpu_custom_call` (mosaic)
  kernel B/param bytes through the kernels per parameter: the byte sizes of every kernel call's operand
                 and result types, from the op's signature `(tensor<...>, ...) -> (tensor<...>, ...)`,
                 summed and divided by the number of parameters (an in-place slot counts once read, once
                 written, which is the traffic it costs)
  floor          the physical floor, fp32, update applied (below); kernel B/param / floor = the excess
  copied/param   elements copied by layout ops, per parameter: the result elements of every
                 concatenate, slice, pad, dynamic_slice, dynamic_update_slice and gather (the JSON has
                 them per op, plus scatter)
  XLA ops        StableHLO ops outside the kernels (all but kernel calls, constants and returns): each
                 is work XLA must schedule, most become small fusions or launches of their own
  aliased        inputs that alias an output (`tf.aliasing_output`): donation taking effect
  trace+lower s  seconds to trace and lower the step (a proxy for the Python-side cost per leaf)
  Optax trace+lower s   the same for Optax's step (`update` + `apply_updates`) on the same tree and
                 platform, the reference, lowered right after ours; "/ Optax" is the ratio. Each
                 lowering starts from cleared JAX caches and a garbage collection, as in a process
                 that lowers one step: the rows lowered before it (other backends) cost it nothing
Ops in private functions count once per call. A loop body counts once.

Compiled for an H100 (GPU backends; where `optax_ext[gpu-aot]` is installed, or `--compiled yes`): the same step, ours
and Optax's, jitted as `step(params, state, grads) -> (params, state)` with `donate_argnums=(0, 1)` (the
donated arguments in the order of the outputs), compiled by XLA for an H100 on this machine
(`optax_ext.kernels.aot`) and read by `ox.inspect_step` from XLA's optimized program:
  H100 launches  fusions + custom calls (our kernels) + copies + other kernels: what the GPU launches
  copies         copy instructions XLA inserted (0 when every donated buffer is updated in place)
  temp B/param   XLA's temp buffers (`memory_analysis().temp_size_in_bytes`) per parameter

Physical floors, bytes per parameter, fp32 params, grads and slots, update applied in the same step:
  adamw         28  read p, g, m, v; write p, m, v
  clip+adamw    32  adamw + read g once more for the global norm (needed before any update)
  lion          20  read p, g, m; write p, m
  sgd-momentum  20  read p, g, m; write p, m
  lamb          40  the trust ratio ||p|| / ||u|| of a leaf needs all of u before any p can be written, so
                    at least two passes: pass 1 reads g, p, m, v and writes m, v and u (28), with the leaf's
                    ||u||^2 and ||p||^2 as partial sums of the same pass (no extra read); pass 2 reads u, p
                    and writes p (12). Recomputing u in pass 2 instead of storing it reads g, m, v again
                    (48). Where pass 1 needs no p (no weight decay), ||p|| still needs p read once before
                    pass 2, so 40 holds either way. The library's structure, norms as their own small
                    reduction kernels, reads u and p once more (+8): 44 without weight decay (pass 1 reads
                    g, m, v only), 48 with it.

    python benchmarks/lowering_report.py                     # all trees, optimizers, backends: table + JSON
    python benchmarks/lowering_report.py --trees gpt2 --optimizers adamw lamb --backends mosaic_gpu --out /tmp/l.json
    python benchmarks/lowering_report.py --smoke             # a tiny tree, a few seconds

The optimizers run with their defaults beside a 1e-3 learning rate (lamb: no weight decay). On the
project's 2-core CPU a backend's full run takes 3 to 6 minutes (mosaic_gpu: longer), most of it
small2000 (20 s to 2 minutes per optimizer to trace and lower 2,000 leaves).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from pathlib import Path

# Without a GPU, JAX's CUDA plugin (optax_ext[gpu-aot]) loads only with its version check skipped,
# and only if this is set before JAX initializes its backends.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

# sibling modules: run as a script
from _common import versions  # noqa: E402
from optimizer_step import gpt2_small_shapes, optax_step, ours_step, resnet50_shapes, small_leaves_shapes  # noqa: E402

import optax_ext as ox  # noqa: E402
from optax_ext.kernels import aot, lower_for  # noqa: E402
from optax_ext.kernels.backend import mosaic_gpu_available  # noqa: E402

TRITON_TARGET = "__gpu$xla.gpu.triton"
# The custom-call target each kernel backend lowers to -> the backend.
KERNEL_TARGETS = {TRITON_TARGET: "triton", "mosaic_gpu_v2": "mosaic_gpu", "tpu_custom_call": "mosaic"}
COPY_OPS = ("concatenate", "slice", "pad", "dynamic_slice", "dynamic_update_slice", "gather")
EXTRA_COPY_OPS = ("scatter",)  # reported per op in the JSON, not in the headline copied/param

OPTIMIZERS = {
    "adamw": lambda: ox.adamw(1e-3),
    "clip+adamw": lambda: ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3)),
    "lion": lambda: ox.lion(1e-3),
    "lamb": lambda: ox.lamb(1e-3),
    "sgd-momentum": lambda: ox.sgd(1e-3, momentum=0.9),
    "adamw-int8": lambda: ox.adamw(1e-3, mu_dtype=ox.int8_blockwise, nu_dtype=ox.int8_blockwise),
}
# The same optimizers in Optax, for the compiled-program columns (Optax has no 8-bit AdamW).
OPTAX_OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-3),
    "clip+adamw": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    "lion": lambda: optax.lion(1e-3),
    "lamb": lambda: optax.lamb(1e-3),
    "sgd-momentum": lambda: optax.sgd(1e-3, momentum=0.9),
}
# adamw-int8: g, p in (8) + p out (4) + 1-byte moments in and out (4) + an f32 absmax per 256 (~0.06).
FLOOR_BYTES_PER_PARAM = {"adamw": 28, "clip+adamw": 32, "lion": 20, "lamb": 40, "sgd-momentum": 20, "adamw-int8": 16}

TREES = {
    "resnet50": resnet50_shapes,
    "gpt2": gpt2_small_shapes,
    "small2000": small_leaves_shapes,
    # --smoke: a scalar, small leaves (batched on the Pallas backends) and large ones, ragged sizes.
    "tiny": lambda: [(), (7,), (3, 5), (1000,), (70_001,), (64, 1000)],
}
FULL_TREES = ("resnet50", "gpt2", "small2000")


# ------------------------------------------------------------------------------------ StableHLO parsing

_FUNC_RE = re.compile(r"^\s*func\.func\s+(?:(?:public|private|nested)\s+)?@([\w$.\-]+)")
_CALL_RE = re.compile(r"\bcall\s+@([\w$.\-]+)\s*\(")
_OP_RE = re.compile(r'^\s*(?:%[^=]*=\s*)?"?stablehlo\.(\w+)')
_CUSTOM_TARGET_RE = re.compile(r"stablehlo\.custom_call\s+@([\w$.\-]+)")
# The op's functional type, the last thing on its line: `: (operand types) -> result type(s)`.
_SIGNATURE_RE = re.compile(r":\s*\(([^()]*)\)\s*->\s*(\([^()]*\)|tensor<[^()]*?>)\s*(?:loc\(.*\))?\s*$")
_TENSOR_RE = re.compile(r"tensor<((?:[^<>]|<[^<>]*>)*)>")


def _dtype_bytes(dtype: str) -> float:
    """Bytes of one element: f32 -> 4, bf16 -> 2, ui8 -> 1, i1 (pred, stored as a byte) -> 1, complex<f32> -> 8."""
    complex_ = dtype.startswith("complex<")
    m = re.match(r"[a-zA-Z]*?(\d+)", dtype.removeprefix("complex<"))
    if m is None:
        raise ValueError(f"unknown element type {dtype!r}")
    bits = int(m.group(1))
    size = 1.0 if bits == 1 else bits / 8
    return 2 * size if complex_ else size


def tensor_elements_and_bytes(tensor_type: str) -> tuple[int, float]:
    """(elements, bytes) of the body of one `tensor<...>` type, e.g. "4096x100xf32" -> (409600, 1638400)."""
    body = tensor_type.split(",")[0].strip()  # drop an encoding: tensor<4xf32, #enc>
    m = re.fullmatch(r"((?:[0-9?]+x)*)(.+)", body)  # dims "AxBx" (? if dynamic), then the element type
    dims, dtype = m.group(1).split("x")[:-1], m.group(2)
    if any(not d.isdigit() for d in dims):
        raise ValueError(f"dynamic or unparsable shape in tensor<{tensor_type}>")
    elements = int(np.prod([int(d) for d in dims], dtype=np.int64)) if dims else 1
    return elements, elements * _dtype_bytes(dtype)


def signature_types(line: str) -> tuple[list[str], list[str]] | None:
    """(operand tensor types, result tensor types) of an op's trailing signature, or None."""
    m = _SIGNATURE_RE.search(line)
    if m is None:
        return None
    return _TENSOR_RE.findall(m.group(1)), _TENSOR_RE.findall(m.group(2))


def _function_stats(lines: list[str]) -> dict:
    stats = {
        "kernels_by_backend": dict.fromkeys(KERNEL_TARGETS.values(), 0),
        "kernel_bytes": 0.0,
        "copied_elements": dict.fromkeys(COPY_OPS + EXTRA_COPY_OPS, 0),
        "xla_ops": 0,
        "other_custom_calls": 0,
        "calls": [],
    }
    for line in lines:
        stats["calls"] += _CALL_RE.findall(line)
        m = _OP_RE.match(line)
        if m is None:
            continue
        op = m.group(1)
        if op == "custom_call":
            target = _CUSTOM_TARGET_RE.search(line)
            backend = KERNEL_TARGETS.get(target.group(1)) if target is not None else None
            if backend is not None:
                sig = signature_types(line)
                if sig is None:
                    raise ValueError(f"kernel call without a type signature: {line[:200]}...{line[-200:]}")
                stats["kernels_by_backend"][backend] += 1
                stats["kernel_bytes"] += sum(tensor_elements_and_bytes(t)[1] for t in sig[0] + sig[1])
                continue
            stats["other_custom_calls"] += 1
        if op in stats["copied_elements"]:
            sig = signature_types(line)
            if sig is None:
                raise ValueError(f"stablehlo.{op} without a type signature: {line[:300]}")
            stats["copied_elements"][op] += sum(tensor_elements_and_bytes(t)[0] for t in sig[1])
        if op not in ("constant", "return"):
            stats["xla_ops"] += 1
    return stats


def analyze_stablehlo(text: str, entry: str = "main") -> dict:
    """Counts over the entry function of a StableHLO module, with each called function counted per call.

    Returns {"kernels" (every backend's kernel calls, `KERNEL_TARGETS`), "kernels_by_backend",
    "triton_kernels", "kernel_bytes" (through every kernel call), "copied_elements" (the COPY_OPS
    total), "copied_elements_by_op", "xla_ops", "other_custom_calls", "aliased_inputs",
    "unaliased_donors"}.
    """
    functions: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = _FUNC_RE.match(line)
        if m is not None:
            current = m.group(1)
            functions[current] = [line]
        elif current is not None:
            functions[current].append(line)
    if entry not in functions:
        raise ValueError(f"no function @{entry} in the module (found {sorted(functions)})")
    local = {name: _function_stats(lines) for name, lines in functions.items()}
    memo: dict[str, dict] = {}

    def total(name: str, stack: tuple = ()) -> dict:
        if name in memo:
            return memo[name]
        if name in stack:
            raise ValueError(f"recursive call to @{name}")
        s = local[name]
        out = {
            "kernels_by_backend": dict(s["kernels_by_backend"]),
            "kernel_bytes": s["kernel_bytes"],
            "copied_elements_by_op": dict(s["copied_elements"]),
            "xla_ops": s["xla_ops"],
            "other_custom_calls": s["other_custom_calls"],
        }
        for callee in s["calls"]:
            if callee not in local:  # an external declaration: nothing to count
                continue
            c = total(callee, stack + (name,))
            for key in ("kernel_bytes", "xla_ops", "other_custom_calls"):
                out[key] += c[key]
            for field in ("kernels_by_backend", "copied_elements_by_op"):
                for k, n in c[field].items():
                    out[field][k] += n
        memo[name] = out
        return out

    out = dict(total(entry))
    out["kernels"] = sum(out["kernels_by_backend"].values())
    out["triton_kernels"] = out["kernels_by_backend"]["triton"]
    out["copied_elements"] = sum(out["copied_elements_by_op"][op] for op in COPY_OPS)
    out["aliased_inputs"] = functions[entry][0].count("tf.aliasing_output")
    out["unaliased_donors"] = functions[entry][0].count("jax.buffer_donor")  # donated, no output matched at lowering
    return out


# ------------------------------------------------------------------------------------ lowering


def avals(shapes, dtype=jnp.float32) -> dict:
    """The parameter tree of `optimizer_step.make_tree` as ShapeDtypeStructs (nothing allocated)."""
    return {f"p{i:04d}": jax.ShapeDtypeStruct(tuple(s), dtype) for i, s in enumerate(shapes)}


BACKEND_PLATFORMS = {"triton": "cuda", "mosaic_gpu": "cuda", "mosaic": "tpu"}
"""The kernel backends the report lowers, each for its platform."""


def lower_step(tx, params, backend: str = "triton", library: str = "optax_ext") -> tuple[str, float]:
    """StableHLO text of one donated, jitted step (`update_and_apply`; Optax's `update` + `apply_updates`
    for library="optax") traced under `backend` and lowered for its platform, and the seconds it took to
    trace and lower. A fresh `step` per call: jit caches traces per function object, and the kernel
    backend is read at trace time."""

    if library == "optax_ext":

        def step(params, state, grads):
            return tx.update_and_apply(grads, state, params)
    else:

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

    state = jax.eval_shape(tx.init, params)
    platform = BACKEND_PLATFORMS[backend]
    # What earlier rows left behind (their traces and lowered modules in JAX's caches, garbage) would
    # otherwise be scanned by the collector during this one.
    jax.clear_caches()
    gc.collect()
    t0 = time.perf_counter()
    text = lower_for(step, params, state, params, platform=platform, backend=backend, donate_argnums=(0, 1)).as_text()
    return text, time.perf_counter() - t0


def compiled_step(tx, params, library: str, backend: str = "triton") -> dict:
    """One step of `library` ("optax_ext" or "optax"), jitted with params and state donated in the order
    they are returned (`step(params, state, grads) -> (params, state)`, `donate_argnums=(0, 1)`), compiled
    for an H100 (`optax_ext.kernels.aot`) with our kernels on `backend` and read by `ox.inspect_step`."""
    step = (ours_step if library == "optax_ext" else optax_step)(tx)
    state = jax.eval_shape(tx.init, params)
    t0 = time.perf_counter()
    with ox.kernels.use_backend(backend):
        r = ox.inspect_step(step, params, state, params, target="h100", warn=False)
    return {
        "launches": r.launches,
        "fusions": r.counts.fusions,
        "custom_calls": r.counts.custom_calls,
        "copies": r.copies,
        "copied_elements_per_param": r.copied_per_param,
        "temp_bytes_per_param": r.temp_bytes_per_param,
        "crossed_donations": len(r.crossed),
        "compile_seconds": time.perf_counter() - t0,
    }


def optax_lower_seconds(tree: str, optimizer: str, backend: str) -> float | None:
    """Seconds to trace and lower Optax's step on the same tree for `backend`'s platform."""
    if optimizer not in OPTAX_OPTIMIZERS:
        return None
    return lower_step(OPTAX_OPTIMIZERS[optimizer](), avals(TREES[tree]()), backend, "optax")[1]


def report_one(tree: str, optimizer: str, compiled: bool = False, backend: str = "triton") -> dict:
    shapes = TREES[tree]()
    params = avals(shapes)
    n = int(sum(int(np.prod(s, dtype=np.int64)) for s in shapes))
    text, seconds = lower_step(OPTIMIZERS[optimizer](), params, backend)
    stats = analyze_stablehlo(text)
    floor = FLOOR_BYTES_PER_PARAM[optimizer]
    per_param = stats["kernel_bytes"] / n
    optax_seconds = optax_lower_seconds(tree, optimizer, backend)
    gpu = BACKEND_PLATFORMS[backend] == "cuda"
    return {
        "tree": tree,
        "optimizer": optimizer,
        "backend": backend,
        "platform": BACKEND_PLATFORMS[backend],
        "leaves": len(shapes),
        "params": n,
        "kernels": stats["kernels"],
        "kernels_by_backend": stats["kernels_by_backend"],
        "kernel_bytes_per_param": per_param,
        "floor_bytes_per_param": floor,
        "kernel_over_floor": per_param / floor,
        "copied_elements_per_param": stats["copied_elements"] / n,
        "copied_elements_by_op": stats["copied_elements_by_op"],
        "xla_ops": stats["xla_ops"],
        "other_custom_calls": stats["other_custom_calls"],
        "aliased_inputs": stats["aliased_inputs"],
        "unaliased_donors": stats["unaliased_donors"],
        "trace_lower_seconds": seconds,
        "optax_trace_lower_seconds": optax_seconds,
        "trace_lower_over_optax": seconds / optax_seconds if optax_seconds else None,
        "stablehlo_chars": len(text),
    } | (compiled_columns(optimizer, params, backend) if compiled and gpu else {})


def compiled_columns(optimizer: str, params, backend: str = "triton") -> dict:
    ours = compiled_step(OPTIMIZERS[optimizer](), params, "optax_ext", backend)
    theirs = compiled_step(OPTAX_OPTIMIZERS[optimizer](), params, "optax") if optimizer in OPTAX_OPTIMIZERS else None
    out = {"h100": ours, "h100_optax": theirs}
    for key in ("launches", "copies", "temp_bytes_per_param"):
        out[f"h100_{key}"] = ours[key]
        out[f"h100_optax_{key}"] = theirs[key] if theirs else None
    return out


COLUMNS = [
    ("tree", "tree", "{}"),
    ("optimizer", "optimizer", "{}"),
    ("backend", "backend", "{}"),
    ("leaves", "leaves", "{:,d}"),
    ("params", "params", "{:,d}"),
    ("kernels", "kernels", "{:,d}"),
    ("kernel B/param", "kernel_bytes_per_param", "{:.2f}"),
    ("floor", "floor_bytes_per_param", "{:d}"),
    ("kernel/floor", "kernel_over_floor", "{:.2f}"),
    ("copied/param", "copied_elements_per_param", "{:.3f}"),
    ("XLA ops", "xla_ops", "{:,d}"),
    ("aliased", "aliased_inputs", "{:,d}"),
    ("trace+lower s", "trace_lower_seconds", "{:.2f}"),
    ("Optax trace+lower s", "optax_trace_lower_seconds", "{:.2f}"),
    ("/ Optax", "trace_lower_over_optax", "{:.1f}x"),
]
# Compiled for an H100 (optax_ext.kernels.aot): launches (fusions + custom calls + copies + other
# kernels), copies and temp bytes per parameter of XLA's program, ours then Optax's.
COMPILED_COLUMNS = [
    ("H100 launches", "h100_launches", "{:,d}"),
    ("Optax launches", "h100_optax_launches", "{:,d}"),
    ("copies", "h100_copies", "{:,d}"),
    ("Optax copies", "h100_optax_copies", "{:,d}"),
    ("temp B/param", "h100_temp_bytes_per_param", "{:.3f}"),
    ("Optax temp B/param", "h100_optax_temp_bytes_per_param", "{:.3f}"),
]


def markdown_table(rows: list[dict]) -> str:
    columns = COLUMNS + (COMPILED_COLUMNS if any("h100_launches" in r for r in rows) else [])
    lines = [
        "| " + " | ".join(title for title, _, _ in columns) + " |",
        "|" + "|".join("---" if i < 3 else "---:" for i in range(len(columns))) + "|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tree']} | {r['optimizer']} | {r.get('backend', '')} | failed: {r['error'][:200]} |")
            continue
        cells = [("-" if r.get(key) is None else fmt.format(r[key])) for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--trees",
        nargs="+",
        choices=sorted(TREES),
        default=None,
        help=f"default: {' '.join(FULL_TREES)} ('tiny' with --smoke)",
    )
    ap.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    ap.add_argument(
        "--backends",
        nargs="+",
        choices=list(BACKEND_PLATFORMS),
        default=None,
        help="kernel backends to lower (each for its platform); default: all this jax has",
    )
    ap.add_argument("--smoke", action="store_true", help="the tiny tree only: runs in a few seconds")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("lowering_report.json"))
    ap.add_argument(
        "--compiled",
        choices=("auto", "yes", "no"),
        default="auto",
        help="compiled-program columns for an H100 (needs optax_ext[gpu-aot]); auto: where it is installed",
    )
    args = ap.parse_args(argv)
    trees = args.trees or (["tiny"] if args.smoke else list(FULL_TREES))
    compiled = args.compiled == "yes" or (args.compiled == "auto" and aot.available())
    if args.compiled == "yes":
        aot.target_mesh("h100")  # fail now, saying what to install, rather than in every row

    backends = args.backends or [b for b in BACKEND_PLATFORMS if b != "mosaic_gpu" or mosaic_gpu_available()]

    rows = []
    for tree in trees:
        for optimizer in args.optimizers:
            for backend in backends:
                try:
                    rows.append(report_one(tree, optimizer, compiled, backend))
                except Exception as e:  # noqa: BLE001  one configuration failing to lower is a result too
                    error = f"{type(e).__name__}: {e}"
                    rows.append({"tree": tree, "optimizer": optimizer, "backend": backend, "error": error})
                print(f"  done: {tree} {optimizer} {backend}", file=sys.stderr, flush=True)  # rows take minutes
    info = versions()
    print(
        f"one donated update_and_apply step per kernel backend, lowered for its platform "
        f"({', '.join(f'{b}: {BACKEND_PLATFORMS[b]}' for b in backends)}) on {info['device']} "
        f"(jax {info['jax']}, optax_ext {info['optax_ext']}); floor: fp32 bytes per param, update applied"
        + (
            "; GPU rows compiled for an H100 without a GPU, ours and Optax's, donated in output order"
            if compiled
            else ""
        )
    )
    print(markdown_table(rows))
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": info,
        "backends": {b: BACKEND_PLATFORMS[b] for b in backends},
        "smoke": args.smoke,
        "compiled_for": "h100" if compiled else None,
        "floor_bytes_per_param": FLOOR_BYTES_PER_PARAM,
        "copy_ops": list(COPY_OPS),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
