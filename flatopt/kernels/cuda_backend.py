"""The CUDA backend: buffers on a GPU, Numba CUDA kernels (``flatopt.kernels.cuda``).

Accepted buffers: CuPy arrays, Numba device arrays (``numba.cuda.to_device``, also the
simulator's, which expose no ``__cuda_array_interface__``) and any object exposing
``__cuda_array_interface__`` (torch CUDA tensors: interface v2 without a stream).
Foreign arrays are viewed as Numba device arrays without copying and without the
stream synchronisation Numba would otherwise perform on import; the views are cached
(weakly) so that a training loop passing the same buffers pays for the conversion once.

Streams.  A step runs on the stream the parameters belong to: the stream in their
``__cuda_array_interface__`` (CuPy), torch's current stream for torch tensors, the
array's own stream for a Numba device array, else the default stream.  A step does not
synchronise the device: the per-step table of scalars (a few dozen bytes) is copied
from pageable host memory with ``cuMemcpyHtoDAsync`` on that stream, which stages the
bytes before returning and orders the copy before the kernel.  What waits is rarer:
``to_host`` (checkpoints) waits for the device, and ``zeros`` and ``place`` (new state at a
first step, buffers placed after a load) wait for their stream.

Launch.  The first launch with given buffers goes through Numba's dispatcher (typing,
compiling, marshalling the arguments); the optimizer's ready path then replays it while the
buffers, device, stream and table stay the same (``CudaBackend.launcher``, ``_Replay``).

Allocation.  State buffers are CuPy arrays when CuPy is installed and can see a GPU,
Numba device arrays otherwise (``CudaBackend.array_library`` = ``"auto"``, ``"cupy"`` or
``"numba"``), on the device of the parameters last checked.
"""
import ctypes
import functools
import math
import sys
import threading
import weakref

import numpy as np
from numba import cuda

from flatopt.backend import (CPU, SUPPORTED_DTYPES, byte_extent, check_gather, check_pair, describe,
                             is_cuda_array, is_torch_cuda_tensor, split_chunks)
from flatopt.kernels import cuda as kernels

SIMULATOR = kernels.SIMULATOR
_DTYPES = frozenset(SUPPORTED_DTYPES)
_TYPESTR = {}


class _Info:
    """What a step needs to know about one buffer."""

    __slots__ = ("shape", "dtype", "contiguous", "ptr", "nbytes", "writeable", "device", "stream", "view")

    def __init__(self, shape, dtype, contiguous, ptr, nbytes, writeable, device, stream, view):
        self.shape, self.dtype, self.contiguous, self.ptr = shape, dtype, contiguous, ptr
        self.nbytes, self.writeable, self.device, self.stream, self.view = nbytes, writeable, device, stream, view

    def with_view(self, view):
        return _Info(self.shape, self.dtype, self.contiguous, self.ptr, self.nbytes, self.writeable, self.device,
                     self.stream, view)


class Plan:
    """How one step's segments are cut: the chunk table (host, and per device a device
    copy uploaded once), the grid and the block size."""

    def __init__(self, chunks, grid, block):
        self.chunks, self.grid, self.block = chunks, grid, block
        self._device_chunks = {}

    @property
    def nchunks(self):
        return len(self.chunks)

    def __repr__(self):
        return f"Plan({self.nchunks} chunks, grid={self.grid}, block={self.block})"


def _check_same_gpu(info, params):
    if info.device is not None and params.device is not None and info.device != params.device:
        raise ValueError(f"a buffer of this step is on GPU {info.device} but params are on GPU {params.device}; "
                         "move optimizer state with state_dict() / load_state_dict()")


