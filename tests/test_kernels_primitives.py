"""Which elementwise primitives each kernel backend lowers, and what happens to a rule using another.

A `Rule.element` may use any primitive of `optax_ext.rule`'s elementwise allow-list, but Pallas'
backends lower different subsets (Mosaic GPU has no `floor`, `log1p` or `pow`; Triton no `erf`;
TPU no `expm1`). `optax_ext.kernels.backend.CANNOT_LOWER` lists, per backend, those that fail on
some supported jax; a fused run using one of them runs on XLA there, with a warning. Checked here:
every primitive *not* listed lowers in a fused-pass kernel on its backend (on this jax: the test runs
on the oldest and the newest stack), and a user's rule using a listed one gives XLA's numbers.
"""

import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ACCELERATOR_BACKENDS
from jax import lax

import optax_ext as ox
from optax_ext.kernels import lower_for, use_backend
from optax_ext.kernels.backend import CANNOT_LOWER
from optax_ext.kernels.elementwise import Job
from optax_ext.kernels.fused_pass import fused_pass_pallas
from optax_ext.rule import _ELEMENTWISE, NoScalars, Rule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lowering_report import BACKEND_PLATFORMS, analyze_stablehlo  # noqa: E402

WARNING = "optax_ext: this fused update uses"


def _positive(x):
    return x * x + 1.5


_BINARY = {"add", "atan2", "div", "max", "min", "mul", "nextafter", "pow", "rem", "sub"}
_SPECIAL = {
    "acosh": lambda x: lax.acosh(_positive(x)),
    "and": lambda x: jnp.where(lax.bitwise_and(x > 0, x < 1), x, 0.0),
    "or": lambda x: jnp.where(lax.bitwise_or(x > 0, x < 1), x, 0.0),
    "xor": lambda x: jnp.where(lax.bitwise_xor(x > 0, x < 1), x, 0.0),
    "not": lambda x: jnp.where(lax.bitwise_not(x > 0), x, 0.0),
    "select_n": lambda x: lax.select_n(x > 0, x, -x),
    "clamp": lambda x: lax.clamp(jnp.float32(-1), x, jnp.float32(1)),
    "integer_pow": lambda x: lax.integer_pow(x, 3),
    "reduce_precision": lambda x: lax.reduce_precision(x, 5, 10),
    "round": lambda x: lax.round(x, lax.RoundingMethod.TO_NEAREST_EVEN),
    "convert_element_type": lambda x: lax.convert_element_type(lax.convert_element_type(x, jnp.bfloat16), jnp.float32),
    "copy": lambda x: lax.copy_p.bind(x),
    "polygamma": lambda x: lax.polygamma(jnp.float32(1.0), _positive(x)),
    "zeta": lambda x: lax.zeta(_positive(x) + 1, jnp.float32(2.0)),
    "igamma": lambda x: lax.igamma(_positive(x), jnp.float32(1.0)),
    "igammac": lambda x: lax.igammac(_positive(x), jnp.float32(1.0)),
}
_OF_POSITIVE = {"log", "lgamma", "digamma", "sqrt", "rsqrt", "log1p", "cbrt", "bessel_i0e", "bessel_i1e"}
_OF_SMALL = {"atanh", "acos", "asin", "erf_inv"}
# Integer or complex only: not the math of an f32 element.
_NOT_F32 = {"clz", "population_count", "shift_left", "shift_right_arithmetic", "shift_right_logical"}
_NOT_F32 |= {"complex", "conj", "imag", "real", "copy_p"}


def _element(name):
    """An f32 -> f32 function whose jaxpr holds primitive `name`."""
    if name in _SPECIAL:
        return _SPECIAL[name]
    if name in ("eq", "ne", "lt", "le", "gt", "ge"):
        return lambda x: jnp.where(getattr(lax, name)(x, jnp.float32(0.5)), x, 1.0)
    f = getattr(lax, name)
    if name in _BINARY:
        return lambda x: f(_positive(x), jnp.float32(1.25))
    if name in _OF_POSITIVE:
        return lambda x: f(_positive(x))
    if name in _OF_SMALL:
        return lambda x: f(x * 0.1)
    return f


PRIMITIVES = sorted(_ELEMENTWISE - _NOT_F32)


def test_every_primitive_has_an_element():
    for name in PRIMITIVES:
        jaxpr = jax.make_jaxpr(_element(name))(jnp.ones(3))
        assert name in {e.primitive.name for e in jaxpr.eqns}, name


@pytest.mark.parametrize("backend", ACCELERATOR_BACKENDS)
@pytest.mark.parametrize("name", PRIMITIVES)
def test_each_primitive_not_listed_lowers_in_a_kernel(name, backend):
    if name in CANNOT_LOWER[backend]:
        pytest.skip(f"{name} is listed as not lowerable on {backend}: its runs take XLA")
    f = _element(name)

    def step(g):
        job = Job([g], [jnp.float32], jnp.zeros((0,)))
        return fused_pass_pallas(lambda xs, shared, leaf: [f(xs[0])], [job], jnp.zeros((1,)), backend=backend)

    g = jax.ShapeDtypeStruct((1000,), jnp.float32)
    text = lower_for(step, g, platform=BACKEND_PLATFORMS[backend], backend=backend).as_text()
    assert analyze_stablehlo(text)["kernels_by_backend"][backend] >= 1


# A user's rule with primitives some backend cannot lower: u = -lr * (floor(4 g) + log1p(g^2) + expm1(g / 4) + erf(g)).
def _fancy_rule():
    def element(g, p, slots, scalars):
        return -0.1 * (jnp.floor(4 * g) + jnp.log1p(g * g) + jnp.expm1(g / 4) + jax.scipy.special.erf(g)), ()

    rule = Rule("scale_by_fancy", optax.EmptyState, (), lambda st, u, p: NoScalars(), element, lambda st, sl: st)
    return ox.fusable(lambda params: optax.EmptyState(), rule)


def _closed_form(g):
    g = np.asarray(g, np.float64)
    from math import erf

    return -0.1 * (np.floor(4 * g) + np.log1p(g * g) + np.expm1(g / 4) + np.vectorize(erf)(g))


@pytest.mark.parametrize("backend", ACCELERATOR_BACKENDS)
def test_a_rule_the_backend_cannot_lower_runs_on_xla(backend):
    tx = _fancy_rule()
    params = {"w": jnp.zeros((7, 129)), "b": jnp.zeros((5,))}
    grads = jax.tree.map(
        lambda p, k: jax.random.normal(k, p.shape), params, {"w": jax.random.key(0), "b": jax.random.key(1)}
    )

    def step(p, s, g):
        return tx.update_and_apply(g, s, p)

    state = tx.init(params)
    with pytest.warns(UserWarning, match=WARNING):
        text = lower_for(step, params, state, grads, platform=BACKEND_PLATFORMS[backend], backend=backend).as_text()
    # the run is XLA's: no kernel left that cannot compile
    assert sum(analyze_stablehlo(text)["kernels_by_backend"].values()) == 0
    # No kernel left: the step runs here (a CPU) under the accelerator's backend, with XLA's numbers.
    with warnings.catch_warnings(), use_backend(backend):
        warnings.simplefilter("ignore")
        new_params, _ = jax.jit(step)(params, state, grads)
    for k in params:
        np.testing.assert_allclose(new_params[k], _closed_form(grads[k]), rtol=2e-6, atol=2e-6)
