"""Benchmark one optimizer step, clip_by_global_norm(1.0) + adamw with the update applied.

Workloads (parameter pytrees with real shapes):
  resnet50   161 leaves, 25.6M params (torchvision ResNet-50's parameter tensors)
  gpt2       148 leaves, 124.4M params (GPT-2 small)
  small2000  2,000 leaves of ragged sizes, 4M params (launch- and bookkeeping-bound)
  small200   200 leaves of the same sizes, 400K params (the CPU-compilable version of small2000)

Columns: optax_ext (`tx.update_and_apply`, jit, params and state donated), Optax (jit, donated,
`update` + `apply_updates`), and where a CUDA GPU and PyTorch are present `torch.optim.AdamW` with
`fused=True` and `foreach=True` (plus `clip_grad_norm_(foreach=True)`) on the same shapes. Every row
is timed the same way (`_common.median_seconds`): median host wall time of one step followed by the
library's synchronization (`jax.block_until_ready`, `torch.cuda.synchronize`), after warm-up. Bytes
moved per parameter are counted, not measured: fp32 AdamW reads p, g, m, v and writes p, m, v
(28 B); global-norm clipping reads g once more (32 B). Achieved GB/s is reported as a share of the
device's measured copy bandwidth (y = x + 1 over 256 MiB: read + write).

    python benchmarks/optimizer_step.py                  # all workloads, table + benchmarks/optimizer_step.json
    python benchmarks/optimizer_step.py --workloads small2000 --iters 20 --rounds 9 --out /tmp/r.json

CPU ratios (Optax / optax_ext) are the median of `--rounds` interleaved rounds (>= 7 for a figure
worth quoting), with their range: both libraries run in one process, alternately, so a slow spell
of a shared machine hits both sides of a ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The JAX rows run in a process of their own beside this one (which times the copy bandwidth and torch on the
# same GPU): with JAX's default preallocation of 75% of GPU memory per process, the second could not start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

# sibling module: run as a script
from _common import copy_bandwidth, cuda_torch, median_seconds, torch_sync, versions  # noqa: E402

import optax_ext as ox  # noqa: E402

BYTES_PER_PARAM = {"adamw": 28, "clip+adamw": 32}


# ------------------------------------------------------------------------------------ workloads


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter shapes of ResNet-50 (conv HWIO, batch-norm scale and bias, fc)."""
    shapes = [(7, 7, 3, 64), (64,), (64,)]
    in_ch = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            for kh, cin, cout in ((1, in_ch, width), (3, width, width), (1, width, width * 4)):
                shapes += [(kh, kh, cin, cout), (cout,), (cout,)]
            if b == 0:
                shapes += [(1, 1, in_ch, width * 4), (width * 4,), (width * 4,)]
            in_ch = width * 4
    shapes += [(2048, 1000), (1000,)]
    return shapes


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The 148 parameter shapes of GPT-2 small (124M)."""
    d, vocab, ctx = 768, 50257, 1024
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def small_leaves_shapes(n: int = 2000, total: int = 4_000_000, seed: int = 0) -> list[tuple[int, ...]]:
    sizes = np.random.default_rng(seed).integers(100, 2 * total // n - 100, size=n)
    return [(int(s),) for s in sizes]


WORKLOADS = {
    "resnet50": resnet50_shapes,
    "gpt2": gpt2_small_shapes,
    "small2000": small_leaves_shapes,
    # What XLA's CPU compiler can still build quickly: 2,000 leaves take it > 10 minutes per library
    # on a 2-core machine and can abort in LLVM (out of mapped memory).
    "small200": lambda: small_leaves_shapes(200, 400_000),
}


def make_tree(shapes, seed, dtype=jnp.float32):
    key = jax.random.PRNGKey(seed)
    return {f"p{i:04d}": jax.random.normal(jax.random.fold_in(key, i), s, dtype) * 0.02 for i, s in enumerate(shapes)}


# ------------------------------------------------------------------------------------ timing


def ours_step(tx):
    def step(params, state, grads):
        return tx.update_and_apply(grads, state, params)

    return jax.jit(step, donate_argnums=(0, 1))


def optax_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def _compiled_step(lib_name, shapes, clip, backend=None):
    """One library's jitted, donated step on the workload, compiled (ours with its kernels on `backend`,
    default: the platform's); and its first carry."""
    lib, wrap = {"optax_ext": (ox, ours_step), "optax": (optax, optax_step)}[lib_name]
    params, grads = make_tree(shapes, 0), make_tree(shapes, 1)
    core = lib.adamw(1e-3, weight_decay=0.01)
    tx = lib.chain(lib.clip_by_global_norm(1.0), core) if clip else core
    state = tx.init(params)
    t0 = time.perf_counter()
    with ox.kernels.use_backend(backend) if backend else contextlib.nullcontext():
        compiled = wrap(tx).lower(params, state, grads).compile()
    compile_s = time.perf_counter() - t0
    carry = [(params, state)]  # the step donates params and state: feed each call the last outputs

    def step():
        carry[0] = compiled(*carry[0], grads)
        return carry[0]

    return step, compile_s


