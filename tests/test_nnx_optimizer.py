"""Every stateful feature through `nnx.Optimizer`, as Flax NNX users train, against the functional step
on the same model: 8-bit moments (adamw, lion, sgd's accumulator), MultiSteps and apply_if_finite
around them, Kahan-compensated bf16 params, plain f32. NNX wraps each state array in a Variable and
writes the new state back with `nnx.update` every step, which must give back the same state tree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_ext as ox

INT8 = ox.int8_blockwise


class MLP(nnx.Module):
    """Odd sizes: 8-bit leaves (>= 4096 elements, ragged last block) beside small f32 ones."""

    def __init__(self, *, rngs, dtype=jnp.float32):
        self.l1 = nnx.Linear(37, 129, param_dtype=dtype, rngs=rngs)
        self.l2 = nnx.Linear(129, 5, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.gelu(self.l1(x)))


def _loss(model, x, y):
    return jnp.mean((model(x).astype(jnp.float32) - y) ** 2)


OPTIMIZERS = {
    "adamw_int8": lambda: ox.adamw(3e-3, mu_dtype=INT8, nu_dtype=INT8),
    "lion_int8": lambda: ox.lion(1e-3, mu_dtype=INT8),
    "sgd_int8": lambda: ox.sgd(1e-2, 0.9, accumulator_dtype=INT8),
    "multisteps_adamw_int8": lambda: optax.MultiSteps(ox.adamw(3e-3, mu_dtype=INT8, nu_dtype=INT8), 2),
    "apply_if_finite_lion_int8": lambda: ox.apply_if_finite(ox.lion(1e-3, mu_dtype=INT8), 3),
    "clip_adamw": lambda: ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(3e-3)),
    "adamw_kahan_bf16": lambda: ox.adamw(1e-4, kahan_sum=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_nnx_optimizer_equals_the_functional_step(key, name):
    dtype = jnp.bfloat16 if "bf16" in name else jnp.float32
    k_model, k_x, k_y = jax.random.split(key, 3)
    x, y = jax.random.normal(k_x, (16, 37)), jax.random.normal(k_y, (16, 5))

    model = MLP(rngs=nnx.Rngs(k_model), dtype=dtype)
    opt = nnx.Optimizer(model, OPTIMIZERS[name](), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, opt, x, y):
        grads = nnx.grad(_loss)(model, x, y)
        opt.update(model, grads)

    reference = MLP(rngs=nnx.Rngs(k_model), dtype=dtype)
    graphdef, params = nnx.split(reference, nnx.Param)
    tx = OPTIMIZERS[name]()
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(lambda p: _loss(nnx.merge(graphdef, p), x, y))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(5):
        xi = x * (1.0 + 0.1 * i)
        nnx_step(model, opt, xi, y)
        params, state = step(params, state, xi, y)
    got = nnx.state(model, nnx.Param)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # The state NNX holds has the functional state's structure and values (QuantizedArray leaves included).
    held, state = nnx.as_pure(opt.opt_state), nnx.as_pure(state)
    assert jax.tree.structure(held) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(held), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if "int8" in name:
        assert any(
            isinstance(x, ox.QuantizedArray)
            for x in jax.tree.leaves(held, is_leaf=lambda x: isinstance(x, ox.QuantizedArray))
        )
