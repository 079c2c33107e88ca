"""asv benchmarks: one optimizer step on a flat buffer, per optimizer, option, dtype and size.

Every timed benchmark runs a few steps in ``setup`` and asv's ``warmup_time`` steps right
before timing (an idle thread pool costs milliseconds on its next call on these VMs), on
fresh random data.
"""
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import flatopt

SIZES = [10**3, 10**5, 10**6, 10**7]
DTYPES = ["float32", "float64"]
OPTIMIZERS = {
    "SGD": lambda: flatopt.SGD(lr=1e-3),
    "SGD momentum": lambda: flatopt.SGD(lr=1e-3, momentum=0.9),
    "SGD nesterov": lambda: flatopt.SGD(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "Momentum": lambda: flatopt.Momentum(lr=1e-3),
    "RMSprop": lambda: flatopt.RMSprop(),
    "RMSprop centered momentum": lambda: flatopt.RMSprop(centered=True, momentum=0.9),
    "Adam": lambda: flatopt.Adam(),
    "Adam amsgrad": lambda: flatopt.Adam(amsgrad=True),
    "AdamW": lambda: flatopt.AdamW(),
    "ADOPT": lambda: flatopt.ADOPT(),
    "ADOPT decouple": lambda: flatopt.ADOPT(weight_decay=1e-2, decouple=True),
    "Lookahead(Adam)": lambda: flatopt.Lookahead(flatopt.Adam(), k=5),
}


class Timed:
    """asv's settings for the timed benchmarks below: a short warm-up right before timing,
    5 to 20 samples in at most 10 s."""
    warmup_time = 0.05
    repeat = (5, 20, 10.0)
    timeout = 300


class Step(Timed):
    """Time and peak memory of one ``opt.step(params, grads)``."""

    params = (list(OPTIMIZERS), DTYPES, SIZES)
    param_names = ["optimizer", "dtype", "n"]

    def setup(self, name, dtype, n):
        rng = np.random.default_rng(0)
        self.params_ = rng.standard_normal(n).astype(dtype)
        self.grads = (1e-3 * rng.standard_normal(n)).astype(dtype)
        self.opt = OPTIMIZERS[name]()
        for _ in range(6):  # past Lookahead's k = 5: its sync kernel is compiled (or loaded) here too
            self.opt.step(self.params_, self.grads)
        # Lookahead's timed step is a sync step (the inner step and the pull; per step on average,
        # Adam's time and a k-th of the difference): asv runs setup before every timed call, so the
        # timed step would otherwise always be the 7th, which does not sync.
        while isinstance(self.opt, flatopt.Lookahead) and not self.opt.syncs(self.opt.step_count + 1):
            self.opt.step(self.params_, self.grads)

    def time_step(self, name, dtype, n):
        self.opt.step(self.params_, self.grads)

    def peakmem_step(self, name, dtype, n):
        self.opt.step(self.params_, self.grads)


class LrChanges(Timed):
    """One step where the lr changes before every step (a schedule given as ``lr``, or a number
    assigned), or the buffer has param groups (AdamW's decay and no-decay halves): the step that
    reuses what an earlier step checked serves these as it serves a constant lr and one group."""

    params = (["schedule", "assigned", "two groups", "two groups, schedule"], ["Adam", "AdamW", "SGD momentum"],
              [10**3, 10**5])
    param_names = ["lr", "optimizer", "n"]

    def setup(self, lr, name, n):
        rng = np.random.default_rng(0)
        self.params_ = rng.standard_normal(n).astype(np.float32)
        self.grads = (1e-3 * rng.standard_normal(n)).astype(np.float32)
        cls, kwargs = {"Adam": (flatopt.Adam, {}), "AdamW": (flatopt.AdamW, {}),
                       "SGD momentum": (flatopt.SGD, dict(momentum=0.9))}[name]
        groups = [dict(start=0, stop=n // 2), dict(start=n // 2, stop=n, weight_decay=0.0)] if "groups" in lr else None
        schedule = (lambda t: 1e-3 / (1 + 1e-3 * t)) if "schedule" in lr else 1e-3
        self.opt = cls(lr=schedule, param_groups=groups, **kwargs)
        self.lrs = itertools.cycle(np.geomspace(1e-3, 1e-6, 1000).tolist()) if lr == "assigned" else None
        for _ in range(5):
            self.time_step(lr, name, n)

    def time_step(self, lr, name, n):
        if self.lrs is not None:
            self.opt.lr = next(self.lrs)
        self.opt.step(self.params_, self.grads)


class CudaStep(Timed):
    """One step on a GPU, waited for: flatopt on CuPy buffers and torch's fused Adam on one CUDA
    tensor (skipped without CuPy, or torch with CUDA, and a GPU).  At 10^6 elements the host's
    part (Python, the launch, the table upload) sets the time, at 10^7 and 10^8 the memory."""

    params = (["Adam", "AdamW", "SGD momentum", "RMSprop", "ADOPT", "Lookahead(Adam)", "torch Adam fused"],
              ["float32", "float64"], [10**6, 10**7, 10**8])
    param_names = ["optimizer", "dtype", "n"]

    def setup(self, name, dtype, n):
        try:  # (before the data is made: up to 1.6 GB for a benchmark skipped without a GPU)
            if name.startswith("torch"):
                import torch
                if not torch.cuda.is_available():
                    raise RuntimeError("torch has no CUDA")
            else:
                import cupy
                cupy.cuda.runtime.getDeviceCount()
        except Exception as error:  # noqa: BLE001 - no GPU, no CuPy, no CUDA build of torch
            raise NotImplementedError(f"no GPU for {name}: {error}")
        rng = np.random.default_rng(0)
        params, grads = rng.standard_normal(n).astype(dtype), (1e-3 * rng.standard_normal(n)).astype(dtype)
        if name.startswith("torch"):
            weights = torch.nn.Parameter(torch.from_numpy(params).cuda())
            weights.grad = torch.from_numpy(grads).cuda()
            step = torch.optim.Adam([weights], lr=1e-3, fused=True).step
            self.sync = torch.cuda.synchronize
        else:
            opt, params, grads = OPTIMIZERS[name](), cupy.asarray(params), cupy.asarray(grads)
            step = lambda: opt.step(params, grads)
            self.sync = cupy.cuda.get_current_stream().synchronize
        self.step = step
        for _ in range(6):  # past Lookahead's k = 5, and the replayed launch is recorded
            step()
        self.sync()

    def time_step(self, name, dtype, n):
        self.step()
        self.sync()


def torch_modules():
    """torch and flatopt.torch (the benchmark is skipped where torch is missing)."""
    try:
        import torch
        import flatopt.torch as flat_torch
    except ImportError:
        raise NotImplementedError("torch or flatopt.torch not available")
    return torch, flat_torch


def torch_model(n):
    """torch, flatopt.torch, a seeded generator and a model of 200 tensors holding ``n``
    parameters in all."""
    torch, flat_torch = torch_modules()
    sizes = [n // 200 + (i < n % 200) for i in range(200)]
    gen = torch.Generator().manual_seed(0)
    return torch, flat_torch, gen, [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in sizes]


class TorchAdapter(Timed):
    """flatopt.torch.Adam on a 200-tensor model, against torch's fused Adam on the same model."""

    params = ([10**5, 10**6, 10**7], ["flatopt.torch", "torch fused"])
    param_names = ["n", "implementation"]

    def setup(self, n, implementation):
        torch, flat_torch, gen, self.model = torch_model(n)
        if implementation == "torch fused":
            self.opt = torch.optim.Adam(self.model, lr=1e-3, fused=True)
        else:
            self.opt = flat_torch.Adam(self.model, lr=1e-3)
        self.grads = [1e-3 * torch.randn(p.shape, generator=gen) for p in self.model]
        for p, g in zip(self.model, self.grads):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(g)
        for _ in range(3):
            self.opt.step()

    def time_step(self, n, implementation):
        """The gradients stay where they are between steps (``zero_grad(set_to_none=False)``)."""
        self.opt.step()

    def track_step_after_zero_grad(self, n, implementation):
        """torch's default loop: ``zero_grad()``, then fresh gradient tensors (as backward makes
        them), then the step, which alone is timed; median of 15, each right after a warm-up step."""
        times = []
        for _ in range(15):
            for timed in (False, True):
                self.opt.zero_grad()
                for p, g in zip(self.model, self.grads):
                    p.grad = g.clone()
                start = time.perf_counter()
                self.opt.step()
                if timed:
                    times.append(time.perf_counter() - start)
        return float(np.median(times))

    track_step_after_zero_grad.unit = "seconds"


class TorchTraining(Timed):
    """The step inside a training loop: an MLP of 100 ``Linear`` layers (200 tensors; width 31
    for about 10^5 parameters, 100 for 10^6), each step right after ``zero_grad``, a forward
    and a backward pass on a batch of 64, which leave the caches to the model's activations
    and to torch's code.  ``keep``: ``zero_grad(set_to_none=False)``, the gradients stay in
    place; ``none``: torch's default, autograd makes fresh gradient tensors.  The layers are
    residual (``h + 0.1 tanh(W h + b)``): in a plain 100-layer tanh MLP the gradients vanish,
    and its Adam state turned denormal within 15 steps, which doubled every step's time."""

    params = ([10**5, 10**6], ["keep", "none"], ["flatopt.torch", "torch fused"])
    param_names = ["n", "zero_grad", "implementation"]
    WIDTHS = {10**5: 31, 10**6: 100}

    def setup(self, n, zero_grad, implementation):
        torch, flat_torch = torch_modules()
        width = self.WIDTHS[n]
        torch.manual_seed(0)
        self.torch, self.layers = torch, [torch.nn.Linear(width, width) for _ in range(100)]
        self.x = torch.randn(64, width)
        params = [p for layer in self.layers for p in layer.parameters()]
        if implementation == "torch fused":
            self.opt = torch.optim.Adam(params, lr=1e-4, fused=True)
        else:
            self.opt = flat_torch.Adam(params, lr=1e-4)
        self.set_to_none = zero_grad == "none"
        for _ in range(3):
            self._iteration()

    def _forward(self):
        h = self.x
        for layer in self.layers:
            h = h + 0.1 * self.torch.tanh(layer(h))
        return h

    def _iteration(self):
        self.opt.zero_grad(set_to_none=self.set_to_none)
        self._forward().square().mean().backward()
        start = time.perf_counter()
        self.opt.step()
        return time.perf_counter() - start

    def track_step(self, n, zero_grad, implementation):
        """Median of 15 steps, each timed alone within its iteration."""
        return float(np.median([self._iteration() for _ in range(15)]))

    track_step.unit = "seconds"


class ScheduledTorchAdapter(Timed):
    """A training loop's ``opt.step(); scheduler.step()`` with AdamW on a 200-tensor model in two
    param groups (decay and no-decay) and a LambdaLR that sets a new lr in both before every
    step: flatopt.torch.AdamW against torch's fused AdamW (each with its scheduler's step)."""

    params = ([10**5, 10**6], ["flatopt.torch", "torch fused"])
    param_names = ["n", "implementation"]

    def setup(self, n, implementation):
        torch, flat_torch, gen, model = torch_model(n)
        groups = [{"params": model[0::2]}, {"params": model[1::2], "weight_decay": 0.0}]
        if implementation == "torch fused":
            self.opt = torch.optim.AdamW(groups, lr=1e-3, fused=True)
        else:
            self.opt = flat_torch.AdamW(groups, lr=1e-3)
        for p in model:
            p.grad = 1e-3 * torch.randn(p.shape, generator=gen)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda t: 1 / (1 + 1e-3 * t))
        for _ in range(3):
            self.time_step(n, implementation)

    def time_step(self, n, implementation):
        self.opt.step()
        self.schedule.step()


class JaxAdapter(Timed):
    """flatopt.jax on a 200-leaf pytree (TreeOptimizer; as_optax and update_and_apply in a
    jitted step with params and state donated) against optax's own Adam in the same jitted step."""

    params = ([10**5, 10**6, 10**7], ["TreeOptimizer", "as_optax", "update_and_apply", "optax adam"])
    param_names = ["n", "implementation"]

    def setup(self, n, implementation):
        try:
            import jax
            import optax
            import flatopt.jax as flat_jax
        except ImportError:
            raise NotImplementedError("jax, optax or flatopt.jax not available")
        from flatopt.bench import leaf_tree, optax_loop
        rng = np.random.default_rng(0)
        params, grads = (leaf_tree((scale * rng.standard_normal(n)).astype(np.float32), 200) for scale in (1.0, 1e-3))
        if implementation == "TreeOptimizer":
            tree_opt, grads = flat_jax.TreeOptimizer(flatopt.Adam(lr=1e-3), params), jax.device_put(grads)
            self.step = lambda: tree_opt.step(grads)  # returns arrays already computed
        else:
            tx = optax.adam(1e-3) if implementation == "optax adam" else flat_jax.as_optax(flatopt.Adam(lr=1e-3))
            self.step = optax_loop(tx, params, grads, fused=implementation == "update_and_apply")
        for _ in range(3):
            self.step()

    def time_step(self, n, implementation):
        self.step()


FIRST_STEP = """
import time; t0 = time.perf_counter()
import numpy as np, flatopt
from flatopt.backend import CPU
p = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
flatopt.{name}().step(p, 1e-3 * p)
if {all_kernels}:
    CPU.parallel_min = 1  # also the threaded driver: every kernel of this optimizer and dtype
    flatopt.{name}().step(p, 1e-3 * p)
print(time.perf_counter() - t0)
"""


def _fresh_process(name, kernel_cache, bytecode_cache, all_kernels):
    """Seconds a new interpreter takes from its first import to its first finished step.

    ``bytecode_cache`` holds every imported module's bytecode, as an installed package has it
    (pip compiles it at install). Without it, where PYTHONDONTWRITEBYTECODE is set (as in this
    project's development shell), each process compiled flatopt's sources anew: 10 ms.
    """
    env = dict(os.environ, NUMBA_CACHE_DIR=kernel_cache, PYTHONPYCACHEPREFIX=bytecode_cache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    code = FIRST_STEP.format(name=name, all_kernels=all_kernels)
    return float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)


class FreshProcess:
    """Seconds from a new interpreter to the first finished step."""

    params = ["Adam", "SGD", "ADOPT"]
    param_names = ["optimizer"]
    timeout = 300
    unit = "seconds"

    def setup_cache(self):
        # asv runs the benchmarks in other processes after this one has ended, and has no hook
        # after them: one folder in the user's cache, emptied by each run, instead of a new
        # temporary one per run (18 MB each)
        caches = os.path.join(os.path.expanduser("~"), ".cache", "flatopt", "asv-first-step")
        shutil.rmtree(caches, ignore_errors=True)
        kernels, bytecode = os.path.join(caches, "kernels"), os.path.join(caches, "bytecode")
        for name in self.params:
            _fresh_process(name, kernels, bytecode, True)
        return kernels, bytecode

    def track_import_and_first_step_warm_cache(self, caches, name):
        kernels, bytecode = caches
        return _fresh_process(name, kernels, bytecode, False)

    def track_compile_all_kernels_empty_cache(self, caches, name):
        _, bytecode = caches
        with tempfile.TemporaryDirectory(prefix="flatopt-asv-cold-") as empty:
            return _fresh_process(name, empty, bytecode, True)

    track_import_and_first_step_warm_cache.unit = "seconds"
    track_compile_all_kernels_empty_cache.unit = "seconds"
