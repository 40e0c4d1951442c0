"""ox.inspect_step and count_hlo: XLA's compiled program, read back, on this CPU (both stacks).

The pairing JAX chooses for donated buffers is recomputed here another way, from its documented
rule (each output, in order, takes the first unused donated input of the same shape and dtype),
and compared with the aliasing XLA reports in the compiled module.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ext as ox
from optax_ext.step_report import count_hlo

SHAPES = [(), (7,), (129, 257), (1000,), (3, 5, 7), (64, 64)]


def _params(seed=0, shapes=SHAPES):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return {f"w{i}": jax.random.normal(k, s) for i, (k, s) in enumerate(zip(keys, shapes))}


def _tx():
    return ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3))


def _steps(tx):
    def in_output_order(params, state, grads):
        return tx.update_and_apply(grads, state, params)

    def crossed(grads, state, params):
        return tx.update_and_apply(grads, state, params)

    return jax.jit(in_output_order, donate_argnums=(0, 1)), jax.jit(crossed, donate_argnums=(1, 2))


def _jax_pairing(args, donated_argnums, outputs):
    """{flat output index: flat input index}: JAX's rule, recomputed from shapes and dtypes alone."""
    flat_in = []
    for a, arg in enumerate(args):
        flat_in += [(a in donated_argnums, x) for x in jax.tree.leaves(arg)]
    used, pairs = set(), {}
    for j, out in enumerate(jax.tree.leaves(outputs)):
        for i, (donated, x) in enumerate(flat_in):
            if donated and i not in used and x.shape == out.shape and x.dtype == out.dtype:
                used.add(i)
                pairs[j] = i
                break
    return pairs


def test_donation_in_output_order_is_in_place_and_quiet():
    params = _params()
    tx = _tx()
    state = tx.init(params)
    good, _ = _steps(tx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = ox.inspect_step(good, params, state, params)
    assert report.copies == 0 and report.copied_per_param == 0
    assert report.crossed == ()
    assert report.params == sum(x.size for x in jax.tree.leaves(params))
    # Every donated leaf (params, then the whole state) holds the output at the same place.
    n_donated = len(jax.tree.leaves(params)) + len(jax.tree.leaves(state))
    assert len(report.pairs) == n_donated
    assert all(inp.split("[", 1)[1:] and out.startswith("output") for inp, out in report.pairs)


def test_crossed_donation_copies_and_warns_naming_the_leaves():
    params = _params(1)
    tx = _tx()
    state = tx.init(params)
    _, crossed = _steps(tx)
    with pytest.warns(UserWarning, match=r"output\[0\]\['w\d'\] is written into donated state.*mu") as record:
        report = ox.inspect_step(crossed, params, state, params)
    assert "donate_argnums=(0, 1)" in str(record[0].message)
    assert report.copies > 0 and report.copied_per_param >= 1.0
    # The pairs XLA reports are the ones JAX's rule gives.
    outputs = jax.eval_shape(crossed, params, state, params)
    expected = _jax_pairing((params, state, params), (1, 2), outputs)
    flat_out = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(outputs)[0]]
    names = {out: inp for inp, out in report.pairs}
    in_names = [
        n
        for a, arg in zip(("grads", "state", "params"), (params, state, params))
        for n in (a + jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(arg)[0])
    ]
    for j, i in expected.items():
        assert names["output" + flat_out[j]] == in_names[i]
    assert len(report.crossed) > 0


def test_optax_step_reads_the_same_way():
    params = _params(2)
    tx = optax.adamw(1e-3)
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    report = ox.inspect_step(jax.jit(step, donate_argnums=(0, 1)), params, state, params)
    assert report.copies == 0 and report.crossed == ()
    assert "launches" in str(report) and "copied" in str(report)


def test_params_argument_sets_the_denominator():
    params = _params(3)
    tx = _tx()
    state = tx.init(params)
    good, _ = _steps(tx)
    assert ox.inspect_step(good, params, state, params, params=1000).params == 1000
    assert ox.inspect_step(good, params, state, params, params={"a": jnp.zeros((3, 4))}).params == 12