def _label(backend) -> str:
    return f"optax_ext_{backend}" if backend else "optax_ext"


def bench_jax_pair(name, iters, rounds, clip, backends=(None,)):
    """Both libraries on one workload, in one process, timed in interleaved rounds.

    Ours runs once per kernel backend in `backends` (None: the platform's), labelled "optax_ext" or
    "optax_ext_<backend>". Each round times `iters` steps of each (median of the round), rotating
    which goes first; the ratio Optax / ours is taken per round, so a slow spell of the machine hits
    both sides of a ratio alike. Returns per label {"seconds" (median over rounds), "rounds",
    "compile_seconds"} and "ratio": {label: {"median", "min", "max", "rounds"}}.
    """
    shapes = WORKLOADS[name]()
    runs = [(_label(b), "optax_ext", b) for b in backends] + [("optax", "optax", None)]
    steps, out = {}, {}
    for label, lib_name, backend in runs:
        steps[label], compile_s = _compiled_step(lib_name, shapes, clip, backend)
        out[label] = {"compile_seconds": compile_s, "rounds": []}
    labels = [label for label, _, _ in runs]
    for r in range(rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            out[label]["rounds"].append(median_seconds(steps[label], iters, warmup=1))
    for label in labels:
        out[label]["seconds"] = statistics.median(out[label]["rounds"])
    out["ratio"] = {}
    for label in labels[:-1]:
        ratios = [a / b for a, b in zip(out["optax"]["rounds"], out[label]["rounds"])]
        out["ratio"][label] = {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "rounds": ratios,
        }
    return out


def bench_jax(name, iters, rounds, clip, backends=(None,)):
    """Both libraries in a process of their own: XLA's CPU compiler can abort the process outright on a
    2,000-leaf step (LLVM runs out of mapped memory), which must not take the table with it."""
    cmd = [sys.executable, __file__, "--single", name, "--iters", str(iters), "--rounds", str(rounds)]
    if backends != (None,):
        cmd += ["--backends", *backends]
    if not clip:
        cmd.append("--no-clip")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = [line for line in proc.stderr.splitlines() if "LLVM compilation error" not in line][-3:]
    error = {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return {_label(b): dict(error) for b in backends} | {"optax": dict(error)}


def _torch_seconds(torch, shapes, iters, clip, **adamw_kwargs):
    """Median seconds of clip_grad_norm_ + AdamW.step() on CUDA, timed like the JAX rows (median_seconds:
    host wall clock around one step followed by torch.cuda.synchronize())."""
    ps = [torch.randn(s, device="cuda") * 0.02 for s in shapes]
    for p in ps:
        p.requires_grad_(True)
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, **adamw_kwargs)

    def step():
        if clip:
            torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True)
        opt.step()

    return median_seconds(step, iters, warmup=3, sync=torch_sync(torch))


