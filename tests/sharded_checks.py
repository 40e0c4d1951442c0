"""Checks that need 8 devices: run as `python tests/sharded_checks.py <check> <mode>` by test_sharding.py.

XLA's device count is fixed when jax starts, so each check runs in a fresh process with 8 fake CPU
devices. Modes: "auto" (`AxisType.Auto` mesh axes: GSPMD/Shardy partition the program, our
kernels are custom_partitioning calls) and "explicit" (`AxisType.Explicit`: shardings are types,
our kernels run under shard_map). Each check prints "OK" at the end; any failure raises.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_ext as ox  # noqa: E402
from optax_ext.kernels import batch_norm as bn_kernels  # noqa: E402

# The kernels' backend of the optimizer checks (fused_step, lamb_step, zero1_and_fsdp): the Pallas
# interpreter. "mosaic_gpu_interpret" and "mosaic_interpret" cannot run here yet: Mosaic GPU's and
# TPU's interpreters use ordered io_callbacks, which custom_partitioning's lowering rejects
# (KeyError: OrderedIOEffect; checked for both with jax 0.12). The TPU kernels themselves are
# lowered per shard in `lowers_for_accelerators` ("mosaic").
KERNELS = os.environ.get("SHARDED_CHECKS_BACKEND", "interpret")
from optax_ext.kernels import layer_norm as ln_kernels  # noqa: E402


def mesh_for(mode):
    types = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}[mode]
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(types, types))


def close(actual, expected, rel=1e-6, what="", floor=0.0):
    """Normwise relative error per leaf (see tests/conftest.py), f64 comparison; `floor` is a lower
    bound on the scale (for leaves that are zero up to rounding, e.g. a bias before BatchNorm)."""
    for (path, a), e in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        err, scale = np.max(np.abs(a - e), initial=0.0), max(np.max(np.abs(e), initial=0.0), floor)
        assert err <= rel * scale or err == 0.0, f"{what}{jax.tree_util.keystr(path)}: {err:.3e} > {rel} * {scale:.3e}"


def laid_out(x, mesh, spec):
    """x is sharded as `spec` says (trailing replicated dims may be spelled or not)."""
    return x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)


def global_shapes_absent(compiled_text, shapes):
    """No op of the per-device program has one of the global shapes of a sharded array."""
    for shape in shapes:
        token = "[" + ",".join(map(str, shape)) + "]"
        assert token not in compiled_text, f"a global {shape} array appears in the partitioned program"


PARAM_SPECS = {"w": P("data", "model"), "v": P(None, "model"), "b": P("model"), "s": P(), "e": P("data")}


def make_params(key):
    k = jax.random.split(key, 5)
    return {
        "w": jax.random.normal(k[0], (64, 130)),
        "v": jax.random.normal(k[1], (7, 256)),
        "b": jax.random.normal(k[2], (130,)),
        "s": jax.random.normal(k[3], ()),
        "e": jax.random.normal(k[4], (1000,)),
    }


def place(tree, mesh, specs):
    return {name: jax.device_put(x, NamedSharding(mesh, specs[name])) for name, x in tree.items()}


def fused_step(mode):
    """clip + adamw + apply with sharded params, grads and state: kernels per shard, no all-gather."""
    mesh = mesh_for(mode)
    params0 = make_params(jax.random.PRNGKey(0))
    grads0 = jax.tree.map(lambda x: 3.0 * jnp.cos(x), params0)
    make_tx = lambda: ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-2, weight_decay=0.1))
    with ox.kernels.use_backend(KERNELS):
        tx = make_tx()
        ref_p, ref_s = params0, tx.init(params0)
        for _ in range(3):
            ref_p, ref_s = jax.jit(tx.update_and_apply)(grads0, ref_s, ref_p)
    with jax.set_mesh(mesh), ox.kernels.use_backend(KERNELS):
        tx = make_tx()
        params, grads = place(params0, mesh, PARAM_SPECS), place(grads0, mesh, PARAM_SPECS)
        state = jax.jit(tx.init)(params)
        assert laid_out(state[1][0].mu["w"], mesh, P("data", "model")), state[1][0].mu["w"].sharding
        step = jax.jit(tx.update_and_apply, donate_argnums=(1, 2))
        compiled = step.lower(grads, state, params).compile().as_text()
        for _ in range(3):
            params, state = step(grads, state, params)
    assert "all-gather" not in compiled and "all-to-all" not in compiled
    global_shapes_absent(compiled, [(64, 130), (7, 256), (1000,)])
    for name, spec in PARAM_SPECS.items():
        assert laid_out(params[name], mesh, spec), (name, params[name].sharding)
    close(params, ref_p, what="params")
    close(state, ref_s, what="state")


def lamb_step(mode):
    """Per-leaf norms (LAMB's trust ratios) psum-ed over exactly each leaf's axes."""
    mesh = mesh_for(mode)
    params0 = make_params(jax.random.PRNGKey(1))
    grads0 = jax.tree.map(lambda x: jnp.sin(3 * x), params0)
    with ox.kernels.use_backend(KERNELS):
        tx = ox.lamb(1e-2, weight_decay=0.01)
        ref, _ = jax.jit(tx.update_and_apply)(grads0, tx.init(params0), params0)
    with jax.set_mesh(mesh), ox.kernels.use_backend(KERNELS):
        params, grads = place(params0, mesh, PARAM_SPECS), place(grads0, mesh, PARAM_SPECS)
        step = jax.jit(tx.update_and_apply)
        compiled = step.lower(grads, tx.init(params), params).compile().as_text()
        got, _ = step(grads, tx.init(params), params)
    assert "all-gather" not in compiled
    close(got, ref, what="lamb params")


def zero1_and_fsdp(mode):
    """ZeRO-1 (params and grads replicated, moments sharded over "data") and FSDP (all sharded)."""
    mesh = mesh_for(mode)
    params0 = {"w": jax.random.normal(jax.random.PRNGKey(2), (64, 96)), "b": jnp.linspace(-1, 1, 96)}
    grads0 = jax.tree.map(lambda x: jnp.tanh(x) + 0.5, params0)
    tx = ox.chain(ox.clip_by_global_norm(0.5), ox.adamw(1e-2, weight_decay=0.1))
    with ox.kernels.use_backend(KERNELS):
        ref, ref_s = jax.jit(tx.update_and_apply)(grads0, tx.init(params0), params0)
    sharded = {"w": P("data"), "b": P("data")}
    replicated = {"w": P(), "b": P()}
    with jax.set_mesh(mesh), ox.kernels.use_backend(KERNELS):
        for p_specs, s_specs in [(replicated, sharded), (sharded, sharded)]:
            params, grads = place(params0, mesh, p_specs), place(grads0, mesh, p_specs)
            state = tx.init(place(params0, mesh, s_specs))  # moments laid out like sharded params
            assert laid_out(state[1][0].nu["w"], mesh, P("data")), state[1][0].nu["w"].sharding
            step = jax.jit(tx.update_and_apply)
            got, new_state = step(grads, state, params)
            close(got, ref, what=f"params {p_specs['w']}")
            close(new_state, ref_s, what=f"state {p_specs['w']}")
            assert laid_out(new_state[1][0].mu["w"], mesh, P("data")), new_state[1][0].mu["w"].sharding


def int8_states(mode):
    """8-bit moments with sharded params: same result as one device, state laid out like the params
    (w: rows of 130 elements, no whole blocks; v: split along its second axis; both run whole)."""
    mesh = mesh_for(mode)
    params0 = make_params(jax.random.PRNGKey(5))
    grads0 = jax.tree.map(lambda x: jnp.sin(2 * x), params0)
    tx = ox.adamw(1e-2, mu_dtype=ox.int8_blockwise, nu_dtype=ox.int8_blockwise, weight_decay=0.1)
    specs = {**PARAM_SPECS, "w": P("data") if mode == "explicit" else PARAM_SPECS["w"]}
    for backend in ("xla", "interpret"):
        with ox.kernels.use_backend(backend):
            ref_p, ref_s = params0, tx.init(params0)
            for _ in range(3):
                ref_p, ref_s = jax.jit(tx.update_and_apply)(grads0, ref_s, ref_p)
        with jax.set_mesh(mesh), ox.kernels.use_backend(backend):
            params, grads = place(params0, mesh, specs), place(grads0, mesh, specs)
            state = jax.jit(tx.init)(params)
            assert isinstance(state[0].mu["w"], ox.QuantizedArray)
            assert laid_out(state[0].mu["w"].codes, mesh, specs["w"]), state[0].mu["w"].codes.sharding
            step = jax.jit(tx.update_and_apply)  # (not donated: params0's buffers are reused for both backends)
            for _ in range(3):
                params, state = step(grads, state, params)
            assert laid_out(params["w"], mesh, specs["w"])
            if mode == "explicit":  # (Auto axes: where the partitioner puts them; out_shardings pins them)
                assert laid_out(state[0].mu["w"].codes, mesh, specs["w"]), state[0].mu["w"].codes.sharding
        close(params, ref_p, rel=1e-5, what=f"{backend} params")
        close(state, ref_s, rel=1e-5, what=f"{backend} state")


def int8_fsdp_per_shard(mode):
    """FSDP with 8-bit moments: a leaf split along its first axis whose rows hold whole quantization
    blocks runs per shard (no all-gather in the compiled step, codes and absmax stay split); one
    whose rows do not (130 columns) runs whole. Both equal one device."""
    mesh = mesh_for(mode)
    k = jax.random.split(jax.random.PRNGKey(6), 2)
    params0 = {"w": jax.random.normal(k[0], (1024, 512)), "r": jax.random.normal(k[1], (64, 130))}
    grads0 = jax.tree.map(lambda x: jnp.cos(3 * x), params0)
    specs = {"w": P("data"), "r": P("data")}
    tx = ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-2, mu_dtype=ox.int8_blockwise, nu_dtype=ox.int8_blockwise))
    with ox.kernels.use_backend("interpret"):
        ref_p, ref_s = params0, tx.init(params0)
        for _ in range(2):
            ref_p, ref_s = jax.jit(tx.update_and_apply)(grads0, ref_s, ref_p)
    with jax.set_mesh(mesh), ox.kernels.use_backend("interpret"):
        params, grads = place(params0, mesh, specs), place(grads0, mesh, specs)
        state = jax.jit(tx.init)(params)
        aligned = {"w": place(params0, mesh, specs)["w"]}
        aligned_state = jax.jit(tx.init)(aligned)
        compiled = jax.jit(tx.update_and_apply).lower(aligned, aligned_state, aligned).compile().as_text()
        assert "all-gather" not in compiled and "all-to-all" not in compiled, "8-bit leaf gathered"
        step = jax.jit(tx.update_and_apply)
        for _ in range(2):
            params, state = step(grads, state, params)
        mu = state[1][0].mu["w"]
        if mode == "explicit":
            assert laid_out(mu.codes, mesh, P("data")) and laid_out(mu.absmax, mesh, P("data")), mu.absmax.sharding
    close(params, ref_p, rel=1e-6, what="int8 fsdp params")
    close(state, ref_s, rel=1e-6, what="int8 fsdp state")


def init_keeps_sharding(mode):
    """jax.jit(tx.init) lays every optimizer's state out like the params (Adafactor's factors too)."""
    mesh = mesh_for(mode)
    with jax.set_mesh(mesh):
        params = {
            "w": jax.device_put(jnp.ones((64, 128)), NamedSharding(mesh, P("data", "model"))),
            "b": jax.device_put(jnp.ones((128,)), NamedSharding(mesh, P("model"))),
        }
        for name in [
            "sgd",
            "rmsprop",
            "adam",
            "adamw",
            "nadam",
            "adabelief",
            "yogi",
            "lion",
            "amsgrad",
            "lars",
            "lamb",
        ]:
            kwargs = {"momentum": 0.9} if name == "sgd" else {}
            state = jax.jit(getattr(ox, name)(1e-3, **kwargs).init)(params)
            arrays = [x for x in jax.tree.leaves(state) if x.ndim]
            assert arrays, name
            for x in arrays:
                want = P("data", "model") if x.shape == (64, 128) else P("model")
                assert laid_out(x, mesh, want), (name, x.shape, x.sharding)
        state = jax.jit(ox.adafactor(1e-3, min_dim_size_to_factor=4).init)(params)
        v_row, v_col, v = state[0].v_row, state[0].v_col, state[0].v
        assert laid_out(v_row["w"], mesh, P("data")), v_row["w"].sharding
        assert laid_out(v_col["w"], mesh, P("model")), v_col["w"].sharding
        assert laid_out(v["b"], mesh, P("model")), v["b"].sharding


def layer_norm(mode):
    """LayerNorm/RMSNorm fwd + bwd on row shards (batch over "data", sequence over "model")."""
    mesh = mesh_for(mode)
    x0 = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(3), (16, 12, 96))
    s0, b0 = jnp.linspace(0.5, 1.5, 96), jnp.linspace(-1, 1, 96)

    def loss(x, s, b):
        return jnp.sum(jnp.sin(ln_kernels.layer_norm(x, s, b))) + jnp.sum(jnp.cos(ln_kernels.rms_norm(x, s)))

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    with ox.kernels.use_backend("interpret"):
        ref = jax.jit(grad)(x0, s0, b0)
    with jax.set_mesh(mesh), ox.kernels.use_backend("interpret"):
        x = jax.device_put(x0, NamedSharding(mesh, P("data", "model")))
        f = jax.jit(grad)
        compiled = f.lower(x, s0, b0).compile().as_text()
        got = f(x, s0, b0)
    assert "all-gather" not in compiled
    global_shapes_absent(compiled, [(16, 12, 96), (192, 96)])
    close(got, ref, rel=2e-6, what="layer_norm")
    assert laid_out(got[1][0], mesh, P("data", "model")), got[1][0].sharding


def layer_norm_feature_axis(mode):
    """A sharded feature axis: Auto reshards it (correct result); Explicit raises naming the axis, on
    every backend (the XLA one could compute it, but a program must not run on CPU and fail on GPU)."""
    mesh = mesh_for(mode)
    x0 = jax.random.normal(jax.random.PRNGKey(4), (8, 64))
    with ox.kernels.use_backend("interpret"):
        ref = ln_kernels.layer_norm(x0)
    for backend in ("interpret", "xla"):
        with jax.set_mesh(mesh), ox.kernels.use_backend(backend):
            x = jax.device_put(x0, NamedSharding(mesh, P("data", "model")))
            for norm in (ln_kernels.layer_norm, ln_kernels.rms_norm):
                if mode == "auto":
                    expected = ref if norm is ln_kernels.layer_norm else ln_kernels.rms_norm(x0)
                    close(jax.jit(norm)(x), expected, rel=2e-6)
                    continue
                try:
                    jax.jit(norm)(x)
                except ValueError as e:
                    assert "'model'" in str(e) and "reshard" in str(e), e
                else:
                    raise AssertionError(f"{backend}: a sharded feature axis under Explicit axes must raise")


class Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn = ox.nn.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.out = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.mean(nnx.relu(self.bn(self.conv(x))), axis=(1, 2)))


def batch_norm(mode, backend="interpret"):
    """SyncBN without axis_name: sharded BatchNorm == single-device BatchNorm on the global batch."""
    mesh = mesh_for(mode)
    x0 = 5.0 + 3.0 * jax.random.normal(jax.random.PRNGKey(5), (16, 6, 6, 3))
    y0 = jax.random.normal(jax.random.PRNGKey(6), (16, 4))

    def train_step(model, x, y):
        def loss(model):
            return jnp.mean((model(x) - y) ** 2)

        value, grads = nnx.value_and_grad(loss)(model)
        return value, grads, nnx.state(model, nnx.BatchStat)

    def kernel_grads(x, s, b):
        y, mean, var = bn_kernels.batch_norm(x, s, b)
        return jnp.sum(jnp.sin(y)) + jnp.sum(mean * var)

    kernel_step = jax.value_and_grad(kernel_grads, argnums=(0, 1, 2))
    s0, b0 = jnp.linspace(0.5, 2.0, 3), jnp.linspace(-1.0, 1.0, 3)
    with ox.kernels.use_backend(backend):
        ref = nnx.jit(train_step)(Net(nnx.Rngs(0)), x0, y0)
        ref_kernel = jax.jit(kernel_step)(x0, s0, b0)
    with jax.set_mesh(mesh), ox.kernels.use_backend(backend):
        x = jax.device_put(x0, NamedSharding(mesh, P("data")))
        got = nnx.jit(train_step)(Net(nnx.Rngs(0)), x, y0)
        # The kernels themselves: statistics per shard merged by psum, no gathered batch.
        f = jax.jit(kernel_step)
        compiled = f.lower(x, s0, b0).compile().as_text()
        got_kernel = f(x, s0, b0)
    assert "all-gather" not in compiled
    global_shapes_absent(compiled, [(16, 6, 6, 3)])
    close(got_kernel, ref_kernel, rel=1e-5, what="batch_norm kernels", floor=1.0)
    close(got[0], ref[0], rel=1e-5, what="loss")
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref[1]))
    close(got[1], ref[1], rel=1e-5, what="grads", floor=scale)
    close(got[2], ref[2], rel=1e-6, what="running statistics")


def batch_norm_xla(mode):
    batch_norm(mode, backend="xla")


def lowers_for_accelerators(mode):
    """The sharded clip+adamw step lowers for cuda and tpu; kernels are partitioned, not global calls."""
    mesh = mesh_for(mode)
    tx = ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3))
    with jax.set_mesh(mesh):
        params = place(make_params(jax.random.PRNGKey(0)), mesh, PARAM_SPECS)
        state = tx.init(params)
        backends = [("triton", "cuda", "__gpu$xla.gpu.triton"), ("mosaic", "tpu", "tpu_custom_call")]
        if ox.kernels.backend.mosaic_gpu_available():
            backends.append(("mosaic_gpu", "cuda", "mosaic_gpu_v2"))
        for backend, platform, marker in backends:
            step = lambda g, s, p: tx.update_and_apply(g, s, p)
            lowered = ox.kernels.lower_for(step, params, state, params, platform=platform, backend=backend, mesh=mesh)
            text = lowered.as_text()
            if mode == "auto":
                # Partitioned at compile time: the kernels are traced per shard by the partitioner.
                assert text.count("CustomSPMDPartitioning") == 2, text.count("CustomSPMDPartitioning")
                assert marker not in text
            else:
                # shard_map: the kernels sit inside manual (per-device) computations.
                assert "manual_computation" in text and marker in text
        if ox.kernels.backend.mosaic_gpu_available():
            # 8-bit moments on Mosaic GPU (their own row-wise kernel) are partitioned the same way.
            tx8 = ox.adamw(1e-3, mu_dtype=ox.int8_blockwise, nu_dtype=ox.int8_blockwise)
            state8 = tx8.init(params)
            step8 = lambda g, s, p: tx8.update_and_apply(g, s, p)
            text = ox.kernels.lower_for(
                step8, params, state8, params, platform="cuda", backend="mosaic_gpu", mesh=mesh
            ).as_text()
            if mode == "auto":
                assert text.count("CustomSPMDPartitioning") == 1 and "mosaic_gpu_v2" not in text
            else:
                assert "manual_computation" in text and "fused_pass_8bit" in text


def demo(_mode):
    import json
    import subprocess

    # The demo as a user runs it (its own process, one CPU: it asks jax for 8 CPU devices itself),
    # against the same run on one device: data parallelism must not change what is learnt.
    def run(devices):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "optax_ext.train",
                "--devices",
                str(devices),
                "--epochs",
                "3",
                "--plot",
                "",
                "--quiet",
                "--json",
                "--min-accuracy",
                "0.8",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "XLA_FLAGS": ""},
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    one, eight = run(1), run(8)
    assert eight["devices"] == 8
    assert abs(eight["test_accuracy"] - one["test_accuracy"]) <= 0.01, (one, eight)
    assert abs(eight["final_loss"] - one["final_loss"]) <= 1e-3 * max(1.0, one["final_loss"]), (one, eight)


if __name__ == "__main__":
    check, mode = sys.argv[1], sys.argv[2]
    globals()[check](mode)
    print("OK")
