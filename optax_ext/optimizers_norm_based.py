"""Optimizers built on norms and curvature: Fromage, NovoGrad, Polyak SGD, SM3, L-BFGS.

Optax's names, positional arguments, defaults and state layouts (each is an `optax_ext.chain` of the
same parts as Optax's alias, so `jax.tree.structure` of the states agree). Per-element parts fuse;
see each transformation in `optax_ext.transforms.norm_based` for what runs on XLA.
"""

import optax

from optax_ext import _validate as check
from optax_ext.fusion import FusableTransformation, chain
from optax_ext.optimizers import sgd
from optax_ext.transforms import add_decayed_weights, scale, scale_by_learning_rate, scale_by_trust_ratio
from optax_ext.transforms.norm_based import (
    _check_bool,
    _check_memory_size,
    scale_by_lbfgs,
    scale_by_novograd,
    scale_by_polyak,
    scale_by_sm3,
)

__all__ = ["fromage", "lbfgs", "novograd", "polyak_sgd", "sm3"]


def fromage(learning_rate: optax.ScalarOrSchedule, min_norm=1e-6) -> FusableTransformation:
    r"""Fromage: steps of relative size :math:`\eta` per leaf, then a shrink that keeps norms from growing.

    .. math::
      \theta_{t+1} = \frac{1}{\sqrt{1+\eta_t^2}}
        \left(\theta_t - \eta_t \frac{\|\theta_t\|}{\|g_t\|} g_t\right)

    per leaf, norms floored at `min_norm` (a ratio of 1 where a norm is zero). Optax's chain:
    `scale_by_trust_ratio(min_norm)`, `scale_by_learning_rate(lr / sqrt(1 + lr^2))`,
    `add_decayed_weights(1 / sqrt(1 + lr^2) - 1)`; with a schedule, both factors follow it (states
    `optax.ScaleByScheduleState` and the weight-decay schedule's count, as Optax). The per-leaf norms
    of the updates and params are one reduction; the three parts fuse into one pass.

    References:
      Bernstein, Vahdat, Yue & Liu, *On the distance between two neural networks and the stability
      of learning*, NeurIPS 2020.
    """
    learning_rate = check.non_negative("fromage", "learning_rate", learning_rate, schedule=True)
    min_norm = check.non_negative("fromage", "min_norm", min_norm)
    if not callable(learning_rate):
        mult = 1 / (1 + learning_rate**2) ** 0.5
        return chain(
            scale_by_trust_ratio(min_norm),
            scale_by_learning_rate(learning_rate * mult),
            add_decayed_weights(mult - 1),
        )

    def mult_at(count):
        return 1 / (1 + learning_rate(count) ** 2) ** 0.5

    return chain(
        scale_by_trust_ratio(min_norm),
        scale_by_learning_rate(lambda count: mult_at(count) * learning_rate(count)),
        add_decayed_weights(lambda count: mult_at(count) - 1),
    )


def novograd(
    learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.25, eps=1e-6, eps_root=0.0, weight_decay=0.0
) -> FusableTransformation:
    r"""NovoGrad: Adam-like, with one second moment per leaf (layer) instead of per element.

    .. math::
      v_{\ell,t} = \beta_2 v_{\ell,t-1} + (1-\beta_2)\|g_{\ell,t}\|^2, \quad
      m_{\ell,t} = \beta_1 m_{\ell,t-1} + \frac{g_{\ell,t}}{\sqrt{v_{\ell,t}+\epsilon_{root}}+\epsilon}
        + \lambda\theta_{\ell,t}, \quad
      \theta_{t+1} = \theta_t - \eta_t m_t

    (:math:`v_{\ell,1} = \|g_{\ell,1}\|^2`, :math:`m_1` without the :math:`\beta_1` term). Optax's chain
    `scale_by_novograd(...)`, `scale_by_learning_rate(learning_rate)`: the per-leaf norms are one
    reduction, the moment update and the learning rate one fused pass. `weight_decay` is a number
    (as in Optax, where the transformation multiplies the params by it).

    References:
      Ginsburg et al., *Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of
      Deep Networks*, 2019 (arXiv:1905.11286).
    """
    learning_rate = check.non_negative("novograd", "learning_rate", learning_rate, schedule=True)
    return chain(
        scale_by_novograd(b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay),
        scale_by_learning_rate(learning_rate),
    )


