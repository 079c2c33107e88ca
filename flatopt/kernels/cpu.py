"""Numba CPU kernels: one fused pass over the flat buffers per optimizer step.

Every optimizer has one ``*_chunk`` function holding its update rule for a contiguous
run of elements, and two drivers that run it over a table of chunks: ``*_serial`` for
small buffers and ``*_parallel`` (``prange`` over chunks) for large ones.  A chunk row is
``(start, stop, segment)``; ``table[segment]`` holds that segment's scalars, already
rounded to the buffers' dtype by the optimizer class (see ``flatopt/optimizers``).

Rounding follows torch.optim's single-tensor CPU path operation by operation:
``add(alpha=)``, ``lerp`` and ``addcmul`` are one fused multiply-add in torch (AVX2
``fmadd``), ``addcdiv`` and scalar division are not, so the kernels call :func:`fma`
exactly where torch fuses and nowhere else.  ``fastmath`` stays off: it would let LLVM
fuse other products and would drop the NaN/Inf semantics users rely on.

Each chunk is processed through sub-views indexed from zero: LLVM can then prove the
index non-negative and vectorizes the loop (with ``range(start, stop)`` it does not).
State buffers an optimizer does not need (no momentum, no amsgrad) are passed empty and
never indexed: the row's flags say which buffers a segment uses.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

_JIT = dict(cache=True, error_model="numpy", nogil=True)
_INLINE = dict(inline="always", error_model="numpy")


@intrinsic
def fma(typingctx, x, y, z):
    """``x * y + z`` rounded once (``llvm.fma``); vectorizes to ``vfmadd``."""
    if not (isinstance(x, types.Float) and x == y == z):
        return None

    def codegen(context, builder, signature, args):
        ty = context.get_value_type(x)
        name = "llvm.fma.f32" if x.bitwidth == 32 else "llvm.fma.f64"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty] * 3), name)
        return builder.call(fn, args)

    return x(x, y, z), codegen


@njit(**_INLINE)
def lerp(start, end, weight, weight_minus_one):
    """torch.lerp's rounding: one FMA from whichever end the weight is nearer."""
    if weight < 0.5:
        return fma(weight, end - start, start)
    return fma(weight_minus_one, end - start, end)


@njit(**_INLINE)
def maximum(a, b):
    """torch.maximum: NaN in either argument gives NaN."""
    return a if (a > b or a != a) else b


@njit(**_INLINE)
def clamp(x, low, high):
    """torch.clamp: NaN stays NaN (a plain ``max``/``min`` would replace it)."""
    x = low if x < low else x
    return high if x > high else x


# --- SGD ------------------------------------------------------------------------------
# row: lr, momentum, 1 - dampening, weight_decay, nesterov, maximize, first_momentum_step, buffered
#   g <- -g if maximize;  g <- g + wd*p
#   buf <- g (first step) | momentum*buf + (1 - dampening)*g
#   g <- g + momentum*buf (nesterov) | buf;   p <- p - lr*g
@njit(**_INLINE)
def sgd_chunk(p, g, buf, row):
    lr, momentum, keep, weight_decay = row[0], row[1], row[2], row[3]
    nesterov, maximize, first, use_buf = row[4] != 0, row[5] != 0, row[6] != 0, row[7] != 0
    for i in range(p.shape[0]):
        gi = -g[i] if maximize else g[i]
        if weight_decay != 0:
            gi = fma(weight_decay, p[i], gi)
        if use_buf:
            b = gi if first else fma(keep, gi, buf[i] * momentum)
            buf[i] = b
            gi = fma(momentum, b, gi) if nesterov else b
        p[i] = fma(-lr, gi, p[i])


@njit(parallel=True, **_JIT)
def sgd_parallel(p, g, buf, chunks, table):
    for c in prange(chunks.shape[0]):
        lo, hi, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        sgd_chunk(p[lo:hi], g[lo:hi], buf[lo:hi], table[s])


@njit(**_JIT)
def sgd_serial(p, g, buf, chunks, table):
    for c in range(chunks.shape[0]):
        lo, hi, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        sgd_chunk(p[lo:hi], g[lo:hi], buf[lo:hi], table[s])


