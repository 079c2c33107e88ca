"""The CUDA backend against the CPU kernels (bitwise) and torch.optim, under Numba's CUDA
simulator (or on a real GPU when one is present; see conftest.py).

Sizes stay small (the simulator runs every CUDA thread as a Python thread): a few hundred
elements, a few steps, the simulator backend's grid of 2 blocks of 32 threads and chunks of
at most 64 elements, so every kernel runs its grid-stride loops over several chunks per
block and several elements per thread.
"""
import gc
import pickle
import threading
import weakref

import numpy as np
import pytest
from numba import cuda

import flatopt
from flatopt.backend import backend_for
from flatopt.kernels import cuda as kernels
from flatopt.kernels.cuda_backend import CUDA, CudaBackend

pytestmark = [pytest.mark.cudasim, pytest.mark.filterwarnings("ignore::RuntimeWarning")]
SIMULATOR = kernels.SIMULATOR
sim_only = pytest.mark.skipif(not SIMULATOR, reason="uses host memory as 'device' memory: simulator only")
DTYPES = [np.float32, np.float64]
N = 300
STEPS = 3


# --- helpers ---------------------------------------------------------------------------------
def data(n=N, dtype=np.float32, steps=STEPS, seed=0, special=False):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(steps)]
    if special:  # NaN / Inf / zeros / subnormals in the gradients and the parameters
        tiny = np.finfo(dtype).smallest_subnormal
        for k, g in enumerate(grads):
            g[k:k + 8] = [np.nan, np.inf, -np.inf, 0.0, -0.0, tiny, -tiny, 1e30]
        p[20:24] = [np.inf, -np.inf, np.nan, tiny]
    return p, grads


def as_bits(a):
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


