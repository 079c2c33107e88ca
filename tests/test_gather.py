"""Steps that read the gradients from buffers of their own (``flatopt.backend.Gather``, what
flatopt.torch uses after ``zero_grad()``) against the same steps on one flat gradient buffer."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flatopt
from conftest import DTYPES, dtype_name, needs_threads, sweep
from flatopt.backend import CPU, Gather, GatherCut

OPTIMIZERS = {
    "SGD nesterov": lambda: flatopt.SGD(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
    "RMSprop centered": lambda: flatopt.RMSprop(lr=1e-2, centered=True, momentum=0.5),
    "Adam": lambda: flatopt.Adam(lr=1e-2, weight_decay=0.1),
    "AdamW amsgrad": lambda: flatopt.AdamW(lr=1e-2, amsgrad=True),
    "ADOPT": lambda: flatopt.ADOPT(lr=1e-2),
}
SIZES = [0, 13, 0, 200, 1, 64, 0, 500, 37, 0]  # zero-size buffers between others, and at the end


def _same_bits(a, b):
    return a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _two_runs(make, dtype, groups, steps=4, seed=0):
    """The same steps on a flat gradient buffer and on per-tensor buffers read in place."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(SIZES)[:-1]]).astype(np.int64)
    n = sum(SIZES)
    flat, gathered = make(), make()
    if groups is not None:
        flat.param_groups, gathered.param_groups = [dict(g) for g in groups], [dict(g) for g in groups]
    params = rng.standard_normal(n).astype(dtype)
    p_flat, p_gathered = params.copy(), params.copy()
    unread = np.full(n, np.nan, dtype)  # the flat buffer a gathered step is given: checked, never read
    cut = GatherCut()  # kept from step to step, as flatopt.torch keeps it: the addresses change, the cut not
    for _ in range(steps):
        grads = rng.standard_normal(n).astype(dtype)
        parts = [grads[o:o + s].copy() for o, s in zip(offsets, SIZES)]  # each in memory of its own
        addresses = np.array([part.ctypes.data for part in parts], dtype=np.int64)
        flat.step(p_flat, grads)
        gathered.step(p_gathered, unread, _gather=Gather(offsets, addresses, cut))
    return (p_flat, flat), (p_gathered, gathered)


@pytest.mark.parametrize("threads", [False, pytest.param(True, marks=needs_threads)], ids=["serial", "threaded"])
@pytest.mark.parametrize("groups", [None, [dict(start=0, stop=250), dict(start=250, stop=300, frozen=True),
                                           dict(start=300, stop=sum(SIZES), lr=0.05)]],
                         ids=["one group", "groups and a frozen span"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_gathered_step_is_the_flat_step_bitwise(name, dtype, groups, threads, monkeypatch):
    # Threaded: chunks start inside gradient buffers, whose pieces then start past their first element.
    monkeypatch.setattr(CPU, "parallel_min", 1 if threads else 1 << 40)
    monkeypatch.setattr(CPU, "chunks_per_thread", 7)
    (p_flat, flat), (p_gathered, gathered) = _two_runs(OPTIMIZERS[name], dtype, groups)
    assert _same_bits(p_flat, p_gathered)
    assert sorted(flat.state) == sorted(gathered.state)
    for key in flat.state:
        assert _same_bits(flat.state[key], gathered.state[key]), key


def _chunks(n, cuts):
    bounds = sorted({0, n, *(c for c in cuts if c < n)})
    return np.array([(lo, hi, i % 3) for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))],
                    dtype=np.int64).reshape(-1, 3)


@sweep(100)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12), cuts=st.lists(st.integers(0, 400), max_size=8),
       other_cuts=st.lists(st.integers(0, 400), max_size=8), itemsize=st.sampled_from([4, 8]))
def test_pieces_lie_each_in_one_gradient_buffer_and_cover_the_chunks(sizes, cuts, other_cuts, itemsize):
    """Also through one kept :class:`GatherCut`, as the steps use it: new addresses at every
    call, now and then other chunks or another itemsize (a cut kept stale would point the
    pieces at the last call's buffers, or cut them where the last chunks ended)."""
    n = sum(sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    chunks, other_chunks = _chunks(n, cuts), _chunks(n, other_cuts)
    kept = GatherCut()
    calls = [(chunks, itemsize, None), (chunks, itemsize, kept), (chunks, itemsize, kept),
             (other_chunks, itemsize, kept), (chunks, 12 - itemsize, kept), (chunks, itemsize, kept)]
    for call, (chunks, size, cut) in enumerate(calls):
        addresses = (np.arange(1, len(sizes) + 1, dtype=np.int64) + 64 * call) << 20  # far apart, new each call
        pieces = Gather(offsets, addresses, cut).pieces(chunks, size)
        covered = []
        for lo, hi, segment, address in pieces:
            assert lo < hi
            buffer = np.searchsorted(offsets, lo, side="right") - 1
            assert hi <= offsets[buffer] + sizes[buffer]  # within one buffer
            assert address == addresses[buffer] + (lo - offsets[buffer]) * size
            chunk = np.searchsorted(chunks[:, 0], lo, side="right") - 1
            assert chunks[chunk, 0] <= lo and hi <= chunks[chunk, 1] and segment == chunks[chunk, 2]
            covered.append((lo, hi))
        assert covered == sorted(covered)
        assert sum(hi - lo for lo, hi in covered) == n
