"""Flax NNX normalization layers running on the `optax_ext.kernels` normalization kernels.

`LayerNorm`, `RMSNorm` and `BatchNorm` are drop-in replacements for `flax.nnx.LayerNorm`,
`flax.nnx.RMSNorm` and `flax.nnx.BatchNorm`: they subclass them, so constructor signatures,
defaults, parameters (`nnx.Param` scale/bias), running statistics (`nnx.BatchStat` mean/var),
`model.train()` / `model.eval()`, `nnx.view` and checkpoints are exactly flax's. Only `__call__`
changes:

- The common case (statistics over the last axis for LayerNorm/RMSNorm; feature axis last for
  BatchNorm, e.g. (N, C) or NHWC) runs the fused kernels (`layer_norm`, `rms_norm`,
  `batch_norm`, `batch_norm_stats`) with their custom VJPs, on the backend that
  `optax_ext.kernels.get_backend()` picks (Triton on GPU, Mosaic on TPU, fused XLA on CPU).
- The variance is always the robust two-pass one, E[(x - E[x])^2], whatever `use_fast_variance`
  says (the argument is accepted for signature compatibility): flax's default
  E[x^2] - E[x]^2 loses all precision when |mean| >> std (mean 1e3, std 1e-2 in f32).
  Results therefore match flax with `use_fast_variance=False`.
- Other configurations (other reduction/feature axes, `mask`, and `axis_name` for LayerNorm and
  RMSNorm) run a plain-jnp path with the same two-pass math, which XLA fuses.
- BatchNorm with `axis_name` (under `shard_map`/`pmap`): per-device statistics come from the
  kernel, then are combined exactly with `lax.pmean`:
  mean = pmean(mean_d), var = pmean(var_d + (mean_d - mean)^2) (equal per-device batches).
  Under plain sharded `jit` over a `Mesh` (Auto or Explicit axes) no `axis_name` is needed: the
  kernels run on each device's rows and merge the per-device (count, mean, M2) with a psum
  (SyncBN), so the statistics are those of the global batch without gathering it.

References: Ba et al., 2016 (LayerNorm, https://arxiv.org/abs/1607.06450); Zhang & Sennrich, 2019
(RMSNorm, https://arxiv.org/abs/1910.07467); Ioffe & Szegedy, 2015 (BatchNorm,
https://arxiv.org/abs/1502.03167).
"""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from optax_ext.kernels.batch_norm import batch_norm, batch_norm_stats
from optax_ext.kernels.layer_norm import layer_norm, rms_norm

__all__ = ["BatchNorm", "LayerNorm", "RMSNorm"]


def _canonical_axes(ndim: int, axes) -> tuple[int, ...]:
    if not isinstance(axes, tp.Iterable):
        axes = (axes,)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an input with {ndim} dimensions.")
        out.append(a % ndim)
    return tuple(sorted(set(out)))


def _stats(x, axes, dtype, axis_name, axis_index_groups, *, use_mean: bool, mask=None):
    """Two-pass (mean, var) over `axes` in at least f32, optionally averaged over `axis_name`."""
    dtype = jnp.promote_types(dtype if dtype is not None else x.dtype, jnp.float32)
    x = jnp.asarray(x, dtype)

    def mean(v):
        m = v.mean(axes, where=mask)
        return m if axis_name is None else lax.pmean(m, axis_name, axis_index_groups=axis_index_groups)

    if not use_mean:
        var = mean(jnp.square(x))
        return jnp.zeros_like(var), var
    mu = mean(x)
    # The global mean is subtracted before squaring: exact combination across devices as well.
    var = mean(jnp.square(x - jnp.expand_dims(mu, axes)))
    return mu, var


def _normalize(x, mean, var, scale, bias, reduction_axes, feature_axes, dtype, epsilon):
    """(x - mean) * rsqrt(var + epsilon) * scale + bias, broadcast as flax does."""
    stats_shape = [1 if i in reduction_axes else d for i, d in enumerate(x.shape)]
    feature_shape = [x.shape[i] if i in feature_axes else 1 for i in range(x.ndim)]
    y = x - mean.reshape(stats_shape)
    mul = lax.rsqrt(var.reshape(stats_shape) + epsilon)
    args = [x]
    if scale is not None:
        mul = mul * scale.reshape(feature_shape)
        args.append(scale)
    y = y * mul
    if bias is not None:
        y = y + bias.reshape(feature_shape)
        args.append(bias)
    return jnp.asarray(y, _result_dtype(args, dtype))


def _result_dtype(args, dtype):
    """flax's output dtype: `dtype` if given, else the promoted dtype of `args`, made inexact
    (integers promote with f32), as `flax.nnx.nn.dtypes.canonicalize_dtype` does."""
    if dtype is not None:
        return dtype
    out = jnp.result_type(*(a for a in args if a is not None))
    return out if jnp.issubdtype(out, jnp.inexact) else jnp.promote_types(jnp.float32, out)


def _value(v):
    return None if v is None else v[...]


