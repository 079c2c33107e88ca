"""The CPU kernels as an XLA FFI handler: a step inside a jitted JAX computation, on XLA's own
buffers, leaf by leaf, with nothing gathered into a flat copy and nothing copied back.

:func:`flatopt.jax.as_optax` calls the target through ``jax.ffi.ffi_call``.  The handler is
a Numba C callback: it reads XLA's call frame (``xla/ffi/api/c_api.h``, shipped with
jaxlib) and calls each optimizer's rule of :mod:`flatopt.kernels.cpu` through its address,
as the CPU drivers do.  Its arguments, all buffers, for a tree of ``L`` leaves:

    params_0 .. params_L-1, grads_0 .. grads_L-1, state0, state1, state2, slow, chunks, table, control

and its results ``updates_0 .. updates_L-1, state0, state1, state2, slow``, the state and
slow-weight results aliased to those arguments (a donated state is updated in place, as
optax's own).  The state buffers and Lookahead's slow weights are flat, as the optimizers keep
them (empty where unused); the leaves are not.  A ``chunks`` row is ``(leaf, start, stop,
flat_start, row)``: elements ``start:stop`` of a leaf are elements ``flat_start:`` of the flat
buffers, and ``table[row]`` holds their scalars; ``row = -1`` marks elements no group updates
(their updates are zero).  For each chunk the handler copies the parameters into the updates
buffer, steps that copy in place with the rule (and, on a Lookahead sync step, with the
Lookahead rule and the table's last row), and subtracts the parameters, while the chunk is
in cache: the updates are ``new - params`` rounded as NumPy rounds it, and ``params`` is
never written.  With the ``NEW_PARAMS`` flag the results are the new parameters themselves
(:func:`flatopt.jax.update_and_apply`): no subtraction, and where XLA aliases a result to
its parameters (donated), no copy either: the step runs in place.  Fresh results of 4 MiB or
more ask for transparent huge pages first (see ``_advise_huge_pages``).

``chunks`` (int64) and ``control`` (int64: rule address, threaded, Lookahead rule address,
flags) travel as uint32 words (JAX without x64 has no int64).  ``control`` comes from the
host at run time, never from a traced constant: a rule's address is only valid in the
process that compiled it, and a compiled computation can outlive it (JAX's persistent
compilation cache).

Everything is checked before the call is traced; the handler cannot fail, so it always
returns the null error.
"""
import ctypes
import sys

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, prange, types
from numba.extending import intrinsic

from flatopt.backend import ForkSafeLock
from flatopt.kernels.cpu import CACHE, _call_rule

FFI_API_VERSION = (0, 1)  # the call frame fields read here are those of the FFI's first version
_METADATA = 1  # XLA_FFI_Extension_Metadata: XLA asks which API version the handler was built for
_EXECUTE = 3  # XLA_FFI_ExecutionStage_EXECUTE; the other stages have nothing to do
STATE_ARGS = 4  # flat buffers after the leaves: the CPU rules' three state slots, then the slow weights
# control flags: Lookahead's first step, its every k-th, and results that are the new params
SLOW_FROM_PARAMS, SYNC, NEW_PARAMS = 1, 2, 4
CHUNK = 4096  # elements per chunk: a chunk's copy, step and subtraction stay in L1/L2
CALL_BYTES = 8 << 20  # updates per FFI call: see leaf_groups

# Offsets, in 8-byte words, of the fields read (the LP64 layouts of c_api.h)
_FRAME_EXTENSION, _FRAME_STAGE = 1, 4  # XLA_FFI_CallFrame: extension_start, stage
_FRAME_ARGS_SIZE, _FRAME_ARGS, _FRAME_RETS = 7, 9, 14  # its args.size, args.args, rets.rets
_BUFFER_DATA, _BUFFER_RANK, _BUFFER_DIMS = 3, 4, 5  # XLA_FFI_Buffer: data, rank, dims
_EXTENSION_TYPE, _EXTENSION_METADATA = 1, 3  # XLA_FFI_Metadata_Extension: base.type, metadata


@intrinsic
def _pointer(typingctx, address):
    """An int64 address as a ``void*``."""
    if address != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(address), codegen


@intrinsic
def _typed_pointer(typingctx, address, like):
    """An int64 address as a pointer to ``like``'s elements (``like``: an array)."""
    if address != types.int64 or not isinstance(like, types.Array):
        return None
    pointer = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


@njit(inline="always")
def _words(address, count):
    return carray(_pointer(address), (count,), np.int64)


@njit(inline="always")
def _data(buffer):
    return _words(buffer, 6)[_BUFFER_DATA]


@njit(inline="always")
def _dims(buffer, rank):
    return _words(_words(buffer, 6)[_BUFFER_DIMS], rank)


