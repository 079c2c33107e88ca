"""Numba CPU kernels: one fused pass over the flat buffers per optimizer step.

Every optimizer has one ``*_chunk`` function holding its update rule for a contiguous run
of ``n`` elements.  Each rule is compiled once per dtype into a C callback
(:func:`rule_address`), and two drivers shared by every rule call it chunk by chunk through
that address: :func:`run_serial` for small buffers and :func:`run_parallel` (``prange``
over chunks) for large ones.  Compiling the rule once, rather than inlined into a serial and
a threaded driver of its own, takes a third off a fresh process's compile time, and the
drivers, compiled once per dtype, serve every optimizer.  A chunk row is
``(start, stop, segment)``; ``table[segment]`` holds that segment's scalars, already rounded
to the buffers' dtype by the optimizer class (see ``flatopt/optimizers``).  Two more drivers,
:func:`run_serial_gathered` and :func:`run_parallel_gathered`, read each chunk's gradients
from a buffer of its own (``flatopt.backend.Gather``) instead of from one flat buffer.

Every rule takes the same C arguments: pointers to the chunk's parameters, gradients and
three state buffers, a pointer to its row of scalars, and ``n``.  State buffers a rule does
not need (no momentum, no amsgrad, fewer than three) are passed empty and never read: the
row's flags say which buffers a segment uses.  Going through a pointer costs one indirect
call per chunk, and the drivers pass raw pointers, so the threads touch no reference counts.

Rounding follows torch.optim's single-tensor CPU path operation by operation:
``add(alpha=)``, ``lerp`` and ``addcmul`` are one fused multiply-add in torch (AVX2
``fmadd``), ``addcdiv`` and scalar division are not, so the rules call :func:`fma`
exactly where torch fuses and nowhere else.  ``fastmath`` stays off: it would let LLVM
fuse other products and would drop the NaN/Inf semantics users rely on.
"""
import math
import os
import warnings

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, from_dtype, njit, prange
from numba.core import cgutils, types
from numba.core.compiler_lock import global_compiler_lock
from numba.extending import intrinsic

from flatopt.backend import ForkSafeLock


def _disk_cache():
    """Whether Numba can keep the compiled kernels on disk: next to these sources, or in the
    user's cache directory (``NUMBA_CACHE_DIR``).  Where neither is writable (a read-only
    install in a container without a home, say), ``cache=True`` would refuse to define the
    kernels at all; they are then compiled in every process instead, with a warning."""
    def probe():
        pass
    try:
        njit(cache=True)(probe)  # finds a cache directory (writing a test file), compiles nothing
    except RuntimeError as error:  # "cannot cache function 'probe': no locator available for file ..."
        chosen = os.environ.get("NUMBA_CACHE_DIR")
        advice = (f"NUMBA_CACHE_DIR={chosen} is not a writable directory: point it at one" if chosen else
                  "Set NUMBA_CACHE_DIR to a writable directory")
        warnings.warn(f"flatopt compiles its kernels in every process: Numba has nowhere to cache them ({error}). "
                      f"{advice} to keep them between processes.", RuntimeWarning, stacklevel=2)
        return False
    return True


CACHE = _disk_cache()  # one answer for this package's kernel modules (one directory)
_JIT = dict(cache=CACHE, error_model="numpy", nogil=True)
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
    """torch.lerp's rounding: one FMA from ``start`` for a weight of magnitude below 1/2, else
    from ``end`` (RMSprop's weight ``1 - alpha`` may be negative)."""
    if abs(weight) < 0.5:
        return fma(weight, end - start, start)
    return fma(weight_minus_one, end - start, end)


@njit(**_INLINE)
def taken(x):
    """Whether a row's hyperparameter takes the branch torch takes on its Python float
    (``flatopt.optimizers.base.branch_in_sign``): every value but -0.0, 1e-300 rounded to
    +0.0 in float32 included."""
    return x != 0 or math.copysign(1.0, x) > 0


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
#   g <- -g if maximize;  g <- g + wd*p (taken(wd): see taken)
#   buf <- g (first step) | momentum*buf + (1 - dampening)*g
#   g <- g + momentum*buf (nesterov) | buf;   p <- p - lr*g
def sgd_chunk(p, g, buf, _unused1, _unused2, row, n):
    p, g, buf, row = carray(p, n), carray(g, n), carray(buf, n), carray(row, 8)
    lr, momentum, keep, weight_decay = row[0], row[1], row[2], row[3]
    nesterov, maximize, first, use_buf = row[4] != 0, row[5] != 0, row[6] != 0, row[7] != 0
    decays = taken(weight_decay)
    for i in range(n):
        gi = -g[i] if maximize else g[i]
        if decays:
            gi = fma(weight_decay, p[i], gi)
        if use_buf:
            b = gi if first else fma(keep, gi, buf[i] * momentum)
            buf[i] = b
            gi = fma(momentum, b, gi) if nesterov else b
        p[i] = fma(-lr, gi, p[i])


