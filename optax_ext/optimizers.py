"""Optimizers: chains of our transformations, with Optax's argument names, defaults and states.

Switching from Optax is a change of import: `optax.adamw(1e-3)` -> `optax_ext.adamw(1e-3)`; the
state has the same layout. Every optimizer is an `optax_ext.chain`, so its per-element parts run as
one fused pass, and `tx.update_and_apply(grads, state, params)` writes new parameters in that pass.
Any numeric hyperparameter may be a schedule `step -> value` or, under `optax.inject_hyperparams`,
a traced value.

Memory: `mu_dtype`/`nu_dtype` take a dtype or `optax_ext.int8_blockwise` (8-bit blockwise moments,
Dettmers et al., ICLR 2022: about 1 byte per parameter per moment instead of 4), and
`kahan_sum=True` keeps bf16/f16 params on the f32 trajectory with a compensation buffer
(`optax_ext.kahan_summation`; exact with `update_and_apply`, see its docstring for
`update` + `optax.apply_updates`).
"""

import optax

from optax_ext.fusion import FusableTransformation, chain
from optax_ext.transforms import (
    add_decayed_weights,
    clip_by_block_rms,
    ema,
    scale,
    scale_by_adam,
    scale_by_amsgrad,
    scale_by_belief,
    scale_by_factored_rms,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_momentum,
    scale_by_param_block_rms,
    scale_by_rms,
    scale_by_trust_ratio,
    scale_by_yogi,
)
from optax_ext.transforms.kahan import kahan_summation


def _identity() -> FusableTransformation:
    """The identity with Optax's `EmptyState`, fusable: `optax.identity()` is opaque to `chain` and would
    end the fused run there (one more pass, the intermediate rounded to the gradients' dtype)."""
    return scale_by_learning_rate(None)


def _chain(kahan_sum: bool, *parts) -> FusableTransformation:
    """The optimizer's chain; with `kahan_sum`, the compensated apply goes last."""
    if not isinstance(kahan_sum, bool):
        raise TypeError(f"kahan_sum must be True or False, got {kahan_sum!r}.")
    return chain(*parts, kahan_summation()) if kahan_sum else chain(*parts)


def sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum=None,
    nesterov: bool = False,
    accumulator_dtype=None,
    *,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""SGD, optionally with heavy-ball or Nesterov momentum.

    :math:`v_t = \rho v_{t-1} + g_t`, :math:`\theta_{t+1} = \theta_t - \eta_t v_t` (Nesterov:
    :math:`\theta_{t+1} = \theta_t - \eta_t (g_t + \rho v_t)`); plain SGD when `momentum=None`.

    References:
      Robbins & Monro, 1951; Sutskever et al., *On the importance of initialization and momentum in
      deep learning*, ICML 2013.
    """
    first = scale_by_momentum(momentum, nesterov, accumulator_dtype) if momentum is not None else _identity()
    return _chain(kahan_sum, first, scale_by_learning_rate(learning_rate))


def rmsprop(
    learning_rate: optax.ScalarOrSchedule,
    decay=0.9,
    eps=1e-8,
    initial_scale=0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum=None,
    nesterov: bool = False,
    bias_correction: bool = False,
    *,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""RMSprop: :math:`v_t = \rho v_{t-1} + (1-\rho) g_t^2`,
    :math:`\theta_{t+1} = \theta_t - \eta\, g_t / \sqrt{v_t + \epsilon}`; optionally centered and with
    momentum applied after the learning rate (as Optax and PyTorch).

    References:
      Tieleman & Hinton, *Lecture 6.5 - RMSProp*, 2012; Graves, 2013 (centered).
    """
    return _chain(
        kahan_sum,
        scale_by_rms(decay, eps, initial_scale, eps_in_sqrt, bias_correction, centered=centered),
        scale_by_learning_rate(learning_rate),
        scale_by_momentum(momentum, nesterov) if momentum is not None else _identity(),
    )


