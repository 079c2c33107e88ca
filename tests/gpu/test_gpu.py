"""The CUDA backend on a real GPU, at sizes the simulator cannot reach (1e6+ elements):
CuPy arrays, Numba device arrays and torch CUDA tensors, against the CPU kernels (bitwise:
both sides round every operation the same way) and torch.optim on the GPU.

Skipped without a GPU (and under NUMBA_ENABLE_CUDASIM=1, whose 'GPU' is the simulator).
"""
import os

import numpy as np
import pytest

import flatopt


def _no_gpu_reason():
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0"):
        return "NUMBA_ENABLE_CUDASIM is set: the simulator is not a GPU"
    try:
        from numba import cuda
    except Exception as exc:  # noqa: BLE001 - numba-cuda missing or broken
        return f"numba-cuda is not usable ({exc})"
    try:
        if not cuda.is_available():
            return "no CUDA GPU (numba.cuda.is_available() is False)"
    except Exception as exc:  # noqa: BLE001
        return f"no CUDA GPU ({exc})"
    return None


NO_GPU = _no_gpu_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NO_GPU is not None, reason=str(NO_GPU))]
N = 1_000_003  # not a multiple of anything: partial chunks, partial warps
DTYPES = [np.float32, np.float64]

OPTIMIZERS = {
    "sgd-nesterov": lambda: flatopt.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "momentum": lambda: flatopt.Momentum(lr=0.1),
    "rmsprop-centered": lambda: flatopt.RMSprop(lr=0.01, momentum=0.5, centered=True, weight_decay=0.1),
    "adam-amsgrad": lambda: flatopt.Adam(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True),
    "adamw": lambda: flatopt.AdamW(lr=0.01, betas=(0.3, 0.9)),
    "adopt": lambda: flatopt.ADOPT(lr=0.01, weight_decay=0.1, decouple=True),
    "lookahead-adam": lambda: flatopt.Lookahead(flatopt.Adam(lr=0.01), k=2, alpha=0.5),
}
GROUPS = [{"start": 0, "stop": 400_000, "lr": 0.05}, {"start": 400_000, "stop": 500_000, "frozen": True},
          {"start": 600_000, "stop": N, "weight_decay": 0.2}]


@pytest.fixture(scope="module")
def cupy():
    cp = pytest.importorskip("cupy")
    try:
        cp.zeros(1)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"CuPy cannot use the GPU: {exc}")
    return cp


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    return torch


def data(n=N, dtype=np.float32, steps=3, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(steps)]
    grads[0][:4] = [np.nan, np.inf, -np.inf, 0.0]
    return p, grads


def cpu_run(make, p0, grads):
    opt, p = make(), p0.copy()
    for g in grads:
        opt.step(p, g)
    return opt, p


def assert_same(actual, expected):
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    bits = np.uint32 if expected.dtype == np.float32 else np.uint64
    mismatch = np.flatnonzero(actual[~nan].view(bits) != expected[~nan].view(bits))
    assert mismatch.size == 0, f"{mismatch.size} elements differ"


def with_groups(make):
    def build():
        opt = make()
        getattr(opt, "inner", opt).param_groups = GROUPS
        return opt
    return build


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(OPTIMIZERS))
def test_cupy_bitwise_equal_to_cpu_kernels(cupy, case, dtype):
    p0, grads = data(dtype=dtype)
    make = with_groups(OPTIMIZERS[case])
    ref, expected = cpu_run(make, p0, grads)
    opt, p = make(), cupy.asarray(p0)
    for g in grads:
        opt.step(p, cupy.asarray(g))
    assert_same(cupy.asnumpy(p), expected)
    inner, ref_inner = getattr(opt, "inner", opt), getattr(ref, "inner", ref)
    for name, buf in inner.state_dict()["state"].items():
        assert_same(buf, ref_inner.state[name])


