"""Tests for optax_ext.schedules.

Every schedule is checked against a closed form written here in float64
Python (PyTorch's CyclicLR / OneCycleLR / CosineAnnealingWarmRestarts logic
transcribed from its documentation and source where we follow PyTorch), at
many steps including t = 0, phase and cycle edges and far past the end; and
against Optax where Optax has the same schedule.
"""

import bisect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_ext import schedules as S


def _assert_close(got, want, rtol=2e-5, atol_rel=2e-6, scale=None):
    """float32 precision: relative, plus absolute relative to the largest value."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if scale is None:
        scale = max(1e-30, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol_rel * scale)


def _check(schedule, closed_form, steps, **tol):
    """Schedule on an int32 step array, on Python ints and jitted == closed form."""
    steps = np.unique(np.asarray([int(s) for s in steps if s >= 0], np.int64))
    want = np.array([closed_form(int(t)) for t in steps], np.float64)
    got = schedule(jnp.asarray(steps, jnp.int32))
    assert got.dtype == jnp.float32, got.dtype
    assert got.shape == steps.shape, (got.shape, steps.shape)
    _assert_close(got, want, **tol)
    _assert_close(jax.jit(schedule)(jnp.asarray(steps, jnp.int32)), want, **tol)
    for t in steps[:: max(1, len(steps) // 8)]:
        value = schedule(int(t))
        assert value.shape == () and value.dtype == jnp.float32
        _assert_close(value, closed_form(int(t)), scale=np.max(np.abs(want)), **tol)


def _edges(*points, n=0, far=True):
    """0 .. n-1 plus each point and its neighbours, plus steps far past the end."""
    out = set(range(n))
    for p in points:
        out.update((p - 1, p, p + 1))
    out.add(0)
    if far:
        top = max([n, *points, 1])
        out.update((2 * top, 10 * top + 3, 2**20 + 1))
    return sorted(x for x in out if x >= 0)


SEEDS = [0, 1, 2]


# ----------------------------------------------------------------------------
# Decays


@pytest.mark.parametrize("seed", SEEDS)
def test_constant(seed):
    v = float(np.random.default_rng(seed).uniform(1e-4, 1.0))
    _check(S.constant(v), lambda t: v, _edges(n=5))


@pytest.mark.parametrize("seed", SEEDS)
def test_step_decay(seed):
    rng = np.random.default_rng(seed)
    eta0, k, gamma = rng.uniform(0.01, 2.0), int(rng.integers(1, 40)), rng.uniform(0.1, 0.99)
    closed = lambda t: eta0 * gamma ** math.floor(t / k)  # step decay (PyTorch StepLR)
    _check(S.step_decay(eta0, k, gamma), closed, _edges(k, 2 * k, 3 * k, 7 * k, n=3 * k))


@pytest.mark.parametrize("seed", SEEDS)
def test_multistep_decay(seed):
    rng = np.random.default_rng(seed)
    bounds = sorted(set(int(b) for b in rng.integers(1, 300, size=4)))
    eta0, gamma = rng.uniform(0.01, 2.0), rng.uniform(0.05, 0.9)
    closed = lambda t: eta0 * gamma ** bisect.bisect_right(bounds, t)  # MultiStepLR
    _check(S.multistep_decay(eta0, bounds, gamma), closed, _edges(*bounds, n=20))
    _check(S.multistep_decay(eta0, [], gamma), lambda t: eta0, _edges(n=3))


@pytest.mark.parametrize("seed", SEEDS)
def test_exponential_decay_rate_form(seed):
    rng = np.random.default_rng(seed)
    eta0, lam, k = rng.uniform(0.01, 2.0), rng.uniform(1e-3, 0.2), int(rng.integers(1, 9))
    _check(S.exponential_decay(eta0, rate=lam), lambda t: eta0 * math.exp(-lam * t), _edges(n=50))
    _check(
        S.exponential_decay(eta0, rate=lam, transition_steps=k, staircase=True),
        lambda t: eta0 * math.exp(-lam * math.floor(t / k)),
        _edges(k, 5 * k, n=40),
    )
    # Growth (negative rate) capped by end_value.
    end = eta0 * 3.0
    _check(
        S.exponential_decay(eta0, rate=-lam, end_value=end),
        lambda t: min(eta0 * math.exp(lam * t), end),
        _edges(n=60, far=False),
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("staircase", [False, True])
def test_exponential_decay_gamma_form_matches_optax(seed, staircase):
    rng = np.random.default_rng(seed)
    eta0, k = rng.uniform(0.01, 2.0), int(rng.integers(1, 12))
    for gamma, end in [(rng.uniform(0.3, 0.95), eta0 * 0.2), (rng.uniform(1.01, 1.2), eta0 * 4)]:
        ours = S.exponential_decay(eta0, gamma=gamma, transition_steps=k, staircase=staircase, end_value=end)
        ref = optax.exponential_decay(eta0, k, gamma, staircase=staircase, end_value=end)
        clip = max if gamma < 1 else min

        def closed(t, gamma=gamma, end=end, clip=clip):
            p = math.floor(t / k) if staircase else t / k
            return clip(eta0 * gamma**p, end)

        steps = _edges(k, 4 * k, n=30 * k, far=False)
        _check(ours, closed, steps)
        _assert_close(ours(jnp.asarray(steps)), jax.jit(ref)(jnp.asarray(steps)))
        # gamma = exp(-rate) makes the two forms the same schedule.
        _assert_close(
            S.exponential_decay(eta0, rate=-math.log(gamma), transition_steps=k, staircase=staircase)(
                jnp.asarray(steps)
            ),
            S.exponential_decay(eta0, gamma=gamma, transition_steps=k, staircase=staircase)(jnp.asarray(steps)),
        )


@pytest.mark.parametrize("seed", SEEDS)
def test_polynomial_decay_closed_form_and_optax(seed):
    rng = np.random.default_rng(seed)
    eta0, end = rng.uniform(0.5, 2.0), rng.uniform(0.0, 0.4)
    power, T = rng.uniform(0.5, 3.0), int(rng.integers(5, 300))
    closed = lambda t: end + (eta0 - end) * (1 - min(t, T) / T) ** power
    s = S.polynomial_decay(eta0, end, power, T)
    steps = _edges(T, T // 2, n=10)
    _check(s, closed, steps)
    # Eager: jitted, optax.polynomial_schedule can give NaN at t >= T (below).
    _assert_close(s(jnp.asarray(steps)), optax.polynomial_schedule(eta0, end, power, T)(jnp.asarray(steps)))


def test_polynomial_decay_finite_at_end_under_jit():
    # 1 - t/T may round to -1e-8 once XLA turns /T into *(1/T); a fractional
    # power of it is NaN. These T all did that with the naive formula on CPU.
    for T in (3, 5, 6, 7, 9, 10, 11, 12, 13, 14):
        got = jax.jit(S.polynomial_decay(1.0, 0.1, 1.7, T))(jnp.arange(T - 1, T + 3))
        _assert_close(got, [0.1 + 0.9 * (1 / T) ** 1.7, 0.1, 0.1, 0.1])


@pytest.mark.parametrize("seed", SEEDS)
def test_cosine_decay_closed_form_and_optax(seed):
    rng = np.random.default_rng(seed)
    eta0, lo, T = rng.uniform(0.5, 2.0), rng.uniform(0.0, 0.3), int(rng.integers(3, 500))
    closed = lambda t: (
        lo + 0.5 * (eta0 - lo) * (1 + math.cos(math.pi * min(t, T) / T))
    )  # Loshchilov & Hutter (SGDR), one cycle
    s = S.cosine_decay(eta0, T, lo)
    steps = _edges(T, T // 2, n=10)
    _check(s, closed, steps)
    ref = optax.cosine_decay_schedule(eta0, T, alpha=lo / eta0)
    _assert_close(s(jnp.asarray(steps)), jax.jit(ref)(jnp.asarray(steps)))


def _torch_sgdr(n, eta0, T0, mult, lo, decay):
    """PyTorch CosineAnnealingWarmRestarts's chainable step(): T_cur += 1, wrap."""
    out, T_cur, T_i, cycle = [], 0, T0, 0
    for _ in range(n):
        peak = eta0 * decay**cycle
        out.append(lo + (peak - lo) * (1 + math.cos(math.pi * T_cur / T_i)) / 2)
        T_cur += 1
        if T_cur >= T_i:
            T_cur -= T_i
            T_i *= mult
            cycle += 1
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mult", [1, 2, 3])
def test_cosine_with_restarts_vs_pytorch_and_optax(seed, mult):
    rng = np.random.default_rng(seed)
    eta0, lo, T0 = rng.uniform(0.5, 2.0), rng.uniform(0.0, 0.2), int(rng.integers(1, 30))
    decay = 1.0 if seed == 0 else rng.uniform(0.5, 0.95)
    periods = [T0 * mult**i for i in range(5)]
    n = sum(periods)
    table = _torch_sgdr(n + 2, eta0, T0, mult, lo, decay)
    s = S.cosine_with_restarts(eta0, T0, mult, lo, decay)
    starts = list(np.cumsum([0] + periods))
    _check(s, lambda t: table[t], _edges(*starts, n=n, far=False))
    # Optax's sgdr_schedule with the same explicit cycles.
    ref = optax.sgdr_schedule(
        [
            dict(init_value=eta0 * decay**i, peak_value=eta0 * decay**i, warmup_steps=0, decay_steps=p, end_value=lo)
            for i, p in enumerate(periods)
        ]
    )
    t = jnp.arange(n)
    _assert_close(s(t), jax.jit(ref)(t))


