"""optax_ext.nn layers against flax.nnx's (use_fast_variance=False): outputs, gradients, running
statistics, train/eval switching, fallback axes, multi-device BatchNorm, and whole models trained
inside `nnx.jit` with the same init and steps."""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_ext
from optax_ext import nn as onn
from optax_ext.kernels.backend import use_backend

PAIRS = [(onn.LayerNorm, nnx.LayerNorm), (onn.RMSNorm, nnx.RMSNorm), (onn.BatchNorm, nnx.BatchNorm)]


def _err(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(float(jnp.max(jnp.abs(jnp.asarray(u, jnp.float32) - jnp.asarray(v, jnp.float32)))) for u, v in zip(la, lb))


def _make(cls, n, **kw):
    if issubclass(cls, nnx.BatchNorm):
        kw.setdefault("momentum", 0.8)
        kw.setdefault("use_running_average", False)
    return cls(n, use_fast_variance=False, rngs=nnx.Rngs(0), **kw)


def _perturb(model, seed):
    """Non-trivial scale/bias (flax initialises them to ones/zeros) so gradients through them matter."""
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape, p.dtype), params)
    nnx.update(model, params)


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=["layer", "rms", "batch"])
def test_signatures_and_state_match_flax(ours, theirs):
    assert inspect.signature(ours.__init__) == inspect.signature(theirs.__init__)
    assert inspect.signature(ours.__call__).parameters.keys() == inspect.signature(theirs.__call__).parameters.keys()
    a, b = _make(ours, 6), _make(theirs, 6)
    assert jax.tree.structure(nnx.state(a)) == jax.tree.structure(nnx.state(b))
    assert _err(nnx.state(a), nnx.state(b)) == 0.0
    assert isinstance(a, theirs)


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=["layer", "rms", "batch"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_outputs_grads_and_stats_match_flax(ours, theirs, dtype, backend):
    shape = (4, 5, 3, 12) if ours is onn.BatchNorm else (3, 7, 40)
    x = (jax.random.normal(jax.random.key(1), shape) * 2.0 + 3.0).astype(dtype)
    w = jax.random.normal(jax.random.key(2), shape)
    a, b = _make(ours, shape[-1], dtype=dtype), _make(theirs, shape[-1], dtype=dtype)
    _perturb(a, 3)
    _perturb(b, 3)

    def loss(model, x):
        return jnp.sum(model(x).astype(jnp.float32) * w)

    with use_backend(backend):
        la, (ga, gxa) = nnx.value_and_grad(loss, argnums=(0, 1))(a, x)
    lb, (gb, gxb) = nnx.value_and_grad(loss, argnums=(0, 1))(b, x)
    tol = 2e-4 if dtype == jnp.float32 else 5e-2
    if ours is not onn.BatchNorm:  # (calling a BatchNorm again would move its running statistics)
        assert a(x).dtype == b(x).dtype == dtype
    assert abs(float(la - lb)) <= tol * max(1.0, abs(float(lb)))
    assert _err(nnx.state(ga, nnx.Param), nnx.state(gb, nnx.Param)) <= tol * 10
    assert _err(gxa, gxb) <= tol * 4
    if ours is onn.BatchNorm:
        assert _err(nnx.state(a, nnx.BatchStat), nnx.state(b, nnx.BatchStat)) <= 1e-5
        a.eval()
        b.eval()
        with use_backend(backend):
            ya = a(x)
        assert ya.dtype == dtype
        assert _err(ya, b(x)) <= tol * 4


def test_batchnorm_train_eval_and_call_override():
    x = jax.random.normal(jax.random.key(0), (16, 3)) + 2.0
    bn = onn.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
    bn(x)  # training mode by default: batch stats, running stats move
    np.testing.assert_allclose(bn.mean[...], 0.5 * np.asarray(x, np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], 0.5 + 0.5 * np.asarray(x, np.float64).var(0), rtol=1e-5)
    bn.eval()
    before = nnx.clone(nnx.state(bn, nnx.BatchStat))
    y = bn(x)
    assert _err(nnx.state(bn, nnx.BatchStat), before) == 0.0
    expected = (np.asarray(x) - np.asarray(bn.mean[...])) / np.sqrt(np.asarray(bn.var[...]) + bn.epsilon)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    y_train = bn(x, use_running_average=False)  # the call's flag wins over the module's
    np.testing.assert_allclose(np.asarray(y_train).mean(0), 0.0, atol=1e-5)
    bn.train()
    assert bn.use_running_average is False
    with pytest.raises(ValueError, match="use_running_average"):
        onn.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))(x)


