"""benchmarks/state_memory.py: its counted state bytes on the real trees (shapes only) and one timing pass on a
tiny tree."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    # The script imports its siblings (_common, optimizer_step) by name, as a script run does; appended to
    # sys.path, not prepended (benchmarks/augment.py must not shadow anything installed).
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("state_memory", BENCHMARKS / "state_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tree", ["resnet50", "gpt2"])
def test_counted_state_bytes_per_param(bench, tree):
    f32 = bench.counted_bytes(tree, "f32")
    assert f32["state_bytes_per_param"] == pytest.approx(8.0, abs=1e-6)  # mu, nu (+ one int32 count)
    assert f32["params_plus_state_bytes_per_param"] == pytest.approx(12.0, abs=1e-6)
    int8 = bench.counted_bytes(tree, "int8")
    # 1 B per element per moment + 4 B per 256; leaves under 4,096 elements (biases, norms) stay f32.
    assert 2 * (1 + 4 / 256) <= int8["state_bytes_per_param"] < 2.1, int8
    kahan = bench.counted_bytes(tree, "bf16p+kahan")
    assert kahan["state_bytes_per_param"] == pytest.approx(10.0, abs=1e-6)  # f32 mu, nu + bf16 compensation
    assert kahan["params_plus_state_bytes_per_param"] == pytest.approx(12.0, abs=1e-6)


def test_time_configs_on_a_tiny_tree(bench, monkeypatch):
    monkeypatch.setitem(bench.WORKLOADS, "tiny", lambda: [(64, 128), (128,)])
    out = bench.time_configs("tiny", ["f32", "int8", "bf16p+kahan"], iters=1, rounds=2)
    for config in ("f32", "int8", "bf16p+kahan"):
        assert out[config]["seconds"] > 0 and len(out[config]["round_seconds"]) == 2, out[config]
    assert out["_max_rss_gib"] > 0
