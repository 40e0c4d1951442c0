"""Optax's schedules under Optax's names (optax_ext.schedules.optax_signatures): Optax's positional
order and defaults, Optax's values on fresh random arguments, and our own decays refusing a floor
above their start (Optax's `alpha` passed where our absolute `min_value` goes)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ext as ox
from optax_ext.schedules import optax_signatures

NAMES = optax_signatures.__all__
SEEDS = range(5)


@pytest.mark.parametrize("name", NAMES)
def test_signature_is_optax_s(name):
    ours, theirs = inspect.signature(getattr(ox, name)), inspect.signature(getattr(optax, name))
    assert [(p.name, p.default) for p in ours.parameters.values()] == [
        (p.name, p.default) for p in theirs.parameters.values()
    ]


def _cases(rng):
    lr, lo = rng.uniform(1e-4, 1.0), rng.uniform(0.0, 0.5)
    T, w, begin = int(rng.integers(1, 300)), int(rng.integers(0, 40)), int(rng.integers(0, 20))
    power, exponent = rng.uniform(0.3, 3.0), rng.uniform(0.5, 2.5)
    bounds = {int(b): float(s) for b, s in zip(rng.integers(0, 200, 3), rng.uniform(0.0, 2.0, 3))}
    return {
        "constant_schedule": (lr,),
        "cosine_decay_schedule": (lr, T, lo, exponent),
        "linear_schedule": (lr, lo * lr, T, begin),
        "polynomial_schedule": (lr, lo * lr, power, T, begin),
        "piecewise_constant_schedule": (lr, bounds),
        "warmup_constant_schedule": (lo * lr, lr, w),
        "warmup_cosine_decay_schedule": (lo * lr, lr, w, w + T, lo * lr / 3, exponent),
    }, T + w + begin


def _polynomial_f64(init, end, power, T, begin=0):
    """Optax's polynomial formula in float64 (Optax's own f32 one ends 6e-8 ** power off: see below)."""
    return lambda t: (init - end) * ((T - np.clip(np.asarray(t, np.float64) - begin, 0, T)) / T) ** power + end


@pytest.mark.parametrize("seed", SEEDS)
def test_values_equal_optax(seed):
    """Normwise (relative to the largest value): a difference of large terms may lose relative accuracy."""
    cases, horizon = _cases(np.random.default_rng(seed))
    steps = jnp.concatenate([jnp.arange(0, horizon + 20), jnp.asarray([10 * horizon, 2**31 - 1])])
    for name, args in cases.items():
        got = np.asarray(getattr(ox, name)(*args)(steps), np.float64)
        if name in ("linear_schedule", "polynomial_schedule"):
            full = args if name == "polynomial_schedule" else (*args[:2], 1.0, *args[2:])
            expected = _polynomial_f64(*full)(np.asarray(steps))
        else:
            expected = np.asarray(jax.vmap(getattr(optax, name)(*args))(steps), np.float64)
        scale = max(np.max(np.abs(expected)), 1e-30)
        assert np.max(np.abs(got - expected)) <= 4e-7 * scale, (name, args)


@pytest.mark.parametrize("T", [47, 55, 97])
def test_polynomial_starts_and_ends_exactly(T):
    """XLA computes c / T as c * (1 / T), not exactly 1 at c = T: with power 0.554, 6e-8 ** power puts
    the end 1e-4 * (init - end) off (Optax's polynomial_schedule, jax 0.12 on CPU). Ours sets both ends."""
    s = jax.jit(ox.polynomial_schedule(0.0857406, 0.0101521, 0.554, T, 17))
    assert float(s(17 + T)) == np.float32(0.0101521) and float(s(0)) == np.float32(0.0857406)
    assert float(ox.linear_schedule(0.0, 1.0, T)(0)) == 0.0 and float(ox.linear_schedule(0.0, 1.0, T)(T)) == 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_join_schedules_mixes_ours_and_optax_s(seed):
    rng = np.random.default_rng(seed)
    b1, b2 = sorted(int(x) for x in rng.choice(np.arange(1, 100), 2, replace=False))
    parts = [ox.linear_schedule(0.0, 1.0, b1), optax.cosine_decay_schedule(1.0, 50, 0.1), ox.constant_schedule(0.1)]
    theirs = optax.join_schedules(
        [optax.linear_schedule(0.0, 1.0, b1), parts[1], optax.constant_schedule(0.1)], [b1, b2]
    )
    steps = jnp.arange(0, b2 + 30)
    # Normwise: 1/47 computed as 1 - 46/47 keeps only the absolute accuracy of the terms.
    np.testing.assert_allclose(ox.join_schedules(parts, [b1, b2])(steps), jax.vmap(theirs)(steps), rtol=0, atol=4e-7)


def test_cosine_decay_schedule_third_argument_is_a_fraction():
    # The reproducer: ox.cosine_decay(1e-3, 100, 0.1) used to end at 0.1, a 100x rise.
    np.testing.assert_allclose(ox.cosine_decay_schedule(1e-3, 100, 0.1)(100), 1e-4, rtol=1e-6)
    with pytest.raises(ValueError, match=r"cosine_decay: min_value=0.1 is above init_value=0.001.*alpha"):
        ox.cosine_decay(1e-3, 100, 0.1)
    rising = ox.cosine_decay(1e-3, 100, 0.1, increasing=True)  # asked for explicitly
    np.testing.assert_allclose(rising(100), 0.1, rtol=1e-6)
    with pytest.raises(ValueError, match=r"warmup_cosine: end_value=0.5 is above peak_value=0.1"):
        ox.warmup_cosine(0.1, 10, 100, end_value=0.5)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ox.cosine_decay_schedule(1.0, 0), r"cosine_decay_schedule: decay_steps must be a positive integer"),
        (lambda: ox.linear_schedule(1.0, 0.0, 0), r"linear_schedule: transition_steps must be a positive integer"),
        (lambda: ox.polynomial_schedule(1.0, 0.0, 2, 10, -1), r"transition_begin must be an integer >= 0"),
        (lambda: ox.warmup_cosine_decay_schedule(0.0, 1.0, 10, 10), r"decay_steps must be > warmup_steps"),
        (lambda: ox.piecewise_constant_schedule(1.0, {5: -0.5}), r"boundaries_and_scales\[5\] must be a finite"),
        (lambda: ox.constant_schedule("0.1"), r"constant: value must be a real number"),
    ],
)
def test_meaningless_arguments_are_errors_naming_them(make, match):
    # Optax builds a constant schedule (or a negative one) from these; we say what is wrong.
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def test_traced_hyperparameters_work_under_inject_hyperparams():
    tx = optax.inject_hyperparams(ox.sgd)(learning_rate=ox.warmup_cosine_decay_schedule(0.0, 0.1, 3, 10, 0.01))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    lrs = []
    for _ in range(12):
        _, state = jax.jit(tx.update)(params, state, params)
        lrs.append(float(state.hyperparams["learning_rate"]))
    expected = jax.vmap(optax.warmup_cosine_decay_schedule(0.0, 0.1, 3, 10, 0.01))(jnp.arange(12))
    np.testing.assert_allclose(lrs, expected, rtol=1e-6, atol=1e-9)
