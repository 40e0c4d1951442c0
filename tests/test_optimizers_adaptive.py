"""Adadelta, Adagrad, Adamax(W), Adan, NAdamW and RAdam: same states and numbers as Optax 0.2.8,
fused in `optax_ext.chain`, clear errors on bad arguments, one kernel pass on CUDA."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ACCELERATOR_BACKENDS, params_and_grads, random_tree, train_on_backend
from test_kernels_lowering import PARAMS, _count_kernels, _lower_step
from test_kernels_mosaic_gpu import MARKER as MOSAIC_GPU_MARKER
from test_kernels_mosaic_gpu import _lower_step as _lower_step_mosaic_gpu

import optax_ext as ox
from optax_ext import optimizers_adaptive as oa
from optax_ext.kernels.backend import mosaic_gpu_available
from optax_ext.optimizers import adamw as ox_adamw
from optax_ext.transforms import adaptive as ta

STEPS = 60
SHAPES = [(), (1,), (7,), (129,), (3, 5, 7)]
sched = optax.cosine_decay_schedule(1e-2, 40, alpha=0.1)
wd_sched = optax.linear_schedule(0.1, 0.0, 30)


def matrices_only(params):
    return {k: v.ndim > 1 for k, v in params.items()}


# Ours and Optax's built by the same lambda: `m` is optax, or our modules behind Optax's names.
OURS = types.SimpleNamespace(
    **{n: getattr(oa, n) for n in oa.__all__},
    **{n: getattr(ta, n) for n in ta.__all__},
    chain=ox.chain,
    clip_by_global_norm=ox.clip_by_global_norm,
    scale=ox.scale,
)

ALIASES = {
    "adadelta": lambda m: m.adadelta(1.0),
    "adadelta_no_lr": lambda m: m.adadelta(),
    "adadelta_args": lambda m: m.adadelta(sched, 0.8, 1e-5, 0.01, matrices_only),
    "adagrad": lambda m: m.adagrad(0.1),
    "adagrad_args": lambda m: m.adagrad(sched, 0.0, 1e-6),
    "adamax": lambda m: m.adamax(1e-2),
    "adamax_args": lambda m: m.adamax(sched, 0.8, 0.99, 1e-6),
    "adamaxw": lambda m: m.adamaxw(1e-2, weight_decay=0.05, mask=matrices_only),
    "adamaxw_wd_schedule": lambda m: m.adamaxw(sched, 0.85, 0.98, 1e-7, wd_sched),
    "adan": lambda m: m.adan(1e-2),
    "adan_args": lambda m: m.adan(sched, 0.9, 0.8, 0.95, 1e-7, 0.0, 0.02, matrices_only),
    "nadamw": lambda m: m.nadamw(1e-2),
    "nadamw_args": lambda m: m.nadamw(sched, 0.8, 0.99, 1e-7, 1e-8, None, 0.05, matrices_only),
    "radam": lambda m: m.radam(1e-2),
    # b2 = 0.99: rho_inf = 199, the rectified branch starts at step 6 (threshold 4: at step 5).
    "radam_args": lambda m: m.radam(sched, 0.85, 0.99, 1e-7, 1e-8, 4.0, nesterov=True),
    "clip_adan": lambda m: m.chain(m.clip_by_global_norm(1.0), m.adan(1e-2, weight_decay=0.01)),
    "clip_radam": lambda m: m.chain(m.clip_by_global_norm(1.0), m.radam(sched)),
    "clip_adagrad": lambda m: m.chain(m.clip_by_global_norm(1.0), m.adagrad(0.1)),
}

TRANSFORMS = {
    "scale_by_rss": lambda m: m.scale_by_rss(),
    "scale_by_rss_args": lambda m: m.scale_by_rss(0.5, 1e-5),
    "scale_by_adadelta": lambda m: m.scale_by_adadelta(0.95, 1e-5),
    "scale_by_adamax": lambda m: m.scale_by_adamax(0.85, 0.98, 1e-6),
    "scale_by_adan": lambda m: m.scale_by_adan(),
    "scale_by_adan_args": lambda m: m.scale_by_adan(0.9, 0.85, 0.95, 1e-6, 1e-8),
    "scale_by_radam": lambda m: m.scale_by_radam(),
    "scale_by_radam_args": lambda m: m.scale_by_radam(0.8, 0.98, 1e-7, 1e-9, 6.0, nesterov=True),
}


def _grads(key, params, steps):
    """`steps` gradient trees like `params` (f32 NumPy), of varying scale so that clipping acts on
    some steps and not on others: fresh normals drawn once, outside the timed loop."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    return [
        {k: ((0.5 + 2.0 * (t % 3)) * rng.standard_normal(np.shape(v))).astype(np.float32) for k, v in params.items()}
        for t in range(steps)
    ]


