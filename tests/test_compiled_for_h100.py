"""Steps compiled by XLA for an H100 on this CPU machine (deviceless AOT): launches, copies, temp memory.

Needs `optax_ext[gpu-aot]` (JAX's CUDA plugin), installed on CI's newest stack, which sets
OPTAX_EXT_REQUIRE_GPU_AOT=1 so that these tests fail there rather than skip. Elsewhere they skip;
the oldest stack keeps the StableHLO checks (test_kernels_lowering.py).
"""

import functools
import os
import re
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_ext as ox
from optax_ext.kernels import aot
from optax_ext.step_report import count_hlo

ROOT = Path(__file__).resolve().parents[1]

if not aot.available():
    if os.environ.get("OPTAX_EXT_REQUIRE_GPU_AOT") == "1":
        aot.target_mesh("h100")  # raises, saying what is missing
    pytest.skip('compiling for an H100 needs optax_ext[gpu-aot] (pip install -e ".[gpu-aot]")', allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:.*Triton backend is deprecated:DeprecationWarning")

TEMP_BYTES_PER_PARAM = 0.5


def _benchmark_module(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def _avals(shapes):
    return {f"p{i:03d}": jax.ShapeDtypeStruct(tuple(s), jnp.float32) for i, s in enumerate(shapes)}


def _quiet_report(step, *args, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="inspect_step")
        return ox.inspect_step(step, *args, target="h100", **kw)


def test_gpt2_clip_adamw_is_a_handful_of_launches_next_to_optax():
    bench = _benchmark_module("optimizer_step")
    params = _avals(bench.gpt2_small_shapes())
    ours_tx = ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3))
    optax_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    ours = _quiet_report(bench.ours_step(ours_tx), params, jax.eval_shape(ours_tx.init, params), params)
    theirs = _quiet_report(bench.optax_step(optax_tx), params, jax.eval_shape(optax_tx.init, params), params)
    # 148 leaves: one norm launch (256 leaves a launch), three fused-pass launches (64 a launch) and
    # XLA's scalar fusions (step count, norm of the partial sums, the stacked step scalars).
    assert ours.counts.custom_calls == 4
    assert ours.launches <= 8, str(ours)
    assert theirs.launches >= 148, str(theirs)  # at least one fusion per leaf
    for r in (ours, theirs):
        assert r.copies == 0 and r.temp_bytes_per_param <= TEMP_BYTES_PER_PARAM, str(r)


@pytest.mark.skipif(not ox.kernels.backend.mosaic_gpu_available(), reason="Mosaic GPU kernels need jax >= 0.12")
def test_gpt2_clip_adamw_on_mosaic_gpu():
    """The step on the Mosaic GPU backend: 4 kernels (1 norm launch, 3 fused-pass launches), and it
    compiles: ptxas rejects a kernel whose TMA descriptors overflow its parameter space."""
    bench = _benchmark_module("optimizer_step")
    params = _avals(bench.gpt2_small_shapes())
    tx = ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3))
    with ox.kernels.use_backend("mosaic_gpu"):
        r = _quiet_report(bench.ours_step(tx), params, jax.eval_shape(tx.init, params), params)
    assert r.counts.custom_calls == 4 and r.launches <= 8, str(r)
    assert r.copies == 0 and r.temp_bytes_per_param <= TEMP_BYTES_PER_PARAM, str(r)


def test_crossed_donation_order_is_caught_on_the_h100_program():
    bench = _benchmark_module("optimizer_step")
    params = _avals(bench.gpt2_small_shapes()[:20])
    tx = ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3))

    def step(grads, state, params):
        return tx.update_and_apply(grads, state, params)

    with pytest.warns(UserWarning, match="donate_argnums"):
        r = ox.inspect_step(
            jax.jit(step, donate_argnums=(1, 2)), params, jax.eval_shape(tx.init, params), params, target="h100"
        )
    # params, mu and nu come back crossed; XLA copies each leaf's buffers to undo it.
    assert r.copied_per_param >= 4.0 and r.temp_bytes_per_param > TEMP_BYTES_PER_PARAM


# LAMB's trust ratio needs a leaf's whole update before any of it is applied: pass 1 stores the
# update u (4 B/param of temp), pass 2 applies it (see the floors in benchmarks/lowering_report.py).
@pytest.mark.parametrize(
    "optimizer, update_bytes",
    [
        (lambda: ox.adamw(1e-3), 0),
        (lambda: ox.lion(1e-4), 0),
        (lambda: ox.sgd(1e-2, momentum=0.9), 0),
        (lambda: ox.lamb(1e-3), 4),
        (lambda: ox.adamw(1e-3, mu_dtype=ox.int8_blockwise, nu_dtype=ox.int8_blockwise), 0),
    ],
    ids=["adamw", "lion", "sgd-momentum", "lamb", "adamw-int8"],
)
def test_benchmark_steps_update_in_place(optimizer, update_bytes):
    bench = _benchmark_module("optimizer_step")
    params = _avals([(), (7,), (129, 257), (1000,), (3, 5, 7), (768, 768), (50_000,)])
    tx = optimizer()
    r = _quiet_report(bench.ours_step(tx), params, jax.eval_shape(tx.init, params), params)
    assert r.copies == 0 and r.temp_bytes_per_param <= TEMP_BYTES_PER_PARAM + update_bytes, str(r)
    assert r.counts.custom_calls >= 1  # the Pallas kernels were compiled for the target, not left to XLA


