"""Lowering for TPU from a CPU: a few Mosaic lowering rules (e.g. `sign`, used by Lion) ask the
*current* device's TPU generation; from a CPU there is none, so register the CPU as a TPU v5e for
lowering only. Private jax API, used by tests alone: nothing in the library depends on it."""

import jax


def pretend_cpu_is_a_tpu_v5e(setitem=None):
    """Register the CPU device kind as a TPU v5e (with `setitem(registry, key, value)`, e.g.
    pytest's monkeypatch.setitem, to undo it after a test). Returns False if jax's layout changed."""
    try:
        from jax._src.pallas.mosaic import tpu_info
    except ImportError:  # pragma: no cover - layout of jax internals changed
        return False
    kind = jax.devices()[0].device_kind
    if tpu_info.chip_version_from_device_kind(kind) is None and kind not in tpu_info.registry:
        fake = lambda: tpu_info._get_tpu_info_impl(tpu_info.ChipVersion.TPU_V5E, 1)  # noqa: E731
        if setitem is None:
            tpu_info.registry[kind] = fake
        else:
            setitem(tpu_info.registry, kind, fake)
    return True
