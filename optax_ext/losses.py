r"""Losses for supervised, self-supervised and consistency training.

- :func:`softmax_cross_entropy`: integer or soft (mixed, e.g. Mixup/CutMix) labels, with label
  smoothing.
- :func:`nt_xent`: SimCLR's contrastive loss (Chen et al., 2020), averaged over the 2N views.
- :func:`jensen_shannon_consistency`: AugMix's consistency between a clean and two augmented views.

All compute in f32 whatever the input dtype and work under `jax.jit` and `jax.vmap`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from optax_ext import _validate as check

__all__ = ["jensen_shannon_consistency", "nt_xent", "softmax_cross_entropy"]


def softmax_cross_entropy(
    logits, labels, axis=-1, where=None, *, label_smoothing: float = 0.0, num_classes: int | None = None
) -> jax.Array:
    r"""Cross-entropy :math:`-\sum_k \tilde y_k \log\mathrm{softmax}(z)_k` over the class axis.

    `optax.softmax_cross_entropy`'s arguments (`axis`: the class axis or axes; `where`: a mask of
    the classes that take part), plus: `labels` may be integers (shape of `logits` without the
    class axis; made one-hot, a single int `axis` then) or soft labels (floats, shape `logits.shape`,
    each a distribution, e.g. Mixup's :math:`\lambda y_i + (1-\lambda) y_j`), and label smoothing
    mixes them with the uniform distribution over the :math:`K` classes,
    :math:`\tilde y = (1-\alpha)\,y + \alpha/K` (as `optax.smooth_labels`). `num_classes`, when
    given, must equal `logits.shape[axis]` (a check). Integer labels outside :math:`[0, K)` give an
    all-zero one-hot row (only the smoothing term remains); they are not checked under `jit`.
    Computed in f32 (f64 for f64 logits) whatever the input dtype; returns the logits' shape
    without the class axis.

    References:
      Szegedy et al., *Rethinking the Inception Architecture for Computer Vision* (label smoothing),
      CVPR 2016; Zhang et al., *mixup: Beyond Empirical Risk Minimization*, ICLR 2018.
    """
    fn = "softmax_cross_entropy"
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim < 1:
        raise ValueError(f"{fn}: logits must have a class axis, got shape {logits.shape}.")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"{fn}: logits must be floating point, got dtype {logits.dtype}.")
    label_smoothing = check.unit_interval(fn, "label_smoothing", label_smoothing, closed=True)
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if not isinstance(axis, int):
            raise ValueError(f"{fn}: integer labels need a single class axis, got axis={axis!r}.")
        k = logits.shape[axis]
        lead = logits.shape[: axis % logits.ndim] + logits.shape[axis % logits.ndim + 1 :]
        if labels.shape != lead:
            raise ValueError(
                f"{fn}: integer labels must have the shape of logits without the class axis, "
                f"{lead}, got {labels.shape}."
            )
        targets = jax.nn.one_hot(labels, k, dtype=dtype, axis=axis)
    elif jnp.issubdtype(labels.dtype, jnp.floating):
        if labels.shape != logits.shape:
            raise ValueError(f"{fn}: soft labels must have the logits' shape {logits.shape}, got {labels.shape}.")
        targets = labels.astype(dtype)
    else:
        raise TypeError(f"{fn}: labels must be integers or floats, got dtype {labels.dtype}.")
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    k = int(np.prod([logits.shape[a] for a in axes]))
    if num_classes is not None and num_classes != k:
        raise ValueError(f"{fn}: num_classes={num_classes!r} but logits have {k} classes (shape {logits.shape}).")
    if where is not None:
        where = jnp.asarray(where)
        if where.ndim != logits.ndim:
            where = jnp.expand_dims(where, axis)
    if label_smoothing:
        targets = (1.0 - label_smoothing) * targets + label_smoothing / k
    log_p = jax.nn.log_softmax(logits.astype(dtype), axis, where=where)
    return -jnp.sum(targets * log_p, axis=axis, where=where)


def nt_xent(z1, z2, temperature=0.5) -> jax.Array:
    r"""SimCLR's NT-Xent loss (Chen et al., 2020): the mean over the :math:`2N` views of the per-view term.

    With :math:`z = [z_1; z_2]` (:math:`2N` rows), :math:`s_{ij} = \cos(z_i, z_j)/\tau` and
    :math:`j(i)` the other view of example :math:`i` (:math:`i \pm N`),

    .. math:: \mathcal L = \frac{1}{2N}\sum_{i=1}^{2N} -\log
       \frac{\exp(s_{i\,j(i)})}{\sum_{k \ne i} \exp(s_{ik})}.

    The paper's loss is the sum over :math:`i` (:math:`2N` times this value) with dot products of
    normalized :math:`z`. Cosine similarity normalizes each row by
    :math:`\sqrt{\max(\|z\|^2, \epsilon)}`, :math:`\epsilon` the dtype's machine epsilon (as Optax).

    Relation to Optax: ``optax.losses.ntxent(jnp.concatenate([z1, z2]), labels, temperature)`` with
    ``labels = jnp.concatenate([jnp.arange(N), jnp.arange(N)])`` averages the same per-view terms
    over its positive pairs, of which there are exactly :math:`2N` here (each view has one
    positive, and Optax's denominator, the negatives plus that positive, is :math:`\sum_{k\ne i}`):
    the two are **equal** for equal temperatures (factor 1; tested). Only the default temperature
    differs: 0.5 here (SimCLR's CIFAR-10 setting), 0.07 in Optax.

    Args:
      z1, z2: embeddings of the two views, shape (N, d), row i of both from the same example.
      temperature: :math:`\tau > 0`.

    Returns:
      A f32 scalar.

    References:
      Chen et al., *A Simple Framework for Contrastive Learning of Visual Representations*, ICML 2020.
    """
    z1, z2 = jnp.asarray(z1), jnp.asarray(z2)
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"nt_xent: z1 and z2 must both have shape (N, d); got {z1.shape} and {z2.shape}.")
    if z1.shape[0] < 1:
        raise ValueError(f"nt_xent: need at least one example, got z1 of shape {z1.shape}.")
    temperature = check.positive("nt_xent", "temperature", temperature)
    eps = float(jnp.finfo(z1.dtype if jnp.issubdtype(z1.dtype, jnp.floating) else jnp.float32).eps)
    n = z1.shape[0]
    z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
    z = z / jnp.sqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), eps))
    sim = (z @ z.T) / temperature
    sim = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, sim)  # no self-similarity in the denominator
    positive = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
    pos = jnp.take_along_axis(sim, positive[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(sim, axis=1) - pos)


def jensen_shannon_consistency(logits_clean, logits_aug1, logits_aug2) -> jax.Array:
    r"""AugMix's Jensen-Shannon consistency between three views, per example:

    .. math:: \mathrm{JS}(p_c, p_1, p_2) = \tfrac13\big(\mathrm{KL}(p_c\|M) + \mathrm{KL}(p_1\|M)
       + \mathrm{KL}(p_2\|M)\big),\quad M = \tfrac13(p_c + p_1 + p_2),

    :math:`p = \mathrm{softmax}(\text{logits})`, and :math:`M` clipped to :math:`[10^{-7}, 1]` before
    the log, as the reference implementation. Returns shape `logits.shape[:-1]`, f32: its mean over
    the batch is AugMix's ``batchmean`` value, which the paper weights by :math:`\lambda = 12`.

    References:
      Hendrycks et al., *AugMix: A Simple Data Processing Method to Improve Robustness and
      Uncertainty*, ICLR 2020.
    """
    logits = [jnp.asarray(x) for x in (logits_clean, logits_aug1, logits_aug2)]
    shapes = [x.shape for x in logits]
    if len(set(shapes)) != 1 or logits[0].ndim < 1:
        raise ValueError(
            "jensen_shannon_consistency: logits_clean, logits_aug1 and logits_aug2 must have the same "
            f"shape (..., num_classes); got {shapes[0]}, {shapes[1]} and {shapes[2]}."
        )
    log_ps = [jax.nn.log_softmax(x.astype(jnp.float32), axis=-1) for x in logits]
    ps = [jnp.exp(lp) for lp in log_ps]
    log_m = jnp.log(jnp.clip((ps[0] + ps[1] + ps[2]) / 3.0, 1e-7, 1.0))
    # KL(p || M) = sum p (log p - log M); log p from log_softmax is finite, so p = 0 contributes 0.
    kls = [jnp.sum(p * (lp - log_m), axis=-1) for p, lp in zip(ps, log_ps)]
    return (kls[0] + kls[1] + kls[2]) / 3.0
