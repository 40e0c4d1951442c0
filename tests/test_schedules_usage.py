"""optax_ext.schedules in use: driving Optax and optax_ext optimizers, and `schedules.plot`."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_schedules import torch_cyclic, torch_one_cycle

from optax_ext import schedules as S

# ----------------------------------------------------------------------------
# Inside Optax optimizers


def _tree(rng, dtype=np.float32):
    return {
        "w": jnp.asarray(rng.normal(size=(3, 5)), dtype),
        "b": jnp.asarray(rng.normal(size=(7,)), dtype),
        "s": jnp.asarray(rng.normal(), dtype),
    }


def _run(opt, params, grads, override=None):
    state = opt.init(params)
    for i, g in enumerate(grads):
        if override is not None:
            hp = dict(state.hyperparams)
            hp.update({k: jnp.asarray(v(i), jnp.float32) for k, v in override.items()})
            state = state._replace(hyperparams=hp)
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_schedule_as_adamw_learning_rate():
    rng = np.random.default_rng(0)
    params = _tree(rng)
    grads = [_tree(rng) for _ in range(8)]
    sched = S.warmup_cosine(1e-2, 3, 8, init_value=1e-3)

    def closed(t):  # the same schedule, written out
        if t < 3:
            return 1e-3 + (1e-2 - 1e-3) * t / 3
        return 0.5 * 1e-2 * (1 + math.cos(math.pi * min(t - 3, 5) / 5))

    got = _run(optax.adamw(learning_rate=sched, weight_decay=0.1), params, grads)
    want = _run(
        optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.1),
        params,
        grads,
        override={"learning_rate": closed},
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
    # The schedule matters: a constant learning rate gives other parameters.
    const = _run(optax.adamw(learning_rate=1e-2, weight_decay=0.1), params, grads)
    assert not np.allclose(np.asarray(const["w"]), np.asarray(got["w"]), atol=1e-5)


def test_momentum_schedules_as_b1_and_sgd_momentum():
    rng = np.random.default_rng(1)
    params = _tree(rng)
    grads = [_tree(rng) for _ in range(10)]
    T = 10
    lr, mom = S.one_cycle(0.1, T), S.one_cycle_momentum(T)
    lr_c = lambda t: torch_one_cycle(t, T, 0.3, "cos", False, (0.1 / 25, 0.1, 0.1 / 25 / 1e4), (0.85, 0.95))[0]
    mom_c = lambda t: torch_one_cycle(t, T, 0.3, "cos", False, (0.1 / 25, 0.1, 0.1 / 25 / 1e4), (0.85, 0.95))[1]
    got = _run(optax.inject_hyperparams(optax.adam)(learning_rate=lr, b1=mom), params, grads)
    want = _run(
        optax.inject_hyperparams(optax.adam)(learning_rate=0.0, b1=0.0),
        params,
        grads,
        override={"learning_rate": lr_c, "b1": mom_c},
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)

    clr = lambda t: torch_cyclic(t, 0.01, 0.1, 3, 2, "triangular", 1.0)
    clm = lambda t: torch_cyclic(t, 0.8, 0.9, 3, 2, "triangular", 1.0, momentum=True)
    got = _run(
        optax.inject_hyperparams(optax.sgd)(
            learning_rate=S.cyclical(0.01, 0.1, 3, 2), momentum=S.cyclical_momentum(3, 2)
        ),
        params,
        grads,
    )
    want = _run(
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.0),
        params,
        grads,
        override={"learning_rate": clr, "momentum": clm},
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


# ----------------------------------------------------------------------------
# plot


def test_plot_one_line_per_schedule():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    scheds = {
        "cosine": S.cosine_decay(1.0, 30, 0.1),
        "one cycle": S.one_cycle(1.0, 40),
        "optax exp": optax.exponential_decay(1.0, 5, 0.5),
    }
    fig = S.plot(scheds, 40, title="lr", log_y=True)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert len(ax.lines) == 3
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(scheds)
    assert ax.get_yscale() == "log" and ax.get_title() == "lr"
    for line, s in zip(ax.lines, scheds.values()):
        np.testing.assert_array_equal(line.get_xdata(), np.arange(40))
        np.testing.assert_allclose(line.get_ydata(), np.asarray(s(jnp.arange(40))), rtol=1e-6)
    x = np.linspace(0, 50, 201)
    fig = S.plot({"c": S.constant(0.2), "w": S.linear_warmup(0.5, 10)}, x)
    ys = [line.get_ydata() for line in fig.axes[0].lines]
    np.testing.assert_allclose(ys[0], np.full(x.shape, 0.2), rtol=1e-6)
    np.testing.assert_allclose(ys[1], np.where(x < 10, 0.5 * x / 10, 0.5), rtol=1e-6)
    fig.savefig(__import__("io").BytesIO(), format="png")


def test_plot_bad_arguments():
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="at least one"):
        S.plot({}, 10)
    with pytest.raises(TypeError, match=r"schedules\['x'\] must be a callable"):
        S.plot({"x": 0.1}, 10)
    with pytest.raises(TypeError, match="must be a dict"):
        S.plot([S.constant(1.0)], 10)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        S.plot({"c": S.constant(1.0)}, 0)
    with pytest.raises(ValueError, match="1-D"):
        S.plot({"c": S.constant(1.0)}, np.zeros((2, 2)))


def test_plot_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"examples.*optax_ext\[examples\]"):
        S.plot({"c": S.constant(1.0)}, 10)