@pytest.mark.parametrize("dtype", DTYPES)
def test_numba_device_arrays_without_cupy(monkeypatch, dtype):
    from numba import cuda

    from flatopt.kernels.cuda_backend import CUDA
    monkeypatch.setattr(CUDA, "array_library", "numba")
    p0, grads = data(dtype=dtype)
    _, expected = cpu_run(OPTIMIZERS["adam-amsgrad"], p0, grads)
    opt, p = OPTIMIZERS["adam-amsgrad"](), cuda.to_device(p0)
    for g in grads:
        opt.step(p, cuda.to_device(g))
    assert all(type(b).__name__ == "DeviceNDArray" for b in opt.state.values())
    assert_same(p.copy_to_host(), expected)


def test_hyperparameter_changes_do_not_recompile(cupy):
    from flatopt.kernels import cuda as kernels
    opt, p, g = flatopt.AdamW(lr=1e-3), cupy.ones(N, cupy.float32), cupy.ones(N, cupy.float32)
    opt.step(p, g)
    compiled = len(kernels.get_kernel("adam", np.float32).overloads)
    for k in range(5):
        opt.lr, opt.weight_decay, opt.betas = 1e-3 * (k + 2), 0.1 * k, (0.8, 0.99)
        opt.step(p, g)
    assert len(kernels.get_kernel("adam", np.float32).overloads) == compiled


def test_launch_bounds_hold_on_the_device(cupy):
    """The kernels given more resident blocks per SM are compiled within the registers that
    allows (``MIN_BLOCKS_PER_SM``; test_ptx checks the same offline, without spills)."""
    from flatopt.kernels import cuda as kernels
    for (name, dtype), blocks in kernels.MIN_BLOCKS_PER_SM.items():
        opt = {"rmsprop": flatopt.RMSprop, "adam": flatopt.Adam, "sgd": flatopt.SGD, "adopt": flatopt.ADOPT}[name]()
        opt.step(cupy.ones(N, dtype), cupy.ones(N, dtype))
        regs = max(kernels.get_kernel(name, dtype).get_regs_per_thread().values())
        assert kernels.blocks_resident(regs) >= blocks, (name, dtype, regs)


def test_cupy_state_assigned_between_steps(cupy):
    """CuPy arrays put into ``opt.state`` are copied on the device (CuPy refuses a silent trip
    through the host); the other buffers are kept, and the assigned array is not written."""
    p0, grads = data(dtype=np.float32)
    cpu, dev = flatopt.Adam(lr=1e-2), flatopt.Adam(lr=1e-2)
    pc, pd = p0.copy(), cupy.asarray(p0)
    for g in grads[:2]:
        cpu.step(pc, g)
        dev.step(pd, cupy.asarray(g))
    mine = np.full(len(p0), 0.125, np.float32)
    cpu.state["exp_avg"], dev.state["exp_avg"] = mine.copy(), cupy.asarray(mine)
    assigned = dev.state["exp_avg"]
    for g in grads[2:]:
        cpu.step(pc, g)
        dev.step(pd, cupy.asarray(g))
    assert_same(cupy.asnumpy(pd), pc)
    assert dev.state["exp_avg"] is not assigned and bool((assigned == 0.125).all())
    dev.state["exp_avg_sq"] = cupy.zeros(len(p0), cupy.float64)
    with pytest.raises(TypeError, match="optimizer state's dtype float64"):
        dev.step(pd, cupy.asarray(grads[0]))


@pytest.fixture
def dispatched(monkeypatch):
    """The launches that went through Numba's dispatcher (the others were replayed), one entry each."""
    from numba.cuda import dispatcher as numba_dispatcher

    from flatopt.kernels import cuda as kernels
    if not hasattr(numba_dispatcher, "launch"):
        pytest.skip("this numba-cuda does not launch through cuda.core: every step uses the dispatcher")
    calls = []
    real = kernels.get_kernel
    monkeypatch.setattr(kernels, "get_kernel", lambda *a: (calls.append(a), real(*a))[1])
    return calls


