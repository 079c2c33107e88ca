"""The memory-bandwidth floor: kernels with an optimizer's memory traffic and trivial
arithmetic, chunked and threaded exactly like ``flatopt.kernels.cpu``.  What an optimizer
step costs above this is arithmetic (sqrt, division) or overhead."""
from numba import njit, prange

# Buffer accesses per element and step (reads + writes); times the itemsize = bytes moved.
ADAM_TRAFFIC = 7
SGD_TRAFFIC = 5


@njit(parallel=True, cache=True, error_model="numpy", nogil=True)
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


@njit(parallel=True, cache=True, error_model="numpy", nogil=True)
def sgd_floor(p, g, buf, chunks):
    """SGD-with-momentum traffic: read p, g, buf; write p, buf (20 bytes per float32 element)."""
    for c in prange(chunks.shape[0]):
        lo, hi = chunks[c, 0], chunks[c, 1]
        pp, gg, bb = p[lo:hi], g[lo:hi], buf[lo:hi]
        for i in range(pp.shape[0]):
            bb[i] = bb[i] + gg[i]
            pp[i] = pp[i] + bb[i]
