"""Shared fixtures: random ragged pytrees, tolerances."""

import os
import zlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# With optax_ext[gpu-aot] installed and no GPU, JAX's CUDA plugin fails its CUDA version check and is
# not loaded, so nothing could be compiled for an H100 (tests/test_compiled_for_h100.py). Read when
# JAX first initializes its backends, so it must be set before that.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_ext.kernels.backend import mosaic_gpu_available

RAGGED_SHAPES = [(), (1,), (7,), (1000,), (3, 5, 7)]

# The kernel backends of an accelerator, for tests that lower for it from this CPU (Mosaic GPU's from jax 0.12).
ACCELERATOR_BACKENDS = [
    pytest.param(
        "mosaic_gpu",
        marks=pytest.mark.skipif(not mosaic_gpu_available(), reason="needs jax >= 0.12"),
    ),
    "triton",
    "mosaic",
]


def random_tree(key, shapes=RAGGED_SHAPES, dtype=jnp.float32, scale=1.0):
    """A dict pytree with one leaf per shape, fresh normal values."""
    keys = jax.random.split(key, len(shapes))
    return {
        f"w{i}": (scale * jax.random.normal(k, s, jnp.float32)).astype(dtype)
        for i, (k, s) in enumerate(zip(keys, shapes))
    }


def assert_trees_close(actual, expected, rtol=1e-6, atol=0.0, err_msg=""):
    """Elementwise: |a - e| <= atol + rtol |e| for every element of every leaf."""
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"tree structures differ: {a_def} vs {e_def} {err_msg}"
    for a, e in zip(a_leaves, e_leaves):
        np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol, err_msg=err_msg
        )


def assert_trees_rel_close(actual, expected, rel=1e-6, err_msg=""):
    """Normwise relative error per leaf: max|a - e| <= rel * max|e|.

    The relative error of a vector, as numerical analysis defines it. Elementwise relative error
    is ill-conditioned for optimizer outputs: Adam's update is a ratio, and an element crossing
    zero has an arbitrarily large relative error from a one-ulp difference upstream.
    """
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"tree structures differ: {a_def} vs {e_def} {err_msg}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape, (a.shape, e.shape, err_msg)
        scale = np.max(np.abs(e)) if e.size else 0.0
        err = np.max(np.abs(a - e)) if e.size else 0.0
        assert err <= rel * scale or err == 0.0, (
            f"leaf {i} {e.shape}: max abs error {err:.3e} > {rel:g} * max|expected| {scale:.3e} {err_msg}"
        )


