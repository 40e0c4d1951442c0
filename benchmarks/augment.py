"""Throughput of optax_ext.augment pipelines: images/s for a batch of
32x32x3 float images, jitted, on the default JAX device (CPU in CI).

    python benchmarks/augment.py [--batch 256] [--iters 20] [--out PATH]

Prints a table and writes JSON (default benchmarks/augment.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from functools import partial

import jax

import optax_ext.augment as A


def pipelines():
    return {
        "rand_augment(N=2, M=9)": partial(A.rand_augment, num_ops=2, magnitude=9),
        "crop(pad 4)+flip+color_jitter(0.4,0.4,0.4,0.1)": A.compose(
            [
                partial(A.random_crop, size=32, padding=4),
                A.random_flip,
                partial(A.color_jitter, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
            ]
        ),
        "crop(pad 4)+flip": A.compose([partial(A.random_crop, size=32, padding=4), A.random_flip]),
        "augmix(severity=3, width=3)": partial(A.augmix, severity=3),
    }


def bench(op, images, key, iters):
    fn = jax.jit(A.batched(op))
    t0 = time.perf_counter()
    fn(key, images).block_until_ready()  # compile + first run
    compile_s = time.perf_counter() - t0
    keys = jax.random.split(key, iters)
    times = []
    for k in keys:
        t0 = time.perf_counter()
        fn(k, images).block_until_ready()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {"compile_s": compile_s, "median_s": median, "min_s": times[0], "images_per_s": images.shape[0] / median}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--only", default=None, help="run only pipelines whose name contains this")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "augment.json"))
    args = parser.parse_args(argv)

    key = jax.random.key(0)
    images = jax.random.uniform(key, (args.batch, args.size, args.size, 3))
    rows = []
    for name, op in pipelines().items():
        if args.only and args.only not in name:
            continue
        r = bench(op, images, key, args.iters)
        rows.append({"pipeline": name, **r})

    dev = jax.devices()[0]
    print(
        f"batch {args.batch} x {args.size}x{args.size}x3 float32, "
        f"{dev.platform} ({dev.device_kind}), jax {jax.__version__}, "
        f"{args.iters} timed runs"
    )
    print(f"{'pipeline':<48} {'images/s':>10} {'ms/batch':>9} {'compile s':>9}")
    for r in rows:
        print(f"{r['pipeline']:<48} {r['images_per_s']:>10.0f} {1e3 * r['median_s']:>9.2f} {r['compile_s']:>9.2f}")
    result = {
        "benchmark": "augment",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "device": f"{dev.platform}: {dev.device_kind}",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "batch": args.batch,
        "image": [args.size, args.size, 3],
        "dtype": "float32",
        "iters": args.iters,
        "results": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
