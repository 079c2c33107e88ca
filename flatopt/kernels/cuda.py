"""Numba CUDA kernels: the CPU kernels' math (``flatopt.kernels.cpu``), one launch per step.

Work layout.  A step's segments are cut into chunks, ``(start, stop, segment)`` int64
rows exactly as on the CPU (the backend's plan).  Each block takes chunks in a
grid-stride loop over the chunk table; inside a chunk its threads stride over the
elements, so consecutive threads touch consecutive addresses (coalesced) and the
segment's scalars (``table[segment]``, a block-uniform row) are read once per chunk,
not once per element.  Every per-segment flag is therefore uniform across a block: no
divergence.  Hyperparameters live in the table, a kernel argument: changing them never
recompiles.

Rounding.  Every operation is written out with an explicitly rounded intrinsic:
``fma`` (``fma.rn``) exactly where the CPU kernels call ``fma`` and ``mul.rn`` /
``add.rn`` / ``div.rn`` / ``sqrt.rn`` everywhere else.  NVVM contracts a plain
``a * b + c`` into an FMA by default (numba-cuda passes no ``-fma=0``), and ptxas may
fuse ``mul``/``add`` without a rounding modifier; it does neither to ``.rn`` intrinsics.
``fastmath`` stays off (no flush-to-zero, no approximate division or square root).
Constants are typed in the buffers' dtype (``HALF``, ``ZERO``): a float32 kernel holds
no float64 instruction at all.  NaN and Inf propagate as on the CPU (comparisons are
written the same way: ``a > b or a != a``).

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the same kernel source runs as
Python on NumPy scalars; the intrinsics are replaced by NumPy operations of the same
dtype and by a correctly rounded ``fma`` (NumPy has none; the simulator's ``cuda.fma``
is an unfused ``a * b + c``), so simulated results are bitwise those of the CPU kernels.
"""
import math
from fractions import Fraction

import numpy as np
from numba import config, cuda

SIMULATOR = bool(config.ENABLE_CUDASIM)
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Number of state buffers each kernel takes between ``grads`` and ``chunks``.
N_STATES = {"sgd": 1, "rmsprop": 3, "adam": 3, "adopt": 2, "lookahead": 0}


# --- exact arithmetic for the simulator --------------------------------------------------
def _sim_fma32(a, b, c):
    """float32 ``a*b + c`` rounded once.  The product is exact in float64; the float64
    sum is made round-to-odd (two-sum error term), which then rounds correctly to float32.
    """
    x, y, z = float(a), float(b), float(c)
    prod = x * y
    s = prod + z
    if not math.isfinite(s) or not math.isfinite(prod):
        with np.errstate(all="ignore"):
            return np.float32(np.float64(x) * np.float64(y) + np.float64(z))
    bb = s - prod
    err = (prod - (s - bb)) + (z - bb)
    if err != 0.0 and not (np.float64(s).view(np.int64) & 1):
        s = float(np.nextafter(s, math.inf if err > 0 else -math.inf))
    with np.errstate(over="ignore"):
        return np.float32(s)


def _sim_fma64(a, b, c):
    """float64 ``a*b + c`` rounded once, through exact rational arithmetic."""
    x, y, z = float(a), float(b), float(c)
    if not (math.isfinite(x) and math.isfinite(y)):  # the product is Inf or NaN: as unfused
        with np.errstate(all="ignore"):
            return np.float64(x) * np.float64(y) + np.float64(z)
    if not math.isfinite(z):  # a finite exact product cannot overflow to cancel an infinite c
        return np.float64(z)
    exact = Fraction(x) * Fraction(y) + Fraction(z)
    if exact == 0:
        # IEEE: an exact zero sum is +0 unless both addends are zeros of the same sign.
        with np.errstate(all="ignore"):
            return np.float64(x) * np.float64(y) + np.float64(z) if x * y == 0 else np.float64(0.0)
    try:
        return np.float64(float(exact))  # int / int true division rounds correctly
    except OverflowError:
        return np.float64(math.inf if exact > 0 else -math.inf)


class _SimIntrinsics:
    """What the kernels call as ``cu.fma`` under the simulator: a correctly rounded FMA."""

    @staticmethod
    def fma(a, b, c):
        return _sim_fma32(a, b, c) if type(a) is np.float32 else _sim_fma64(a, b, c)


