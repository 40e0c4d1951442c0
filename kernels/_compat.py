"""What `optax_ext.kernels` needs from JAX that differs across the supported versions, in one place.

Supported: jax/jaxlib 0.10.2 through 0.12.x (CI tests 0.10.2 and the newest 0.12 release). Each
item names the versions it papers over; tests/test_compat.py checks every item on the installed JAX.

- `lowering_target(platform)`: lowering for an accelerator this machine does not have. Pallas asks
  the *target* device what it is while lowering: Mosaic TPU rules read the TPU generation (for
  `sign`, tiling), and from jax 0.12 the Triton lowering reads the GPU's compute capability and
  fails without a GPU ("No supported GPU devices found, please specify an abstract GPU device
  using AbstractDevice"); jax 0.10.2 assumed sm_90 there. Both versions read the device from the
  abstract mesh in context when it carries a `jax.sharding.AbstractDevice`, a public API in both,
  so one mechanism serves every version (it replaces the tests' former registration of the CPU as
  a TPU through the private `tpu_info._get_tpu_info_impl`, which jax 0.12 removed).
- `JAX_VERSION`: the installed jax as a tuple of ints, for the few version tests left.
- `skip_absent_triton_dialect_imports()`: lowering a Triton kernel casts MLIR types of the `tt`
  dialect, and MLIR's Python bindings then look for a Python module of that dialect under each of
  their search prefixes (`jaxlib.mlir.dialects.tt`, `jaxlib.mosaic.python.tt`, ...), none of which
  exists, again on every cast: a failed import is not remembered. A GPT-2-small step made 4 x 8,638
  failed imports, a third of its Triton lowering time (jax 0.10.2 and 0.12). Marking the absent
  modules absent in `sys.modules` (None: import fails at once, Python's documented convention)
  removes that cost; nothing that exists is touched.
- `remember_mosaic_gpu_scratch()`: Mosaic GPU (jax 0.12) keeps every TMA descriptor in one scratch
  buffer, and finds that buffer's ops again for each descriptor by walking the kernel's module from
  its first op (`Scratch._find_alloc_load_and_device_ptr`), so lowering a kernel with n copy sites
  costs O(n^2): 18% of the trace+lower time of a 2,000-leaf clip+adamw step (81 of 437 s profiled).
  The ops found are remembered per scratch buffer and checked on each use (an op that an MLIR pass
  has since replaced is invalidated by MLIR's Python bindings, and raises: then they are looked
  up again as before); nothing else changes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import re
import sys
from collections.abc import Iterator

import jax
from jax.sharding import AbstractDevice, AbstractMesh

__all__ = [
    "JAX_VERSION",
    "TARGET_DEVICES",
    "lowering_target",
    "remember_mosaic_gpu_scratch",
    "skip_absent_triton_dialect_imports",
]


def _version(text: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: "0.12.0.1" -> (0, 12, 0, 1), "0.10.2.dev1" -> (0, 10, 2)."""
    return tuple(int(p) for p in re.match(r"\d+(?:\.\d+)*", text).group().split("."))


JAX_VERSION = _version(jax.__version__)

# The accelerator each lowering platform is lowered for by default: the kinds our block sizes are
# tuned for (H100: 132 SMs, sm_90; TPU v5e: one TensorCore per chip). Device kinds are the strings
# the devices report (`jax.devices()[0].device_kind`), which JAX's GPU/TPU info tables key on.
TARGET_DEVICES = {
    "cuda": AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"),
    "tpu": AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu"),
}


@contextlib.contextmanager
def lowering_target(platform: str, device: AbstractDevice | None = None, mesh=None) -> Iterator[AbstractMesh]:
    """Trace and lower for `platform` ("cuda" or "tpu") on a machine without that accelerator.

    Use around `jax.jit(f).trace(*args).lower(lowering_platforms=(platform,))`:

        with lowering_target("cuda"):
            text = jax.jit(step).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()

    Args:
      platform: "cuda" or "tpu".
      device: the abstract device to lower for (default: `TARGET_DEVICES[platform]`).
      mesh: a `jax.sharding.Mesh` (or `AbstractMesh`) the arguments are sharded over; its axes are
        kept, only the device changes. Default: one device.

    Yields the abstract mesh in force. On the current device (a GPU for "cuda", a TPU for "tpu")
    nothing is changed: the real device answers.
    """
    if platform not in TARGET_DEVICES:
        raise ValueError(f"lowering_target(platform={platform!r}): expected one of {', '.join(TARGET_DEVICES)}.")
    on_device = {"cuda": ("gpu", "cuda"), "tpu": ("tpu",)}[platform]
    if device is None and jax.default_backend() in on_device:
        yield jax.sharding.get_abstract_mesh()
        return
    device = device or TARGET_DEVICES[platform]
    if mesh is None:
        abstract = AbstractMesh((1,), ("_target",), abstract_device=device)
    else:
        base = getattr(mesh, "abstract_mesh", mesh)
        abstract = AbstractMesh(
            tuple(base.axis_sizes), tuple(base.axis_names), tuple(base.axis_types), abstract_device=device
        )
    with jax.sharding.use_abstract_mesh(abstract):
        yield abstract


# Where MLIR's Python bindings look for a dialect's module (jaxlib's registered search prefixes).
_TRITON_DIALECT_MODULES = (
    "jaxlib.mlir.dialects.tt",
    "jaxlib.mosaic.python.tt",
    "jaxlib.thunky.python.tt",
    "jax.jaxlib.mosaic.python.tt",
)
_triton_dialects_checked = False


def _absent(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # a parent package is missing too
        return True


def skip_absent_triton_dialect_imports() -> None:
    """Mark the `tt` dialect modules that do not exist as absent (see the module docstring). Once per process."""
    global _triton_dialects_checked
    if _triton_dialects_checked:
        return
    _triton_dialects_checked = True
    for name in _TRITON_DIALECT_MODULES:
        if name not in sys.modules and _absent(name):
            sys.modules[name] = None


_SCRATCH_OPS = "_optax_ext_scratch_ops"  # the attribute a Scratch keeps its found ops in


def _scratch_ops_alive(ops) -> bool:
    """Whether remembered (alloca, load, device pointer) are still the scratch buffer's ops."""
    alloc_op, load_op, device_ptr = ops
    try:  # raises if a pass invalidated the handles
        return (
            alloc_op.operation.name == "llvm.alloca"
            and load_op.operation.name == "llvm.load"
            and device_ptr.owner.name == "builtin.unrealized_conversion_cast"
        )
    except Exception:  # noqa: BLE001  (the bindings raise RuntimeError or ValueError, by version)
        return False


def remember_mosaic_gpu_scratch() -> None:
    """Remember each Mosaic GPU scratch buffer's ops once found (see the module docstring). Idempotent."""
    try:
        from jax.experimental.mosaic.gpu import launch_context
    except ImportError:  # no Mosaic GPU in this jaxlib
        return
    scratch = getattr(launch_context, "Scratch", None)
    find = getattr(scratch, "_find_alloc_load_and_device_ptr", None)
    if find is None or getattr(find, "remembers", False):
        return

    @functools.wraps(find)
    def find_once(self):
        ops = self.__dict__.get(_SCRATCH_OPS)
        if ops is None or not _scratch_ops_alive(ops):
            ops = find(self)
            self.__dict__[_SCRATCH_OPS] = ops
        return ops

    find_once.remembers = True
    scratch._find_alloc_load_and_device_ptr = find_once