def test_cosine_with_restarts_far_steps():
    # Cycle lookup past many restarts, against the recurrence's closed form.
    T0, mult = 3, 2
    for t in [2**20 + 5, 2**30 + 7, 2**31 - 1]:
        k, start = 0, 0
        while start + T0 * mult**k <= t:
            start += T0 * mult**k
            k += 1
        want = 0.5 * (1 + math.cos(math.pi * (t - start) / (T0 * mult**k)))
        _assert_close(S.cosine_with_restarts(1.0, T0, mult)(t), want, atol_rel=1e-5)
    s = S.cosine_with_restarts(1.0, 7)
    for t in [2**20 + 5, 2**31 - 1]:
        _assert_close(s(t), 0.5 * (1 + math.cos(math.pi * (t % 7) / 7)), atol_rel=1e-5)


# ----------------------------------------------------------------------------
# Cyclical (PyTorch CyclicLR) and 1cycle (PyTorch OneCycleLR)


def torch_cyclic(t, base, mx, up, down, mode, gamma, momentum=False):
    """CyclicLR.get_lr with last_epoch = t (float arithmetic, as PyTorch)."""
    up, down = float(up), float(down if down is not None else up)
    total = up + down
    ratio = up / total
    cycle = math.floor(1 + t / total)
    x = 1.0 + t / total - cycle
    scale_factor = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
    if mode == "triangular":
        s = 1.0
    elif mode == "triangular2":
        s = 0.5 ** (cycle - 1)  # PyTorch's 1 / 2.0 ** (cycle - 1), without overflow
    else:
        s = gamma**t
    height = (mx - base) * scale_factor * s
    return mx - height if momentum else base + height


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_cyclical_vs_pytorch(seed, mode):
    rng = np.random.default_rng(seed)
    base = rng.uniform(1e-4, 0.1)
    mx = base + rng.uniform(0.01, 1.0)
    up = int(rng.integers(1, 25))
    down = None if seed == 0 else int(rng.integers(1, 25))
    gamma = rng.uniform(0.99, 0.9999) if mode == "exp_range" else 1.0
    d = up if down is None else down
    edges = [c * (up + d) + o for c in range(6) for o in (0, up)]
    steps = _edges(*edges, n=3 * (up + d))
    _check(
        S.cyclical(base, mx, up, down, mode, gamma),
        lambda t: torch_cyclic(t, base, mx, up, down, mode, gamma),
        steps,
    )
    bm, mm = 0.8 - rng.uniform(0, 0.1), 0.9 + rng.uniform(0, 0.05)
    _check(
        S.cyclical_momentum(up, down, base_momentum=bm, max_momentum=mm, mode=mode, gamma=gamma),
        lambda t: torch_cyclic(t, bm, mm, up, down, mode, gamma, momentum=True),
        steps,
    )


