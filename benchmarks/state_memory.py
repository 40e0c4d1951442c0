"""Low-memory optimizer states: AdamW's state bytes per parameter, step time and digits accuracy.

Configurations (all `optax_ext.adamw(1e-3, weight_decay=0.01)`, step `tx.update_and_apply` jitted with
params and state donated, as in `optimizer_step.py`):
  f32          f32 params, f32 moments (the default)
  bf16         f32 params, moments stored as bfloat16 (mu_dtype = nu_dtype = jnp.bfloat16)
  int8         f32 params, 8-bit blockwise moments (mu_dtype = nu_dtype = optax_ext.int8_blockwise:
               1 byte per element + an f32 absmax per 256; leaves under 4,096 elements stay f32)
  bf16p+kahan  bf16 params and grads, f32 moments, kahan_sum=True (a bf16 compensation buffer)

Per parameter tree (`optimizer_step.py`'s resnet50, gpt2, ...): the optimizer state's bytes per
parameter, counted from `jax.eval_shape(tx.init, params)` (nothing allocated), params + state bytes,
and the median step time (`_common.median_seconds`: host wall clock around one synchronized step,
after warm-up). Each tree runs in its own process; in it the configurations are timed in `--rounds`
interleaved rounds of `--iters` steps (f32, bf16, int8, kahan, f32, ...), and a configuration's time
is the median of its rounds' medians, so drift in the load of a shared machine hits every
configuration alike. Ratios are against f32 from the same process. `--isolate` runs each
configuration in its own process instead (less memory, no interleaving).

Digits: the demo (`optax_ext.train.train`, AdamW, default schedule) with each configuration's
storage, test accuracy over `--digits-seeds` seeds.

    python benchmarks/state_memory.py      # resnet50 + gpt2: table + benchmarks/results/state_memory_cpu.json
    python benchmarks/state_memory.py --trees small200 --iters 3 --rounds 1 --digits-seeds 1 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# sibling modules: run as a script
from _common import median_seconds, versions
from optimizer_step import WORKLOADS, make_tree, ours_step

import optax_ext as ox

CONFIGS = {
    # name: (params dtype, adamw keyword arguments, the demo's options for the same storage)
    "f32": (jnp.float32, {}, []),
    "bf16": (jnp.float32, {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16}, ["--state-dtype", "bfloat16"]),
    "int8": (jnp.float32, {"mu_dtype": ox.int8_blockwise, "nu_dtype": ox.int8_blockwise}, ["--state-dtype", "int8"]),
    "bf16p+kahan": (
        jnp.bfloat16,
        {"mu_dtype": jnp.float32, "nu_dtype": jnp.float32, "kahan_sum": True},
        ["--param-dtype", "bfloat16", "--state-dtype", "float32", "--kahan-sum"],
    ),
}
DESCRIPTION = {
    "f32": "f32 states",
    "bf16": "bf16 states",
    "int8": "int8 states",
    "bf16p+kahan": "bf16 params + f32 states + kahan_sum",
}
BASELINE = "f32"


def optimizer(config: str):
    return ox.adamw(1e-3, weight_decay=0.01, **CONFIGS[config][1])


def tree_bytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) in a pytree; a QuantizedArray counts codes and absmax."""
    return int(sum(int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def counted_bytes(tree_name: str, config: str) -> dict:
    """State and params bytes per parameter, from shapes only (jax.eval_shape: nothing allocated)."""
    shapes = WORKLOADS[tree_name]()
    n = int(sum(np.prod(s, dtype=np.int64) for s in shapes))
    dtype = CONFIGS[config][0]
    params = {f"p{i:04d}": jax.ShapeDtypeStruct(s, dtype) for i, s in enumerate(shapes)}
    state = jax.eval_shape(optimizer(config).init, params)
    state_b, params_b = tree_bytes(state), tree_bytes(params)
    return {
        "params": n,
        "leaves": len(shapes),
        "state_bytes": state_b,
        "state_bytes_per_param": state_b / n,
        "params_plus_state_bytes_per_param": (state_b + params_b) / n,
    }


def _max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def time_configs(tree_name: str, configs: list[str], iters: int, rounds: int) -> dict:
    """In this process: every configuration's compiled step on the tree, timed in interleaved rounds."""
    shapes = WORKLOADS[tree_name]()
    runs, out = {}, {}
    for config in configs:
        try:
            dtype = CONFIGS[config][0]
            tx = optimizer(config)
            params, grads = make_tree(shapes, 0, dtype), make_tree(shapes, 1, dtype)
            state = tx.init(params)
            t0 = time.perf_counter()
            compiled = ours_step(tx).lower(params, state, grads).compile()
            out[config] = {"compile_seconds": time.perf_counter() - t0, "round_seconds": []}
            runs[config] = (compiled, [(params, state)], grads)
        except Exception as e:  # one failing configuration must not take the table with it
            out[config] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        gc.collect()
    for _ in range(rounds):
        for config, (compiled, carry, grads) in runs.items():

            def step(compiled=compiled, carry=carry, grads=grads):  # donated: feed each call the last outputs
                carry[0] = compiled(*carry[0], grads)
                return carry[0]

            out[config]["round_seconds"].append(median_seconds(step, iters))
    for config in runs:
        out[config]["seconds"] = statistics.median(out[config]["round_seconds"])
    out["_max_rss_gib"] = _max_rss_gib()
    return out


def _run_single(tree_name: str, configs: list[str], iters: int, rounds: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--single",
        tree_name,
        "--configs",
        *configs,
        "--iters",
        str(iters),
        "--rounds",
        str(rounds),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {c: {"error": f"exit {proc.returncode}: {tail}"} for c in configs}


def bench_tree(tree_name: str, configs: list[str], iters: int, rounds: int, isolate: bool) -> dict:
    if isolate:
        timed, rss = {}, []
        for config in configs:
            res = _run_single(tree_name, [config], iters, rounds)
            rss.append(res.pop("_max_rss_gib", float("nan")))
            timed.update(res)
        timed["_max_rss_gib"] = max(rss)
    else:
        timed = _run_single(tree_name, configs, iters, rounds)
    shapes = WORKLOADS[tree_name]()
    row = {
        "tree": tree_name,
        "params": int(sum(np.prod(s, dtype=np.int64) for s in shapes)),
        "leaves": len(shapes),
        "max_rss_gib": timed.pop("_max_rss_gib", None),
        "configs": {},
    }
    for config in configs:
        try:
            counted = counted_bytes(tree_name, config)
        except Exception as e:
            counted = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        row["configs"][config] = {**counted, **timed.get(config, {})}
    base = row["configs"].get(BASELINE, {})
    for r in row["configs"].values():
        if "state_bytes" in r and "state_bytes" in base:
            r["state_ratio_vs_f32"] = r["state_bytes"] / base["state_bytes"]
            r["params_plus_state_ratio_vs_f32"] = (
                r["params_plus_state_bytes_per_param"] / base["params_plus_state_bytes_per_param"]
            )
        if "seconds" in r and "seconds" in base:
            r["time_ratio_vs_f32"] = r["seconds"] / base["seconds"]
    return row


def digits_accuracy(configs: list[str], seeds: int, epochs: int) -> dict:
    """The demo's test accuracy with each configuration's storage (AdamW, its default schedule)."""
    from optax_ext import train as demo

    out = {}
    for config in configs:
        accs, state_bpp = [], None
        try:
            for seed in range(seeds):
                err = io.StringIO()
                try:
                    with contextlib.redirect_stderr(err):
                        args = demo.parse_args(
                            [
                                "--optimizer",
                                "adamw",
                                "--epochs",
                                str(epochs),
                                "--seed",
                                str(seed),
                                "--quiet",
                                "--json",
                                "--plot",
                                "",
                                *CONFIGS[config][2],
                            ]
                        )
                except SystemExit:  # the demo's one-line error on options that cannot work
                    raise ValueError([ln for ln in err.getvalue().splitlines() if "error:" in ln][-1]) from None
                result = demo.train(args)
                accs.append(result["test_accuracy"])
                state_bpp = result.get("state_bytes_per_param")
            out[config] = {
                "test_accuracy": accs,
                "mean": float(np.mean(accs)),
                "min": float(np.min(accs)),
                "state_bytes_per_param": state_bpp,
                "options": CONFIGS[config][2],
            }
        except Exception as e:  # one failing configuration must not take the table with it
            out[config] = {
                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                "options": CONFIGS[config][2],
            }
    return out


def _fmt_ratio(r, key):
    return f"{r[key]:.2f}x" if key in r else "-"


def print_tables(report: dict) -> None:
    v = report["versions"]
    print(
        f"device: {v['device']} ({v['platform']}, backend={v['backend']}), jax {v['jax']}, optax {v['optax']}; "
        f"median of {report['rounds']} rounds x {report['iters']} steps"
    )
    header = (
        f"{'tree':9s} {'config':12s} {'state B/p':>9s} {'p+s B/p':>8s} {'state/f32':>9s} {'ms/step':>9s} "
        f"{'time/f32':>8s} {'compile s':>9s}"
    )
    print(header)
    print("-" * len(header))
    for row in report["rows"]:
        for config, r in row["configs"].items():
            lead = f"{row['tree']:9s} {config:12s}"
            if "state_bytes_per_param" not in r:
                print(f"{lead} failed: {r.get('error', '?')[:140]}")
                continue
            timing = (
                f"{r['seconds'] * 1e3:9.2f} {_fmt_ratio(r, 'time_ratio_vs_f32'):>8s} {r['compile_seconds']:9.2f}"
                if "seconds" in r
                else f"  step failed: {r.get('error', '?')[:100]}"
            )
            print(
                f"{lead} {r['state_bytes_per_param']:9.3f} {r['params_plus_state_bytes_per_param']:8.3f} "
                f"{_fmt_ratio(r, 'state_ratio_vs_f32'):>9s} {timing}"
            )
        print(
            f"{'':9s} ({row['params']:,} params, {row['leaves']} leaves; peak RSS {row['max_rss_gib']:.1f} GiB)"
            if row.get("max_rss_gib") is not None
            else ""
        )
    if report.get("digits"):
        d = report["digits_settings"]
        print(f"\ndigits demo, adamw, {d['epochs']} epochs, seeds 0..{d['seeds'] - 1}: test accuracy")
        for config, r in report["digits"].items():
            if "mean" in r:
                accs = ", ".join(f"{a:.2%}" for a in r["test_accuracy"])
                print(
                    f"  {config:12s} mean {r['mean']:.2%}  min {r['min']:.2%}  ({accs}; state "
                    f"{r['state_bytes_per_param']:.2f} B/param)"
                )
            else:
                print(f"  {config:12s} failed: {r['error'][:140]}")


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--trees",
        nargs="+",
        choices=sorted(WORKLOADS),
        default=["resnet50", "gpt2"],
        help="parameter trees of optimizer_step.py",
    )
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--iters", type=int, default=5, help="timed steps per round (after 2 warm-up steps)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    ap.add_argument("--isolate", action="store_true", help="each configuration in its own process (less memory)")
    ap.add_argument("--digits-seeds", type=int, default=3, help="demo runs per configuration (0: skip)")
    ap.add_argument("--digits-epochs", type=int, default=15, help="the demo's epochs")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "state_memory_cpu.json")
    ap.add_argument("--single", metavar="TREE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if BASELINE not in args.configs:
        args.configs.insert(0, BASELINE)  # the ratios' reference

    if args.single:
        print(json.dumps(time_configs(args.single, args.configs, args.iters, args.rounds)))
        return 0
    rows = [bench_tree(t, args.configs, args.iters, args.rounds, args.isolate) for t in args.trees]
    digits = digits_accuracy(args.configs, args.digits_seeds, args.digits_epochs) if args.digits_seeds > 0 else {}
    command = ["python", "benchmarks/state_memory.py", *(argv if argv is not None else sys.argv[1:])]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": versions(),
        "command": " ".join(command),
        "iters": args.iters,
        "rounds": args.rounds,
        "isolate": args.isolate,
        "descriptions": DESCRIPTION,
        "rows": rows,
        "digits": digits,
        "digits_settings": {"seeds": args.digits_seeds, "epochs": args.digits_epochs},
    }
    print_tables(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
