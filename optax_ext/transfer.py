r"""Transfer learning: parameters labelled by path, frozen backbones, discriminative learning rates,
and loading pretrained weights.

Fine-tuning starts from pretrained weights, :math:`\theta_0 = \theta_{pre}`, and then
trains with a different treatment per group of parameters: a frozen backbone, a head with a larger
learning rate, or learning rates that decay with depth (ULMFiT's discriminative fine-tuning,
BEiT/ELECTRA's layer-wise decay). Groups are chosen by regular expressions over a parameter's *path*:
the keys from the root of the parameter tree joined with "/", e.g. ``"backbone/layers/0/kernel"``
for `nnx.state(model, nnx.Param)` (a Flax NNX `Variable` ends the path; its `.value` is not a
component) or for a plain nested dict. Patterns are matched with `re.search`, so
``"backbone"`` matches every path containing it and ``r"^head/"`` anchors at the root.

The group of each parameter is computed from the tree that the optimizer is given, at `init` and
at every `update`: so the same optimizer works on `nnx.state(model, nnx.Param)` (Variables),
on its pure-array form (what `nnx.Optimizer.update` passes), and on plain dicts.

References:
  Howard & Ruder, *Universal Language Model Fine-tuning for Text Classification* (ULMFiT), 2018;
  Clark et al., *ELECTRA*, ICLR 2020 (layer-wise learning-rate decay);
  Bao et al., *BEiT: BERT Pre-Training of Image Transformers*, ICLR 2022.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext import _validate as check
from optax_ext.fusion import PerLeaf, Rule, fusable
from optax_ext.transforms._common import mask_leaves, per_leaf_tree

__all__ = [
    "fine_tune",
    "freeze",
    "label_fn",
    "label_params",
    "layerwise_lr_decay",
    "layerwise_multipliers",
    "load_pretrained",
    "match_by_path",
    "named_leaves",
    "partition_by_path",
    "path_str",
]


# --------------------------------------------------------------------------------- paths


def _is_variable(x) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency, but keep plain pytrees working
        return False
    return isinstance(x, nnx.Variable)


def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)  # pragma: no cover - future key types


def path_str(keypath) -> str:
    """A JAX key path as ``"a/b/0/kernel"`` (dict keys, sequence indices and attribute names)."""
    return "/".join(_key_name(k) for k in keypath)


def named_leaves(tree) -> list[tuple[str, Any]]:
    """`[(path, array)]` for every array leaf of `tree`, in `jax.tree.leaves(tree)` order.

    A Flax NNX `Variable` is unwrapped: its value's path is the Variable's path (no ``/value``), so
    `nnx.state(model)`, its pure form and `nnx.to_pure_dict(state)` give the same paths.
    """
    out = []
    for kp, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]:
        if _is_variable(node):
            for sub_kp, leaf in jax.tree_util.tree_flatten_with_path(node.get_value())[0]:
                out.append((path_str(tuple(kp) + tuple(sub_kp)), leaf))
        else:
            out.append((path_str(kp), node))
    return out


def _map_labelled_nodes(fn: Callable[[str], Any], params):
    """A tree shaped like `params` down to its array leaves or NNX Variables, `fn(path)` at each."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: fn(path_str(kp)), params, is_leaf=_is_variable)


# --------------------------------------------------------------------------------- labels


def _compile_rules(rules, fn_name: str) -> list[tuple[re.Pattern, Any]]:
    """Rules as an ordered list of (compiled regex, label); the first match wins."""
    if isinstance(rules, Mapping):
        items = [(pattern, label) for label, pattern in rules.items()]
        # {label: pattern} or {label: [patterns]}
        flat = []
        for pattern, label in items:
            patterns = [pattern] if isinstance(pattern, (str, re.Pattern)) else list(pattern)
            flat.extend((p, label) for p in patterns)
        items = flat
    elif isinstance(rules, Iterable) and not isinstance(rules, (str, bytes)):
        items = list(rules)
        for i, item in enumerate(items):
            if not (isinstance(item, tuple) and len(item) == 2):
                raise TypeError(f"{fn_name}: rules[{i}] must be a (regex, label) pair, got {item!r}.")
    else:
        raise TypeError(
            f"{fn_name}: rules must be a dict {{label: regex}} or a list of (regex, label) pairs, "
            f"got {type(rules).__name__}: {rules!r}."
        )
    out = []
    for pattern, label in items:
        try:
            out.append((re.compile(pattern), label))
        except (re.error, TypeError) as e:
            raise ValueError(f"{fn_name}: invalid regular expression {pattern!r} for label {label!r}: {e}") from None
    return out


