"""Muon: momentum orthogonalized by Newton-Schulz, with Optax's signature, defaults and state.

`muon` and `scale_by_muon` take the arguments of `optax.contrib.muon` / `optax.contrib.scale_by_muon`
(Optax 0.2.8) in the same order, and their states are Optax's (`MuonState`, `optax.PartitionState`,
...), so `jax.tree.structure(ours.init(p)) == jax.tree.structure(optax's.init(p))`. What differs is
how the step runs:

* The momentum update is a per-element `Rule` (it fuses with the transformations before it in an
  `optax_ext.chain`), and so is everything after the orthogonalization: the shape scaling
  (a per-leaf scalar), the decoupled weight decay and the learning rate run as one fused pass,
  which writes the parameters directly under `update_and_apply`.
* Newton-Schulz is batched: the momenta are reshaped to `(batch, rows, cols)` by their dimension
  numbers, turned wide (`rows <= cols`), grouped by matrix shape and compute dtype, and each group
  is orthogonalized by ONE batched call (XLA dots), not a loop over leaves.
* Under sharding (`jax.jit` over a mesh, `AxisType.Auto` or `AxisType.Explicit`), a group whose
  matrices are split over mesh axes (FSDP: rows over a data axis) is redistributed so that whole
  matrices sit on devices: the stack of the group is split over those axes instead (one
  `all_to_all` per split matrix dim in, one out), the iterations run locally with no collective,
  and the result goes back to the leaves' own layout. A group of `B` matrices over `D` devices is
  padded with zero matrices to a multiple of `D` (a zero matrix orthogonalizes to zero, no NaN):
  each device orthogonalizes `ceil(B / D)` matrices, so a group smaller than the mesh costs one
  matrix's time, which is what replicating it would cost too, for half the communication of an
  all-gather of the group as soon as it holds more than two matrices. Matrices that are not split
  (replicated params) are orthogonalized on every device, with no communication. `adaptive=True`
  adds one reduction per leaf (an all-reduce where the leaf is split).
* The iterations run in `ns_dtype` (keyword-only), bfloat16 by default as the reference
  implementations do (Jordan's modded-nanogpt, Moonlight). Optax instead iterates in the dtype of
  the momentum (float32 for float32 params): `ns_dtype=None` does exactly that and reproduces
  Optax's numerics. Complex leaves always iterate in their own dtype.

`MuonDimensionNumbers` and `MuonState` are Optax's own classes.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, MuonState

from optax_ext import _validate as check
from optax_ext.fusion import FusableTransformation, PerLeaf, Rule, _Atom, _make, chain, fusable
from optax_ext.kernels import sharding
from optax_ext.optimizers import adamw
from optax_ext.transforms import add_decayed_weights, scale_by_learning_rate
from optax_ext.transforms._common import increment, scalar, zero_count, zeros_like_params

__all__ = ["MuonDimensionNumbers", "MuonState", "muon", "scale_by_muon", "scale_by_shape"]

_PRECONDITIONINGS = ("frobenius", "spectral", "aol", "schatten")
_STANDARD_COEFFS = (3.4445, -4.7750, 2.0315)
# Dion's per-step coefficients (Ahn et al., 2025), as Optax's 'dion' preset.
_DION_COEFFS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
_PRESETS = {"standard": _STANDARD_COEFFS, "dion": _DION_COEFFS}
_FIRST_STEP_EPS = 1e-8  # floor of AOL's / Schatten's first-step rescaling (fixed, as Optax)


def _is_dim_nums(x) -> bool:
    return isinstance(x, MuonDimensionNumbers)


# ---------------------------------------------------------------------------------- shapes


def _axes(x_ndim: int, dim_nums: MuonDimensionNumbers) -> tuple[tuple[int, ...], tuple[int, ...]]:
    red = dim_nums.reduction_axis
    out = dim_nums.output_axis
    red = (red,) if isinstance(red, int) else tuple(red)
    out = (out,) if isinstance(out, int) else tuple(out)
    return tuple(a % x_ndim for a in red), tuple(a % x_ndim for a in out)


def _layout(shape: tuple[int, ...], dim_nums: MuonDimensionNumbers | None):
    """(permutation, (batch, fan_in, fan_out)) taking a leaf to its `(batch, reduction, output)` view."""
    ndim = len(shape)
    if dim_nums is None:
        if ndim != 2:
            raise ValueError(
                f"scale_by_muon: a parameter of shape {shape} is not a matrix; give it weight_dimension_numbers "
                f"(a MuonDimensionNumbers) or leave it to Adam (muon's muon_weight_dimension_numbers)."
            )
        dim_nums = MuonDimensionNumbers()
    if ndim < 2:
        raise ValueError(f"scale_by_muon: Muon parameters must have rank >= 2, got shape {shape}.")
    red, out = _axes(ndim, dim_nums)
    if set(red) & set(out):
        raise ValueError(
            f"scale_by_muon: reduction axes {red} and output axes {out} overlap for a parameter of shape "
            f"{shape} ({dim_nums})."
        )
    batch = tuple(a for a in range(ndim) if a not in red and a not in out)
    perm = batch + red + out
    sizes = tuple(math.prod(shape[a] for a in axes) for axes in (batch, red, out))
    return perm, sizes


def _fans(shape, dim_nums) -> tuple[int, int]:
    _, (_, fan_in, fan_out) = _layout(shape, dim_nums)
    return fan_in, fan_out


def _resolve(weight_dimension_numbers, updates) -> list:
    """One entry per leaf of `updates`: its MuonDimensionNumbers or None (a plain matrix)."""
    dims = weight_dimension_numbers(updates) if callable(weight_dimension_numbers) else weight_dimension_numbers
    n = len(jax.tree.leaves(updates))
    if dims is None:
        return [None] * n
    if _is_dim_nums(dims):
        return [dims] * n
    treedef = jax.tree.structure(updates)
    try:
        return treedef.flatten_up_to(dims)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"scale_by_muon: weight_dimension_numbers must have the structure of the updates "
            f"(a MuonDimensionNumbers per leaf): {e}"
        ) from None


# ---------------------------------------------------------------------------------- Newton-Schulz


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _newton_schulz(x, coeffs, ns_steps: int, preconditioning: str, eps):
    """Batched quintic Newton-Schulz on `x` of shape (B, m, n), m <= n, in x's dtype."""
    dtype = x.dtype
    # eps in the compute dtype: a traced f32 eps (optax.inject_hyperparams) must not promote a bf16
    # iteration to f32, which a Python float does not either.
    eps = jnp.asarray(eps).astype(dtype)
    # Normalized in the compute dtype, as Optax does in its own (the momentum's) dtype.
    if preconditioning == "frobenius":
        x = x / (jnp.linalg.norm(x, ord="fro", axis=(-2, -1), keepdims=True) + eps)
    elif preconditioning == "spectral":  # (no SVD in bf16: the norm is taken in f32 at least)
        wide = jnp.promote_types(dtype, jnp.float32)
        x = x / (jnp.linalg.norm(x.astype(wide), ord=2, axis=(-2, -1), keepdims=True).astype(dtype) + eps)
    coeffs = coeffs.astype(dtype)
    rows = [coeffs] * ns_steps if coeffs.ndim == 1 else [coeffs[i] for i in range(coeffs.shape[0])]
    for i, c in enumerate(rows):
        a = x @ _mT(jnp.conj(x))
        if i == 0 and preconditioning == "aol":
            # Almost-orthogonal-layer rescaling of the rows (Boissin et al., 2025).
            s = jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.abs(a), axis=-1), _FIRST_STEP_EPS))[..., None].astype(dtype)
            x, a = x * s, a * s * _mT(s)
        elif i == 0 and preconditioning == "schatten":
            # Schatten-4 rescaling (Grishina et al., 2025).
            norm = jnp.linalg.norm(a, ord="fro", axis=(-2, -1), keepdims=True)
            s = jax.lax.rsqrt(jnp.maximum(norm, _FIRST_STEP_EPS)).astype(dtype)
            x, a = x * s, a * s * s
        b = c[1] * a + c[2] * (a @ a)
        x = c[0] * x + b @ x
    return x


