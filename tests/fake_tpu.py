"""Lowering for TPU from a CPU: a few Mosaic lowering rules (e.g. `sign`, used by Lion) ask the
*current* device's TPU generation; from a CPU there is none, so register the CPU as a TPU v5e for
lowering only. Private jax API (`jax._src.pallas.mosaic.tpu_info`, tested with jax 0.10.2), used by
tests alone: nothing in the library depends on it. The one place that touches it: when jax's
internals move, the tests that need it are skipped with the reason, not failed."""

import jax


def _tpu_info():
    """(registry, chip_version_of(kind), v5e info factory), or raise ImportError/AttributeError."""
    from jax._src.pallas.mosaic import tpu_info

    impl, v5e = tpu_info._get_tpu_info_impl, tpu_info.ChipVersion.TPU_V5E
    return tpu_info.registry, tpu_info.chip_version_from_device_kind, lambda: impl(v5e, 1)


def pretend_cpu_is_a_tpu_v5e(setitem=None):
    """Register the CPU device kind as a TPU v5e; returns whether the fake TPU is in place.

    With `setitem(registry, key, value)`, pytest's `monkeypatch.setitem` (which undoes it after the
    test), this is a test asking: if jax's private `tpu_info` moved, the test is skipped
    (`pytest.skip`) with the reason. Without (a script, e.g. tests/sharded_checks.py), the
    registration is permanent and False comes back instead.
    """
    try:
        registry, chip_version_of, v5e = _tpu_info()
    except (ImportError, AttributeError) as e:  # pragma: no cover - layout of jax internals changed
        if setitem is None:
            return False
        import pytest

        pytest.skip(
            f"cannot fake a TPU for Mosaic lowering on jax {jax.__version__}: the private "
            f"jax._src.pallas.mosaic.tpu_info changed ({type(e).__name__}: {e}); update tests/fake_tpu.py"
        )
    kind = jax.devices()[0].device_kind
    if chip_version_of(kind) is None and kind not in registry:
        if setitem is None:
            registry[kind] = v5e
        else:
            setitem(registry, kind, v5e)
    return True