def polyak_sgd(max_learning_rate=1.0, scaling: optax.ScalarOrSchedule = 1.0, f_min=0.0, eps=0.0, variant: str = "sps"):
    r"""SGD with Polyak's step size; the loss is passed to each step: `update(grads, state, params, value=loss)`.

    .. math::
      u_t = -s_t g_t, \quad
      \gamma_t = \min\left(\frac{f(\theta_t) - f^\star}{\|u_t\|^2 + \epsilon}, \gamma_{max}\right), \quad
      \theta_{t+1} = \theta_t + \gamma_t u_t

    with :math:`s_t` = `scaling` (a number or a schedule), :math:`f^\star` = `f_min`, :math:`\gamma_{max}`
    = `max_learning_rate`; `variant="sps+"` clips the gap at 0. Optax's chain
    `sgd(learning_rate=scaling)`, `scale_by_polyak(...)`: the squared global norm is one multi-tensor
    reduction; the final multiply runs on XLA (see `scale_by_polyak`: the loss value does not reach
    a fused rule).

    References:
      Loizou, Vaswani, Laradji & Lacoste-Julien, *Stochastic Polyak Step-size for SGD: An Adaptive
      Learning Rate for Fast Convergence*, AISTATS 2021; Berrada, Zisserman & Kumar, *Training Neural
      Networks for and by Interpolation*, ICML 2020.
    """
    scaling = check.non_negative("polyak_sgd", "scaling", scaling, schedule=True)
    f_min = check.finite("polyak_sgd", "f_min", f_min)
    max_learning_rate = check.non_negative("polyak_sgd", "max_learning_rate", max_learning_rate)
    eps = check.non_negative("polyak_sgd", "eps", eps)
    check.one_of("polyak_sgd", "variant", variant, ("sps", "sps+"))
    return chain(
        sgd(learning_rate=scaling),
        scale_by_polyak(max_learning_rate=max_learning_rate, f_min=f_min, eps=eps, variant=variant),
    )


def sm3(learning_rate, momentum=0.9) -> FusableTransformation:
    r"""SM3: adaptive steps with second-moment statistics kept per axis (memory :math:`\sum_r n_r` per leaf).

    .. math::
      \nu_t[i] = g_t[i]^2 + \min_r \mu^{(r)}_{t-1}[i_r], \quad
      \mu^{(r)}_t[j] = \max_{i:\,i_r=j} \nu_t[i], \quad
      m_t = \beta m_{t-1} + (1-\beta)\, g_t / \sqrt{\nu_t + \epsilon}, \quad
      \theta_{t+1} = \theta_t - \eta\, m_t

    with :math:`\beta` = `momentum`. Optax's chain `scale_by_sm3(momentum)`, `scale(-learning_rate)`
    (a number: Optax negates it, so no schedule). The accumulators run on XLA (see `scale_by_sm3`);
    params must be real and at least 1-d.

    References:
      Anil, Gupta, Koren & Singer, *Memory-Efficient Adaptive Optimization*, NeurIPS 2019.
    """
    learning_rate = check.non_negative("sm3", "learning_rate", learning_rate)
    momentum = check.unit_interval("sm3", "momentum", momentum)
    return chain(scale_by_sm3(momentum), scale(-learning_rate))


_DEFAULT_LINESEARCH = optax.scale_by_zoom_linesearch(max_linesearch_steps=20, initial_guess_strategy="one")


def lbfgs(
    learning_rate: optax.ScalarOrSchedule | None = None,
    memory_size: int = 10,
    scale_init_precond: bool = True,
    linesearch: optax.GradientTransformation | None = _DEFAULT_LINESEARCH,
) -> FusableTransformation:
    r"""L-BFGS: quasi-Newton directions from the last `memory_size` steps, a zoom line search by default.

    .. math::
      d_k = -H_k g_k, \quad \theta_{k+1} = \theta_k + \eta_k d_k

    with :math:`H_k` the limited-memory inverse-Hessian estimate of `scale_by_lbfgs` and
    :math:`\eta_k` from `linesearch` (default: Optax's zoom line search, 20 steps, initial guess 1,
    which enforces the strong Wolfe conditions), else `learning_rate` (None: 1). Optax's chain
    `scale_by_lbfgs(...)`, `scale(-1)` or `scale_by_learning_rate(learning_rate)`, `linesearch`; same
    state. Each step needs `value=`, `grad=` and `value_fn=` for the line search, as Optax::

      value_and_grad = optax.value_and_grad_from_state(f)
      value, grad = value_and_grad(params, state=state)
      updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=f)

    The two-loop recursion and the line search are Optax's own transformations (global inner
    products and function evaluations, XLA's work, no per-element rule to fuse); only the scaling
    between them is ours.

    References:
      Nocedal, *Updating Quasi-Newton Matrices with Limited Storage*, Mathematics of Computation 1980;
      Nocedal & Wright, *Numerical Optimization*, 2006 (Algorithms 3.5, 3.6 and 7.4).
    """
    fn = "lbfgs"
    if learning_rate is not None:
        learning_rate = check.non_negative(fn, "learning_rate", learning_rate, schedule=True)
    memory_size = _check_memory_size(fn, memory_size)
    scale_init_precond = _check_bool(fn, "scale_init_precond", scale_init_precond)
    if linesearch is not None and not (hasattr(linesearch, "init") and hasattr(linesearch, "update")):
        raise TypeError(
            f"{fn}: linesearch must be None or a GradientTransformation (e.g. "
            f"optax.scale_by_zoom_linesearch(...)), got {type(linesearch).__name__}."
        )
    base_scaling = scale(-1.0) if learning_rate is None else scale_by_learning_rate(learning_rate)
    return chain(
        scale_by_lbfgs(memory_size=memory_size, scale_init_precond=scale_init_precond),
        base_scaling,
        optax.identity() if linesearch is None else linesearch,
    )
