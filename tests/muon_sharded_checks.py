"""Muon under FSDP on 8 fake CPU devices: run as `python tests/muon_sharded_checks.py <check> <mode>` by
tests/test_muon.py (XLA's device count is fixed when jax starts, so each check is its own process).

Modes "auto" (`AxisType.Auto` mesh axes) and "explicit" (`AxisType.Explicit`). Prints a line
`COLLECTIVES ours=<n> optax=<n>` and "OK" at the end; any failure raises.
"""

import os
import re
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from optax.contrib import _muon as optax_muon  # noqa: E402

from optax_ext.contrib import _muon  # noqa: E402

_COLLECTIVE = re.compile(r"\b(all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute)(-start)?\(")
MAX_COLLECTIVES = 8


def count_collectives(text: str) -> int:
    return sum(1 for line in text.splitlines() if _COLLECTIVE.search(line))


def make_tree(key, n=12, shape=(256, 512)):
    keys = jax.random.split(key, n + 2)
    tree = {f"w{i:02d}": jax.random.normal(keys[i], shape) / 16 for i in range(n)}
    tree["bias"] = jax.random.normal(keys[n], (shape[1],))
    tree["scale"] = jax.random.normal(keys[n + 1], ())
    return tree


def specs_of(tree, axis):
    return {k: P(axis) if jnp.ndim(x) == 2 else P() for k, x in tree.items()}


def place(tree, mesh, specs):
    return {k: jax.device_put(x, NamedSharding(mesh, specs[k])) for k, x in tree.items()}


def close(actual, expected, rel, what):
    for (path, a), e in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        err, scale = np.max(np.abs(a - e), initial=0.0), np.max(np.abs(e), initial=0.0)
        assert err <= rel * scale or err == 0.0, f"{what}{jax.tree_util.keystr(path)}: {err:.3e} > {rel} * {scale:.3e}"


def fsdp_step(mode, mesh_shape=(8,), names=("data",), row_axes="data", ns_dtype=jnp.bfloat16, steps=3):
    types = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}[mode]
    mesh = jax.make_mesh(mesh_shape, names, axis_types=(types,) * len(names))
    params0 = make_tree(jax.random.PRNGKey(0))
    grads = [jax.tree.map(lambda x, i=i: jnp.cos(x * (i + 2)), params0) for i in range(steps)]

    def make(lib):
        if lib == "ours":
            return _muon.muon(1e-2, weight_decay=0.1, ns_dtype=ns_dtype)
        return optax_muon.muon(1e-2, weight_decay=0.1)

    def stepper(tx):
        def step(params, state, g):
            u, state = tx.update(g, state, params)
            return optax.apply_updates(params, u), state

        return jax.jit(step)

    tx = make("ours")
    ref_p, ref_s = params0, tx.init(params0)
    one = stepper(tx)
    for g in grads:
        ref_p, ref_s = one(ref_p, ref_s, g)

    counts = {}
    specs = specs_of(params0, row_axes)
    with jax.set_mesh(mesh):
        for lib in ("ours", "optax"):
            tx = make(lib)
            params = place(params0, mesh, specs)
            state = jax.jit(tx.init)(params)
            step = stepper(tx)
            g0 = place(grads[0], mesh, specs)
            if lib != "ours":
                # For the record only: Optax's Newton-Schulz on row-sharded matrices (its dots
                # then need collectives; under Explicit axes they do not even type-check).
                try:
                    counts[lib] = count_collectives(step.lower(params, state, g0).compile().as_text())
                except Exception as e:  # noqa: BLE001
                    counts[lib] = type(e).__name__
                continue
            text = step.lower(params, state, g0).compile().as_text()
            counts[lib] = count_collectives(text)
            for g in grads:
                params, state = step(params, state, place(g, mesh, specs))
            for k, spec in specs.items():
                assert params[k].sharding.is_equivalent_to(NamedSharding(mesh, spec), params[k].ndim), (
                    k,
                    params[k].sharding,
                )
            # The Newton-Schulz dots run on whole matrices, one group: no collective but the moves.
            assert counts["ours"] <= MAX_COLLECTIVES, (
                counts,
                [ln for ln in text.splitlines() if _COLLECTIVE.search(ln)],
            )
            close(params, ref_p, 1e-5, "params")
            close(state, ref_s, 1e-5, "state")
    print(f"COLLECTIVES {mode} ours={counts['ours']} optax={counts['optax']}")


CHECKS = {
    "fsdp_step": fsdp_step,
    # Rows over both axes of a 2-D mesh (the stack axis then spans all 8 devices).
    "fsdp_step_2d": lambda mode: fsdp_step(mode, (4, 2), ("data", "model"), ("data", "model")),
    # Rows over one axis of a 2-D mesh, replicated over the other.
    "fsdp_step_partial": lambda mode: fsdp_step(mode, (4, 2), ("data", "model"), "data"),
}

if __name__ == "__main__":
    check, mode = sys.argv[1], sys.argv[2]
    CHECKS[check](mode)
    print("OK")
