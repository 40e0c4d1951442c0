"""The Mosaic GPU backend: whole steps in Mosaic GPU's own interpreter against XLA, and lowered for
CUDA. Its kernels against their reference on the ragged tree, beside the other backends':
tests/test_kernels_backends.py.

`mosaic_gpu_interpret` runs the very kernels the "mosaic_gpu" backend lowers (TMA copies, barriers,
SMEM) in `plgpu.InterpretGPUParams`, on the CPU. Lowering checks count `mosaic_gpu_v2` custom calls
in the StableHLO for an abstract H100. Needs jax >= 0.12 (`backend.MOSAIC_GPU_MIN_JAX`); on older jax
only the error test runs.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import params_and_grads, train_on_backend
from test_kernels_backends import SHAPES, SHARED, adam_body

import optax_ext as ox
from optax_ext.kernels import backend as kb
from optax_ext.kernels import lower_for
from optax_ext.kernels.elementwise import Job
from optax_ext.kernels.fused_pass import fused_pass_pallas
from optax_ext.kernels.norms import global_sq_norm_pallas, leaf_sq_norms_pallas

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lowering_report import analyze_stablehlo  # noqa: E402
from optimizer_step import gpt2_small_shapes  # noqa: E402

needs_mosaic_gpu = pytest.mark.skipif(not kb.mosaic_gpu_available(), reason="Mosaic GPU kernels need jax >= 0.12")

MARKER = "mosaic_gpu_v2"
TRITON = "__gpu$xla.gpu.triton"


def _tree(key, dtype):
    return params_and_grads(key, SHAPES, dtype, steps=3)


def _relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


OPTIMIZERS = {
    "clip_adamw": lambda: ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-2, weight_decay=0.1)),
    "apply_if_finite_adam": lambda: ox.apply_if_finite(ox.adam(1e-2), 3),
    "lamb": lambda: ox.lamb(1e-2, weight_decay=0.01),
    "lion": lambda: ox.lion(1e-3, weight_decay=0.01),
    "sgd_momentum": lambda: ox.sgd(0.05, momentum=0.9),
    "adamw_kahan": lambda: ox.adamw(1e-2, weight_decay=0.05, kahan_sum=True),
}


@needs_mosaic_gpu
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizers_match_xla(key, name):
    params, grads = _tree(key, jnp.float32)
    p_mg, s_mg = train_on_backend(OPTIMIZERS[name](), params, grads, "mosaic_gpu_interpret")
    p_x, s_x = train_on_backend(OPTIMIZERS[name](), params, grads, "xla")
    for a, b in zip(jax.tree.leaves((p_mg, s_mg)), jax.tree.leaves((p_x, s_x))):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _relative_error(a, b) <= 1e-6


@needs_mosaic_gpu
def test_clip_adamw_bf16_params(key):
    params, grads = _tree(key, jnp.bfloat16)
    p_mg, _ = train_on_backend(OPTIMIZERS["clip_adamw"](), params, grads, "mosaic_gpu_interpret")
    p_x, _ = train_on_backend(OPTIMIZERS["clip_adamw"](), params, grads, "xla")
    for a, b in zip(jax.tree.leaves(p_mg), jax.tree.leaves(p_x)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2 * 2.0**-8, atol=1e-3)


@needs_mosaic_gpu
def test_int8_adamw_runs_in_the_kernels_as_on_xla(key):
    """8-bit moments (`fused_pass/mosaic_gpu_8bit.py`): three steps in Mosaic GPU's interpreter equal
    XLA's, and lowered for CUDA the step is Mosaic GPU calls only, no quantized leaf left to XLA."""
    params, grads = _tree(key, jnp.float32)
    tx = lambda: ox.adamw(1e-2, mu_dtype=ox.int8_blockwise, nu_dtype=ox.int8_blockwise)  # noqa: E731
    ours = train_on_backend(tx(), params, grads, "mosaic_gpu_interpret")
    theirs = train_on_backend(tx(), params, grads, "xla")
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype == jnp.uint8:  # codes: a value on a midpoint of the map may round either way
            assert np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32)).max() <= 1
        else:
            assert _relative_error(a, b) <= 1e-6
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}
    assert any(
        isinstance(x, ox.QuantizedArray)
        for x in jax.tree.leaves(jax.eval_shape(tx().init, shapes), is_leaf=lambda x: isinstance(x, ox.QuantizedArray))
    )
    text = _lower_step(tx(), shapes)
    stats = analyze_stablehlo(text)
    n = sum(x.size for x in jax.tree.leaves(shapes))
    assert stats["kernels_by_backend"]["mosaic_gpu"] == 2 and TRITON not in text  # one plain, one 8-bit launch
    assert stats["copied_elements"] / n <= 0.01 and stats["unaliased_donors"] == 0, stats["copied_elements_by_op"]


