"""GPU bandwidth of flatopt's CUDA kernels: a standalone script, not an asv benchmark.

    python benchmarks/gpu_bandwidth.py [--sizes 1e6,1e7,1e8] [--dtype float32] [--steps 30]

For each size it reports, in one run on one GPU:

* a device-to-device copy (read n + write n elements): the bandwidth a memory-bound kernel
  can hope for;
* every flatopt optimizer step: the bytes the step must move (each buffer read once and
  written once; table and chunk reads are negligible) divided by its median GPU time;
* torch.optim Adam and AdamW with ``fused=True`` on one tensor of the same size, when torch
  has CUDA;
* Adam on a model of ``--model-tensors`` CUDA tensors of the same total size: flatopt.torch
  against torch.optim's ``foreach=True`` and ``fused=True`` (the GPU time and the host time
  per step: with many small tensors the host side can be the limit).

GPU times come from CUDA events around each step, taken while a spinning kernel holds the
stream so that the host can queue all the timed steps first: the times are the kernels'
own, not Python's launch overhead (reported separately as "host µs/step", measured with the
device idle).  Median of ``--steps`` steps after ``--warmup`` steps.

Without a GPU it says so and exits 0.  asv imports every module of the benchmark directory:
this one imports nothing but the standard library and NumPy at module level and defines no
``time_``/``mem_``/``peakmem_``/``track_`` names, so asv finds no benchmark in it.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

# Elements moved per element of the buffer: reads + writes.
TRAFFIC = {
    "SGD(momentum=0.9)": 5,  # p, g, buf read; p, buf written
    "Momentum": 5,
    "RMSprop": 5,  # p, g, v read; p, v written
    "RMSprop(centered, momentum)": 9,
    "Adam": 7,  # p, g, m, v read; p, m, v written
    "AdamW": 7,
    "Adam(amsgrad)": 9,
    "ADOPT": 7,
    "Lookahead sync": 4,  # fast, slow read; both written
}


def gpu_problem():
    """None when a CUDA GPU can be used, else why not."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0"):
        return "NUMBA_ENABLE_CUDASIM is set: the CUDA simulator is not a GPU"
    try:
        from numba import cuda
    except Exception as exc:  # noqa: BLE001
        return f"numba-cuda is not usable ({exc}); pip install 'numba-cuda[cu13]'"
    try:
        if not cuda.is_available():
            return "no CUDA GPU found (numba.cuda.is_available() is False)"
    except Exception as exc:  # noqa: BLE001
        return f"no CUDA GPU found ({exc})"
    return None


def make_optimizers(flatopt):
    return {
        "SGD(momentum=0.9)": lambda: flatopt.SGD(lr=1e-3, momentum=0.9),
        "Momentum": lambda: flatopt.Momentum(lr=1e-3),
        "RMSprop": lambda: flatopt.RMSprop(lr=1e-3),
        "RMSprop(centered, momentum)": lambda: flatopt.RMSprop(lr=1e-3, centered=True, momentum=0.9),
        "Adam": lambda: flatopt.Adam(lr=1e-3),
        "AdamW": lambda: flatopt.AdamW(lr=1e-3),
        "Adam(amsgrad)": lambda: flatopt.Adam(lr=1e-3, amsgrad=True),
        "ADOPT": lambda: flatopt.ADOPT(lr=1e-3),
    }


class Timer:
    """Median GPU time of ``fn`` on the legacy default stream, shared by Numba (stream 0),
    CuPy's null stream and torch's default stream."""

    def __init__(self, cuda, simulated=False):
        self.cuda, self.simulated = cuda, simulated
        if not simulated:
            @cuda.jit
            def spin(rounds):
                for _ in range(rounds):
                    cuda.nanosleep(1_000_000)
            self.spin = spin

    def gpu_ms(self, fn, steps, warmup):
        cuda = self.cuda
        for _ in range(warmup):
            fn()
        cuda.synchronize()
        events = [cuda.event() if self.simulated else cuda.event(timing=True) for _ in range(steps + 1)]
        if not self.simulated:
            self.spin[1, 1](max(5, steps))  # ~1 ms per round: the queue fills while it spins
        events[0].record()
        for k in range(steps):
            fn()
            events[k + 1].record()
        cuda.synchronize()
        if self.simulated:
            return float("nan")
        return statistics.median(events[k].elapsed_time(events[k + 1]) for k in range(steps))

    def host_us(self, fn, repeats=20):
        self.cuda.synchronize()
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e6)
            self.cuda.synchronize()
        return statistics.median(samples)


def model_rows(torch, timer, host, tensors, steps, warmup):
    """Adam on a model of ``tensors`` CUDA tensors holding ``len(host)`` elements in all:
    flatopt.torch (one launch over its flat buffer) against torch.optim's multi-tensor paths."""
    import flatopt.torch as ft
    from flatopt.bench import split_sizes

    sizes = split_sizes(len(host), tensors)
    offsets = np.cumsum([0] + sizes)

    def make_model():
        model = [torch.nn.Parameter(torch.from_numpy(host[a:b]).cuda()) for a, b in zip(offsets[:-1], offsets[1:])]
        for p in model:
            p.grad = p.detach() * 1e-3
        return model

    rows = []
    candidates = [(f"flatopt.torch Adam, {tensors} tensors", lambda m: ft.Adam(m, lr=1e-3))]
    for label, kw in (("foreach=True", dict(foreach=True)), ("fused=True", dict(fused=True))):
        candidates.append((f"torch Adam {label}, {tensors} tensors",
                           lambda m, kw=kw: torch.optim.Adam(m, lr=1e-3, **kw)))
    for name, make in candidates:
        model = make_model()
        opt = make(model)
        opt.step()  # flatopt.torch adopts the gradients: from now on each p.grad is a flat view
        rows.append((name, 7, timer.gpu_ms(opt.step, steps, warmup), timer.host_us(opt.step)))
        del opt, model
    return rows


