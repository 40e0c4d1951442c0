"""Demo: train a small Flax NNX convnet on scikit-learn's bundled digits with an optax_ext optimizer.

    python -m optax_ext.train                      # adamw, cosine schedule with warm-up, 15 epochs
    python -m optax_ext.train --optimizer lion --lr 2e-3 --epochs 12 --plot curves.png
    python -m optax_ext.train --devices 8          # data-parallel on 8 devices (fake CPU devices if needed)
    python -m optax_ext.train --state-dtype int8   # AdamW with 8-bit blockwise moments (~2 B/param of state)

No download: the 1,797 8x8 digit images ship with scikit-learn. The optimizer step is fused:
`tx.update_and_apply(grads, opt_state, params)` computes the moments and writes the new parameters
in one pass per leaf, in place: the step is jitted with params and optimizer state donated, and
compiled before the first step (the progress bar's ETA and "seconds" exclude compilation, reported
as "compile_seconds"). Exits with status 1 if the final test accuracy is below `--min-accuracy` or
the loss diverges, with status 2 (before training) on options that cannot work.

Memory: `--state-dtype` stores the optimizer's moments as float32, bfloat16 or 8-bit blockwise codes
(`optax_ext.int8_blockwise`), `--param-dtype bfloat16` trains bf16 weights (the model computes in f32)
and `--kahan-sum` compensates their rounding; the optimizer state's size is printed before training
("optimizer state: ... B/param") and reported as "state_bytes_per_param".

With `--devices N` the step is data-parallel over a 1-D mesh ("data", explicit sharding): each
device takes 1/N of the batch, parameters are replicated, and the optimizer state is sharded over
the devices (ZeRO-1: each device updates its slice of every large leaf, then the new parameters
are gathered). On a machine with one CPU, N fake CPU devices are created.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

import optax_ext as ox

# `(learning_rate, weight_decay, **memory_options) -> optimizer`; the keyword arguments are the memory
# options of `OPTIMIZER_FUNCTIONS[name]` (see `memory_options`), passed on to it.
OPTIMIZERS: dict[str, Callable] = {
    "adamw": lambda lr, wd, **kw: ox.adamw(lr, weight_decay=wd, **kw),
    "adam": lambda lr, wd, **kw: ox.adam(lr, **kw),
    "nadam": lambda lr, wd, **kw: ox.nadam(lr, **kw),
    "sgd": lambda lr, wd, **kw: ox.chain(ox.add_l2(wd), ox.sgd(lr, momentum=0.9, nesterov=True, **kw)),
    "rmsprop": lambda lr, wd, **kw: ox.rmsprop(lr, **kw),
    "adabelief": lambda lr, wd, **kw: ox.adabelief(lr, **kw),
    "yogi": lambda lr, wd, **kw: ox.yogi(lr, **kw),
    "lion": lambda lr, wd, **kw: ox.lion(lr, weight_decay=wd, **kw),
    "amsgrad": lambda lr, wd, **kw: ox.amsgrad(lr, **kw),
    "lamb": lambda lr, wd, **kw: ox.lamb(lr, weight_decay=wd, **kw),
    "lars": lambda lr, wd, **kw: ox.lars(lr, weight_decay=wd, trust_coefficient=0.02, **kw),
    "adafactor": lambda lr, wd, **kw: ox.adafactor(lr, multiply_by_parameter_scale=False, **kw),
    "adopt": lambda lr, wd, **kw: ox.adopt(lr, **kw),
    # Muon's rate is for orthogonalized matrices (update spectral norm ~1); the rest is AdamW's.
    "muon": lambda lr, wd, **kw: ox.muon(
        lr,
        weight_decay=wd,
        adam_learning_rate=_scaled(lr, MUON_ADAM_LR_RATIO),
        muon_weight_dimension_numbers=muon_dimension_numbers,
        **kw,
    ),
    "prodigy": lambda lr, wd, **kw: ox.prodigy(lr, weight_decay=wd, **kw),
    "schedule_free_adamw": lambda lr, wd, **kw: ox.schedule_free_adamw(lr, weight_decay=wd, **kw),
}
# What to evaluate: schedule-free optimizers train at y and are evaluated at their average x.
EVAL_PARAMS: dict[str, Callable] = {"schedule_free_adamw": ox.schedule_free_eval_params}
# The optax_ext function behind each entry: its signature says which memory options it takes.
OPTIMIZER_FUNCTIONS: dict[str, Callable] = {name: getattr(ox, name) for name in OPTIMIZERS}

# --state-dtype: the storage of the moments, passed as every moment-dtype argument the optimizer has
# (adafactor's `dtype_momentum` is not one: the demo runs it without momentum).
STATE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": ox.int8_blockwise}
MOMENT_DTYPE_ARGS = ("mu_dtype", "nu_dtype", "accumulator_dtype")
DEFAULT_STATE_DTYPE = "float32"
PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _scaled(lr, factor):
    """A learning rate (a number or a schedule) times `factor`."""
    return (lambda step: factor * lr(step)) if callable(lr) else factor * lr


def muon_dimension_numbers(params):
    """Which arrays Muon orthogonalizes, as what matrices: dense kernels (in, out) as they are, conv
    kernels (kh, kw, in, out) as (kh * kw * in, out) matrices; biases (None) go to AdamW."""

    def dims(p):
        if p.ndim == 4:
            return ox.MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=(3,))
        return ox.MuonDimensionNumbers() if p.ndim == 2 else None

    return jax.tree.map(dims, params)


def _parameters(name: str):
    return inspect.signature(OPTIMIZER_FUNCTIONS[name]).parameters


def moment_dtype_args(name: str) -> tuple[str, ...]:
    """The moment-storage arguments of optimizer `name` (e.g. ("mu_dtype", "nu_dtype")); () if none."""
    return tuple(arg for arg in MOMENT_DTYPE_ARGS if arg in _parameters(name))


def takes_kahan_sum(name: str) -> bool:
    return "kahan_sum" in _parameters(name)


STATE_DTYPE_OPTIMIZERS = tuple(name for name in OPTIMIZERS if moment_dtype_args(name))
KAHAN_OPTIMIZERS = tuple(name for name in OPTIMIZERS if takes_kahan_sum(name))


def memory_options(name: str, state_dtype: str = DEFAULT_STATE_DTYPE, kahan_sum: bool = False) -> dict:
    """Keyword arguments for `OPTIMIZERS[name]`: the moment storage where the optimizer takes one
    (an optimizer without moment dtypes gets none: its state is in the params' dtype), and kahan_sum."""
    options = {arg: STATE_DTYPES[state_dtype] for arg in moment_dtype_args(name)}
    if kahan_sum:
        options["kahan_sum"] = True
    return options


def tree_bytes(tree) -> int:
    """Bytes of every array in a pytree (a `QuantizedArray` counts its codes and its absmax)."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


# Peak learning rates that train this model well in a few epochs: sign-based (lion) and
# trust-ratio (lars, lamb) optimizers live on other scales than Adam's.
DEFAULT_LR = {"sgd": 0.05, "lion": 1e-3, "lars": 1.0, "lamb": 3e-2, "prodigy": 1.0, "muon": 0.02}
DEFAULT_LR_OTHERS = 3e-3
MUON_ADAM_LR_RATIO = DEFAULT_LR_OTHERS / DEFAULT_LR["muon"]  # Muon's AdamW part: Adam's rate at --lr 0.02

# The optimizers that use --weight-decay (decoupled; an L2 term for sgd): the others ignore it.
WEIGHT_DECAY_OPTIMIZERS = ("adamw", "sgd", "lion", "lamb", "lars", "muon", "prodigy", "schedule_free_adamw")
DEFAULT_WEIGHT_DECAY = 1e-4

SCHEDULES = ("constant", "cosine", "warmup_cosine", "warmup_constant", "one_cycle")
WARMUP_SCHEDULES = ("warmup_cosine", "warmup_constant")  # the schedules that use --warmup-steps
# --schedule by optimizer: schedule-free learning replaces the decay (it keeps the warm-up).
DEFAULT_SCHEDULE = {"schedule_free_adamw": "warmup_constant"}
DEFAULT_SCHEDULE_OTHERS = "warmup_cosine"
DEFAULT_WARMUP_STEPS = 50

PROG = "python -m optax_ext.train"
N_DIGITS = 1797  # images in scikit-learn's digits
TEST_FRACTION = 0.25


def train_set_size(test_fraction: float = TEST_FRACTION) -> int:
    """Images in the training split of `load_digits` (no need to load them)."""
    return N_DIGITS - int(N_DIGITS * test_fraction)


class ConvNet(nnx.Module):
    """Two 3x3 convolutions and a linear head: ~10k parameters (9,930), enough for > 95% on digits."""

    def __init__(self, rngs: nnx.Rngs, channels: int = 32, num_classes: int = 10):
        self.conv1 = nnx.Conv(1, channels // 2, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(channels // 2, channels, (3, 3), rngs=rngs)
        self.head = nnx.Linear(channels * 16, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))  # 8x8 -> 4x4
        return self.head(x.reshape(x.shape[0], -1))


def load_digits(seed: int, test_fraction: float = TEST_FRACTION):
    """(x_train, y_train, x_test, y_test): images (N, 8, 8, 1) in [0, 1], integer labels."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise SystemExit("The demo needs scikit-learn: pip install -e '.[examples]'") from e
    data = sk_load_digits()
    x = (data.images.astype(np.float32) / 16.0)[..., None]
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def make_schedule(name: str, lr: float, total_steps: int, warmup_steps: int):
    """A learning-rate schedule `step -> value` by name."""
    from optax_ext import schedules

    if name == "constant":
        return schedules.constant(lr)
    if name == "cosine":
        return schedules.cosine_decay(lr, total_steps)
    if name == "warmup_cosine":
        return schedules.linear_warmup(schedules.cosine_decay(lr, max(total_steps - warmup_steps, 1)), warmup_steps)
    if name == "warmup_constant":
        return schedules.linear_warmup(schedules.constant(lr), warmup_steps)
    if name == "one_cycle":
        return schedules.one_cycle(lr, total_steps)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")


def augment_batch(key, images):
    """Random shift by up to one pixel (pad + crop) and small rotation: digits must not be flipped."""
    from optax_ext import augment

    def one(k, img):
        k1, k2 = jax.random.split(k)
        img = augment.random_crop(k1, img, (8, 8), padding=1)
        return augment.random_rotation(k2, img, 10.0)

    return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(graphdef, tx, *, augment: bool = False, mesh=None):
    """The demo's jitted step, `train_step(params, opt_state, x, y, key) -> (params, opt_state, loss)`.

    Params and optimizer state are donated, in the order they are returned: the fused step updates
    them in place, where an undonated input that it aliases would be copied first (on a GPU ~24
    B/param on top of AdamW's 28 B/param); `ox.inspect_step` shows the compiled program.
    """

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, x, y, key):
        if augment:
            x = augment_batch(key, x)

        def loss_fn(p):
            return cross_entropy(nnx.merge(graphdef, p)(x), y)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        params, opt_state = ox.update_and_apply(tx, grads, opt_state, params)  # any transformation
        if mesh is not None:  # ZeRO-1: the update ran on the state's shards; gather the new params
            params = jax.tree.map(lambda p: jax.sharding.reshard(p, P()), params)
        return params, opt_state, loss

    return train_step