def torch_one_cycle(t, T, pct, anneal, three_phase, lrs, moms):
    """OneCycleLR.get_lr with last_epoch = t; ``lrs``/``moms`` = (init, max, min)/(base, max)."""
    init, mx, low = lrs
    base_m, max_m = moms
    if three_phase:
        phases = [
            (float(pct * T) - 1, init, mx, max_m, base_m),
            (float(2 * pct * T) - 2, mx, init, base_m, max_m),
            (T - 1, init, low, max_m, max_m),
        ]
    else:
        phases = [(float(pct * T) - 1, init, mx, max_m, base_m), (T - 1, mx, low, base_m, max_m)]
    cos = lambda a, b, p: b + (a - b) / 2.0 * (math.cos(math.pi * p) + 1)
    lin = lambda a, b, p: (b - a) * p + a
    f = cos if anneal == "cos" else lin
    start = 0.0
    for i, (end, a, b, ma, mb) in enumerate(phases):
        if t <= end or i == len(phases) - 1:
            p = (t - start) / (end - start)
            return f(a, b, p), f(ma, mb, p)
        start = end


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("three_phase", [False, True])
def test_one_cycle_vs_pytorch(seed, anneal, three_phase):
    rng = np.random.default_rng(seed)
    T = int(rng.integers(10, 400))
    pct = float(rng.uniform(0.1, 0.45))
    mx, div, fdiv = rng.uniform(0.01, 1.0), rng.uniform(5, 50), rng.uniform(10, 1e4)
    lrs = (mx / div, mx, mx / div / fdiv)
    moms = (0.85 - rng.uniform(0, 0.05), 0.95 + rng.uniform(0, 0.04))

    def closed(t, which):
        # PyTorch stops at total_steps; we hold the value reached at T - 1.
        return torch_one_cycle(min(t, T - 1), T, pct, anneal, three_phase, lrs, moms)[which]

    e1, e2 = pct * T - 1, 2 * pct * T - 2
    steps = _edges(math.floor(e1), math.ceil(e1), math.floor(e2), math.ceil(e2), T - 1, T, n=T)
    _check(
        S.one_cycle(mx, T, pct, div, fdiv, anneal, three_phase),
        lambda t: closed(t, 0),
        steps,
    )
    _check(
        S.one_cycle_momentum(T, moms[0], moms[1], pct, anneal, three_phase),
        lambda t: closed(t, 1),
        steps,
    )
    s = S.one_cycle(mx, T, pct, div, fdiv, anneal, three_phase)
    _assert_close(s(0), mx / div)
    _assert_close(s(T - 1), mx / div / fdiv, scale=mx)