_NO_DEFAULT = object()


def label_fn(rules, default=_NO_DEFAULT) -> Callable[[Any], Any]:
    """A function `params -> labels` for `optax.partition` (or `optax.multi_transform`).

    `rules` is a dict ``{label: regex}`` (a label may map to a list of regexes) or a list of
    ``(regex, label)`` pairs; each parameter gets the label of the first rule whose regex
    `re.search`-matches its path, else `default`. Without a default, an unmatched path raises a
    `ValueError` naming it. The labels tree has the structure of `params` down to the array leaves
    (or NNX Variables, which it replaces), a prefix of `params` as `optax.partition` accepts.

    Passing the function (rather than a fixed tree) to `optax.partition` lets the optimizer work on
    any form of the same parameters (NNX State with Variables, its pure form, a dict).
    """
    compiled = _compile_rules(rules, "label_fn")
    if any(label is None for _, label in compiled) or default is None:
        raise ValueError(
            "label_fn: labels must not be None (None is an empty pytree, the labels tree would lose "
            "leaves); use a string, a number or a bool."
        )

    def label_of(path: str):
        for regex, label in compiled:
            if regex.search(path):
                return label
        if default is _NO_DEFAULT:
            raise ValueError(
                f"label_params: parameter {path!r} matches no rule "
                f"({[r.pattern for r, _ in compiled]}) and no default label was given."
            )
        return default

    return lambda params: _map_labelled_nodes(label_of, params)


def label_params(params, rules, default=_NO_DEFAULT):
    """The labels tree of `params` by path (see :func:`label_fn`), for `optax.partition(transforms, labels)`.

    Example:
      >>> labels = label_params(nnx.state(model, nnx.Param), {"backbone": r"^backbone/", "head": r"^head/"})
    """
    return label_fn(rules, default)(params)


def partition_by_path(
    transforms: Mapping[Any, optax.GradientTransformation], rules, default=_NO_DEFAULT
) -> optax.GradientTransformation:
    """`optax.partition(transforms, label_fn(rules, default))`: one transformation per group of paths."""
    return optax.partition(dict(transforms), label_fn(rules, default))


# --------------------------------------------------------------------------------- freeze