# --- RMSprop --------------------------------------------------------------------------
# row: lr, alpha, 1 - alpha, (1 - alpha) - 1, eps, weight_decay, momentum, centered, maximize
#   v <- alpha*v + (1 - alpha)*g^2;   avg <- sqrt(v - ga^2) + eps, ga <- lerp(ga, g, 1 - alpha) (centered)
#   buf <- momentum*buf + g/avg, p <- p - lr*buf (taken(momentum)) | p <- p - lr*g/avg
def rmsprop_chunk(p, g, square_avg, buf, grad_avg, row, n):
    p, g, square_avg, buf = carray(p, n), carray(g, n), carray(square_avg, n), carray(buf, n)
    grad_avg, row = carray(grad_avg, n), carray(row, 9)
    lr, alpha, w, w_m1, eps, weight_decay, momentum = row[0], row[1], row[2], row[3], row[4], row[5], row[6]
    centered, maximize = row[7] != 0, row[8] != 0
    decays, buffered = taken(weight_decay), taken(momentum)
    neg_lr = -lr
    for i in range(n):
        gi = -g[i] if maximize else g[i]
        if decays:
            gi = fma(weight_decay, p[i], gi)
        v = fma(w * gi, gi, square_avg[i] * alpha)
        square_avg[i] = v
        if centered:
            ga = lerp(grad_avg[i], gi, w, w_m1)
            grad_avg[i] = ga
            avg = np.sqrt(fma(-ga, ga, v)) + eps
        else:
            avg = np.sqrt(v) + eps
        if buffered:
            b = buf[i] * momentum + gi / avg
            buf[i] = b
            p[i] = fma(neg_lr, b, p[i])
        else:
            p[i] = p[i] + (neg_lr * gi) / avg


# --- Adam / AdamW ---------------------------------------------------------------------
# row: lr/bc1, 1 - b1, (1 - b1) - 1, b2, 1 - b2, sqrt(bc2), eps, weight_decay, 1 - lr*wd,
#      decoupled, amsgrad, maximize          (bc_i = 1 - b_i^t)
#   p <- p*(1 - lr*wd) (AdamW) | g <- g + wd*p (Adam)
#   m <- lerp(m, g, 1 - b1);  v <- b2*v + (1 - b2)*g^2;  vmax <- max(vmax, v) (amsgrad)
#   p <- p - (lr/bc1) * m / (sqrt(v or vmax)/sqrt(bc2) + eps)
def adam_chunk(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, row, n):
    p, g, exp_avg, exp_avg_sq = carray(p, n), carray(g, n), carray(exp_avg, n), carray(exp_avg_sq, n)
    max_exp_avg_sq, row = carray(max_exp_avg_sq, n), carray(row, 12)
    step_size, w1, w1_m1, beta2, w2, bc2_sqrt, eps = row[0], row[1], row[2], row[3], row[4], row[5], row[6]
    weight_decay, decay_factor = row[7], row[8]
    decoupled, amsgrad, maximize = row[9] != 0, row[10] != 0, row[11] != 0
    neg_step_size, decays = -step_size, taken(weight_decay)
    for i in range(n):
        gi = -g[i] if maximize else g[i]
        pi = p[i]
        if decays:
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


# --- ADOPT (Taniguchi et al., 2024; the authors' implementation) ----------------------
# row: lr, 1 - b1, (1 - b1) - 1, b2, 1 - b2, eps, weight_decay, -lr*wd, clip, decouple,
#      maximize, first_step
#   first step: v <- g^2 only.  Later, with t earlier steps:
#   p <- p + (-lr*wd)*p (decouple: the authors' add(alpha=), one FMA) | g <- g + wd*p
#   n <- clip(g / max(sqrt(v), eps), t^0.25)
#   m <- lerp(m, n, 1 - b1);  p <- p - lr*m;  v <- b2*v + (1 - b2)*g^2
def adopt_chunk(p, g, exp_avg, exp_avg_sq, _unused, row, n):
    p, g, exp_avg, exp_avg_sq = carray(p, n), carray(g, n), carray(exp_avg, n), carray(exp_avg_sq, n)
    row = carray(row, 12)
    lr, w1, w1_m1, beta2, w2, eps = row[0], row[1], row[2], row[3], row[4], row[5]
    weight_decay, neg_lr_wd, clip = row[6], row[7], row[8]
    decouple, maximize, first = row[9] != 0, row[10] != 0, row[11] != 0
    neg_lr, decays = -lr, taken(weight_decay)
    for i in range(n):
        gi = -g[i] if maximize else g[i]
        pi = p[i]
        if decays and not decouple:
            gi = fma(weight_decay, pi, gi)
        if first:
            exp_avg_sq[i] = gi * gi
            continue
        if decays and decouple:
            pi = fma(neg_lr_wd, pi, pi)
        v = exp_avg_sq[i]
        sqrt_v = np.sqrt(v)
        normed = gi / (eps if sqrt_v < eps else sqrt_v)
        m = lerp(exp_avg[i], clamp(normed, -clip, clip), w1, w1_m1)
        exp_avg[i] = m
        p[i] = fma(neg_lr, m, pi)
        exp_avg_sq[i] = fma(w2 * gi, gi, v * beta2)


