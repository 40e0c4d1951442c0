"""The demo trains to > 90% test accuracy on digits and writes its curves."""

import json
import subprocess
import sys

import pytest

from optax_ext import train


@pytest.mark.slow
def test_demo_trains_digits_above_90_percent(tmp_path):
    png = tmp_path / "curves.png"
    out = subprocess.run([sys.executable, "-m", "optax_ext.train", "--epochs", "4", "--json", "--quiet",
                          "--plot", str(png)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["test_accuracy"] > 0.9
    assert png.stat().st_size > 10_000  # a real figure, not an empty file


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(train.OPTIMIZERS))
def test_every_optimizer_learns_with_its_default_learning_rate(optimizer):
    args = train.parse_args(["--optimizer", optimizer, "--epochs", "4", "--warmup-steps", "10", "--quiet",
                             "--plot", ""])
    result = train.train(args)
    # Chance is 10%; four short epochs reach 88-99% depending on the optimizer.
    assert result["test_accuracy"] > 0.85, result


def test_exit_status_is_nonzero_below_min_accuracy():
    # One epoch with a zero learning rate cannot reach 99%: main must report failure.
    status = train.main(["--epochs", "1", "--lr", "0", "--quiet", "--plot", "", "--min-accuracy", "0.99",
                         "--schedule", "constant"])
    assert status == 1


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        train.parse_args(["--lr", "-1"])
