"""Every public optimizer's step lowers to its kernels on every Pallas backend, checked from a CPU.

The interpreters run a kernel's jaxpr, not its lowering: a primitive that a backend cannot lower
(Mosaic GPU has no rule for `is_finite`, say) passes every interpreted test and fails only when
the step is compiled for the accelerator. So each optimizer's donated `update_and_apply` step is
lowered here for CUDA (Mosaic GPU, Triton) and TPU (Mosaic) on a small ragged tree with a bf16 leaf,
and must reach that backend's kernels and no other's. The optimizers are found in
`optax_ext.__all__` (every factory whose first argument is `learning_rate`), so a new one is
checked without being listed here.
"""

import inspect
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import optax_ext as ox
from optax_ext.kernels import lower_for
from optax_ext.kernels.backend import mosaic_gpu_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lowering_report import analyze_stablehlo  # noqa: E402

PARAMS = {
    "bias": jax.ShapeDtypeStruct((7,), jnp.float32),
    "kernel": jax.ShapeDtypeStruct((129, 5), jnp.float32),
    "embed": jax.ShapeDtypeStruct((3000,), jnp.bfloat16),
}
PLATFORM = {"mosaic_gpu": "cuda", "triton": "cuda", "mosaic": "tpu"}
BACKENDS = [
    pytest.param("mosaic_gpu", marks=pytest.mark.skipif(not mosaic_gpu_available(), reason="needs jax >= 0.12")),
    "triton",
    "mosaic",
]
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_step_lowers_to_the_backends_kernels(name, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases, add_noise without a key: not the point here
        tx = FACTORIES[name]()
    state = jax.eval_shape(tx.init, PARAMS)

    def step(params, state, grads):
        return tx.update_and_apply(grads, state, params)

    text = lower_for(
        step, PARAMS, state, PARAMS, platform=PLATFORM[backend], backend=backend, donate_argnums=(0, 1)
    ).as_text()
    kernels = analyze_stablehlo(text)["kernels_by_backend"]
    assert kernels[backend] >= 1, (name, kernels)
    assert sum(kernels.values()) == kernels[backend], (name, kernels)