# --- Lookahead synchronisation --------------------------------------------------------
# row: alpha, 1 - alpha
#   slow <- alpha*fast + (1 - alpha)*slow  (= slow + alpha*(fast - slow));  fast <- slow
# Rounded as the reference wrapper does it: p.mul_(alpha).add_(q, alpha=1 - alpha).
def lookahead_chunk(fast, slow, _unused0, _unused1, _unused2, row, n):
    fast, slow, row = carray(fast, n), carray(slow, n), carray(row, 2)
    alpha, keep = row[0], row[1]
    for i in range(n):
        merged = fma(keep, slow[i], fast[i] * alpha)
        slow[i] = merged
        fast[i] = merged


# --- the drivers ----------------------------------------------------------------------
RULES = {"sgd": sgd_chunk, "rmsprop": rmsprop_chunk, "adam": adam_chunk, "adopt": adopt_chunk,
         "lookahead": lookahead_chunk}  # keyed by the optimizer classes' ``kernel``


_compiled = {}  # (kernel, dtype) -> CFunc; its address is valid only while the CFunc lives
_compiling = ForkSafeLock()

# A process forked while another thread compiled (a first step: a rule, or a driver for new
# arguments) inherited Numba's compiler lock held, with no thread to release it, and its own
# first step waited forever.  os.fork() waits for such a compilation to end instead, as it
# waits for an import (the lock is reentrant: a fork from inside a compilation goes on).
os.register_at_fork(before=global_compiler_lock.acquire, after_in_parent=global_compiler_lock.release,
                    after_in_child=global_compiler_lock.release)


def compiled_rule(kernel, dtype):
    """``kernel``'s rule for ``dtype`` (float32 or float64) as a C callback, compiled, or
    loaded from Numba's disk cache, on first use."""
    key = (kernel, np.dtype(dtype))
    rule = _compiled.get(key)
    if rule is not None:  # (a look-up takes no lock)
        return rule
    with _compiling:  # two threads' first steps must not make two of it
        rule = _compiled.get(key)
        if rule is None:
            ptr = types.CPointer(from_dtype(key[1]))
            signature = types.void(ptr, ptr, ptr, ptr, ptr, ptr, types.intp)
            rule = _compiled[key] = cfunc(signature, cache=CACHE, error_model="numpy")(RULES[kernel])
    return rule


def rule_address(kernel, dtype):
    return compiled_rule(kernel, dtype).address


def _buffers_and_table_fit(buffers, table, dtype):
    return (all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == dtype for a in buffers)
            and isinstance(table, types.Array) and table.ndim == 2 and table.layout == "C" and table.dtype == dtype)


def _rule_call(context, builder, address, pointers, table_type, table, segment, lo, hi):
    """``rule(*pointers, &table[segment, 0], hi - lo)`` through the rule's address."""
    rows = context.make_array(table_type)(context, builder, table)
    row_length = cgutils.unpack_tuple(builder, rows.shape)[1]
    pointers = pointers + [builder.gep(rows.data, [builder.mul(segment, row_length)])]
    n = builder.sub(hi, lo)
    rule = ir.FunctionType(ir.VoidType(), [ptr.type for ptr in pointers] + [n.type])
    builder.call(builder.inttoptr(address, rule.as_pointer()), pointers + [n])