def _patterns(patterns, fn_name: str, arg: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    try:
        return [re.compile(p) for p in patterns]
    except (re.error, TypeError) as e:
        raise ValueError(f"{fn_name}: {arg} must be regular expressions, got {patterns!r}: {e}") from None


class _Keep(NamedTuple):
    keep: Any  # PerLeaf: 1.0 where the leaf trains, 0.0 where it is frozen


def freeze(mask) -> optax.GradientTransformation:
    r"""Zero the updates of frozen parameters: :math:`u \leftarrow 0` where frozen.

    `mask` is what `optax.freeze` takes, with the same state (`optax.MaskedState(EmptyState())`):
    a bool (freeze everything or nothing), or a tree of bools (True = frozen) with the structure
    of the params or a prefix of it. Or, our addition, regular expressions (a string or a list of
    strings) matched against each parameter's path ("backbone/conv1/kernel", see
    `optax_ext.label_params`); that form needs `params` in `update` and keeps `optax.EmptyState()`.

    Frozen parameters stay bit-identical (:math:`\theta + 0 = \theta`). Place it *last* in a chain
    (after the learning rate and any weight decay), so that nothing after it moves the frozen
    parameters; the optimizer before it still keeps (useless) moments for them. To save that memory,
    use :func:`fine_tune`, which gives the frozen group `optax.set_to_zero()` and no state.
    Fusable: it is one per-element select.

    Example:
      >>> tx = ox.chain(ox.adam(1e-3), freeze(r"^backbone/"))
      >>> tx = ox.chain(ox.adam(1e-3), freeze({"backbone": True, "head": False}))
    """

    def element(g, p, slots, s: _Keep):
        return jnp.where(s.keep > 0.5, g, jnp.zeros_like(g)), ()

    if isinstance(mask, str) or (isinstance(mask, (list, tuple)) and mask and all(isinstance(m, str) for m in mask)):
        compiled = _patterns(mask, "freeze", "mask")

        def scalars(state, updates, params):
            keep = [0.0 if any(r.search(path) for r in compiled) else 1.0 for path, _ in named_leaves(params)]
            return _Keep(keep=PerLeaf(per_leaf_tree(params, keep)))

        # needs_params: the mask is built from the parameters' paths.
        return fusable(
            lambda params: optax.EmptyState(),
            Rule(
                "freeze",
                optax.EmptyState,
                (),
                scalars,
                element,
                lambda st, sl: st,
                needs_params=True,
                scalars_type=_Keep,
            ),
        )

    def masked_scalars(state, updates, params):
        frozen = mask_leaves(mask, updates)
        return _Keep(keep=PerLeaf(per_leaf_tree(updates, [jnp.where(f, 0.0, 1.0) for f in frozen])))

    return fusable(
        lambda params: optax.MaskedState(inner_state=optax.EmptyState()),
        Rule("freeze", optax.MaskedState, (), masked_scalars, element, lambda st, sl: st, scalars_type=_Keep),
    )


def fine_tune(
    optimizer: optax.GradientTransformation, frozen=None, head=None, head_lr_mult: float = 10.0
) -> optax.GradientTransformation:
    r"""Fine-tuning optimizer: frozen parameters get exactly zero updates, the head a larger step.

    Parameters whose path matches `frozen` get `optax.set_to_zero()` (no optimizer state, updates
    exactly 0: bit-identical after any number of steps); those matching `head` get `optimizer`
    followed by `scale(head_lr_mult)`, the others `optimizer`. For the usual optimizers
    (:math:`u = -\eta\,d(g, \theta)`, weight decay included) scaling the update is scaling the
    learning rate, :math:`\eta_{head} = m\,\eta`. Frozen wins over head when both match.
    Built on `optax.partition`: each group has its own optimizer state.

    References:
      Yosinski et al., *How transferable are features in deep neural networks?*, NeurIPS 2014;
      Howard & Ruder, *ULMFiT*, 2018.
    """
    head_lr_mult = check.positive("fine_tune", "head_lr_mult", head_lr_mult)
    frozen_re = _patterns(frozen, "fine_tune", "frozen")
    head_re = _patterns(head, "fine_tune", "head")

    def label_of(path):
        if any(r.search(path) for r in frozen_re):
            return "frozen"
        if any(r.search(path) for r in head_re):
            return "head"
        return "body"

    transforms = {
        "frozen": optax.set_to_zero(),
        "body": optimizer,
        "head": optax.chain(optimizer, optax.scale(head_lr_mult)),
    }
    return optax.partition(transforms, lambda params: _map_labelled_nodes(label_of, params))


# --------------------------------------------------------------------------------- layer-wise decay


def _layer_labeller(num_layers: int, layer_of: Callable[[str], int], fn_name: str):
    def label_of(path):
        i = layer_of(path)
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= num_layers:
            raise ValueError(
                f"{fn_name}: layer_of({path!r}) must return an int in [0, num_layers={num_layers}], got {i!r}."
            )
        return i

    return label_of


def _check_layers(fn_name, num_layers, decay, layer_of):
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"{fn_name}: num_layers must be an int >= 0, got {num_layers!r}.")
    decay = check.positive(fn_name, "decay", decay)
    if not callable(layer_of):
        raise TypeError(f"{fn_name}: layer_of must be a function path -> layer index, got {layer_of!r}.")


