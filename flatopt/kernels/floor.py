"""The memory-bandwidth floor: kernels with an optimizer's memory traffic and trivial
arithmetic, chunked and threaded exactly like ``flatopt.kernels.cpu``.  What an optimizer
step costs above this is arithmetic (sqrt, division) or overhead."""
from numba import njit, prange

from flatopt.kernels.cpu import CACHE


@njit(inline="always", error_model="numpy")
def _adam_traffic(pp, gg, mm, vv):
    for i in range(pp.shape[0]):
        gi = gg[i]
        mm[i] = mm[i] + gi
        vv[i] = vv[i] + gi
        pp[i] = pp[i] + mm[i]


@njit(parallel=True, cache=CACHE, error_model="numpy", nogil=True)
def adam_floor(p, g, m, v, chunks):
    """Adam's traffic: read p, g, m, v; write p, m, v (28 bytes per float32 element)."""
    for c in prange(chunks.shape[0]):
        lo, hi = chunks[c, 0], chunks[c, 1]
        _adam_traffic(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi])


@njit(cache=CACHE, error_model="numpy", nogil=True)
def adam_floor_serial(p, g, m, v, chunks):
    """``adam_floor`` on the calling thread, as flatopt steps a buffer below its threaded size."""
    for c in range(chunks.shape[0]):
        lo, hi = chunks[c, 0], chunks[c, 1]
        _adam_traffic(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi])