# The kernels call ``cu.fma``: numba.cuda's (``fma.rn``) on a GPU, the exact one above
# under the simulator (which swaps every global bound to ``numba.cuda`` for its own
# module, whose ``fma`` is an unfused ``a * b + c``).
cu = _SimIntrinsics if SIMULATOR else cuda


def _ops(dtype):
    """(add, mul, div, sqrt) for one dtype, each correctly rounded and never contracted
    with a neighbour.  Subtraction is ``add(a, -b)`` (negation is exact)."""
    if SIMULATOR:
        def add(a, b):
            return a + b

        def mul(a, b):
            return a * b

        def div(a, b):
            return a / b

        def sqrt(a):
            return np.sqrt(a)

        return add, mul, div, sqrt
    from numba.cuda import libdevice as ld
    if dtype == np.float32:
        return ld.fadd_rn, ld.fmul_rn, ld.fdiv_rn, ld.fsqrt_rn
    return ld.dadd_rn, ld.dmul_rn, ld.ddiv_rn, ld.dsqrt_rn


# Threads per block the kernels are built for (the launch bounds' limit; the backend's default).
MAX_BLOCK = 256

# Resident blocks per SM asked of ptxas (launch bounds), where that costs no spill and
# measured faster.  float32 RMSprop holds 46 registers, room for five blocks per SM; asked for
# six it holds 40, so more loads are in flight, and on an H200 at 10^8 elements it went from
# 0.75 to 0.90 of a device-to-device copy's bandwidth (0.85 to 0.92 with momentum).  Asked
# for more, Adam and ADOPT spill and slow down, and SGD gained nothing.
MIN_BLOCKS_PER_SM = {("rmsprop", np.dtype(np.float32)): 6}


def blocks_resident(registers):
    """Blocks of ``MAX_BLOCK`` threads that fit an SM's 64K registers at ``registers`` per
    thread (allocated 8 per thread at a time)."""
    return 65536 // (-(-registers // 8) * 8 * MAX_BLOCK)


def launch_bounds(name, dtype):
    """``(MAX_BLOCK, blocks per SM)`` for the kernels in ``MIN_BLOCKS_PER_SM``, else None:
    bounds given alone (``.maxntid``) changed ptxas' schedule and cost SGD 8% at 10^8."""
    blocks = MIN_BLOCKS_PER_SM.get((name, np.dtype(dtype)))
    return (MAX_BLOCK, blocks) if blocks else None


def _kernel(dtype):
    def jit(fn):
        if SIMULATOR:
            return cuda.jit(fn)
        return cuda.jit(fastmath=False, launch_bounds=launch_bounds(fn.__name__, dtype))(fn)
    return jit


