"""What optax_ext takes from its dependencies beyond their public API (optax_ext/_compat.py), and
the behaviour of theirs it re-implements in public terms: one test per item, each failing with a
message that names the item and what changed, so an upgrade of Optax, flax or jax that breaks one
says so instead of failing somewhere downstream. Tested with optax 0.2.8, flax 0.12.8, jax 0.10.2."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import optax_ext as ox
from optax_ext import _compat
from optax_ext import nn as onn
from optax_ext.kernels import blocks

PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.zeros((3,))}


def _check_state_class(item, state, fields, made_by, ours):
    """`state` (made by Optax's `made_by`) is an instance of `_compat.<item>` with `fields`, and so is
    `ours` (the same state made by optax_ext)."""
    expected = getattr(_compat, item)
    got = type(state)
    assert got is expected and getattr(got, "_fields", None) == fields, (
        f"optax {optax.__version__}: {made_by} returns {got.__module__}.{got.__qualname__} with fields "
        f"{getattr(got, '_fields', None)}; optax_ext._compat.{item} expects Optax's own class with fields "
        f"{fields} (tested with optax 0.2.8), and is {expected.__module__}.{expected.__qualname__}. "
        f"Update optax_ext/_compat.py and the optax_ext transformation that builds this state."
    )
    assert jnp.asarray(state.count).dtype == jnp.int32 and jnp.shape(state.count) == (), (
        f"optax {optax.__version__}: {made_by}: count is {jnp.asarray(state.count).dtype}{jnp.shape(state.count)}, "
        f"expected an int32 scalar (optax_ext._compat.{item})."
    )
    assert type(ours) is got, f"optax_ext makes {type(ours)} where Optax makes {got} ({item})."
    for name in fields[1:]:  # the moments are trees shaped like the params
        assert jax.tree.structure(getattr(state, name)) == jax.tree.structure(PARAMS), (item, name)


def test_scale_by_rms_with_count_state():
    _check_state_class(
        "ScaleByRmsWithCountState",
        optax.scale_by_rms(bias_correction=True).init(PARAMS),
        ("count", "nu"),
        "optax.scale_by_rms(bias_correction=True).init",
        ox.scale_by_rms(bias_correction=True).init(PARAMS),
    )


def test_scale_by_stddev_with_count_state():
    _check_state_class(
        "ScaleByRStdDevWithCountState",
        optax.scale_by_stddev(bias_correction=True).init(PARAMS),
        ("count", "mu", "nu"),
        "optax.scale_by_stddev(bias_correction=True).init",
        ox.scale_by_rms(bias_correction=True, centered=True).init(PARAMS),
    )


def test_optimistic_gradient_state():
    state = optax.scale_by_optimistic_gradient().init(PARAMS)
    expected, fields = _compat.ScaleByOptimisticGradientState, ("is_initial_step", "previous_gradient")
    assert type(state) is expected and expected._fields == fields, (
        f"optax {optax.__version__}: optax.scale_by_optimistic_gradient().init returns {type(state)}; "
        f"optax_ext._compat.ScaleByOptimisticGradientState expects Optax's own class with fields {fields}."
    )
    assert type(ox.scale_by_optimistic_gradient().init(PARAMS)) is expected
    assert jax.tree.structure(state.previous_gradient) == jax.tree.structure(PARAMS)


def test_weight_decay_schedule():
    schedule = optax.linear_schedule(1e-2, 0.0, 10)
    state = optax.add_decayed_weights(schedule).init(PARAMS)
    _check_state_class(
        "WeightDecaySchedule",
        state,
        ("count",),
        "optax.add_decayed_weights(schedule).init",
        ox.add_decayed_weights(schedule).init(PARAMS),
    )


# ------------------------------------------------------------------------------------------------
# Re-implemented in public terms: flax's dtype rule (optax_ext.nn), jax's manual-axis annotation.


@pytest.mark.parametrize(
    "x_dtype,param_dtype,dtype",
    [
        (jnp.bfloat16, jnp.float32, None),
        (jnp.float32, jnp.bfloat16, jnp.bfloat16),
        (jnp.float16, jnp.float16, None),
        (jnp.float32, jnp.float32, jnp.float16),
    ],
)
def test_output_dtype_rule_matches_flax(x_dtype, param_dtype, dtype):
    """optax_ext.nn's plain-jnp paths pick the output dtype as flax's `canonicalize_dtype` does."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), x_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, rngs=nnx.Rngs(0))
    cases = [
        (
            "LayerNorm(reduction_axes=0)",
            onn.LayerNorm(6, reduction_axes=0, **kw),
            nnx.LayerNorm(6, reduction_axes=0, **kw),
        ),
        (
            "BatchNorm eval",
            onn.BatchNorm(6, use_running_average=True, **kw),
            nnx.BatchNorm(6, use_running_average=True, **kw),
        ),
    ]
    for label, ours, theirs in cases:
        got, want = ours(x).dtype, theirs(x).dtype
        assert got == want, (
            f"flax {flax.__version__} {label} with x {jnp.dtype(x_dtype).name}, param_dtype "
            f"{jnp.dtype(param_dtype).name}, dtype {dtype}: flax now returns {want}, optax_ext.nn "
            f"{got}; update optax_ext.nn._result_dtype (tested with flax 0.12.8)."
        )


def test_manual_axis_type_annotation():
    """`blocks.out_struct` marks a kernel output as varying over the manual axes of its inputs with
    jax's public `ManualAxisType` (jax >= 0.10; `vma=` before)."""
    assert hasattr(jax.sharding, "ManualAxisType"), (
        f"jax {jax.__version__} has no jax.sharding.ManualAxisType; update optax_ext.kernels.blocks.out_struct."
    )
    mesh = jax.make_mesh((1,), ("x",))
    seen = {}

    def f(a):
        seen["struct"] = blocks.out_struct((2,), jnp.float32, a)
        return a

    x = jax.device_put(jnp.zeros(4), jax.NamedSharding(mesh, P("x")))
    jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P("x")))(x)
    mat = seen["struct"].manual_axis_type
    assert mat is not None and mat.varying == frozenset({"x"}), (
        f"jax {jax.__version__}: out_struct inside shard_map gave manual_axis_type={mat}, expected varying over "
        f"'x'; jax.typeof(a).manual_axis_type or ShapeDtypeStruct(manual_axis_type=) changed."
    )
    assert blocks.out_struct((2,), jnp.float32, jnp.zeros(2)).manual_axis_type.varying == frozenset()