def test_fallback_axes_and_mask_match_flax():
    x = jax.random.normal(jax.random.key(4), (2, 3, 4, 5)) * 3 + 1
    mask = jax.random.bernoulli(jax.random.key(5), 0.7, x.shape)
    cases = [
        (dict(reduction_axes=(1, 2, 3), feature_axes=-1), onn.LayerNorm, nnx.LayerNorm, {}),
        (dict(reduction_axes=(-2, -1), feature_axes=(-2, -1)), onn.RMSNorm, nnx.RMSNorm, {}),
        (dict(axis=1), onn.BatchNorm, nnx.BatchNorm, {}),  # NCHW
        ({}, onn.LayerNorm, nnx.LayerNorm, {"mask": mask}),
        ({}, onn.BatchNorm, nnx.BatchNorm, {"mask": mask}),
    ]
    for kw, ours, theirs, call_kw in cases:
        n = x.shape[1] if kw.get("axis") == 1 else x.shape[-1]
        if kw.get("feature_axes") == (-2, -1):
            n = x.shape[-2] * x.shape[-1]  # flax reshapes the (20,) scale to the (4, 5) feature dims
        a, b = _make(ours, n, **kw), _make(theirs, n, **kw)
        _perturb(a, 6)
        _perturb(b, 6)
        with use_backend("interpret"):
            ya = a(x, **call_kw)
        assert _err(ya, b(x, **call_kw)) <= 1e-5, (ours, kw)
        if ours is onn.BatchNorm:
            assert _err(nnx.state(a, nnx.BatchStat), nnx.state(b, nnx.BatchStat)) <= 1e-5


@pytest.mark.parametrize("cls", [onn.LayerNorm, onn.BatchNorm])
def test_large_mean_small_std_layers(cls):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(1e3, 1e-2, size=(512, 64)).astype(np.float32))
    m = _make(cls, 64, epsilon=1e-12)
    for backend in ("xla", "interpret"):
        with use_backend(backend):
            y = np.asarray(m(x), np.float64)
        axis = 0 if cls is onn.BatchNorm else -1
        np.testing.assert_allclose(y.std(axis), 1.0, atol=2e-3)
        np.testing.assert_allclose(y.mean(axis), 0.0, atol=2e-2)


_MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, os
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from flax import nnx
    from optax_ext import nn as onn
    from optax_ext.kernels.backend import use_backend

    mesh = jax.make_mesh((4,), ("data",))
    x = jax.random.normal(jax.random.key(0), (8, 3, 3, 5)) * 2 + 1
    wy = jax.random.normal(jax.random.key(1), x.shape)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    err = lambda a, b: max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    def grads(model, x, wy):
        gp, gx = nnx.grad(lambda m, x: jnp.sum(m(x) * wy), argnums=(0, 1))(model, x)
        return model(x, use_running_average=True), nnx.state(model, nnx.BatchStat), nnx.state(gp, nnx.Param), gx

    results = {}
    for label, cls, backend in [("ours-xla", onn.BatchNorm, "xla"), ("ours-interpret", onn.BatchNorm, "interpret"),
                                ("flax", nnx.BatchNorm, "xla")]:
        mk = lambda name: cls(5, use_running_average=False, momentum=0.8, axis_name=name,
                              use_fast_variance=False, rngs=nnx.Rngs(0))
        ref = nnx.jit(grads)(mk(None), x, wy)  # one device, whole batch
        gd, state = nnx.split(mk("data"))

        check_vma = backend != "interpret"

        def body(state, x, wy):
            y, st, gp, gx = grads(nnx.merge(gd, state), x, wy)
            # Without the vma check, autodiff leaves per-device parameter gradients (pmap semantics).
            return y, st, gp if check_vma else jax.lax.psum(gp, "data"), gx

        # The Pallas interpreter pads ragged blocks with a constant that jax 0.10's vma check
        # rejects (a jax limitation of interpret mode only), so that run skips the check.
        with use_backend(backend):
            sharded = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                            out_specs=(P("data"), P(), P(), P("data")),
                                            check_vma=check_vma))
            out = sharded(put(state, P()), put(x, P("data")), put(wy, P("data")))
            out_jit = nnx.jit(grads)(mk(None), put(x, P("data")), wy)

            def pbody(state, x, wy):
                y, st, gp, gx = grads(nnx.merge(gd, state), x, wy)
                return y, st, jax.lax.psum(gp, "data"), gx

            split = lambda a: a.reshape(4, -1, *a.shape[1:])
            out_p = jax.pmap(pbody, axis_name="data", in_axes=(None, 0, 0), out_axes=(0, None, None, 0))(
                state, split(x), split(wy))
            out_p = (out_p[0].reshape(x.shape), out_p[1], out_p[2], out_p[3].reshape(x.shape))
        results[label] = {"shard_map": [err(a, b) for a, b in zip(out, ref)],
                          "pmap": [err(a, b) for a, b in zip(out_p, ref)],
                          "sharded_jit": [err(a, b) for a, b in zip(out_jit, ref)],
                          "jit_out_sharded": not out_jit[0].sharding.is_fully_replicated}
    print("RESULT" + json.dumps(results))
    """
)


@pytest.mark.slow
def test_batchnorm_across_devices_matches_full_batch():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env.pop("OPTAX_EXT_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", _MULTI_DEVICE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    results = json.loads(line[len("RESULT"):])
    for label, res in results.items():
        # eval output, running stats, param grads, input grads: all equal to the one-device batch.
        assert max(res["shard_map"]) < 1e-4, (label, res)
        assert max(res["sharded_jit"]) < 1e-4, (label, res)
        assert max(res["pmap"]) < 1e-4, (label, res)
        assert res["jit_out_sharded"], label


# ---------------------------------------------------------------------------------------------
# Whole models: ours vs flax, same init, same data, same optimizer steps inside nnx.jit.
# ---------------------------------------------------------------------------------------------


def _optimizer():
    # optax_ext.adamw when the package has it (it does once the optimizers land), else Optax's.
    make = optax_ext.adamw if hasattr(optax_ext, "adamw") else optax.adamw
    return make(1e-2)


class _CNN(nnx.Module):
    def __init__(self, layers, *, rngs):
        # No conv bias before BatchNorm: its gradient is exactly zero in theory, pure noise in practice.
        self.conv1 = nnx.Conv(1, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = layers.BatchNorm(8, use_fast_variance=False, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), strides=2, use_bias=False, rngs=rngs)
        self.bn2 = layers.BatchNorm(8, use_fast_variance=False, rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(axis=(1, 2)))


class _Block(nnx.Module):
    def __init__(self, layers, d=16, *, rngs):
        self.ln1 = layers.LayerNorm(d, use_fast_variance=False, rngs=rngs)
        # No attention biases: the key bias has an exactly-zero gradient (softmax is shift invariant).
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=d, decode=False, use_bias=False, rngs=rngs)
        self.ln2 = layers.RMSNorm(d, use_fast_variance=False, rngs=rngs)
        self.mlp1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.mlp2 = nnx.Linear(4 * d, d, rngs=rngs)
        self.ln3 = layers.LayerNorm(d, use_fast_variance=False, rngs=rngs)
        self.head = nnx.Linear(d, 1, rngs=rngs)

    def __call__(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h)
        x = x + self.mlp2(nnx.gelu(self.mlp1(self.ln2(x))))
        return self.head(self.ln3(x))[..., 0]


def _train(model, loss_fn, batches, backend):
    opt = nnx.Optimizer(model, _optimizer(), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        opt.update(model, grads)
        return loss

    with use_backend(backend):
        losses = [float(step(model, opt, x, y)) for x, y in batches]
    return losses


def _cnn_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _block_loss(model, x, y):
    return jnp.mean(jnp.square(model(x) - y))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_cnn_with_our_batchnorm_trains_like_flax(backend):
    k = jax.random.split(jax.random.key(7), 2)
    x = jax.random.normal(k[0], (16, 8, 8, 1)) * 2 + 1
    y = jax.random.randint(k[1], (16,), 0, 10)
    batches = [(x, y)] * 5
    ours, theirs = _CNN(onn, rngs=nnx.Rngs(0)), _CNN(nnx, rngs=nnx.Rngs(0))
    assert _err(nnx.state(ours), nnx.state(theirs)) == 0.0
    lo = _train(ours, _cnn_loss, batches, backend)
    lt = _train(theirs, _cnn_loss, batches, "xla")
    assert lo[-1] < 0.9 * lo[0] and all(np.diff(lo) < 0), lo
    np.testing.assert_allclose(lo, lt, rtol=1e-4, atol=1e-5)
    assert _err(nnx.state(ours, nnx.Param), nnx.state(theirs, nnx.Param)) < 1e-4
    assert _err(nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat)) < 1e-4
    ours.eval()
    theirs.eval()
    assert _err(ours(x), theirs(x)) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_transformer_block_with_our_norms_trains_like_flax(backend):
    k = jax.random.split(jax.random.key(8), 2)
    x = jax.random.normal(k[0], (4, 6, 16)) * 1.5 + 0.5
    y = jnp.sin(x.sum(-1))
    batches = [(x, y)] * 5
    ours, theirs = _Block(onn, rngs=nnx.Rngs(0)), _Block(nnx, rngs=nnx.Rngs(0))
    lo = _train(ours, _block_loss, batches, backend)
    lt = _train(theirs, _block_loss, batches, "xla")
    assert lo[-1] < 0.9 * lo[0] and all(np.diff(lo) < 0), lo
    np.testing.assert_allclose(lo, lt, rtol=1e-4, atol=1e-5)
    assert _err(nnx.state(ours, nnx.Param), nnx.state(theirs, nnx.Param)) < 1e-4