def layerwise_multipliers(params, num_layers: int, decay: float, *, layer_of: Callable[[str], int]):
    r"""The learning-rate multiplier of each parameter, :math:`\text{decay}^{L - i}` with
    :math:`i` = `layer_of(path)` and :math:`L` = `num_layers` (a tree shaped like `params` down to
    its leaves or NNX Variables). What :func:`layerwise_lr_decay` applies."""
    _check_layers("layerwise_multipliers", num_layers, decay, layer_of)
    label_of = _layer_labeller(num_layers, layer_of, "layerwise_multipliers")
    return _map_labelled_nodes(lambda path: float(decay) ** (num_layers - label_of(path)), params)


def layerwise_lr_decay(
    optimizer_factory: Callable[[Any], optax.GradientTransformation],
    num_layers: int,
    decay: float,
    *,
    layer_of: Callable[[str], int],
    base_lr,
) -> optax.GradientTransformation:
    r"""Discriminative (layer-wise decayed) learning rates: layer :math:`i` trains with
    :math:`\eta_i = \eta\,\text{decay}^{L - i}`, :math:`L` = `num_layers`.

    `layer_of(path) -> i` in :math:`[0, L]` places each parameter (by its path); layer :math:`L`
    (usually the head) keeps the base rate, the input side the smallest. Group :math:`i` gets
    `optimizer_factory(base_lr * decay ** (L - i))`, combined with `optax.partition`. `base_lr` may
    be a schedule (`step -> lr`): each group then gets the scaled schedule.

    Example (a backbone of 4 blocks ``layers/0..3`` under an embedding and a head):
      >>> def layer_of(path):
      ...     m = re.search(r"layers/(\d+)/", path)
      ...     return int(m.group(1)) + 1 if m else (0 if path.startswith("embed") else 5)
      >>> tx = layerwise_lr_decay(lambda lr: ox.adamw(lr), 5, 0.75, layer_of=layer_of, base_lr=1e-3)

    References:
      Howard & Ruder, *ULMFiT*, 2018 (discriminative fine-tuning);
      Clark et al., *ELECTRA*, ICLR 2020; Bao et al., *BEiT*, ICLR 2022 (layer-wise decay).
    """
    _check_layers("layerwise_lr_decay", num_layers, decay, layer_of)
    if not callable(optimizer_factory):
        raise TypeError(
            f"layerwise_lr_decay: optimizer_factory must be a function lr -> GradientTransformation, "
            f"got {optimizer_factory!r}."
        )
    if not callable(base_lr):
        base_lr = check.non_negative("layerwise_lr_decay", "base_lr", base_lr)

    def lr_for(i):
        mult = float(decay) ** (num_layers - i)
        if callable(base_lr):
            return lambda count: base_lr(count) * mult
        return base_lr * mult

    transforms = {i: optimizer_factory(lr_for(i)) for i in range(num_layers + 1)}
    label_of = _layer_labeller(num_layers, layer_of, "layerwise_lr_decay")
    return optax.partition(transforms, lambda params: _map_labelled_nodes(label_of, params))


# --------------------------------------------------------------------------------- pretrained weights


def _restore_checkpoint(path):
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError(
            "load_pretrained: loading a checkpoint directory needs orbax-checkpoint "
            "(pip install orbax-checkpoint); or pass the pretrained pytree itself."
        ) from None
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise ValueError(f"load_pretrained: pretrained={path!r} is not a checkpoint directory.")
    return ocp.StandardCheckpointer().restore(path)