def _run(tx, params, key, steps=STEPS):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in _grads(key, params, steps):
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_close(actual, expected, rel=1e-6, err_msg=""):
    """Relative error <= `rel`, normwise: per leaf of more than one element, and per field over the
    whole tree (the params; each state field, e.g. all of Adan's `v`), which also covers 1-element leaves.

    A 1-element leaf alone is an elementwise relative error, ill-conditioned: one ulp of a step
    size (ours multiplies by 1/(1-b^t) where Optax divides; our global norm sums in another order)
    is a 1e-5 relative error of a 0-d parameter or of a gradient-difference EMA that happens to be
    near 0 after 60 steps.
    """
    assert jax.tree.structure(actual) == jax.tree.structure(expected), err_msg
    groups = {}
    for (path, a), e in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape, (err_msg, path, a.shape, e.shape)
        if e.size > 1:
            err, scale = np.max(np.abs(a - e)), np.max(np.abs(e))
            assert err <= rel * scale or err == 0.0, (err_msg, jax.tree_util.keystr(path), err, scale)
        field = tuple(k for k in path if not isinstance(k, jax.tree_util.DictKey))
        groups.setdefault(field, []).append((a.ravel(), e.ravel()))
    for field, pairs in groups.items():
        a, e = np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs])
        err, scale = np.max(np.abs(a - e), initial=0.0), np.max(np.abs(e), initial=0.0)
        assert err <= rel * scale or err == 0.0, (err_msg, jax.tree_util.keystr(field), err, scale)


@pytest.mark.parametrize("name", sorted(ALIASES) + sorted(TRANSFORMS))
def test_matches_optax(name, key):
    build = ALIASES.get(name) or TRANSFORMS[name]
    params = random_tree(key, SHAPES)
    ours, theirs = build(OURS), build(optax)
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(theirs.init(params)), name
    # Every part has a rule: the whole optimizer is one fused run (after the clip's norm).
    assert all(a.rule is not None for a in ours.atoms), [a.rule for a in ours.atoms]
    p_ours, st_ours = _run(ours, params, key)
    p_theirs, st_theirs = _run(theirs, params, key)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((p_theirs, st_theirs))), name
    _assert_close(p_ours, p_theirs, err_msg=name)
    _assert_close(st_ours, st_theirs, err_msg=name)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(params)))
    assert moved > 1e-4, name


def test_radam_switches_from_momentum_to_rectified(key):
    """Before rho_t reaches the threshold the step is the bias-corrected momentum; after it, it is not."""
    params = random_tree(key, [(50,)])
    tx = oa.radam(1.0, b1=0.9, b2=0.99, threshold=5.0)
    state = tx.init(params)
    m = np.zeros(50)
    rectified = []
    update = jax.jit(tx.update)
    for t, g in enumerate(_grads(key, params, 8), start=1):
        u, state = update(g, state, params)
        m = 0.9 * m + 0.1 * np.asarray(g["w0"], np.float64)
        momentum = -m / (1 - 0.9**t)
        rho_inf = 2 / (1 - 0.99) - 1
        rho_t = rho_inf - 2 * t * 0.99**t / (1 - 0.99**t)
        is_momentum = np.allclose(np.asarray(u["w0"]), momentum, rtol=1e-5, atol=1e-7)
        assert is_momentum == (rho_t < 5.0), (t, rho_t)
        rectified.append(rho_t >= 5.0)
    assert any(rectified) and not all(rectified)