def _axis_size(axes) -> int:
    return math.prod(jax.lax.axis_size(a) for a in axes)


def _orthogonalize_group(mats, coeffs, ns_steps, preconditioning, eps):
    """Newton-Schulz on a group of (b_i, m, n) arrays of one compute dtype; one batched call.

    Under sharding the matrices are moved whole onto devices first (see the module docstring)."""
    nb = len(mats)
    factors = [(f"b{i}", "r", "c") for i in range(nb)]
    k = ("k1", "k0")[2 - coeffs.ndim :]
    # The coefficients and eps are operands too (replicated): eps may be traced (inject_hyperparams),
    # and the partitioned function may not close over traced values.
    rule = sharding.Rule(tuple(factors) + (k, ()), tuple(factors), need_replication=k, name="newton_schulz")

    def local(xs, axes):
        *xs, cf, eps_ = xs
        sizes = [x.shape[0] for x in xs]
        x = jnp.concatenate(xs, axis=0) if nb > 1 else xs[0]
        row_axes, col_axes = tuple(axes.get("r", ())), tuple(axes.get("c", ()))
        moved = row_axes + col_axes
        total = x.shape[0]
        if moved:
            d = _axis_size(moved)
            pad = -total % d
            if pad:
                x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
            # Stack axis over the mesh, whole matrices per device.
            if row_axes:
                x = jax.lax.all_to_all(x, row_axes, 0, 1, tiled=True)
            if col_axes:
                x = jax.lax.all_to_all(x, col_axes, 0, 2, tiled=True)
        y = _newton_schulz(x, cf, ns_steps, preconditioning, eps_)
        if moved:
            if col_axes:
                y = jax.lax.all_to_all(y, col_axes, 2, 0, tiled=True)
            if row_axes:
                y = jax.lax.all_to_all(y, row_axes, 1, 0, tiled=True)
            y = y[:total]
        outs, start = [], 0
        for s in sizes:
            outs.append(y[start : start + s])
            start += s
        return outs

    avals = [jax.ShapeDtypeStruct(m.shape, m.dtype) for m in mats]
    return sharding.per_shard(local, [*mats, coeffs, jnp.asarray(eps, jnp.float32)], rule, avals)


