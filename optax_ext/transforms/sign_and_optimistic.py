"""Sign-based, optimistic and noisy transformations: `scale_by_sign`, `scale_by_rprop`,
`scale_by_optimistic_gradient` and `add_noise`, with Optax's names, arguments and states.

The first three are per-element `Rule`s: inside `optax_ext.chain` they fuse with their neighbours
(Signum's EMA, Optimistic Adam's moments, the learning rate) into one pass. `add_noise` draws
Gaussian noise from a key in its state, which is not per-element math; see its docstring for how
it runs.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ext import _validate as check
from optax_ext._compat import ScaleByOptimisticGradientState
from optax_ext.fusion import NoScalars, Rule, fusable
from optax_ext.transforms._common import increment, zero_count, zeros_like_params

__all__ = [
    "ScaleByOptimisticGradientState",
    "add_noise",
    "scale_by_optimistic_gradient",
    "scale_by_rprop",
    "scale_by_sign",
]


# ---------------------------------------------------------------------------------- sign


def _sign_element(g, p, slots, s):
    return jnp.sign(g), ()


def scale_by_sign() -> optax.GradientTransformation:
    r"""The sign of each update coordinate: :math:`u \leftarrow \mathrm{sign}(u)` (0 stays 0).

    Stateless (`optax.EmptyState()`). Followed by a learning rate it is signSGD; after an EMA of the
    gradients, Signum.

    References:
      Bernstein et al., *signSGD: Compressed Optimisation for Non-Convex Problems*, ICML 2018.
    """
    return fusable(
        lambda params: optax.EmptyState(),
        Rule(
            "scale_by_sign",
            optax.EmptyState,
            (),
            lambda st, u, p: NoScalars(),
            _sign_element,
            lambda st, sl: st,
        ),
    )


# ---------------------------------------------------------------------------------- Rprop


class _RpropScalars(NamedTuple):
    eta_minus: Any
    eta_plus: Any
    min_step_size: Any
    max_step_size: Any


def scale_by_rprop(
    learning_rate, eta_minus=0.5, eta_plus=1.2, min_step_size=1e-6, max_step_size=50.0
) -> optax.GradientTransformation:
    r"""Rprop: a per-coordinate step size :math:`\Delta` adapted from the sign agreement of
    successive steps, :math:`s = g_t \cdot d_{t-1}`:

    .. math::
        \Delta_t = \begin{cases} \mathrm{clip}(\eta^+ \Delta_{t-1}, \Delta_{min}, \Delta_{max}) & s > 0 \\
        \mathrm{clip}(\eta^- \Delta_{t-1}, \Delta_{min}, \Delta_{max}) & s < 0 \\
        \Delta_{t-1} & s = 0 \end{cases},\qquad
        d_t = \begin{cases} 0 & s < 0 \\ \Delta_t\, \mathrm{sign}(g_t) & \text{else} \end{cases},

    with :math:`\Delta_0` = `learning_rate` and :math:`d_0 = 0`. As Optax 0.2.8 does, the update
    returned at step t is the stored step of the previous one, :math:`u_t = d_{t-1}` where
    :math:`s \ge 0` and 0 where :math:`s < 0` (so the first update is zero). The sign flips
    downstream (`optax_ext.rprop` appends `scale(-1)`). `learning_rate` is the initial step size,
    a number (it fills the state at init). State: `optax.ScaleByRpropState(step_sizes, prev_updates)`.

    References:
      Riedmiller & Braun, *A direct adaptive method for faster backpropagation learning: the RPROP
      algorithm*, IEEE ICNN 1993; Igel & Hüsken, *Empirical evaluation of the improved Rprop
      learning algorithms*, Neurocomputing 2003.
    """
    fn = "scale_by_rprop"
    learning_rate = check.non_negative(fn, "learning_rate", learning_rate)
    eta_minus = check.non_negative(fn, "eta_minus", eta_minus)
    eta_plus = check.non_negative(fn, "eta_plus", eta_plus)
    min_step_size = check.non_negative(fn, "min_step_size", min_step_size)
    max_step_size = check.non_negative(fn, "max_step_size", max_step_size)
    lo, hi = check._concrete(min_step_size), check._concrete(max_step_size)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{fn}: min_step_size ({min_step_size!r}) must be <= max_step_size ({max_step_size!r}).")

    def init(params):
        return optax.ScaleByRpropState(
            step_sizes=zeros_like_params(params, fill=learning_rate), prev_updates=zeros_like_params(params)
        )

    def scalars(state, updates, params):
        return _RpropScalars(eta_minus, eta_plus, min_step_size, max_step_size)

    def element(g, p, slots, s: _RpropScalars):
        step, prev = slots
        agree = g * prev
        grown = step * jnp.where(agree > 0, s.eta_plus, s.eta_minus)
        step = jnp.where(agree == 0, step, jnp.minimum(jnp.maximum(grown, s.min_step_size), s.max_step_size))
        flipped = agree < 0
        new_prev = jnp.where(flipped, jnp.zeros_like(g), step * jnp.sign(g))
        return jnp.where(flipped, jnp.zeros_like(prev), prev), (step, new_prev)

    return fusable(
        init,
        Rule(
            fn,
            optax.ScaleByRpropState,
            ("step_sizes", "prev_updates"),
            scalars,
            element,
            lambda st, sl: optax.ScaleByRpropState(step_sizes=sl[0], prev_updates=sl[1]),
            scalars_type=_RpropScalars,
        ),
    )


# ---------------------------------------------------------------------------------- optimistic


class _OptimisticScalars(NamedTuple):
    alpha_plus_beta: Any
    beta: Any
    first: Any  # 1.0 on the first step (the previous gradient is the current one), else 0.0


def scale_by_optimistic_gradient(alpha=1.0, beta=1.0) -> optax.GradientTransformation:
    r"""Generalized optimistic gradient: :math:`u_t = (\alpha + \beta) g_t - \beta g_{t-1}`,

    with :math:`g_0 := g_1` on the first step (so the first update is :math:`\alpha g_1`).
    `alpha` and `beta` are numbers (the state has no step count to evaluate a schedule at).
    State: Optax's `ScaleByOptimisticGradientState(is_initial_step, previous_gradient)`.

    References:
      Daskalakis et al., *Training GANs with Optimism*, ICLR 2018; Mokhtari, Ozdaglar & Pattathil,
      *A Unified Analysis of Extra-gradient and Optimistic Gradient Methods for Saddle Point
      Problems: Proximal Point Approach*, AISTATS 2020.
    """
    fn = "scale_by_optimistic_gradient"
    alpha = check.finite(fn, "alpha", alpha)
    beta = check.finite(fn, "beta", beta)

    def init(params):
        return ScaleByOptimisticGradientState(
            is_initial_step=jnp.array(True), previous_gradient=zeros_like_params(params)
        )

    def scalars(state, updates, params):
        # alpha + beta before any cast to f32, as Optax computes it.
        first = jnp.where(state.is_initial_step, 1.0, 0.0)
        return _OptimisticScalars(alpha_plus_beta=alpha + beta, beta=beta, first=first)

    def element(g, p, slots, s: _OptimisticScalars):
        (prev,) = slots
        prev = jnp.where(s.first > 0.5, g, prev)
        return s.alpha_plus_beta * g - s.beta * prev, (g,)

    return fusable(
        init,
        Rule(
            fn,
            ScaleByOptimisticGradientState,
            ("previous_gradient",),
            scalars,
            element,
            lambda st, sl: ScaleByOptimisticGradientState(is_initial_step=jnp.array(False), previous_gradient=sl[0]),
            scalars_type=_OptimisticScalars,
        ),
    )


# ---------------------------------------------------------------------------------- noise


def _key_maker(fn, key):
    """Check `key` now; return a function making the typed PRNG key (called by init, as Optax makes it
    there). Takes a typed key, an integer seed, or a legacy uint32 key (Optax takes the first two)."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return lambda: key
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.dtype(dtype) == jnp.uint32 and np.shape(key) == (2,):
        return lambda: jax.random.wrap_key_data(key)  # jax.random.PRNGKey(seed)
    integral = isinstance(key, (int, np.integer)) or (dtype is not None and jnp.issubdtype(dtype, jnp.integer))
    if isinstance(key, (bool, np.bool_)) or not integral or np.ndim(key) != 0:
        raise TypeError(f"{fn}: key must be a jax.random.key or an integer seed, got {key!r}.")
    return lambda: jax.random.key(key)


