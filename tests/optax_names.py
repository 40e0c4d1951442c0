"""pytest plugin for Optax's own test files: point Optax's public names at optax_ext's same-named ones.

Loaded with `-p optax_names` (tests/test_optax_suite.py). Every Optax module attribute that *is*
one of Optax's public functions sharing a name with ours (`optax.adam`, `optax._src.alias.adam`,
`optax.transforms._clipping.clip`, ...) is replaced by ours, so the tests exercise our behaviour
wherever they reach those names.
"""

import importlib
import pkgutil
import sys

import optax

import optax_ext as ox

NAMES = sorted(
    n
    for n in ox.__all__
    if hasattr(optax, n)
    and callable(getattr(ox, n))
    and not isinstance(getattr(ox, n), type)
    and not hasattr(getattr(ox, n), "__path__")
)


def _patch():
    for module in pkgutil.walk_packages(optax.__path__, "optax."):
        if not module.name.endswith("_test"):
            try:
                importlib.import_module(module.name)
            except Exception:  # noqa: BLE001  optional dependencies of some contrib modules
                pass
    originals = {name: getattr(optax, name) for name in NAMES}
    for module in list(sys.modules.values()):
        if module is None or not getattr(module, "__name__", "").startswith("optax"):
            continue
        for name, original in originals.items():
            if getattr(module, name, None) is original:
                setattr(module, name, getattr(ox, name))


def pytest_configure(config):
    """Patch when loaded as a plugin (`-p optax_names`), not when imported for `NAMES`: importing this
    module must not change Optax for the importing process (tests/test_optax_suite.py reads NAMES)."""
    _patch()