def _orthogonalize_tree(mu_hat, dims, coeffs, ns_steps, preconditioning, eps, ns_dtype):
    """The orthogonalized momenta (each in its own dtype), grouped by matrix shape and compute dtype."""
    leaves, treedef = jax.tree.flatten(mu_hat)
    groups: dict[tuple, list[int]] = {}
    views = []
    for i, (x, dn) in enumerate(zip(leaves, dims)):
        perm, (b, m, n) = _layout(x.shape, dn)
        compute = x.dtype if ns_dtype is None or jnp.iscomplexobj(x) else jnp.dtype(ns_dtype)
        v = jnp.transpose(x, perm).reshape(b, m, n).astype(compute)
        wide = m <= n
        if not wide:  # f(X^T) = f(X)^T: iterate on the side with fewer rows
            v = _mT(v)
        views.append((perm, wide))
        groups.setdefault((v.shape[1:], compute), []).append(i)
        leaves[i] = v
    out = list(leaves)
    for idx in groups.values():
        for i, y in zip(idx, _orthogonalize_group([leaves[i] for i in idx], coeffs, ns_steps, preconditioning, eps)):
            out[i] = y
    results = []
    for y, x, (perm, wide) in zip(out, jax.tree.leaves(mu_hat), views):
        if not wide:
            y = _mT(y)
        y = y.reshape(tuple(x.shape[a] for a in perm))
        inv = tuple(sorted(range(x.ndim), key=lambda a: perm[a]))
        results.append(jnp.transpose(y, inv).astype(x.dtype))
    return treedef.unflatten(results)


# ---------------------------------------------------------------------------------- scale_by_muon


class _MomentumScalars(NamedTuple):
    beta: Any
    one_minus_beta: Any
    inv_bc: Any  # 1 / (1 - beta^t)
    inv_bc_next: Any = None  # 1 / (1 - beta^(t+1)), Nesterov's look-ahead