def assert_same(actual, expected):
    """Bitwise equal, NaN payloads aside (NaNs must sit in the same places)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    bad = np.flatnonzero(as_bits(actual)[~nan] != as_bits(expected)[~nan])
    assert bad.size == 0, (f"{bad.size} elements differ, first at {np.flatnonzero(~nan)[bad[0]]}: "
                           f"{actual[~nan][bad[0]]!r} vs {expected[~nan][bad[0]]!r}")


def step_both(cpu, dev, on_cpu, on_dev, grads):
    """The same steps on NumPy buffers (CPU kernels) and device buffers (CUDA kernels)."""
    for g in grads:
        cpu.step(on_cpu, g)
        dev.step(on_dev, cuda.to_device(g))


def run_cpu_and_cuda(make, p0, grads):
    """Two optimizers from ``make`` taking the same steps, one on the CPU, one on the device."""
    cpu, dev = make(), make()
    pc, pd = p0.copy(), cuda.to_device(p0)
    step_both(cpu, dev, pc, pd, grads)
    return cpu, dev, pc, pd.copy_to_host()


def assert_states_same(cpu, dev):
    inner_c, inner_d = getattr(cpu, "inner", cpu), getattr(dev, "inner", dev)
    sc, sd = inner_c.state_dict(), inner_d.state_dict()
    assert sorted(sc["state"]) == sorted(sd["state"])
    for name in sc["state"]:
        assert type(sd["state"][name]) is np.ndarray
        assert_same(sd["state"][name], sc["state"][name])
    assert sc["group_state"] == sd["group_state"]
    if inner_c is not cpu:
        assert_same(dev.state_dict()["slow"], cpu.state_dict()["slow"])


# Every option of every optimizer, one at a time (and a few together).
CASES = {
    "sgd": lambda: flatopt.SGD(lr=0.1),
    "sgd-momentum": lambda: flatopt.SGD(lr=0.1, momentum=0.9),
    "sgd-dampening": lambda: flatopt.SGD(lr=0.1, momentum=0.9, dampening=0.3),
    "sgd-nesterov": lambda: flatopt.SGD(lr=0.1, momentum=0.9, nesterov=True),
    "sgd-weight-decay": lambda: flatopt.SGD(lr=0.1, weight_decay=0.1),
    "sgd-maximize": lambda: flatopt.SGD(lr=0.1, momentum=0.5, maximize=True),
    "sgd-all": lambda: flatopt.SGD(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True, maximize=True),
    "momentum": lambda: flatopt.Momentum(lr=0.1, beta=0.9, weight_decay=0.01),
    "rmsprop": lambda: flatopt.RMSprop(lr=0.01),
    "rmsprop-alpha": lambda: flatopt.RMSprop(lr=0.01, alpha=0.3),  # 1 - alpha >= 0.5: lerp's other end
    "rmsprop-centered": lambda: flatopt.RMSprop(lr=0.01, centered=True),
    "rmsprop-centered-alpha": lambda: flatopt.RMSprop(lr=0.01, centered=True, alpha=0.3),
    # 1 - alpha <= -0.5: lerp from the gradient's end, as torch's |weight| < 1/2 test picks it
    "rmsprop-centered-alpha-above-1.5": lambda: flatopt.RMSprop(lr=0.01, centered=True, alpha=1.6),
    "rmsprop-momentum": lambda: flatopt.RMSprop(lr=0.01, momentum=0.9),
    "rmsprop-weight-decay": lambda: flatopt.RMSprop(lr=0.01, weight_decay=0.1),
    "rmsprop-maximize": lambda: flatopt.RMSprop(lr=0.01, maximize=True),
    "rmsprop-all": lambda: flatopt.RMSprop(lr=0.01, eps=1e-3, weight_decay=0.1, momentum=0.5, centered=True,
                                           maximize=True),
    "adam": lambda: flatopt.Adam(lr=0.01),
    "adam-betas": lambda: flatopt.Adam(lr=0.01, betas=(0.3, 0.5)),  # 1 - beta1 >= 0.5: lerp's other end
    "adam-amsgrad": lambda: flatopt.Adam(lr=0.01, amsgrad=True),
    "adam-weight-decay": lambda: flatopt.Adam(lr=0.01, weight_decay=0.1),
    "adam-decoupled": lambda: flatopt.Adam(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    "adam-maximize": lambda: flatopt.Adam(lr=0.01, maximize=True),
    "adam-eps": lambda: flatopt.Adam(lr=0.01, eps=0.1),
    "adamw": lambda: flatopt.AdamW(lr=0.01),
    "adamw-all": lambda: flatopt.AdamW(lr=0.01, betas=(0.5, 0.9), weight_decay=0.2, amsgrad=True, maximize=True),
    "adopt": lambda: flatopt.ADOPT(lr=0.01),
    "adopt-betas": lambda: flatopt.ADOPT(lr=0.01, betas=(0.2, 0.5)),
    "adopt-weight-decay": lambda: flatopt.ADOPT(lr=0.01, weight_decay=0.1),
    "adopt-decouple": lambda: flatopt.ADOPT(lr=0.01, weight_decay=0.1, decouple=True),
    "adopt-no-clip": lambda: flatopt.ADOPT(lr=0.01, clip_lambda=None),
    "adopt-maximize": lambda: flatopt.ADOPT(lr=0.01, maximize=True, eps=0.5),
    "lookahead-sgd": lambda: flatopt.Lookahead(flatopt.SGD(lr=0.1, momentum=0.9), k=2, alpha=0.5),
    "lookahead-adam": lambda: flatopt.Lookahead(flatopt.Adam(lr=0.01, amsgrad=True), k=2, alpha=0.3),
}


def groups_of(make, groups):
    def build():
        opt = make()
        (getattr(opt, "inner", opt)).param_groups = groups
        return opt
    return build


# --- the CUDA kernels are the CPU kernels ----------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_cpu_kernels_bitwise(case, dtype):
    p0, grads = data(dtype=dtype, steps=4 if case.startswith("lookahead") else STEPS, seed=len(case))
    cpu, dev, pc, pd = run_cpu_and_cuda(CASES[case], p0, grads)
    assert_same(pd, pc)
    assert_states_same(cpu, dev)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["sgd-all", "rmsprop-all", "adam-amsgrad", "adamw-all", "adopt", "adopt-no-clip",
                                  "lookahead-adam"])
def test_nan_inf_subnormal_propagate_like_cpu(case, dtype):
    p0, grads = data(dtype=dtype, steps=4, special=True)
    cpu, dev, pc, pd = run_cpu_and_cuda(CASES[case], p0, grads)
    assert not np.isfinite(pc).all()  # the special values did reach the parameters
    assert_same(pd, pc)
    assert_states_same(cpu, dev)


TINY_CASES = {  # not 0 as Python floats, 0 in float32: the kernels take the branch torch takes
    "sgd": lambda wd, mom: flatopt.SGD(lr=0.1, momentum=0.9, weight_decay=wd),
    "momentum": lambda wd, mom: flatopt.Momentum(lr=0.1, beta=0.9, weight_decay=wd),
    "rmsprop-centered": lambda wd, mom: flatopt.RMSprop(lr=0.01, centered=True, weight_decay=wd),
    "rmsprop-momentum": lambda wd, mom: flatopt.RMSprop(lr=0.01, momentum=mom),
    "adam-amsgrad": lambda wd, mom: flatopt.Adam(lr=0.01, amsgrad=True, weight_decay=wd),
    "adopt": lambda wd, mom: flatopt.ADOPT(lr=0.01, weight_decay=wd),
    "adopt-decouple": lambda wd, mom: flatopt.ADOPT(lr=0.01, weight_decay=wd, decouple=True),
}


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_a_hyperparameter_that_rounds_to_zero_takes_the_cpu_kernels_branch(case):
    p0, grads = data(dtype=np.float32, steps=4, special=True)
    make = TINY_CASES[case]
    cpu, dev, pc, pd = run_cpu_and_cuda(lambda: make(1e-300, 1e-300), p0, grads)
    assert_same(pd, pc)
    assert_states_same(cpu, dev)
    _, _, zero, _ = run_cpu_and_cuda(lambda: make(0.0, 0.0), p0, grads)
    assert not np.array_equal(as_bits(pc), as_bits(zero))  # the branch shows


GROUPS = [
    {"start": 0, "stop": 70, "lr": 0.05},
    {"start": 70, "stop": 100, "frozen": True},
    {"start": 130, "stop": 250, "weight_decay": 0.3},  # 100..130 belong to no group: never touched
    {"start": 250, "stop": 300, "lr": 0.001, "maximize": True},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["sgd-momentum", "rmsprop-centered", "adam-amsgrad", "adamw", "adopt-decouple",
                                  "lookahead-sgd"])
def test_groups_frozen_and_untouched_segments(case, dtype):
    p0, grads = data(dtype=dtype, steps=4)
    cpu, dev, pc, pd = run_cpu_and_cuda(groups_of(CASES[case], GROUPS), p0, grads)
    assert_same(pd, pc)
    assert_states_same(cpu, dev)
    inner = getattr(dev, "inner", dev)
    if not case.startswith("lookahead"):  # Lookahead's sync moves every element to the slow weights
        np.testing.assert_array_equal(pd[70:130], p0[70:130])
    for name, buf in inner.state_dict()["state"].items():
        assert not buf[70:130].any(), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_group_hyperparameters_of_every_kind(dtype):
    groups = [{"start": 0, "stop": 100, "betas": (0.2, 0.5), "amsgrad": True},
              {"start": 100, "stop": 200, "eps": 1e-2, "decoupled_weight_decay": True, "weight_decay": 0.5},
              {"start": 200, "stop": 300, "lr": lambda t: 0.1 / (t + 1)}]
    p0, grads = data(dtype=dtype)
    cpu, dev, pc, pd = run_cpu_and_cuda(lambda: flatopt.Adam(lr=0.01, param_groups=groups), p0, grads)
    assert_same(pd, pc)
    assert_states_same(cpu, dev)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hyperparameters_change_between_steps(dtype):
    p0, grads = data(dtype=dtype, steps=4)
    cpu, dev = flatopt.AdamW(lr=0.01), flatopt.AdamW(lr=0.01)
    pc, pd = p0.copy(), cuda.to_device(p0)
    for k, g in enumerate(grads):
        for opt in (cpu, dev):
            opt.lr, opt.weight_decay, opt.betas = 0.01 * (k + 1), 0.1 * k, (0.9 - 0.1 * k, 0.999)
        step_both(cpu, dev, pc, pd, [g])
    assert_same(pd.copy_to_host(), pc)


def test_one_launch_per_step_whatever_the_groups(monkeypatch):
    launches = []
    real = kernels.get_kernel

    class Counting:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, config):
            launch = self.fn[config]

            def counted(*args):
                launches.append(config)
                return launch(*args)
            return counted

    monkeypatch.setattr(kernels, "get_kernel", lambda name, dtype: Counting(real(name, dtype)))
    groups = [{"start": 10 * i, "stop": 10 * i + 7, "lr": 0.01 * (i + 1)} for i in range(25)]
    opt = flatopt.Adam(param_groups=groups)
    p, g = cuda.to_device(np.ones(250, np.float32)), cuda.to_device(np.ones(250, np.float32))
    for _ in range(3):
        opt.step(p, g)
    assert len(launches) == 3


# --- torch.optim, option by option --------------------------------------------------------------
TORCH = {
    # case: (torch optimizer, its kwargs, rtol float32, rtol float64); rtol 0 = bitwise
    "sgd": ("SGD", dict(lr=0.1), 0, 0),
    "sgd-momentum": ("SGD", dict(lr=0.1, momentum=0.9), 0, 0),
    "sgd-dampening": ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3), 0, 0),
    "sgd-nesterov": ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True), 0, 0),
    "sgd-weight-decay": ("SGD", dict(lr=0.1, weight_decay=0.1), 0, 0),
    "sgd-maximize": ("SGD", dict(lr=0.1, momentum=0.5, maximize=True), 0, 0),
    "sgd-all": ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True, maximize=True), 0, 0),
    "rmsprop": ("RMSprop", dict(lr=0.01), 1e-5, 1e-12),
    "rmsprop-alpha": ("RMSprop", dict(lr=0.01, alpha=0.3), 1e-5, 1e-12),
    "rmsprop-centered": ("RMSprop", dict(lr=0.01, centered=True), 1e-5, 1e-12),
    "rmsprop-centered-alpha": ("RMSprop", dict(lr=0.01, centered=True, alpha=0.3), 1e-5, 1e-12),
    "rmsprop-momentum": ("RMSprop", dict(lr=0.01, momentum=0.9), 1e-5, 1e-12),
    "rmsprop-weight-decay": ("RMSprop", dict(lr=0.01, weight_decay=0.1), 1e-5, 1e-12),
    "rmsprop-maximize": ("RMSprop", dict(lr=0.01, maximize=True), 1e-5, 1e-12),
    "rmsprop-all": ("RMSprop", dict(lr=0.01, eps=1e-3, weight_decay=0.1, momentum=0.5, centered=True,
                                    maximize=True), 1e-5, 1e-12),
    "adam": ("Adam", dict(lr=0.01), 0, 0),
    "adam-betas": ("Adam", dict(lr=0.01, betas=(0.3, 0.5)), 0, 0),
    "adam-amsgrad": ("Adam", dict(lr=0.01, amsgrad=True), 0, 0),
    "adam-weight-decay": ("Adam", dict(lr=0.01, weight_decay=0.1), 0, 0),
    "adam-decoupled": ("Adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), 0, 0),
    "adam-maximize": ("Adam", dict(lr=0.01, maximize=True), 0, 0),
    "adam-eps": ("Adam", dict(lr=0.01, eps=0.1), 0, 0),
    "adamw": ("AdamW", dict(lr=0.01), 0, 0),
    "adamw-all": ("AdamW", dict(lr=0.01, betas=(0.5, 0.9), weight_decay=0.2, amsgrad=True, maximize=True), 0, 0),
}


def torch_run(name, kwargs, p0, grads, groups=None, lookahead=None):
    """torch.optim on the same data: one tensor per group; frozen groups get no gradient."""
    torch = pytest.importorskip("torch")
    p = p0.copy()
    segments = [(g["start"], g["stop"], {k: v for k, v in g.items() if k not in ("start", "stop", "frozen")},
                 g.get("frozen", False)) for g in (groups or [{"start": 0, "stop": len(p0)}])]
    tensors = [torch.from_numpy(p[a:b]) for a, b, _, _ in segments]  # views of p
    param_groups = [dict(params=[t], **extra) for t, (_, _, extra, _) in zip(tensors, segments)]
    variant = dict(fused=True) if name in ("Adam", "AdamW") else dict(foreach=False)
    opt = getattr(torch.optim, name)(param_groups, **kwargs, **variant)
    slow = [t.clone() for t in tensors]
    for k, g in enumerate(grads, 1):
        for t, (a, b, _, frozen) in zip(tensors, segments):
            t.grad = None if frozen else torch.from_numpy(g[a:b].copy())
        opt.step()
        if lookahead and k % lookahead[0] == 0:
            with torch.no_grad():
                for t, q in zip(tensors, slow):
                    t.mul_(lookahead[1]).add_(q, alpha=1 - lookahead[1])
                    q.copy_(t)
    return p


# torch's fused CPU Adam rounds its scalar tail (the last size % 16 elements of a tensor)
# differently from its vectorised body, so the tensors compared with it are multiples of 16
# long: N_TORCH elements, and group boundaries on multiples of 16.
N_TORCH = 320
TORCH_GROUPS = [
    {"start": 0, "stop": 64, "lr": 0.05},
    {"start": 64, "stop": 96, "frozen": True},
    {"start": 128, "stop": 256, "weight_decay": 0.3},  # 96..128 belong to no group
    {"start": 256, "stop": 320, "lr": 0.001, "maximize": True},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(TORCH))
def test_matches_torch_optim(case, dtype):
    name, kwargs, rtol32, rtol64 = TORCH[case]
    p0, grads = data(N_TORCH, dtype=dtype, seed=len(case))
    _, _, _, pd = run_cpu_and_cuda(CASES[case], p0, grads)
    expected = torch_run(name, kwargs, p0, grads)
    rtol = rtol32 if dtype == np.float32 else rtol64
    if rtol == 0:
        assert_same(pd, expected)
    else:
        np.testing.assert_allclose(pd, expected, rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["sgd-nesterov", "adam-amsgrad", "adamw", "rmsprop-centered"])
def test_groups_match_torch_param_groups(case, dtype):
    name, kwargs, rtol32, rtol64 = TORCH[case]
    p0, grads = data(N_TORCH, dtype=dtype, steps=4)
    _, _, _, pd = run_cpu_and_cuda(groups_of(CASES[case], TORCH_GROUPS), p0, grads)
    expected = torch_run(name, kwargs, p0, grads, groups=TORCH_GROUPS)
    rtol = rtol32 if dtype == np.float32 else rtol64
    if rtol == 0:
        assert_same(pd, expected)
    else:
        np.testing.assert_allclose(pd, expected, rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["lookahead-sgd", "lookahead-adam"])
def test_lookahead_matches_torch_reference(case, dtype):
    name, kwargs = ("SGD", dict(lr=0.1, momentum=0.9)) if case == "lookahead-sgd" else (
        "Adam", dict(lr=0.01, amsgrad=True))
    k, alpha = (2, 0.5) if case == "lookahead-sgd" else (2, 0.3)
    p0, grads = data(N_TORCH, dtype=dtype, steps=5)
    _, _, _, pd = run_cpu_and_cuda(CASES[case], p0, grads)
    assert_same(pd, torch_run(name, kwargs, p0, grads, lookahead=(k, alpha)))


def adopt_reference(p0, grads, lr, betas, eps, weight_decay=0.0, decouple=False, maximize=False, clip=True):
    """The authors' ADOPT rule in float64 NumPy (see reference-notes)."""
    p = p0.astype(np.float64)
    m, v = np.zeros_like(p), None
    for t, g in enumerate(grads):
        g = -g.astype(np.float64) if maximize else g.astype(np.float64)
        if weight_decay and not decouple:
            g = g + weight_decay * p
        if v is None:
            v = g * g
            continue
        if weight_decay and decouple:
            p = p - lr * weight_decay * p
        n = g / np.maximum(np.sqrt(v), eps)
        if clip:
            n = np.clip(n, -t**0.25, t**0.25)
        m = m + (1 - betas[0]) * (n - m)
        p = p - lr * m
        v = betas[1] * v + (1 - betas[1]) * g * g
    return p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decouple": True},
                                     {"maximize": True}, {"clip": False}])