# ---------------------------------------------------------------------------------------------
# optax_ext/kernels/_compat.py: what differs across jax 0.10.2 .. 0.12.x
# ---------------------------------------------------------------------------------------------


def test_jax_version_is_read_as_numbers():
    from optax_ext.kernels._compat import JAX_VERSION, _version

    assert JAX_VERSION[:2] == tuple(int(p) for p in jax.__version__.split(".")[:2])
    assert _version("0.12.0.1") == (0, 12, 0, 1) and _version("0.10.2.dev20260101") == (0, 10, 2)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowering_target_names_the_device_pallas_asks_for(platform):
    """Pallas reads the target device from the abstract mesh in context (jax 0.10.2 and 0.12 alike):
    if either the mesh or its device stops being read, the kernels' lowering tests fail with the
    message below rather than silently lowering for the wrong device."""
    from jax._src.pallas.mosaic import tpu_info  # private: the reader Pallas itself uses (both versions)

    from optax_ext.kernels._compat import TARGET_DEVICES, lowering_target

    with lowering_target(platform) as mesh:
        assert jax.sharding.get_abstract_mesh() is mesh and mesh.size == 1
        assert mesh.abstract_device == TARGET_DEVICES[platform]
        if platform == "tpu":
            assert tpu_info.get_device_kind() == "TPU v5 lite", (
                f"jax {jax.__version__}: Pallas no longer reads the TPU kind from the abstract mesh; "
                "update optax_ext/kernels/_compat.py (lowering_target)"
            )
    assert jax.sharding.get_abstract_mesh().empty


def test_lowering_target_keeps_a_meshes_axes():
    from optax_ext.kernels._compat import lowering_target

    mesh = jax.sharding.AbstractMesh((4, 2), ("data", "model"))
    with lowering_target("cuda", mesh=mesh) as target:
        assert target.axis_names == ("data", "model") and target.axis_sizes == (4, 2)
        assert target.abstract_device.device_kind.startswith("NVIDIA H100")
    with pytest.raises(ValueError, match="platform='rocm'"):
        with lowering_target("rocm"):
            pass


def test_triton_lowering_marks_only_absent_dialect_modules_absent():
    import sys

    from optax_ext.kernels import _compat, lower_for

    x = jax.ShapeDtypeStruct((1000,), jnp.float32)
    lower_for(lambda v: ox.kernels.global_sq_norm([v]), x, platform="cuda", backend="triton")
    assert _compat._triton_dialects_checked
    marked = [name for name in _compat._TRITON_DIALECT_MODULES if sys.modules.get(name, "") is None]
    assert marked  # jaxlib has no Python module for the tt dialect: at least its own prefix is marked
    for name in marked:  # marked absent only where no such module exists: nothing real is shadowed
        del sys.modules[name]
        try:
            assert _compat._absent(name), name
        finally:
            sys.modules[name] = None
    assert not _compat._absent("jaxlib.mlir.dialects.func")


@pytest.mark.skipif(not ox.kernels.backend.mosaic_gpu_available(), reason="Mosaic GPU kernels need jax >= 0.12")
def test_mosaic_gpu_scratch_is_found_once_per_kernel_and_lowers_the_same(monkeypatch):
    from jax.experimental.mosaic.gpu import launch_context

    from optax_ext.kernels import _compat, lower_for

    _compat.remember_mosaic_gpu_scratch()
    remembering = launch_context.Scratch._find_alloc_load_and_device_ptr
    assert remembering.remembers
    walks = []
    walk = launch_context.Scratch._find_first_op
    monkeypatch.setattr(launch_context.Scratch, "_find_first_op", lambda self, *a: walks.append(1) or walk(self, *a))

    tx = ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-3))
    params = {f"p{i}": jax.ShapeDtypeStruct((300 + 37 * i,), jnp.float32) for i in range(12)}
    state = jax.eval_shape(tx.init, params)

    def lowered():
        walks.clear()
        step = lambda p, s, g: tx.update_and_apply(g, s, p)  # noqa: E731  (a fresh function: no trace cache)
        text = lower_for(step, params, state, params, platform="cuda", backend="mosaic_gpu").as_text()
        return text, len(walks)

    text, few = lowered()
    # As shipped: every TMA descriptor walks the module again.
    monkeypatch.setattr(_compat, "remember_mosaic_gpu_scratch", lambda: None)
    monkeypatch.setattr(launch_context.Scratch, "_find_alloc_load_and_device_ptr", remembering.__wrapped__)
    text_as_shipped, many = lowered()
    assert text == text_as_shipped
    assert many > 4 * few, (few, many)
