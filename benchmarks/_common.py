"""What every benchmark script shares: one timing method, the device's copy bandwidth, the versions it ran with."""

from __future__ import annotations

import platform
import statistics
import time

import jax
import jax.numpy as jnp


def median_seconds(call, iters: int, warmup: int = 2, sync=None) -> float:
    """Median host wall time of one synchronized `call()` over `iters` runs, after `warmup` runs.

    The one timing method for every library, so their numbers compare like for like: the clock is
    read on the host before `call()` and after `sync(result)` returns, i.e. dispatch + device time
    of one step. `sync` defaults to `jax.block_until_ready`; torch passes `torch_sync(torch)`.
    The warm-up runs end synchronized, so no earlier work leaks into the first timed run.
    """
    sync = jax.block_until_ready if sync is None else sync
    for _ in range(warmup):
        sync(call())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_torch():
    """`torch` when it is installed and sees a CUDA device, else None (imported lazily: optional)."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def torch_sync(torch):
    """The `sync` for `median_seconds` on torch: wait for all queued CUDA work (the result is ignored)."""

    def sync(_result):
        torch.cuda.synchronize()

    return sync


def copy_bandwidth(iters: int) -> float:
    """Measured copy bandwidth in GB/s: y = x + 1 over 256 MiB of f32 (reads and writes it once)."""
    x = jnp.zeros((64 * 1024 * 1024,), jnp.float32)
    nbytes = x.nbytes
    f = jax.jit(lambda x: x + 1.0, donate_argnums=0)  # donated: no fresh 256 MiB allocation per call
    x = f(f(x))
    times = []
    for _ in range(max(iters, 5)):
        t0 = time.perf_counter()
        x = f(x)
        x.block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def versions() -> dict:
    """Library versions, device and backend, for the JSON record of a run."""
    import flax
    import optax

    import optax_ext

    info = {
        "jax": jax.__version__,
        "optax": optax.__version__,
        "flax": flax.__version__,
        "optax_ext": optax_ext.__version__,
        "python": platform.python_version(),
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "backend": optax_ext.kernels.get_backend(),
        "machine": platform.machine(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info
