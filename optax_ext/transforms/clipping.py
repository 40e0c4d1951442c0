"""Clipping: by global norm (Listing 1's `clip_grad_norm_`), by value, and by per-leaf RMS."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext import _validate as check
from optax_ext.fusion import PerLeaf, Rule, fusable
from optax_ext.kernels import reductions


def _stateless(name, scalars, element, scalars_type, *, reads_updates=False, needs_params=False):
    return fusable(
        lambda params: optax.EmptyState(),
        Rule(
            name,
            optax.EmptyState,
            (),
            scalars,
            element,
            lambda st, sl: st,
            reads_updates=reads_updates,
            needs_params=needs_params,
            scalars_type=scalars_type,
        ),
    )


class _ClipFactor(NamedTuple):
    factor: Any  # min(1, max_norm / norm)


class _MaxDelta(NamedTuple):
    max_delta: Any


class _BlockRmsDenom(NamedTuple):
    denom: Any  # PerLeaf: max(1, rms / threshold)


def clip_by_global_norm(max_norm) -> optax.GradientTransformation:
    r"""Rescale all updates together when their global norm exceeds `max_norm`:

    :math:`u \leftarrow u \cdot \min(1, c / \|u\|_2)` with :math:`\|u\|_2 = \sqrt{\sum_\text{leaves}\sum u^2}`
    (computed by one reduction over every leaf before the fused pass). Same as
    `optax.clip_by_global_norm` and PyTorch's `clip_grad_norm_`.

    References:
      Pascanu, Mikolov & Bengio, *On the difficulty of training recurrent neural networks*, ICML 2013.
    """
    max_norm = check.non_negative("clip_by_global_norm", "max_norm", max_norm)

    def scalars(state, updates, params):
        norm = jnp.sqrt(reductions.global_sq_norm(jax.tree.leaves(updates)))
        # One scalar factor per step: a multiply per element instead of a select and a divide
        # (1.9x faster on CPU; within one ulp of Optax's (u / norm) * max_norm).
        return _ClipFactor(factor=jnp.where(norm < max_norm, 1.0, max_norm / norm))

    def element(g, p, slots, s: _ClipFactor):
        return g * s.factor, ()

    return _stateless("clip_by_global_norm", scalars, element, _ClipFactor, reads_updates=True)


def clip(max_delta) -> optax.GradientTransformation:
    r"""Clip every element to :math:`[-\delta, \delta]`: :math:`u \leftarrow \mathrm{clip}(u, -\delta, \delta)`."""
    max_delta = check.non_negative("clip", "max_delta", max_delta)

    def element(g, p, slots, s: _MaxDelta):
        return jnp.clip(g, -s.max_delta, s.max_delta), ()

    return _stateless("clip", lambda st, u, p: _MaxDelta(max_delta), element, _MaxDelta)


def clip_by_block_rms(threshold) -> optax.GradientTransformation:
    r"""Clip each leaf to RMS at most `threshold`: :math:`u \leftarrow u / \max(1, \mathrm{rms}(u)/c)` (Adafactor).

    References:
      Shazeer & Stern, *Adafactor: Adaptive Learning Rates with Sublinear Memory Cost*, ICML 2018.
    """
    threshold = check.positive("clip_by_block_rms", "threshold", threshold)

    def scalars(state, updates, params):
        leaves = jax.tree.leaves(updates)
        sq = reductions.leaf_sq_norms(leaves)
        denom = [jnp.maximum(1.0, jnp.sqrt(s / max(x.size, 1)) / threshold) for s, x in zip(sq, leaves)]
        return _BlockRmsDenom(denom=PerLeaf(jax.tree.structure(updates).unflatten(denom)))

    def element(g, p, slots, s: _BlockRmsDenom):
        return g / s.denom, ()

    return _stateless("clip_by_block_rms", scalars, element, _BlockRmsDenom, reads_updates=True)