def data_parallel_mesh(devices: int):
    """A 1-D ("data",) mesh of `devices` devices with explicit sharding, or None for one device."""
    if devices <= 1:
        return None
    available = jax.device_count()
    if available < devices:
        raise SystemExit(f"--devices {devices}: only {available} {jax.default_backend()} device(s) available.")
    return jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))


def zero1_layout(tree, devices: int):
    """Optimizer state sharded over "data" along each array's first dim when it divides evenly."""

    def spec(x):
        if getattr(x, "ndim", 0) and x.shape[0] % devices == 0:
            return P("data")
        return P()

    return jax.tree.map(lambda x: jax.sharding.reshard(x, spec(x)), tree)


def train(args) -> dict:
    mesh = data_parallel_mesh(args.devices)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return _train(args, mesh)


def _train(args, mesh) -> dict:
    x_train, y_train, x_test, y_test = load_digits(args.seed)
    steps_per_epoch = len(x_train) // args.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the training set ({len(x_train)} images)")
    total_steps = steps_per_epoch * args.epochs
    schedule = make_schedule(args.schedule, args.lr, total_steps, args.warmup_steps)
    state_dtype = getattr(args, "state_dtype", None) or DEFAULT_STATE_DTYPE
    param_dtype = getattr(args, "param_dtype", "float32")
    kahan_sum = getattr(args, "kahan_sum", False)
    tx = OPTIMIZERS[args.optimizer](
        schedule, args.weight_decay, **memory_options(args.optimizer, state_dtype, kahan_sum)
    )

    model = ConvNet(nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    # bf16 weights are stored as bf16 (and updated so); the layers compute in f32 (promoted with the f32 input).
    params = jax.tree.map(lambda p: p.astype(PARAM_DTYPES[param_dtype]), params)
    opt_state = tx.init(params)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    state_bytes = tree_bytes(opt_state)
    if not getattr(args, "json", False):
        moments = state_dtype if moment_dtype_args(args.optimizer) else f"in the {param_dtype} params' dtype"
        print(
            f"optimizer state: {state_bytes / n_params:.2f} B/param ({state_bytes:,} bytes for {n_params:,} "
            f"{param_dtype} params; {args.optimizer}, moments {moments}"
            + (", Kahan compensation" if kahan_sum else "")
            + ")",
            flush=True,
        )
    if mesh is not None:
        if args.batch_size % args.devices:
            raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of --devices {args.devices}.")
        opt_state = jax.jit(functools.partial(zero1_layout, devices=args.devices))(opt_state)

    train_step = make_train_step(graphdef, tx, augment=args.augment, mesh=mesh)

    def batch(x):
        return x if mesh is None else jax.device_put(x, P("data"))

    eval_params = EVAL_PARAMS.get(args.optimizer, lambda opt_state, params: params)

    @jax.jit
    def accuracy(params, opt_state, x, y):
        return jnp.mean(jnp.argmax(nnx.merge(graphdef, eval_params(opt_state, params))(x), -1) == y)

    rng = np.random.default_rng(args.seed)
    key = jax.random.PRNGKey(args.seed)

    # Compile before the loop, so that neither the progress bar's ETA nor "seconds" includes it. Lowering
    # only reads shapes and shardings: the donated buffers are not consumed.
    start = time.perf_counter()
    step_fn = train_step.lower(
        params, opt_state, batch(x_train[: args.batch_size]), batch(y_train[: args.batch_size]), key
    ).compile()
    accuracy_fn = accuracy.lower(params, opt_state, x_test, y_test).compile()
    _, _ = jax.random.split(key)  # the loop's eager ops too (each compiles on first use)
    float(schedule(0))
    compile_seconds = time.perf_counter() - start

    progress = _progress(total_steps, args.quiet)
    history = {"step": [], "loss": [], "lr": []}
    start = time.perf_counter()
    step = 0
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            key, sub = jax.random.split(key)
            params, opt_state, loss = step_fn(params, opt_state, batch(x_train[idx]), batch(y_train[idx]), sub)
            loss = float(loss)
            if not np.isfinite(loss):
                progress.close()
                raise FloatingPointError(
                    f"the loss became {loss} at step {step}: the run diverged; lower --lr (now {args.lr:g})"
                )
            history["step"].append(step)
            history["loss"].append(loss)
            history["lr"].append(float(schedule(step)))
            step += 1
            progress.update(1)
            progress.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")
    progress.close()
    acc = float(accuracy_fn(params, opt_state, x_test, y_test))
    result = {
        "optimizer": args.optimizer,
        "schedule": args.schedule,
        "epochs": args.epochs,
        "steps": total_steps,
        "final_loss": history["loss"][-1],
        "test_accuracy": acc,
        "seconds": round(time.perf_counter() - start, 2),
        "compile_seconds": round(compile_seconds, 2),
        "backend": ox.kernels.get_backend(),
        "devices": args.devices,
        "state_dtype": state_dtype if moment_dtype_args(args.optimizer) else None,
        "param_dtype": param_dtype,
        "kahan_sum": kahan_sum,
        "params": n_params,
        "state_bytes": state_bytes,
        "state_bytes_per_param": round(state_bytes / n_params, 4),
    }
    if args.plot:
        _plot(history, args.plot, title=f"{args.optimizer} on digits: test accuracy {acc:.1%}")
        result["plot"] = str(args.plot)
    return result


def _progress(total: int, quiet: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if tqdm is None or quiet:

        class _Silent:
            def update(self, n):
                pass

            def set_postfix(self, **kw):
                pass

            def close(self):
                pass

        return _Silent()
    return tqdm(total=total, desc="training", unit="step", file=sys.stderr)


def _plot(history, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(history["step"], history["loss"], lw=0.8)
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log", title=title)
    ax_lr.plot(history["step"], history["lr"])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="schedule")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in --help ("(default: ...)"; a help text that states its own keeps it),
    the description and the examples as written."""

    def _get_help_string(self, action):
        if "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _default_lr_help() -> str:
    per_optimizer = ", ".join(f"{lr:g} for {name}" for name, lr in sorted(DEFAULT_LR.items()))
    return f"peak learning rate (default: {per_optimizer}, {DEFAULT_LR_OTHERS:g} for the others)"


def build_parser() -> argparse.ArgumentParser:
    description, examples = __doc__.split("\n\n")[:2]
    p = argparse.ArgumentParser(
        prog=PROG, description=description, epilog="examples:\n" + examples, formatter_class=_HelpFormatter
    )
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw", help="the optax_ext optimizer")
    p.add_argument("--lr", type=float, default=None, help=_default_lr_help())
    p.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help=f"weight decay, decoupled for {', '.join(w for w in WEIGHT_DECAY_OPTIMIZERS if w != 'sgd')}, "
        f"an L2 term for sgd; the others ignore it (default: {DEFAULT_WEIGHT_DECAY:g})",
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=None,
        help="learning-rate schedule (default: "
        + ", ".join(f"{s} for {name}" for name, s in sorted(DEFAULT_SCHEDULE.items()))
        + f", {DEFAULT_SCHEDULE_OTHERS} for the others)",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help=f"linear warm-up steps, for --schedule {' or '.join(WARMUP_SCHEDULES)} only "
        f"(default: {DEFAULT_WARMUP_STEPS})",
    )
    p.add_argument("--epochs", type=int, default=15, help="passes over the training set")
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help=f"images per step, at most the {train_set_size()} of the training set",
    )
    p.add_argument("--augment", action="store_true", help="random 1-pixel shifts and +-10 degree rotations")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the initialization and the batches")
    p.add_argument(
        "--plot", type=Path, default=Path("train_curves.png"), help="PNG of loss and learning-rate curves ('' to skip)"
    )
    p.add_argument("--min-accuracy", type=float, default=0.9, help="exit 1 below this test accuracy, in (0, 1]")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--state-dtype",
        choices=sorted(STATE_DTYPES),
        default=None,
        help=f"storage of the optimizer's moments, for {', '.join(STATE_DTYPE_OPTIMIZERS)} only (an "
        f"error for the others): int8 is optax_ext.int8_blockwise, 8-bit codes + an f32 absmax per "
        f"{ox.int8_blockwise.block_size} elements; leaves under {ox.int8_blockwise.min_size:,} "
        f"elements stay f32 (in this convnet the biases and the first conv's 144 weights, 2%% of "
        f"its parameters) (default: {DEFAULT_STATE_DTYPE})",
    )
    p.add_argument(
        "--param-dtype",
        choices=sorted(PARAM_DTYPES),
        default="float32",
        help="storage of the weights (the layers compute in f32 either way)",
    )
    p.add_argument(
        "--kahan-sum",
        action="store_true",
        help=f"Kahan-compensated updates (a buffer in the params' dtype; meant for --param-dtype "
        f"bfloat16), for {', '.join(KAHAN_OPTIMIZERS)} only",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="data-parallel over this many devices, a divisor of --batch-size (fake CPU devices when "
        "the CPU is the backend)",
    )
    return p


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _unwritable(path: Path) -> str | None:
    """Why `path` cannot be written as a new or replaced file (its missing folders created), or None."""
    path = path.absolute()
    if path.is_dir():
        return "is a directory"
    if path.exists():
        return None if os.access(path, os.W_OK) else "is not writable"
    folder = path.parent
    while not folder.exists():  # the folders _plot would create: the first existing one must take them
        folder = folder.parent
    if not folder.is_dir():
        return f"cannot be created: {folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot be created: the folder {folder} is not writable"
    return None


def parse_args(argv=None):
    """Parse and check the options; exits with status 2 (argparse's `error`) on any that cannot work,
    and warns on stderr about options that do nothing for the chosen optimizer or schedule."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR.get(args.optimizer, DEFAULT_LR_OTHERS)
    if not (math.isfinite(args.lr) and args.lr >= 0):
        p.error(f"--lr must be finite and >= 0, got {args.lr}")
    if args.epochs < 1 or args.batch_size < 1 or args.devices < 1:
        p.error("--epochs, --batch-size and --devices must be >= 1")
    if args.batch_size > train_set_size():
        p.error(f"--batch-size {args.batch_size} is larger than the training set ({train_set_size()} images)")
    if not 0 < args.min_accuracy <= 1:
        p.error(f"--min-accuracy must be in (0, 1], got {args.min_accuracy}")

    if args.schedule is None:
        args.schedule = DEFAULT_SCHEDULE.get(args.optimizer, DEFAULT_SCHEDULE_OTHERS)
    if args.weight_decay is None:
        args.weight_decay = DEFAULT_WEIGHT_DECAY
    elif not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        p.error(f"--weight-decay must be finite and >= 0, got {args.weight_decay}")
    elif args.weight_decay and args.optimizer not in WEIGHT_DECAY_OPTIMIZERS:
        _warn(
            f"--weight-decay does nothing for --optimizer {args.optimizer} (only for "
            f"{', '.join(WEIGHT_DECAY_OPTIMIZERS)})"
        )
    if args.warmup_steps is None:
        args.warmup_steps = DEFAULT_WARMUP_STEPS
    elif args.warmup_steps < 0:
        p.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    elif args.warmup_steps and args.schedule not in WARMUP_SCHEDULES:
        _warn(f"--warmup-steps does nothing for --schedule {args.schedule} (only for {', '.join(WARMUP_SCHEDULES)})")
    total_steps = train_set_size() // args.batch_size * args.epochs
    if args.schedule in WARMUP_SCHEDULES and args.warmup_steps >= total_steps:
        _warn(
            f"--warmup-steps {args.warmup_steps} >= the {total_steps} training steps: the learning rate never "
            f"reaches its peak"
        )

    if args.state_dtype is None:
        args.state_dtype = DEFAULT_STATE_DTYPE
    elif not moment_dtype_args(args.optimizer):
        p.error(
            f"--state-dtype: --optimizer {args.optimizer} has no moment storage to set (only "
            f"{', '.join(STATE_DTYPE_OPTIMIZERS)} have)"
        )
    if args.kahan_sum and not takes_kahan_sum(args.optimizer):
        p.error(
            f"--kahan-sum: --optimizer {args.optimizer} has no Kahan-compensated form (only "
            f"{', '.join(KAHAN_OPTIMIZERS)} have)"
        )
    try:  # what the optimizer itself rejects (cheap: nothing is allocated before init)
        OPTIMIZERS[args.optimizer](
            args.lr, args.weight_decay, **memory_options(args.optimizer, args.state_dtype, args.kahan_sum)
        )
    except (TypeError, ValueError) as e:
        asked = [f"--state-dtype {args.state_dtype}"] + (["--kahan-sum"] if args.kahan_sum else [])
        p.error(f"--optimizer {args.optimizer} with {' '.join(asked)}: {str(e).splitlines()[0]}")

    if args.plot is not None and str(args.plot) in ("", "."):
        args.plot = None
    if args.plot is not None:
        if args.plot.suffix.lower() != ".png":
            p.error(f"--plot {args.plot}: the curves are written as PNG, the name must end in .png")
        if (why := _unwritable(args.plot)) is not None:
            p.error(f"--plot {args.plot} {why}")

    if args.devices > 1:
        if args.batch_size % args.devices:
            p.error(f"--batch-size {args.batch_size} must be a multiple of --devices {args.devices}")
        use_cpu_devices(args.devices)
        if (available := jax.device_count()) < args.devices:
            p.error(f"--devices {args.devices}: only {available} {jax.default_backend()} device(s) available")
    return args


def use_cpu_devices(n: int) -> None:
    """Ask for n CPU devices (fake devices for data parallelism on one CPU). Only possible before
    jax starts its backends; it changes nothing on GPU/TPU platforms."""
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already started (e.g. called from a test or a notebook)
        pass


def main(argv=None) -> int:
    args = parse_args(argv)  # exits with status 2 on options that cannot work
    try:
        result = train(args)
    except (FloatingPointError, OSError) as e:  # a diverged run; a plot that could not be written after all
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['optimizer']} / {result['schedule']}: {result['steps']} steps in {result['seconds']} s "
            f"(+ {result['compile_seconds']} s compiling), final loss {result['final_loss']:.4f}, "
            f"test accuracy {result['test_accuracy']:.2%}"
            + (f", curves in {result['plot']}" if "plot" in result else "")
        )
    if result["test_accuracy"] < args.min_accuracy:
        print(f"FAILED: test accuracy {result['test_accuracy']:.2%} < {args.min_accuracy:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