class CudaBackend:
    """Buffers on a GPU, Numba CUDA kernels."""

    name = "cuda"

    def __init__(self, *, block=256, blocks_per_sm=64, min_blocks_per_sm=16, chunk=8192, min_chunk=1024,
                 max_chunk=1 << 16, align=32, max_grid=None, array_library="auto"):
        # Block: 256 threads.  Grid: 16 to 64 blocks per SM, more than can be resident (2048
        # threads per SM at most; fewer when a kernel needs more registers): the grid-stride
        # loop over chunks lets waiting blocks take the chunks that are left, and keeping
        # every SM full of loads in flight is what reaches HBM bandwidth.  Measured on an H200
        # (float32 Adam, fixed blocks per SM 16 / 32 / 64): at 1e8 elements 762 / 748 / 741 µs,
        # at 1e7 82 / 84 / 91 µs, since blocks of ~1K elements spend more on starting than on
        # moving data.  Hence about ``chunk`` elements per block, between those two bounds.
        # Chunks: at least 4 elements per thread (the segment's row of scalars is read once
        # per chunk), at most 64K elements, and a whole number of chunks per block when the
        # buffer is one segment.
        self.block, self.blocks_per_sm, self.min_blocks_per_sm = block, blocks_per_sm, min_blocks_per_sm
        self.chunk, self.min_chunk, self.max_chunk = chunk, min_chunk, max_chunk
        self.align, self.max_grid = align, max_grid
        self.array_library = array_library
        self._views = {}
        self._where = threading.local()  # per thread: the device of the params it last checked (see _device)
        self._sm_count = {}
        self._streams = {}
        self._tables = threading.local()  # per thread: its tables go with it
        self._empty = {}
        self._cupy = None
        self._checked = None

    # --- describing buffers ----------------------------------------------------------------
    def _info(self, obj, name="the array"):
        """``obj`` described; ``name`` is what an error calls it."""
        if SIMULATOR and type(obj).__name__ == "FakeCUDAArray":
            ary = obj._ary
            return _Info(ary.shape, ary.dtype, ary.flags.c_contiguous, ary.__array_interface__["data"][0],
                         ary.nbytes, ary.flags.writeable, 0, None, obj)
        if not SIMULATOR and isinstance(obj, _device_ndarray_type()):
            return self._numba_info(obj)
        if is_torch_cuda_tensor(obj):
            return self._torch_info(obj, name)
        try:
            desc = obj.__cuda_array_interface__
        except AttributeError:
            raise TypeError(f"expected a CUDA array (CuPy, Numba device array or an object with "
                            f"__cuda_array_interface__), got {describe(obj)}") from None
        return self._cai_info(obj, desc, name)

    def _numba_info(self, arr):
        ptr = arr.device_ctypes_pointer.value or 0
        known = self._remembered(arr, ptr)
        if known is not None:
            device = known[1]
        else:
            device = self._pointer_device(arr, ptr)
            self._remember(arr, ptr, None, device)
        itemsize = arr.dtype.itemsize
        return _Info(arr.shape, arr.dtype, arr.is_c_contiguous(), ptr, arr.size * itemsize, True, device,
                     arr.stream, arr)

    def _cai_info(self, obj, desc, name="the array"):
        if desc.get("mask") is not None:  # (a TypeError, as for a masked NumPy array)
            raise TypeError(f"{name} is a masked CUDA array; flatopt reads every element of its buffers, "
                            "masked or not")
        shape = tuple(desc["shape"])
        typestr = desc["typestr"]
        dtype = _TYPESTR.get(typestr)
        if dtype is None:
            dtype = _TYPESTR[typestr] = np.dtype(typestr)
        ptr, readonly = desc["data"]
        ptr = ptr or 0
        strides = desc.get("strides")
        contiguous = strides is None or tuple(strides) == _c_strides(shape, dtype.itemsize) or (
            len(shape) == 1 and shape[0] <= 1)
        nbytes = math.prod(shape) * dtype.itemsize
        # (the strides are part of the key: an exporter may present its memory otherwise later)
        key = (ptr, shape, typestr, None if contiguous else tuple(strides))
        known = self._remembered(obj, key)
        if known is not None:
            view, device = known
        else:
            view, device = None, self._pointer_device(obj, ptr)
            if contiguous:
                view = self._view_from_cai(obj, desc, shape, dtype, ptr, nbytes)
            self._remember(obj, key, view, device)
        stream = desc.get("stream")
        if stream is None and _from_package(obj, "torch"):
            stream = _torch_stream(obj)
        return _Info(shape, dtype, contiguous, ptr, nbytes, not readonly, device, stream, view)

    def _torch_info(self, t, name="the array"):
        """A torch CUDA tensor seen before, described from its attributes: torch's
        ``__cuda_array_interface__`` builds the interface in Python (4 µs a read on an H200's
        host, and a step reads two).  The first sight of a tensor, and anything its attributes
        do not settle (a tensor that requires grad, a dtype without kernels, a buffer that
        moved), go through the interface, torch's own errors included."""
        dtype = _torch_dtypes().get(t.dtype)
        if dtype is None or t.requires_grad:
            return self._cai_info(t, t.__cuda_array_interface__, name)
        shape, ptr = tuple(t.shape), t.data_ptr()
        known = self._remembered(t, (ptr, shape, dtype.str, None))  # the key _cai_info remembers a dense one under
        if known is None or known[0] is None:
            return self._cai_info(t, t.__cuda_array_interface__, name)
        view, device = known
        return _Info(shape, dtype, t.is_contiguous(), ptr, t.numel() * dtype.itemsize, True, device,
                     _torch_stream(t), view)

    def _view_from_cai(self, obj, desc, shape, dtype, ptr, nbytes):
        cacheable = _weakrefable(obj)
        if SIMULATOR:
            # Under the simulator "device" pointers are host pointers (test doubles).
            if nbytes == 0:
                host = np.empty(shape, dtype)
            else:
                host = np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype).reshape(shape)
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
            return FakeCUDAArray(host)
        # sync=False: no synchronisation of the exporter's stream (we launch on it instead);
        # owner=None for cached views, which must not keep the user's buffer alive.
        return cuda.from_cuda_array_interface(dict(desc, stream=None), owner=None if cacheable else obj,
                                              sync=False)

    def _remember(self, obj, key, view, device):
        if not _weakrefable(obj):
            return
        views = self._views
        oid = id(obj)
        if len(views) > 256:
            views.clear()
        views[oid] = (weakref.ref(obj, lambda _, oid=oid: views.pop(oid, None)), key, view, device)

    def _remembered(self, obj, key):
        """``(view, device)`` as ``_remember`` kept them for ``obj`` under ``key``; None where it
        kept nothing for this object (or for another one since gone, at the same id) or under
        another key (the buffer moved)."""
        entry = self._views.get(id(obj))
        if entry is not None and entry[0]() is obj and entry[1] == key:
            return entry[2], entry[3]
        return None

    def _pointer_device(self, obj, ptr):
        """The ordinal of the GPU holding ``ptr`` (None for an empty buffer)."""
        if SIMULATOR:
            return 0
        device = getattr(obj, "device", None)
        if _from_package(obj, "torch") and device is not None:
            return device.index
        if _from_package(obj, "cupy") and device is not None:
            return device.id
        if not ptr:
            return None
        try:
            from numba.cuda.cudadrv.driver import binding, driver
            attr = binding.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
            return int(driver.cuPointerGetAttribute(attr, binding.CUdeviceptr(ptr)))
        except Exception:  # noqa: BLE001 - an unknown pointer: assume the current device
            return cuda.get_current_device().id

    def _contiguous_info(self, obj):
        info = self._info(obj)
        if info.view is None or not info.contiguous:
            raise ValueError(f"{describe(obj)} is not contiguous")
        return info

    # --- the backend interface -----------------------------------------------------------------
    def check(self, params, grads):
        self._checked = None
        pi, gi = self._info(params, "params"), self._info(grads, "grads")
        if not (len(pi.shape) == 1 and pi.dtype in _DTYPES and gi.dtype == pi.dtype and pi.shape == gi.shape
                and pi.contiguous and gi.contiguous and pi.writeable) or (
                pi.ptr < gi.ptr + gi.nbytes and gi.ptr < pi.ptr + pi.nbytes):
            infos = {id(params): pi, id(grads): gi}
            check_pair(params, grads, shape_of=lambda a: infos[id(a)].shape, dtype_of=lambda a: infos[id(a)].dtype,
                       contiguous=lambda a: infos[id(a)].contiguous, writeable=lambda a: infos[id(a)].writeable,
                       span=lambda a: (infos[id(a)].ptr, infos[id(a)].ptr + infos[id(a)].nbytes))
        if pi.device is not None and gi.device is not None and pi.device != gi.device:
            raise ValueError(f"params are on GPU {pi.device} but grads are on GPU {gi.device}; "
                             "both must be on the same GPU")
        if pi.device is not None:
            self._device = pi.device
        # launch() reuses these (reading __cuda_array_interface__ costs microseconds), within the
        # step: the buffers are named by weak reference (or id) and left out of their
        # descriptions, so that a step that ends before its launch (every group frozen, a
        # refusal) keeps no reference to them
        self._checked = (_name(params), _name(grads), _unowned(pi, params), _unowned(gi, grads))

    @property
    def _device(self):
        """The GPU of the params this thread last checked: where a step's new state goes.  Per
        thread: another thread's step between a check and the allocation that follows it would
        put the state on its own GPU."""
        return getattr(self._where, "device", None)

    @_device.setter
    def _device(self, device):
        self._where.device = device

    def _described(self, buffer, name="the array"):
        checked = self._checked
        if checked is not None and _is(checked[0], buffer):  # the step's params, described by check()
            return checked[2]
        return self._info(buffer, name)

    def shape(self, buffer, name="the array"):
        """Its shape; ``name`` is what an error calls it (a masked one, say)."""
        return self._described(buffer, name).shape

    def length(self, buffer):
        """Its number of elements along the first axis (an exporter need not define ``len``)."""
        return self._described(buffer).shape[0]

    def dtype(self, buffer, name="the array"):
        """The buffer's NumPy dtype (torch tensors report a torch.dtype of their own)."""
        return self._described(buffer, name).dtype

    def usable(self, buffer, like):
        """Whether the kernels can read and write ``buffer`` in place beside ``like`` (the
        params): a contiguous, writeable CUDA array on its GPU (else ``place`` copies it)."""
        if not is_cuda_array(buffer):
            return False
        info, beside = self._info(buffer), self._described(like)
        return info.view is not None and info.contiguous and info.writeable and (
            info.device is None or beside.device is None or info.device == beside.device)

    def check_beside(self, buffer, like):
        """Refuses a placed state buffer on another GPU than ``like`` (the params) before the
        step allocates the buffers it first needs (else a refused step would add them)."""
        _check_same_gpu(self._info(buffer), self._described(like))

    def owns(self, buffer):
        return is_cuda_array(buffer)

    def zeros(self, n, dtype, like=None):
        """Zeros on the device (``like``'s GPU, else that of the params last checked), written
        before this returns: they are written on CuPy's current stream or the default stream,
        and a step's kernel runs on its params' stream, which need not wait for those (a torch
        side stream does not).  (New state: the first step only.)"""
        dtype = np.dtype(dtype)
        device = self._device if like is None else self._described(like).device
        cp = self._array_module()
        if cp is not None:
            with cp.cuda.Device(device or 0):
                zeros = cp.zeros(n, dtype=dtype)
                cp.cuda.get_current_stream().synchronize()
                return zeros
        if SIMULATOR:
            return cuda.to_device(np.zeros(n, dtype))
        with self._on(device):
            arr = cuda.device_array(n, dtype=dtype)
            if n:
                from numba.cuda.cudadrv.driver import device_memset
                device_memset(arr, 0, arr.size * dtype.itemsize)
                cuda.default_stream().synchronize()
            return arr

    def empty_state(self, dtype):
        key = (np.dtype(dtype), self._device)
        arr = self._empty.get(key)
        if arr is None:
            with self._on(self._device):
                arr = self._empty[key] = cuda.device_array(0, dtype=np.dtype(dtype))
        return arr

    def to_host(self, buffer):
        info = self._info(buffer)
        strided = info.view is None or not info.contiguous  # (a buffer assigned as a strided view)
        if SIMULATOR:
            return self._strided_to_host(buffer) if strided else info.view.copy_to_host()
        with self._on(info.device):
            cuda.synchronize()  # finish the steps queued on any stream before reading
            return self._strided_to_host(buffer) if strided else info.view.copy_to_host()

    def _strided_to_host(self, obj):
        """A host copy of a CUDA array that is not contiguous (slow weights or a state buffer
        assigned as a strided view: a rare path).  The bytes its elements span are copied as
        they lie, and read on the host with its strides: negative ones too (CuPy's ``a[::-1]``),
        which Numba's own strided copy refuses."""
        if hasattr(obj, "copy_to_host"):  # Numba's device arrays (the simulator's too)
            try:
                return obj.copy_to_host()
            except NotImplementedError:  # (numba-cuda's refusal of negative strides on a GPU)
                pass
        desc = obj.__cuda_array_interface__
        info = self._info(obj)
        strides = tuple(desc.get("strides") or _c_strides(info.shape, info.dtype.itemsize))
        if not info.nbytes:
            return np.empty(info.shape, info.dtype)
        low, high = byte_extent(info.shape, strides, info.dtype.itemsize)  # (low: the bytes before the first element)
        span = high - low
        if SIMULATOR:  # "device" pointers are host pointers
            raw = (ctypes.c_char * span).from_address(info.ptr + low)
        else:
            raw = cuda.from_cuda_array_interface(
                dict(shape=(span,), typestr="|u1", data=(info.ptr + low, True), version=3, strides=None,
                     stream=desc.get("stream")), owner=obj, sync=True).copy_to_host()
        return np.ndarray(info.shape, info.dtype, buffer=raw, offset=-low, strides=strides).copy()

    def place(self, array, like):
        """A copy of ``array`` (host data or a CUDA array) in device memory, in ``like``'s dtype."""
        dtype = _dtype_of(like)
        if is_cuda_array(array):  # not through the host where it can be avoided: it is slow
            info = self._info(array)
            dense = info.view is not None and info.contiguous
            if dense and info.dtype == dtype and len(info.shape) == 1:
                copy = self.zeros(info.shape[0], dtype)
                self.copy(array, copy)
                if not SIMULATOR:  # copied on the copy's stream: done before a step's kernel reads it (as zeros)
                    placed = self._info(copy)
                    with self._on(placed.device):
                        self._stream(placed).synchronize()
                return copy
            array = self.to_host(array) if dense else self._strided_to_host(array)
        host = np.ascontiguousarray(array, dtype=dtype)
        cp = self._array_module()
        if cp is not None:
            with cp.cuda.Device(self._device or 0):
                return cp.asarray(host)
        with self._on(self._device):
            return cuda.to_device(host)

    def copy(self, src, dst, spans=None, like=None):
        """``dst[:] = src`` (or the ``spans`` of it) on ``like``'s stream, else ``dst``'s.
        Lookahead passes its params as ``like``: its copies then come after whatever the caller
        queued on the params' stream and before its step's kernels there (a copy on the slow
        weights' stream, CuPy's, need not wait for a torch side stream)."""
        d = self._contiguous_info(dst)
        if isinstance(src, np.ndarray):
            source = np.ascontiguousarray(src, dtype=d.dtype)
        else:
            source = self._contiguous_info(src).view
        if len(source) != d.shape[0]:
            raise ValueError(f"cannot copy {len(source)} elements into a buffer of {d.shape[0]}")
        pieces = [(d.view, source)] if spans is None else [(d.view[a:b], source[a:b]) for a, b in spans]
        if SIMULATOR:
            for to, what in pieces:
                to.copy_to_device(what)
            return
        stream = self._stream(d if like is None else self._described(like))
        with self._on(d.device):
            for to, what in pieces:
                to.copy_to_device(what, stream=stream)

    def table(self, rows, dtype, reuse=None):
        # Host rows: ``launch`` copies them asynchronously on the step's stream when they differ
        # from what it last sent.
        return CPU.table(rows, dtype, reuse)

    def plan(self, segments):
        if not (isinstance(self.block, int) and 0 < self.block <= kernels.MAX_BLOCK):
            raise ValueError(f"block must be 1 to {kernels.MAX_BLOCK} threads (the kernels' launch bounds), "
                             f"got {self.block!r}")
        segments = [(int(a), int(b), int(r)) for a, b, r in segments]
        total = sum(stop - start for start, stop, _ in segments)
        grid = self._grid(total)
        waves = -(-total // (grid * self.max_chunk))  # chunks per block when every chunk is max size
        hint = max(1, min(grid * waves, total // self.min_chunk))
        chunks = split_chunks(segments, hint, align=self.align)
        return Plan(chunks, max(1, min(len(chunks), grid)), self.block)

    def _grid(self, total):
        """Blocks to launch on ``total`` elements: about ``chunk`` elements per block, with
        ``min_blocks_per_sm`` to ``blocks_per_sm`` blocks per SM (``max_grid`` overrides)."""
        if self.max_grid:
            return self.max_grid
        sms = self._sms(self._device)
        most = self.blocks_per_sm * sms
        return min(most, max(min(self.min_blocks_per_sm * sms, most), total // self.chunk))

    def launcher(self, kernel, plan, dtype, states):
        """``launch`` with all but the buffers and the table bound: ``f(params, grads, table,
        gather=None)`` (the CUDA kernels specialise on the dtype when launched; a ``gather``
        is refused, as by ``launch``: see ``check_gather``).

        Its calls repeat one launch, so they replay it: the first call with given buffers
        (addresses, shape, device, stream) and table goes through Numba's dispatcher, which
        types, compiles and marshals the arguments; the calls after it launch the same kernel
        with the same marshalled arguments (``_Replay``).  On an H200's host the dispatcher's
        call took 57 µs of an 83 µs Adam step, the replayed launch 10 µs.  The bound state
        buffers are the optimizer's own allocations (assigned ones are copied), whose
        addresses never change while the launcher lives.
        """
        if SIMULATOR:
            def simulated(params, grads, table, gather=None):
                if gather is not None:  # (the prepared step's: it leaves the check to the launcher)
                    check_gather(self)
                return self.launch(kernel, params, grads, states, plan, table)
            return simulated
        replays = {}

        def launch(params, grads, table, gather=None):
            if gather is not None:  # (the prepared step's: it leaves the check to the launcher)
                check_gather(self)
            checked = self._checked
            if checked is None or not (_is(checked[0], params) and _is(checked[1], grads)):
                return self.launch(kernel, params, grads, states, plan, table)
            p, g = checked[2], checked[3]
            # (and the thread: a replay uploads into the device table of the thread that recorded it,
            # which that thread's other optimizers share; see _table_entry)
            key = (p.ptr, g.ptr, p.shape, g.shape, p.dtype, g.dtype, p.device, g.device, p.stream, id(table),
                   threading.get_ident())
            replay = replays.get(key)
            if replay is None:
                replay = self.launch(kernel, params, grads, states, plan, table, replayable=True)
                replays.clear()  # one training loop, one set of buffers: keep the latest only
                if replay is not None:
                    replays[key] = replay
                return None
            self._checked = None
            return replay(table)

        return launch

    def launch(self, kernel, params, grads, states, plan, table, replayable=False):
        checked, self._checked = self._checked, None
        if checked is not None and _is(checked[0], params) and _is(checked[1], grads):
            infos = [_owned(checked[2], params), _owned(checked[3], grads)]
        else:
            infos = [self._contiguous_info(params), self._contiguous_info(grads)]
        infos += [self._contiguous_info(s) for s in states]
        p = infos[0]
        for info in infos[1:]:
            _check_same_gpu(info, p)
        if plan.nchunks == 0:
            return None
        fn = kernels.get_kernel(kernel, p.dtype)
        args = [info.view for info in infos]
        if SIMULATOR:
            host = table.copy_to_host() if hasattr(table, "copy_to_host") else table
            fn[plan.grid, plan.block](*args, cuda.to_device(plan.chunks), cuda.to_device(np.asarray(host, p.dtype)))
            return None
        with self._on(p.device):
            stream = self._stream(p)
            chunks = plan._device_chunks.get(p.device)
            if chunks is None:
                chunks = plan._device_chunks[p.device] = cuda.to_device(plan.chunks)
            if is_cuda_array(table):
                device_table, replayable = table, False
            else:
                host = np.ascontiguousarray(table, dtype=p.dtype)
                replayable = replayable and host is table  # a replay uploads the table it is given
                entry = self._table_entry(host, p.device, stream)
                device_table = self._upload(entry, host, stream)
            args += [chunks, device_table]
            fn[plan.grid, plan.block, stream](*args)
            if replayable:
                return _Replay.of(fn, args, plan, stream, entry, table, functools.partial(self._on, p.device))
        return None

    # --- helpers -----------------------------------------------------------------------------
    def _table_entry(self, host, device, stream):
        """``[device buffer, bytes last sent]`` for tables of ``host``'s shape and dtype on
        this device and stream, shared by every optimizer this thread steps there.  (Shared
        between threads, one thread's upload could land between another's upload and launch.)"""
        tables = getattr(self._tables, "entries", None)
        if tables is None:
            tables = self._tables.entries = {}
        key = (device, _stream_key(stream), host.shape, host.dtype)
        entry = tables.get(key)
        if entry is None:
            entry = tables[key] = [cuda.device_array(host.shape, dtype=host.dtype), None]
        return entry

    @staticmethod
    def _upload(entry, host, stream):
        buf, last = entry
        sent = host.tobytes()
        if sent != last:  # the core rewrites its tables in place: compare what they hold
            # Pageable source + stream: cuMemcpyHtoDAsync stages the bytes and returns; the
            # copy is ordered after the previous step's kernel on this stream, which read buf.
            from numba.cuda.cudadrv.driver import host_to_device  # DeviceNDArray.copy_to_device: ~70 µs more
            host_to_device(buf, host, host.nbytes, stream=stream)
            entry[1] = sent
        return buf

    def _stream(self, info):
        """A Numba stream object for the stream ``info``'s buffer belongs to."""
        s = info.stream
        if s is not None and not isinstance(s, int):
            return s  # a Numba device array's own stream object
        key = (info.device, s)
        stream = self._streams.get(key)
        if stream is None:
            if s in (None, 0):
                stream = cuda.default_stream()
            elif s == 1:
                stream = cuda.legacy_default_stream()
            elif s == 2:
                stream = cuda.per_thread_default_stream()
            else:
                stream = cuda.external_stream(s)
            self._streams[key] = stream
        return stream

    def _on(self, device):
        """Context manager making ``device`` current (a no-op when it already is)."""
        if SIMULATOR or device is None or len(cuda.gpus) == 1 or cuda.get_current_device().id == device:
            return _NULL
        return cuda.gpus[device]

    def _sms(self, device):
        if SIMULATOR:
            return 1
        n = self._sm_count.get(device)
        if n is None:
            with self._on(device):
                n = self._sm_count[device] = int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
        return n

    def _array_module(self):
        """CuPy when state should be CuPy arrays, None for Numba device arrays."""
        lib = self.array_library
        if lib not in ("auto", "cupy", "numba"):
            raise ValueError(f"array_library must be 'auto', 'cupy' or 'numba', got {lib!r}")
        if lib == "numba" or (SIMULATOR and lib == "auto"):
            return None
        if self._cupy is None:
            self._cupy = _usable_cupy()
        if isinstance(self._cupy, str):
            if lib == "cupy":
                raise ImportError(f"flatopt's CUDA backend was asked for CuPy arrays (array_library='cupy') "
                                  f"but {self._cupy}; install CuPy for your CUDA version (e.g. "
                                  f"`pip install cupy-cuda13x`) or set flatopt.kernels.cuda_backend.CUDA."
                                  f"array_library = 'numba'")
            return None
        return self._cupy


def _name(buffer):
    """A name for ``buffer`` that keeps it alive no longer: a weak reference where it takes
    one, else its id (only compared within the step that made it)."""
    try:
        return weakref.ref(buffer)
    except TypeError:
        return id(buffer)


def _is(name, buffer):
    return name() is buffer if type(name) is weakref.ref else name == id(buffer)


def _unowned(info, buffer):
    """``info`` without a reference to ``buffer`` (a Numba device array is its own view)."""
    return info if info.view is not buffer else info.with_view(None)


def _owned(info, buffer):
    """``info`` as ``check`` described ``buffer``, with ``buffer`` as its view again where
    ``_unowned`` left it out (a checked buffer is contiguous: it has a view)."""
    return info if info.view is not None else info.with_view(buffer)


class _Replay:
    """One launch made again: the kernel, launch configuration and arguments exactly as Numba's
    dispatcher marshalled them for the launch it just made (``_Kernel.launch`` of numba-cuda,
    minus its per-call typing and marshalling), and the step's table uploaded first when it
    changed.  Built only where numba-cuda launches through ``cuda.core`` and the kernel needs
    nothing per call (no debug, cooperative, launch-config-sensitive or extension handling);
    elsewhere ``of`` returns None and every step goes through the dispatcher.
    """

    __slots__ = ("run", "config", "kernel", "kernelargs", "stream", "core_stream", "entry", "table", "on", "keep")

    @classmethod
    def of(cls, dispatcher, args, plan, stream, entry, table, on):
        try:
            from numba.cuda import dispatcher as numba_dispatcher
            run, config_type = numba_dispatcher.launch, numba_dispatcher.LaunchConfig
            kernel = dispatcher.overloads[tuple(map(dispatcher.typeof_pyval, args))]
            per_call = (kernel.debug, kernel.cooperative, kernel.extensions,
                        getattr(kernel, "launch_config_sensitive", False),
                        getattr(dispatcher, "_launch_config_sensitive", False))
            if any(per_call):
                return None
            kernelargs, writebacks = [], []
            for ty, value in zip(kernel.argument_types, args, strict=True):
                kernel._prepare_args(ty, value, stream, writebacks, kernelargs)
            if writebacks:  # host arrays copied to the device and back: not a plain launch
                return None
            flag = "is_cooperative" if numba_dispatcher.CUDA_CORE_GE_1_0 else "cooperative_launch"
            config = config_type(grid=plan.grid, block=plan.block, shmem_size=0, **{flag: False})
            cufunc = kernel._codelibrary.get_cufunc().kernel
            # cuda.core's launch takes its own stream type (given a Numba stream through the
            # stream protocol it warns of deprecation); convert as the dispatcher's launch does
            from numba.cuda.cudadrv import driver
            core_stream = getattr(driver, "_to_core_stream", lambda s: s)(stream)
        except Exception:  # noqa: BLE001 - another numba-cuda: the dispatcher stays the way
            return None
        self = cls()
        self.run, self.config, self.kernel, self.kernelargs = run, config, cufunc, kernelargs
        self.stream, self.core_stream, self.entry, self.on = stream, core_stream, entry, on
        self.table = table  # held: the launcher's key has its id
        self.keep = args  # the marshalled addresses stay valid while these live
        return self

    def __call__(self, table):
        with self.on():
            CudaBackend._upload(self.entry, table, self.stream)
            self.run(self.core_stream, self.config, self.kernel, *self.kernelargs)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL = _Null()


def _usable_cupy():
    """The cupy module, or a string saying why it cannot be used."""
    if SIMULATOR:
        return "the CUDA simulator is active (NUMBA_ENABLE_CUDASIM=1)"
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no GPU"
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError and friends
        return f"CuPy cannot use a GPU ({exc})"
    return cupy


def _device_ndarray_type():
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    return DeviceNDArray


def _from_package(obj, package):
    """Whether ``obj``'s class is ``package``'s (``torch``, ``cupy``), not merely one of a package
    whose name begins the same (``torchmetrics``, ``cupyx_like``)."""
    module = type(obj).__module__ or ""
    return module == package or module.startswith(package + ".")


def _c_strides(shape, itemsize):
    strides, stride = [], itemsize
    for dim in reversed(shape):
        strides.append(stride)
        stride *= dim
    return tuple(reversed(strides))


def _weakrefable(obj):
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def _stream_key(stream):
    # The handle's address, not int(stream): Numba's Stream.__int__ answers an enum member for the
    # default stream, an __int__ result Python deprecates.
    for value in (getattr(stream, "handle", None), stream):
        try:
            return int(value)
        except (TypeError, ValueError):
            pass
    return id(stream)


def _torch_stream(tensor):
    """torch's current stream on the tensor's device, as a pointer (None: the default stream).
    The raw read is what ``torch.cuda.current_stream(device).cuda_stream`` returns, without
    building a Stream object (0.3 against 6.4 µs on an H200's host)."""
    torch = sys.modules["torch"]
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    device = tensor.get_device()
    ptr = raw(device) if raw is not None else torch.cuda.current_stream(device).cuda_stream
    return ptr or None


@functools.cache
def _torch_dtypes():
    torch = sys.modules["torch"]
    return {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def _dtype_of(like):
    if isinstance(like, np.ndarray):
        return like.dtype
    desc = getattr(like, "__cuda_array_interface__", None)
    if desc is not None:
        return np.dtype(desc["typestr"])
    return np.dtype(like.dtype)


# Under the simulator every CUDA thread is a Python thread: a grid of 2 blocks of 32 threads
# and chunks of at most 64 elements keep it quick while still running both grid-stride loops
# (several chunks per block, several elements per thread) on a few hundred elements.
CUDA = CudaBackend(block=32, blocks_per_sm=2, min_chunk=32, max_chunk=64, align=16) if SIMULATOR else CudaBackend()
