"""Optax's own tests, shipped inside the installed `optax` package, run against our same-named functions.

`tests/optax_names.py` (a pytest plugin) points every Optax name we share (`adam`, `chain`,
`clip_by_global_norm`, `scale_by_rms`, `exponential_decay`, `freeze`, `softmax_cross_entropy`, ...)
at ours. Every Optax test file that mentions one of those names runs with our names; then the
tests that failed or were skipped there run again as shipped (the baseline: a test may fail on
this stack with Optax's own functions, e.g. a tolerance on a new jax). Only failures new against
the baseline count, and each must be one where we deliberately differ, listed with the reason
(README, "Compared with Optax"). A test skipped with our names must be skipped as shipped too:
Optax skips some when an optimizer's signature does not look like its own (its `learning_rate`
annotation), which would hide them. (The baseline runs only those tests, not the whole suite a
second time: the same verdicts for an eighth of the time.)
"""

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import optax
import pytest

HERE = Path(__file__).resolve().parent
OPTAX = Path(optax.__file__).resolve().parent
sys.path.insert(0, str(HERE))
from optax_names import CONTRIB_NAMES, NAMES  # noqa: E402  (the names the plugin points at ours)


def _files_reaching_our_names() -> list[str]:
    names = re.compile(r"\b(" + "|".join(map(re.escape, NAMES + CONTRIB_NAMES)) + r")\b")
    return sorted(
        str(f.relative_to(OPTAX)) for f in OPTAX.rglob("*_test.py") if names.search(f.read_text(encoding="utf-8"))
    )


FILES = _files_reaching_our_names()

# test id (file::class::test, parameter suffix included) -> why we differ on purpose.
ALLOWED = {
    "_src/transform_test.py::TransformTest::test_lion_invalid_mode_raises": (
        "an invalid mode raises at construction (scale_by_lion(mode='x')), not at the first update"
    ),
    "schedules/_schedule_test.py::ExponentialTest::test_nonvalid_decay_rate0": (
        "decay_rate=0 is an error, not a silent constant schedule"
    ),
    "schedules/_schedule_test.py::ExponentialTest::test_nonvalid_decay_rate1": (
        "decay_rate=0 is an error, not a silent constant schedule"
    ),
    "schedules/_schedule_test.py::ExponentialTest::test_nonvalid_transition_steps0": (
        "transition_steps <= 0 is an error, not a silent constant schedule"
    ),
    "schedules/_schedule_test.py::ExponentialTest::test_nonvalid_transition_steps1": (
        "transition_steps <= 0 is an error, not a silent constant schedule"
    ),
    "schedules/_schedule_test.py::PolynomialTest::test_zero_steps_schedule": (
        "transition_steps <= 0 is an error, not a silent constant schedule"
    ),
}


def _results(junit: Path) -> tuple[set[str], set[str]]:
    """(failed, skipped) test ids of a junit file."""
    failed, skipped = set(), set()
    for case in ET.parse(junit).getroot().iter("testcase"):
        parts = case.get("classname", "").replace(".", "/").split("optax/", 1)[-1].split("/")
        # The longest prefix that is a test file; what follows is the class (none for a function).
        cut = max(i for i in range(1, len(parts) + 1) if (OPTAX / "/".join(parts[:i])).with_suffix(".py").is_file())
        name = "::".join(["/".join(parts[:cut]) + ".py", *parts[cut:], case.get("name")])
        if case.find("failure") is not None or case.find("error") is not None:
            failed.add(name)
        elif case.find("skipped") is not None:
            skipped.add(name)
    return failed, skipped


def _node_id(test_id: str) -> str:
    """The pytest node id (absolute path) of a `_results` test id."""
    file, rest = test_id.split("::", 1)
    return f"{OPTAX / file}::{rest}"


def _run(tmp_path: Path, label: str, plugin: bool, tests: list[str]) -> Path:
    junit = tmp_path / f"{label}.xml"
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    args += ["-p", "optax_names"] if plugin else []
    # One process per run, a fixed order: some of Optax's tests assert on warnings that other tests
    # of the same process may already have triggered, so a run must not depend on scheduling.
    args += [f"--junitxml={junit}", "-o", "addopts=", "-o", "junit_family=xunit1", *tests]
    env = {**_env(), "PYTHONPATH": str(HERE)}
    with open(tmp_path / f"{label}.log", "w") as log:
        subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, text=True, timeout=1500)
    assert junit.exists(), (tmp_path / f"{label}.log").read_text()[-4000:]
    return junit


@pytest.mark.slow
def test_optax_suite_passes_with_our_names(tmp_path):
    assert len(FILES) >= 25, FILES  # 33 with optax 0.2.8: Optax's tests moved or our names vanished?
    failed, skipped = _results(_run(tmp_path, "ours", True, [str(OPTAX / f) for f in FILES]))
    again = sorted(failed | skipped)
    baseline_failed, baseline_skipped = _results(_run(tmp_path, "baseline", False, [_node_id(t) for t in again]))
    assert baseline_failed | baseline_skipped <= set(again), "the baseline ran tests it was not asked for"
    new = failed - baseline_failed
    unexpected = sorted(new - set(ALLOWED))
    assert not unexpected, (unexpected, (tmp_path / "ours.log").read_text()[-6000:])
    stale = sorted(set(ALLOWED) - new)
    assert not stale, f"these now pass (or fail with Optax's own functions too): remove them from ALLOWED: {stale}"
    assert skipped <= baseline_skipped, f"skipped with our names only: {sorted(skipped - baseline_skipped)[:10]}"


def _env():
    import os

    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def test_reading_our_names_leaves_optax_alone():
    # This module imports tests/optax_names.py for NAMES; only the plugin hook may patch Optax.
    import optax_ext as ox

    assert len(NAMES) >= 30 and "adamw" in NAMES and "scale" in NAMES
    assert optax.adamw is not ox.adamw and optax.scale is not ox.scale