def bench_torch(shapes, iters, clip):
    """torch.optim.AdamW fused and foreach on the same shapes; {} without torch or a CUDA device."""
    torch = cuda_torch()
    if torch is None:
        return {}
    out = {}
    for label, kw in (("torch_fused", {"fused": True}), ("torch_foreach", {"foreach": True})):
        try:
            out[label] = {"seconds": _torch_seconds(torch, shapes, iters, clip, **kw)}
        except Exception as e:  # one failing variant must not take the table with it
            out[label] = {"error": f"{type(e).__name__}: {e}"}
        torch.cuda.empty_cache()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = ["resnet50", "gpt2", "small2000"] if jax.default_backend() != "cpu" else ["resnet50", "gpt2", "small200"]
    ap.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=default)
    ap.add_argument(
        "--iters", type=int, default=10, help="steps per round and library (their median is the round's time)"
    )
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds (Optax / optax_ext ratio per round)")
    ap.add_argument("--no-clip", action="store_true", help="adamw alone (28 B/param) instead of clip+adamw")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("optimizer_step.json"))
    ap.add_argument(
        "--backends",
        nargs="+",
        choices=[b for b in ox.kernels.BACKENDS if b != "xla"],
        default=None,
        help="time ours once per kernel backend (e.g. mosaic_gpu triton); default: the platform's",
    )
    ap.add_argument("--single", metavar="WORKLOAD", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    clip = not args.no_clip
    backends = tuple(args.backends) if args.backends else (None,)
    if args.single:
        print(json.dumps(bench_jax_pair(args.single, args.iters, args.rounds, clip, backends)))
        return 0
    step_name = "clip+adamw" if clip else "adamw"
    bw = copy_bandwidth(args.iters)
    rows = []
    for name in args.workloads:
        shapes = WORKLOADS[name]()
        n = int(sum(np.prod(s) for s in shapes))
        res = bench_jax(name, args.iters, args.rounds, clip, backends)
        ratio = res.pop("ratio", None)
        res.update(bench_torch(shapes, args.iters, clip))
        bytes_moved = n * BYTES_PER_PARAM[step_name]
        for r in res.values():
            if "seconds" in r:
                r["gb_per_s"] = bytes_moved / r["seconds"] / 1e9
                r["share_of_copy_bw"] = r["gb_per_s"] / bw
        rows.append(
            {
                "workload": name,
                "leaves": len(shapes),
                "params": n,
                "step": step_name,
                "bytes_per_param": BYTES_PER_PARAM[step_name],
                "results": res,
                # Optax time / ours, per run of ours (one per backend): median and range over the rounds.
                "optax_over_ours": {k: r["median"] for k, r in (ratio or {}).items()},
                "optax_over_ours_range": {k: [r["min"], r["max"]] for k, r in (ratio or {}).items()},
            }
        )

    print(
        f"device: {versions()['device']} ({jax.default_backend()}, backend={ox.kernels.get_backend()}), "
        f"copy bandwidth {bw:.1f} GB/s, step: {step_name}"
    )
    header = (
        f"{'workload':10s} {'leaves':>6s} {'params':>11s} {'impl':14s} {'ms/step':>9s} {'GB/s':>8s} "
        f"{'%copy':>6s} {'compile s':>9s}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        for label, r in row["results"].items():
            lead = f"{row['workload']:10s} {row['leaves']:6d} {row['params']:11,d} {label:14s}"
            if "error" in r:
                print(f"{lead} failed: {r['error'][:120]}")
                continue
            print(
                f"{lead} {r['seconds'] * 1e3:9.2f} {r['gb_per_s']:8.1f} {100 * r['share_of_copy_bw']:5.0f}% "
                + (f"{r['compile_seconds']:9.2f}" if "compile_seconds" in r else f"{'':9s}")
            )
        for label, median in row["optax_over_ours"].items():
            lo, hi = row["optax_over_ours_range"][label]
            print(
                f"{'':10s} optax time / {label} time = {median:.3f} "
                f"(median of {args.rounds} interleaved rounds; {lo:.3f} to {hi:.3f})"
            )
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": versions(),
        "copy_bandwidth_gb_per_s": bw,
        "iters": args.iters,
        "rounds": args.rounds,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