# --- RMSprop --------------------------------------------------------------------------
# row: lr, alpha, 1 - alpha, (1 - alpha) - 1, eps, weight_decay, momentum, centered, maximize
#   v <- alpha*v + (1 - alpha)*g^2;   avg <- sqrt(v - ga^2) + eps, ga <- lerp(ga, g, 1 - alpha) (centered)
#   buf <- momentum*buf + g/avg, p <- p - lr*buf (momentum) | p <- p - lr*g/avg
@njit(**_INLINE)
def rmsprop_chunk(p, g, square_avg, buf, grad_avg, row):
    lr, alpha, w, w_m1, eps, weight_decay, momentum = row[0], row[1], row[2], row[3], row[4], row[5], row[6]
    centered, maximize = row[7] != 0, row[8] != 0
    neg_lr = -lr
    for i in range(p.shape[0]):
        gi = -g[i] if maximize else g[i]
        if weight_decay != 0:
            gi = fma(weight_decay, p[i], gi)
        v = fma(w * gi, gi, square_avg[i] * alpha)
        square_avg[i] = v
        if centered:
            ga = lerp(grad_avg[i], gi, w, w_m1)
            grad_avg[i] = ga
            avg = np.sqrt(fma(-ga, ga, v)) + eps
        else:
            avg = np.sqrt(v) + eps
        if momentum > 0:
            b = buf[i] * momentum + gi / avg
            buf[i] = b
            p[i] = fma(neg_lr, b, p[i])
        else:
            p[i] = p[i] + (neg_lr * gi) / avg


@njit(parallel=True, **_JIT)
def rmsprop_parallel(p, g, square_avg, buf, grad_avg, chunks, table):
    for c in prange(chunks.shape[0]):
        lo, hi, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        rmsprop_chunk(p[lo:hi], g[lo:hi], square_avg[lo:hi], buf[lo:hi], grad_avg[lo:hi], table[s])


@njit(**_JIT)
def rmsprop_serial(p, g, square_avg, buf, grad_avg, chunks, table):
    for c in range(chunks.shape[0]):
        lo, hi, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        rmsprop_chunk(p[lo:hi], g[lo:hi], square_avg[lo:hi], buf[lo:hi], grad_avg[lo:hi], table[s])


# --- Adam / AdamW ---------------------------------------------------------------------
# row: lr/bc1, 1 - b1, (1 - b1) - 1, b2, 1 - b2, sqrt(bc2), eps, weight_decay, 1 - lr*wd,
#      decoupled, amsgrad, maximize          (bc_i = 1 - b_i^t)
#   p <- p*(1 - lr*wd) (AdamW) | g <- g + wd*p (Adam)
#   m <- lerp(m, g, 1 - b1);  v <- b2*v + (1 - b2)*g^2;  vmax <- max(vmax, v) (amsgrad)
#   p <- p - (lr/bc1) * m / (sqrt(v or vmax)/sqrt(bc2) + eps)
@njit(**_INLINE)
def adam_chunk(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, row):
    step_size, w1, w1_m1, beta2, w2, bc2_sqrt, eps = row[0], row[1], row[2], row[3], row[4], row[5], row[6]
    weight_decay, decay_factor = row[7], row[8]
    decoupled, amsgrad, maximize = row[9] != 0, row[10] != 0, row[11] != 0
    neg_step_size = -step_size
    for i in range(p.shape[0]):
        gi = -g[i] if maximize else g[i]
        pi = p[i]
        if weight_decay != 0:
            if decoupled:
                pi = pi * decay_factor
            else:
                gi = fma(weight_decay, pi, gi)
        m = lerp(exp_avg[i], gi, w1, w1_m1)
        v = fma(w2 * gi, gi, exp_avg_sq[i] * beta2)
        exp_avg[i] = m
        exp_avg_sq[i] = v
        if amsgrad:
            v = maximum(max_exp_avg_sq[i], v)
            max_exp_avg_sq[i] = v
        p[i] = pi + (neg_step_size * m) / (np.sqrt(v) / bc2_sqrt + eps)


