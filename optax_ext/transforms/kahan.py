r"""Kahan-compensated parameter updates: low-precision (bf16, f16) weights that train like f32 ones.

A bf16 weight has 8 significant bits: an update smaller than half its unit in the last place
(2^-9 of its magnitude) rounds away entirely, so at small learning rates bf16 weights stop moving.
Kahan summation (Kahan, *Further remarks on reducing truncation errors*, CACM 1965) keeps the part
of each update that the rounding lost in a compensation buffer :math:`c` (in the params' dtype)
and adds it to the next update:

.. math::
    y = u_t + c_{t-1},\qquad \theta_{t+1} = \mathrm{round}(\theta_t + y),\qquad
    c_t = y - (\theta_{t+1} - \theta_t),

so :math:`\theta_{t+1} + c_t` follows the exact sum of the updates to within the rounding of
:math:`c` itself. Zamirai et al. (*Revisiting BFloat16 Training*, 2020) show bf16 weights with
compensated updates reach the accuracy of f32 master weights, at 2 + 2 bytes per parameter
instead of 4 (+ 2 for a bf16 copy); the optimi library uses the same scheme.

`kahan_summation()` goes last in a chain (the optimizers' `kahan_sum=True` put it there). Its
update is :math:`\theta_{t+1} - \theta_t` (exactly representable for steps of a few ulps), so:

* with `update_and_apply` (fused: the new params are written in the same pass), the params are
  exactly :math:`\theta_{t+1}` above;
* with `update` + `optax.apply_updates(params, updates)` on the *same* params that were passed to
  `update`, the result is the same: :math:`\theta_t + (\theta_{t+1} - \theta_t)` rounds back to
  :math:`\theta_{t+1}`. Scaling the updates afterwards, applying them to other params, or updates
  in a dtype narrower than their difference (a step of hundreds of ulps as bf16 updates) break the
  bookkeeping: the compensation then describes an update that was not applied.

For f32 params it is ordinary Kahan summation in f32. For f16 params, the compensation of a weight
below about 2^-6 in magnitude is an f16 subnormal (spaced 2^-24), so it carries that weight's
rounding error less precisely; bf16 has f32's exponent range and no such floor.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext.fusion import PerLeaf, Rule, fusable
from optax_ext.transforms._common import per_leaf_tree, zeros_like_params

_ROUNDING = {jnp.dtype(jnp.bfloat16): 1.0, jnp.dtype(jnp.float16): 2.0}  # per-leaf code of the params' dtype


class KahanSummationState(NamedTuple):
    """The rounding error not yet applied to each parameter, in the params' dtype."""

    compensation: optax.Updates


class _KahanScalars(NamedTuple):
    rounding: Any  # PerLeaf: the code of each leaf's params dtype (_ROUNDING)


def _round_like(x, code):
    """x rounded to the params' storage (code 1: bf16, 2: f16, else unchanged), back in x's dtype."""
    if jnp.iscomplexobj(x) or x.dtype == jnp.float64:
        return x  # no 16-bit storage to emulate
    bf16 = x.astype(jnp.bfloat16).astype(x.dtype)
    f16 = x.astype(jnp.float16).astype(x.dtype)
    return jnp.where(code == 1.0, bf16, jnp.where(code == 2.0, f16, x))


def kahan_summation() -> optax.GradientTransformation:
    r"""Compensate the rounding of each applied update (see the module docstring).

    :math:`y = u + c`, :math:`\theta' = \mathrm{round}(\theta + y)`, update :math:`\theta' - \theta`,
    :math:`c \leftarrow y - (\theta' - \theta)`. Needs params. State: `KahanSummationState(compensation)`.

    References:
      Kahan, *Further remarks on reducing truncation errors*, Communications of the ACM, 1965;
      Zamirai et al., *Revisiting BFloat16 Training*, arXiv 2010.06192, 2020.
    """

    def init(params):
        return KahanSummationState(compensation=zeros_like_params(params))

    def scalars(state, updates, params):
        codes = [_ROUNDING.get(jnp.dtype(jnp.result_type(p)), 0.0) for p in jax.tree.leaves(params)]
        return _KahanScalars(rounding=PerLeaf(per_leaf_tree(params, codes)))

    def element(u, p, slots, s: _KahanScalars):
        (c,) = slots
        y = u + c
        new_p = _round_like(p + y, s.rounding)
        applied = new_p - p
        return applied, (y - applied,)

    return fusable(
        init,
        Rule(
            "kahan_summation",
            KahanSummationState,
            ("compensation",),
            scalars,
            element,
            lambda st, sl: KahanSummationState(compensation=sl[0]),
            needs_params=True,
            scalars_type=_KahanScalars,
        ),
    )
