"""The contract of a `Rule`: typed step-wide scalars, and an elementwise `element`."""

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import assert_trees_close, random_tree

import optax_ext as ox
from optax_ext import rule
from optax_ext.fusion import NoScalars, PerLeaf, Rule


def _stateless_rule(element, scalars=lambda st, u, p: NoScalars(), scalars_type=NoScalars, name="scale_by_foo"):
    return Rule(name, optax.EmptyState, (), scalars, element, lambda st, sl: st, scalars_type=scalars_type)


# --------------------------------------------------------------------------------------------
# Typed scalars


class _ShiftScalars(NamedTuple):
    step: Any
    shift: Any  # PerLeaf
    offset: Any = None  # None: not sent to the kernel


def _shift(offset=None):
    def scalars(state, updates, params):
        shifts = [jnp.float32(i) for i in range(len(jax.tree.leaves(updates)))]
        return _ShiftScalars(step=0.5, shift=PerLeaf(jax.tree.structure(updates).unflatten(shifts)), offset=offset)

    def element(g, p, slots, s: _ShiftScalars):
        return s.step * g + s.shift + (0.0 if s.offset is None else s.offset), ()

    return ox.fusable(lambda params: optax.EmptyState(), _stateless_rule(element, scalars, _ShiftScalars))


@pytest.mark.parametrize("backend", ["xla", "interpret"])
@pytest.mark.parametrize("offset", [None, 2.0])
def test_named_tuple_scalars_reach_the_element(backend, offset, key):
    """Shared and per-leaf fields, and a field left None, through both the XLA path and the kernels."""
    g = random_tree(key)
    tx = ox.chain(_shift(offset), ox.scale(3.0))
    expected = jax.tree.map(
        lambda x, i: 3.0 * (0.5 * x + i + (offset or 0.0)),
        g,
        jax.tree.structure(g).unflatten(range(len(jax.tree.leaves(g)))),
    )
    with ox.kernels.use_backend(backend):
        out, _ = jax.jit(tx.update)(g, tx.init(g))
    assert_trees_close(out, expected, rtol=1e-6, atol=1e-6)


def test_scalars_of_another_type_are_a_type_error(key):
    g = random_tree(key)

    class _Step(NamedTuple):
        step: Any

    dict_rule = _stateless_rule(lambda g, p, sl, s: (s.step * g, ()), lambda st, u, p: {"step": 2.0}, _Step)
    tx = ox.fusable(lambda params: optax.EmptyState(), dict_rule)
    with pytest.raises(TypeError, match=r"scale_by_foo: Rule.scalars must return a _Step .* got dict"):
        tx.update(g, tx.init(g))
    with pytest.raises(TypeError, match="scalars_type must be a NamedTuple class"):
        _stateless_rule(lambda g, p, sl, s: (g, ()), scalars_type=dict)