@njit(inline="always")
def _nbytes(buffer, itemsize):
    nbytes = itemsize
    for extent in _dims(buffer, _words(buffer, 6)[_BUFFER_RANK]):
        nbytes *= extent
    return nbytes


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page (and AArch64's with 4 KiB base pages)
ADVISE_BYTES = 4 << 20  # NumPy's rule: arrays of 4 MiB or more ask for huge pages
if sys.platform.startswith("linux"):
    _madvise = types.ExternalFunction("madvise", types.intc(types.voidptr, types.uintp, types.intc))
    MADV_HUGEPAGE = 14

    @njit(inline="always")
    def _advise_huge_pages(address, nbytes):
        """Ask for transparent huge pages under the whole 2 MiB pages of a result of at least
        ``ADVISE_BYTES``, as NumPy does for its arrays (the kernel's usual policy, 'madvise',
        gives them only where asked).  A result above glibc's mmap ceiling (32 MiB) is mapped
        afresh at every call and first touched here: one fault per 2 MiB instead of one per
        4 KiB (10^7 float32 parameters in one leaf: 17.9 ms an update before, 10.3 after)."""
        if nbytes >= ADVISE_BYTES:
            start = (address + HUGE_PAGE - 1) & -HUGE_PAGE
            stop = (address + nbytes) & -HUGE_PAGE
            _madvise(_pointer(start), stop - start, MADV_HUGEPAGE)
else:
    @njit(inline="always")
    def _advise_huge_pages(address, nbytes):
        pass


@njit(inline="always")
def _at(address, start, length, like):
    """``length`` elements of ``like``'s dtype from element ``start`` of the buffer at ``address``."""
    return carray(_typed_pointer(address + start * like.itemsize, like), (length,))


@njit(inline="always")
def _step_chunk(control, args, rets, leaves, chunk, table, states):
    leaf, start, stop, flat_start, row = chunk[0], chunk[1], chunk[2], chunk[3], chunk[4]
    n = stop - start
    params, out = _at(_data(args[leaf]), start, n, table), _at(_data(rets[leaf]), start, n, table)
    slow = _at(states[3], flat_start, n, table)
    if control[3] & SLOW_FROM_PARAMS:
        slow[:] = params
    if control[3] & NEW_PARAMS:  # the step's results are the new params: in place where aliased
        if _data(rets[leaf]) != _data(args[leaf]):
            out[:] = params
    elif row < 0:
        out[:] = 0  # updates of elements no group steps
    else:
        out[:] = params
    if row < 0:
        return
    _call_rule(control[0], out, _at(_data(args[leaves + leaf]), start, n, table),
               _at(states[0], flat_start, n, table), _at(states[1], flat_start, n, table),
               _at(states[2], flat_start, n, table), table, row, 0, n)
    if control[3] & SYNC:
        _call_rule(control[2], out, slow, slow, slow, slow, table, table.shape[0] - 1, 0, n)
    if not control[3] & NEW_PARAMS:
        for i in range(n):
            out[i] -= params[i]


@njit(parallel=True, cache=CACHE, error_model="numpy", nogil=True)
def run_leaves_parallel(control, args, rets, leaves, chunks, table, states):
    for c in prange(chunks.shape[0]):
        _step_chunk(control, args, rets, leaves, chunks[c], table, states)


@njit(cache=CACHE, error_model="numpy", nogil=True)
def run_leaves_serial(control, args, rets, leaves, chunks, table, states):
    for c in range(chunks.shape[0]):
        _step_chunk(control, args, rets, leaves, chunks[c], table, states)


def _handler(dtype):
    scalar = np.dtype(dtype).type

    @cfunc(types.voidptr(types.voidptr), cache=CACHE, error_model="numpy")
    def handler(call_frame):
        frame = carray(call_frame, (16,), np.int64)
        extension = frame[_FRAME_EXTENSION]
        if extension != 0 and _words(extension, 4)[_EXTENSION_TYPE] & 0xFFFFFFFF == _METADATA:
            # XLA_FFI_Metadata: struct_size, api_version {struct_size, extension, major, minor},
            # traits; as int32s the version is at 6, 7 and the traits at 8
            metadata = carray(_pointer(_words(extension, 4)[_EXTENSION_METADATA]), (10,), np.int32)
            metadata[6], metadata[7], metadata[8] = FFI_API_VERSION[0], FFI_API_VERSION[1], 0
            return _pointer(0)
        if frame[_FRAME_STAGE] & 0xFFFFFFFF != _EXECUTE:
            return _pointer(0)
        size = frame[_FRAME_ARGS_SIZE]
        leaves = (size - STATE_ARGS - 3) // 2
        args, rets = _words(frame[_FRAME_ARGS], size), _words(frame[_FRAME_RETS], leaves + STATE_ARGS)
        table_dims = _dims(args[size - 2], 2)
        table = carray(_pointer(_data(args[size - 2])), (table_dims[0], table_dims[1]), scalar)
        states = np.empty(STATE_ARGS, np.int64)
        for k in range(STATE_ARGS):  # aliased: the same memory, unless XLA chose otherwise
            out, source = rets[leaves + k], args[2 * leaves + k]
            length = _dims(out, 1)[0]
            if length and _data(out) != _data(source):
                _at(_data(out), 0, length, table)[:] = _at(_data(source), 0, length, table)
            states[k] = _data(out)
        chunks = carray(_pointer(_data(args[size - 3])), (_dims(args[size - 3], 2)[0], 5), np.int64)
        control = carray(_pointer(_data(args[size - 1])), (4,), np.int64)
        for leaf in range(leaves):  # fresh results only: one aliased to its params is memory XLA already had
            if _data(rets[leaf]) != _data(args[leaf]):
                _advise_huge_pages(_data(rets[leaf]), _nbytes(rets[leaf], table.itemsize))
        if control[1]:
            run_leaves_parallel(control, args, rets, leaves, chunks, table, states)
        else:
            run_leaves_serial(control, args, rets, leaves, chunks, table, states)
        return _pointer(0)

    return handler


def leaf_groups(sizes, itemsize):
    """Leaves ``[first, stop)`` per FFI call, each call's leaves of at most ``CALL_BYTES``
    (or one larger leaf).  XLA gives a computation's temporaries (the updates, until added to
    the parameters) one allocation; kept under glibc's 32 MiB mmap ceiling, it is reused from
    one step to the next instead of mapped afresh and first-touched page by page (a single
    leaf above it is, on huge pages: ``_advise_huge_pages``)."""
    groups, first, total = [], 0, 0
    for leaf, size in enumerate(sizes):
        if leaf > first and total + size * itemsize > CALL_BYTES:
            groups.append((first, leaf))
            first, total = leaf, 0
        total += size * itemsize
    return groups + [(first, len(sizes))]


# Leaves per FFI call where each leaf is aliased to its result (new params): XLA's compile time
# grows about as the cube of one call's aliases (2000 leaves in one call: 25 s; 3000: 73 s;
# in calls of 256: 1.4 and 2.4 s).
ALIASED_LEAVES = 256


def aliased_groups(count):
    """Leaves ``[first, stop)`` per FFI call of at most ``ALIASED_LEAVES`` leaves (one call
    without leaves where there are none)."""
    return [(first, min(first + ALIASED_LEAVES, count)) for first in range(0, count, ALIASED_LEAVES)] or [(0, 0)]


def leaf_chunks(sizes, segments, threaded, flat_start=0):
    """The ``chunks`` rows for leaves of ``sizes`` elements laid end to end from element
    ``flat_start`` of the flat buffers, given the step's ``(start, stop, row)`` segments of
    those; elements in no segment get row -1.  Serial steps cut only at leaf and segment
    boundaries."""
    piece = CHUNK if threaded else 1 << 62
    rows, leaf_start = [], flat_start
    bounds = sorted({x for start, stop, _ in segments for x in (start, stop)})
    for leaf, size in enumerate(sizes):
        leaf_stop = leaf_start + size
        cuts = [leaf_start] + [b for b in bounds if leaf_start < b < leaf_stop] + [leaf_stop]
        for lo, hi in zip(cuts, cuts[1:]):
            row = next((row for start, stop, row in segments if start <= lo < stop), -1)
            for a in range(lo, hi, piece):
                rows.append((leaf, a - leaf_start, min(hi, a + piece) - leaf_start, a, row))
        leaf_start = leaf_stop
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


_registered = {}  # name -> (handler, pointer), or None where registration failed
_registering = ForkSafeLock()


def target(dtype):
    """The FFI target's name for ``dtype``, registered with JAX (and compiled, or loaded from
    Numba's cache) on first use; ``None`` where this JAX cannot take it (an XLA that no
    longer accepts the handler's API version, a JAX without ``jax.ffi``): the caller then
    steps through a host callback instead."""
    dtype = np.dtype(dtype)
    name = f"flatopt_cpu_step_{dtype.name}"
    if name not in _registered:
        with _registering:
            if name not in _registered:
                _registered[name] = _register(name, dtype)
    return name if _registered[name] is not None else None


def _register(name, dtype):
    import jax
    import numba
    try:
        import jax.ffi  # noqa: F401 - JAX before 0.4.38 has none
    except ImportError:
        return None
    jax.devices("cpu")  # an XLA that refuses the handler then says so here, not when JAX starts its CPU backend
    numba.get_num_threads()  # starts the threading layer, whose symbols a cached handler links to
    handler = _handler(dtype)
    pointer = ctypes.cast(handler.address, ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p))
    try:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(pointer), platform="cpu")
    except Exception:  # noqa: BLE001 - XLA reports a refused version as a runtime error of its own
        return None
    return handler, pointer  # the callback must outlive every computation that calls it