def add_noise(eta, gamma, key=None, *, seed=None) -> optax.GradientTransformation:
    r"""Add annealed Gaussian noise: :math:`u_t \leftarrow u_t + \sigma_t\, \xi_t`, :math:`\xi_t \sim N(0, I)`,

    :math:`\sigma_t^2 = \eta / t^{\gamma}` at step :math:`t = 1, 2, \dots`. The key in the state is
    split once per step (one half kept, the other split into one key per leaf, a normal draw in
    the update's dtype per leaf), as Optax does, so the noise is bit-identical to
    `optax.add_noise`'s. `key` is a `jax.random.key` or an integer seed (None: 0, with Optax's
    warning; `seed` is Optax's deprecated spelling). State: `optax.AddNoiseState(count, rng_key)`.

    Not fused: the draw is not per-element math (a counter-based generator keyed by the element's
    index, which a `Rule` does not see), so it runs in XLA, and the addition with it: XLA can fuse
    the draw and the add into one pass (read u, write u + sigma xi), and the next fused run reads
    that one array. Passing the noise into the fused run instead (a noise tree as an extra input)
    would cost the same memory traffic (write the noise, then read u and the noise) and need a
    state field Optax's layout does not have; this way the result is also Optax's exactly (the
    same dtype promotion of the sum).

    References:
      Neelakantan et al., *Adding Gradient Noise Improves Learning for Very Deep Networks*, 2015.
    """
    fn = "add_noise"
    eta = check.non_negative(fn, "eta", eta)
    gamma = check.finite(fn, "gamma", gamma)
    if seed is not None:
        warnings.warn('add_noise: "seed" is deprecated (as in Optax), use "key".', DeprecationWarning, stacklevel=2)
        if key is not None:
            raise ValueError(f"{fn}: give only one of seed and key.")
        key = seed
    if key is None:
        warnings.warn(f"{fn}: no key given; using key 0 (Optax will require a key).", stacklevel=2)
        key = 0
    make_key = _key_maker(fn, key)

    def init(params):
        return optax.AddNoiseState(count=zero_count(), rng_key=make_key())

    def update(updates, state, params=None):
        if not isinstance(state, optax.AddNoiseState):
            raise TypeError(
                f"update(): {fn} expected its state to be AddNoiseState, got {type(state).__name__}. "
                f"Was `init` called with this transformation?"
            )
        t = increment(state.count)
        sigma = jnp.sqrt(eta / t**gamma)
        kept, sample = jax.random.split(state.rng_key)
        noise = optax.tree.random_like(sample, updates, jax.random.normal)
        noisy = jax.tree.map(lambda u, n: None if u is None else u + sigma * n, updates, noise, is_leaf=_is_none)
        return noisy, optax.AddNoiseState(count=t, rng_key=kept)

    return optax.GradientTransformation(init, update)


def _is_none(x) -> bool:
    return x is None
