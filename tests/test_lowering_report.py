"""benchmarks/lowering_report.py: its StableHLO parser on a hand-written module, and a --smoke run."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def report():
    # The script imports its siblings (_common, optimizer_step) by name, as a script run does. Appended,
    # not prepended, to sys.path: benchmarks/augment.py must not shadow anything installed.
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("lowering_report", BENCHMARKS / "lowering_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Two Triton calls in @main (one with an embedded IR string holding a decoy signature), one more in
# @helper called twice, a non-Triton custom call, and layout ops with known result sizes.
SNIPPET = "\n".join(
    [
        "module @jit_step attributes {mhlo.num_partitions = 1 : i32} {",
        "  func.func public @main(%arg0: tensor<1000xf32> {tf.aliasing_output = 0 : i32}, "
        "%arg1: tensor<1000xbf16> {tf.aliasing_output = 1 : i32}, %arg2: tensor<16xf32>) "
        "-> (tensor<1000xf32>, tensor<1000xbf16>, tensor<f32>) {",
        "    %c = stablehlo.constant dense<0.0> : tensor<f32>",
        r'    %0:2 = stablehlo.custom_call @__gpu$xla.gpu.triton(%arg0, %arg1, %arg2) {backend_config = "", '
        r'ir = "ML\EFR : (tensor<99999xf32>) -> tensor<99999xf32>\00", operand_layouts = [dense<0> : tensor<1xindex>]} '
        ": (tensor<1000xf32>, tensor<1000xbf16>, tensor<16xf32>) -> (tensor<1000xf32>, tensor<1000xbf16>)",
        '    %1 = stablehlo.custom_call @__gpu$xla.gpu.triton(%0#0) {backend_config = "", ir = "x"} '
        ": (tensor<1000xf32>) -> tensor<2x3xf32>",
        '    %2 = stablehlo.custom_call @Sharding(%1) {backend_config = ""} : (tensor<2x3xf32>) -> tensor<2x3xf32>',
        "    %3 = stablehlo.concatenate %arg0, %arg0, dim = 0 : (tensor<1000xf32>, tensor<1000xf32>) -> tensor<2000xf32>",  # noqa: E501 (one StableHLO line)
        "    %4 = stablehlo.slice %3 [0:700] : (tensor<2000xf32>) -> tensor<700xf32>",
        '    %5 = "stablehlo.gather"(%3, %idx) <{dimension_numbers = #stablehlo.gather<collapsed_slice_dims = [0], '
        "start_index_map = [0], index_vector_dim = 1>, slice_sizes = array<i64: 1>}> "
        ": (tensor<2000xf32>, tensor<13x1xi32>) -> tensor<13xf32>",
        "    %6 = stablehlo.add %4, %4 : tensor<700xf32>",
        "    %7 = call @helper(%arg2) : (tensor<16xf32>) -> tensor<f32>",
        "    %8 = func.call @helper(%arg2) : (tensor<16xf32>) -> tensor<f32>",
        "    return %0#0, %0#1, %7 : tensor<1000xf32>, tensor<1000xbf16>, tensor<f32>",
        "  }",
        "  func.func private @helper(%arg0: tensor<16xf32>) -> tensor<f32> {",
        '    %0 = stablehlo.custom_call @__gpu$xla.gpu.triton(%arg0) {ir = "y"} : (tensor<16xf32>) -> tensor<1xf32>',
        "    %1 = stablehlo.pad %0, %c, low = [0], high = [7], interior = [0] : (tensor<1xf32>, tensor<f32>) "
        "-> tensor<8xf32>",
        "    %2 = stablehlo.reshape %1 : (tensor<8xf32>) -> tensor<2x4xf32>",
        "    return %2 : tensor<f32>",
        "  }",
        "}",
    ]
)


def test_parser_counts_kernels_bytes_and_copies(report):
    stats = report.analyze_stablehlo(SNIPPET)
    assert stats["triton_kernels"] == 2 + 2  # two in @main, one in @helper called twice
    first = 1000 * 4 + 1000 * 2 + 16 * 4 + 1000 * 4 + 1000 * 2  # operands + results, f32 and bf16
    second = 1000 * 4 + 6 * 4
    helper = 16 * 4 + 1 * 4
    assert stats["kernel_bytes"] == first + second + 2 * helper
    assert stats["copied_elements_by_op"]["concatenate"] == 2000
    assert stats["copied_elements_by_op"]["slice"] == 700
    assert stats["copied_elements_by_op"]["gather"] == 13
    assert stats["copied_elements_by_op"]["pad"] == 2 * 8
    assert stats["copied_elements"] == 2000 + 700 + 13 + 16
    # Outside kernels: Sharding, concatenate, slice, gather, add in @main; pad, reshape twice in @helper.
    assert stats["xla_ops"] == 5 + 2 * 2
    assert stats["other_custom_calls"] == 1
    assert stats["aliased_inputs"] == 2


def test_tensor_types(report):
    assert report.tensor_elements_and_bytes("4096x100xf32") == (409600, 1638400)
    assert report.tensor_elements_and_bytes("f32") == (1, 4)
    assert report.tensor_elements_and_bytes("3xbf16") == (3, 6)
    assert report.tensor_elements_and_bytes("8xi1") == (8, 8)
    assert report.tensor_elements_and_bytes("2xcomplex<f32>") == (2, 16)
    assert report.tensor_elements_and_bytes("0x5xui8") == (0, 0)
    with pytest.raises(ValueError):
        report.tensor_elements_and_bytes("?x4xf32")


def test_a_triton_call_without_signature_is_an_error(report):
    text = (
        "func.func public @main(%arg0: tensor<4xf32>) -> tensor<4xf32> {\n"
        '  %0 = stablehlo.custom_call @__gpu$xla.gpu.triton(%arg0) {ir = "x"}\n}\n'
    )
    with pytest.raises(ValueError, match="without a type signature"):
        report.analyze_stablehlo(text)


def test_parser_counts_every_backends_kernels(report):
    text = "\n".join(
        [
            "func.func public @main(%arg0: tensor<8xf32>) -> tensor<8xf32> {",
            "  %0 = stablehlo.custom_call @mosaic_gpu_v2(%arg0) {} : (tensor<8xf32>) -> tensor<8xf32>",
            "  %1 = stablehlo.custom_call @tpu_custom_call(%0) {} : (tensor<8xf32>) -> tensor<8xbf16>",
            '  %2 = stablehlo.custom_call @__gpu$xla.gpu.triton(%1) {ir = ""} : (tensor<8xbf16>) -> tensor<8xf32>',
            "  return %2 : tensor<8xf32>",
            "}",
        ]
    )
    stats = report.analyze_stablehlo(text)
    assert stats["kernels_by_backend"] == {"triton": 1, "mosaic_gpu": 1, "mosaic": 1}
    assert stats["kernels"] == 3 and stats["triton_kernels"] == 1 and stats["other_custom_calls"] == 0
    assert stats["kernel_bytes"] == (32 + 32) + (32 + 16) + (16 + 32)


def test_smoke_run_writes_table_and_json(report, tmp_path, capsys):
    from optax_ext.kernels.backend import mosaic_gpu_available

    out = tmp_path / "lowering.json"
    optimizers = ["clip+adamw", "lamb", "adamw-int8"]
    assert report.main(["--smoke", "--optimizers", *optimizers, "--compiled", "no", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| tree | optimizer | backend |" in printed and "kernel B/param" in printed
    data = json.loads(out.read_text())
    backends = ["triton", "mosaic_gpu", "mosaic"] if mosaic_gpu_available() else ["triton", "mosaic"]
    assert data["backends"] == {b: report.BACKEND_PLATFORMS[b] for b in backends} and data["smoke"]
    rows = data["rows"]
    assert [(r["optimizer"], r["backend"]) for r in rows] == [(o, b) for o in optimizers for b in backends]
    for r in rows:
        assert r["tree"] == "tiny" and "error" not in r, r
        assert r["kernels"] == r["kernels_by_backend"][r["backend"]], r  # no other backend's kernel
        assert r["optax_trace_lower_seconds"] is None or r["optax_trace_lower_seconds"] > 0, r
        for key in (
            "leaves",
            "params",
            "kernels",
            "kernel_bytes_per_param",
            "floor_bytes_per_param",
            "kernel_over_floor",
            "copied_elements_per_param",
            "copied_elements_by_op",
            "xla_ops",
            "aliased_inputs",
            "trace_lower_seconds",
        ):
            assert key in r, (key, r)
        assert r["kernels"] >= 1, r
        # Every parameter goes through a kernel that at least reads p and g and writes p.
        if r["optimizer"] != "adamw-int8" or r["backend"] == "triton":  # 8-bit states: Triton's kernels only
            assert r["kernel_bytes_per_param"] >= 12, r
        assert r["floor_bytes_per_param"] == report.FLOOR_BYTES_PER_PARAM[r["optimizer"]]
        # Params and state were donated, and the lowering aliased them: at least the params.
        assert r["aliased_inputs"] >= r["leaves"], r


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "mosaic_gpu"])
def test_compiled_columns_for_each_gpu_backend(report, backend):
    from optax_ext.kernels import aot
    from optax_ext.kernels.backend import mosaic_gpu_available

    if not aot.available():
        if os.environ.get("OPTAX_EXT_REQUIRE_GPU_AOT") == "1":  # CI's newest stack: fail, do not skip
            aot.target_mesh("h100")  # raises, saying what is missing
        pytest.skip("compiling for an H100 needs optax_ext[gpu-aot]")
    if backend == "mosaic_gpu" and not mosaic_gpu_available():
        pytest.skip("Mosaic GPU kernels need jax >= 0.12")
    r = report.report_one("tiny", "clip+adamw", compiled=True, backend=backend)
    # Our kernels are in the compiled program, every donated buffer updated in place; Optax's too.
    assert r["h100"]["custom_calls"] == r["kernels"] >= 2, r["h100"]
    assert r["h100_copies"] == 0 and r["h100_optax_copies"] == 0, r
    assert r["h100_launches"] >= r["kernels"], r
