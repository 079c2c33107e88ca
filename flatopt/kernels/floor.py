"""The memory-bandwidth floor: kernels with an optimizer's memory traffic and trivial
arithmetic, chunked and threaded exactly like ``flatopt.kernels.cpu``.  What an optimizer
step costs above this is arithmetic (sqrt, division) or overhead."""
from numba import njit, prange

from flatopt.kernels.cpu import CACHE


@njit(parallel=True, cache=CACHE, error_model="numpy", nogil=True)
def adam_floor(p, g, m, v, chunks):
    """Adam's traffic: read p, g, m, v; write p, m, v (28 bytes per float32 element)."""
    for c in prange(chunks.shape[0]):
        lo, hi = chunks[c, 0], chunks[c, 1]
        pp, gg, mm, vv = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
        for i in range(pp.shape[0]):
            gi = gg[i]
            mm[i] = mm[i] + gi
            vv[i] = vv[i] + gi
            pp[i] = pp[i] + mm[i]