def _coeff_array(ns_coeffs, ns_steps):
    coeffs = jnp.asarray(ns_coeffs)
    if coeffs.ndim > 2 or coeffs.shape[-1] != 3:
        raise ValueError(f"ns_coeffs must have shape (3,) or (n, 3), got {coeffs.shape}")
    if coeffs.ndim == 2:
        if not coeffs.shape[0] <= ns_steps:
            raise ValueError(f"Not enough coeffs to perform {ns_steps} steps")
        coeffs = coeffs[-ns_steps:]
    return coeffs


def scale_by_muon(
    ns_coeffs=_STANDARD_COEFFS,
    ns_steps: int = 5,
    beta=0.95,
    eps=1e-8,
    mu_dtype=None,
    *,
    nesterov: bool = True,
    adaptive: bool = False,
    preconditioning: str = "frobenius",
    weight_dimension_numbers=None,
    ns_dtype="bfloat16",
) -> FusableTransformation:
    r"""Muon's direction: the momentum, orthogonalized by a quintic Newton-Schulz iteration.

    .. math::
      m_t = \beta m_{t-1} + (1-\beta) g_t,\qquad
      \hat m_t = \beta \frac{m_t}{1-\beta^{t+1}} + (1-\beta)\frac{g_t}{1-\beta^t}
      \ \text{(Nesterov; else } m_t / (1-\beta^t)\text{)},

    .. math::
      X_0 = \hat m_t / (\|\hat m_t\|_F + \epsilon),\qquad
      X_{k+1} = a X_k + (b A_k + c A_k^2) X_k,\quad A_k = X_k X_k^{H},

    update :math:`u = X_K` (times :math:`\langle \hat m_t, X_K\rangle` when `adaptive`). Matrices
    are taken in their `(batch, reduction, output)` view given by `weight_dimension_numbers`.
    `preconditioning` replaces the Frobenius normalization by the spectral norm, or by AOL's or
    Schatten-4's rescaling inside the first iteration. `ns_coeffs` of shape (n, 3) gives one row per
    iteration. Same arguments and state (`MuonState(count, mu, ns_coeffs)`) as
    `optax.contrib.scale_by_muon`.

    `ns_dtype` (keyword-only, ours): the dtype the iterations run in, bfloat16 by default as in the
    reference implementations; None iterates in the momentum's own dtype, as Optax always does
    (float32 for float32 params), and reproduces its numerics. Name it by a string ("bfloat16")
    under `optax.inject_hyperparams`, which takes anything callable, `jnp.bfloat16` too, for a
    schedule. Complex leaves iterate in their own
    dtype. Leaves of one matrix shape are orthogonalized in one batched call; under a mesh, whole
    matrices are moved onto devices first (module docstring).

    References:
      Jordan, *modded-nanogpt: Speedrunning the NanoGPT baseline*, 2024;
      Bernstein & Newhouse, *Old Optimizer, New Norm: An Anthology*, 2024 (adaptive);
      Liu et al., *Muon is Scalable for LLM Training*, 2025;
      Boissin et al., *Turbo-Muon*, 2025 (AOL); Grishina et al., 2025 (Schatten-4);
      Ahn et al., *Dion: Distributed Orthonormalized Updates*, 2025.
    """
    beta = check.unit_interval("scale_by_muon", "beta", beta)
    eps = check.non_negative("scale_by_muon", "eps", eps)
    check.one_of("scale_by_muon", "preconditioning", preconditioning, _PRECONDITIONINGS)
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 0:
        raise ValueError(f"scale_by_muon: ns_steps must be an int >= 0, got {ns_steps!r}.")
    if ns_dtype is not None:
        try:
            dtype = jnp.dtype(ns_dtype)
        except TypeError:
            dtype = None
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            raise ValueError(f"scale_by_muon: ns_dtype must be a float dtype or None, got {ns_dtype!r}.")
        ns_dtype = dtype
    check.storage("scale_by_muon", "mu_dtype", mu_dtype)

    def init(params):
        return MuonState(
            count=zero_count(), mu=zeros_like_params(params, mu_dtype), ns_coeffs=_coeff_array(ns_coeffs, ns_steps)
        )

    def scalars(state, updates, params):
        t = increment(state.count)
        bc = 1 - scalar(beta) ** t
        return _MomentumScalars(
            beta=beta,
            one_minus_beta=1 - beta,
            inv_bc=1 / bc,
            inv_bc_next=1 / (1 - scalar(beta) ** increment(t)) if nesterov else None,
        )

    def element(g, p, slots, s: _MomentumScalars):
        (m,) = slots
        m = s.one_minus_beta * g + s.beta * m
        if nesterov:
            return s.beta * (m * s.inv_bc_next) + s.one_minus_beta * (g * s.inv_bc), (m,)
        return m * s.inv_bc, (m,)

    momentum = Rule(
        "scale_by_muon",
        MuonState,
        ("mu",),
        scalars,
        element,
        lambda st, sl: MuonState(count=increment(st.count), mu=sl[0], ns_coeffs=st.ns_coeffs),
        scalars_type=_MomentumScalars,
    )

    def orthogonalize(mu_hat, state, params=None, **extra_args):
        del params, extra_args
        if not jax.tree.leaves(mu_hat):
            return mu_hat, state
        dims = _resolve(weight_dimension_numbers, mu_hat)
        out = _orthogonalize_tree(mu_hat, dims, state.ns_coeffs, ns_steps, preconditioning, eps, ns_dtype)
        if adaptive:
            # Scale by the dual norm of the momentum (Bernstein & Newhouse): <m_hat, O> O.
            out = jax.tree.map(lambda x, y: jnp.sum(jnp.conj(x) * y) * y, mu_hat, out)
        return out, state

    return _make(init, (_Atom(momentum, None, ()), _Atom(None, orthogonalize, ())))