# ---------------------------------------------------------------------------------------------- lowering


def _gpt2_small():
    """GPT-2 small's 148 parameter tensors (124M parameters), as abstract shapes."""
    return {f"p{i:03d}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(gpt2_small_shapes())}


def _lower_step(tx, params):
    state = jax.eval_shape(tx.init, params)

    def step(params, state, grads):
        return tx.update_and_apply(grads, state, params)

    return lower_for(
        step, params, state, params, platform="cuda", backend="mosaic_gpu", donate_argnums=(0, 1)
    ).as_text()


# bf16 grads and params with f32 moments on the ragged tree, as avals; their AdamW jobs (outputs in place)
_MIXED_GRADS = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in SHAPES]
_MIXED_STATE = [[jax.ShapeDtypeStruct(s, d) for d in (jnp.bfloat16, jnp.float32, jnp.float32)] for s in SHAPES]


def _mixed_jobs(grads, state):
    return [
        Job([g, *pmv], [jnp.bfloat16, jnp.float32, jnp.float32], jnp.full((1,), 0.01 * k), {1: 0, 2: 1, 3: 2})
        for k, (g, pmv) in enumerate(zip(grads, state))
    ]


@needs_mosaic_gpu
def test_fused_pass_lowers_to_one_mosaic_gpu_call_per_launch():
    grads, state = _MIXED_GRADS, _MIXED_STATE

    def f(grads, state):
        return fused_pass_pallas(adam_body, _mixed_jobs(grads, state), SHARED, backend="mosaic_gpu")

    text = lower_for(f, grads, state, platform="cuda", backend="mosaic_gpu", donate_argnums=(1,)).as_text()
    assert text.count(MARKER) == 1 and TRITON not in text
    stats = analyze_stablehlo(text)
    # Only the scalar vectors are built (the shared 6 padded to 32, the 9 leaf scalars into 32): no leaf data.
    assert stats["copied_elements"] <= 32 + 9 + 32 and stats["unaliased_donors"] == 0, stats["copied_elements_by_op"]


@needs_mosaic_gpu
def test_fused_pass_and_norms_compile_for_h100():
    """XLA compiles the lane-semantics kernels for an H100 (ptxas included, deviceless AOT): a mixed
    bf16/f32 fused pass over the ragged tree (its blocks loaded in one shared strided layout) and the
    norm kernels with the non-finite count."""
    from optax_ext.kernels import aot
    from optax_ext.step_report import count_hlo

    if not aot.available():
        pytest.skip("compiling for an H100 needs optax_ext[gpu-aot]")
    grads, state = _MIXED_GRADS, _MIXED_STATE

    def f(grads, state):
        jobs = _mixed_jobs(grads, state)
        total, bad = global_sq_norm_pallas(grads, backend="mosaic_gpu", count_nonfinite=True)
        per_leaf = leaf_sq_norms_pallas([p for p, _, _ in state], backend="mosaic_gpu")
        return fused_pass_pallas(adam_body, jobs, SHARED, backend="mosaic_gpu"), total, bad, per_leaf

    compiled = aot.compile_for(f, grads, state, backend="mosaic_gpu", donate_argnums=(1,))
    # one fused pass, one norm launch over the bf16 grads, one over the bf16 params
    assert count_hlo(compiled.as_text()).custom_calls == 3