def match_by_path(
    target,
    source,
    fn_name: str,
    *,
    strict: bool = True,
    target_name: str = "model",
    source_name: str = "pretrained",
    allow_unexpected: bool = False,
    skipped: list | None = None,
) -> list:
    """The arrays of `source` in the leaf order of `target`, matched by path, shapes checked.

    Raises one `ValueError` listing every path whose shapes differ (with both shapes) and, when
    `strict`, every path missing from `source` and every unexpected one (unless
    `allow_unexpected`). Without `strict`, a missing path gives `None` in the returned list. With a
    `skipped` list, a shape mismatch is not an error either: it gives `None`, and a line describing
    each path left out (mismatched, missing, unexpected) is appended to `skipped`.
    """
    target_named = named_leaves(target)
    source_map = dict(named_leaves(source))
    target_paths = {path for path, _ in target_named}
    problems = []
    out = []
    for path, t in target_named:
        if path not in source_map:
            line = f"  missing in {source_name}: {path} ({target_name} shape {tuple(jnp.shape(t))})"
            if strict:
                problems.append(line)
            elif skipped is not None:
                skipped.append(line)
            out.append(None)
            continue
        s = source_map[path]
        if tuple(jnp.shape(s)) != tuple(jnp.shape(t)):
            line = (
                f"  shape mismatch at {path}: {target_name} {tuple(jnp.shape(t))}, {source_name} {tuple(jnp.shape(s))}"
            )
            if skipped is None:
                problems.append(line)
            else:
                skipped.append(line)
                s = None
        out.append(s)
    if not allow_unexpected:
        for path, s in source_map.items():
            if path not in target_paths:
                line = f"  unexpected in {source_name}: {path} (shape {tuple(jnp.shape(s))})"
                if strict:
                    problems.append(line)
                elif skipped is not None:
                    skipped.append(line)
    if problems:
        raise ValueError(
            f"{fn_name}: {source_name} does not match {target_name} "
            f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n" + "\n".join(problems)
        )
    return out


def _cast_like(value, like):
    """`value` as a new array of `like`'s dtype. Always a copy: a training step that donates the
    loaded model's buffers must not delete the pretrained source's arrays with them."""
    dtype = getattr(like, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return value
    return jnp.array(value, dtype, copy=True)


def load_pretrained(model_or_state, pretrained, strict: bool = True):
    r"""Load pretrained weights, :math:`\theta_0 = \theta_{pre}`, matching by path.

    Args:
      model_or_state: a Flax NNX module (updated in place with `nnx.update`, and returned), or a
        pytree (an `nnx.State`, a nested dict): a new tree with the loaded values is returned, the
        input untouched. For a module, all its variables but its RNG state are targets (parameters
        and, e.g., batch statistics); load into a submodule (`model.backbone`) to load part of a
        model. RNG state (`nnx.RngState`) is neither loaded nor required.
      pretrained: a pytree of arrays (an `nnx.State`, `nnx.to_pure_dict(...)`, a nested dict), or
        the path of an Orbax checkpoint directory (needs `orbax-checkpoint`).
      strict: when True, paths of the target missing from `pretrained`, paths of `pretrained`
        absent from the target and shape mismatches are errors (one error listing them all). When
        False they are skipped (the target keeps its value: a new classifier head, a resized
        vocabulary) and listed in one `UserWarning`.

    Values are cast to the target's dtype and copied (the pretrained arrays stay valid when the
    training step donates the model's buffers). Errors name every mismatched path with both shapes.
    """
    if isinstance(pretrained, (str, os.PathLike)):
        pretrained = _restore_checkpoint(pretrained)
    try:
        from flax import nnx

        is_module = isinstance(model_or_state, nnx.Module)
    except ImportError:  # pragma: no cover
        is_module = False
    if is_module:
        # RNG streams are the model's own: neither loaded nor required.
        no_rng = nnx.Not(nnx.RngState)
        target = nnx.state(model_or_state, no_rng)
        if isinstance(pretrained, nnx.State):
            pretrained = nnx.filter_state(pretrained, no_rng)
    else:
        target = model_or_state
    skipped: list[str] | None = None if strict else []
    source = match_by_path(target, pretrained, "load_pretrained", strict=strict, skipped=skipped)
    if skipped:
        warnings.warn(
            f"load_pretrained(strict=False): {len(skipped)} path{'s' if len(skipped) > 1 else ''} not loaded "
            "(the model keeps its own values there):\n" + "\n".join(skipped),
            stacklevel=2,
        )
    t_leaves, treedef = jax.tree.flatten(target)
    new_leaves = [t if s is None else _cast_like(s, t) for t, s in zip(t_leaves, source)]
    new_state = treedef.unflatten(new_leaves)
    if is_module:
        nnx.update(model_or_state, new_state)
        return model_or_state
    return new_state