@intrinsic
def _call_rule(typingctx, address, p, g, s0, s1, s2, table, segment, lo, hi):
    """``rule(&p[lo], &g[lo], &s0[lo], &s1[lo], &s2[lo], &table[segment, 0], hi - lo)``
    through the rule's address; an empty state buffer's pointer is formed and never read.
    Only 1-D C-contiguous buffers and a 2-D C-contiguous table of one dtype are taken: the
    pointer arithmetic assumes them, and indices of the rule's ``n`` type."""
    if not (_buffers_and_table_fit((p, g, s0, s1, s2), table, p.dtype)
            and address == segment == lo == hi == types.intp):
        return None

    def codegen(context, builder, signature, args):
        address, arrays, (table, segment, lo, hi) = args[0], args[1:6], args[6:]
        pointers = [builder.gep(context.make_array(ty)(context, builder, value).data, [lo])
                    for ty, value in zip(signature.args[1:6], arrays)]
        _rule_call(context, builder, address, pointers, signature.args[6], table, segment, lo, hi)
        return context.get_dummy_value()

    return types.void(address, p, g, s0, s1, s2, table, segment, lo, hi), codegen


@intrinsic
def _call_rule_gathered(typingctx, address, p, g_address, s0, s1, s2, table, segment, lo, hi):
    """As :func:`_call_rule`, the chunk's gradients read from ``g_address`` (the byte address
    of its first gradient, in a buffer of its own) instead of from a flat buffer."""
    if not (_buffers_and_table_fit((p, s0, s1, s2), table, p.dtype)
            and address == g_address == segment == lo == hi == types.intp):
        return None

    def codegen(context, builder, signature, args):
        address, p, g_address, states, (table, segment, lo, hi) = args[0], args[1], args[2], args[3:6], args[6:]
        types_ = signature.args
        p_ptr = builder.gep(context.make_array(types_[1])(context, builder, p).data, [lo])
        g_ptr = builder.inttoptr(g_address, p_ptr.type)
        s_ptrs = [builder.gep(context.make_array(ty)(context, builder, value).data, [lo])
                  for ty, value in zip(types_[3:6], states)]
        _rule_call(context, builder, address, [p_ptr, g_ptr] + s_ptrs, types_[6], table, segment, lo, hi)
        return context.get_dummy_value()

    return types.void(address, p, g_address, s0, s1, s2, table, segment, lo, hi), codegen


@njit(parallel=True, **_JIT)
def run_parallel(rule, p, g, s0, s1, s2, chunks, table):
    for c in prange(chunks.shape[0]):
        _call_rule(rule, p, g, s0, s1, s2, table, chunks[c, 2], chunks[c, 0], chunks[c, 1])


@njit(**_JIT)
def run_serial(rule, p, g, s0, s1, s2, chunks, table):
    for c in range(chunks.shape[0]):
        _call_rule(rule, p, g, s0, s1, s2, table, chunks[c, 2], chunks[c, 0], chunks[c, 1])


# Gradients in buffers of their own (flatopt.torch after zero_grad(): the tensors autograd
# made; TreeOptimizer: a large tree's leaves), read where they lie instead of copied into a
# flat buffer first.  A piece is a chunk's part within one gradient buffer:
# ``(start, stop, segment, address of its first gradient)``.
@njit(parallel=True, **_JIT)
def run_parallel_gathered(rule, p, s0, s1, s2, pieces, table):
    for c in prange(pieces.shape[0]):
        _call_rule_gathered(rule, p, pieces[c, 3], s0, s1, s2, table, pieces[c, 2], pieces[c, 0], pieces[c, 1])


@njit(**_JIT)
def run_serial_gathered(rule, p, s0, s1, s2, pieces, table):
    for c in range(pieces.shape[0]):
        _call_rule_gathered(rule, p, pieces[c, 3], s0, s1, s2, table, pieces[c, 2], pieces[c, 0], pieces[c, 1])


COUNT_STARTED = 1  # advance_counts: a span's count started at 0
COUNT_STUCK = 2  # advance_counts: a span's count no longer grows by one in the counts' dtype


@njit(**_JIT)
def advance_counts(counts, spans):
    """Adds one to ``counts[first:last]`` for each ``(first, last)`` row of ``spans``, and says
    (``COUNT_STARTED``) whether one of them started at 0, and (``COUNT_STUCK``) whether one of
    them is now where adding one gives the same count (2^24 in float32): flatopt.torch's
    per-parameter step counts (float32, as torch's ``state["step"]``, or float64 where that is
    torch's default dtype; the sum is rounded to the counts' dtype as NumPy's add rounds it).
    One compiled call: right after a training loop's backward pass, NumPy's add on a span's
    slice took 40 µs, this call 12."""
    found = 0
    for k in range(spans.shape[0]):
        first, last = spans[k, 0], spans[k, 1]
        if counts[first] == 0:
            found |= COUNT_STARTED
        for i in range(first, last):
            counts[i] += np.float32(1)
        if counts[first] + np.float32(1) == counts[first]:
            found |= COUNT_STUCK
    return found