def test_adopt_matches_reference_rule(options, dtype):
    p0, grads = data(dtype=dtype, steps=5)
    kw = dict(options)
    clip = kw.pop("clip", True)
    make = lambda: flatopt.ADOPT(lr=0.01, betas=(0.9, 0.99), eps=1e-6, clip_lambda=None if not clip else  # noqa: E731
                                 flatopt.optimizers.adopt.default_clip, **kw)
    _, _, _, pd = run_cpu_and_cuda(make, p0, grads)
    expected = adopt_reference(p0, grads, 0.01, (0.9, 0.99), 1e-6, clip=clip, **kw)
    np.testing.assert_allclose(pd, expected, rtol=2e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-6 if dtype == np.float32 else 1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.1}, {"maximize": True}])
def test_momentum_matches_textbook_rule(options, dtype):
    """torch has no EMA momentum (its buffer starts at the first gradient): NumPy float64."""
    p0, grads = data(dtype=dtype, steps=4)
    _, _, _, pd = run_cpu_and_cuda(lambda: flatopt.Momentum(lr=0.1, beta=0.8, **options), p0, grads)
    p, v = p0.astype(np.float64), np.zeros(len(p0))
    for g in grads:
        g = -g.astype(np.float64) if options.get("maximize") else g.astype(np.float64)
        g = g + options.get("weight_decay", 0.0) * p
        v = 0.8 * v + 0.2 * g
        p = p - 0.1 * v
    np.testing.assert_allclose(pd, p, rtol=1e-5 if dtype == np.float32 else 1e-13,
                               atol=1e-6 if dtype == np.float32 else 1e-15)


# --- checkpoints move between CPU and GPU --------------------------------------------------------
@pytest.mark.parametrize("direction", ["cpu-to-cuda", "cuda-to-cpu"])
@pytest.mark.parametrize("case", ["adam-amsgrad", "sgd-nesterov", "rmsprop-all", "adopt", "lookahead-adam"])
def test_checkpoint_resumes_on_the_other_device(case, direction):
    dtype = np.float32
    p0, grads = data(dtype=dtype, steps=6)
    make = groups_of(CASES[case], GROUPS[:2] + GROUPS[3:])
    reference = make()
    pr = p0.copy()
    for g in grads:
        reference.step(pr, g)

    first, second = make(), make()
    if direction == "cpu-to-cuda":
        p = p0.copy()
        for g in grads[:3]:
            first.step(p, g)
        sd = pickle.loads(pickle.dumps(first.state_dict()))
        second.load_state_dict(sd)
        pd = cuda.to_device(p)
        for g in grads[3:]:
            second.step(pd, cuda.to_device(g))
        p = pd.copy_to_host()
        state = second.state_dict()
    else:
        pd = cuda.to_device(p0)
        for g in grads[:3]:
            first.step(pd, cuda.to_device(g))
        sd = first.state_dict()
        inner_sd = sd["inner"] if "inner" in sd else sd
        assert all(type(v) is np.ndarray for v in inner_sd["state"].values())
        if "slow" in sd:
            assert type(sd["slow"]) is np.ndarray
        sd = pickle.loads(pickle.dumps(sd))
        second.load_state_dict(sd)
        p = pd.copy_to_host()
        for g in grads[3:]:
            second.step(p, g)
        state = second.state_dict()
    assert_same(p, pr)
    ref_state = reference.state_dict()
    inner, ref_inner = state.get("inner", state), ref_state.get("inner", ref_state)
    for name in ref_inner["state"]:
        assert_same(inner["state"][name], ref_inner["state"][name])
    assert inner["group_state"] == ref_inner["group_state"]


def test_state_lives_on_the_device_and_state_dict_is_host():
    opt = flatopt.Adam(amsgrad=True)
    p, g = cuda.to_device(np.ones(50, np.float32)), cuda.to_device(np.ones(50, np.float32))
    opt.step(p, g)
    for name, buf in opt.state.items():
        assert CUDA.owns(buf) and not isinstance(buf, np.ndarray), name
    sd = opt.state_dict()
    assert all(type(v) is np.ndarray and v.dtype == np.float32 for v in sd["state"].values())
    with pytest.raises(TypeError, match="state lives on cuda"):
        opt.step(np.ones(50, np.float32), np.ones(50, np.float32))


# --- the backend interface and its errors --------------------------------------------------------
class FakeCAI:
    """Host memory presented through ``__cuda_array_interface__``: under the simulator a
    'device pointer' is read as host memory, so this stands in for CuPy / torch buffers."""

    def __init__(self, host, version=2, stream=None, readonly=False, mask=None, device_id=0):
        self._host = host
        self.dtype = host.dtype
        self.device_id = device_id
        desc = {"shape": host.shape, "typestr": host.dtype.str, "version": version,
                "data": (host.__array_interface__["data"][0], readonly),
                "strides": None if host.flags.c_contiguous else host.strides}
        if version >= 1:
            desc["mask"] = mask
        if version >= 3:
            desc["stream"] = stream
        self.__cuda_array_interface__ = desc

    def __len__(self):
        return len(self._host)


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


@pytest.mark.parametrize("params, grads, error, match", [
    (lambda: dev(np.ones((4, 5), np.float32)), lambda: dev(np.ones((4, 5), np.float32)), ValueError, "1-D"),
    (lambda: dev(np.ones(20, np.float32))[::2], lambda: dev(np.ones(10, np.float32)), ValueError, "contiguous"),
    (lambda: dev(np.ones(10, np.float32)), lambda: dev(np.ones(20, np.float32))[::2], ValueError, "contiguous"),
    (lambda: dev(np.ones(10, np.float16)), lambda: dev(np.ones(10, np.float16)), TypeError, "float32 and float64"),
    (lambda: dev(np.ones(10, np.int32)), lambda: dev(np.ones(10, np.int32)), TypeError, "float32 and float64"),
    (lambda: dev(np.ones(10, np.float32)), lambda: dev(np.ones(10, np.float64)), TypeError, "does not match"),
    (lambda: dev(np.ones(10, np.float32)), lambda: dev(np.ones(11, np.float32)), ValueError, "11 elements"),
])
def test_check_rejects_bad_buffers(params, grads, error, match):
    p, g = params(), grads()
    opt = flatopt.Adam()
    with pytest.raises(error, match=match):
        opt.step(p, g)
    assert opt.state == {} and opt.group_state[0]["step"] == 0


