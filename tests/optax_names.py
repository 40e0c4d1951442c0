"""pytest plugin for Optax's own test files: point Optax's public names at optax_ext's same-named ones.

Loaded with `-p optax_names` (tests/test_optax_suite.py). Every Optax module attribute that *is*
one of Optax's public functions sharing a name with ours (`optax.adam`, `optax._src.alias.adam`,
`optax.transforms._clipping.clip`, ...) is replaced by ours, so the tests exercise our behaviour
wherever they reach those names; likewise `optax.contrib`'s names with `optax_ext.contrib`'s
(`optax.contrib.muon`, `optax.contrib._muon.scale_by_muon`, ...).
"""

import importlib
import pkgutil
import sys

import optax

import optax_ext as ox


def _shared_functions(ours, theirs) -> list[str]:
    """The public functions of module `ours` that module `theirs` has too (no classes, no modules)."""
    return sorted(
        n
        for n in ours.__all__
        if hasattr(theirs, n)
        and callable(getattr(ours, n))
        and not isinstance(getattr(ours, n), type)
        and not hasattr(getattr(ours, n), "__path__")
    )


NAMES = _shared_functions(ox, optax)
CONTRIB_NAMES = _shared_functions(ox.contrib, optax.contrib)


def _patch():
    for module in pkgutil.walk_packages(optax.__path__, "optax."):
        if not module.name.endswith("_test"):
            try:
                importlib.import_module(module.name)
            except Exception:  # noqa: BLE001  optional dependencies of some contrib modules
                pass
    replacements = [(name, getattr(optax, name), getattr(ox, name)) for name in NAMES]
    replacements += [(name, getattr(optax.contrib, name), getattr(ox.contrib, name)) for name in CONTRIB_NAMES]
    for module in list(sys.modules.values()):
        if module is None or not getattr(module, "__name__", "").startswith("optax"):
            continue
        for name, original, ours in replacements:
            if getattr(module, name, None) is original:
                setattr(module, name, ours)


def pytest_configure(config):
    """Patch when loaded as a plugin (`-p optax_names`), not when imported for `NAMES`: importing this
    module must not change Optax for the importing process (tests/test_optax_suite.py reads NAMES)."""
    _patch()