class LayerNorm(nnx.LayerNorm):
    """Layer normalization on the fused `layer_norm` kernel (Ba et al., 2016).

    y = (x - mean) / sqrt(var + epsilon) * scale + bias, statistics over `reduction_axes`
    (default: last axis), two-pass variance in f32. Same constructor as `flax.nnx.LayerNorm`;
    `use_fast_variance` is accepted and ignored (the variance is always the robust one).
    """

    def __call__(self, x, *, mask: jax.Array | None = None):
        x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        last = (x.ndim - 1,)
        red = _canonical_axes(x.ndim, self.reduction_axes)
        feat = _canonical_axes(x.ndim, self.feature_axes)
        if red == last and feat == last and self.axis_name is None and mask is None:
            return layer_norm(x, scale, bias, epsilon=self.epsilon)
        mean, var = _stats(x, red, self.dtype, self.axis_name, self.axis_index_groups, use_mean=True, mask=mask)
        return _normalize(x, mean, var, scale, bias, red, feat, self.dtype, self.epsilon)


class RMSNorm(nnx.RMSNorm):
    """RMS normalization on the fused `rms_norm` kernel (Zhang & Sennrich, 2019).

    y = x / sqrt(mean(x^2) + epsilon) * scale, statistics over `reduction_axes` (default: last
    axis) in f32. Same constructor as `flax.nnx.RMSNorm`.
    """

    def __call__(self, x, mask: jax.Array | None = None):
        x, scale = self.promote_dtype((x, _value(self.scale)), dtype=self.dtype)
        last = (x.ndim - 1,)
        red = _canonical_axes(x.ndim, self.reduction_axes)
        feat = _canonical_axes(x.ndim, self.feature_axes)
        if red == last and feat == last and self.axis_name is None and mask is None:
            return rms_norm(x, scale, epsilon=self.epsilon)
        mean, var = _stats(x, red, self.dtype, self.axis_name, self.axis_index_groups, use_mean=False, mask=mask)
        return _normalize(x, mean, var, scale, None, red, feat, self.dtype, self.epsilon)


class BatchNorm(nnx.BatchNorm):
    """Batch normalization on the one-pass `batch_norm` kernels (Ioffe & Szegedy, 2015).

    Training (`use_running_average=False`): y = (x - mean_B) / sqrt(var_B + epsilon) * scale + bias
    with the batch statistics over all axes but `axis` (biased variance, robust), and
    ra_mean <- momentum * ra_mean + (1 - momentum) * mean_B (same for var), exactly as flax.
    Eval: the running statistics replace the batch ones. `axis_name` averages the statistics
    across devices with `lax.pmean`. Same constructor as `flax.nnx.BatchNorm`;
    `use_fast_variance` is accepted and ignored.
    """

    def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        # The call's argument wins over the module's attribute, as in flax (its `first_from`).
        use_running_average = next((v for v in (use_running_average, self.use_running_average) if v is not None), None)
        if use_running_average is None:
            raise ValueError(
                "No `use_running_average` argument was provided to BatchNorm: pass it to the "
                "constructor or to the call, or use model.train() / model.eval()."
            )
        feat = _canonical_axes(x.ndim, self.axis)
        red = tuple(i for i in range(x.ndim) if i not in feat)
        x, ra_mean, ra_var, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], _value(self.scale), _value(self.bias)), dtype=self.dtype
        )
        if use_running_average:
            return _normalize(x, ra_mean, ra_var, scale, bias, red, feat, self.dtype, self.epsilon)

        if len(feat) != 1 or mask is not None or x.ndim < 2:
            mean, var = _stats(x, red, self.dtype, self.axis_name, self.axis_index_groups, use_mean=True, mask=mask)
            y = _normalize(x, mean, var, scale, bias, red, feat, self.dtype, self.epsilon)
        else:
            # The kernels want the features last; other layouts pay one transpose each way.
            axis = feat[0]
            xt = jnp.moveaxis(x, axis, -1)
            if self.axis_name is None:
                yt, mean, var = batch_norm(xt, scale, bias, epsilon=self.epsilon)
            else:
                mean_d, var_d = batch_norm_stats(xt)
                mean = lax.pmean(mean_d, self.axis_name, axis_index_groups=self.axis_index_groups)
                var = lax.pmean(
                    var_d + jnp.square(mean_d - mean), self.axis_name, axis_index_groups=self.axis_index_groups
                )
                yt = _normalize(
                    xt, mean, var, scale, bias, _all_but_last(xt.ndim), (xt.ndim - 1,), self.dtype, self.epsilon
                )
            y = jnp.moveaxis(yt, -1, axis)

        # Running statistics: no gradient flows into them (flax does the same).
        self.mean[...] = lax.stop_gradient(self.momentum * self.mean[...] + (1 - self.momentum) * mean)
        self.var[...] = lax.stop_gradient(self.momentum * self.var[...] + (1 - self.momentum) * var)
        return y


def _all_but_last(ndim: int) -> tuple[int, ...]:
    return tuple(range(ndim - 1))