def test_check_rejects_shared_memory():
    buf = dev(np.ones(40, np.float32))
    with pytest.raises(ValueError, match="share memory"):
        flatopt.SGD().step(buf, buf)
    with pytest.raises(ValueError, match="share memory"):
        flatopt.SGD().step(buf[0:20], buf[10:30])
    flatopt.SGD().step(buf[0:20], buf[20:40])  # adjacent is fine


def test_params_and_grads_on_host_and_gpu_is_a_type_error():
    host, device = np.ones(10, np.float32), dev(np.ones(10, np.float32))
    for p, g in ((device, host), (host, device)):
        with pytest.raises(TypeError, match="same device"):
            flatopt.Adam().step(p, g)
        with pytest.raises(TypeError, match="same device"):
            backend_for(p, g)
    # what is no array at all is named as on the CPU (it said "grads (builtins.NoneType) must live on the same device")
    for p, g, name in ((device, None, "grads"), (device, [1.0] * 10, "grads"), (None, device, "params")):
        with pytest.raises(TypeError, match=f"{name} must be a NumPy array or a CUDA array"):
            flatopt.Adam().step(p, g)


@sim_only
def test_cuda_array_interface_objects():
    """CuPy / torch stand-ins: interface v2 without a stream, v3 with one."""
    p0, grads = data(dtype=np.float32)
    expected = p0.copy()
    ref = flatopt.AdamW(lr=0.01)
    for g in grads:
        ref.step(expected, g)
    for version, stream in ((2, None), (3, None), (3, 1)):
        host = p0.copy()
        p = FakeCAI(host, version=version, stream=stream)
        opt = flatopt.AdamW(lr=0.01)
        for g in grads:
            opt.step(p, FakeCAI(g.copy(), version=version, stream=stream))
        assert_same(host, expected)
        assert backend_for(p, p) is CUDA and CUDA.owns(p)


@sim_only
def test_cuda_array_interface_errors(monkeypatch):
    ro = FakeCAI(np.ones(10, np.float32), readonly=True)
    with pytest.raises(ValueError, match="read-only"):
        flatopt.SGD().step(ro, FakeCAI(np.ones(10, np.float32)))
    strided = FakeCAI(np.ones(20, np.float32)[::2])
    with pytest.raises(ValueError, match="contiguous"):
        flatopt.SGD().step(strided, FakeCAI(np.ones(10, np.float32)))
    masked = FakeCAI(np.ones(10, np.float32), mask=object())
    with pytest.raises(TypeError, match="params is a masked CUDA array"):  # the type a masked NumPy array gets
        flatopt.SGD().step(masked, FakeCAI(np.ones(10, np.float32)))
    with pytest.raises(TypeError, match="grads is a masked CUDA array"):
        flatopt.SGD().step(FakeCAI(np.ones(10, np.float32)), masked)
    # Two GPUs: the simulator has one, so the pointer's device is taken from the stand-in.
    monkeypatch.setattr(CUDA, "_pointer_device", lambda obj, ptr: obj.device_id)
    a, b = FakeCAI(np.ones(10, np.float32), device_id=0), FakeCAI(np.ones(10, np.float32), device_id=1)
    with pytest.raises(ValueError, match="params are on GPU 0 but grads are on GPU 1"):
        flatopt.SGD().step(a, b)
    opt = flatopt.Adam()
    opt.step(a, FakeCAI(np.ones(10, np.float32), device_id=0))
    c, d = FakeCAI(np.ones(10, np.float32), device_id=1), FakeCAI(np.ones(10, np.float32), device_id=1)
    with pytest.raises(ValueError, match="on GPU 0 but params are on GPU 1"):
        opt.step(c, d)


def two_gpus(monkeypatch):
    """Two GPUs, where the simulator has one: a pointer's device is its stand-in's, and zeros
    are made where real GPUs make them (``like``'s GPU, else that of the params last checked)."""
    monkeypatch.setattr(CUDA, "_pointer_device", lambda obj, ptr: obj.device_id)
    zeros = CudaBackend.zeros

    def made(self, n, dtype, like=None):
        device = self._device if like is None else self._described(like).device
        return FakeCAI(CUDA.to_host(zeros(self, n, dtype)), device_id=device or 0)
    monkeypatch.setattr(CudaBackend, "zeros", made)


@sim_only
@pytest.mark.parametrize("needs_more", [
    ("Adam", {}, dict(amsgrad=True)), ("RMSprop", dict(momentum=0.5), dict(centered=True)),
    ("RMSprop", {}, dict(momentum=0.5)),
], ids=["Adam amsgrad", "RMSprop centered", "RMSprop momentum"])
def test_a_step_refused_for_params_on_another_gpu_adds_no_state(needs_more, monkeypatch):
    """The buffers a step first needs were allocated (on the refused params' GPU) before the
    launch refused them: the refused step added state, and a step back on the state's GPU was
    then refused in turn."""
    name, kwargs, switch = needs_more
    two_gpus(monkeypatch)
    on = {gpu: (FakeCAI(np.ones(10, np.float32), device_id=gpu), FakeCAI(np.ones(10, np.float32), device_id=gpu))
          for gpu in (0, 1)}
    opt = getattr(flatopt, name)(lr=0.1, **kwargs)
    opt.step(*on[0])
    for k, v in switch.items():
        setattr(opt, k, v)
    before = sorted(opt.state), [dict(s) for s in opt.group_state]
    with pytest.raises(ValueError, match="on GPU 0 but params are on GPU 1"):
        opt.step(*on[1])
    assert (sorted(opt.state), [dict(s) for s in opt.group_state]) == before
    opt.step(*on[0])  # back beside its state: the new buffer is made there
    assert len(opt.state) == len(before[0]) + 1


def test_a_lookahead_step_refused_for_params_on_another_gpu_keeps_its_slow_weights(monkeypatch):
    """The slow weights were placed beside the refused params (on their GPU) before the inner
    step refused them: the refused step replaced them with a copy there."""
    two_gpus(monkeypatch)
    on = {gpu: (FakeCAI(np.ones(10, np.float32), device_id=gpu),
                FakeCAI(np.full(10, 0.5, np.float32), device_id=gpu)) for gpu in (0, 1)}
    la = flatopt.Lookahead(flatopt.Adam(lr=0.1), k=3)
    la.step(*on[0])
    slow = la.slow
    with pytest.raises(ValueError, match="on GPU 0 but params are on GPU 1"):
        la.step(*on[1])
    assert la.slow is slow and la.step_count == 1


@sim_only
def test_a_step_whose_check_another_threads_step_follows_makes_its_state_on_its_own_gpu(monkeypatch):
    """The GPU where a step's new state goes was one attribute for every thread: another
    thread's step between this one's check and its allocation put the state on that thread's
    GPU; the launch refused it, the state stayed, and every later step was refused."""
    two_gpus(monkeypatch)
    plan, other_done = CUDA.plan, threading.Event()

    def plan_after_the_other(segments):  # between the check and the allocation of the first step
        if threading.current_thread().name == "first":
            assert other_done.wait(60)
        return plan(segments)
    monkeypatch.setattr(CUDA, "plan", plan_after_the_other)
    ones = lambda gpu: FakeCAI(np.ones(8, np.float32), device_id=gpu)  # noqa: E731
    opt, params, errors = flatopt.SGD(lr=0.1, momentum=0.9), ones(1), []

    def first():
        try:
            opt.step(params, ones(1))
        except Exception as error:  # pragma: no cover (the failure this test is for)
            errors.append(error)
    thread = threading.Thread(target=first, name="first")
    thread.start()
    other = threading.Thread(target=lambda: flatopt.SGD(lr=0.1, momentum=0.9).step(ones(0), ones(0)))
    other.start()
    other.join()
    other_done.set()
    thread.join()
    assert not errors
    assert opt.state["momentum_buffer"].device_id == 1
    opt.step(params, ones(1))
    np.testing.assert_allclose(params._host, 1 - 0.1 - 0.1 * 1.9, rtol=1e-6)


