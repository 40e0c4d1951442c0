"""The TPU backend: what only it has (double buffering, leaf-free waits), whole steps in TPU's
interpreter against XLA, and lowering for TPU. Its kernels against their reference on the ragged
tree, beside the other backends': tests/test_kernels_backends.py.

`mosaic_interpret` runs the very kernels the "mosaic" backend lowers (DMAs, semaphores, VMEM and SMEM)
in `pltpu.InterpretParams`, on the CPU. Lowering checks count `tpu_custom_call`s in the StableHLO for
an abstract TPU v5e. The 2,000-leaf step's lowering is in tests/test_kernels_lowering.py (slow).
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_rel_close, params_and_grads, train_on_backend
from test_kernels_backends import SHAPES, SHARED, adam_body, adam_jobs, check_against_reference

import optax_ext as ox
from optax_ext.kernels import lower_for, use_backend
from optax_ext.kernels import mosaic_tpu_blocks as mtb
from optax_ext.kernels import multi_tensor as mt
from optax_ext.kernels.elementwise import Job
from optax_ext.kernels.fused_pass import fused_pass_pallas
from optax_ext.kernels.norms import NORM_MAX_LEAVES, global_sq_norm_pallas, leaf_sq_norms_pallas

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lowering_report import analyze_stablehlo  # noqa: E402
from optimizer_step import gpt2_small_shapes, small_leaves_shapes  # noqa: E402

MARKER = "tpu_custom_call"


@pytest.mark.parametrize(
    "params", [{"dma_execution_mode": "eager"}, {"detect_races": True}], ids=["eager_dma", "race_detection"]
)
def test_double_buffering_holds_in_any_dma_order(key, monkeypatch, params):
    """Copies done when started ("eager") or when waited for (the default): both orders give the
    reference, so no block is read before its copy is waited for, nor a slot refilled too early."""
    monkeypatch.setattr(mtb, "INTERPRET_PARAMS", params)
    jobs = adam_jobs(key, SHAPES, [(jnp.float32, jnp.float32)] * len(SHAPES))
    got = fused_pass_pallas(adam_body, jobs, SHARED, backend="mosaic_interpret", block=1024)
    check_against_reference(jobs, got)
    sums = leaf_sq_norms_pallas([job.inputs[0] for job in jobs], backend="mosaic_interpret", block=1024)
    np.testing.assert_allclose(sums, [jnp.sum(job.inputs[0] ** 2) for job in jobs], rtol=2e-6)


# ---------------------------------------------------------------------------------------------- whole steps


def _tree(key, dtype):
    return params_and_grads(key, SHAPES, dtype, steps=2)


def clip_adamw():
    return ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-2, weight_decay=0.1))


def test_clip_adamw_matches_xla(key):
    params, grads = _tree(key, jnp.float32)
    ours = train_on_backend(clip_adamw(), params, grads, "mosaic_interpret")
    assert_trees_rel_close(ours, train_on_backend(clip_adamw(), params, grads, "xla"))


def test_clip_adamw_bf16_params(key):
    params, grads = _tree(key, jnp.bfloat16)
    p_tpu, _ = train_on_backend(clip_adamw(), params, grads, "mosaic_interpret")
    p_x, _ = train_on_backend(clip_adamw(), params, grads, "xla")
    for a, b in zip(jax.tree.leaves(p_tpu), jax.tree.leaves(p_x)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2 * 2.0**-8, atol=1e-3)


def test_quantized_jobs_are_left_to_xla(key):
    """8-bit states are not on the TPU kernels: such a job comes back None (the caller runs it on
    XLA, as `elementwise` does), the plain jobs of the same call run in the kernels."""
    from optax_ext import quantization as q8

    fmt = q8.QuantFormat(256, True)
    x = jax.random.normal(key, (1000,))
    jobs = [
        Job([x, q8.quantize_leaf(x, fmt)], [jnp.float32, fmt], jnp.zeros((0,))),
        Job([x, x], [jnp.float32] * 2, jnp.zeros((0,))),
    ]
    got = fused_pass_pallas(lambda xs, s, t: [xs[0] + xs[1], xs[1]], jobs, jnp.zeros((0,)), backend="mosaic_interpret")
    assert got[0] is None
    np.testing.assert_array_equal(got[1][0], 2 * x)


# ---------------------------------------------------------------------------------------------- lowering


def _lower(fn, *avals, donate=(), **kwargs):
    return lower_for(fn, *avals, platform="tpu", backend="mosaic", donate_argnums=donate, **kwargs).as_text()


def _adam_pass(shapes, form=None):
    grads = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    state = [[jax.ShapeDtypeStruct(s, d) for d in (jnp.bfloat16, jnp.float32, jnp.float32)] for s in shapes]

    def f(grads, state):
        jobs = [
            Job([g, *pmv], [jnp.bfloat16, jnp.float32, jnp.float32], jnp.full((1,), 0.01 * k), {1: 0, 2: 1, 3: 2})
            for k, (g, pmv) in enumerate(zip(grads, state))
        ]
        return fused_pass_pallas(adam_body, jobs, SHARED, backend="mosaic", form=form)

    return _lower(f, grads, state, donate=(1,))


def test_fused_pass_lowers_to_one_call_per_launch_in_place():
    text = _adam_pass(SHAPES)
    assert text.count(MARKER) == 1
    # p, m, v of every leaf are updated in place: 27 aliases, and no donated buffer left unaliased.
    assert text.count("tf.aliasing_output") == 3 * len(SHAPES)
    stats = analyze_stablehlo(text)
    # Only the leaf-scalar table is built (9 scalars): no parameter data is copied, sliced or padded.
    assert stats["copied_elements"] <= len(SHAPES) and stats["unaliased_donors"] == 0, stats["copied_elements_by_op"]


def test_per_leaf_form_still_lowers_one_call_per_leaf():
    assert _adam_pass(SHAPES[:4], form="per_leaf").count(MARKER) == 4
    avals = [jax.ShapeDtypeStruct(s, jnp.float32) for s in SHAPES[:4]]
    text = _lower(lambda *xs: global_sq_norm_pallas(list(xs), backend="mosaic", form="per_leaf"), *avals)
    assert text.count(MARKER) == 4


def test_huge_leaf_runs_on_xla():
    # Over mt.INDEX_LIMIT elements: left to XLA by the multi-tensor TPU kernels (abstract: costs nothing).
    text = _adam_pass([(7,), (65_536, 32_771)])
    assert text.count(MARKER) == 1


def test_norms_lower_to_one_call_per_launch():
    avals = [jax.ShapeDtypeStruct(s, jnp.float32) for s in SHAPES]
    assert _lower(lambda *xs: leaf_sq_norms_pallas(list(xs), backend="mosaic"), *avals).count(MARKER) == 1
    text = _lower(lambda *xs: global_sq_norm_pallas(list(xs), backend="mosaic", count_nonfinite=True), *avals)
    assert text.count(MARKER) == 1


def test_gpt2_clip_adamw_step_is_four_calls():
    params = {f"p{i:03d}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(gpt2_small_shapes())}
    tx = ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3))
    state = jax.eval_shape(tx.init, params)
    text = _lower(lambda p, s, g: tx.update_and_apply(g, s, p), params, state, params, donate=(0, 1))
    # One norm launch (148 <= 256 leaves) and ceil(148 / 64) fused-pass launches.
    assert text.count(MARKER) == 1 + 3
    n = sum(x.size for x in jax.tree.leaves(params))
    stats = analyze_stablehlo(text)
    assert stats["copied_elements"] / n <= 1e-3 and stats["unaliased_donors"] == 0


def test_two_thousand_leaves_plan_to_forty_launches():
    """The 2,000-small-leaf step's launch count from the plans (its lowering: test_kernels_lowering.py)."""
    sizes = [int(np.prod(s)) for s in small_leaves_shapes()]
    f32 = [jnp.dtype(jnp.float32)] * len(sizes)
    fused = mtb.plan_by_dtype(f32, sizes, 7, 64 * 1024, extra_refs=2)
    norms = mtb.plan_by_dtype(f32, sizes, 1, 128 * 1024, max_leaves=NORM_MAX_LEAVES)
    assert len(fused) == -(-2000 // mt.MAX_LEAVES) and len(norms) == -(-2000 // NORM_MAX_LEAVES)
    assert len(fused) + len(norms) == 40


# ---------------------------------------------------------------------------------------------- selection


def test_per_leaf_form_is_not_the_interpreters():
    x = jnp.ones((10,))
    with pytest.raises(ValueError, match="runs the 'multi_tensor' form"):
        fused_pass_pallas(
            adam_body,
            [Job([x] * 4, [jnp.float32] * 3, jnp.zeros((1,)))],
            SHARED,
            backend="mosaic_interpret",
            form="per_leaf",
        )
    with pytest.raises(ValueError, match="runs the 'multi_tensor' form"):
        global_sq_norm_pallas([x], backend="mosaic_interpret", form="per_leaf")


def test_layer_norm_in_tpu_interpreter_runs_its_jnp_math(key):
    x = jax.random.normal(key, (4, 256))
    w, b = jnp.ones((256,)), jnp.zeros((256,))
    with use_backend("mosaic_interpret"):
        got = ox.kernels.layer_norm.layer_norm(x, w, b)
    with use_backend("xla"):
        want = ox.kernels.layer_norm.layer_norm(x, w, b)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _count_primitives(jaxpr, names) -> dict:
    """How many equations of each primitive in `names` a jaxpr holds, sub-jaxprs (conds, loops,
    kernels) included."""
    counts = dict.fromkeys(names, 0)

    def subjaxprs(value):
        if hasattr(value, "eqns"):
            yield value
        elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):  # a closed jaxpr
            yield value.jaxpr
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from subjaxprs(v)

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name in counts:
                counts[eqn.primitive.name] += 1
            for sub in subjaxprs(list(eqn.params.values())):
                walk(sub)

    walk(jaxpr)
    return counts


def test_waits_do_not_grow_with_the_leaves(key):
    """Each DMA wait site is leaf-free (`mosaic_tpu_blocks._wait_block`): a launch of 32 ragged
    leaves has as many wait equations as one of 4, while its starts grow with the leaves. This is
    what keeps the TPU lowering time within 2x of Optax's on 2,000 leaves (benchmarks/RESULTS.md)."""

    def counts(n_leaves):
        shapes = [(1000 + 37 * k,) for k in range(n_leaves)]
        jobs = adam_jobs(key, shapes, [(jnp.float32, jnp.float32)] * n_leaves)
        jaxpr = jax.make_jaxpr(lambda: fused_pass_pallas(adam_body, jobs, SHARED, backend="mosaic", block=1024))()
        return _count_primitives(jaxpr.jaxpr, ("dma_start", "dma_wait"))

    few, many = counts(4), counts(32)
    assert few["dma_wait"] == many["dma_wait"] > 0
    assert many["dma_start"] > 4 * few["dma_start"]