# ----------------------------------------------------------------------------
# Warm-up, inverse square root, join


@pytest.mark.parametrize("seed", SEEDS)
def test_inverse_sqrt_and_noam(seed):
    rng = np.random.default_rng(seed)
    peak, w, init = rng.uniform(1e-4, 1.0), int(rng.integers(1, 200)), rng.uniform(0, 1e-4)

    def closed(t):
        return init + (peak - init) * t / w if t < w else peak * math.sqrt(w / t)

    _check(S.inverse_sqrt(peak, w, init), closed, _edges(w, 4 * w, n=20))
    d, scale = int(rng.integers(16, 1024)), rng.uniform(0.5, 2.0)

    def vaswani(t):  # Vaswani et al. (2017), section 5.3, step_num = t + 1
        n = t + 1
        return scale * d**-0.5 * min(n**-0.5, n * w**-1.5)

    _check(S.noam(d, w, scale), vaswani, _edges(w - 1, w, 4 * w, n=20))
    t = jnp.arange(5 * w)
    _assert_close(S.noam(d, w, scale)(t), S.inverse_sqrt(scale * (d * w) ** -0.5, w)(t + 1))


@pytest.mark.parametrize("seed", SEEDS)
def test_linear_warmup_closed_form(seed):
    rng = np.random.default_rng(seed)
    w, T, eta0 = int(rng.integers(1, 100)), int(rng.integers(1, 200)), rng.uniform(0.1, 2.0)
    cos = lambda t: 0.5 * eta0 * (1 + math.cos(math.pi * min(t, T) / T))

    def warmup_then(t, target=cos, init=0.0):
        return init + (target(0) - init) * t / w if t <= w else target(t - w)

    steps = _edges(w, w + T, n=10)
    _check(S.linear_warmup(S.cosine_decay(eta0, T), w), warmup_then, steps)
    init = rng.uniform(0, 0.1)
    _check(S.linear_warmup(S.cosine_decay(eta0, T), w, init), lambda t: warmup_then(t, init=init), steps)
    _check(S.linear_warmup(eta0, w), lambda t: warmup_then(t, target=lambda _: eta0), steps)
    # An Optax schedule can be wrapped too.
    ref = optax.exponential_decay(eta0, 7, 0.5)
    _check(S.linear_warmup(ref, w), lambda t: warmup_then(t, target=lambda u: eta0 * 0.5 ** (u / 7)), steps)
    # No warm-up: the wrapped schedule itself.
    _check(S.linear_warmup(S.cosine_decay(eta0, T), 0), cos, steps)