HLO = (
    "HloModule jit_step, is_scheduled=true, input_output_alias={ {0}: (2, {}, may-alias), {1}: (0, {}, may-alias) }, "
    "entry_computation_layout={(f32[8]{0}, f32[8]{0}, f32[4,2]{1,0})->(f32[4,2]{1,0}, f32[8]{0})}"
    """

%fused_add (p0: f32[8], p1: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  %p1 = f32[8]{0} parameter(1)
  ROOT %add = f32[8]{0} add(%p0, %p1)
}

%body (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %t = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[8]{0} get-tuple-element(%t), index=1
  %f = f32[8]{0} fusion(%x, %x), kind=kLoop, calls=%fused_add
  ROOT %r = (s32[], f32[8]{0}) tuple(%i, %f)
}

%cond (t: (s32[], f32[8])) -> pred[] {
  %t = (s32[], f32[8]{0}) parameter(0)
  ROOT %c = pred[] constant(false)
}

ENTRY %main (a: f32[8], b: f32[8], c: f32[4,2]) -> (f32[4,2], f32[8]) {
  %a = f32[8]{0} parameter(0), metadata={op_name="g[\\'w\\']"}
  %b = f32[8]{0} parameter(1), metadata={op_name="s[0].mu"}
  %c = f32[4,2]{1,0} parameter(2), metadata={op_name="p"}
  %k = (f32[8]{0}, /*index=1*/f32[8]{0}) custom-call(%a, %b), custom_call_target="__gpu$xla.gpu.triton"
  %k0 = f32[8]{0} get-tuple-element(%k), index=0
  %copy = f32[4,2]{1,0} copy(%c)
  %cs = (f32[8]{0}, f32[8]{0}, u32[]) copy-start(%k0)
  %cd = f32[8]{0} copy-done(%cs)
  %z = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%z, %cd)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  %w1 = f32[8]{0} get-tuple-element(%w), index=1
  %s = f32[8]{0} sort(%w1), dimensions={0}, to_apply=%fused_add
  ROOT %out = (f32[4,2]{1,0}, f32[8]{0}) tuple(%copy, %s)
}
"""
)


def test_count_hlo_on_a_module_written_by_hand():
    """Known by construction: 1 custom call, 2 copies (copy, copy-start) of 8 + 8 elements, 1 fusion
    inside the while body (counted once), 1 sort; free ops and -done halves launch nothing."""
    c = count_hlo(HLO)
    assert (c.custom_calls, c.copies, c.fusions, c.other) == (1, 2, 1, 1)
    assert c.launches == 5
    assert c.copied_elements == 8 + 8
    assert c.aliases == {0: 2, 1: 0}
    assert c.parameter_names == {0: "g['w']", 1: "s[0].mu", 2: "p"}


def test_count_hlo_needs_an_entry():
    with pytest.raises(ValueError, match="ENTRY"):
        count_hlo("HloModule m\n")


def test_inspect_step_accepts_a_plain_function():
    x = jnp.arange(6.0)
    report = ox.inspect_step(lambda a: (a * 2,), x)
    assert report.pairs == () and report.copies == 0


@functools.cache
def _aot():
    from optax_ext.kernels import aot

    return aot


def test_missing_aot_support_says_what_to_install(monkeypatch):
    aot = _aot()
    if aot.available():
        pytest.skip("the CUDA plugin is installed here: the error path is not reachable")
    with pytest.raises(aot.AotUnavailableError, match=r"gpu-aot|JAX_SKIP_CUDA_CONSTRAINTS_CHECK"):
        aot.compile_for(lambda x: x, np.zeros(3, np.float32))


def test_unknown_target_is_named():
    with pytest.raises(ValueError, match="target='a100'"):
        _aot().target_mesh("a100")