def test_every_library_rule_declares_named_tuple_scalars(key):
    params = random_tree(key)
    txs = [
        ox.adamw(1e-3, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
        ox.nadam(1e-3),
        ox.amsgrad(1e-3),
        ox.adabelief(1e-3),
        ox.yogi(1e-3),
        ox.lion(1e-3),
        ox.rmsprop(1e-3, centered=True),
        ox.sgd(1e-3, 0.9),
        ox.lamb(1e-3),
        ox.lars(1e-3),
        ox.ema(0.9),
        ox.clip(1.0),
        ox.clip_by_block_rms(1.0),
        ox.scale(2.0),
        ox.scale_by_param_block_rms(),
        ox.kahan_summation(),
        ox.freeze(r"w0"),
        ox.add_l1(0.1),
        ox.l1_shrinkage(0.1, 0.1),
        ox.l2_sp(0.1, params),
        ox.ewc(params, params, 0.1),
        ox.add_l2(0.1),
        ox.scale_by_learning_rate(optax.constant_schedule(0.1)),
    ]
    seen = set()
    for tx in txs:
        for atom in tx.atoms:
            if atom.rule is not None:
                seen.add(atom.rule.name)
                assert issubclass(atom.rule.scalars_type, tuple), atom.rule.name
                # Only the identity (sgd or rmsprop without momentum) has no scalars.
                assert atom.rule.scalars_type._fields or atom.rule.name == "identity", atom.rule.name
        jax.eval_shape(tx.update, params, tx.init(params), params)  # each rule's scalars are its scalars_type
    assert len(seen) >= 20, seen


# --------------------------------------------------------------------------------------------
# Rule.element must be elementwise


@pytest.mark.parametrize(
    "body,primitive",
    [
        (lambda g: g - jnp.sum(g), "reduce_sum"),
        (lambda g: g / jnp.max(jnp.abs(g)), "reduce_max"),
        (lambda g: jax.jit(jnp.cumsum)(g), "cumsum"),  # inside a nested jit
        (lambda g: g[jnp.array([0, 0, 1])], "gather"),
        (lambda g: g[::-1], "rev"),
        (lambda g: g * (g @ g), "dot_general"),
        (lambda g: jnp.sort(g), "sort"),
        (lambda g: g * jnp.arange(3.0), "iota"),
    ],
    ids=["sum", "max", "cumsum", "gather", "rev", "dot", "sort", "iota"],
)
def test_non_elementwise_element_is_rejected(body, primitive):
    message = f"scale_by_foo: Rule.element must be elementwise (it runs blockwise in kernels); found {primitive}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _stateless_rule(lambda g, p, slots, s: (body(g), ()))


def test_elementwise_element_is_accepted():
    """Selects, clips, casts, scalar broadcasts, custom-derivative and jitted helpers are elementwise."""

    class _Clip(NamedTuple):
        limit: Any

    def element(g, p, slots, s: _Clip):
        x = jnp.where(g > 0, jnp.log1p(g), jnp.zeros_like(g)) + jax.nn.relu(g) + jax.nn.gelu(g)
        x = jax.jit(jnp.clip)(x, -s.limit, s.limit).astype(jnp.bfloat16).astype(jnp.float32)
        return x, ()

    _stateless_rule(element, scalars_type=_Clip)


def test_element_reading_an_undeclared_scalar_is_a_type_error():
    with pytest.raises(TypeError, match="scale_by_foo: could not trace Rule.element .* NoScalars"):
        _stateless_rule(lambda g, p, slots, s: (s.step * g, ()))


def test_the_check_runs_once_per_element_code_and_flags(monkeypatch):
    traced = []
    real = jax.make_jaxpr

    def counting(fn, *args, **kwargs):
        traced.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(rule, "_CHECKED", set())
    monkeypatch.setattr(jax, "make_jaxpr", counting)
    ox.adam(1e-3)
    first = len(traced)
    assert first == 2  # scale_by_adam, scale_by_learning_rate
    for _ in range(5):
        ox.adam(1e-3)
    assert len(traced) == first
    ox.adam(1e-3, nesterov=True)  # another flag closed over: another trace of the same code
    assert len(traced) == first + 1


def test_every_library_element_passes_the_check():
    """Each optimizer is checked when built; build every flag combination of the moment rules."""
    for nesterov in (False, True):
        ox.scale_by_adam(nesterov=nesterov), ox.scale_by_belief(nesterov=nesterov)
        ox.scale_by_momentum(nesterov=nesterov)
    for centered in (False, True):
        for bias_correction in (False, True):
            for eps_in_sqrt in (False, True):
                ox.scale_by_rms(centered=centered, bias_correction=bias_correction, eps_in_sqrt=eps_in_sqrt)
    for mode in ("hard", "smooth", "refined"):
        ox.scale_by_lion(mode=mode)
    for mu in (False, True):
        for nu in (False, True):
            ox.scale_by_amsgrad(bias_correction_mu=mu, bias_correction_nu=nu)
    ox.scale_by_yogi(), ox.ema(0.9, debias=False), ox.add_decayed_weights(0.0), ox.freeze(True)
