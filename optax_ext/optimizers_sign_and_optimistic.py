"""Sign-based, optimistic and noisy optimizers: Optax's `noisy_sgd`, `sign_sgd`, `signum`, `rprop`,
`optimistic_gradient_descent`, `optimistic_adam` and `optimistic_adam_v2`.

Same positional order, defaults and states as Optax 0.2.8; each is an `optax_ext.chain`, so its
per-element parts run as one fused pass (`noisy_sgd`'s noise is drawn and added by XLA first,
see `optax_ext.add_noise`). `kahan_sum=True` (keyword-only, ours) appends
`optax_ext.kahan_summation()` for bf16/f16 params.
"""

import warnings

import optax

from optax_ext import _validate as check
from optax_ext.fusion import FusableTransformation
from optax_ext.optimizers import _chain
from optax_ext.transforms import ema, scale, scale_by_adam, scale_by_learning_rate
from optax_ext.transforms.sign_and_optimistic import (
    add_noise,
    scale_by_optimistic_gradient,
    scale_by_rprop,
    scale_by_sign,
)

__all__ = [
    "noisy_sgd",
    "optimistic_adam",
    "optimistic_adam_v2",
    "optimistic_gradient_descent",
    "rprop",
    "sign_sgd",
    "signum",
]


def noisy_sgd(
    learning_rate: optax.ScalarOrSchedule,
    eta=0.01,
    gamma=0.55,
    key=None,
    *,
    seed=None,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""SGD on gradients with annealed Gaussian noise:

    :math:`\theta_{t+1} = \theta_t - \eta_t\,(g_t + \sigma_t \xi_t)`, :math:`\xi_t \sim N(0, I)`,
    :math:`\sigma_t^2 = \eta / t^{\gamma}` (`eta` the initial variance, `gamma` its decay). The
    noise is drawn as `optax.noisy_sgd` draws it (same key splitting), so the two agree exactly for
    the same `key` (a `jax.random.key` or an integer seed).

    References:
      Neelakantan et al., *Adding Gradient Noise Improves Learning for Very Deep Networks*, 2015.
    """
    return _chain(kahan_sum, add_noise(eta, gamma, key, seed=seed), scale_by_learning_rate(learning_rate))


def sign_sgd(learning_rate: optax.ScalarOrSchedule, *, kahan_sum: bool = False) -> FusableTransformation:
    r"""signSGD: :math:`\theta_{t+1} = \theta_t - \eta_t\, \mathrm{sign}(g_t)`.

    References:
      Bernstein et al., *signSGD: Compressed Optimisation for Non-Convex Problems*, ICML 2018;
      Balles, Pedregosa & Le Roux, *The Geometry of Sign Gradient Descent*, 2020.
    """
    return _chain(kahan_sum, scale_by_sign(), scale_by_learning_rate(learning_rate))


def signum(
    learning_rate: optax.ScalarOrSchedule, beta=0.9, accumulator_dtype=None, *, kahan_sum: bool = False
) -> FusableTransformation:
    r"""Signum: the sign of an EMA of the gradients,

    :math:`m_t = \beta m_{t-1} + (1-\beta) g_t`, :math:`\theta_{t+1} = \theta_t - \eta_t\, \mathrm{sign}(m_t)`
    (no bias correction: it does not change the sign). State: `(EmaState(count, ema), EmptyState(),
    lr state)`, as Optax.

    References:
      Bernstein et al., *signSGD: Compressed Optimisation for Non-Convex Problems*, ICML 2018;
      Zhao et al., *Deconstructing What Makes a Good Optimizer for Language Models*, 2024.
    """
    beta = check.unit_interval("signum", "beta", beta, schedule=True)  # named as the caller knows it
    check.storage("signum", "accumulator_dtype", accumulator_dtype)
    return _chain(
        kahan_sum,
        ema(beta, debias=False, accumulator_dtype=accumulator_dtype),
        scale_by_sign(),
        scale_by_learning_rate(learning_rate),
    )


def rprop(
    learning_rate,
    eta_minus=0.5,
    eta_plus=1.2,
    min_step_size=1e-6,
    max_step_size=50.0,
    *,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""Rprop: per-coordinate step sizes grown by `eta_plus` while the gradient keeps its sign and
    shrunk by `eta_minus` when it flips, clipped to [`min_step_size`, `max_step_size`]; the step is
    :math:`-\Delta_t\,\mathrm{sign}(g_t)` (skipped after a flip). `learning_rate` is the initial step
    size. As Optax 0.2.8, each step applies the step computed at the previous one (see
    :func:`optax_ext.scale_by_rprop`).

    References:
      Riedmiller & Braun, *A direct adaptive method for faster backpropagation learning: the RPROP
      algorithm*, IEEE ICNN 1993; Igel & Hüsken, *Empirical evaluation of the improved Rprop
      learning algorithms*, Neurocomputing 2003.
    """
    return _chain(
        kahan_sum,
        scale_by_rprop(learning_rate, eta_minus, eta_plus, min_step_size, max_step_size),
        scale(-1.0),
    )


def optimistic_gradient_descent(
    learning_rate: optax.ScalarOrSchedule, alpha=1.0, beta=1.0, *, kahan_sum: bool = False
) -> FusableTransformation:
    r"""Optimistic gradient descent:

    :math:`\theta_{t+1} = \theta_t - \eta_t\big((\alpha+\beta) g_t - \beta g_{t-1}\big)`,
    a one-call approximation of extra-gradient with last-iterate convergence in min-max games.
    `alpha` and `beta` are numbers (Optax's annotation allows schedules, which its transformation
    then cannot evaluate; we reject them when the optimizer is built).

    References:
      Mokhtari, Ozdaglar & Pattathil, *A Unified Analysis of Extra-gradient and Optimistic Gradient
      Methods for Saddle Point Problems: Proximal Point Approach*, AISTATS 2020.
    """
    return _chain(kahan_sum, scale_by_optimistic_gradient(alpha, beta), scale_by_learning_rate(learning_rate))


def optimistic_adam(
    learning_rate,
    optimism=None,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    mu_dtype=None,
    *,
    nesterov: bool = True,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""Optimistic Adam (Optax's deprecated interface; prefer :func:`optimistic_adam_v2`):

    :math:`r_t = \hat m_t/(\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)`,
    :math:`\theta_{t+1} = \theta_t - \eta r_t - o\,(r_t - r_{t-1})`, with the optimism :math:`o`
    defaulting to the learning rate :math:`\eta` (a number, not a schedule, as in Optax).
    Emits Optax's DeprecationWarning.

    References:
      Daskalakis et al., *Training GANs with Optimism*, ICLR 2018.
    """
    warnings.warn(
        "`optimistic_adam` is deprecated (as in Optax), please use `optimistic_adam_v2` instead.",
        DeprecationWarning,
        stacklevel=2,
    )
    if callable(learning_rate):
        raise ValueError(
            "optimistic_adam: learning_rate cannot be a schedule in this version (as in Optax); "
            "optimistic_adam_v2 takes one."
        )
    learning_rate = check.non_negative("optimistic_adam", "learning_rate", learning_rate)
    if optimism is None:
        optimism = learning_rate
    optimism = check.finite("optimistic_adam", "optimism", optimism)
    return _chain(
        kahan_sum,
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
        scale_by_optimistic_gradient(alpha=learning_rate, beta=optimism),
        scale_by_learning_rate(1.0),
    )


def optimistic_adam_v2(
    learning_rate: optax.ScalarOrSchedule,
    *,
    alpha=1.0,
    beta=1.0,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    mu_dtype=None,
    nesterov: bool = True,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""Optimistic Adam: Adam's direction :math:`r_t = \hat m_t/(\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)`
    (Nesterov's by default) through optimistic gradient descent,

    :math:`\theta_{t+1} = \theta_t - \eta_t\big((\alpha + \beta) r_t - \beta r_{t-1}\big)`.

    One fused pass: Adam's moments, the previous direction and the parameters are read and written once.

    References:
      Daskalakis et al., *Training GANs with Optimism*, ICLR 2018.
    """
    return _chain(
        kahan_sum,
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
        scale_by_optimistic_gradient(alpha=alpha, beta=beta),
        scale_by_learning_rate(learning_rate),
    )
