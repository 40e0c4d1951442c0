"""Every kernel under JAX sharding: 8 fake CPU devices, Auto and Explicit mesh axes, and 2 processes.

The device count is fixed when jax starts, so each check runs in its own process
(`tests/sharded_checks.py <check> <mode>`, `tests/multiprocess_check.py`); see those files for what
each one asserts: kernels on per-device shards only (no global sharded shape in the partitioned
program, no all-gather), results equal to the unsharded run, state sharding kept by init, SyncBN,
lowering for cuda and tpu, the data-parallel demo.
"""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CHECKS = [
    "fused_step",
    "lamb_step",
    "zero1_and_fsdp",
    "init_keeps_sharding",
    "layer_norm",
    "layer_norm_feature_axis",
    "batch_norm",
    "lowers_for_accelerators",
    "int8_states",
    "int8_fsdp_per_shard",
]


def _run(args, timeout=600):
    out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=HERE)
    assert out.returncode == 0 and "OK" in out.stdout, (out.stdout[-2000:], out.stderr[-4000:])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "explicit"])
@pytest.mark.parametrize("check", CHECKS)
def test_on_eight_devices(check, mode):
    _run([HERE / "sharded_checks.py", check, mode])


@pytest.mark.slow
def test_batch_norm_on_xla_backend_too():
    _run([HERE / "sharded_checks.py", "batch_norm_xla", "auto"])


@pytest.mark.slow
def test_demo_data_parallel_on_eight_devices():
    _run([HERE / "sharded_checks.py", "demo", "explicit"])


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_two_processes_train_one_sharded_model(backend):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "multiprocess_check.py"), str(i), str(port), backend],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=HERE,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for i, (p, (stdout, stderr)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {i}" in stdout, (stdout[-2000:], stderr[-4000:])
