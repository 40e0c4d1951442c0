"""Optimizers built on the adaptive scalings of `optax_ext.transforms.adaptive` (and NAdamW).

Same names, positional arguments, defaults and states as Optax's aliases: each is an
`optax_ext.chain`, so the scaling, the weight decay and the learning rate run as one fused pass,
and `tx.update_and_apply(grads, state, params)` writes the new parameters in that pass. The
learning rate (and weight decay) may be a schedule `step -> value`. Our extra arguments are
keyword-only: `kahan_sum=True` (bf16/f16 params kept on the f32 trajectory, see
`optax_ext.kahan_summation`) and, where Optax has no such argument, the moments' storage dtypes.
"""

import optax

from optax_ext.fusion import FusableTransformation
from optax_ext.optimizers import _chain, adamw
from optax_ext.transforms import add_decayed_weights, scale_by_learning_rate
from optax_ext.transforms.adaptive import (
    scale_by_adadelta,
    scale_by_adamax,
    scale_by_adan,
    scale_by_radam,
    scale_by_rss,
)

__all__ = ["adadelta", "adagrad", "adamax", "adamaxw", "adan", "nadamw", "radam"]


def adadelta(
    learning_rate: optax.ScalarOrSchedule | None = None,
    rho=0.9,
    eps=1e-6,
    weight_decay=0.0,
    weight_decay_mask=None,
    *,
    accumulator_dtype=None,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""Adadelta:
    :math:`\theta_{t+1} = \theta_t - \eta_t \frac{\sqrt{E[u^2]_{t-1}+\epsilon}}{\sqrt{E[g^2]_t+\epsilon}} g_t`,
    with :math:`g_t` the gradient plus :math:`\lambda\theta_t` (coupled weight decay, before the
    scaling, as Optax) and running averages of rate :math:`\rho`. `learning_rate=None` returns the
    unscaled, unnegated step, as Optax.

    References:
      Zeiler, *ADADELTA: An Adaptive Learning Rate Method*, 2012.
    """
    return _chain(
        kahan_sum,
        add_decayed_weights(weight_decay, mask=weight_decay_mask),
        scale_by_adadelta(rho, eps, accumulator_dtype=accumulator_dtype),
        scale_by_learning_rate(learning_rate),
    )


def adagrad(
    learning_rate: optax.ScalarOrSchedule,
    initial_accumulator_value=0.1,
    eps=1e-7,
    *,
    accumulator_dtype=None,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""Adagrad: :math:`\theta_{t+1} = \theta_t - \eta_t\, g_t / \sqrt{G_t + \epsilon}`,
    :math:`G_t = G_0 + \sum_{\tau \le t} g_\tau^2`.

    References:
      Duchi, Hazan & Singer, *Adaptive Subgradient Methods for Online Learning and Stochastic
      Optimization*, JMLR 2011.
    """
    return _chain(
        kahan_sum,
        scale_by_rss(initial_accumulator_value, eps, accumulator_dtype=accumulator_dtype),
        scale_by_learning_rate(learning_rate),
    )


def adamax(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    *,
    mu_dtype=None,
    nu_dtype=None,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""Adamax: :math:`\theta_{t+1} = \theta_t - \eta_t \hat m_t / v_t`,
    :math:`v_t = \max(|g_t| + \epsilon, \beta_2 v_{t-1})`.

    References:
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015 (Sec. 7.1).
    """
    return _chain(
        kahan_sum,
        scale_by_adamax(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        scale_by_learning_rate(learning_rate),
    )


def adamaxw(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=1e-4,
    mask=None,
    *,
    mu_dtype=None,
    nu_dtype=None,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""Adamax with decoupled weight decay:
    :math:`\theta_{t+1} = \theta_t - \eta_t(\hat m_t / v_t + \lambda\theta_t)`.

    References:
      Kingma & Ba, ICLR 2015 (Adamax); Loshchilov & Hutter, *Decoupled Weight Decay
      Regularization*, ICLR 2019.
    """
    return _chain(
        kahan_sum,
        scale_by_adamax(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def adan(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.98,
    b2=0.92,
    b3=0.99,
    eps=1e-8,
    eps_root=1e-8,
    weight_decay=0.0,
    mask=None,
    *,
    mu_dtype=None,
    nu_dtype=None,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""Adan: :math:`\theta_{t+1} = \theta_t - \eta_t\big((\hat m_t + (1-\beta_2)\hat v_t) /
    (\sqrt{\hat n_t + \epsilon_{root}} + \epsilon) + \lambda\theta_t\big)`, see
    :func:`optax_ext.transforms.adaptive.scale_by_adan` for the moments.

    Weight decay is the decoupled, additive form (as Optax), not the paper's proximal
    :math:`1/(1+\lambda\eta)`.

    References:
      Xie et al., *Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models*,
      IEEE TPAMI 2024 (arXiv:2208.06677).
    """
    return _chain(
        kahan_sum,
        scale_by_adan(b1, b2, b3, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def nadamw(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    mu_dtype=None,
    weight_decay=1e-4,
    mask=None,
    *,
    nesterov: bool = True,
    nu_dtype=None,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""NAdamW: AdamW with Nesterov's look-ahead first moment,

    :math:`\hat m_t = \beta_1 m_t/(1-\beta_1^{t+1}) + (1-\beta_1) g_t/(1-\beta_1^t)`,
    :math:`\theta_{t+1} = \theta_t - \eta_t\big(\hat m_t/(\sqrt{\hat v_t + \epsilon_{root}}+\epsilon)
    + \lambda\theta_t\big)`.
    Optax's `nadamw` is `adamw` with `nesterov=True`, and so is this one (`nesterov` may be overridden, as there).

    References:
      Dozat, *Incorporating Nesterov Momentum into Adam*, ICLR workshop 2016;
      Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
    """
    return adamw(
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        weight_decay,
        mask,
        nesterov=nesterov,
        nu_dtype=nu_dtype,
        kahan_sum=kahan_sum,
    )


def radam(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    threshold=5.0,
    *,
    nesterov: bool = False,
    mu_dtype=None,
    nu_dtype=None,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""Rectified Adam:
    :math:`\theta_{t+1} = \theta_t - \eta_t r_t \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)`
    once the variance estimate is tractable (:math:`\rho_t \ge` `threshold`), momentum SGD
    :math:`\theta_{t+1} = \theta_t - \eta_t \hat m_t` before; see
    :func:`optax_ext.transforms.adaptive.scale_by_radam` for :math:`r_t, \rho_t`.

    References:
      Liu et al., *On the Variance of the Adaptive Learning Rate and Beyond*, ICLR 2020.
    """
    return _chain(
        kahan_sum,
        scale_by_radam(b1, b2, eps, eps_root, threshold, nesterov=nesterov, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        scale_by_learning_rate(learning_rate),
    )
