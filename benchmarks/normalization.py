"""Benchmark LayerNorm / RMSNorm / BatchNorm, forward and forward+backward, under jit.

Implementations compared on the same inputs:
  optax_ext   optax_ext.kernels.{layer_norm, rms_norm, batch_norm} (the backend get_backend() picks:
              Triton on a CUDA GPU, Mosaic on TPU, fused XLA on CPU)
  flax        flax.nnx.{LayerNorm, RMSNorm, BatchNorm} with use_fast_variance=False (same math)
  jnp         the plain-jnp references (*_reference), XLA autodiff for the backward
  torch       torch.nn.functional.layer_norm / rms_norm / batch_norm, only with a CUDA GPU and torch

Workloads: rows x features LayerNorm/RMSNorm (issue sizes with --full: 4096 x 1024..8192) and a
ResNet-sized NHWC BatchNorm (--full: 256 x 56 x 56 x 64), in bf16 and f32. The default run uses
smaller sizes so it finishes in under two minutes on a 2-core CPU.

Bytes moved are counted, not measured, as the passes over the activations an ideal implementation
needs (E = elements x itemsize): LayerNorm/RMSNorm forward read x, write y (2E); forward+backward
adds read x, read dy, write dx (5E). BatchNorm forward needs the statistics before normalising:
read x twice, write y (3E); forward+backward adds two reads of x and dy and a write of dx (8E).
Achieved GB/s is shown as a share of the measured copy bandwidth (y = x + 1 over 256 MiB).
Every implementation is timed the same way (`_common.median_seconds`): median host wall time of one
call followed by the library's synchronization (`jax.block_until_ready`, `torch.cuda.synchronize`).

    python benchmarks/normalization.py                # small sizes, table + benchmarks/normalization.json
    python benchmarks/normalization.py --full         # the issue's sizes
    python benchmarks/normalization.py --ops layer_norm --dtypes bfloat16 --iters 20 --out /tmp/n.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

# sibling module: run as a script
from _common import copy_bandwidth, cuda_torch, median_seconds, torch_sync, versions  # noqa: E402
from flax import nnx

from optax_ext.kernels import batch_norm as bn_k
from optax_ext.kernels import layer_norm as ln_k

PASSES = {
    ("layer_norm", "fwd"): 2,
    ("layer_norm", "fwd+bwd"): 5,
    ("rms_norm", "fwd"): 2,
    ("rms_norm", "fwd+bwd"): 5,
    ("batch_norm", "fwd"): 3,
    ("batch_norm", "fwd+bwd"): 8,
}


def workloads(full: bool):
    if full:
        rows = [("layer_norm", (4096, n)) for n in (1024, 2048, 4096, 8192)]
        rows += [("rms_norm", (4096, n)) for n in (1024, 2048, 4096, 8192)]
        return rows + [("batch_norm", (256, 56, 56, 64))]
    rows = [("layer_norm", (1024, n)) for n in (256, 1000)]
    rows += [("rms_norm", (1024, n)) for n in (256, 1000)]
    return rows + [("batch_norm", (16, 28, 28, 64))]


# ------------------------------------------------------------------------------- implementations
# Each maker returns f(x, scale, bias) -> y (BatchNorm: training mode, batch statistics).


def ours(op):
    if op == "layer_norm":
        return lambda x, s, b: ln_k.layer_norm(x, s, b, epsilon=1e-6)
    if op == "rms_norm":
        return lambda x, s, b: ln_k.rms_norm(x, s, epsilon=1e-6)
    return lambda x, s, b: bn_k.batch_norm(x, s, b, epsilon=1e-5)[0]


def reference(op):
    if op == "layer_norm":
        return lambda x, s, b: ln_k.layer_norm_reference(x, s, b, epsilon=1e-6)
    if op == "rms_norm":
        return lambda x, s, b: ln_k.rms_norm_reference(x, s, epsilon=1e-6)
    return lambda x, s, b: bn_k.batch_norm_reference(x, s, b, epsilon=1e-5)[0]


def flax_layer(op, n, dtype):
    if op == "layer_norm":
        layer = nnx.LayerNorm(n, epsilon=1e-6, dtype=dtype, use_fast_variance=False, rngs=nnx.Rngs(0))
    elif op == "rms_norm":
        layer = nnx.RMSNorm(n, epsilon=1e-6, dtype=dtype, use_fast_variance=False, rngs=nnx.Rngs(0))
    else:
        layer = nnx.BatchNorm(
            n, epsilon=1e-5, dtype=dtype, use_running_average=False, use_fast_variance=False, rngs=nnx.Rngs(0)
        )
    graphdef, state = nnx.split(layer)

    def f(x, s, b):
        layer = nnx.merge(graphdef, state, copy=True)  # fresh Variables at this trace level
        layer.scale[...] = s
        if getattr(layer, "bias", None) is not None:
            layer.bias[...] = b
        return layer(x)

    return f


def torch_fn(op, n, dtype_name):
    """(f(x, scale, bias) -> y, torch dtype, the inputs f differentiates) for torch on CUDA, or None."""
    torch = cuda_torch()
    if torch is None:
        return None
    import torch.nn.functional as F

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    if op == "layer_norm":
        return (lambda x, s, b: F.layer_norm(x, (n,), s, b, eps=1e-6)), tdtype, "xsb"
    if op == "rms_norm":
        if not hasattr(F, "rms_norm"):  # torch < 2.4
            return None
        # RMSNorm has no bias: b is not an input of the graph, so it is not differentiated (torch.autograd.grad
        # raises on an unused input unless allow_unused=True).
        return (lambda x, s, b: F.rms_norm(x, (n,), s, eps=1e-6)), tdtype, "xs"
    # NHWC input as channels_last NCHW.
    return (lambda x, s, b: F.batch_norm(x, None, None, s, b, training=True, eps=1e-5)), tdtype, "xsb"


# ------------------------------------------------------------------------------- timing


def jax_modes(f):
    fwd = jax.jit(f)

    def fwd_bwd(x, s, b, dy):
        y, vjp = jax.vjp(f, x, s, b)
        return y, vjp(dy)

    return {"fwd": lambda x, s, b, dy: fwd(x, s, b), "fwd+bwd": jax.jit(fwd_bwd)}


def bench_torch(op, shape, dtype_name, iters):
    """{mode: seconds} for torch on CUDA, timed like the JAX rows (median_seconds: host wall clock around
    one call followed by torch.cuda.synchronize()); {} without torch or a CUDA device."""
    made = torch_fn(op, shape[-1], dtype_name)
    if made is None:
        return {}
    import torch

    fn, tdtype, wrt_names = made
    n = shape[-1]
    if op == "batch_norm":
        x = torch.randn(shape[0], shape[3], shape[1], shape[2], device="cuda", dtype=tdtype)
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(*shape, device="cuda", dtype=tdtype)
    s = torch.ones(n, device="cuda", dtype=tdtype, requires_grad=True)
    b = torch.zeros(n, device="cuda", dtype=tdtype, requires_grad=True)
    dy = torch.randn_like(x)
    x.requires_grad_(True)
    wrt = tuple({"x": x, "s": s, "b": b}[k] for k in wrt_names)

    def fwd():
        with torch.no_grad():
            return fn(x, s, b)

    def fwd_bwd():
        with torch.enable_grad():
            y = fn(x, s, b)
            return y, torch.autograd.grad(y, wrt, dy)

    sync = torch_sync(torch)
    return {
        "fwd": median_seconds(fwd, iters, warmup=3, sync=sync),
        "fwd+bwd": median_seconds(fwd_bwd, iters, warmup=3, sync=sync),
    }


def bench(op, shape, dtype_name, iters):
    dtype = jnp.dtype(dtype_name)
    k = jax.random.split(jax.random.key(0), 4)
    n = shape[-1]
    x = jax.random.normal(k[0], shape, dtype)
    s = (1.0 + 0.1 * jax.random.normal(k[1], (n,))).astype(dtype)
    b = (0.1 * jax.random.normal(k[2], (n,))).astype(dtype)
    dy = jax.random.normal(k[3], shape, dtype)
    impls = {"optax_ext": ours(op), "flax": flax_layer(op, n, dtype), "jnp": reference(op)}
    results = {}
    for label, f in impls.items():
        for mode, g in jax_modes(f).items():
            results.setdefault(mode, {})[label] = median_seconds(lambda g=g: g(x, s, b, dy), iters)
    for mode, t in bench_torch(op, shape, dtype_name, iters).items():
        results[mode]["torch"] = t
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the issue's sizes (4096 x 1024..8192, 256x56x56x64)")
    ap.add_argument(
        "--ops",
        nargs="+",
        choices=["layer_norm", "rms_norm", "batch_norm"],
        default=["layer_norm", "rms_norm", "batch_norm"],
    )
    ap.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32"], default=["bfloat16", "float32"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("normalization.json"))
    args = ap.parse_args(argv)

    bw = copy_bandwidth(args.iters)
    rows = []
    for op, shape in workloads(args.full):
        if op not in args.ops:
            continue
        for dtype_name in args.dtypes:
            res = bench(op, shape, dtype_name, args.iters)
            elems = 1
            for d in shape:
                elems *= d
            itemsize = jnp.dtype(dtype_name).itemsize
            for mode, by_impl in res.items():
                bytes_moved = PASSES[(op, mode)] * elems * itemsize
                rows.append(
                    {
                        "op": op,
                        "shape": list(shape),
                        "dtype": dtype_name,
                        "mode": mode,
                        "bytes_counted": bytes_moved,
                        "results": {
                            label: {
                                "seconds": t,
                                "gb_per_s": bytes_moved / t / 1e9,
                                "share_of_copy_bw": bytes_moved / t / 1e9 / bw,
                            }
                            for label, t in by_impl.items()
                        },
                    }
                )

    info = versions()
    print(
        f"device: {info['device']} ({info['platform']}, optax_ext backend={info['backend']}), "
        f"copy bandwidth {bw:.1f} GB/s"
    )
    labels = ["optax_ext", "flax", "jnp", "torch"]
    header = f"{'op':10s} {'shape':18s} {'dtype':8s} {'mode':7s} " + " ".join(f"{lab + ' ms':>12s}" for lab in labels)
    header += f" {'ours GB/s':>9s} {'%copy':>6s} {'flax/ours':>9s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        res = r["results"]
        cells = " ".join(f"{res[lab]['seconds'] * 1e3:12.3f}" if lab in res else f"{'-':>12s}" for lab in labels)
        o = res["optax_ext"]
        print(
            f"{r['op']:10s} {'x'.join(map(str, r['shape'])):18s} {r['dtype']:8s} {r['mode']:7s} {cells} "
            f"{o['gb_per_s']:9.1f} {100 * o['share_of_copy_bw']:5.0f}% "
            f"{res['flax']['seconds'] / o['seconds']:9.2f}"
        )
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": info,
        "copy_bandwidth_gb_per_s": bw,
        "iters": args.iters,
        "full": args.full,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
