"""Optax's own tests, shipped inside the installed `optax` package, run against our same-named functions.

`tests/optax_names.py` (a pytest plugin) points every Optax name we share (`adam`, `chain`,
`clip_by_global_norm`, `scale_by_rms`, `exponential_decay`, `freeze`, `softmax_cross_entropy`, ...)
at ours. Every Optax test file that mentions one of those names runs twice, in two processes side
by side: with our names, and as shipped (the baseline: a test may fail on this stack with Optax's
own functions, e.g. a tolerance on a new jax). Only failures new against the baseline count, and
each must be one where we deliberately differ, listed with the reason (README, "Compared with
Optax"). The tests skipped must be the same in both runs: Optax skips some when an optimizer's
signature does not look like its own (its `learning_rate` annotation), which would hide them.
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
from optax_names import NAMES  # noqa: E402  (the names the plugin points at ours)


def _files_reaching_our_names() -> list[str]:
    names = re.compile(r"\b(" + "|".join(map(re.escape, NAMES)) + r")\b")
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
        module = case.get("classname", "").replace(".", "/")
        rel = module.split("optax/", 1)[-1].rsplit("/", 1)
        name = f"{rel[0]}.py::{rel[1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.add(name)
        elif case.find("skipped") is not None:
            skipped.add(name)
    return failed, skipped


def _start(tmp_path: Path, label: str, plugin: bool) -> tuple[subprocess.Popen, Path]:
    junit = tmp_path / f"{label}.xml"
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    args += ["-p", "optax_names"] if plugin else []
    # One process per run, a fixed order: some of Optax's tests assert on warnings that other tests
    # of the same process may already have triggered, so a run must not depend on scheduling.
    args += [f"--junitxml={junit}", "-o", "addopts=", *[str(OPTAX / f) for f in FILES]]
    log = open(tmp_path / f"{label}.log", "w")  # noqa: SIM115  (closed when the process is waited for)
    env = {**_env(), "PYTHONPATH": str(HERE)}
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, text=True), junit


@pytest.mark.slow
def test_optax_suite_passes_with_our_names(tmp_path):
    assert len(FILES) >= 25, FILES  # 32 with optax 0.2.8: Optax's tests moved or our names vanished?
    ours, ours_junit = _start(tmp_path, "ours", plugin=True)
    theirs, theirs_junit = _start(tmp_path, "baseline", plugin=False)
    for process in (ours, theirs):
        process.wait(timeout=1500)
    for junit, label in ((ours_junit, "ours"), (theirs_junit, "baseline")):
        assert junit.exists(), (tmp_path / f"{label}.log").read_text()[-4000:]
    failed, skipped = _results(ours_junit)
    baseline_failed, baseline_skipped = _results(theirs_junit)
    new = failed - baseline_failed
    unexpected = sorted(new - set(ALLOWED))
    assert not unexpected, (unexpected, (tmp_path / "ours.log").read_text()[-6000:])
    stale = sorted(set(ALLOWED) - new)
    assert not stale, f"these now pass (or fail with Optax's own functions too): remove them from ALLOWED: {stale}"
    assert skipped == baseline_skipped, (
        f"skipped with our names only: {sorted(skipped - baseline_skipped)[:10]}; "
        f"skipped with Optax's only: {sorted(baseline_skipped - skipped)[:10]}"
    )


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