def adam(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    mu_dtype=None,
    *,
    nesterov: bool = False,
    nu_dtype=None,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""Adam: :math:`\theta_{t+1} = \theta_t - \eta_t \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)`.

    References:
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015.
    """
    return _chain(
        kahan_sum,
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, nu_dtype=nu_dtype),
        scale_by_learning_rate(learning_rate),
    )


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    mu_dtype=None,
    weight_decay=1e-4,
    mask=None,
    *,
    nesterov: bool = False,
    nu_dtype=None,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""AdamW: decoupled weight decay,

    :math:`\theta_{t+1} = \theta_t - \eta_t\big(\hat m_t / (\sqrt{\hat v_t} + \epsilon) + \lambda\theta_t\big)`,

    i.e. :math:`(1-\eta_t\lambda)\theta_t - \eta_t \hat m_t/(\sqrt{\hat v_t}+\epsilon)`: decay decoupled
    from the adaptive scaling and following the learning-rate schedule.

    References:
      Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
    """
    return _chain(
        kahan_sum,
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, nu_dtype=nu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def nadam(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    mu_dtype=None,
    *,
    nesterov: bool = True,
    nu_dtype=None,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""NAdam: Adam with Nesterov momentum,
    :math:`\hat m_t = \beta_1 m_t/(1-\beta_1^{t+1}) + (1-\beta_1) g_t/(1-\beta_1^t)`.

    References:
      Dozat, *Incorporating Nesterov Momentum into Adam*, ICLR workshop 2016.
    """
    return adam(
        learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, nu_dtype=nu_dtype, kahan_sum=kahan_sum
    )


def adabelief(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    b2=0.999,
    eps=1e-16,
    eps_root=1e-16,
    *,
    nesterov: bool = False,
    mu_dtype=None,
    nu_dtype=None,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""AdaBelief: Adam with the second moment of :math:`g_t - m_t`,

    :math:`\theta_{t+1} = \theta_t - \eta_t \hat m_t/(\sqrt{\hat s_t}+\epsilon)`.

    References:
      Zhuang et al., *AdaBelief Optimizer*, NeurIPS 2020.
    """
    return _chain(
        kahan_sum,
        scale_by_belief(b1, b2, eps, eps_root, nesterov=nesterov, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        scale_by_learning_rate(learning_rate),
    )


def yogi(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    b2=0.999,
    eps=1e-3,
    *,
    mu_dtype=None,
    nu_dtype=None,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""Yogi: :math:`v_t = v_{t-1} - (1-\beta_2)\mathrm{sign}(v_{t-1}-g_t^2) g_t^2`, then an Adam step.

    References:
      Zaheer et al., *Adaptive Methods for Nonconvex Optimization*, NeurIPS 2018.
    """
    return _chain(
        kahan_sum,
        scale_by_yogi(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        scale_by_learning_rate(learning_rate),
    )


def lion(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    b2=0.99,
    mu_dtype=None,
    weight_decay=1e-3,
    mask=None,
    *,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""Lion: the sign of an interpolation of gradient and momentum,

    :math:`\theta_{t+1} = \theta_t - \eta_t(\mathrm{sign}((1-\beta_1)g_t + \beta_1 m_{t-1}) + \lambda\theta_t)`,
    :math:`m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t`.

    References:
      Chen et al., *Symbolic Discovery of Optimization Algorithms*, 2023.
    """
    return _chain(
        kahan_sum,
        scale_by_lion(b1, b2, mu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def amsgrad(
    learning_rate: optax.ScalarOrSchedule,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    mu_dtype=None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    nu_dtype=None,
    kahan_sum: bool = False,
) -> FusableTransformation:
    r"""AMSGrad: Adam with :math:`\hat v^{max}_t = \max(\hat v^{max}_{t-1}, \hat v_t)` in the denominator.

    References:
      Reddi, Kale & Kumar, *On the Convergence of Adam and Beyond*, ICLR 2018.
    """
    return _chain(
        kahan_sum,
        scale_by_amsgrad(b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu, nu_dtype=nu_dtype),
        scale_by_learning_rate(learning_rate),
    )


def lars(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay=0.0,
    weight_decay_mask=True,
    trust_coefficient=0.001,
    eps=0.0,
    trust_ratio_mask=True,
    momentum=0.9,
    nesterov: bool = False,
) -> FusableTransformation:
    r"""LARS: per-leaf trust ratio :math:`\tau\|\theta\|/\|g + \lambda\theta\|` times the learning rate, then momentum.

    References:
      You, Gitman & Ginsburg, *Large Batch Training of Convolutional Networks*, 2017.
    """
    return chain(
        add_decayed_weights(weight_decay, mask=weight_decay_mask),
        scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps, mask=trust_ratio_mask),
        scale_by_learning_rate(learning_rate),
        scale_by_momentum(momentum, nesterov),
    )


def lamb(
    learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0, weight_decay=0.0, mask=None
) -> FusableTransformation:
    r"""LAMB: an AdamW direction :math:`r_t = \hat m_t/(\sqrt{\hat v_t}+\epsilon) + \lambda\theta_t`, rescaled per
    leaf by :math:`\|\theta\|/\|r_t\|`: :math:`\theta_{t+1} = \theta_t - \eta_t \frac{\|\theta_t\|}{\|r_t\|} r_t`.

    References:
      You et al., *Large Batch Optimization for Deep Learning: Training BERT in 76 minutes*, ICLR 2020.
    """
    return chain(
        scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
        add_decayed_weights(weight_decay=weight_decay, mask=mask),
        scale_by_trust_ratio(),
        scale_by_learning_rate(learning_rate),
    )


def adafactor(
    learning_rate: optax.ScalarOrSchedule | None = None,
    min_dim_size_to_factor: int = 128,
    decay_rate=0.8,
    decay_offset=0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold=1.0,
    momentum=None,
    dtype_momentum="float32",
    weight_decay_rate=None,
    eps=1e-30,
    factored: bool = True,
    weight_decay_mask=None,
) -> FusableTransformation:
    r"""Adafactor: factored second moments (rows and columns), per-leaf RMS clipping and, by default,
    steps relative to the parameters' RMS:
    :math:`\theta_{t+1} = \theta_t - \eta_t \max(\mathrm{rms}(\theta), 10^{-3})\, \hat u_t`.

    References:
      Shazeer & Stern, *Adafactor: Adaptive Learning Rates with Sublinear Memory Cost*, ICML 2018.
    """
    parts = [scale_by_factored_rms(factored, decay_rate, decay_offset, min_dim_size_to_factor, eps)]
    if clipping_threshold is not None:
        parts.append(clip_by_block_rms(clipping_threshold))
    if learning_rate is not None:
        parts.append(scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        parts.append(scale_by_param_block_rms())
    if momentum is not None:
        parts.append(ema(momentum, debias=False, accumulator_dtype=dtype_momentum))
    if weight_decay_rate is not None:
        parts.append(add_decayed_weights(weight_decay_rate, mask=weight_decay_mask))
    parts.append(scale(-1))
    return chain(*parts)