@sim_only
def test_lookahead_slow_weights_after_a_step_on_another_gpu(monkeypatch):
    """The fast weights' copy was made on the GPU of the params last checked, by any optimizer:
    after a step on another GPU, ``slow_weights`` refused, naming grads it was never given."""
    two_gpus(monkeypatch)
    ones = lambda gpu: FakeCAI(np.ones(8, np.float32), device_id=gpu)  # noqa: E731
    la, params = flatopt.Lookahead(flatopt.SGD(lr=0.1, momentum=0.9), k=2), ones(1)  # (state: made on a GPU)
    la.step(params, FakeCAI(np.full(8, 2.0, np.float32), device_id=1))
    flatopt.SGD().step(ones(0), ones(0))
    with la.slow_weights(params):
        np.testing.assert_array_equal(params._host, 1.0)  # the slow weights: the first step's copy
    np.testing.assert_allclose(params._host, 0.8, rtol=1e-6)


@pytest.mark.parametrize("groups", [None, [{"start": 0, "stop": 4}, {"start": 4, "stop": 8, "lr": 0.5}]],
                         ids=["one group", "two groups"])
def test_gathered_gradients_are_refused_for_cuda_buffers_before_anything_changes(groups):
    """``_gather`` (flatopt.torch's and TreeOptimizer's, host memory) went into the CUDA launch's
    ``replayable`` argument: the step read the flat grads instead, and the next one failed."""
    from flatopt.backend import Gather
    host = np.full(8, 5.0, np.float32)
    gather = Gather(np.array([0], np.int64), np.array([host.ctypes.data], np.int64))
    for warm in (False, True):  # the full step, and the prepared one
        opt, params = flatopt.SGD(lr=1.0, momentum=0.5, param_groups=groups), dev(np.zeros(8, np.float32))
        grads = dev(np.ones(8, np.float32))
        if warm:
            opt.step(params, grads)
        before, state = params.copy_to_host(), [dict(s) for s in opt.group_state]
        with pytest.raises(TypeError, match="_gather reads gradients from host memory"):
            opt.step(params, grads, gather)
        np.testing.assert_array_equal(params.copy_to_host(), before)
        assert [dict(s) for s in opt.group_state] == state and len(opt.state) == int(warm)


def test_a_masked_state_buffer_or_slow_weights_are_named_in_the_error():
    params, grads = dev(np.ones(8, np.float32)), dev(np.ones(8, np.float32))
    opt = flatopt.Adam()
    opt.step(params, grads)
    opt.state["exp_avg"] = FakeCAI(np.zeros(8, np.float32), mask=object())
    with pytest.raises(TypeError, match="optimizer state 'exp_avg' is a masked CUDA array"):
        opt.step(params, grads)
    la = flatopt.Lookahead(flatopt.Adam(), k=2)
    la.step(params, grads)
    la.slow = FakeCAI(np.zeros(8, np.float32), mask=object())
    with pytest.raises(TypeError, match="slow weights is a masked CUDA array"):
        la.step(params, grads)


@sim_only
def test_lookahead_slow_weights_refuse_read_only_params_before_writing_them():
    """On the CPU NumPy refused the write; a read-only CUDA array was written (the slow weights
    in it inside the block), as no step would write it."""
    p0, grads = data(dtype=np.float32, steps=1)
    la = flatopt.Lookahead(flatopt.SGD(lr=0.1), k=2)
    host = p0.copy()
    la.step(FakeCAI(host), FakeCAI(grads[0].copy()))
    held = host.copy()
    with pytest.raises(ValueError, match="params is read-only"):
        with la.slow_weights(FakeCAI(host, readonly=True)):
            pass
    assert_same(host, held)


def test_backend_interface():
    assert CUDA.name == "cuda"
    z = CUDA.zeros(37, np.float64)
    assert CUDA.owns(z) and not CUDA.owns(np.zeros(3)) and len(z) == 37 and z.dtype == np.float64
    host = CUDA.to_host(z)
    assert type(host) is np.ndarray and host.dtype == np.float64 and not host.any()
    e = CUDA.empty_state(np.float32)
    assert len(e) == 0 and e.dtype == np.float32
    x = CUDA.place(np.arange(37), np.empty(0, np.float32))
    assert x.dtype == np.float32 and CUDA.owns(x)
    np.testing.assert_array_equal(CUDA.to_host(x), np.arange(37, dtype=np.float32))
    y = CUDA.zeros(37, np.float32)
    CUDA.copy(x, y)
    np.testing.assert_array_equal(CUDA.to_host(y), np.arange(37, dtype=np.float32))
    with pytest.raises(ValueError, match="cannot copy"):
        CUDA.copy(x, CUDA.zeros(5, np.float32))
    t = CUDA.table([(1, 2.5, True), (3, 4, False)], np.float32)
    assert t.shape == (2, 3) and t.dtype == np.float32


def test_plan_covers_every_segment_in_aligned_chunks():
    segments = [(0, 1000, 0), (1003, 1010, 1), (2000, 2500, 2)]
    plan = CUDA.plan(segments)
    chunks = plan.chunks
    assert chunks.dtype == np.int64 and chunks.shape[1] == 3
    assert 1 <= plan.grid <= plan.nchunks and plan.block == CUDA.block
    for start, stop, row in segments:
        mine = chunks[chunks[:, 2] == row]
        assert mine[0, 0] == start and mine[-1, 1] == stop
        np.testing.assert_array_equal(mine[1:, 0], mine[:-1, 1])
        assert all(lo % CUDA.align == 0 for lo in mine[1:, 0])
    if SIMULATOR:  # the simulator's configuration runs both grid-stride loops on small buffers
        plan = CUDA.plan([(0, 300, 0)])
        assert plan.nchunks > plan.grid and (plan.chunks[:, 1] - plan.chunks[:, 0]).max() > CUDA.block
    # A GPU-sized configuration: whole waves of equal chunks, at most max_chunk elements each.
    big = CudaBackend(max_grid=1056)
    plan = big.plan([(0, 100_000_000, 0)])
    sizes = plan.chunks[:, 1] - plan.chunks[:, 0]
    assert sizes.max() <= big.max_chunk and plan.grid == 1056 and plan.nchunks % plan.grid == 0
    small = big.plan([(0, 5000, 0)])
    assert small.nchunks == 4 and small.grid == 4  # >= min_chunk elements per chunk