@pytest.mark.filterwarnings("error::DeprecationWarning")
def test_ready_steps_replay_the_dispatchers_launch(cupy, dispatched):
    """Steps with the buffers, stream and table of the last launch replay it without Numba's
    dispatcher (flatopt.kernels.cuda_backend._Replay); any of those changed goes through the
    dispatcher once more, and every step stays bitwise equal to the CPU kernels.  The replay
    hands cuda.core a stream of its own type (a Numba stream is deprecated there)."""
    p0, grads = data(steps=12)
    cpu, dev = flatopt.Adam(lr=1e-2, weight_decay=0.1), flatopt.Adam(lr=1e-2, weight_decay=0.1)
    pc, pd, gd = p0.copy(), cupy.asarray(p0), cupy.empty(len(p0), cupy.float32)

    def step(g, params):
        cpu.step(pc, g)
        gd.set(g)
        dev.step(params, gd)
        return len(dispatched)

    # 1: the full path; 2: the ready path's first call, recorded; 3, 4: replayed (new bias corrections)
    assert [step(g, pd) for g in grads[:4]] == [1, 2, 2, 2]
    moved = pd.copy()  # pd stays alive: the new buffer has another address
    assert [step(g, moved) for g in grads[4:6]] == [3, 3]
    with cupy.cuda.Stream(non_blocking=True) as stream:
        assert [step(g, moved) for g in grads[6:8]] == [4, 4]
        stream.synchronize()
    gd = cupy.empty(len(p0), cupy.float32)  # new grads buffer
    assert [step(g, moved) for g in grads[8:10]] == [5, 5]
    cpu.lr = dev.lr = 3e-3  # a new ready path: its first call goes through the dispatcher
    assert [step(g, moved) for g in grads[10:]] == [6, 7]
    assert_same(cupy.asnumpy(moved), pc)
    assert_same(cupy.asnumpy(dev.state["exp_avg_sq"]), cpu.state["exp_avg_sq"])


def test_a_replay_runs_only_in_the_thread_that_recorded_it(cupy, dispatched):
    """A replay uploads its table into the recording thread's device table, which that thread's
    other optimizers share: stepped from another thread, the optimizer goes through the
    dispatcher once and records a replay of its own there."""
    import threading

    p0, grads = data(steps=8)
    cpu, dev = flatopt.Adam(lr=1e-2), flatopt.Adam(lr=1e-2)
    pc, pd, gd = p0.copy(), cupy.asarray(p0), cupy.empty(len(p0), cupy.float32)

    def step(g):
        cpu.step(pc, g)
        gd.set(g)
        dev.step(pd, gd)
        return len(dispatched)

    def in_thread(gs):
        counts = []
        worker = threading.Thread(target=lambda: counts.extend(step(g) for g in gs))
        worker.start()
        worker.join()
        return counts

    assert [step(g) for g in grads[:3]] == [1, 2, 2]  # recorded in this thread, then replayed
    assert in_thread(grads[3:5]) == [3, 3]  # recorded anew in the other thread, then replayed there
    assert [step(g) for g in grads[5:8]] == [4, 4, 4]
    assert_same(cupy.asnumpy(pd), pc)


def test_cupy_non_default_stream(cupy):
    p0, grads = data(dtype=np.float32)
    _, expected = cpu_run(OPTIMIZERS["adamw"], p0, grads)
    opt = OPTIMIZERS["adamw"]()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        p = cupy.asarray(p0)
        for g in grads:
            opt.step(p, cupy.asarray(g))
        stream.synchronize()
    assert_same(cupy.asnumpy(p), expected)