def test_adagrad_zero_accumulator_gives_zero_update(key):
    """Where the sum of squares is 0 (zero initial value, zero gradient) the update is 0, not 0/0, as Optax."""
    params = {"a": jnp.ones((5,)), "b": jnp.ones((3,))}
    grads = {"a": jnp.zeros((5,)), "b": jnp.asarray([1.0, 0.0, -2.0])}
    for m in (oa, optax):
        tx = m.adagrad(1.0, initial_accumulator_value=0.0, eps=0.0)
        u, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_array_equal(np.asarray(u["a"]), np.zeros(5))
        np.testing.assert_allclose(np.asarray(u["b"]), [-1.0, 0.0, 1.0], rtol=1e-6)


BF16_CASES = ["adadelta", "adagrad", "adamaxw", "adan", "nadamw", "radam_args", "adamax"]


@pytest.mark.parametrize("name", BF16_CASES)
def test_bf16_params_step_is_optax_f32_math_rounded_once(name, key):
    """bf16 params, grads and moments: every step equals Optax's f32 step on the same (upcast) inputs,
    rounded once to bf16 (within half a bf16 ulp, 2^-8 relative, plus f32 noise)."""
    params = random_tree(key, SHAPES, dtype=jnp.bfloat16)
    ours, theirs = ALIASES[name](OURS), ALIASES[name](optax)
    state = ours.init(params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
    ours_step, theirs_update = jax.jit(ours.update_and_apply), jax.jit(theirs.update)
    up = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, tree)  # noqa: E731
    for t, g in enumerate(_grads(key, params, 12)):
        grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), g)
        new_params, new_state = ours_step(grads, state, params)
        u, ref_state = theirs_update(up(grads), up(state), up(params))
        ref_params = optax.apply_updates(up(params), u)
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new_params))
        for a, e in zip(jax.tree.leaves((new_params, new_state)), jax.tree.leaves((ref_params, ref_state))):
            a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
            bound = 2.0**-8 * np.abs(e) + 1e-5 * (np.max(np.abs(e)) if e.size else 0.0)
            assert np.all(np.abs(a - e) <= bound), (name, t, np.max(np.abs(a - e) - bound))
        params, state = new_params, new_state


@pytest.mark.parametrize("name", ["adan", "radam", "adamax"])
def test_inject_hyperparams(name, key):
    """Hyperparameters traced under `optax.inject_hyperparams` (RAdam's rho_inf from a traced b2)."""
    kwargs = {"learning_rate": 1e-2, "b1": 0.85, "b2": 0.98}
    params = random_tree(key, SHAPES)
    ours = optax.inject_hyperparams(getattr(oa, name))(**kwargs)
    theirs = optax.inject_hyperparams(getattr(optax, name))(**kwargs)
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(theirs.init(params))
    p_ours, s_ours = _run(ours, params, key, steps=12)
    p_theirs, s_theirs = _run(theirs, params, key, steps=12)
    _assert_close(p_ours, p_theirs)
    _assert_close(s_ours, s_theirs)


@pytest.mark.parametrize("name", ["adan", "radam_args", "adadelta_args"])
def test_update_and_apply_matches_update_then_apply(name, key):
    tx = ALIASES[name](OURS)
    params = random_tree(key, SHAPES)
    s1 = s2 = tx.init(params)
    p1 = p2 = params
    step, update = jax.jit(tx.update_and_apply), jax.jit(tx.update)
    for g in _grads(key, params, 8):
        p1, s1 = step(g, s1, p1)
        u, s2 = update(g, s2, p2)
        p2 = optax.apply_updates(p2, u)
    _assert_close(p1, p2)
    _assert_close(s1, s2)


