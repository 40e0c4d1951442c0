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
    factories = [n for n in ox.__all__ if n.startswith(("scale_by_", "clip", "add_", "decoupled"))
                 or n in ("sgd", "rmsprop", "adam", "adamw", "nadam", "adabelief", "yogi", "lion", "amsgrad",
                          "adafactor", "lars", "lamb")]
    no_formula = [n for n in factories if ":math:" not in (getattr(ox, n).__doc__ or "")]
    assert not no_formula, no_formula
    optimizers = ["sgd", "rmsprop", "adam", "adamw", "nadam", "adabelief", "yogi", "lion", "amsgrad", "adafactor",
                  "lars", "lamb"]
    no_ref = [n for n in optimizers if "References" not in getattr(ox, n).__doc__]
    assert not no_ref, no_ref


def test_optimizers_take_optax_argument_names_and_defaults():
    for name in ["sgd", "rmsprop", "adam", "adamw", "nadam", "adabelief", "yogi", "lion", "amsgrad", "adafactor",
                 "lars", "lamb"]:
        ours = inspect.signature(getattr(ox, name)).parameters
        theirs = inspect.signature(getattr(optax, name)).parameters
        for arg, p in theirs.items():
            assert arg in ours, f"{name} lacks optax's argument {arg!r}"
            if p.default is not inspect.Parameter.empty and arg in ours:
                assert ours[arg].default == p.default or (arg == "dtype_momentum"), (name, arg, ours[arg].default,
                                                                                    p.default)