def test_grid_aims_at_chunk_elements_per_block_between_the_bounds(monkeypatch):
    """Small buffers keep 16 blocks per SM (or fewer, at >= min_chunk elements per block), large
    ones get about ``chunk`` elements per block, up to 64 blocks per SM, then whole waves."""
    gpu = CudaBackend()
    monkeypatch.setattr(gpu, "_sms", lambda device: 132)
    for total, grid in ((5000, 16 * 132), (1_000_000, 16 * 132), (10_000_000, 16 * 132),
                        (30_000_000, 30_000_000 // 8192), (100_000_000, 64 * 132), (10**9, 64 * 132)):
        assert gpu._grid(total) == grid, total
        plan = gpu.plan([(0, total, 0)])
        sizes = plan.chunks[:, 1] - plan.chunks[:, 0]
        assert sizes.sum() == total and sizes.max() <= gpu.max_chunk and sizes.min() >= gpu.min_chunk
        assert plan.grid == min(plan.nchunks, grid)
        if total >= grid * gpu.min_chunk:  # a chunk for every block (chunk sizes are rounded to align)
            assert plan.nchunks >= 0.98 * grid
        else:
            assert sizes.min() < 2 * gpu.min_chunk
    fixed = CudaBackend(blocks_per_sm=16)  # min_blocks_per_sm above the most: a fixed grid
    monkeypatch.setattr(fixed, "_sms", lambda device: 132)
    assert fixed.plan([(0, 100_000_000, 0)]).grid == 16 * 132


def test_block_is_bounded_by_the_kernels_launch_bounds():
    with pytest.raises(ValueError, match="block must be 1 to 256 threads"):
        CudaBackend(block=512).plan([(0, 1000, 0)])
    assert CudaBackend(block=128).plan([(0, 1000, 0)]).block == 128


@sim_only
def test_cupy_requests_fail_clearly():
    backend = CudaBackend(array_library="cupy")
    with pytest.raises(ImportError, match="asked for CuPy arrays"):
        backend.zeros(4, np.float32)
    with pytest.raises(ValueError, match="array_library must be"):
        CudaBackend(array_library="jax").zeros(4, np.float32)
    assert not isinstance(CudaBackend(array_library="numba").zeros(4, np.float32), np.ndarray)


def test_lookahead_slow_weights_on_device():
    p0, grads = data(dtype=np.float32, steps=3)
    la = flatopt.Lookahead(flatopt.SGD(lr=0.1), k=2)
    p = cuda.to_device(p0)
    for g in grads:
        la.step(p, cuda.to_device(g))
    fast = p.copy_to_host()
    with la.slow_weights(p):
        slow = p.copy_to_host()
    np.testing.assert_array_equal(p.copy_to_host(), fast)
    assert_same(slow, la.state_dict()["slow"])
    assert not np.array_equal(slow, fast)


def test_lookahead_slow_weights_on_device_swap_only_synced_groups():
    p0, grads = data(dtype=np.float32, steps=3)
    n = len(p0)
    groups = [dict(start=0, stop=n // 4), dict(start=n // 4, stop=n // 2, frozen=True), dict(start=n // 2, stop=n - 5)]
    la = flatopt.Lookahead(flatopt.SGD(lr=0.1, param_groups=groups), k=2)
    p = cuda.to_device(p0)
    for g in grads:
        la.step(p, cuda.to_device(g))
    synced = np.zeros(n, bool)
    synced[:n // 4] = synced[n // 2:n - 5] = True
    fast = p.copy_to_host()
    fast[~synced] += 1  # set by hand: the slow weights' copy of them (from the first step) is stale
    p.copy_to_device(fast)
    slow = la.state_dict()["slow"]
    with la.slow_weights(p):
        assert_same(p.copy_to_host(), np.where(synced, slow, fast))
    assert_same(p.copy_to_host(), fast)


@sim_only
def test_lookahead_slow_weights_assigned_as_a_cuda_array():
    """Slow weights assigned from any CUDA exporter are checked through its interface and used."""
    p0, grads = data(dtype=np.float32, steps=4)
    cpu, dev = flatopt.Lookahead(flatopt.SGD(lr=0.1), k=2), flatopt.Lookahead(flatopt.SGD(lr=0.1), k=2)
    pc, pd = p0.copy(), cuda.to_device(p0)
    step_both(cpu, dev, pc, pd, grads[:1])
    mine = np.full(len(p0), 0.5, np.float32)
    cpu.slow, dev.slow = mine.copy(), FakeCAI(mine.copy())
    step_both(cpu, dev, pc, pd, grads[1:])
    assert_same(pd.copy_to_host(), pc)
    dev.slow = FakeCAI(np.zeros(len(p0) + 1, np.float32))
    with pytest.raises(ValueError, match=f"slow weights have {len(p0) + 1}"):
        dev.step(pd, cuda.to_device(grads[0]))
    assert_same(pd.copy_to_host(), pc)


def test_empty_buffers_and_all_frozen():
    for make in (lambda: flatopt.Adam(), lambda: flatopt.Lookahead(flatopt.SGD(), k=1)):
        e = cuda.to_device(np.zeros(0, np.float32))
        make().step(e, cuda.to_device(np.zeros(0, np.float32)))
    opt = flatopt.SGD(param_groups=[{"start": 0, "stop": 10, "frozen": True}])
    p = cuda.to_device(np.ones(10, np.float32))
    opt.step(p, cuda.to_device(np.ones(10, np.float32)))
    np.testing.assert_array_equal(p.copy_to_host(), 1)


# --- the simulator's FMA is an FMA -------------------------------------------------------------
def test_simulator_fma_is_correctly_rounded():
    """The simulator evaluates ``cu.fma`` in Python; it must round once, like llvm.fma on
    the CPU and fma.rn on the GPU.  Includes sums that land near float32 midpoints, where
    a product rounded first (or a float64 sum rounded twice) gives a different answer."""
    from numba import njit

    from flatopt.kernels.cpu import fma

    @njit
    def llvm_fma(a, b, c, out):
        for i in range(a.shape[0]):
            out[i] = fma(a[i], b[i], c[i])

    rng = np.random.default_rng(1)
    for dtype, sim in ((np.float32, kernels._sim_fma32), (np.float64, kernels._sim_fma64)):
        n = 4000
        a = rng.standard_normal(n).astype(dtype)
        b = rng.standard_normal(n).astype(dtype)
        c = -(a.astype(np.float64) * b).astype(dtype)  # catastrophic cancellation: the exact product matters
        c[: n // 4] = rng.standard_normal(n // 4).astype(dtype)
        eps = np.finfo(dtype).eps
        a[n // 2:3 * n // 4] = 1 + eps * rng.integers(1, 8, n // 4)  # products a hair off a midpoint
        b[n // 2:3 * n // 4] = (eps / 2) * (1 + eps * rng.integers(-4, 4, n // 4))
        c[n // 2:3 * n // 4] = 1
        info = np.finfo(dtype)
        special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, info.max, info.smallest_subnormal], dtype)
        grid = np.array(np.meshgrid(special, special, special)).reshape(3, -1).astype(dtype)
        a, b, c = (np.concatenate([x, y]) for x, y in zip((a, b, c), grid))
        expected = np.empty_like(a)
        llvm_fma(a, b, c, expected)
        with np.errstate(all="ignore"):
            actual = np.array([sim(x, y, z) for x, y, z in zip(a, b, c)], dtype)
            naive = (a * b + c).astype(dtype)
        assert_same(actual, expected)
        assert not np.array_equal(naive, expected)  # the test can tell an FMA from mul + add


def test_launcher_replays_only_while_buffers_device_stream_and_table_stay(monkeypatch):
    """On a GPU the ready path's launcher replays its last launch (``_Replay``) while the params'
    and grads' addresses, shapes, dtypes, device, stream and the table object stay the same, and
    makes the full launch again when any of them changes.  The simulator has no launch to
    replay, so the full launch here is a stand-in that counts, and returns a counting replay."""
    from flatopt.kernels import cuda_backend
    from flatopt.kernels.cuda_backend import _Info
    monkeypatch.setattr(cuda_backend, "SIMULATOR", False)  # read when the launcher is made
    backend = CudaBackend()
    full, replayed, can_replay = [], [], [True]

    def full_launch(kernel, params, grads, states, plan, table, replayable=False):
        backend._checked = None
        full.append(table)
        return (lambda t: replayed.append(t)) if replayable and can_replay[0] else None

    monkeypatch.setattr(backend, "launch", full_launch)
    launch = backend.launcher("adam", None, np.dtype(np.float32), [])
    table, other_table = np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32)

    def step(ptrs=(4096, 8192), n=8, dtype=np.float32, device=0, stream=None, table=table, checked=True):
        params, grads = object(), object()  # what check() saw: only their descriptions count
        infos = [_Info((n,), np.dtype(dtype), True, ptr, 4 * n, True, device, stream, object()) for ptr in ptrs]
        backend._checked = (id(params), id(grads), *infos) if checked else None
        launch(params, grads, table)
        return len(full), len(replayed)

    assert step() == (1, 0)  # recorded
    assert step() == (1, 1)  # other objects over the same memory: the same launch
    assert replayed[-1] is table
    assert step(ptrs=(4096 + 64, 8192)) == (2, 1)  # params moved
    assert step(ptrs=(4096 + 64, 8192)) == (2, 2)
    changes = [dict(ptrs=(4096, 8192 + 64)), dict(n=9), dict(dtype=np.float64), dict(device=1),
               dict(stream=0x7F00), dict(table=other_table)]
    for change in changes:
        step()  # the recorded launch is the default one again; the change differs from it in one thing
        f, r = len(full), len(replayed)
        assert step(**change) == (f + 1, r), change  # the full launch, recorded
        assert step(**change) == (f + 1, r + 1), change  # then replayed
    f, r = len(full), len(replayed)
    assert step(checked=False) == (f + 1, r)  # buffers check() did not describe: the full launch
    can_replay[0] = False  # a numba-cuda the replay does not support: every step is a full launch
    assert [step(ptrs=(1 << 20, 1 << 21)) for _ in range(3)] == [(f + 2, r), (f + 3, r), (f + 4, r)]


def test_device_table_resends_a_table_rewritten_in_place(monkeypatch):
    """The core rewrites a step's table in place (only the step-dependent entries change), so
    the device copy must follow the table's contents, not its identity, and skip unchanged ones."""
    from numba.cuda.cudadrv import driver
    backend = CudaBackend()
    info = backend._contiguous_info(cuda.to_device(np.zeros(4, np.float32)))  # on a GPU this is an upload too
    sent = []
    real = driver.host_to_device
    monkeypatch.setattr(driver, "host_to_device", lambda *a, **k: (sent.append(1), real(*a, **k))[1])
    table = np.arange(12, dtype=np.float32).reshape(1, 12)
    for value, uploads in ((None, 1), (None, 1), (7.5, 2), (7.5, 2), (-1.0, 3)):
        if value is not None:
            table[0, 5] = value
        buf = backend._upload(backend._table_entry(table, info.device, 0), table, 0)
        assert_same(buf.copy_to_host(), table)
        assert len(sent) == uploads


def test_pickled_optimizer_continues_on_the_device():
    p0, grads = data(steps=4)
    opt, params = flatopt.Adam(lr=1e-2), cuda.to_device(p0)
    for g in grads[:2]:
        opt.step(params, cuda.to_device(g))
    clone = pickle.loads(pickle.dumps(opt))  # the state travels as host arrays
    assert all(isinstance(v, np.ndarray) for v in clone.state.values())
    cloned = cuda.to_device(params.copy_to_host())
    for g in grads[2:]:
        opt.step(params, cuda.to_device(g))
        clone.step(cloned, cuda.to_device(g))
    assert_same(cloned.copy_to_host(), params.copy_to_host())
    assert all(CUDA.owns(v) for v in clone.state.values())


def test_state_assigned_between_steps_is_checked_and_copied_to_the_device():
    """A host buffer put into ``opt.state`` mid-run is copied next to the parameters at the next
    step, as on the CPU; one of the wrong length is refused before anything changes."""
    p0, grads = data(steps=4)
    cpu, dev = flatopt.RMSprop(lr=1e-2, momentum=0.9), flatopt.RMSprop(lr=1e-2, momentum=0.9)
    pc, pd = p0.copy(), cuda.to_device(p0)
    step_both(cpu, dev, pc, pd, grads[:2])
    dev.state["momentum_buffer"] = np.zeros(len(p0) - 1, np.float32)
    with pytest.raises(ValueError, match=f"made for {len(p0) - 1}"):
        dev.step(pd, cuda.to_device(grads[2]))
    assert_same(pd.copy_to_host(), pc)
    cpu.state["momentum_buffer"] = np.full(len(p0), 0.25, np.float32)
    dev.state["momentum_buffer"] = np.full(len(p0), 0.25, np.float32)
    step_both(cpu, dev, pc, pd, grads[2:])
    assert_same(pd.copy_to_host(), pc)
    assert all(CUDA.owns(v) for v in dev.state.values())


@sim_only
def test_state_assigned_as_cuda_arrays_is_copied_on_the_device():
    """Assigned CUDA arrays (here through ``__cuda_array_interface__`` only, which has no host
    conversion, like CuPy's) are copied device to device at the next step, and so are the
    buffers left in place; the assigned arrays themselves are not written."""
    p0, grads = data(steps=4)
    cpu, dev = flatopt.Adam(lr=1e-2), flatopt.Adam(lr=1e-2)
    pc, pd = p0.copy(), cuda.to_device(p0)
    step_both(cpu, dev, pc, pd, grads[:2])
    mine = np.full(len(p0), 0.125, np.float32)
    cpu.state["exp_avg"] = mine.copy()
    dev.state["exp_avg"] = FakeCAI(mine)
    step_both(cpu, dev, pc, pd, grads[2:])
    assert_same(pd.copy_to_host(), pc)
    np.testing.assert_array_equal(mine, 0.125)
    assert all(type(v).__name__ == "FakeCUDAArray" for v in dev.state.values())
    assert_same(CUDA.to_host(dev.state["exp_avg_sq"]), cpu.state["exp_avg_sq"])
    with pytest.raises(TypeError, match="does not match the optimizer state's dtype float64"):
        dev.state["exp_avg"] = FakeCAI(np.zeros(len(p0)))
        dev.step(pd, cuda.to_device(grads[0]))


def test_stream_key_is_the_handle_address_without_int_of_the_stream():
    """Numba's default Stream answers ``int(stream)`` with an IntEnum member, which Python deprecates
    as an ``__int__`` result (a warning on every GPU step, found on the H200): the key is the handle's."""
    import enum
    import warnings

    from flatopt.kernels.cuda_backend import _stream_key

    class Flags(enum.IntEnum):
        DEFAULT = 0

    class Handle:
        def __init__(self, address):
            self.address = address

        def __int__(self):
            return self.address

    class Stream:  # the shape of numba.cuda.cudadrv.driver.Stream
        def __init__(self, address):
            self.handle = Handle(address)

        def __int__(self):
            return int(self.handle) or Flags.DEFAULT

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keys = [_stream_key(Stream(a)) for a in (0, 1, 2, 0x7F00)]
    assert keys == [0, 1, 2, 0x7F00] and all(type(k) is int for k in keys)
    opaque = object()
    assert _stream_key(opaque) == id(opaque)


# --- buffers a step must take as they come ----------------------------------------------------
class BareCAI(FakeCAI):
    """An exporter with the interface and nothing else (no len)."""
    __len__ = None


class LikeTorch(FakeCAI):
    """An exporter whose package's name begins as torch's does."""


LikeTorch.__module__ = "torchmetrics.buffers"


@sim_only
@pytest.mark.parametrize("slow", ["strided interface", "read-only interface", "strided Numba array",
                                  "other GPU"])
def test_lookahead_slow_weights_that_cannot_be_written_in_place_are_copied_as_on_the_cpu(slow, monkeypatch):
    """They were checked for size and dtype only: the sync launch then refused them after the
    inner step (a strided one, one on another GPU) or wrote into a read-only one."""
    p0, grads = data(dtype=np.float32, steps=4)
    cpu, gpu = flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2), flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2)
    pc, pd = p0.copy(), cuda.to_device(p0)
    step_both(cpu, gpu, pc, pd, grads[:1])
    mine = np.linspace(-1, 1, 2 * len(p0)).astype(np.float32)
    host, users = mine[::2].copy(), mine.copy()
    if slow == "strided interface":
        gpu.slow = FakeCAI(users[::2])
    elif slow == "read-only interface":
        users = host.copy()
        gpu.slow = FakeCAI(users, readonly=True)
    elif slow == "strided Numba array":
        gpu.slow = cuda.to_device(users)[::2]
    else:
        users = host.copy()
        gpu.slow = FakeCAI(users)
        other = gpu.slow
        real = CudaBackend._pointer_device
        monkeypatch.setattr(CudaBackend, "_pointer_device",
                            lambda self, obj, ptr: 1 if obj is other else real(self, obj, ptr))
    cpu.slow = host.copy()
    step_both(cpu, gpu, pc, pd, grads[1:])
    assert_same(pd.copy_to_host(), pc)
    assert_same(gpu.state_dict()["slow"], cpu.slow)
    if slow != "strided Numba array":
        assert_same(users, mine if slow == "strided interface" else host)  # not written


@sim_only
@pytest.mark.parametrize("exporter", ["without len", "of a package named like torch"])
def test_an_exporter_is_stepped_as_host_arrays_are(exporter):
    """One without ``len``; one whose package's name begins as torch's does (``torchmetrics``),
    which got torch's stream lookup (a KeyError without torch imported, else an AttributeError)."""
    wrap = {"without len": BareCAI, "of a package named like torch": LikeTorch}[exporter]
    p0, grads = data(dtype=np.float32)
    for make in (lambda: flatopt.Adam(lr=0.1), lambda: flatopt.Lookahead(flatopt.SGD(lr=0.1), k=2)):
        cpu, gpu, host = make(), make(), p0.copy()
        on_device = p0.copy()
        for g in grads:
            cpu.step(host, g)
            gpu.step(wrap(on_device), wrap(g.copy()))
        assert_same(on_device, host)


@sim_only
def test_an_exporter_refused_as_strided_is_taken_when_it_presents_its_memory_densely():
    """Its description was remembered without the strides: the dense one then launched None."""
    memory = np.ones(24, np.float32)
    params = FakeCAI(memory[:12])
    params.__cuda_array_interface__ = dict(params.__cuda_array_interface__, strides=(8,))  # (every other)
    opt, grads = flatopt.SGD(lr=0.5), cuda.to_device(np.ones(12, np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        opt.step(params, grads)
    params.__cuda_array_interface__ = dict(params.__cuda_array_interface__, strides=None)
    opt.step(params, grads)
    assert_same(memory[:12], np.full(12, 0.5, np.float32))


def test_a_step_that_launches_nothing_keeps_no_reference_to_the_buffers():
    opt = flatopt.SGD(lr=0.1, param_groups=[dict(start=0, stop=4, frozen=True)])
    params, grads = cuda.to_device(np.ones(8, np.float32)), cuda.to_device(np.ones(8, np.float32))
    opt.step(params, grads)
    refused = flatopt.Adam(lr=0.1)
    refused.state = {"exp_avg": np.zeros(8, np.float64)}
    with pytest.raises(TypeError):
        refused.step(params, grads)
    gone = [weakref.ref(params), weakref.ref(grads)]
    del params, grads
    gc.collect()
    assert all(ref() is None for ref in gone)  # (an array compares with None elementwise)


def test_a_strided_device_array_assigned_as_state_is_copied_in():
    p0, grads = data(dtype=np.float32)
    cpu, gpu = flatopt.Adam(lr=0.1), flatopt.Adam(lr=0.1)
    pc, pd = p0.copy(), cuda.to_device(p0)
    step_both(cpu, gpu, pc, pd, grads[:1])
    avg = np.linspace(0, 1, 2 * len(p0)).astype(np.float32)
    cpu.state["exp_avg"], gpu.state["exp_avg"] = avg[::2].copy(), cuda.to_device(avg)[::2]
    step_both(cpu, gpu, pc, pd, grads[1:])
    assert_same(pd.copy_to_host(), pc)
    assert_states_same(cpu, gpu)


@pytest.mark.parametrize("strided", ["Numba array", pytest.param("interface", marks=sim_only)])
def test_a_strided_device_array_assigned_as_state_is_checkpointed_before_the_step(strided):
    """state_dict(), pickle and a step on host params bring device buffers to the host: a strided
    one was refused there ("not contiguous"), where the step on the device copies it in."""
    p0, grads = data(dtype=np.float32)
    avg = np.linspace(0, 1, 2 * len(p0)).astype(np.float32)
    expected = avg[::2].copy()

    def strided_on_device():
        return cuda.to_device(avg)[::2] if strided == "Numba array" else FakeCAI(avg.copy()[::2])
    cpu, gpu = flatopt.Adam(lr=0.1), flatopt.Adam(lr=0.1)
    pc, pd = p0.copy(), cuda.to_device(p0)
    step_both(cpu, gpu, pc, pd, grads[:1])
    cpu.state["exp_avg"], gpu.state["exp_avg"] = expected.copy(), strided_on_device()
    assert_same(gpu.state_dict()["state"]["exp_avg"], expected)
    gpu = pickle.loads(pickle.dumps(gpu))
    step_both(cpu, gpu, pc, pd, grads[1:])
    assert_same(pd.copy_to_host(), pc)
    assert_states_same(cpu, gpu)

    on_host, reference = flatopt.Adam(lr=0.1), flatopt.Adam(lr=0.1)  # host params, a device state buffer
    ph, pr = p0.copy(), p0.copy()
    on_host.step(ph, grads[0])
    reference.step(pr, grads[0])
    on_host.state["exp_avg"], reference.state["exp_avg"] = strided_on_device(), expected.copy()
    on_host.step(ph, grads[1])
    reference.step(pr, grads[1])
    assert_same(ph, pr)

    la = flatopt.Lookahead(flatopt.SGD(lr=0.1), k=2)
    la.step(cuda.to_device(p0), cuda.to_device(grads[0]))
    la.slow = strided_on_device()
    assert_same(la.state_dict()["slow"], expected)


def test_lookahead_with_slow_weights_on_the_device_pickles_and_goes_on():
    p0, grads = data(dtype=np.float32, steps=5)
    cpu, gpu = flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2), flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2)
    pc, pd = p0.copy(), cuda.to_device(p0)
    step_both(cpu, gpu, pc, pd, grads[:3])
    gpu = pickle.loads(pickle.dumps(gpu))
    assert isinstance(gpu.slow, np.ndarray)  # placed on the device again at the next step
    step_both(cpu, gpu, pc, pd, grads[3:])
    assert_same(pd.copy_to_host(), pc)
    assert_same(gpu.state_dict()["slow"], cpu.slow)


def test_device_tables_are_per_thread():
    """Two threads stepping on one stream each upload their scalars and launch: with one shared
    buffer, one thread's upload could land between the other's upload and launch."""
    backend, table = CudaBackend(), np.zeros((1, 12), np.float32)
    entries = [backend._table_entry(table, 0, 0)]
    worker = threading.Thread(target=lambda: entries.append(backend._table_entry(table, 0, 0)))
    worker.start()
    worker.join()
    assert entries[1][0] is not entries[0][0]
    assert backend._table_entry(table, 0, 0) is entries[0]


# --- exporters as CuPy and others present them ------------------------------------------------
@sim_only
def test_negative_stride_state_and_slow_weights_are_copied_in_as_on_the_cpu():
    """CuPy's ``a[::-1]`` (the interface's ``data`` at its first element, a negative stride)
    assigned as a state buffer or as slow weights: copied in, as a negative-stride host array
    is on the CPU.  Its host copy read the bytes before the pointer as after it, and every step,
    ``state_dict()`` and pickle failed."""
    p0, grads = data(dtype=np.float32, steps=3)
    values = np.linspace(0.5, 2.0, 2 * len(p0)).astype(np.float32)
    cpu, gpu = flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2), flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2)
    pc, pd = p0.copy(), cuda.to_device(p0)
    step_both(cpu, gpu, pc, pd, grads[:1])
    held = values.copy()
    cpu.inner.state["exp_avg_sq"], gpu.inner.state["exp_avg_sq"] = held[:len(p0)][::-1], FakeCAI(held[:len(p0)][::-1])
    cpu.slow, gpu.slow = held[len(p0):][::-1], FakeCAI(held[len(p0):][::-1])
    assert gpu.slow.__cuda_array_interface__["strides"] == (-4,)
    pickle.dumps(gpu)
    np.testing.assert_array_equal(gpu.state_dict()["slow"], held[len(p0):][::-1])
    step_both(cpu, gpu, pc, pd, grads[1:])
    assert_same(pd.copy_to_host(), pc)
    assert_states_same(cpu, gpu)
    np.testing.assert_array_equal(held, values)  # (copied in: the caller's memory is left alone)


@sim_only
def test_checkpoint_buffers_given_through_the_interface_load():
    """np.asarray made a 0-d object array of an exporter with no ``__array__`` (CuPy's), and the
    load refused the buffers as 'shape ()'."""
    p0, grads = data(dtype=np.float32, steps=4)
    straight, pd = flatopt.Lookahead(flatopt.Adam(lr=0.1), k=3), cuda.to_device(p0)
    resumed, pr = flatopt.Lookahead(flatopt.Adam(lr=0.1), k=3), cuda.to_device(p0)
    for g in grads[:2]:
        straight.step(pd, cuda.to_device(g))
        resumed.step(pr, cuda.to_device(g))
    sd = resumed.state_dict()
    kept = dict(slow=sd["slow"].copy(), **{k: v.copy() for k, v in sd["inner"]["state"].items()})
    sd["slow"] = FakeCAI(kept["slow"])
    sd["inner"]["state"] = {k: FakeCAI(kept[k]) for k in sd["inner"]["state"]}
    loaded = flatopt.Lookahead(flatopt.Adam(lr=0.1), k=3)
    loaded.load_state_dict(sd)
    for g in grads[2:]:
        straight.step(pd, cuda.to_device(g))
        loaded.step(pr, cuda.to_device(g))
    assert_same(pr.copy_to_host(), pd.copy_to_host())


@pytest.mark.parametrize("params, error, match", [
    (lambda p: cuda.to_device(np.array(1.0, np.float32)), ValueError, r"params must be a 1-D buffer, got shape \(\)"),
    pytest.param(lambda p: FakeCAI(p, mask=object()), TypeError, "params is a masked CUDA array", marks=sim_only),
])
def test_slow_weights_name_what_a_step_names_in_params(params, error, match):
    p0, grads = data(dtype=np.float32, steps=1)
    la, pd = flatopt.Lookahead(flatopt.SGD(lr=0.1), k=2), cuda.to_device(p0)
    la.step(pd, cuda.to_device(grads[0]))
    bad = params(p0.copy())
    for use in (lambda: la.step(bad, cuda.to_device(grads[0])), lambda: la.slow_weights(bad).__enter__()):
        with pytest.raises(error, match=match):
            use()
    assert la.step_count == 1


@sim_only
def test_a_tree_optimizer_checkpoint_with_buffers_given_through_the_interface_loads():
    """TreeOptimizer checks a checkpoint against its master copy first: np.asarray made 0-d
    object arrays of such buffers there too ('must be a 1-D array, got ndarray of shape ()')."""
    jnp = pytest.importorskip("jax.numpy")
    from flatopt.jax import TreeOptimizer
    params = {"w": jnp.ones((3, 4), jnp.float32), "b": jnp.zeros(5, jnp.float32)}
    grads = {"w": jnp.full((3, 4), 0.5, jnp.float32), "b": jnp.full(5, -0.25, jnp.float32)}
    straight = TreeOptimizer(flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2), params)
    straight.step(grads)
    sd = straight.state_dict()
    kept = dict(slow=sd["optimizer"]["slow"].copy(),
                **{k: v.copy() for k, v in sd["optimizer"]["inner"]["state"].items()})
    sd["optimizer"]["slow"] = FakeCAI(kept["slow"])
    sd["optimizer"]["inner"]["state"] = {k: FakeCAI(kept[k]) for k in sd["optimizer"]["inner"]["state"]}
    loaded = TreeOptimizer(flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2), params)
    loaded.load_state_dict(sd)
    for _ in range(3):
        straight.step(grads)
        loaded.step(grads)
    assert_same(loaded.master, straight.master)