class _ShapeScalars(NamedTuple):
    scale: Any  # PerLeaf


def scale_by_shape(weight_dimension_numbers=None, consistent_rms=None) -> FusableTransformation:
    r"""Scale each matrix's update by a factor of its shape (fan-in :math:`n_{in}`, fan-out :math:`n_{out}`):

    :math:`\sqrt{\max(1, n_{out}/n_{in})}` (width transfer, Jordan's Muon), or with `consistent_rms`
    :math:`\rho`, :math:`\rho\sqrt{\max(n_{in}, n_{out})}` (an update RMS like AdamW's, Liu et al.).
    A per-leaf scalar: it fuses. Same as `optax.contrib._muon.scale_by_shape` (state `EmptyState`).

    References:
      Jordan et al., *Muon: An optimizer for hidden layers*, 2024; Liu et al., *Muon is Scalable for
      LLM Training*, 2025.
    """

    def scalars(state, updates, params):
        dims = _resolve(weight_dimension_numbers, updates)
        values = []
        for x, dn in zip(jax.tree.leaves(updates), dims):
            fan_in, fan_out = _fans(jnp.shape(x), dn)
            if consistent_rms is None:
                values.append(math.sqrt(max(1.0, fan_out / fan_in)))
            else:
                values.append(math.sqrt(max(fan_in, fan_out)) * scalar(consistent_rms))
        return _ShapeScalars(scale=PerLeaf(jax.tree.structure(updates).unflatten(values)))

    def element(g, p, slots, s: _ShapeScalars):
        return s.scale * g, ()

    return fusable(
        lambda params: optax.EmptyState(),
        Rule("scale_by_shape", optax.EmptyState, (), scalars, element, lambda st, sl: st, scalars_type=_ShapeScalars),
    )


# ---------------------------------------------------------------------------------- muon