def _training_step_reports(step, gradients_only, *args):
    """(the step's report, temp bytes per parameter the optimizer adds).

    Measured against the same forward and backward pass without an update (`gradients_only`, which
    returns the gradients): a full step must hold the gradients in temp memory where that one returns
    them, so they are counted out (4 B per f32 parameter); what is left is the optimizer's own.
    """
    full = _quiet_report(step, *args)
    base = _quiet_report(gradients_only, *args)
    grad_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(args[0]))
    return full, (full.temp_bytes - base.temp_bytes - grad_bytes) / full.params


def test_readme_example_step():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Example.*?```python\n(.*?)```", readme, re.S).group(1)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    params, opt_state = ns["params"], ns["opt_state"]
    x = jax.ShapeDtypeStruct((128, 784), jnp.float32)
    y = jax.ShapeDtypeStruct((128,), jnp.int32)
    graphdef = ns["graphdef"]

    @jax.jit
    def gradients_only(params, opt_state, x, y):
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).mean()
        return jax.value_and_grad(loss_fn)(params)

    report, added = _training_step_reports(ns["train_step"], gradients_only, params, opt_state, x, y)
    assert report.copies == 0, str(report)
    assert report.params == 784 * 10 + 10
    assert added <= TEMP_BYTES_PER_PARAM, (added, str(report))


def test_demo_train_step():
    from optax_ext import train

    model = train.ConvNet(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = train.OPTIMIZERS["adamw"](1e-3, train.DEFAULT_WEIGHT_DECAY)
    opt_state = tx.init(params)
    x = jax.ShapeDtypeStruct((64, 8, 8, 1), jnp.float32)
    y = jax.ShapeDtypeStruct((64,), jnp.int32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)

    @jax.jit
    def gradients_only(params, opt_state, x, y, key):
        return jax.value_and_grad(lambda p: train.cross_entropy(nnx.merge(graphdef, p)(x), y))(params)

    step = train.make_train_step(graphdef, tx)
    report, added = _training_step_reports(step, gradients_only, params, opt_state, x, y, key)
    assert report.copies == 0, str(report)
    assert added <= TEMP_BYTES_PER_PARAM, (added, str(report))


def test_layer_norm_forward_and_backward_compile():
    from optax_ext.kernels import layer_norm

    x = jax.ShapeDtypeStruct((512, 768), jnp.float32)
    w = jax.ShapeDtypeStruct((768,), jnp.float32)

    def loss(x, scale, bias):
        return jnp.sum(layer_norm.layer_norm(x, scale, bias) ** 2)

    with ox.kernels.use_backend("triton"):
        compiled = aot.compile_for(jax.value_and_grad(loss, argnums=(0, 1, 2)), x, w, w)
    counts = count_hlo(compiled.as_text())
    assert counts.custom_calls >= 2  # the forward and backward kernels, compiled for sm_90
    assert np.isfinite(compiled.memory_analysis().temp_size_in_bytes)


def test_notebook_step_patterns_update_in_place():
    """The two step shapes the notebooks use beyond the README's: configurations stacked and vmapped
    (optimizers.ipynb, regularization.ipynb: traced learning rates and decays), and a step that also
    donates BatchNorm statistics (normalization.ipynb)."""
    n = 4
    params = {"W": jax.ShapeDtypeStruct((n, 64, 10), jnp.float32), "b": jax.ShapeDtypeStruct((n, 10), jnp.float32)}
    x, y = jax.ShapeDtypeStruct((32, 64), jnp.float32), jax.ShapeDtypeStruct((32,), jnp.int32)
    rates = jax.ShapeDtypeStruct((n,), jnp.float32)

    def make(lr, wd):
        return ox.adamw(lr, weight_decay=wd)

    def one_step(p, s, x, y, lr, wd):
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(x @ p["W"] + p["b"], y).mean()
        loss, g = jax.value_and_grad(loss_fn)(p)
        p, s = make(lr, wd).update_and_apply(g, s, p)
        return p, s, loss

    state = jax.eval_shape(jax.vmap(lambda p, lr, wd: make(lr, wd).init(p)), params, rates, rates)
    stacked = jax.jit(jax.vmap(one_step, in_axes=(0, 0, None, None, 0, 0)), donate_argnums=(0, 1))
    r = _quiet_report(stacked, params, state, x, y, rates, rates)
    assert r.copies == 0 and r.crossed == () and r.counts.custom_calls >= 1, str(r)

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(64, 128, rngs=rngs)
            self.bn = ox.nn.BatchNorm(128, rngs=rngs)
            self.l2 = nnx.Linear(128, 10, rngs=rngs)

        def __call__(self, x, train=True):
            return self.l2(nnx.relu(self.bn(self.l1(x), use_running_average=not train)))

    graphdef, params, stats = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
    tx = ox.adam(1e-3)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, opt_state, stats, x, y):
        def loss_fn(p):
            model = nnx.merge(graphdef, p, stats, copy=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(model(x, train=True), y).mean()
            return loss, nnx.state(model, nnx.BatchStat)

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params, opt_state = tx.update_and_apply(grads, opt_state, params)
        return params, opt_state, stats, loss

    r = _quiet_report(step, params, tx.init(params), stats, x, y)
    assert r.copies == 0 and r.crossed == () and r.counts.custom_calls >= 2, str(r)  # BN kernels + the update
