"""Every kernel lowers for CUDA (Triton) and TPU (Mosaic), checked from a CPU.

`optax_ext.kernels.lower_for` (`jax.jit(f).trace(*avals).lower(lowering_platforms=(...,))` for an
abstract H100 or TPU v5e) runs the Pallas lowering to Triton or Mosaic IR, which rejects any op,
block shape or memory space the backend cannot handle. Only abstract shapes are used
(`jax.ShapeDtypeStruct`), so a 1e8-element array costs nothing.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_ext as ox
from optax_ext.kernels import lower_for
from optax_ext.kernels import multi_tensor as mt
from optax_ext.kernels.elementwise import Job
from optax_ext.kernels.fused_pass import fused_pass_pallas
from optax_ext.kernels.norms import NORM_MAX_LEAVES, global_sq_norm_pallas, leaf_sq_norms_pallas

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lowering_report import analyze_stablehlo  # noqa: E402  (the report's StableHLO reader)
from optimizer_step import gpt2_small_shapes  # noqa: E402

TRITON_MARKERS = ("__gpu$xla.gpu.triton", "triton_kernel_call")
TPU_MARKER = "tpu_custom_call"
PLATFORM = {"triton": "cuda", "mosaic": "tpu"}

SHAPES = [(), (1,), (7,), (1000,), (3, 5, 7), (3 * 1024 + 5,), (4096, 1000), (100_000_000,), (2**17 + 3,)]
HUGE = (65_536, 32_771)  # 2.1e9 elements: over the int32 index range, run through a (rows, cols) view


def _count_kernels(text, backend):
    if backend == "triton":
        return sum(text.count(m) for m in TRITON_MARKERS)
    return text.count(TPU_MARKER)


def _lower(fn, avals, backend, donate=()):
    return lower_for(fn, *avals, platform=PLATFORM[backend], backend=backend, donate_argnums=donate).as_text()


def adam_body(xs, shared, leaf):
    g, p, m, v = xs
    m = shared[0] * m + shared[1] * g
    v = shared[2] * v + shared[3] * (g * g)
    u = jnp.where(shared[4] > 0, m / shared[4], m) / (jnp.sqrt(v) + shared[5])
    return [p - 1e-3 * (u + leaf[0] * p), m, v]


def _adam_step(shapes, backend):
    """A lowered multi-leaf Adam pass: bf16 params and grads, f32 slots in place, per-leaf decay."""
    grads = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    state = [[jax.ShapeDtypeStruct(s, d) for d in (jnp.bfloat16, jnp.float32, jnp.float32)] for s in shapes]

    def f(grads, state, shared):
        jobs = [
            Job([g, *pmv], [jnp.bfloat16, jnp.float32, jnp.float32], jnp.full((1,), 0.01 * k), {1: 0, 2: 1, 3: 2})
            for k, (g, pmv) in enumerate(zip(grads, state))
        ]
        return fused_pass_pallas(adam_body, jobs, shared, backend=backend)

    return _lower(f, [grads, state, jax.ShapeDtypeStruct((6,), jnp.float32)], backend, donate=(1,))


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("shape", SHAPES + [HUGE])
def test_fused_pass_lowers_one_leaf(shape, backend):
    text = _adam_step([shape], backend)
    if backend == "mosaic" and shape == HUGE:
        # Over mt.INDEX_LIMIT elements: the TPU kernels' int32 copy offsets cannot reach it; XLA runs it.
        assert _count_kernels(text, backend) == 0
        return
    assert _count_kernels(text, backend) == 1
    assert "output_operand_aliases" in text


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_fused_pass_lowers_many_leaves(backend):
    # Every leaf in one launch (9 leaves, 7 refs each: under both limits).
    text = _adam_step(SHAPES, backend)
    assert _count_kernels(text, backend) == 1
    for op in ("stablehlo.concatenate", "stablehlo.slice", "stablehlo.pad", "stablehlo.dynamic_slice"):
        # No parameter data is copied; the only concatenate builds the per-leaf scalar table.
        assert text.count(op) <= (1 if op == "stablehlo.concatenate" else 0), op


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_fused_pass_without_scalars_lowers(backend):
    def f(g):
        job = Job([g], [jnp.float16], jnp.zeros((0,)))
        return fused_pass_pallas(
            lambda xs, s, t: [jnp.clip(xs[0], -1.0, 1.0)], [job, job], jnp.zeros((0,)), backend=backend
        )

    text = _lower(f, [jax.ShapeDtypeStruct((4096, 1000), jnp.float32)], backend)
    assert _count_kernels(text, backend) == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_norms_lower(backend, dtype):
    avals = [jax.ShapeDtypeStruct(s, dtype) for s in SHAPES + [HUGE]]
    per_leaf = _lower(lambda *xs: leaf_sq_norms_pallas(list(xs), backend=backend), avals, backend)
    total = _lower(lambda *xs: global_sq_norm_pallas(list(xs), backend=backend), avals, backend)
    # One launch; on TPU, HUGE (over mt.INDEX_LIMIT elements) is summed by XLA.
    assert _count_kernels(per_leaf, backend) == 1
    assert _count_kernels(total, backend) == 1


PARAMS = {
    "emb": jax.ShapeDtypeStruct((1000, 64), jnp.float32),  # 64000 = 500 * 128
    "w": jax.ShapeDtypeStruct((300, 129), jnp.float32),  # ragged: 38700 = 302 * 128 + 44
    "b": jax.ShapeDtypeStruct((129,), jnp.float32),
    "scale": jax.ShapeDtypeStruct((), jnp.float32),
    "head": jax.ShapeDtypeStruct((64, 3, 5), jnp.bfloat16),  # 960 = 7 * 128 + 64
}
# name: (make, kernels on Triton, kernels on Mosaic) for the 5 leaves of PARAMS. Triton: one
# launch per fused run and per reduction; Mosaic (TPU): the same, per dtype, since a launch's
# leaves share VMEM buffers: PARAMS' bf16 "head" takes a launch of its own in each.
OPTIMIZERS = {
    "clip_adamw": (lambda: ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3)), 2, 4),
    "lamb": (lambda: ox.lamb(1e-3, weight_decay=0.01), 3, 6),
    "sgd_momentum": (lambda: ox.sgd(0.1, momentum=0.9), 1, 2),
    # Plain SGD's first part is the identity: it must not end the fused run (optax.identity() would).
    "decay_then_sgd": (lambda: ox.chain(ox.add_decayed_weights(1e-3), ox.sgd(0.1)), 1, 2),
    "rmsprop_decay_first": (lambda: ox.chain(ox.add_decayed_weights(1e-3), ox.rmsprop(1e-3)), 1, 2),
    "lion": (lambda: ox.lion(1e-4), 1, 2),
    "rmsprop": (lambda: ox.rmsprop(1e-3), 1, 2),
    "adamw_masked": (lambda: ox.adamw(1e-3, mask=lambda p: {k: v.ndim > 1 for k, v in p.items()}), 1, 2),
}


def _lower_step(tx, params, backend, apply=True):
    state = jax.eval_shape(tx.init, params)

    # A fresh function per call: jit caches traces by function, and the backend is chosen at trace time.
    def step(params, state, grads):
        if apply:
            return tx.update_and_apply(grads, state, params)
        return tx.update(grads, state, params)

    return _lower(step, (params, state, params), backend, donate=(0, 1))


@pytest.mark.parametrize("apply", [False, True], ids=["update", "update_and_apply"])
@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_step_lowers(name, backend, apply):
    make, triton, mosaic = OPTIMIZERS[name]
    text = _lower_step(make(), PARAMS, backend, apply)
    assert _count_kernels(text, backend) == (triton if backend == "triton" else mosaic)


def _gpt2_small():
    """GPT-2 small's 148 parameter tensors (124M parameters), as abstract shapes."""
    return {f"p{i:03d}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(gpt2_small_shapes())}


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_gpt2_clip_adamw_step_is_a_handful_of_launches(backend):
    params = _gpt2_small()
    assert len(params) == 148
    text = _lower_step(ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3)), params, backend)
    # The global norm: ceil(148 / 256) launches; the fused pass: ceil(148 / 64).
    assert _count_kernels(text, backend) == -(-148 // NORM_MAX_LEAVES) + -(-148 // mt.MAX_LEAVES) == 4
    _assert_at_the_floor(text, params, floor=32)


def _assert_at_the_floor(text, params, floor):
    """Bytes through the kernels at the physical floor, and no parameter data copied by XLA."""
    n = sum(x.size for x in jax.tree.leaves(params))
    stats = analyze_stablehlo(text)
    assert stats["kernel_bytes"] / n <= floor * 1.001, stats["kernel_bytes"] / n
    assert stats["copied_elements"] / n <= 1e-3, stats["copied_elements_by_op"]
    assert stats["unaliased_donors"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_two_thousand_small_leaves_step_is_under_64_launches(backend):
    sizes = np.random.default_rng(0).integers(100, 2300, size=2000)
    params = {f"p{i:04d}": jax.ShapeDtypeStruct((int(n),), jnp.float32) for i, n in enumerate(sizes)}
    text = _lower_step(ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3)), params, backend)
    assert _count_kernels(text, backend) == -(-2000 // NORM_MAX_LEAVES) + -(-2000 // mt.MAX_LEAVES) == 40
    _assert_at_the_floor(text, params, floor=32)
