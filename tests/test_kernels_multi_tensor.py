"""The multi-tensor launch plan and block addressing, checked without running a kernel.

The interpreter drops stores past the end of an array and pads loads, so an off-by-some mask in a
store would pass every interpret-mode test and corrupt the neighbouring buffer on a GPU. Here the
addressing itself is replayed in Python for every program of a launch: each element of each leaf
must be covered by exactly one (program, lane), and no unmasked lane may fall outside its leaf.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from optax_ext.kernels import multi_tensor as mt


def _coverage(launch: mt.Launch, k: int) -> np.ndarray:
    """How many times each element of leaf k (flattened, plus 2 blocks of slack) is addressed."""
    seg = launch.segments[k]
    rows, cols, b = seg.rows, seg.cols, launch.block
    hits = np.zeros(rows * cols + 2 * b, np.int64)
    iota = jnp.arange(b, dtype=jnp.int32)
    for program in range(seg.start, seg.start + launch.num_blocks(seg)):
        cur = mt._Cursor(jnp.int32(program), iota)

        def record(index, mask, program=program):
            *row, ds = index
            row = int(row[0]) if row else 0
            lanes = int(ds.start) + np.arange(ds.size)
            keep = np.ones(b, bool) if mask is None else np.asarray(mask)
            assert ((lanes < cols) | ~keep).all(), f"unmasked lane past the row end at program {program}"
            np.add.at(hits, row * cols + lanes[keep], 1)

        mt._on_block(launch, seg, cur, lambda index: record(index, None), record)
    return hits


@pytest.mark.parametrize(
    "sizes,block",
    [
        ([1, 7, 1000, 4096, 4097, 3 * 1024 + 5, 16 * 128], 4096),
        ([1, 7, 1000, 4096, 4097, 3 * 1024 + 5], 256),
        ([2**17 + 3, 5], 4096),
    ],
)
def test_every_element_addressed_exactly_once(sizes, block):
    for launch in mt.plan(sizes, 7, block):
        for k, leaf in enumerate(launch.leaves):
            hits = _coverage(launch, k)
            n = sizes[leaf]
            assert (hits[:n] == 1).all() and (hits[n:] == 0).all(), (sizes[leaf], launch.block)


def test_huge_leaves_addressed_row_by_row(monkeypatch):
    monkeypatch.setattr(mt, "INDEX_LIMIT", 3000)
    monkeypatch.setattr(mt, "MIN_HUGE_COLS", 64)
    sizes = [5 * 1031, 4 * 1024, 11]
    (launch,) = mt.plan(sizes, 1, 256)
    assert [s.view for s in launch.segments] == [(5, 1031), (2, 2048), (11,)]
    for k, n in enumerate(sizes):
        hits = _coverage(launch, k)
        assert (hits[:n] == 1).all() and (hits[n:] == 0).all()


def test_plan_places_blocks_back_to_back():
    launches = mt.plan([1, 0, 4096, 4097, 10, 3], refs_per_leaf=7, block=4096, extra_refs=2, max_leaves=3)
    # Size 0 is left out; three leaves per launch; the block shrinks to the largest leaf of a launch.
    assert [launch.leaves for launch in launches] == [(0, 2, 3), (4, 5)]
    first, second = launches
    assert first.block == 4096 and [s.start for s in first.segments] == [0, 1, 2]
    assert first.num_programs == 1 + 1 + 2
    assert second.block == 16 and [s.start for s in second.segments] == [0, 1] and second.num_programs == 2
    # The refs budget: (30 - 2) // 7 = 4 leaves per launch.
    assert [len(x.leaves) for x in mt.plan([9] * 10, 7, 4096, extra_refs=2, max_refs=30)] == [4, 4, 2]
    assert mt.plan([], 7, 4096) == []


def test_huge_leaf_views():
    assert mt.view_for(1000) == (1000,)
    n = 3 * (mt.INDEX_LIMIT - 5)  # over the int32 limit: three rows
    assert mt.view_for(n) == (3, mt.INDEX_LIMIT - 5)
    assert mt.view_for(2**31 + 11) is None  # 2147483659 is prime: no rows
    (big,) = mt.plan([n], 7, 4096)
    assert big.segments[0].rows == 3 and big.num_programs == 3 * -(-(mt.INDEX_LIMIT - 5) // 4096)
    assert mt.plan([2**31 + 11], 7, 4096) == []  # left to the caller's XLA path