@pytest.mark.parametrize("seed", SEEDS)
def test_warmup_cosine_matches_optax(seed):
    rng = np.random.default_rng(seed)
    w, T = int(rng.integers(0, 50)), int(rng.integers(60, 400))
    peak, init, end = rng.uniform(0.1, 2.0), rng.uniform(0, 0.05), rng.uniform(0, 0.05)

    def closed(t):
        if t < w:
            return init + (peak - init) * t / w
        u = min(t - w, T - w)
        return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * u / (T - w)))

    s = S.warmup_cosine(peak, w, T, init, end)
    steps = _edges(w, T, n=10)
    _check(s, closed, steps)
    ref = optax.warmup_cosine_decay_schedule(init, peak, w, T, end)
    _assert_close(s(jnp.asarray(steps)), jax.jit(ref)(jnp.asarray(steps)))


@pytest.mark.parametrize("seed", SEEDS)
def test_join_matches_optax(seed):
    rng = np.random.default_rng(seed)
    b1, b2 = sorted(int(b) for b in rng.choice(np.arange(1, 200), 2, replace=False))
    c, eta0 = rng.uniform(0.1, 1.0), rng.uniform(0.1, 1.0)
    T = int(rng.integers(1, 60))
    parts = [S.constant(c), S.cosine_decay(eta0, T), optax.exponential_decay(eta0, 5, 0.7)]

    def closed(t):
        if t < b1:
            return c
        if t < b2:
            return 0.5 * eta0 * (1 + math.cos(math.pi * min(t - b1, T) / T))
        return eta0 * 0.7 ** ((t - b2) / 5)

    steps = _edges(b1, b2, n=5, far=False) + [b2 + 150]
    _check(S.join(parts, [b1, b2]), closed, steps)
    ref = optax.join_schedules(parts, [b1, b2])
    _assert_close(S.join(parts, [b1, b2])(jnp.asarray(steps)), jax.jit(ref)(jnp.asarray(steps)))


# ----------------------------------------------------------------------------
# Properties shared by every schedule: elementwise, jit, vmap, clamping.

