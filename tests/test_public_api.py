"""The public API is flat, complete and documented."""

import inspect

import optax

import optax_ext as ox


def test_every_public_name_exists_and_has_a_docstring():
    missing = [n for n in ox.__all__ if not hasattr(ox, n)]
    assert not missing, missing
    undocumented = [n for n in ox.__all__ if not inspect.getdoc(getattr(ox, n))]
    assert not undocumented, undocumented


def test_transformation_docstrings_give_a_reference():
    factories = [
        n
        for n in ox.__all__
        if n.startswith(("scale_by_", "clip", "add_", "decoupled"))
        or n
        in (
            "sgd",
            "rmsprop",
            "adam",
            "adamw",
            "nadam",
            "adabelief",
            "yogi",
            "lion",
            "amsgrad",
            "adafactor",
            "lars",
            "lamb",
        )
    ]
    no_formula = [n for n in factories if ":math:" not in (getattr(ox, n).__doc__ or "")]
    assert not no_formula, no_formula
    optimizers = [
        "sgd",
        "rmsprop",
        "adam",
        "adamw",
        "nadam",
        "adabelief",
        "yogi",
        "lion",
        "amsgrad",
        "adafactor",
        "lars",
        "lamb",
    ]
    no_ref = [n for n in optimizers if "References" not in getattr(ox, n).__doc__]
    assert not no_ref, no_ref


def test_optimizers_take_optax_argument_names_and_defaults():
    for name in [
        "sgd",
        "rmsprop",
        "adam",
        "adamw",
        "nadam",
        "adabelief",
        "yogi",
        "lion",
        "amsgrad",
        "adafactor",
        "lars",
        "lamb",
    ]:
        ours = inspect.signature(getattr(ox, name)).parameters
        theirs = inspect.signature(getattr(optax, name)).parameters
        for arg, p in theirs.items():
            assert arg in ours, f"{name} lacks optax's argument {arg!r}"
            if p.default is not inspect.Parameter.empty and arg in ours:
                assert ours[arg].default == p.default or (arg == "dtype_momentum"), (
                    name,
                    arg,
                    ours[arg].default,
                    p.default,
                )


def _shared_names():
    """Every public name of ours that Optax also has (same name: same meaning)."""
    return [
        n
        for n in ox.__all__
        if hasattr(optax, n)
        and callable(getattr(ox, n))
        and not inspect.isclass(getattr(ox, n))
        and not inspect.ismodule(getattr(ox, n))
    ]


def test_every_shared_name_takes_optax_positional_order():
    # Optax's positional parameters come first, in Optax's order, with Optax's defaults; ours are
    # keyword-only after them, so `scale_by_rms(0.9, 1e-8, 0.5)` means what it means in Optax.
    shared = _shared_names()
    assert {"scale_by_rms", "exponential_decay", "softmax_cross_entropy", "freeze", "adam"} <= set(shared)
    for name in shared:
        ours = inspect.signature(getattr(ox, name)).parameters.values()
        theirs = inspect.signature(getattr(optax, name)).parameters.values()
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        p_ours = [p for p in ours if p.kind in positional]
        p_theirs = [p for p in theirs if p.kind in positional]
        assert [p.name for p in p_ours] == [p.name for p in p_theirs], (name, p_ours, p_theirs)
        for a, b in zip(p_ours, p_theirs):
            if b.default is not inspect.Parameter.empty:
                assert (
                    a.default == b.default
                    or (a.name == "dtype_momentum" and str(a.default) == "float32")
                    or (a.name == "decay_rate_fn")
                    # lbfgs's default line search: an instance built at import, so compare what it is.
                    or (a.name == "linesearch" and a.default.update.__qualname__ == b.default.update.__qualname__)
                ), (name, a.name, a.default, b.default)
        if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in theirs):
            assert any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in ours), name


def _optax_optimizers() -> list[str]:
    """Every optimizer defined in Optax's alias.py, and the optax.contrib ones we provide."""
    from optax._src import alias

    names = [n for n, f in vars(alias).items() if inspect.isfunction(f) and f.__module__ == alias.__name__]
    names = [n for n in names if not n.startswith("_")]
    return sorted(names) + [
        "adopt",
        "ademamix",
        "simplified_ademamix",
        "prodigy",
        "muon",
        "schedule_free",
        "schedule_free_adamw",
        "schedule_free_sgd",
    ]


def test_every_optax_optimizer_is_here_with_a_reference_and_in_the_readme_table():
    from pathlib import Path

    names = _optax_optimizers()
    assert len(names) >= 29 + 8, names  # optax 0.2.8's alias.py has 29 optimizers
    missing = [n for n in names if not callable(getattr(ox, n, None))]
    assert not missing, missing
    no_ref = [n for n in names if "References" not in (getattr(ox, n).__doc__ or "")]
    assert not no_ref, no_ref
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("| optimizer | reference | runs as |") :].split("\n\n")[0]
    not_listed = [n for n in names if f"`{n}`" not in table]
    assert not not_listed, not_listed


def test_contrib_names_take_optax_contrib_positional_order():
    for name in ox.contrib.__all__:
        if not hasattr(optax.contrib, name) or isinstance(getattr(ox.contrib, name), type):
            continue
        ours = inspect.signature(getattr(ox.contrib, name)).parameters.values()
        theirs = inspect.signature(getattr(optax.contrib, name)).parameters.values()
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        assert [p.name for p in ours if p.kind in positional] == [p.name for p in theirs if p.kind in positional], name
        for a, b in zip([p for p in ours if p.kind in positional], [p for p in theirs if p.kind in positional]):
            if b.default is not inspect.Parameter.empty:
                assert str(a.default) == str(b.default), (name, a.name, a.default, b.default)
        assert getattr(ox, name) is getattr(ox.contrib, name)  # also exported flat


def test_learning_rate_annotated_as_optax_where_optax_takes_a_schedule():
    # Optax's own tests run an optimizer with a schedule only when its learning_rate is annotated
    # `optax.ScalarOrSchedule` (or `Schedule`), the object, not a string: ours must say the same,
    # or those tests skip for ours (tests/test_optax_suite.py fails on tests skipped only with ours).
    from optax._src import base

    wanted = (base.ScalarOrSchedule, base.Schedule)
    for theirs_module, ours_module in ((optax, ox), (optax.contrib, ox.contrib)):
        for name in ours_module.__all__:
            ours, theirs = getattr(ours_module, name), getattr(theirs_module, name, None)
            if theirs is None or isinstance(ours, type) or not callable(ours):
                continue
            try:
                lr_theirs = inspect.signature(theirs).parameters.get("learning_rate")
            except (TypeError, ValueError):
                continue
            if lr_theirs is not None and lr_theirs.annotation in wanted:
                lr_ours = inspect.signature(ours).parameters.get("learning_rate")
                assert lr_ours is not None and lr_ours.annotation == lr_theirs.annotation, (name, lr_ours)