def _build(dtype):
    """The five kernels for one dtype; constants are typed in that dtype.

    Each optimizer is an ``*_update`` device function (one element's rule, the CPU kernel's
    math; inlined) and a kernel that walks the chunks.  Inside a chunk every thread takes
    two elements per trip, ``i`` and ``i + blockDim``, and loads both before computing:
    the loads of one thread cannot pass its own earlier stores (the buffers might alias),
    so one element per trip leaves too few bytes in flight to saturate HBM with float32
    (measured on an H200: SGD at 69% of copy bandwidth, Adam at 87%).

    ``lerp``, ``maximum`` and ``clamp`` of ``flatopt.kernels.cpu`` are written out inline.
    """
    ZERO, HALF, ONE = dtype.type(0), dtype.type(0.5), dtype.type(1)
    add, mul, div, sqrt = _ops(dtype)
    device = cuda.jit(device=True) if SIMULATOR else cuda.jit(device=True, inline="always", fastmath=False)
    kernel = _kernel(dtype)

    @device
    def taken(x):  # flatopt.kernels.cpu.taken: every value but -0.0
        return x != ZERO or math.copysign(ONE, x) > ZERO

    # --- SGD: row lr, momentum, 1 - dampening, weight_decay, nesterov, maximize, first, buffered
    @device
    def sgd_update(p, g, b, neg_lr, momentum, keep, weight_decay, nesterov, maximize, first, use_buf):
        g = -g if maximize else g
        if taken(weight_decay):
            g = cu.fma(weight_decay, p, g)
        if use_buf:
            b = g if first else cu.fma(keep, g, mul(b, momentum))
            g = cu.fma(momentum, b, g) if nesterov else b
        return cu.fma(neg_lr, g, p), b

    @kernel
    def sgd(p, g, buf, chunks, table):
        c = cuda.blockIdx.x
        while c < chunks.shape[0]:
            lo, hi, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            c += cuda.gridDim.x
            neg_lr, momentum, keep, weight_decay = -table[s, 0], table[s, 1], table[s, 2], table[s, 3]
            nesterov, maximize, first = table[s, 4] != ZERO, table[s, 5] != ZERO, table[s, 6] != ZERO
            use_buf = table[s, 7] != ZERO
            read_buf = use_buf and not first
            step = cuda.blockDim.x
            i = lo + cuda.threadIdx.x
            while i < hi:
                j = i + step
                two = j < hi
                p0, g0 = p[i], g[i]
                b0 = buf[i] if read_buf else ZERO
                p1, g1, b1 = ZERO, ZERO, ZERO
                if two:
                    p1, g1 = p[j], g[j]
                    b1 = buf[j] if read_buf else ZERO
                p0, b0 = sgd_update(p0, g0, b0, neg_lr, momentum, keep, weight_decay, nesterov, maximize, first,
                                    use_buf)
                p[i] = p0
                if use_buf:
                    buf[i] = b0
                if two:
                    p1, b1 = sgd_update(p1, g1, b1, neg_lr, momentum, keep, weight_decay, nesterov, maximize, first,
                                        use_buf)
                    p[j] = p1
                    if use_buf:
                        buf[j] = b1
                i = j + step

    # --- RMSprop: row lr, alpha, 1 - alpha, (1 - alpha) - 1, eps, weight_decay, momentum,
    #     centered, maximize
    @device
    def rmsprop_update(p, g, v, b, ga, neg_lr, alpha, w, w_m1, eps, weight_decay, momentum, centered, maximize):
        g = -g if maximize else g
        if taken(weight_decay):
            g = cu.fma(weight_decay, p, g)
        v = cu.fma(mul(w, g), g, mul(v, alpha))
        if centered:
            d = add(g, -ga)  # lerp(ga, g, w): one FMA from the nearer end
            ga = cu.fma(w, d, ga) if abs(w) < HALF else cu.fma(w_m1, d, g)
            avg = add(sqrt(cu.fma(-ga, ga, v)), eps)
        else:
            avg = add(sqrt(v), eps)
        if taken(momentum):
            b = add(mul(b, momentum), div(g, avg))
            p = cu.fma(neg_lr, b, p)
        else:
            p = add(p, div(mul(neg_lr, g), avg))
        return p, v, b, ga

    @kernel
    def rmsprop(p, g, square_avg, buf, grad_avg, chunks, table):
        c = cuda.blockIdx.x
        while c < chunks.shape[0]:
            lo, hi, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            c += cuda.gridDim.x
            neg_lr, alpha, w, w_m1, eps = -table[s, 0], table[s, 1], table[s, 2], table[s, 3], table[s, 4]
            weight_decay, momentum = table[s, 5], table[s, 6]
            centered, maximize = table[s, 7] != ZERO, table[s, 8] != ZERO
            use_buf = taken(momentum)
            step = cuda.blockDim.x
            i = lo + cuda.threadIdx.x
            while i < hi:
                j = i + step
                two = j < hi
                p0, g0, v0 = p[i], g[i], square_avg[i]
                b0 = buf[i] if use_buf else ZERO
                a0 = grad_avg[i] if centered else ZERO
                p1, g1, v1, b1, a1 = ZERO, ZERO, ZERO, ZERO, ZERO
                if two:
                    p1, g1, v1 = p[j], g[j], square_avg[j]
                    b1 = buf[j] if use_buf else ZERO
                    a1 = grad_avg[j] if centered else ZERO
                p0, v0, b0, a0 = rmsprop_update(p0, g0, v0, b0, a0, neg_lr, alpha, w, w_m1, eps, weight_decay,
                                                momentum, centered, maximize)
                p[i], square_avg[i] = p0, v0
                if use_buf:
                    buf[i] = b0
                if centered:
                    grad_avg[i] = a0
                if two:
                    p1, v1, b1, a1 = rmsprop_update(p1, g1, v1, b1, a1, neg_lr, alpha, w, w_m1, eps, weight_decay,
                                                    momentum, centered, maximize)
                    p[j], square_avg[j] = p1, v1
                    if use_buf:
                        buf[j] = b1
                    if centered:
                        grad_avg[j] = a1
                i = j + step

    # --- Adam / AdamW: row lr/bc1, 1 - b1, (1 - b1) - 1, b2, 1 - b2, sqrt(bc2), eps,
    #     weight_decay, 1 - lr*wd, decoupled, amsgrad, maximize
    @device
    def adam_update(p, g, m, v, vmax, neg_step_size, w1, w1_m1, beta2, w2, bc2_sqrt, eps, weight_decay,
                    decay_factor, decoupled, amsgrad, maximize):
        g = -g if maximize else g
        if taken(weight_decay):
            if decoupled:
                p = mul(p, decay_factor)
            else:
                g = cu.fma(weight_decay, p, g)
        d = add(g, -m)  # lerp(m, g, w1)
        m = cu.fma(w1, d, m) if abs(w1) < HALF else cu.fma(w1_m1, d, g)
        v = cu.fma(mul(w2, g), g, mul(v, beta2))
        denom_v = v
        if amsgrad:
            vmax = vmax if (vmax > v or vmax != vmax) else v  # torch.maximum: NaN wins
            denom_v = vmax
        p = add(p, div(mul(neg_step_size, m), add(div(sqrt(denom_v), bc2_sqrt), eps)))
        return p, m, v, vmax

    @kernel
    def adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, chunks, table):
        c = cuda.blockIdx.x
        while c < chunks.shape[0]:
            lo, hi, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            c += cuda.gridDim.x
            neg_step_size, w1, w1_m1, beta2 = -table[s, 0], table[s, 1], table[s, 2], table[s, 3]
            w2, bc2_sqrt, eps = table[s, 4], table[s, 5], table[s, 6]
            weight_decay, decay_factor = table[s, 7], table[s, 8]
            decoupled, amsgrad, maximize = table[s, 9] != ZERO, table[s, 10] != ZERO, table[s, 11] != ZERO
            step = cuda.blockDim.x
            i = lo + cuda.threadIdx.x
            while i < hi:
                j = i + step
                two = j < hi
                p0, g0, m0, v0 = p[i], g[i], exp_avg[i], exp_avg_sq[i]
                x0 = max_exp_avg_sq[i] if amsgrad else ZERO
                p1, g1, m1, v1, x1 = ZERO, ZERO, ZERO, ZERO, ZERO
                if two:
                    p1, g1, m1, v1 = p[j], g[j], exp_avg[j], exp_avg_sq[j]
                    x1 = max_exp_avg_sq[j] if amsgrad else ZERO
                p0, m0, v0, x0 = adam_update(p0, g0, m0, v0, x0, neg_step_size, w1, w1_m1, beta2, w2, bc2_sqrt, eps,
                                             weight_decay, decay_factor, decoupled, amsgrad, maximize)
                p[i], exp_avg[i], exp_avg_sq[i] = p0, m0, v0
                if amsgrad:
                    max_exp_avg_sq[i] = x0
                if two:
                    p1, m1, v1, x1 = adam_update(p1, g1, m1, v1, x1, neg_step_size, w1, w1_m1, beta2, w2, bc2_sqrt,
                                                 eps, weight_decay, decay_factor, decoupled, amsgrad, maximize)
                    p[j], exp_avg[j], exp_avg_sq[j] = p1, m1, v1
                    if amsgrad:
                        max_exp_avg_sq[j] = x1
                i = j + step

    # --- ADOPT: row lr, 1 - b1, (1 - b1) - 1, b2, 1 - b2, eps, weight_decay, -lr*wd, clip,
    #     decouple, maximize, first_step
    @device
    def adopt_update(p, g, m, v, neg_lr, w1, w1_m1, beta2, w2, eps, weight_decay, neg_lr_wd, clip, decouple,
                     maximize, first):
        g = -g if maximize else g
        if taken(weight_decay) and not decouple:
            g = cu.fma(weight_decay, p, g)
        if first:  # v <- g^2 and nothing else
            return p, m, mul(g, g)
        if taken(weight_decay) and decouple:  # the authors' p.add_(p, alpha=-lr*wd)
            p = cu.fma(neg_lr_wd, p, p)
        sqrt_v = sqrt(v)
        normed = div(g, eps if sqrt_v < eps else sqrt_v)
        normed = -clip if normed < -clip else normed  # torch.clamp: NaN stays
        normed = clip if normed > clip else normed
        d = add(normed, -m)  # lerp(m, normed, w1)
        m = cu.fma(w1, d, m) if abs(w1) < HALF else cu.fma(w1_m1, d, normed)
        return cu.fma(neg_lr, m, p), m, cu.fma(mul(w2, g), g, mul(v, beta2))

    @kernel
    def adopt(p, g, exp_avg, exp_avg_sq, chunks, table):
        c = cuda.blockIdx.x
        while c < chunks.shape[0]:
            lo, hi, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            c += cuda.gridDim.x
            neg_lr, w1, w1_m1, beta2, w2, eps = -table[s, 0], table[s, 1], table[s, 2], table[s, 3], table[s, 4], \
                table[s, 5]
            weight_decay, neg_lr_wd, clip = table[s, 6], table[s, 7], table[s, 8]
            decouple, maximize, first = table[s, 9] != ZERO, table[s, 10] != ZERO, table[s, 11] != ZERO
            step = cuda.blockDim.x
            i = lo + cuda.threadIdx.x
            while i < hi:
                j = i + step
                two = j < hi
                p0, g0, v0 = p[i], g[i], exp_avg_sq[i]
                m0 = ZERO if first else exp_avg[i]
                p1, g1, m1, v1 = ZERO, ZERO, ZERO, ZERO
                if two:
                    p1, g1, v1 = p[j], g[j], exp_avg_sq[j]
                    m1 = ZERO if first else exp_avg[j]
                p0, m0, v0 = adopt_update(p0, g0, m0, v0, neg_lr, w1, w1_m1, beta2, w2, eps, weight_decay,
                                          neg_lr_wd, clip, decouple, maximize, first)
                exp_avg_sq[i] = v0
                if not first:
                    p[i], exp_avg[i] = p0, m0
                if two:
                    p1, m1, v1 = adopt_update(p1, g1, m1, v1, neg_lr, w1, w1_m1, beta2, w2, eps, weight_decay,
                                              neg_lr_wd, clip, decouple, maximize, first)
                    exp_avg_sq[j] = v1
                    if not first:
                        p[j], exp_avg[j] = p1, m1
                i = j + step

    # --- Lookahead: row alpha, 1 - alpha;  slow <- alpha*fast + (1 - alpha)*slow; fast <- slow
    @kernel
    def lookahead(fast, slow, chunks, table):
        c = cuda.blockIdx.x
        while c < chunks.shape[0]:
            lo, hi, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            c += cuda.gridDim.x
            alpha, keep = table[s, 0], table[s, 1]
            step = cuda.blockDim.x
            i = lo + cuda.threadIdx.x
            while i < hi:
                j = i + step
                two = j < hi
                f0, s0 = fast[i], slow[i]
                f1, s1 = ZERO, ZERO
                if two:
                    f1, s1 = fast[j], slow[j]
                merged = cu.fma(keep, s0, mul(f0, alpha))
                slow[i] = merged
                fast[i] = merged
                if two:
                    merged = cu.fma(keep, s1, mul(f1, alpha))
                    slow[j] = merged
                    fast[j] = merged
                i = j + step

    return {"sgd": sgd, "rmsprop": rmsprop, "adam": adam, "adopt": adopt, "lookahead": lookahead}


_KERNELS = {}


def get_kernel(name, dtype):
    """The dispatcher of kernel ``name`` for ``dtype`` (compiled at its first launch)."""
    dtype = np.dtype(dtype)
    kernels = _KERNELS.get(dtype)
    if kernels is None:
        if dtype not in DTYPES:
            raise TypeError(f"flatopt's CUDA kernels support float32 and float64, not {dtype}")
        kernels = _KERNELS[dtype] = _build(dtype)
    return kernels[name]


def signature(name, dtype):
    """The kernel's Numba signature for contiguous buffers, e.g. for ``cuda.compile_ptx``."""
    ty = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}[np.dtype(dtype)]
    arrays = 2 + N_STATES[name]
    return "void(" + ", ".join([f"{ty}[::1]"] * arrays + ["int64[:, ::1]", f"{ty}[:, ::1]"]) + ")"