def test_moment_dtypes_and_kahan_sum(key):
    """mu_dtype/nu_dtype set the storage; kahan_sum keeps bf16 params near the f32 trajectory."""
    params = random_tree(key, SHAPES, dtype=jnp.bfloat16)
    state = oa.adan(1e-3, mu_dtype=jnp.float32, nu_dtype=jnp.float32).init(params)
    for field in ("m", "v", "n"):
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(optax.tree.get(state, field))), field
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(optax.tree.get(state, "g")))
    nu = optax.tree.get(oa.radam(1e-3, nu_dtype=jnp.float32).init(params), "nu")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nu))

    # Gradients of one sign: the f32 trajectory drifts steadily, ~1e-3 per step.
    grads = [jax.tree.map(lambda x: jnp.asarray(np.abs(x) + 0.1, jnp.bfloat16), g) for g in _grads(key, params, 30)]

    def run(tx, p):
        s = tx.init(p)
        step = jax.jit(tx.update_and_apply)
        for g in grads:
            p, s = step(jax.tree.map(lambda x, q: x.astype(q.dtype), g, p), s, p)
        return p

    kw = {"mu_dtype": jnp.float32, "nu_dtype": jnp.float32}
    # The f32 trajectory from the same (bf16-representable) start, with the same gradients.
    ref = run(oa.adamaxw(1e-3, **kw), jax.tree.map(lambda x: x.astype(jnp.float32), params))
    plain = run(oa.adamaxw(1e-3, **kw), params)
    kahan = run(oa.adamaxw(1e-3, **kw, kahan_sum=True), params)

    def ulps_off(p):
        """Largest |p - ref| in bf16 ulps of ref."""
        out = 0.0
        for a, e in zip(jax.tree.leaves(p), jax.tree.leaves(ref)):
            e = np.asarray(e, np.float64)
            ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(e), 2.0**-20))) - 7)
            out = max(out, float(np.max(np.abs(np.asarray(a, np.float64) - e) / ulp)))
        return out

    # Steps of ~1e-3 on params of ~1 (bf16 ulp 2^-7): uncompensated, most are lost; compensated, the
    # params are the f32 trajectory rounded to bf16 (within an ulp).
    assert ulps_off(kahan) <= 1.0, ulps_off(kahan)
    assert ulps_off(plain) >= 2.0, ulps_off(plain)