def test_checkpoint_gpu_to_cpu_and_back(cupy):
    p0, grads = data(dtype=np.float32, steps=6)
    make = OPTIMIZERS["lookahead-adam"]
    _, expected = cpu_run(make, p0, grads)
    a, p = make(), cupy.asarray(p0)
    for g in grads[:2]:
        a.step(p, cupy.asarray(g))
    b = make()
    b.load_state_dict(a.state_dict())  # host NumPy state
    host = cupy.asnumpy(p)
    for g in grads[2:4]:
        b.step(host, g)  # continues on the CPU
    c = make()
    c.load_state_dict(b.state_dict())
    p = cupy.asarray(host)
    for g in grads[4:]:
        c.step(p, cupy.asarray(g))  # and back on the GPU
    assert_same(cupy.asnumpy(p), expected)


class TorchFlat:
    """A torch CUDA tensor as flatopt's core sees buffers (NumPy dtype, length, the CUDA
    array interface); the backend itself takes the tensor as it is."""

    def __init__(self, tensor):
        import torch
        self.tensor = tensor
        self.dtype = np.dtype({torch.float32: np.float32, torch.float64: np.float64}[tensor.dtype])

    @property
    def __cuda_array_interface__(self):
        return self.tensor.__cuda_array_interface__

    def __len__(self):
        return len(self.tensor)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_cuda_tensors_match_cpu_kernels(torch, dtype):
    p0, grads = data(dtype=dtype)
    _, expected = cpu_run(OPTIMIZERS["rmsprop-centered"], p0, grads)
    opt, p = OPTIMIZERS["rmsprop-centered"](), torch.from_numpy(p0).cuda()
    for g in grads:
        opt.step(TorchFlat(p), TorchFlat(torch.from_numpy(g).cuda()))
    torch.cuda.synchronize()
    assert_same(p.cpu().numpy(), expected)


def test_torch_cuda_tensors_straight_into_step(torch):
    from flatopt.backend import CPU
    if not hasattr(CPU, "dtype"):
        pytest.xfail("the core reads params.dtype as a NumPy dtype; torch tensors need the backend.dtype() "
                     "change described in docs/cuda.md")
    p0, grads = data(dtype=np.float32)
    _, expected = cpu_run(OPTIMIZERS["adamw"], p0, grads)
    opt, p = OPTIMIZERS["adamw"](), torch.from_numpy(p0).cuda()
    for g in grads:
        opt.step(p, torch.from_numpy(g).cuda())
    assert_same(p.cpu().numpy(), expected)


def test_torch_tensors_seen_again_are_read_from_their_attributes(torch):
    """After a tensor's first step the backend describes it from its attributes, not torch's
    ``__cuda_array_interface__`` (CudaBackend._torch_info): what torch would refuse or what
    changed since (grad required, storage replaced, another dtype, another stream) is still
    seen, and every step stays bitwise equal to the CPU kernels."""
    from flatopt.backend import is_cuda_array
    from flatopt.kernels.cuda_backend import CUDA
    assert not is_cuda_array(torch.zeros(3)) and is_cuda_array(torch.zeros(3, device="cuda"))
    p0, grads = data(dtype=np.float32, steps=8)
    cpu, dev = flatopt.AdamW(lr=1e-2), flatopt.AdamW(lr=1e-2)
    pc, p, g = p0.copy(), torch.from_numpy(p0).cuda(), torch.empty(len(p0), device="cuda")

    def step(grad):
        cpu.step(pc, grad)
        g.copy_(torch.from_numpy(grad))
        dev.step(p, g)

    for grad in grads[:3]:
        step(grad)
    p.requires_grad_(True)
    with pytest.raises(RuntimeError, match="requires grad"):
        dev.step(p, g)
    p.requires_grad_(False)
    p.data = p.data.clone()  # same tensor object, new storage
    step(grads[3])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        assert CUDA._info(p).stream == stream.cuda_stream
        for grad in grads[4:6]:
            step(grad)
    torch.cuda.current_stream().wait_stream(stream)
    for grad in grads[6:]:
        step(grad)
    torch.cuda.synchronize()
    assert_same(p.cpu().numpy(), pc)
    with pytest.raises(TypeError, match="float16"):
        flatopt.AdamW().step(p.half(), g.half())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, kwargs, flat", [
    ("Adam", dict(lr=0.01, fused=True), lambda: flatopt.Adam(lr=0.01)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, fused=True), lambda: flatopt.AdamW(lr=0.01, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, amsgrad=True, fused=True), lambda: flatopt.Adam(lr=0.01, amsgrad=True)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, foreach=False),
     lambda: flatopt.SGD(lr=0.1, momentum=0.9, nesterov=True)),
    ("RMSprop", dict(lr=0.01, centered=True, foreach=False), lambda: flatopt.RMSprop(lr=0.01, centered=True)),
])
def test_matches_torch_optim_on_the_gpu(torch, cupy, name, kwargs, flat, dtype):
    """torch's CUDA kernels are compiled with FMA contraction, so agreement is to rounding."""
    p0, grads = data(dtype=dtype)
    for g in grads:
        g[:4] = 0.5
    t = torch.from_numpy(p0).cuda()
    topt = getattr(torch.optim, name)([t], **kwargs)
    opt, p = flat(), cupy.asarray(p0)
    for g in grads:
        t.grad = torch.from_numpy(g).cuda()
        topt.step()
        opt.step(p, cupy.asarray(g))
    rtol = 2e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(cupy.asnumpy(p), t.cpu().numpy(), rtol=rtol, atol=rtol)


