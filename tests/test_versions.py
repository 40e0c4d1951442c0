"""The supported range in pyproject.toml is what CI tests: its lower bounds are the oldest stack's pins
(.ci/oldest-constraints.txt), and the installed dependencies lie inside it."""

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CORE = ["jax", "jaxlib", "optax", "flax", "chex", "numpy", "orbax-checkpoint"]


def _requirements() -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return {r.name: r for r in map(Requirement, reqs)}


def _lower_bound(req: Requirement) -> Version:
    bounds = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert len(bounds) == 1, f"{req}: expected exactly one '>=' bound"
    return bounds[0]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / ".ci" / "oldest-constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line).groups()
            pins[name] = Version(version)
    return pins


def test_oldest_stack_pins_every_lower_bound():
    reqs, pins = _requirements(), _pins()
    assert set(pins) == set(CORE), (sorted(pins), CORE)
    for name in CORE:
        assert pins[name] == _lower_bound(reqs[name]), (
            f"{name}: .ci/oldest-constraints.txt pins {pins[name]}, pyproject's lower bound is {reqs[name]}"
        )


@pytest.mark.parametrize("name", CORE)
def test_installed_version_is_in_the_supported_range(name):
    installed = metadata.version(name)
    assert _requirements()[name].specifier.contains(installed, prereleases=True), (name, installed)


def test_ranges_admit_the_newest_jax_series():
    # jax 0.12 is the newest series CI tests; the range must neither stop below it nor reach past it.
    spec = _requirements()["jax"].specifier
    assert spec.contains("0.12.0.1") and spec.contains("0.10.2") and not spec.contains("0.13.0")