@pytest.fixture
def key(request):
    # A fresh key per test, derived from its name: different across tests, reproducible across
    # runs (crc32, unlike hash(), does not change with PYTHONHASHSEED).
    return jax.random.PRNGKey(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------------------------------------
# Tolerances of f32-computed kernel results against float64, from the unit roundoff
# ---------------------------------------------------------------------------------------------

U32 = 2.0**-24  # unit roundoff of float32


def unit_roundoff(dtype) -> float:
    """u = eps / 2, the largest relative error of rounding to nearest: 2**-8 for bf16, 2**-24 for f32."""
    return float(jnp.finfo(dtype).eps) / 2


def tolerance(dtype, n_reduce=(), scale=1.0, *, ops=0, compute_dtype=jnp.float32):
    """`dict(rtol, atol)` bounding |computed - exact| elementwise for a result computed in f32, stored in `dtype`.

    `exact` is the float64 value of the same formula on the same (already rounded) inputs. Two error
    sources (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed. 2002, secs. 2.2, 4.2):

    - Storing the result in `dtype` rounds to nearest: at most half an ulp, u(dtype) |value|, with
      u = eps / 2 (bf16: eps = 2**-7, u = 2**-8; f32: u = 2**-24). This is `rtol`.
    - The f32 arithmetic before it: every elementwise f32 operation errs by at most u32 relative to
      its result, and a length-n sum by at most ceil(log2 n) u32 relative to its partial sums when it
      is summed as a tree (Triton's `tl.sum`, XLA's reductions: measured on CPU, sums of 16 to 1e5
      random f32 numbers err by 1.5-3.5 u32, not growing with n). Along the chain of operations that
      produces the result these errors add: `atol = (1 + u(dtype)) (ops + sum_i ceil(log2 n_i)) u32
      scale`, where `n_reduce` lists the lengths of the reductions on the chain (an int or a tuple:
      (N,) for LayerNorm's y, whose mean and variance are sums over a row of N; (N, M) for its
      dscale, a sum over M rows of dy * xhat), `ops` counts the elementwise roundings on it (an f32
      rsqrt counts 2: XLA's is within 2 ulp), and `scale` is the magnitude of the values on the chain:
      the largest |term| of the formula (not of the result, which can be a small difference of large
      terms), for a mean the mean |term|, for a sum of random-sign terms the root-sum-square of the
      terms (the size of its partial sums). The factor 1 + u(dtype): the f32 error can also move the
      value that is rounded.

    `compute_dtype`: where the arithmetic itself runs in another dtype (flax's eval-mode normalisation
    of bf16 inputs runs in bf16), u32 above becomes u(compute_dtype).

    The bf16 bound is dominated by the rounding of the stored result: a bf16 result within this
    tolerance is within about one bf16 ulp of exact, and a formula that is wrong by more than that
    (a dx without its -mean(g) term: rstd * |mean(dy * scale)|) fails it.
    """
    ns = (n_reduce,) if np.ndim(n_reduce) == 0 else tuple(n_reduce)
    depth = ops + sum(int(np.ceil(np.log2(n))) for n in ns if n > 1)
    u = unit_roundoff(dtype)
    return {"rtol": u, "atol": (1.0 + u) * depth * unit_roundoff(compute_dtype) * float(scale)}


def assert_within(actual, exact, tol, err_msg=""):
    """Elementwise |actual - exact| <= atol + rtol |exact| (`tol` from `tolerance`), in float64.

    Returns the largest ratio |actual - exact| / (atol + rtol |exact|) over the elements (<= 1): how
    much of the tolerance was used.
    """
    a, e = np.asarray(actual, np.float64), np.asarray(exact, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape, err_msg)
    bound = tol["atol"] + tol["rtol"] * np.abs(e)
    diff = np.abs(a - e)
    if not a.size:
        return 0.0
    ratio = np.where(diff == 0, 0.0, diff / np.where(bound > 0, bound, np.inf))
    ratio = np.where(np.isnan(diff), np.inf, ratio)
    i = np.unravel_index(np.argmax(ratio), a.shape)
    used = float(ratio[i])
    assert used <= 1.0, (
        f"{err_msg}: |actual - exact| = {diff[i]:.3e} at {i} (actual {a[i]:.8g}, exact {e[i]:.8g})"
        f" > atol {np.max(tol['atol']):.3e} + rtol {tol['rtol']:.3e} * |exact|"
        f"; max error {np.nanmax(diff):.3e}, {used:.3g} times the tolerance"
    )
    return used


def assert_grads_match_finite_differences(f, f64, args, out_tols, *, eps=3e-2, fwd=False, seed=0, err_msg=""):
    """jax.vjp (and with `fwd` jax.jvp) of `f` against central differences of `f`, in one random direction.

    What `jax.test_util.check_grads` does, within a derived bound rather than a fixed tolerance. The
    central difference D = (f(x + eps t) - f(x - eps t)) / (2 eps), computed from f32 values of `f`,
    differs from the exact directional derivative J t by
    - rounding: each value of f is within its `tolerance` (`out_tols`: one per output leaf) of exact,
      so D errs by at most (tol(f(x + eps t)) + tol(f(x - eps t))) / (2 eps) elementwise;
    - truncation: eps^2 / 6 |f'''(xi)[t, t, t]| for some xi within eps |t| of x, bounded here by twice
      the third directional derivative at x of `f64`, the same formula in float64 (nested jvp).
    eps = 3e-2 about balances the two for normalisations of unit-scale data (jax's default 1e-4 makes
    the rounding term 300 times larger). The
    inputs x +- eps t are rounded to f32, so t is taken as their exact difference / (2 eps). The AD
    result's own f32 error (a rounding chain not divided by eps, ~eps of the rounding term) is neglected.
    The JVP is compared elementwise, the VJP through <c, J t> = <J^T c, t> for a random cotangent c,
    within sum_i |c_i| bound_i.
    """
    args = [np.asarray(a, np.float32) for a in args]
    rng = np.random.default_rng(seed)
    t = [rng.standard_normal(a.shape) for a in args]
    plus = [(a + eps * d).astype(np.float32) for a, d in zip(args, t)]
    minus = [(a - eps * d).astype(np.float32) for a, d in zip(args, t)]
    t = [(p.astype(np.float64) - m.astype(np.float64)) / (2 * eps) for p, m in zip(plus, minus)]

    def leaves(tree):
        return [np.asarray(v, np.float64) for v in jax.tree.leaves(tree)]

    y_plus, y_minus = leaves(f(*plus)), leaves(f(*minus))
    fd = [(p - m) / (2 * eps) for p, m in zip(y_plus, y_minus)]
    with jax.enable_x64(True):
        x64, t64 = tuple(jnp.asarray(a, jnp.float64) for a in args), tuple(jnp.asarray(d) for d in t)

        def d1(*x):
            return jax.jvp(f64, x, t64)[1]

        def d2(*x):
            return jax.jvp(d1, x, t64)[1]

        third = leaves(jax.jvp(d2, x64, t64)[1])
    assert len(out_tols) == len(fd) == len(third), (len(out_tols), len(fd), len(third))
    bound = [
        (2 * tol["atol"] + tol["rtol"] * (np.abs(p) + np.abs(m))) / (2 * eps) + 2 * eps**2 / 6 * np.abs(d3)
        for tol, p, m, d3 in zip(out_tols, y_plus, y_minus, third)
    ]
    t32 = tuple(d.astype(np.float32) for d in t)
    if fwd:
        _, jt = jax.jvp(f, tuple(args), t32)
        for i, (a, e, b) in enumerate(zip(leaves(jt), fd, bound)):
            assert np.all(np.abs(a - e) <= b), (
                f"{err_msg} jvp output {i}: max |AD - finite differences| "
                f"{np.max(np.abs(a - e)):.3e}, bound {np.min(b):.3e}..{np.max(b):.3e}"
            )
    y, vjp = jax.vjp(f, *args)
    c = [rng.standard_normal(np.shape(v)).astype(np.float32) for v in jax.tree.leaves(y)]
    ct = leaves(vjp(jax.tree.unflatten(jax.tree.structure(y), c)))
    ip_ad = sum(np.vdot(g, d) for g, d in zip(ct, t))
    ip_fd = sum(np.vdot(np.asarray(cc, np.float64), e) for cc, e in zip(c, fd))
    ip_bound = sum(np.sum(np.abs(np.asarray(cc, np.float64)) * b) for cc, b in zip(c, bound))
    assert abs(ip_ad - ip_fd) <= ip_bound, (
        f"{err_msg} vjp: |<J^T c, t> - <c, finite differences>| = {abs(ip_ad - ip_fd):.3e} > bound {ip_bound:.3e}"
    )
    return abs(ip_ad - ip_fd) / ip_bound


def params_and_grads(key, shapes, dtype, steps):
    """A {"p<i>": leaf} tree of `shapes` in `dtype`, and `steps` gradient trees like it (fresh normals)."""
    ks = jax.random.split(key, len(shapes) + steps)
    params = {f"p{i}": jax.random.normal(ks[i], s).astype(dtype) for i, s in enumerate(shapes)}
    grads = [
        {
            k: jax.random.normal(jax.random.fold_in(ks[len(shapes) + t], i), v.shape).astype(dtype)
            for i, (k, v) in enumerate(params.items())
        }
        for t in range(steps)
    ]
    return params, grads


def train_on_backend(tx, params, grads, backend):
    """(params, state) after one jitted, donated `update_and_apply` step per gradient tree, traced under
    kernel `backend`; the caller's params are copied, not donated."""
    from optax_ext.kernels import use_backend

    def step(p, s, g):  # a fresh function per call: the backend is read at trace time
        return tx.update_and_apply(g, s, p)

    with use_backend(backend):
        step = jax.jit(step, donate_argnums=(0, 1))
        state = tx.init(jax.tree.map(jnp.copy, params))
        p = jax.tree.map(jnp.copy, params)
        for g in grads:
            p, state = step(p, state, g)
    return p, state