@njit(parallel=True, **_JIT)
def adam_parallel(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, chunks, table):
    for c in prange(chunks.shape[0]):
        lo, hi, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        adam_chunk(p[lo:hi], g[lo:hi], exp_avg[lo:hi], exp_avg_sq[lo:hi], max_exp_avg_sq[lo:hi], table[s])


@njit(**_JIT)
def adam_serial(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, chunks, table):
    for c in range(chunks.shape[0]):
        lo, hi, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        adam_chunk(p[lo:hi], g[lo:hi], exp_avg[lo:hi], exp_avg_sq[lo:hi], max_exp_avg_sq[lo:hi], table[s])


# --- ADOPT (Taniguchi et al., 2024; the authors' implementation) ----------------------
# row: lr, 1 - b1, (1 - b1) - 1, b2, 1 - b2, eps, weight_decay, 1 - lr*wd, clip, decouple,
#      maximize, first_step
#   first step: v <- g^2 only.  Later, with t earlier steps:
#   p <- p*(1 - lr*wd) (decouple) | g <- g + wd*p;   n <- clip(g / max(sqrt(v), eps), t^0.25)
#   m <- lerp(m, n, 1 - b1);  p <- p - lr*m;  v <- b2*v + (1 - b2)*g^2
@njit(**_INLINE)
def adopt_chunk(p, g, exp_avg, exp_avg_sq, row):
    lr, w1, w1_m1, beta2, w2, eps = row[0], row[1], row[2], row[3], row[4], row[5]
    weight_decay, decay_factor, clip = row[6], row[7], row[8]
    decouple, maximize, first = row[9] != 0, row[10] != 0, row[11] != 0
    neg_lr = -lr
    for i in range(p.shape[0]):
        gi = -g[i] if maximize else g[i]
        pi = p[i]
        if weight_decay != 0 and not decouple:
            gi = fma(weight_decay, pi, gi)
        if first:
            exp_avg_sq[i] = gi * gi
            continue
        if weight_decay != 0 and decouple:
            pi = pi * decay_factor
        v = exp_avg_sq[i]
        sqrt_v = np.sqrt(v)
        normed = gi / (eps if sqrt_v < eps else sqrt_v)
        m = lerp(exp_avg[i], clamp(normed, -clip, clip), w1, w1_m1)
        exp_avg[i] = m
        p[i] = fma(neg_lr, m, pi)
        exp_avg_sq[i] = fma(w2 * gi, gi, v * beta2)


@njit(parallel=True, **_JIT)
def adopt_parallel(p, g, exp_avg, exp_avg_sq, chunks, table):
    for c in prange(chunks.shape[0]):
        lo, hi, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        adopt_chunk(p[lo:hi], g[lo:hi], exp_avg[lo:hi], exp_avg_sq[lo:hi], table[s])


@njit(**_JIT)
def adopt_serial(p, g, exp_avg, exp_avg_sq, chunks, table):
    for c in range(chunks.shape[0]):
        lo, hi, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        adopt_chunk(p[lo:hi], g[lo:hi], exp_avg[lo:hi], exp_avg_sq[lo:hi], table[s])


# --- Lookahead synchronisation --------------------------------------------------------
# row: alpha, 1 - alpha
#   slow <- alpha*fast + (1 - alpha)*slow  (= slow + alpha*(fast - slow));  fast <- slow
# Rounded as the reference wrapper does it: p.mul_(alpha).add_(q, alpha=1 - alpha).
@njit(**_INLINE)
def lookahead_chunk(fast, slow, row):
    alpha, keep = row[0], row[1]
    for i in range(fast.shape[0]):
        merged = fma(keep, slow[i], fast[i] * alpha)
        slow[i] = merged
        fast[i] = merged


@njit(parallel=True, **_JIT)
def lookahead_parallel(fast, slow, chunks, table):
    for c in prange(chunks.shape[0]):
        lo, hi, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        lookahead_chunk(fast[lo:hi], slow[lo:hi], table[s])


@njit(**_JIT)
def lookahead_serial(fast, slow, chunks, table):
    for c in range(chunks.shape[0]):
        lo, hi, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        lookahead_chunk(fast[lo:hi], slow[lo:hi], table[s])