def test_large_buffer_many_waves(cupy):
    n = (1 << 24) + 5
    p0 = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    g0 = np.ones(n, np.float32)
    _, expected = cpu_run(lambda: flatopt.AdamW(lr=0.01), p0, [g0, g0])
    opt, p, g = flatopt.AdamW(lr=0.01), cupy.asarray(p0), cupy.asarray(g0)
    opt.step(p, g)
    opt.step(p, g)
    assert_same(cupy.asnumpy(p), expected)


def test_errors_on_the_gpu(cupy):
    p = cupy.ones(10, cupy.float32)
    with pytest.raises(TypeError, match="same device"):
        flatopt.Adam().step(p, np.ones(10, np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        flatopt.Adam().step(cupy.ones(20, cupy.float32)[::2], p)
    with pytest.raises(ValueError, match="share memory"):
        flatopt.Adam().step(p, p)
    if cupy.cuda.runtime.getDeviceCount() >= 2:
        with cupy.cuda.Device(1):
            other = cupy.ones(10, cupy.float32)
        with pytest.raises(ValueError, match="params are on GPU 0 but grads are on GPU 1"):
            flatopt.Adam().step(p, other)


# --- streams: what the caller queued on the params' stream comes first ------------------------
# The params live on a torch side stream (torch makes its streams non-blocking: they do not wait
# for the legacy default stream, CuPy's, nor it for them).  A long sleep queued ahead of the work
# under test leaves a wide window: work put on the wrong stream runs inside it and reads or writes
# too early, reliably, not by chance.
SLEEP_CYCLES = 400_000_000  # about 0.2 s of a 2 GHz GPU


def _warm_torch(torch):
    """Load torch's kernels that the tests queue behind the sleep: CUDA loads a kernel's module
    at its first launch, and the load waits for the whole device (the sleep too), which would
    order the streams by itself (seen on an H200: the race below then did not show)."""
    t = torch.ones(8, device="cuda")
    torch.cuda._sleep(1)
    t.mul_(2).clone().copy_(torch.full((8,), 3.0, device="cuda"))
    torch.cuda.synchronize()


def _warm_on(stream, make, torch):
    """Compile and load the kernels, and size the stream's scalar table, before the real test:
    a first launch's module load or allocation could order the streams by itself."""
    _warm_torch(torch)
    with torch.cuda.stream(stream):
        opt, p = make(), torch.ones(N, device="cuda")
        for _ in range(2):
            opt.step(p, torch.ones(N, device="cuda"))
    torch.cuda.synchronize()


def test_new_state_is_zero_before_a_side_streams_kernel_reads_it(torch, cupy):
    """A buffer first needed mid-run (amsgrad switched on: ``max_exp_avg_sq``) is CuPy zeros,
    written on CuPy's current stream, here a non-blocking one kept busy; the step's kernel reads
    it on the params' stream.  Its memory held 7.0 last (CuPy's pool hands it out again).  The
    optimizer has stepped before, so nothing else of the step (a new plan's synchronous upload,
    an allocation) orders the two streams by itself."""
    _warm_torch(torch)
    p0, grads = data(dtype=np.float32, steps=3)
    opt, cpu, pc = flatopt.Adam(lr=0.01), flatopt.Adam(lr=0.01), p0.copy()
    side, busy = torch.cuda.Stream(), cupy.cuda.Stream(non_blocking=True)
    p = torch.from_numpy(p0).cuda()
    with torch.cuda.stream(side), busy:
        for g in grads[:2]:
            opt.step(p, torch.from_numpy(g).cuda())
            cpu.step(pc, g)
        poison = cupy.full(N, 7.0, cupy.float32)
        del poison
        g = torch.from_numpy(grads[2]).cuda()
    torch.cuda.synchronize()
    opt.amsgrad = cpu.amsgrad = True
    cpu.step(pc, grads[2])
    with torch.cuda.stream(torch.cuda.ExternalStream(busy.ptr)):
        torch.cuda._sleep(SLEEP_CYCLES)
    with torch.cuda.stream(side), busy:
        opt.step(p, g)
    torch.cuda.synchronize()
    assert_same(cupy.asnumpy(opt.state["max_exp_avg_sq"]), cpu.state["max_exp_avg_sq"])
    assert_same(p.cpu().numpy(), pc)


def test_lookahead_copies_the_params_after_the_callers_work_on_their_stream(torch, cupy):
    """Lookahead's first step copies the params into its slow weights (CuPy memory): after the
    side stream's write of the params, and before the sync kernel (k=1) reads the copy."""
    p0, grads = data(dtype=np.float32, steps=2)

    def make():
        return flatopt.Lookahead(flatopt.Adam(lr=0.01), k=1, alpha=0.5)

    _, expected = cpu_run(make, p0, grads)
    side = torch.cuda.Stream()
    _warm_on(side, make, torch)
    p, written = torch.full((N,), 3.0, device="cuda"), torch.from_numpy(p0).cuda()
    gs = [torch.from_numpy(g).cuda() for g in grads]
    opt = make()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        p.copy_(written)
        for g in gs:
            opt.step(p, g)
    torch.cuda.synchronize()
    assert_same(p.cpu().numpy(), expected)
    assert_same(cupy.asnumpy(opt.slow), expected)  # k=1: a sync ends every step, fast = slow


def test_lookahead_slow_weights_on_a_side_stream(torch, cupy):
    """``slow_weights()`` keeps the fast weights as the side stream last wrote them, shows the
    slow ones inside the block, and puts the fast ones back, all in the stream's order."""
    p0, grads = data(dtype=np.float32, steps=1)

    def make():
        return flatopt.Lookahead(flatopt.Adam(lr=0.01), k=2, alpha=0.5)

    ref, fast = cpu_run(make, p0, grads)
    fast = fast * 2  # the side stream doubles the params (exactly) before looking at the slow ones
    side = torch.cuda.Stream()
    _warm_on(side, make, torch)
    opt, p = make(), torch.from_numpy(p0).cuda()
    with torch.cuda.stream(side):
        opt.step(p, torch.from_numpy(grads[0]).cuda())
    torch.cuda.synchronize()
    spare = cupy.empty(N, cupy.float32)
    del spare  # the fast weights' copy takes it: an allocation from the device would order the streams
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        p.mul_(2)
        with opt.slow_weights(p):
            inside = p.clone()
        after = p.clone()
    torch.cuda.synchronize()
    assert_same(inside.cpu().numpy(), ref.slow)
    assert_same(after.cpu().numpy(), fast)