def run(sizes, dtype, steps, warmup, simulated=False, model_tensors=200):
    from numba import cuda

    import flatopt
    from flatopt.kernels.cuda_backend import CUDA

    try:
        import cupy as xp
        xp.zeros(1)
    except Exception:  # noqa: BLE001 - no CuPy: Numba device arrays
        xp = None
    try:
        import torch
        torch_cuda = torch.cuda.is_available() and not simulated
    except Exception:  # noqa: BLE001
        torch, torch_cuda = None, False

    def device_array(host):
        return xp.asarray(host) if xp is not None else cuda.to_device(host)

    timer = Timer(cuda, simulated)
    itemsize = np.dtype(dtype).itemsize
    if simulated:
        print("simulated run: code paths only, times are meaningless")
    else:
        dev = cuda.get_current_device()
        print(f"{dev.name.decode() if isinstance(dev.name, bytes) else dev.name}, "
              f"{dev.MULTIPROCESSOR_COUNT} SMs; buffers: {'CuPy' if xp is not None else 'Numba device arrays'}, "
              f"{np.dtype(dtype).name}; median of {steps} steps after {warmup}")
    header = f"{'n':>11s}  {'what':30s} {'GPU µs/step':>12s} {'GB/s':>9s} {'vs copy':>8s} {'host µs/step':>13s}"
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    for n in sizes:
        host = rng.standard_normal(n).astype(dtype)
        p, g = device_array(host), device_array(host * 1e-3)
        rows = []
        src, dst = device_array(host), device_array(np.empty_like(host))
        if xp is not None:
            copy = lambda: dst.__setitem__(Ellipsis, src)  # noqa: E731
        else:
            copy = lambda: dst.copy_to_device(src)  # noqa: E731
        ms = timer.gpu_ms(copy, steps, warmup)
        copy_gbs = 2 * n * itemsize / (ms * 1e-3) / 1e9
        rows.append(("device-to-device copy", 2, ms, timer.host_us(copy)))
        for name, make in make_optimizers(flatopt).items():
            opt = make()
            step = lambda: opt.step(p, g)  # noqa: E731
            ms = timer.gpu_ms(step, steps, warmup)
            rows.append((name, TRAFFIC[name], ms, timer.host_us(step)))
            del opt
        slow = device_array(host)
        plan = CUDA.plan([(0, n, 0)])
        table = CUDA.table([(0.5, 0.5)], np.dtype(dtype))
        sync = lambda: CUDA.launch("lookahead", p, slow, (), plan, table)  # noqa: E731
        rows.append(("Lookahead sync", TRAFFIC["Lookahead sync"], timer.gpu_ms(sync, steps, warmup),
                     timer.host_us(sync)))
        if torch_cuda:
            tp = torch.from_numpy(host).cuda()
            tp.grad = torch.from_numpy(host * 1e-3).cuda()
            for name, cls in (("torch Adam fused=True", torch.optim.Adam),
                              ("torch AdamW fused=True", torch.optim.AdamW)):
                topt = cls([tp], lr=1e-3, fused=True)
                ms = timer.gpu_ms(topt.step, steps, warmup)
                rows.append((name, 7, ms, timer.host_us(topt.step)))
                del topt
            del tp
        if torch_cuda and model_tensors:
            rows += model_rows(torch, timer, host, model_tensors, steps, warmup)
        for name, traffic, ms, host_us in rows:
            gbs = traffic * n * itemsize / (ms * 1e-3) / 1e9
            print(f"{n:>11,d}  {name:30s} {ms * 1e3:12.1f} {gbs:9.1f} {gbs / copy_gbs:8.2f} {host_us:13.1f}")
        del p, g, src, dst, slow
        if xp is not None:
            xp.get_default_memory_pool().free_all_blocks()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="comma-separated element counts")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model-tensors", type=int, default=200,
                        help="also time Adam on a model of this many torch CUDA tensors (0: skip)")
    parser.add_argument("--blocks-per-sm", type=int, default=None,
                        help="most blocks per SM, to try instead of the backend's default")
    parser.add_argument("--min-blocks-per-sm", type=int, default=None,
                        help="fewest blocks per SM (set it equal to --blocks-per-sm for a fixed grid)")
    parser.add_argument("--chunk", type=int, default=None, help="elements per block to aim for between the two")
    parser.add_argument("--block", type=int, default=None,
                        help="threads per block to try instead of the default (at most 256)")
    parser.add_argument("--check", action="store_true",
                        help="run every code path on tiny sizes, also under NUMBA_ENABLE_CUDASIM=1 (no timings)")
    args = parser.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    simulated = False
    problem = gpu_problem()
    if problem is not None:
        if not (args.check and os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0")):
            print(f"gpu_bandwidth: nothing to measure: {problem}.")
            return 0
        simulated = True
    if args.check:
        sizes, args.steps, args.warmup = [1000], 2, 1
    from flatopt.kernels.cuda_backend import CUDA
    CUDA.blocks_per_sm = args.blocks_per_sm or CUDA.blocks_per_sm
    CUDA.min_blocks_per_sm = args.min_blocks_per_sm or CUDA.min_blocks_per_sm
    CUDA.chunk = args.chunk or CUDA.chunk
    CUDA.block = args.block or CUDA.block
    print(f"launch geometry: {CUDA.block} threads per block, {CUDA.min_blocks_per_sm} to {CUDA.blocks_per_sm} "
          f"blocks per SM, about {CUDA.chunk} elements per block")
    run(sizes, np.dtype(args.dtype).type, args.steps, args.warmup, simulated, args.model_tensors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
