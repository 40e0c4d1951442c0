"""Scalings driven by norms or by curvature: NovoGrad, Polyak's step size, SM3, L-BFGS.

NovoGrad's per-leaf gradient norms and Polyak's global gradient norm come from the multi-tensor
reductions of `optax_ext.kernels.reductions` (one pass over the updates for every leaf); NovoGrad's
per-element moment update is a `Rule`, so it fuses with its neighbours in `optax_ext.chain`. SM3's
per-axis accumulators (maxima over every other axis) and L-BFGS's two-loop recursion are not
elementwise and run on XLA. States are Optax's own NamedTuples.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ext import _validate as check
from optax_ext.fusion import FusableTransformation, Rule, fusable
from optax_ext.kernels import reductions
from optax_ext.rule import PerLeaf
from optax_ext.transforms._common import full_like_dims, increment, zero_count, zeros_like_params

__all__ = ["scale_by_lbfgs", "scale_by_novograd", "scale_by_polyak", "scale_by_sm3"]

# Optax's own, bound at import: `scale_by_lbfgs` below builds on it, and must keep doing so where
# `optax.scale_by_lbfgs` has been pointed at ours (tests/optax_names.py runs Optax's tests that way).
_OPTAX_SCALE_BY_LBFGS = optax.scale_by_lbfgs


# ---------------------------------------------------------------------------------- NovoGrad


class _NovogradScalars(NamedTuple):
    b1: Any  # 0 on the first step (the first moment starts at its first increment), else b1
    denom: Any  # PerLeaf: sqrt(nu + eps_root) + eps
    weight_decay: Any
    nu: Any = None  # PerLeaf: the new layer-wise second moments, kept in the state (not read by the element)


def scale_by_novograd(
    b1=0.9, b2=0.25, eps=1e-8, eps_root=0.0, weight_decay=0.0, mu_dtype=None
) -> FusableTransformation:
    r"""NovoGrad's scaling: layer-wise second moments (one scalar per leaf), element-wise first moments.

    Per leaf :math:`\ell` with gradient :math:`g_\ell`,

    .. math::
      v_{\ell,1} = \|g_{\ell,1}\|^2, \quad v_{\ell,t} = \beta_2 v_{\ell,t-1} + (1-\beta_2)\|g_{\ell,t}\|^2, \\
      m_{\ell,1} = a_{\ell,1}, \quad m_{\ell,t} = \beta_1 m_{\ell,t-1} + a_{\ell,t}, \quad
      a_{\ell,t} = \frac{g_{\ell,t}}{\sqrt{v_{\ell,t} + \epsilon_{root}} + \epsilon} + \lambda\theta_{\ell,t},

    and the update is :math:`m_t`. Same arguments and state as `optax.scale_by_novograd`
    (`optax.ScaleByNovogradState(count, mu, nu)`, `nu` a 0-d value per leaf in the params' dtype).

    The per-leaf norms are one multi-tensor reduction over the updates; the moment update is a
    per-element rule that fuses with what follows it in `optax_ext.chain` (e.g. the learning rate).
    `weight_decay` is a number (Optax multiplies the params by it directly, so a schedule has no
    step to be evaluated at here).

    References:
      Ginsburg et al., *Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of
      Deep Networks*, 2019 (arXiv:1905.11286).
    """
    fn = "scale_by_novograd"
    b1 = check.unit_interval(fn, "b1", b1)
    b2 = check.unit_interval(fn, "b2", b2, closed=True)
    eps = check.non_negative(fn, "eps", eps)
    eps_root = check.non_negative(fn, "eps_root", eps_root)
    weight_decay = check.finite(fn, "weight_decay", weight_decay)
    check.storage(fn, "mu_dtype", mu_dtype)

    def init(params):
        nu = jax.tree.map(lambda p: jnp.zeros([], jnp.result_type(p)), params)
        return optax.ScaleByNovogradState(count=zero_count(), mu=zeros_like_params(params, mu_dtype), nu=nu)

    def scalars(state, updates, params):
        leaves, treedef = jax.tree.flatten(updates)
        try:
            nus = treedef.flatten_up_to(state.nu)
        except (ValueError, TypeError):
            raise ValueError(
                f"update(): {fn} state field 'nu' does not match the updates; "
                f"was the state made by init on these params?"
            ) from None
        # The layer-wise second moments: one multi-tensor reduction over the updates.
        first = state.count == 0
        new_nu = []
        for sq, nu in zip(reductions.leaf_sq_norms([jnp.asarray(x) for x in leaves]), nus):
            sq = jnp.sqrt(sq) ** 2  # ||g||^2 as Optax forms it (the norm, squared)
            nu = jnp.asarray(nu)
            new_nu.append(jnp.where(first, sq, (1 - b2) * sq + b2 * nu).astype(nu.dtype))
        return _NovogradScalars(
            b1=jnp.where(first, 0.0, b1),
            denom=PerLeaf(treedef.unflatten([jnp.sqrt(n + eps_root) + eps for n in new_nu])),
            weight_decay=weight_decay,
            nu=PerLeaf(treedef.unflatten(new_nu)),
        )

    # The first moment, which is also the update: fused with what follows.
    def element(g, p, slots, s: _NovogradScalars):
        (m,) = slots
        m = s.b1 * m + (g / s.denom + s.weight_decay * p)
        return m, (m,)

    def next_state(state, new_slots, s: _NovogradScalars):
        return optax.ScaleByNovogradState(count=increment(state.count), mu=new_slots[0], nu=s.nu.tree)

    return fusable(
        init,
        Rule(
            fn,
            optax.ScaleByNovogradState,
            ("mu",),
            scalars,
            element,
            next_state,
            reads_updates=True,
            needs_params=True,
            scalars_type=_NovogradScalars,
            next_state_reads_scalars=True,
        ),
    )


# ---------------------------------------------------------------------------------- Polyak


def scale_by_polyak(
    f_min=0.0, max_learning_rate=1.0, eps=0.0, variant: str = "sps"
) -> optax.GradientTransformationExtraArgs:
    r"""Scale the updates by Polyak's step size; needs the loss: `update(updates, state, params, value=loss)`.

    .. math::
      \gamma_t = \min\left(\frac{f(\theta_t) - f^\star}{\|u_t\|^2 + \epsilon}, \gamma_{max}\right), \qquad
      u_t \leftarrow \gamma_t u_t,

    with :math:`\gamma_t = 0` when :math:`\|u_t\|^2 + \epsilon` is at most the float64 machine epsilon;
    `variant="sps+"` clips the gap :math:`f(\theta_t) - f^\star` at 0. Same arguments (in Optax's
    order: `f_min` first), state (`optax.EmptyState`) and extra argument as `optax.scale_by_polyak`;
    inside `optax_ext.chain` the `value=` keyword reaches it as it does in `optax.chain`.

    The squared global norm is one multi-tensor reduction over the updates. The scaling itself is
    not a fused rule: a rule's scalars do not receive the extra arguments of `update` (the loss
    value), so it runs as one XLA multiply that ends the fused run before it.

    References:
      Polyak, *Introduction to Optimization*, 1987; Loizou et al., *Stochastic Polyak Step-size for
      SGD: An Adaptive Learning Rate for Fast Convergence*, AISTATS 2021.
    """
    fn = "scale_by_polyak"
    f_min = check.finite(fn, "f_min", f_min)
    max_learning_rate = check.non_negative(fn, "max_learning_rate", max_learning_rate)
    eps = check.non_negative(fn, "eps", eps)
    check.one_of(fn, "variant", variant, ("sps", "sps+"))

    def update(updates, state, params=None, *, value=None, **extra_args):
        del params, extra_args
        if value is None:
            raise TypeError(f"{fn}: update() needs the loss value: call update(updates, state, params, value=loss).")
        leaves = [jnp.asarray(x) for x in jax.tree.leaves(updates)]
        # Optax's norm is in the dtype the leaves' sums promote to (bf16 when every leaf is bf16).
        dtype = jnp.result_type(*(x.dtype for x in leaves)) if leaves else jnp.float32
        sq = reductions.global_sq_norm(leaves) if leaves else jnp.zeros([], jnp.float32)
        gap = jnp.asarray(value - f_min).astype(sq.dtype)
        if variant == "sps+":
            gap = jnp.maximum(gap, 0.0)
        denom = sq + eps
        step = jnp.where(denom <= np.finfo(float).eps, 0.0, jnp.minimum(gap / denom, max_learning_rate))
        step = step.astype(dtype)
        return jax.tree.map(lambda x: step * x, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


# ---------------------------------------------------------------------------------- SM3


def _sm3_axis_zeros(p, axis: int):
    dtype = jax.eval_shape(functools.partial(jnp.sum, axis=tuple(i for i in range(p.ndim) if i != axis)), p).dtype
    if isinstance(p, jax.Array):
        return full_like_dims(p, (axis,), 0, dtype)
    return jnp.zeros((p.shape[axis],), dtype)


def scale_by_sm3(b1=0.9, b2=1.0, eps=1e-8) -> optax.GradientTransformation:
    r"""SM3's scaling: second-moment accumulators kept per axis (a vector per dimension of each leaf).

    For a leaf of shape :math:`(n_1, \dots, n_k)` with one accumulator :math:`\mu^{(r)}` of length
    :math:`n_r` per axis, the per-element second moment is the smallest cover of its axes:

    .. math::
      \nu_t[i] = c\,g_t[i]^2 + \beta_2 \min_r \mu^{(r)}_{t-1}[i_r], \quad c = 1-\beta_2 \ (1 \text{ if } \beta_2=1), \\
      \mu^{(r)}_t[j] = \max_{i:\,i_r=j} \nu_t[i], \quad
      m_t = \beta_1 m_{t-1} + (1-\beta_1)\, g_t\, \nu_t^{-1/2}

    (with :math:`\nu_t^{-1/2}` taken as :math:`(\nu_t + \epsilon)^{-1/2}`, and 0 where
    :math:`\nu_t = 0`); the update is :math:`m_t`. Same arguments and state as `optax.scale_by_sm3`
    (`optax.ScaleBySM3State(mu, nu)`: `mu` a list of per-axis vectors per leaf, `nu` the momentum).

    The per-axis maxima and minima are reductions and broadcasts along axes, so this transformation
    runs on XLA (which fuses it) rather than as a per-element rule; it ends a fused run in
    `optax_ext.chain`. Params must be real and at least 1-d (Optax's state keeps no accumulator for
    a 0-d leaf).

    References:
      Anil, Gupta, Koren & Singer, *Memory-Efficient Adaptive Optimization*, NeurIPS 2019.
    """
    fn = "scale_by_sm3"
    b1 = check.unit_interval(fn, "b1", b1)
    b2 = check.unit_interval(fn, "b2", b2, closed=True)
    eps = check.non_negative(fn, "eps", eps)

    def init(params):
        for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
            if jnp.issubdtype(jnp.result_type(p), jnp.complexfloating):
                raise ValueError(
                    f"{fn}: params must be real; got {jnp.result_type(p)} at {jax.tree_util.keystr(path)}."
                )
            if len(getattr(p, "shape", np.shape(p))) == 0:
                raise ValueError(
                    f"{fn}: params must be at least 1-d (SM3 keeps one accumulator per axis); got a 0-d leaf at "
                    f"{jax.tree_util.keystr(path)}."
                )
        mu = jax.tree.map(lambda p: [_sm3_axis_zeros(p, i) for i in range(p.ndim)], params)
        return optax.ScaleBySM3State(mu=mu, nu=zeros_like_params(params))

    def one_leaf(g, accums, m):
        g = jnp.asarray(g)
        if g.ndim == 0 or len(accums) != g.ndim:
            raise ValueError(
                f"{fn}: a leaf of shape {g.shape} has {len(accums)} accumulators; was the state made by init?"
            )
        # Optax's c = 1 - b2, except 1 when b2 == 1 (a plain running max); a traced b2 selects it at run time.
        if isinstance(b2, (int, float)):
            coeff = 1.0 if b2 == 1.0 else 1.0 - b2
        else:
            coeff = jnp.where(b2 == 1.0, 1.0, 1.0 - b2)
        cover = [jnp.reshape(a, [1] * r + [g.shape[r]] + [1] * (g.ndim - r - 1)) for r, a in enumerate(accums)]
        prev = cover[0] if g.ndim < 2 else functools.reduce(jnp.minimum, cover)
        nu = coeff * g**2 + b2 * prev
        scaled = g * jnp.where(nu > 0, jax.lax.rsqrt(nu + eps), 0.0)
        new_m = (1 - b1) * scaled + b1 * m
        if g.ndim < 2:
            new_accums = [nu]
        else:
            new_accums = [jnp.max(nu, axis=tuple(i for i in range(g.ndim) if i != r)) for r in range(g.ndim)]
        return new_m, new_accums

    def update(updates, state, params=None):
        del params
        g_leaves, treedef = jax.tree.flatten(updates)
        try:
            mus = treedef.flatten_up_to(state.mu)
            nus = treedef.flatten_up_to(state.nu)
        except (ValueError, TypeError):
            raise ValueError(
                f"update(): {fn} state does not match the updates; was it made by init on these params?"
            ) from None
        outs = [one_leaf(g, a, m) for g, a, m in zip(g_leaves, mus, nus)]
        new_nu = treedef.unflatten([o[0] for o in outs])
        new_mu = treedef.unflatten([o[1] for o in outs])
        return new_nu, optax.ScaleBySM3State(mu=new_mu, nu=new_nu)

    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------------- L-BFGS


def _check_memory_size(fn: str, memory_size):
    if isinstance(memory_size, bool) or not isinstance(memory_size, (int, np.integer)) or memory_size < 1:
        raise ValueError(f"{fn}: memory_size must be an integer >= 1, got {memory_size!r}.")
    return int(memory_size)


def _check_bool(fn: str, name: str, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be True or False, got {value!r}.")
    return bool(value)


def scale_by_lbfgs(memory_size: int = 10, scale_init_precond: bool = True) -> optax.GradientTransformation:
    r"""L-BFGS's scaling: the update multiplied by a limited-memory inverse-Hessian estimate.

    With the last :math:`m` (`memory_size`) parameter differences :math:`s_i = \theta_{i+1}-\theta_i`
    and update differences :math:`y_i = g_{i+1}-g_i`, :math:`\rho_i = 1/\langle s_i, y_i\rangle`,

    .. math::
      H_{k} = V_{k-1}^\top H_{k-1} V_{k-1} + \rho_{k-1} s_{k-1}s_{k-1}^\top, \quad
      V_i = I - \rho_i y_i s_i^\top, \\
      H^{(0)} = \gamma_k I, \quad \gamma_k = \frac{\langle s_{k-1}, y_{k-1}\rangle}{\|y_{k-1}\|^2},

    applied to :math:`g_k` by the two-loop recursion (with `scale_init_precond=False`,
    :math:`\gamma_k = 1`; on the first step :math:`\gamma_0 = \min(1, 1/\|g_0\|)`).

    This is `optax.scale_by_lbfgs` itself, after our argument checks: the recursion is a sequence of
    global inner products over the history (XLA's work: no per-element rule to fuse), and Optax's
    state `optax.ScaleByLBFGSState` is kept exactly.

    References:
      Nocedal, *Updating Quasi-Newton Matrices with Limited Storage*, Mathematics of Computation 1980;
      Nocedal & Wright, *Numerical Optimization*, 2006 (Algorithm 7.4).
    """
    fn = "scale_by_lbfgs"
    memory_size = _check_memory_size(fn, memory_size)
    scale_init_precond = _check_bool(fn, "scale_init_precond", scale_init_precond)
    return _OPTAX_SCALE_BY_LBFGS(memory_size=memory_size, scale_init_precond=scale_init_precond)
