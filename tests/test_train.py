"""The demo trains to > 90% test accuracy on digits and writes its curves; it meets a user's mistakes
with a one-line message and a non-zero exit status, never a traceback."""

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_ext import train

QUICK = ["--epochs", "1", "--warmup-steps", "0", "--quiet", "--plot", ""]


def docstring_examples():
    """The command lines in the module docstring, comments stripped."""
    lines = (line.split("#")[0].strip() for line in train.__doc__.splitlines())
    return [line for line in lines if line.startswith("python -m optax_ext.train")]


def one_line_error(err: str) -> str:
    """The single error line of stderr (argparse prints its usage above it); no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


@pytest.mark.slow
def test_demo_trains_digits_above_90_percent(tmp_path):
    png = tmp_path / "curves.png"
    out = subprocess.run(
        # The default path warns of nothing that jax, flax or optax deprecate.
        [sys.executable, "-W", "error::DeprecationWarning", "-m", "optax_ext.train", "--epochs", "4", "--json"]
        + ["--quiet", "--plot", str(png)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["test_accuracy"] > 0.9
    assert png.stat().st_size > 10_000  # a real figure, not an empty file


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(train.OPTIMIZERS))
def test_every_optimizer_learns_with_its_default_learning_rate(optimizer):
    args = train.parse_args(
        ["--optimizer", optimizer, "--epochs", "4", "--warmup-steps", "10", "--quiet", "--plot", ""]
    )
    result = train.train(args)
    # Chance is 10%; four short epochs reach 88-99% depending on the optimizer.
    assert result["test_accuracy"] > 0.85, result


@pytest.mark.slow
@pytest.mark.parametrize("command", docstring_examples())
def test_docstring_examples_pass_their_own_accuracy_check(command, tmp_path):
    # As a user runs them, in a fresh process (--devices 8 needs jax to start with 8 CPU devices), from
    # a scratch folder (the plots land there), with the default --min-accuracy.
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "optax_ext.train"]
    out = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", *argv[1:]],  # warns of nothing deprecated
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    plot = argv[argv.index("--plot") + 1] if "--plot" in argv else "train_curves.png"
    assert (tmp_path / plot).stat().st_size > 10_000


def test_docstring_has_examples():
    examples = docstring_examples()
    assert len(examples) >= 3 and any("--devices" in e for e in examples), examples


def test_help_shows_every_default_and_each_optimizers_learning_rate(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_:
        train.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in train.build_parser()._actions:
        if action.default is argparse.SUPPRESS:
            continue
        if action.default is None:  # resolved after parsing: the help states the default itself
            assert "(default: " in action.help, action.dest
        else:
            assert f"(default: {action.default})" in text, action.dest
    for name, lr in train.DEFAULT_LR.items():
        assert f"{lr:g} for {name}" in text
    assert f"{train.DEFAULT_LR_OTHERS:g} for the others" in text
    assert f"(default: {train.DEFAULT_WEIGHT_DECAY:g})" in text
    assert f"(default: {train.DEFAULT_WARMUP_STEPS})" in text
    for example in docstring_examples():
        assert example in text


def test_defaults_are_resolved_after_parsing(capsys):
    args = train.parse_args(["--plot", ""])
    assert (args.lr, args.weight_decay, args.warmup_steps) == (
        train.DEFAULT_LR_OTHERS,
        train.DEFAULT_WEIGHT_DECAY,
        train.DEFAULT_WARMUP_STEPS,
    )
    assert train.parse_args(["--optimizer", "lion", "--plot", ""]).lr == train.DEFAULT_LR["lion"]
    assert args.schedule == train.DEFAULT_SCHEDULE_OTHERS == "warmup_cosine"
    # Schedule-free learning keeps the warm-up and drops the decay, unless asked for one.
    assert train.parse_args(["--optimizer", "schedule_free_adamw", "--plot", ""]).schedule == "warmup_constant"
    assert (
        train.parse_args(["--optimizer", "schedule_free_adamw", "--schedule", "cosine", "--plot", ""]).schedule
        == "cosine"
    )
    assert capsys.readouterr().err == ""  # the defaults warn about nothing


BAD_OPTIONS = {
    "batch larger than the training set": (["--batch-size", str(train.train_set_size() + 1)], "training set"),
    "min-accuracy 0": (["--min-accuracy", "0"], "--min-accuracy"),
    "min-accuracy above 1": (["--min-accuracy", "1.5"], "--min-accuracy"),
    "min-accuracy nan": (["--min-accuracy", "nan"], "--min-accuracy"),
    "negative lr": (["--lr", "-1"], "--lr"),
    "negative warm-up": (["--warmup-steps", "-1"], "--warmup-steps"),
    "negative weight decay": (["--weight-decay", "-0.1"], "--weight-decay"),
    "plot not a png": (["--plot", "{tmp}/curves.jpg"], ".png"),
    "plot is a folder": (["--plot", "{tmp}/folder.png"], "is a directory"),
    "plot under a file": (["--plot", "{tmp}/file.txt/curves.png"], "not a folder"),
    "too many devices": (["--devices", "{more_devices}", "--batch-size", "{more_devices}"], "device(s) available"),
    "batch not divisible by devices": (["--devices", "3"], "multiple of --devices"),
    "state dtype for an optimizer without moment dtypes": (
        ["--optimizer", "rmsprop", "--state-dtype", "int8"],
        "--state-dtype",
    ),
    "kahan sum for an optimizer without it": (["--optimizer", "lamb", "--kahan-sum"], "--kahan-sum"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_options_exit_2_with_one_line_before_training(case, tmp_path, capsys, monkeypatch):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file.txt").write_text("not a folder")
    argv, fragment = BAD_OPTIONS[case]
    # Start jax's backends first: asking for more CPU devices then changes nothing in this process.
    more_devices = 2 * jax.device_count()
    argv = [a.format(tmp=tmp_path, more_devices=more_devices) for a in argv]

    def no_training(args):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "train", no_training)
    with pytest.raises(SystemExit) as exit_:
        train.main([*argv, "--quiet"])
    assert exit_.value.code == 2
    assert fragment in one_line_error(capsys.readouterr().err)


def test_plot_in_a_read_only_folder_is_rejected(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Root may write anywhere (CI runs as root): the kernel's answer for an unprivileged user is
        # what os.access would give, so give that answer for this folder.
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != folder and real_access(p, mode, **kw))
    try:
        with pytest.raises(SystemExit) as exit_:
            train.parse_args(["--plot", str(folder / "sub" / "curves.png")])
    finally:
        folder.chmod(0o700)
    assert exit_.value.code == 2
    assert "not writable" in one_line_error(capsys.readouterr().err)


def test_plot_in_new_folders_is_accepted(tmp_path):
    args = train.parse_args(["--plot", str(tmp_path / "a" / "b" / "curves.PNG")])
    assert args.plot == tmp_path / "a" / "b" / "curves.PNG"


def test_bad_option_from_the_command_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "optax_ext.train", "--min-accuracy", "2"],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "--min-accuracy" in one_line_error(out.stderr)


def test_diverging_run_exits_1_with_one_line(capsys):
    status = train.main(["--lr", "1e6", "--epochs", "2", "--quiet", "--plot", ""])
    assert status == 1
    assert "diverged" in one_line_error(capsys.readouterr().err)


def test_exit_status_is_nonzero_below_min_accuracy():
    # One epoch with a zero learning rate cannot reach 99%: main must report failure.
    status = train.main(
        ["--epochs", "1", "--lr", "0", "--quiet", "--plot", "", "--min-accuracy", "0.99", "--schedule", "constant"]
    )
    assert status == 1


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(["--lr", "-1"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("optimizer", sorted(train.OPTIMIZERS))
def test_weight_decay_warns_where_the_optimizer_ignores_it(optimizer, capsys):
    train.parse_args(["--optimizer", optimizer, "--weight-decay", "0.1", "--plot", ""])
    err = capsys.readouterr().err
    if optimizer in train.WEIGHT_DECAY_OPTIMIZERS:
        assert err == ""
    else:
        assert err.count("\n") == 1 and err.startswith("warning: --weight-decay"), err
    train.parse_args(["--optimizer", optimizer, "--weight-decay", "0", "--plot", ""])  # asks for nothing
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("optimizer", sorted(train.OPTIMIZERS))
def test_weight_decay_table_matches_the_optimizers(optimizer):
    # WEIGHT_DECAY_OPTIMIZERS (behind the warning and --help) says which optimizers use their weight decay.
    params = {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8), "b": jnp.linspace(0.5, 1.0, 8)}
    grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
    updates = []
    for wd in (0.0, 0.5):
        tx = train.OPTIMIZERS[optimizer](1e-2, wd)
        updates.append(tx.update(grads, tx.init(params), params)[0])
    # Relative only: Prodigy's first steps are ~1e-10 (its step size starts at 1e-6), decay included.
    uses_wd = any(not np.allclose(a, b, rtol=1e-5, atol=0) for a, b in zip(*map(jax.tree.leaves, updates)))
    assert uses_wd == (optimizer in train.WEIGHT_DECAY_OPTIMIZERS)


@pytest.mark.parametrize("schedule", train.SCHEDULES)
def test_warmup_steps_warn_where_the_schedule_has_no_warmup(schedule, capsys):
    train.parse_args(["--schedule", schedule, "--warmup-steps", "10", "--plot", ""])
    err = capsys.readouterr().err
    if schedule in train.WARMUP_SCHEDULES:
        assert err == ""
    else:
        assert err.count("\n") == 1 and err.startswith("warning: --warmup-steps"), err


def test_warmup_longer_than_the_run_warns(capsys):
    train.parse_args(["--epochs", "1", "--warmup-steps", "1000", "--plot", ""])
    assert capsys.readouterr().err.startswith("warning: --warmup-steps 1000 >=")


def test_train_step_is_compiled_before_the_loop(monkeypatch, caplog):
    # compile_seconds reported apart; nothing compiles once the progress bar runs (its ETA excludes it).
    compiles_before_loop = []
    progress = train._progress

    def counting_progress(total, quiet):
        compiles_before_loop.append(len(caplog.records))
        return progress(total, quiet)

    monkeypatch.setattr(train, "_progress", counting_progress)
    with caplog.at_level("WARNING"), jax.log_compiles():
        result = train.train(train.parse_args(QUICK))
    assert result["compile_seconds"] > 0 and result["seconds"] > 0
    messages = [r.getMessage() for r in caplog.records]
    before, in_loop = messages[: compiles_before_loop[0]], messages[compiles_before_loop[0] :]
    assert any("Compiling jit(train_step)" in m for m in before), before
    assert not [m for m in in_loop if "Compiling" in m], in_loop


def test_plot_that_fails_after_training_exits_1_with_one_line(tmp_path, monkeypatch, capsys):
    def disk_full(history, path, title):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(train, "_plot", disk_full)
    assert train.main([*QUICK[:-1], str(tmp_path / "curves.png"), "--min-accuracy", "0.1"]) == 1
    assert "No space left" in one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------
# Low-memory optimizer states: --state-dtype, --param-dtype, --kahan-sum


def test_state_dtype_optimizers_are_those_with_moment_dtypes():
    # Read from the optimizers' signatures; the brief's list, and sgd through its accumulator_dtype.
    assert set(train.STATE_DTYPE_OPTIMIZERS) == {
        "adopt",
        "muon",
        "adam",
        "adamw",
        "nadam",
        "amsgrad",
        "adabelief",
        "yogi",
        "lion",
        "sgd",
    }
    assert train.moment_dtype_args("lion") == ("mu_dtype",)
    assert train.moment_dtype_args("sgd") == ("accumulator_dtype",)
    # From optax.contrib: no kahan_sum (their states follow Optax's contrib layout).
    assert set(train.KAHAN_OPTIMIZERS) == set(train.STATE_DTYPE_OPTIMIZERS) - {"adopt", "muon"} | {"rmsprop"}


@pytest.mark.parametrize("optimizer", sorted(train.STATE_DTYPE_OPTIMIZERS))
def test_state_dtype_reaches_the_moments(optimizer):
    # int8 state of a leaf above Int8Blockwise.min_size: ~1 B per element per moment instead of 4.
    params = {"w": jnp.zeros((96, 96)), "b": jnp.zeros((96,))}
    n = 96 * 96 + 96
    per_param = {}
    for dtype in ("float32", "int8"):
        tx = train.OPTIMIZERS[optimizer](1e-3, 1e-4, **train.memory_options(optimizer, dtype))
        per_param[dtype] = train.tree_bytes(jax.eval_shape(tx.init, params)) / n
    moments = len(train.moment_dtype_args(optimizer))
    if optimizer == "amsgrad":
        moments = 2  # mu and nu; nu_max stays f32 (it is not stored quantized)
    assert per_param["float32"] - per_param["int8"] > 2.9 * moments * 0.98, per_param


def test_memory_options_are_passed_only_where_accepted():
    assert train.memory_options("rmsprop", "int8") == {}
    assert train.memory_options("adamw", "int8", kahan_sum=True) == {
        "mu_dtype": train.ox.int8_blockwise,
        "nu_dtype": train.ox.int8_blockwise,
        "kahan_sum": True,
    }


def test_state_dtype_defaults_to_float32_and_is_not_an_error_when_not_asked(capsys):
    assert train.parse_args(["--optimizer", "rmsprop", "--plot", ""]).state_dtype == "float32"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("optimizer", sorted(set(train.OPTIMIZERS) - set(train.STATE_DTYPE_OPTIMIZERS)))
def test_state_dtype_is_an_error_for_optimizers_without_moment_dtypes(optimizer, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(["--optimizer", optimizer, "--state-dtype", "int8", "--plot", ""])
    assert exit_.value.code == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"--optimizer {optimizer} has no moment storage" in line and "adamw" in line


def test_state_size_is_printed_before_training(capsys):
    assert train.main(["--state-dtype", "int8", *QUICK, "--min-accuracy", "0.1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("optimizer state: 2.") and " B/param " in out[0], out
    assert "moments int8" in out[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        ["--state-dtype", "int8"],
        ["--param-dtype", "bfloat16", "--kahan-sum"],
        ["--param-dtype", "bfloat16", "--kahan-sum", "--state-dtype", "int8"],
    ],
    ids=["int8-states", "bf16-params-kahan", "bf16-params-kahan-int8-states"],
)
def test_low_memory_states_train_like_float32(options):
    # Same seed, same batches: the accuracy of the f32 run, to within 3 points (449 test images).
    def run(extra):
        return train.train(train.parse_args(["--epochs", "4", "--warmup-steps", "10", "--quiet", "--plot", "", *extra]))

    f32, low = run([]), run(options)
    assert low["test_accuracy"] > 0.85, low
    assert abs(low["test_accuracy"] - f32["test_accuracy"]) <= 0.03, (f32, low)
    assert f32["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)  # mu, nu in f32 (+ the step count)
    # 2 moments at ~1 B (the 2% of small leaves in f32) or 4 B; + 2 B of bf16 compensation with Kahan.
    expected = (2.15 if "int8" in options else 8.0) + (2.0 if "--kahan-sum" in options else 0.0)
    assert low["state_bytes_per_param"] == pytest.approx(expected, abs=0.05), low
    if "--kahan-sum" in options:
        assert low["param_dtype"] == "bfloat16" and low["kahan_sum"]


def test_bfloat16_states_train():
    result = train.train(train.parse_args(["--state-dtype", "bfloat16", *QUICK]))
    assert result["state_bytes_per_param"] == pytest.approx(4.0, abs=0.01)
    assert result["test_accuracy"] > 0.5
