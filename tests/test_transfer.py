"""Transfer learning: labels by path, freezing, fine-tuning, layer-wise LR decay, pretrained loading."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close
from flax import nnx

import optax_ext as ox
from optax_ext import transfer as T


class Net(nnx.Module):
    """embed -> 3 blocks (Linear + LayerNorm) -> head; odd sizes."""

    def __init__(self, din=5, width=7, dout=3, num_blocks=3, *, rngs):
        self.embed = nnx.Linear(din, width, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(num_blocks)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, dout, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.embed(x))
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.head(self.norm(x))


def _data(key, n=16, din=5, dout=3):
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (n, din)), jax.random.normal(k2, (n, dout))


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def _pure(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


EXPECTED_PATHS = {
    "embed/bias",
    "embed/kernel",
    "head/bias",
    "head/kernel",
    "norm/bias",
    "norm/scale",
    *(f"layers/{i}/{n}" for i in range(3) for n in ("bias", "kernel")),
}


def test_paths_of_nnx_state_pure_state_and_dict():
    model = Net(rngs=nnx.Rngs(0))
    st = nnx.state(model, nnx.Param)
    for tree in (st, nnx.as_pure(st), nnx.to_pure_dict(st)):
        named = T.named_leaves(tree)
        assert {p for p, _ in named} == EXPECTED_PATHS
        assert [id(x) for _, x in named] == [id(x) for x in jax.tree.leaves(tree)]


def test_label_params_rules_and_default():
    params = nnx.state(Net(rngs=nnx.Rngs(0)), nnx.Param)
    labels = T.label_params(params, {"backbone": [r"^embed/", r"^layers/"], "head": r"^head/"}, default="other")
    lab = {path: label for (path, _), label in zip(T.named_leaves(params), jax.tree.leaves(labels))}
    assert set(lab) == EXPECTED_PATHS
    for path, label in lab.items():
        expect = "backbone" if re.match(r"(embed|layers)/", path) else "head" if path.startswith("head/") else "other"
        assert label == expect, path
    # list of (regex, label): first match wins
    labels2 = T.label_params(nnx.to_pure_dict(params), [(r"kernel", "k"), (r"^head", "h")], default="d")
    assert labels2["head"]["kernel"] == "k" and labels2["head"]["bias"] == "h" and labels2["norm"]["scale"] == "d"
    with pytest.raises(ValueError, match="norm/scale"):
        T.label_params(params, {"a": r"kernel|bias"})
    with pytest.raises(ValueError, match="invalid regular expression"):
        T.label_params(params, {"a": "(unclosed"})
    with pytest.raises(TypeError, match="rules"):
        T.label_params(params, 42)
    with pytest.raises(ValueError, match="None"):
        T.label_params(params, {"a": "kernel"}, default=None)


def test_partition_by_path_gives_each_group_its_optimizer(key):
    params = {"backbone": {"w": jax.random.normal(key, (4, 3))}, "head": {"w": jnp.ones((3,)), "b": jnp.ones(())}}
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    tx = T.partition_by_path({"slow": optax.sgd(0.01), "fast": optax.sgd(1.0)}, {"slow": "^backbone", "fast": "^head"})
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(u["backbone"]["w"], -0.005)
    np.testing.assert_allclose(u["head"]["w"], -0.5)
    np.testing.assert_allclose(u["head"]["b"], -0.5)


def _train(model, tx, x, y, steps):
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(_loss)(model, x, y)
        opt.update(model, grads)

    for _ in range(steps):
        step(model, opt)
    return model


@pytest.mark.parametrize("how", ["freeze", "fine_tune"])
def test_frozen_params_bit_identical_after_100_steps(key, how):
    x, y = _data(key)
    model = Net(rngs=nnx.Rngs(1))
    before = _pure(model)
    frozen = [r"^embed/", r"^layers/[01]/"]
    if how == "freeze":  # weight decay before freeze must not move frozen params either
        tx = ox.chain(ox.adamw(1e-2, weight_decay=0.1), T.freeze(frozen))
    else:
        tx = T.fine_tune(optax.adamw(1e-2, weight_decay=0.1), frozen=frozen, head=r"^head/", head_lr_mult=10.0)
    _train(model, tx, x, y, 100)
    after = _pure(model)
    for (path, b), (_, a) in zip(T.named_leaves(before), T.named_leaves(after)):
        if any(re.search(p, path) for p in frozen):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), path
        else:
            assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-3, path


def test_fine_tune_head_lr_mult_and_no_state_for_frozen(key):
    params = {"backbone": {"w": jax.random.normal(key, (4, 3))}, "head": {"w": jnp.ones((3,))}, "mid": jnp.ones(2)}
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
    tx = T.fine_tune(ox.adam(1e-3), frozen="^backbone", head="^head", head_lr_mult=7.0)
    state = tx.init(params)
    u, _ = tx.update(grads, state, params)
    np.testing.assert_array_equal(u["backbone"]["w"], 0.0)
    # Adam's first step is lr * sign(g) (up to eps): head gets 7x the body's step
    np.testing.assert_allclose(u["head"]["w"], -7e-3, rtol=1e-5)
    np.testing.assert_allclose(u["mid"], -1e-3, rtol=1e-5)
    # the frozen group keeps no moments
    sizes = sum(np.size(leaf) for _, m in optax.tree.get_all_with_path(state, "mu") for leaf in jax.tree.leaves(m))
    assert sizes == 3 + 2
    with pytest.raises(ValueError, match="head_lr_mult"):
        T.fine_tune(optax.adam(1e-3), head_lr_mult=0.0)


def _layer_of(path):
    m = re.match(r"layers/(\d+)/", path)
    if m:
        return int(m.group(1)) + 1
    return 0 if path.startswith("embed/") else 4  # norm and head: top layer


def test_layerwise_multipliers_on_nnx_model():
    params = nnx.state(Net(rngs=nnx.Rngs(0)), nnx.Param)
    decay = 0.65
    mults = T.layerwise_multipliers(params, 4, decay, layer_of=_layer_of)
    got = {path: m for (path, _), m in zip(T.named_leaves(params), jax.tree.leaves(mults))}
    for path, m in got.items():
        i = _layer_of(path)
        assert m == pytest.approx(decay ** (4 - i)), path
    assert got["embed/kernel"] == pytest.approx(decay**4)
    assert got["layers/2/bias"] == pytest.approx(decay**1)
    assert got["head/kernel"] == 1.0


def test_layerwise_lr_decay_updates_scale_per_layer(key):
    model = Net(rngs=nnx.Rngs(0))
    x, y = _data(key)
    grads = nnx.grad(_loss)(model, x, y)
    params = nnx.state(model, nnx.Param)
    base_lr, decay = 0.1, 0.5
    tx = T.layerwise_lr_decay(optax.sgd, 4, decay, layer_of=_layer_of, base_lr=base_lr)
    u, _ = jax.jit(tx.update)(nnx.as_pure(grads), tx.init(params), nnx.as_pure(params))
    for (path, ui), (_, gi) in zip(T.named_leaves(u), T.named_leaves(grads)):
        expect = -base_lr * decay ** (4 - _layer_of(path)) * np.float64(gi)
        np.testing.assert_allclose(np.float64(ui), expect, rtol=1e-6, atol=1e-9, err_msg=path)
    # and the same through nnx.Optimizer with a schedule as base_lr
    before = _pure(model)
    tx = T.layerwise_lr_decay(optax.sgd, 4, decay, layer_of=_layer_of, base_lr=optax.constant_schedule(base_lr))
    nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads)
    for (path, b), (_, a), (_, gi) in zip(T.named_leaves(before), T.named_leaves(_pure(model)), T.named_leaves(grads)):
        expect = np.float64(b) - base_lr * decay ** (4 - _layer_of(path)) * np.float64(gi)
        np.testing.assert_allclose(np.float64(a), expect, rtol=1e-6, atol=1e-7, err_msg=path)


def test_layerwise_bad_layer_index():
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    tx = T.layerwise_lr_decay(optax.sgd, 2, 0.5, layer_of=lambda p: 3 if p == "b" else 0, base_lr=0.1)
    with pytest.raises(ValueError, match=r"layer_of\('b'\).*num_layers=2.*got 3"):
        tx.init(params)
    with pytest.raises(ValueError, match="decay"):
        T.layerwise_lr_decay(optax.sgd, 2, -0.5, layer_of=lambda p: 0, base_lr=0.1)
    with pytest.raises(ValueError, match="num_layers"):
        T.layerwise_lr_decay(optax.sgd, -1, 0.5, layer_of=lambda p: 0, base_lr=0.1)


# --------------------------------------------------------------------------------- load_pretrained


def test_load_pretrained_into_module_from_state_and_dict():
    pre = Net(rngs=nnx.Rngs(10))
    for source in (nnx.state(pre), nnx.to_pure_dict(nnx.state(pre))):
        model = Net(rngs=nnx.Rngs(11))
        out = T.load_pretrained(model, source)
        assert out is model
        assert_trees_close(_pure(model), _pure(pre), rtol=0)
    # a pytree target: new tree returned, input untouched
    target = nnx.to_pure_dict(nnx.state(Net(rngs=nnx.Rngs(12)), nnx.Param))
    snapshot = jax.tree.map(np.array, target)
    loaded = T.load_pretrained(target, _pure(pre))
    assert_trees_close(loaded, _pure(pre), rtol=0)
    assert_trees_close(target, snapshot, rtol=0)


def test_load_pretrained_wrong_shape_names_each_path():
    pre = Net(width=8, rngs=nnx.Rngs(0))  # every layer touching the width differs
    model = Net(width=7, rngs=nnx.Rngs(1))
    before = _pure(model)
    with pytest.raises(ValueError) as e:
        T.load_pretrained(model, nnx.state(pre, nnx.Param))
    msg = str(e.value)
    assert "shape mismatch at layers/1/kernel: model (7, 7), pretrained (8, 8)" in msg
    assert "shape mismatch at head/kernel: model (7, 3), pretrained (8, 3)" in msg
    assert "shape mismatch at embed/bias: model (7,), pretrained (8,)" in msg
    assert "head/bias" not in msg  # same shape (3,)
    assert_trees_close(_pure(model), before, rtol=0)  # nothing loaded on error


def test_load_pretrained_missing_unexpected_and_non_strict():
    pre = Net(num_blocks=2, rngs=nnx.Rngs(0))
    model = Net(num_blocks=3, rngs=nnx.Rngs(1))
    src = _pure(pre)
    src["extra"] = {"w": jnp.ones(2)}
    with pytest.raises(ValueError) as e:
        T.load_pretrained(model, src)
    msg = str(e.value)
    assert "missing in pretrained: layers/2/kernel" in msg and "unexpected in pretrained: extra/w" in msg
    kept = np.asarray(model.layers[2].kernel[...]).copy()
    with pytest.warns(UserWarning, match="not loaded") as record:
        T.load_pretrained(model, src, strict=False)
    report = str(record[0].message)
    assert "missing in pretrained: layers/2/kernel" in report and "unexpected in pretrained: extra/w" in report
    np.testing.assert_array_equal(model.layers[1].kernel[...], pre.layers[1].kernel[...])
    np.testing.assert_array_equal(model.layers[2].kernel[...], kept)


def test_load_pretrained_non_strict_skips_shape_mismatches_and_reports_them():
    """A new classifier head (10 -> 3 classes) and a resized vocabulary: the rest loads, those keep
    their fresh values, and one warning names each skipped path with both shapes."""
    pre = Net(dout=10, rngs=nnx.Rngs(0))
    model = Net(dout=3, rngs=nnx.Rngs(1))
    src = _pure(pre)
    src["embed"]["kernel"] = jnp.ones((src["embed"]["kernel"].shape[0] + 5, *src["embed"]["kernel"].shape[1:]))
    head = {k: np.asarray(v[...]).copy() for k, v in (("kernel", model.head.kernel), ("bias", model.head.bias))}
    embed = np.asarray(model.embed.kernel[...]).copy()
    with pytest.warns(UserWarning) as record:
        T.load_pretrained(model, src, strict=False)
    (warning,) = [w for w in record if "not loaded" in str(w.message)]
    report = str(warning.message)
    assert "3 paths not loaded" in report
    assert "shape mismatch at head/kernel: model (7, 3), pretrained (7, 10)" in report
    assert "shape mismatch at head/bias: model (3,), pretrained (10,)" in report
    assert "shape mismatch at embed/kernel" in report
    np.testing.assert_array_equal(model.head.kernel[...], head["kernel"])
    np.testing.assert_array_equal(model.head.bias[...], head["bias"])
    np.testing.assert_array_equal(model.embed.kernel[...], embed)
    np.testing.assert_array_equal(model.layers[0].kernel[...], pre.layers[0].kernel[...])
    # strict (the default) still refuses, naming every path, and loads nothing
    with pytest.raises(ValueError, match=r"(?s)3 problems.*head/kernel"):
        T.load_pretrained(Net(dout=3, rngs=nnx.Rngs(2)), src)


def test_load_pretrained_casts_to_target_dtype():
    target = {"w": jnp.zeros((3,), jnp.bfloat16)}
    out = T.load_pretrained(target, {"w": np.arange(3, dtype=np.float64)})
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.float32(out["w"]), [0, 1, 2])


def test_load_pretrained_from_orbax_checkpoint(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    pre = Net(rngs=nnx.Rngs(3))
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, nnx.to_pure_dict(nnx.state(pre)))
    model = Net(rngs=nnx.Rngs(4))
    T.load_pretrained(model, path)
    assert_trees_close(_pure(model), _pure(pre), rtol=0)
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        T.load_pretrained(model, tmp_path / "nope")


def test_load_pretrained_loads_batch_stats_and_skips_rng_state():
    class WithStats(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 3, rngs=rngs)
            self.bn = nnx.BatchNorm(3, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

    pre = WithStats(nnx.Rngs(0))
    pre.bn.mean[...] = jnp.arange(3.0)
    model = WithStats(nnx.Rngs(1))
    key_before = np.asarray(jax.random.key_data(model.drop.rngs.key[...]))
    T.load_pretrained(model, nnx.state(pre))  # the source includes RNG state: ignored
    np.testing.assert_array_equal(model.bn.mean[...], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(model.lin.kernel[...], pre.lin.kernel[...])
    np.testing.assert_array_equal(jax.random.key_data(model.drop.rngs.key[...]), key_before)
    T.load_pretrained(
        model, nnx.to_pure_dict(nnx.state(pre, nnx.Any(nnx.Param, nnx.BatchStat)))
    )  # strict: no RNG needed


def test_loaded_values_are_copies():
    # Training the loaded model with donated buffers must not delete the pretrained arrays.
    source = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,))}
    loaded = T.load_pretrained({"w": jnp.zeros((2, 3)), "b": jnp.zeros((3,))}, source)
    for k in source:
        assert loaded[k] is not source[k]
        jax.jit(lambda x: x + 1, donate_argnums=0)(loaded[k])
        assert not source[k].is_deleted()
        np.testing.assert_array_equal(source[k], {"w": np.arange(6.0).reshape(2, 3), "b": np.ones(3)}[k])