BAD = [
    (lambda: oa.adagrad(-1.0), ValueError, r"\blearning_rate must be"),
    (lambda: oa.adagrad(0.1, initial_accumulator_value=-1.0), ValueError, r"\binitial_accumulator_value must be"),
    (lambda: oa.adagrad(0.1, eps="1e-7"), TypeError, r"\beps must be"),
    (lambda: oa.adadelta(1.0, rho=1.5), ValueError, r"\brho must be"),
    (lambda: oa.adadelta(1.0, rho=lambda count: 0.9), TypeError, "rho cannot be a schedule"),
    (lambda: oa.adadelta(1.0, weight_decay=float("inf")), ValueError, r"\bweight_decay must be"),
    (lambda: oa.adamax(1e-2, b1=1.0), ValueError, r"\bb1 must be"),
    (lambda: oa.adamaxw(1e-2, b2=-0.1), ValueError, r"\bb2 must be"),
    (lambda: oa.adamaxw(1e-2, eps=-1.0), ValueError, r"\beps must be"),
    (lambda: oa.adan(1e-2, b3=1.2), ValueError, r"\bb3 must be"),
    (lambda: oa.adan(1e-2, eps_root=-1e-8), ValueError, r"\beps_root must be"),
    (lambda: oa.adan(1e-2, mu_dtype=jnp.int32), TypeError, r"\bmu_dtype must be"),
    (lambda: oa.nadamw(1e-2, b1=2.0), ValueError, r"\bb1 must be"),
    (lambda: oa.radam(1e-2, threshold=float("nan")), ValueError, r"\bthreshold must be"),
    (lambda: oa.radam(1e-2, b2=1.0), ValueError, r"\bb2 must be"),
    (lambda: oa.radam(1e-2, nesterov="yes"), TypeError, r"\bnesterov must be"),
    (lambda: oa.radam(1e-2, nu_dtype="int8"), TypeError, r"\bnu_dtype must be"),
    (lambda: oa.adan(1e-2, kahan_sum=1), TypeError, r"\bkahan_sum must be"),
    (lambda: ta.scale_by_rss(eps=-1.0), ValueError, r"\beps must be"),
    (lambda: ta.scale_by_adamax(b2=jnp.ones(3)), ValueError, "b2 must be a scalar"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_arguments_name_the_argument(i):
    make, exc, match = BAD[i]
    with pytest.raises(exc, match=match):
        make()


def test_mask_of_wrong_structure_fails_at_init():
    tx = oa.adamaxw(1e-2, mask={"a": True, "zzz": False})
    with pytest.raises(ValueError, match="mask"):
        tx.init({"a": jnp.ones(3), "b": jnp.ones(2)})


# Kernel launches per step on an abstract H100 (Triton, Mosaic GPU) or TPU (Mosaic): the same as
# AdamW's on the same tree, i.e. each optimizer is one fused pass (plus the clip's norm).
LOWERED = {
    "adan": (lambda: oa.adan(1e-3, weight_decay=0.01), False),
    "radam": (lambda: oa.radam(1e-3, nesterov=True), False),
    "adagrad": (lambda: oa.adagrad(1e-2), False),
    "clip_adadelta": (lambda: ox.chain(ox.clip_by_global_norm(1.0), oa.adadelta(1.0, weight_decay=0.01)), True),
}


def _kernels(tx, backend):
    if backend == "mosaic_gpu":
        return _lower_step_mosaic_gpu(tx, PARAMS).count(MOSAIC_GPU_MARKER)
    return _count_kernels(_lower_step(tx, PARAMS, backend), backend)


@functools.cache
def _adamw_kernels(backend, clip):
    return _kernels(ox.chain(ox.clip_by_global_norm(1.0), ox_adamw(1e-3)) if clip else ox_adamw(1e-3), backend)


@pytest.mark.parametrize("backend", ACCELERATOR_BACKENDS)
@pytest.mark.parametrize("name", sorted(LOWERED))
def test_lowers_to_as_many_kernels_as_adamw(name, backend):
    make, clip = LOWERED[name]
    expected = _adamw_kernels(backend, clip)
    assert expected >= 1
    assert _kernels(make(), backend) == expected, (name, backend, expected)


@pytest.mark.parametrize(
    "make",
    [
        # The two rules with a step-wide switch (a select on a scalar): RAdam rectified from step 5 on.
        lambda: ox.chain(ox.clip_by_global_norm(1.0), oa.adan(1e-2, weight_decay=0.01)),
        lambda: oa.radam(1e-2, b2=0.8, threshold=4.0, nesterov=True),
    ],
    ids=["clip_adan", "radam"],
)
def test_kernel_path_matches_xla(make, key):
    """The fused Pallas pass (in the GPU backend's interpreter on CPU) gives the XLA path's numbers."""
    backend = "mosaic_gpu_interpret" if mosaic_gpu_available() else "interpret"
    params, grads = params_and_grads(key, [(), (7,), (129,), (3, 5, 7)], jnp.float32, steps=7)
    ours = train_on_backend(make(), params, grads, backend)
    ref = train_on_backend(make(), params, grads, "xla")
    _assert_close(ours, ref, err_msg=backend)