@needs_mosaic_gpu
@pytest.mark.slow
def test_gpt2_clip_adamw_step_on_mosaic_gpu():
    params = _gpt2_small()
    text = _lower_step(ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3)), params)
    # One norm launch (240 leaves) and ceil(148 / 59) fused-pass launches (59 AdamW leaves fill a
    # launch's TMA descriptors, mosaic_gpu_blocks.MAX_TMA_REFS); no Triton call.
    assert text.count(MARKER) == 1 + 3
    assert TRITON not in text
    n = sum(x.size for x in jax.tree.leaves(params))
    stats = analyze_stablehlo(text)
    assert stats["kernel_bytes"] / n <= 33, stats["kernel_bytes"] / n
    assert stats["copied_elements"] / n <= 0.01 and stats["unaliased_donors"] == 0


@needs_mosaic_gpu
@pytest.mark.parametrize("dtype, kernels", [(jnp.bfloat16, 2), (jnp.float32, 1)])
def test_layer_norm_on_mosaic_gpu_never_lowers_to_triton(dtype, kernels):
    """LayerNorm forward and backward are Mosaic GPU kernels where their blocks fit in SMEM (f32 rows of
    768 too wide for the backward's two operands: that part is XLA's), never a (deprecated) Triton call."""
    x = jax.ShapeDtypeStruct((64, 768), dtype)
    w = jax.ShapeDtypeStruct((768,), jnp.float32)

    def loss(x, w, b):
        return jnp.sum(ox.kernels.layer_norm.layer_norm(x, w, b).astype(jnp.float32) ** 2)

    text = lower_for(jax.grad(loss, argnums=(0, 1, 2)), x, w, w, platform="cuda", backend="mosaic_gpu").as_text()
    assert TRITON not in text and text.count(MARKER) == kernels


# ---------------------------------------------------------------------------------------------- selection


def test_mosaic_gpu_on_old_jax_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(kb, "mosaic_gpu_available", lambda: False)
    x = jnp.ones((10,))
    with pytest.raises(RuntimeError, match=r"backend 'mosaic_gpu' needs jax >= 0\.12.*'triton'"):
        fused_pass_pallas(adam_body, [Job([x] * 4, [jnp.float32] * 3, jnp.zeros((1,)))], SHARED, backend="mosaic_gpu")
    with pytest.raises(RuntimeError, match="needs jax"):
        global_sq_norm_pallas([x], backend="mosaic_gpu_interpret")


class _FakeGPU:
    def __init__(self, capability):
        self.compute_capability = capability


@pytest.mark.parametrize(
    "capability,available,expected",
    [("9.0", True, "mosaic_gpu"), ("10.0", True, "mosaic_gpu"), ("8.0", True, "triton"), ("9.0", False, "triton")],
)
def test_cuda_default_backend(monkeypatch, capability, available, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [_FakeGPU(capability)])
    monkeypatch.setattr(kb, "mosaic_gpu_available", lambda: available)
    assert kb.platform_backend() == expected


def test_rocm_default_backend_is_triton(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "rocm")
    assert kb.platform_backend() == "triton"


@needs_mosaic_gpu
def test_default_cuda_path_emits_no_deprecation_warning(recwarn):
    params = {"w": jax.ShapeDtypeStruct((300, 129), jnp.float32), "b": jax.ShapeDtypeStruct((129,), jnp.float32)}
    _lower_step(ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3)), params)
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning) and "Triton" in str(w.message)]


@needs_mosaic_gpu
def test_optax_update_under_mosaic_gpu_interpret_matches_optax(key):
    params, grads = _tree(key, jnp.float32)
    tx = ox.adamw(1e-2, weight_decay=0.05)
    ref = optax.adamw(1e-2, weight_decay=0.05)
    p, s = train_on_backend(tx, params, grads, "mosaic_gpu_interpret")
    q, r = params, ref.init(params)
    for g in grads:
        u, r = ref.update(g, r, q)
        q = optax.apply_updates(q, u)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