ALL = {
    "constant": lambda: S.constant(0.3),
    "step_decay": lambda: S.step_decay(1.0, 7, 0.5),
    "multistep_decay": lambda: S.multistep_decay(1.0, [3, 11], 0.1),
    "exponential_decay": lambda: S.exponential_decay(1.0, rate=0.05),
    "exponential_decay_gamma": lambda: S.exponential_decay(1.0, gamma=0.9, transition_steps=3, staircase=True),
    "polynomial_decay": lambda: S.polynomial_decay(1.0, 0.1, 2.0, 20),
    "cosine_decay": lambda: S.cosine_decay(1.0, 20, 0.1),
    "cosine_with_restarts": lambda: S.cosine_with_restarts(1.0, 4, 2, 0.05, 0.7),
    "cyclical": lambda: S.cyclical(0.1, 1.0, 5, 3, "triangular2"),
    "cyclical_momentum": lambda: S.cyclical_momentum(5, 3, mode="exp_range", gamma=0.99),
    "one_cycle": lambda: S.one_cycle(1.0, 23, three_phase=True),
    "one_cycle_momentum": lambda: S.one_cycle_momentum(23, anneal="linear"),
    "inverse_sqrt": lambda: S.inverse_sqrt(1.0, 6),
    "noam": lambda: S.noam(64, 6),
    "linear_warmup": lambda: S.linear_warmup(S.cosine_decay(1.0, 10), 5),
    "warmup_cosine": lambda: S.warmup_cosine(1.0, 5, 25),
    "join": lambda: S.join([S.constant(0.5), S.cosine_decay(1.0, 9)], [4]),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_elementwise_jit_vmap(name):
    s = ALL[name]()
    t = jnp.arange(41, dtype=jnp.int32)
    direct = s(t)
    assert direct.dtype == jnp.float32 and direct.shape == t.shape
    some = [0, 1, 2, 3, 5, 8, 13, 21, 34, 40]
    one_by_one = np.array([float(s(i)) for i in some])
    tol = dict(rtol=1e-6, atol_rel=1e-7)
    _assert_close(np.asarray(direct)[some], one_by_one, **tol)
    _assert_close(jax.vmap(s)(t), direct, **tol)
    _assert_close(jax.jit(jax.vmap(s))(t), direct, **tol)
    _assert_close(jax.jit(s)(t), direct, **tol)
    # Any shape, odd sizes, small int dtypes and float steps (for plotting).
    grid = jnp.asarray(np.arange(35).reshape(5, 7))
    assert s(grid).shape == (5, 7)
    _assert_close(s(grid), np.asarray(direct)[:35].reshape(5, 7), **tol)
    for dtype in (jnp.int16, jnp.uint8, jnp.float32):
        _assert_close(s(t.astype(dtype)), direct, **tol)
    # Negative steps are clamped to 0.
    _assert_close(s(jnp.array([-5, -1, 0])), np.full(3, one_by_one[0]), rtol=1e-7, atol_rel=0)
    assert np.all(np.isfinite(np.asarray(s(jnp.array([0, 1, 2**20, 2**31 - 1])))))
    with pytest.raises(TypeError, match="step"):
        s(jnp.array([True]))


def test_traced_hyperparameters():
    # Values may be traced (inject_hyperparams, a jitted factory).
    f = jax.jit(lambda v, lo: S.cosine_decay(v, 10, lo)(jnp.arange(12)))
    _assert_close(f(2.0, 0.5), S.cosine_decay(2.0, 10, 0.5)(jnp.arange(12)))
    g = jax.jit(lambda b, m: S.cyclical(b, m, 3)(jnp.arange(9)))
    _assert_close(g(0.1, 1.0), S.cyclical(0.1, 1.0, 3)(jnp.arange(9)))
    h = jax.jit(lambda m: S.one_cycle(m, 20)(jnp.arange(25)))
    _assert_close(h(0.5), S.one_cycle(0.5, 20)(jnp.arange(25)))
    g2 = jax.grad(lambda v: S.warmup_cosine(v, 3, 10)(5))
    _assert_close(g2(1.0), S.warmup_cosine(1.0, 3, 10)(5))  # linear in peak


# ----------------------------------------------------------------------------
# Bad arguments

BAD = [
    (lambda: S.cosine_decay(1.0, 0), ValueError, r"cosine_decay: decay_steps must be a positive integer, got 0"),
    (lambda: S.cosine_decay(1.0, -3), ValueError, r"decay_steps .*got -3"),
    (lambda: S.cosine_decay(1.0, 2.5), ValueError, r"decay_steps .*got 2.5"),
    (lambda: S.cosine_decay(1.0, "10"), TypeError, r"decay_steps .*'10'"),
    (lambda: S.cosine_decay(float("nan"), 10), ValueError, r"init_value .*nan"),
    (lambda: S.step_decay(1.0, 0, 0.5), ValueError, r"step_decay: step_size .*got 0"),
    (lambda: S.step_decay(1.0, 3, -0.5), ValueError, r"step_decay: gamma .*>= 0.*-0.5"),
    (lambda: S.multistep_decay(1.0, [5, 3], 0.1), ValueError, r"boundaries must be strictly increasing.*\[5, 3\]"),
    (lambda: S.multistep_decay(1.0, [0, 3], 0.1), ValueError, r"boundaries\[0\] must be a positive integer, got 0"),
    (lambda: S.multistep_decay(1.0, 5, 0.1), TypeError, r"boundaries"),
    (lambda: S.exponential_decay(1.0), ValueError, r"exactly one of decay_rate .* or rate"),
    (lambda: S.exponential_decay(1.0, rate=0.1, gamma=0.9), ValueError, r"exactly one of decay_rate"),
    (lambda: S.exponential_decay(1.0, 10, 0.5, -1), ValueError, r"transition_begin must be an integer >= 0, got -1"),
    (lambda: S.exponential_decay(1.0, gamma=0.0), ValueError, r"gamma .*> 0.*got 0.0"),
    (lambda: S.exponential_decay(1.0, rate=0.1, transition_steps=0), ValueError, r"transition_steps .*got 0"),
    (lambda: S.polynomial_decay(1.0, 0.0, 0.0, 10), ValueError, r"polynomial_decay: power .*> 0.*got 0.0"),
    (lambda: S.polynomial_decay(1.0, 0.0, 1.0, 0), ValueError, r"decay_steps .*got 0"),
    (lambda: S.cosine_with_restarts(1.0, 0), ValueError, r"first_period .*got 0"),
    (lambda: S.cosine_with_restarts(1.0, 10, 0), ValueError, r"period_mult .*got 0"),
    (lambda: S.cosine_with_restarts(1.0, 10, 1.5), ValueError, r"period_mult .*got 1.5"),
    (lambda: S.cosine_with_restarts(1.0, 10, decay_factor=0.0), ValueError, r"decay_factor .*got 0.0"),
    (
        lambda: S.cyclical(1.0, 0.1, 10),
        ValueError,
        r"cyclical: max_value must be >= base_value, got max_value=0.1 < base_value=1.0",
    ),
    (lambda: S.cyclical(0.1, 1.0, 0), ValueError, r"step_size_up .*got 0"),
    (lambda: S.cyclical(0.1, 1.0, 5, 0), ValueError, r"step_size_down .*got 0"),
    (
        lambda: S.cyclical(0.1, 1.0, 5, mode="sine"),
        ValueError,
        r"unknown mode 'sine'; valid options are 'triangular', 'triangular2', 'exp_range'",
    ),
    (lambda: S.cyclical(0.1, 1.0, 5, mode="exp_range", gamma=0.0), ValueError, r"gamma .*got 0.0"),
    (
        lambda: S.cyclical_momentum(5, base_momentum=0.95, max_momentum=0.85),
        ValueError,
        r"max_momentum must be >= base_momentum",
    ),
    (lambda: S.one_cycle(1.0, 0), ValueError, r"one_cycle: total_steps .*got 0"),
    (lambda: S.one_cycle(1.0, 100, pct_start=0.0), ValueError, r"pct_start .*got 0.0"),
    (lambda: S.one_cycle(1.0, 100, pct_start=1.0), ValueError, r"pct_start .*got 1.0"),
    (lambda: S.one_cycle(1.0, 3, pct_start=0.3), ValueError, r"phase 1 .*empty.*total_steps=3"),
    (lambda: S.one_cycle(1.0, 10, pct_start=0.6, three_phase=True), ValueError, r"phase 3 .*empty"),
    (
        lambda: S.one_cycle(1.0, 100, anneal="cosine"),
        ValueError,
        r"unknown anneal 'cosine'; valid options are 'cos', 'linear'",
    ),
    (lambda: S.one_cycle(1.0, 100, div_factor=0.0), ValueError, r"div_factor .*got 0.0"),
    (lambda: S.one_cycle_momentum(100, 0.95, 0.85), ValueError, r"max_momentum must be >= base_momentum"),
    (lambda: S.one_cycle_momentum(100, anneal="cosine"), ValueError, r"valid options"),
    (lambda: S.inverse_sqrt(1.0, 0), ValueError, r"inverse_sqrt: warmup_steps .*got 0"),
    (lambda: S.noam(0, 4000), ValueError, r"noam: d_model .*got 0"),
    (lambda: S.noam(512, -1), ValueError, r"noam: warmup_steps .*got -1"),
    (lambda: S.linear_warmup(0.1, -1), ValueError, r"warmup_steps must be an integer >= 0, got -1"),
    (lambda: S.linear_warmup("fast", 3), TypeError, r"schedule_or_value .*'fast'"),
    (
        lambda: S.warmup_cosine(1.0, 10, 10),
        ValueError,
        r"decay_steps .*must exceed warmup_steps=10, got decay_steps=10",
    ),
    (
        lambda: S.join([S.constant(1.0), S.constant(2.0)], [3, 5]),
        ValueError,
        r"boundaries must have len\(schedules\) - 1 = 1 entries, got 2",
    ),
    (lambda: S.join([], []), ValueError, r"at least one"),
    (lambda: S.join([1.0], []), TypeError, r"schedules\[0\] must be a schedule"),
    (lambda: S.join([S.constant(1.0), S.constant(2.0)], [0]), ValueError, r"boundaries\[0\] .*got 0"),
]


@pytest.mark.parametrize("make, exc, match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