def muon(
    learning_rate: optax.ScalarOrSchedule,
    ns_coeffs=_STANDARD_COEFFS,
    ns_steps: int = 5,
    beta=0.95,
    eps=1e-8,
    weight_decay=0.0,
    weight_decay_mask=None,
    mu_dtype=None,
    *,
    nesterov: bool = True,
    adaptive: bool = False,
    preconditioning: str = "frobenius",
    adam_b1=0.9,
    adam_b2=0.999,
    adam_eps_root=0.0,
    adam_weight_decay=0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    muon_weight_dimension_numbers=None,
    consistent_rms=None,
    ns_dtype="bfloat16",
) -> optax.GradientTransformationExtraArgs:
    r"""Muon: Momentum Orthogonalized by Newton-Schulz for the matrices, AdamW for the rest.

    For each Muon parameter :math:`\theta` (2-D, or those given `MuonDimensionNumbers`),

    .. math::
      \theta \leftarrow \theta - \eta_t\big(s\, \mathrm{NS}(\hat m_t) + \lambda\theta\big),

    with :math:`\hat m_t` the (Nesterov) bias-corrected momentum, NS the quintic Newton-Schulz
    orthogonalization (:func:`scale_by_muon`), :math:`s` the shape factor of :func:`scale_by_shape`;
    every other parameter is trained by AdamW (`adam_*` arguments, `adam_learning_rate` defaulting
    to `learning_rate`). `ns_coeffs` may be a preset: 'standard' or 'dion'.
    `muon_weight_dimension_numbers` (a tree of `MuonDimensionNumbers` or None, or a function of the
    params returning one) picks the Muon parameters and their matrix view; by default every 2-D
    parameter. Same arguments, defaults and state (an `optax.PartitionState` with 'muon' and 'adam'
    parts) as `optax.contrib.muon`.

    `ns_dtype` (keyword-only, ours): the Newton-Schulz compute dtype, bfloat16 by default as in the
    reference implementations; Optax iterates in the momentum's dtype (float32 for float32 params),
    which `ns_dtype=None` reproduces. See the module docstring for batching and sharding.

    References:
      Jordan, *modded-nanogpt: Speedrunning the NanoGPT baseline*, 2024;
      Bernstein & Newhouse, *Old Optimizer, New Norm: An Anthology*, 2024;
      Liu et al., *Muon is Scalable for LLM Training*, 2025;
      Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
    """
    if adam_learning_rate is None:
        adam_learning_rate = learning_rate
    if isinstance(ns_coeffs, str):
        if ns_coeffs not in _PRESETS:
            raise ValueError(f"Unknown ns_coeff preset string: {ns_coeffs}")
        ns_coeffs = _PRESETS[ns_coeffs]

    dim_nums_arg = muon_weight_dimension_numbers

    def dim_nums_of(params):
        return dim_nums_arg(params) if callable(dim_nums_arg) else dim_nums_arg

    def is_spec(x):
        return x is None or _is_dim_nums(x)

    def labels(params):
        if dim_nums_arg is None:
            return jax.tree.map(lambda x: "muon" if jnp.ndim(x) == 2 else "adam", params)
        # The specs may be a prefix of the params: a spec (or None) covers a whole subtree.
        return jax.tree.map(
            lambda spec, sub: jax.tree.map(lambda _: "adam" if spec is None else "muon", sub),
            dim_nums_of(params),
            params,
            is_leaf=is_spec,
        )

    def muon_dims(params):
        # The specs on the Muon part of the tree, MaskedNode elsewhere (the masked state's layout).
        spec_tree = MuonDimensionNumbers() if dim_nums_arg is None else dim_nums_of(params)
        mask = jax.tree.map(lambda label: label == "muon", labels(params))
        return jax.tree.map(
            lambda spec, sub: jax.tree.map(lambda on: spec if on else optax.MaskedNode(), sub),
            spec_tree,
            mask,
            is_leaf=lambda x: is_spec(x) or isinstance(x, optax.MaskedNode),
        )

    # Optax's partition (its state layout); an optax_ext transformation to the caller, so that
    # `tx.update_and_apply` works as for every other optimizer here (update, then apply).
    partitioned = optax.transforms.partition(
        {
            "muon": chain(
                scale_by_muon(
                    ns_coeffs,
                    ns_steps,
                    beta,
                    eps,
                    mu_dtype,
                    nesterov=nesterov,
                    adaptive=adaptive,
                    preconditioning=preconditioning,
                    weight_dimension_numbers=muon_dims,
                    ns_dtype=ns_dtype,
                ),
                scale_by_shape(muon_dims, consistent_rms),
                add_decayed_weights(weight_decay, weight_decay_mask),
                scale_by_learning_rate(learning_rate),
            ),
            "adam": adamw(
                adam_learning_rate,
                adam_b1,
                adam_b2,
                eps,
                adam_eps_root,
                mu_dtype,
                adam_weight_decay,
                nesterov=nesterov,
            ),
        },
        labels,
    )
    return FusableTransformation(partitioned.init, partitioned.update)
