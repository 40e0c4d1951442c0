"""One of two processes training clip+adamw on a model sharded over both (test_sharding.py starts them).

    python tests/multiprocess_check.py <process id> <coordinator port> <backend>

Each process has 4 CPU devices; `jax.distributed` joins them into one 8-device mesh ("data": 8).
The parameters, gradients and optimizer state are sharded over all 8 devices, so every step needs
both processes (the global norm is a psum across them). Each process then checks its shards of the
result against a single-device run of the same steps, and prints "OK".
"""

import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_platforms", "cpu")

import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_ext as ox  # noqa: E402


def main(process_id: int, port: int, backend: str) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)  # same values in both processes
    params0 = {"w": rng.normal(size=(64, 24)).astype(np.float32), "b": rng.normal(size=(40,)).astype(np.float32)}
    grads0 = {k: np.cos(3 * v) for k, v in params0.items()}
    tx = ox.chain(ox.clip_by_global_norm(1.0), ox.adamw(1e-2, weight_decay=0.1))

    with ox.kernels.use_backend(backend):
        # The single-device reference, on this process's first device.
        local = jax.local_devices()[0]
        p, g = jax.device_put(params0, local), jax.device_put(grads0, local)
        s = tx.init(p)
        for _ in range(3):
            p, s = jax.jit(tx.update_and_apply)(g, s, p)
        reference = jax.tree.map(np.asarray, p)

        mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        sharding = NamedSharding(mesh, P("data"))

        def global_array(x):
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        params = jax.tree.map(global_array, params0)
        grads = jax.tree.map(global_array, grads0)
        state = jax.jit(tx.init)(params)
        step = jax.jit(tx.update_and_apply, donate_argnums=(1, 2))
        for _ in range(3):
            params, state = step(grads, state, params)

    for name, x in params.items():
        assert x.sharding.is_equivalent_to(sharding, x.ndim), (name, x.sharding)
        for shard in x.addressable_shards:
            np.testing.assert_allclose(np.asarray(shard.data), reference[name][shard.index], rtol=1e-6, atol=1e-7)
    jax.distributed.shutdown()
    print("OK", process_id)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
