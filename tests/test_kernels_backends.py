"""One suite for the multi-tensor ops on every kernel backend that runs on a CPU.

The fused pass and the sums of squares have one implementation per backend (`kernels/fused_pass/`,
`kernels/norms/`: triton.py, mosaic_gpu.py, mosaic_tpu.py); each runs here in its own interpreter
("interpret": Pallas' generic one, the Triton kernels; "mosaic_gpu_interpret": Mosaic GPU's, TMA
copies, barriers and SMEM; "mosaic_interpret": TPU's, DMAs, semaphores, VMEM and SMEM) against the
jnp reference, on the issue's ragged tree (0-d, 1, 7, 127, 129, 1000, (3, 5, 7), (129, 257), a leaf
over one block), f32 and bf16, with each backend's default blocks and with its smallest ones (every
leaf over them several ragged blocks). What only one backend has (TPU's double buffering, Mosaic
GPU's lowering) is tested in that backend's file.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_ext import quantization as q8
from optax_ext.kernels.backend import mosaic_gpu_available
from optax_ext.kernels.elementwise import Job, run_elementwise_reference
from optax_ext.kernels.fused_pass import fused_pass_pallas
from optax_ext.kernels.norms import global_sq_norm_pallas, leaf_sq_norms_pallas

# The ragged tree: 0-d, tiny, around the 128/256 boundaries, 3-D, 2-D odd, a leaf over one block.
SHAPES = [(), (1,), (7,), (127,), (129,), (1000,), (3, 5, 7), (129, 257), (5000,)]

# Each interpreter backend with its smallest block (elements): Mosaic GPU's TMA chunk (256), TPU's
# (8, 128) f32 tile (1024; 2048 for 16-bit operands, raised by the plan).
SMALLEST_BLOCK = {"interpret": 256, "mosaic_gpu_interpret": 256, "mosaic_interpret": 1024}
BACKENDS = [
    "interpret",
    pytest.param(
        "mosaic_gpu_interpret", marks=pytest.mark.skipif(not mosaic_gpu_available(), reason="needs jax >= 0.12")
    ),
    "mosaic_interpret",
]
DTYPES = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
BLOCKS = pytest.mark.parametrize("smallest", [False, True], ids=["default_blocks", "smallest_blocks"])


def adam_body(xs, shared, leaf):
    """Adam (Kingma & Ba, 2015) with decoupled decay: 4 inputs (g, p, m, v), 3 outputs, 6 shared
    scalars and a per-leaf decay."""
    g, p, m, v = xs
    m = shared[0] * m + shared[1] * g
    v = shared[2] * v + shared[3] * (g * g)
    u = m / (jnp.sqrt(v) + shared[4])
    return [p - shared[5] * (u + leaf[0] * p), m, v]


SHARED = jnp.array([0.9, 0.1, 0.999, 0.001, 1e-8, 1e-2], jnp.float32)


def adam_jobs(key, shapes, dtypes):
    """One Adam job per shape, (grad, param) dtypes per leaf, f32 moments updated in place."""
    jobs = []
    for k, (shape, (g_dt, p_dt)) in enumerate(zip(shapes, dtypes)):
        ks = jax.random.split(jax.random.fold_in(key, k), 4)
        g, p = (jax.random.normal(ks[i], shape).astype(d) for i, d in ((0, g_dt), (1, p_dt)))
        m = jax.random.normal(ks[2], shape, jnp.float32)
        v = jnp.abs(jax.random.normal(ks[3], shape, jnp.float32))
        jobs.append(
            Job([g, p, m, v], [p_dt, jnp.float32, jnp.float32], jnp.array([0.01 * (k + 1)]), {1: 0, 2: 1, 3: 2})
        )
    return jobs


def check_against_reference(jobs, got, body=adam_body, shared=SHARED):
    """Every output of every job equal to `run_elementwise_reference` to f32 rounding."""
    assert len(got) == len(jobs)
    for job, outs in zip(jobs, got):
        want = run_elementwise_reference(body, job.inputs, shared, job.scalars, job.out_dtypes)
        for o, w in zip(outs, want):
            assert o.shape == w.shape and o.dtype == w.dtype
            np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(w, np.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@BLOCKS
@DTYPES
def test_fused_pass_matches_reference(key, backend, smallest, dtype):
    # Mixed storage in one call: every other leaf keeps f32 params (two launches on the Mosaic
    # backends, which group leaves by dtype; one on Triton's).
    dtypes = [(dtype, dtype if k % 2 else jnp.float32) for k in range(len(SHAPES))]
    jobs = adam_jobs(key, SHAPES, dtypes)
    block = SMALLEST_BLOCK[backend] if smallest else None
    check_against_reference(jobs, fused_pass_pallas(adam_body, jobs, SHARED, backend=backend, block=block))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_pass_outputs_without_aliases_and_scalars(key, backend):
    x = jax.random.normal(key, (3000,))
    jobs = [
        Job([x], [jnp.float16, jnp.float32], jnp.zeros((0,))),
        Job([x[:5]], [jnp.float16, jnp.float32], jnp.zeros((0,))),
        Job([x[:0]], [jnp.float16, jnp.float32], jnp.zeros((0,))),
    ]

    def body(xs, s, t):
        return [jnp.clip(xs[0], -1.0, 1.0), xs[0] * 2.0]

    got = fused_pass_pallas(body, jobs, jnp.zeros((0,)), backend=backend)
    for job, outs in zip(jobs, got):
        np.testing.assert_array_equal(outs[0], jnp.clip(job.inputs[0], -1, 1).astype(jnp.float16))
        np.testing.assert_array_equal(outs[1], job.inputs[0] * 2)


@pytest.mark.parametrize("backend", BACKENDS)
@BLOCKS
@DTYPES
def test_norms_match_reference(key, backend, smallest, dtype):
    block = SMALLEST_BLOCK[backend] if smallest else None
    # With the smallest blocks the last leaf spans over 128 blocks (TPU: partials in two rows).
    shapes = SHAPES + ([(140_000,)] if smallest else [])
    leaves = [jax.random.normal(jax.random.fold_in(key, k), s).astype(dtype) for k, s in enumerate(shapes)]
    want = [float(np.sum(np.asarray(x, np.float64) ** 2)) for x in leaves]
    got = leaf_sq_norms_pallas(leaves, backend=backend, block=block)
    np.testing.assert_allclose(np.array(got, np.float64), want, rtol=2e-6)
    leaves[5] = leaves[5].at[3].set(jnp.nan).at[7].set(jnp.inf)
    total, count = global_sq_norm_pallas(leaves, backend=backend, block=block, count_nonfinite=True)
    assert int(count) == 2 and not jnp.isfinite(total)
    finite = global_sq_norm_pallas(leaves[:5] + leaves[6:], backend=backend, block=block)
    np.testing.assert_allclose(float(finite), sum(want[:5] + want[6:]), rtol=2e-6)


# Leaves of 8-bit moments: one quantization block (256), a ragged last block, several launch blocks
# with a ragged last row (over the 2048-element default block), and a 2-D leaf.
QUANTIZED_SHAPES = [(256,), (300,), (1000,), (5000,), (129, 257)]
SIGNED, UNSIGNED = q8.QuantFormat(256, True), q8.QuantFormat(256, False)


def adam_8bit_jobs(key, dtype):
    """Adam jobs with 8-bit m (signed map) and v (unsigned), updated in place, params in `dtype`."""
    jobs = []
    for k, shape in enumerate(QUANTIZED_SHAPES):
        ks = jax.random.split(jax.random.fold_in(key, k), 4)
        g, p = (jax.random.normal(ks[i], shape).astype(dtype) for i in (0, 1))
        m = q8.quantize_leaf(jax.random.normal(ks[2], shape), SIGNED)
        v = q8.quantize_leaf(jnp.abs(jax.random.normal(ks[3], shape)), UNSIGNED)
        jobs.append(Job([g, p, m, v], [dtype, SIGNED, UNSIGNED], jnp.array([0.01 * (k + 1)]), {1: 0, 2: 1, 3: 2}))
    return jobs


@pytest.mark.parametrize(
    "backend",
    [
        "interpret",
        pytest.param(
            "mosaic_gpu_interpret", marks=pytest.mark.skipif(not mosaic_gpu_available(), reason="needs jax >= 0.12")
        ),
    ],
)
@DTYPES
def test_fused_pass_8bit_states_match_reference(key, backend, dtype):
    """8-bit moments dequantized, updated and requantized in the kernels (Triton's and Mosaic GPU's)
    as XLA does: new params to f32 rounding, the same absmax, the same codes (a code may differ by
    one where a value sits on a midpoint of the map to f32 rounding)."""
    jobs = adam_8bit_jobs(key, dtype)
    got = fused_pass_pallas(adam_body, jobs, SHARED, backend=backend)
    for job, outs in zip(jobs, got):
        assert outs is not None, "the kernels took the 8-bit job"
        want = run_elementwise_reference(adam_body, job.inputs, SHARED, job.scalars, job.out_dtypes)
        p_got, p_want = (np.asarray(x, np.float32) for x in (outs[0], want[0]))
        np.testing.assert_allclose(p_got, p_want, rtol=1e-6, atol=1e-6)
        for o, w in zip(outs[1:], want[1:]):
            assert isinstance(o, q8.QuantizedArray) and o.format == w.format
            assert o.codes.shape == w.codes.shape and o.absmax.shape == w.absmax.shape
            np.testing.assert_allclose(o.absmax, w.absmax, rtol=1e-6)
            diff = np.abs(np.asarray(o.codes, np.int32) - np.asarray(w.codes, np.int32))
            assert diff.max() <= 1 and diff.mean() < 1e-3
