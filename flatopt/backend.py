"""Where a step runs.  :func:`backend_for` is the one place that looks at the buffers and
picks the CPU (NumPy arrays, Numba ``@njit`` kernels) or CUDA (anything exposing
``__cuda_array_interface__``, Numba CUDA kernels); optimizer classes never branch on it.

A backend validates a (params, grads) pair, allocates state next to the parameters, moves
state to and from host NumPy arrays for checkpoints, plans how a step's segments are cut
into chunks, and launches a kernel by name.
"""
import functools
import os
import struct
import sys
import threading
import weakref

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_DTYPES = frozenset(SUPPORTED_DTYPES)
STATE_SLOTS = 3  # state buffers every CPU rule takes (flatopt.kernels.cpu); unused ones empty


def describe(obj):
    return type(obj).__module__ + "." + type(obj).__qualname__ if not isinstance(obj, np.ndarray) else "numpy.ndarray"


def is_cuda_array(obj):
    return is_torch_cuda_tensor(obj) or hasattr(obj, "__cuda_array_interface__") or _is_numba_device_array(obj)


def is_torch_cuda_tensor(obj):
    """A strided torch CUDA tensor, told from its attributes: torch's ``__cuda_array_interface__``
    builds the whole interface in Python to answer ``hasattr`` (4 µs on an H200's host)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor) and obj.is_cuda and obj.layout is torch.strided


def _is_numba_device_array(obj):
    # Under the CUDA simulator Numba's device arrays expose no __cuda_array_interface__.
    return type(obj).__name__ in ("DeviceNDArray", "FakeCUDAArray") and hasattr(obj, "copy_to_host")


def layout(buffer, name="the array"):
    """``(shape, NumPy dtype)`` of a host or CUDA buffer, from any CUDA exporter (torch
    reports a torch.dtype of its own); ``(None, None)`` for what has no shape.  ``name``: what
    an error (a masked CUDA array's) calls it."""
    if is_cuda_array(buffer):
        backend = backend_for(buffer, buffer)
        return backend.shape(buffer, name), backend.dtype(buffer, name)
    return getattr(buffer, "shape", None), getattr(buffer, "dtype", None)


def check_fits(buffer, n, dtype, name, size_says, dtype_of):
    """That ``buffer`` (host or CUDA, of any exporter) is 1-D, of ``n`` elements and of
    ``dtype``, as a kernel that reads ``n`` elements of it needs.  The errors name it as the
    caller says: ``name`` ("slow weights"), ``size_says`` ("the slow weights have") before its
    length, ``dtype_of`` ("the slow weights'") before its dtype."""
    shape, buffer_dtype = layout(buffer, name)
    if shape is None or len(shape) != 1:
        raise ValueError(f"{name} must be a 1-D array, got {type(buffer).__name__} of shape {shape}")
    if shape[0] != n:
        raise ValueError(f"params has {n} elements but {size_says} {shape[0]}")
    if buffer_dtype != dtype:
        raise TypeError(f"params dtype {dtype} does not match {dtype_of} dtype {buffer_dtype}")


def check_gather(backend):
    """Gathered gradients (flatopt.torch's, TreeOptimizer's ``_gather``) are read from host memory."""
    if backend is not CPU:
        raise TypeError(f"_gather reads gradients from host memory; buffers on {backend.name} take their "
                        "gradients in the flat grads buffer")


def host_array(buffer):
    """A checkpoint's buffer as a NumPy array: a CUDA array copied to the host (``np.asarray``
    would make a 0-d object array of an exporter with no ``__array__``, CuPy's say), anything
    else through ``np.asarray``."""
    if is_cuda_array(buffer):
        return backend_for(buffer, buffer).to_host(buffer)
    return np.asarray(buffer)


def backend_for(params, grads):
    """The backend that owns both buffers; TypeError if they live in different places."""
    if isinstance(params, np.ndarray) and isinstance(grads, np.ndarray):
        for name, arr in (("params", params), ("grads", grads)):
            if isinstance(arr, np.ma.MaskedArray):  # the kernels read every element, masked or not
                raise TypeError(f"{name} is a masked array; flatopt reads every element of its buffers, masked or "
                                f"not: pass {name}.data" + (" or grads.filled(0)" if name == "grads" else ""))
        return CPU
    if is_cuda_array(params) and is_cuda_array(grads):
        from flatopt.kernels.cuda_backend import CUDA
        return CUDA
    for name, buffer in (("params", params), ("grads", grads)):
        if not (isinstance(buffer, np.ndarray) or is_cuda_array(buffer)):
            raise TypeError(f"{name} must be a NumPy array or a CUDA array (__cuda_array_interface__), "
                            f"got {describe(buffer)}")
    on_gpu = is_cuda_array(params)
    raise TypeError(f"params ({'GPU' if on_gpu else 'host'}) and grads ({'host' if on_gpu else 'GPU'}) must live on "
                    "the same device")


def check_dtype(name, dtype):
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {dtype}; flatopt supports float32 and float64")


def check_1d(name, shape):
    if len(shape) != 1:
        raise ValueError(f"{name} must be a 1-D buffer, got shape {tuple(shape)}")


def byte_extent(shape, strides, itemsize):
    """``(low, high)``: the bytes an array's elements span, as offsets from its first element's
    address (``low <= 0`` where a stride is negative); with element strides and ``itemsize`` 1,
    ``high - low`` is the span in elements."""
    low, high = 0, itemsize
    for size, stride in zip(shape, strides):
        reach = (size - 1) * stride
        low, high = (low + reach, high) if stride < 0 else (low, high + reach)
    return low, high


def check_pair(params, grads, *, shape_of, dtype_of, contiguous, writeable, span):
    """Checks shared by every backend; the accessors read one backend's array type."""
    for name, arr in (("params", params), ("grads", grads)):
        check_1d(name, shape_of(arr))
        check_dtype(name, dtype_of(arr))
        if not contiguous(arr):
            raise ValueError(f"{name} must be contiguous")
    if not writeable(params):
        raise ValueError("params is read-only")
    if dtype_of(grads) != dtype_of(params):
        raise TypeError(f"grads dtype {dtype_of(grads)} does not match params dtype {dtype_of(params)}")
    if shape_of(grads)[0] != shape_of(params)[0]:
        raise ValueError(f"grads has {shape_of(grads)[0]} elements but params has {shape_of(params)[0]}")
    (p0, p1), (g0, g1) = span(params), span(grads)
    if p0 < g1 and g0 < p1:
        raise ValueError("params and grads share memory; grads must be a separate buffer")


def split_chunks(segments, n_chunks_hint, align=16):
    """Cut ``(start, stop, row)`` segments into about ``n_chunks_hint`` equal chunks.

    Chunk boundaries inside a segment fall on multiples of ``align`` elements (64 bytes
    in float32) so that every chunk but a segment's first starts on a cache line.
    """
    total = sum(stop - start for start, stop, _ in segments)
    size = max(align, -(-total // max(1, n_chunks_hint)))
    size = -(-size // align) * align
    chunks = []
    for start, stop, row in segments:
        lo = start
        while lo < stop:
            hi = min(stop, -(-(lo + size) // align) * align)
            chunks.append((lo, hi, row))
            lo = hi
    return np.array(chunks, dtype=np.int64).reshape(-1, 3)


class Gather:
    """Gradients in host buffers of their own instead of in the flat ``grads`` buffer: the
    layout's elements from ``offsets[i]`` up to ``offsets[i + 1]`` lie, contiguous and of the
    params' dtype, from byte address ``addresses[i]`` on.  flatopt.torch builds it after
    ``zero_grad()`` from the tensors autograd made, flatopt.jax's TreeOptimizer from a large
    tree's leaves; each checks them and keeps them alive while the step runs; a raw address is
    never checked here.

    ``cut``: a :class:`GatherCut` the caller keeps for ``offsets``, in which the pieces of the
    last chunks wait for the next step's addresses (the buffers move at every step, the cut
    only with the layout or the chunks)."""

    __slots__ = ("offsets", "addresses", "cut")

    def __init__(self, offsets, addresses, cut=None):
        self.offsets, self.addresses = offsets, addresses
        self.cut = cut if cut is not None else GatherCut()

    def pieces(self, chunks, itemsize):
        """``chunks`` (``(start, stop, segment)`` rows) cut where a gradient buffer begins, each
        piece with the byte address of its first gradient: ``(start, stop, segment, address)``.
        The array is the cut's own: the next call through the same cut rewrites its addresses
        (a step launches with it before the next step cuts)."""
        pieces, buffer_of, skip = self.cut.of(self.offsets, chunks, itemsize)
        np.add(self.addresses[buffer_of], skip, out=pieces[:, 3])
        return pieces


class GatherCut:
    """The pieces of one layout's chunks, but for their addresses: ``pieces`` (the fourth
    column to be filled in), the gradient buffer of each and its byte offset in it.  Cut again
    when the offsets, the chunks or the itemsize are others than the last ones (cut at a step,
    ten NumPy calls took a twelfth of a 200-tensor step at 10^6 after ``zero_grad()``)."""

    __slots__ = ("key", "value")

    def __init__(self):
        self.key = self.value = None

    def of(self, offsets, chunks, itemsize):
        key = self.key
        if key is None or key[0] is not offsets or key[1] is not chunks or key[2] != itemsize:
            self.value = _cut(offsets, chunks, itemsize)
            self.key = (offsets, chunks, itemsize)
        return self.value


def _cut(offsets, chunks, itemsize):
    """A :class:`GatherCut`'s value for these offsets, chunks and itemsize."""
    lo, hi = chunks[:, 0], chunks[:, 1]
    first = np.searchsorted(offsets, lo, side="right") - 1  # the buffer of each chunk's first element
    counts = np.searchsorted(offsets, hi, side="left") - first  # the buffers a chunk spans
    chunk_of = np.repeat(np.arange(len(chunks)), counts)
    buffer_of = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts - first, counts)
    ends = np.append(offsets[1:], np.iinfo(np.int64).max)
    starts = np.maximum(lo[chunk_of], offsets[buffer_of])
    stops = np.minimum(hi[chunk_of], ends[buffer_of])
    keep = stops > starts  # a zero-size buffer gives an empty piece
    pieces = np.empty((int(keep.sum()), 4), np.int64)
    pieces[:, 0], pieces[:, 1] = starts[keep], stops[keep]
    pieces[:, 2] = chunks[chunk_of[keep], 2]
    buffer_of = buffer_of[keep]
    return pieces, buffer_of, (starts[keep] - offsets[buffer_of]) * itemsize


class CpuBackend:
    """NumPy buffers, Numba CPU kernels (flatopt.kernels.cpu)."""

    name = "cpu"
    # Below this many updated elements one thread beats two: waking a second thread
    # costs more than the work it takes over.
    parallel_min = 1 << 15
    chunks_per_thread = 4

    def __init__(self):
        self._kernels = {}

    def check(self, params, grads):
        pf, gf, dtype = params.flags, grads.flags, params.dtype
        if not (params.ndim == 1 and grads.ndim == 1 and dtype in _DTYPES and grads.dtype == dtype
                and pf.c_contiguous and gf.c_contiguous and pf.writeable and len(params) == len(grads)
                # two arrays that each allocated their own memory cannot overlap
                and (pf.owndata and gf.owndata and params is not grads or not np.may_share_memory(params, grads))):
            # Something is off: the full check names it.
            check_pair(params, grads, shape_of=np.shape, dtype_of=lambda a: a.dtype,
                       contiguous=lambda a: a.flags.c_contiguous, writeable=lambda a: a.flags.writeable,
                       span=host_span)

    def dtype(self, buffer):
        return buffer.dtype

    def shape(self, buffer, name="the array"):
        return buffer.shape

    def length(self, buffer):
        return len(buffer)

    def usable(self, buffer, like):
        """Whether the kernels can read and write ``buffer`` in place (else ``place`` copies it)."""
        return isinstance(buffer, np.ndarray) and buffer.flags.c_contiguous and buffer.flags.writeable

    def check_beside(self, buffer, like):
        """Refuses a placed state buffer the kernels cannot reach from ``like`` (the params):
        on the CPU every one can."""

    def zeros(self, n, dtype, like=None):
        return np.zeros(n, dtype=dtype)

    def empty_state(self, dtype):
        return np.empty(0, dtype=dtype)

    def to_host(self, buffer):
        return np.array(buffer, copy=True)

    def place(self, array, like):
        """A copy of ``array`` (host data, or a CUDA array brought back) in ``like``'s dtype."""
        if is_cuda_array(array):
            array = backend_for(array, array).to_host(array)
        return np.array(array, dtype=like.dtype, copy=True)

    def copy(self, src, dst, spans=None, like=None):
        """``dst[:] = src``, or only ``dst[a:b] = src[a:b]`` for each ``(a, b)`` of ``spans``
        (``like``: the params whose stream orders the copy, on a GPU)."""
        if spans is None:
            np.copyto(dst, src)
            return
        for a, b in spans:
            np.copyto(dst[a:b], src[a:b])

    def table(self, rows, dtype, reuse=None):
        """Rows of scalars rounded to ``dtype``; written into ``reuse`` when it fits (a
        struct pack is a fraction of a new array's cost, which matters at small sizes)."""
        if reuse is not None and reuse.dtype == dtype and len(reuse) == len(rows):
            values = rows[0] if len(rows) == 1 else [x for row in rows for x in row]
            if len(values) == reuse.size:
                try:
                    _packer(dtype.char, len(values)).pack_into(reuse, 0, *values)
                    return reuse
                except (OverflowError, struct.error):
                    # a finite value beyond float32's range (NumPy rounds it to inf), or an int beyond
                    # float's, which struct reports as a wrong type and NumPy, as torch does, as an OverflowError
                    pass
        return np.array(rows, dtype=dtype)

    def plan(self, segments):
        """Chunks for ``(start, stop, row)`` segments and whether to use threads."""
        import numba
        if numba.config.DISABLE_JIT:  # the kernels call their rules through compiled code only
            raise RuntimeError("flatopt's CPU kernels need Numba's compiler, which NUMBA_DISABLE_JIT=1 turns off: "
                               "unset it to step on the CPU (flatopt has no pure-Python path)")
        if not self.threaded(sum(stop - start for start, stop, _ in segments)):
            return (np.array(segments, dtype=np.int64).reshape(-1, 3), False)
        return (split_chunks(segments, numba.get_num_threads() * self.chunks_per_thread), True)

    def threaded(self, elements):
        """Whether a step updating this many elements runs on Numba's threads (never in a
        process forked after GNU OpenMP's threads had run: see :func:`_after_fork_in_child`)."""
        import numba
        return elements >= self.parallel_min and not _forked_after_threads and numba.get_num_threads() > 1

    @functools.cached_property
    def one_launch_at_a_time(self):
        """Whether Numba's threads take one parallel launch at a time: its ``workqueue``
        threading layer (what Numba falls back to where neither OpenMP nor TBB loads) aborts
        the process when two Python threads launch at once.  Threaded steps then take a lock."""
        return _threading_layer() == "workqueue"

    def launch(self, kernel, params, grads, states, plan, table, gather=None):
        """``gather``: a :class:`Gather`, whose buffers hold the gradients instead of ``grads``."""
        chunks, parallel = plan
        driver, rule, unused = self._kernel(kernel, parallel, params.dtype, gather is not None)
        if gather is None:
            args = (rule, params, grads, *states, *unused[len(states):], chunks, table)
        else:
            args = (rule, params, *states, *unused[len(states):], gather.pieces(chunks, params.itemsize), table)
        try:
            driver(*args)
        except KeyboardInterrupt as interrupt:
            kernel_ran(interrupt)
            raise

    def launcher(self, kernel, plan, dtype, states):
        """``launch`` with all but the buffers and the table bound: ``f(params, grads, table)``
        (and ``f(params, grads, table, gather)``)."""
        chunks, parallel = plan
        driver, rule, unused = self._kernel(kernel, parallel, dtype)
        s0, s1, s2 = (*states, *unused)[:STATE_SLOTS]

        def launch(params, grads, table, gather=None):
            if gather is None:
                try:
                    driver(rule, params, grads, s0, s1, s2, chunks, table)
                except KeyboardInterrupt as interrupt:
                    kernel_ran(interrupt)
                    raise
            else:
                self.launch(kernel, params, grads, states, plan, table, gather)
        return launch

    def _kernel(self, kernel, parallel, dtype, gathered=False):
        """The driver, the rule's address and empty buffers for the state slots it leaves unused."""
        key = (kernel, parallel, dtype.char, gathered)
        found = self._kernels.get(key)
        if found is None:
            from flatopt.kernels import cpu
            serial = cpu.run_serial_gathered if gathered else cpu.run_serial
            driver = serial
            if parallel:
                driver = cpu.run_parallel_gathered if gathered else cpu.run_parallel
                if self.one_launch_at_a_time:
                    driver = _one_at_a_time(driver)
                elif _gnu_openmp_threads():
                    driver = _serial_after_fork(driver, serial)
            found = self._kernels[key] = (driver, cpu.rule_address(kernel, dtype), (np.empty(0, dtype),) * STATE_SLOTS)
        return found


class ForkSafeLock:
    """A lock that a process forked while another thread held it gets free: the holder does not
    exist in the child, and the child's first use would wait for it forever."""
    _all = weakref.WeakSet()

    def __init__(self):
        self._lock = threading.Lock()
        ForkSafeLock._all.add(self)

    def acquire(self, *args, **kwargs):
        return self._lock.acquire(*args, **kwargs)

    def release(self):
        self._lock.release()

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()

    @classmethod
    def _free_all(cls):
        for lock in cls._all:
            lock._lock = threading.Lock()


os.register_at_fork(after_in_child=ForkSafeLock._free_all)

_launching = ForkSafeLock()  # one for every driver: the workqueue is one pool


def _one_at_a_time(driver):
    def run(*args):
        with _launching:
            try:
                driver(*args)
            except KeyboardInterrupt as interrupt:
                kernel_ran(interrupt)
                raise
    return run


def kernel_ran(interrupt):
    """Whether a ``KeyboardInterrupt`` came as a kernel call returned, the step taken: Python
    raises a signal that arrives during a compiled call where the call returns, in the frame
    that made it.  Called in each frame whose ``try`` holds one such call, and nothing else,
    it notes so on the exception, for the callers up the stack to complete the step's
    bookkeeping (its counts) before they pass the exception on.  One raised inside the call
    (while Numba compiles it) is left unnoted."""
    if interrupt.__traceback__ is not None and interrupt.__traceback__.tb_next is None:
        interrupt.flatopt_kernel_ran = True
    return getattr(interrupt, "flatopt_kernel_ran", False)


# Forks.  GNU OpenMP cannot start its threads again in a process forked after they had run,
# and Numba terminates such a process at its first threaded launch: a multiprocessing.Pool
# (Linux's default start method forks) stepping optimizers after its parent had stepped one
# would wait forever for workers that were killed.  In such a process every step runs on one
# thread, with the same results: the same chunks, run one after another.
_forked_after_threads = False


def _after_fork_in_child():
    """Run in the child of ``os.fork()``: notes whether the parent had started GNU OpenMP's
    threads (Numba's threading layer is one per process, whoever launched on it)."""
    global _forked_after_threads
    numba = sys.modules.get("numba")
    if numba is None or _forked_after_threads:
        return
    try:
        numba.threading_layer()
    except ValueError:  # no threads started before the fork: the child starts its own
        return
    _forked_after_threads = _gnu_openmp_threads()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _threading_layer():
    """The name of Numba's threading layer, started first if it was not (Numba picks it then)."""
    import numba
    numba.get_num_threads()
    return numba.threading_layer()


def _gnu_openmp_threads():
    """Whether Numba's threads are GNU OpenMP's (its ``omp`` layer on libgomp); its TBB and
    workqueue layers start their threads again after a fork."""
    if _threading_layer() != "omp":
        return False
    omppool = sys.modules.get("numba.np.ufunc.omppool")
    return getattr(omppool, "openmp_vendor", "GNU") == "GNU"


def _serial_after_fork(threaded, serial):
    """``threaded``, except in a process forked after GNU OpenMP's threads had run: there
    ``serial``, which takes the same arguments and runs the chunks one after another (steps
    planned before the fork launch through this; those planned after it are planned serial)."""
    def run(*args):
        try:
            (serial if _forked_after_threads else threaded)(*args)
        except KeyboardInterrupt as interrupt:
            kernel_ran(interrupt)
            raise
    return run


@functools.lru_cache(maxsize=64)  # (bounded: a table's length changes with the number of groups)
def _packer(char, count):
    return struct.Struct(f"={count}{char}")  # native byte order, no padding


def aligned_zeros(size, dtype, alignment=64):
    """A 1-D array of zeros whose data starts at a multiple of ``alignment`` bytes (a cache
    line: vector loads of a misaligned buffer straddle two).  Zeroed as ``np.zeros`` is: a large
    one's pages are the OS's zero pages until first written, so it costs no memory before then."""
    dtype = np.dtype(dtype)
    raw = np.zeros(size * dtype.itemsize + alignment, np.uint8)
    skip = -raw.__array_interface__["data"][0] % alignment
    return raw[skip:skip + size * dtype.itemsize].view(dtype)


def host_span(a):
    """The (first, end) byte addresses of a NumPy array's memory."""
    start = a.__array_interface__["data"][0]
    return start, start + a.nbytes


CPU = CpuBackend()
