"""Every public optimizer's step lowers to its kernels on every Pallas backend, checked from a CPU, and
compiles for an H100 on the default CUDA backend (Mosaic GPU).

The interpreters run a kernel's jaxpr, not its lowering: a primitive that a backend cannot lower
(Mosaic GPU has no rule for `is_finite`, say) passes every interpreted test and fails only when
the step is compiled for the accelerator. So each optimizer's donated `update_and_apply` step is
lowered here for CUDA (Mosaic GPU, Triton) and TPU (Mosaic) on a small ragged tree with a bf16 leaf,
and must reach that backend's kernels and no other's. The optimizers are found in
`optax_ext.__all__` (every factory whose first argument is `learning_rate`), so a new one is
checked without being listed here. Lowering stops at Mosaic GPU's serialized kernel; XLA's compile
for an H100 (`optax_ext.kernels.aot`, no GPU needed) runs the rest (Mosaic GPU's passes, LLVM,
ptxas), which is where a kernel that lowers can still be rejected.
"""

import inspect
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from conftest import ACCELERATOR_BACKENDS

import optax_ext as ox
from optax_ext.kernels import lower_for
from optax_ext.kernels.backend import mosaic_gpu_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lowering_report import BACKEND_PLATFORMS, analyze_stablehlo  # noqa: E402

PARAMS = {
    "bias": jax.ShapeDtypeStruct((7,), jnp.float32),
    "kernel": jax.ShapeDtypeStruct((129, 5), jnp.float32),
    "embed": jax.ShapeDtypeStruct((3000,), jnp.bfloat16),
}
# Not a kernel step: its line search needs the loss (`value`, `grad`, `value_fn`) at every update.
NOT_A_STEP = {"lbfgs"}


def _factories() -> dict:
    found = {}
    for name in ox.__all__:
        f = getattr(ox, name)
        if name in NOT_A_STEP or inspect.isclass(f) or not callable(f):
            continue
        try:
            first = next(iter(inspect.signature(f).parameters), None)
        except (TypeError, ValueError):
            continue
        if first == "learning_rate":
            found[name] = lambda f=f: f(1e-3)
    return found


FACTORIES = _factories() | {
    # The wrappers and storage options that change what a kernel computes.
    "apply_if_finite(adamw)": lambda: ox.apply_if_finite(ox.adamw(1e-3), 3),
    "clip_by_global_norm+adamw": lambda: ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3)),
    "adamw(int8 moments)": lambda: ox.adamw(1e-3, mu_dtype=ox.int8_blockwise, nu_dtype=ox.int8_blockwise),
}


def test_the_optimizers_are_found():
    assert {"sgd", "adamw", "lamb", "lars", "lion", "adafactor", "muon", "prodigy", "adan"} <= set(FACTORIES)
    assert len(FACTORIES) >= 40, sorted(FACTORIES)


def _step_and_state(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases, add_noise without a key: not the point here
        tx = FACTORIES[name]()

    def step(params, state, grads):
        return tx.update_and_apply(grads, state, params)

    return step, jax.eval_shape(tx.init, PARAMS)


@pytest.mark.parametrize("backend", ACCELERATOR_BACKENDS)
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_step_lowers_to_the_backends_kernels(name, backend):
    step, state = _step_and_state(name)
    with warnings.catch_warnings():
        # every fused run in kernels: none left to XLA for a primitive the backend cannot lower
        warnings.filterwarnings("error", message="optax_ext: this fused update uses")
        text = lower_for(
            step, PARAMS, state, PARAMS, platform=BACKEND_PLATFORMS[backend], backend=backend, donate_argnums=(0, 1)
        ).as_text()
    kernels = analyze_stablehlo(text)["kernels_by_backend"]
    assert kernels[backend] >= 1, (name, kernels)
    assert sum(kernels.values()) == kernels[backend], (name, kernels)


@pytest.mark.skipif(not mosaic_gpu_available(), reason="needs jax >= 0.12")
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_step_compiles_for_h100_on_mosaic_gpu(name):
    from optax_ext.kernels import aot
    from optax_ext.step_report import count_hlo

    if not aot.available():
        pytest.skip("compiling for an H100 needs optax_ext[gpu-aot]")
    step, state = _step_and_state(name)
    compiled = aot.compile_for(step, PARAMS, state, PARAMS, backend="mosaic_gpu", donate_argnums=(0, 1))
    assert count_hlo(compiled.as_text()).custom_calls >= 1, name
