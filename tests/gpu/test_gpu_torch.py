"""flatopt.torch with CUDA parameters, on a real GPU.

The CUDA kernels round every operation as the CPU kernels do, so the same model stepped with
the same gradients on the GPU and on the CPU must agree bit for bit; torch.optim on the GPU
is the independent reference (to rounding: torch's CUDA kernels contract to FMA freely).
Skipped without a GPU.
"""
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("flatopt.torch")

from .test_gpu import NO_GPU  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NO_GPU is not None or not torch.cuda.is_available(),
                                                  reason=str(NO_GPU or "torch has no CUDA"))]

OPTIMIZERS = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "RMSprop": dict(lr=1e-3, centered=True, momentum=0.5),
    "Adam": dict(lr=1e-3, amsgrad=True),
    "AdamW": dict(lr=1e-3, weight_decay=0.1),
    "ADOPT": dict(lr=1e-3),
}


def model(device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(37, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                              torch.nn.Tanh(), torch.nn.Linear(64, 3))
    net.frozen = torch.nn.Parameter(torch.randn(5))  # never gets a gradient
    return net.to(device=device, dtype=dtype)


def groups(net):
    layers = [net[0], net[2], net[4]]
    return [{"params": [layers[0].weight, layers[1].weight, layers[2].weight, net.frozen]},
            {"params": [layers[0].bias, layers[1].bias, layers[2].bias], "lr": 3e-3, "weight_decay": 0.0}]


def gradients(net, steps, seed=1):
    """Per step, a gradient for every trainable parameter (host arrays, reused on both devices)."""
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(tuple(p.shape)) for name, p in net.named_parameters() if name != "frozen"]
            for _ in range(steps)]


def run(net, opt, grads, scheduler=None):
    trainable = [p for name, p in net.named_parameters() if name != "frozen"]
    for step_grads in grads:
        opt.zero_grad()
        for p, g in zip(trainable, step_grads):
            p.grad = torch.as_tensor(g, dtype=p.dtype, device=p.device)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def same_bits(a, b):
    a, b = a.detach().cpu().numpy(), b.detach().cpu().numpy()
    bits = np.uint32 if a.dtype == np.float32 else np.uint64
    return np.array_equal(a.view(bits), b.view(bits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_cuda_model_bitwise_equal_to_cpu_model(name, dtype):
    results = {}
    for device in ("cpu", "cuda"):
        net = model(device, dtype)
        opt = getattr(ft, name)(groups(net), **OPTIMIZERS[name])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        run(net, opt, gradients(net, 12), sched)
        torch.cuda.synchronize()
        results[device] = (net, opt)
    (cpu_net, cpu_opt), (gpu_net, gpu_opt) = results["cpu"], results["cuda"]
    for (pn, a), (_, b) in zip(cpu_net.named_parameters(), gpu_net.named_parameters()):
        assert same_bits(a, b), pn
    assert same_bits(gpu_net.frozen, model("cpu", dtype).frozen)  # untouched: no grad, no decay
    assert gpu_net.frozen not in gpu_opt.state
    for p_cpu, p_gpu in zip(cpu_net.parameters(), gpu_net.parameters()):
        sa, sb = cpu_opt.state.get(p_cpu, {}), gpu_opt.state.get(p_gpu, {})
        assert sorted(sa) == sorted(sb)
        for key in sa:
            assert same_bits(sa[key].reshape(-1), sb[key].reshape(-1)), key


def test_cuda_parameters_and_grads_are_views_of_one_flat_buffer():
    net = model("cuda")
    opt = ft.AdamW(net.parameters(), lr=1e-3)
    (bucket,) = opt._buckets.values()
    lo, hi = bucket.flat.data_ptr(), bucket.flat.data_ptr() + bucket.flat.numel() * 4
    assert all(lo <= p.data_ptr() < hi for p in net.parameters())
    x = torch.randn(16, 37, device="cuda")
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        net(x).square().mean().backward()
        opt.step()
    glo = bucket.gflat.data_ptr()
    ghi = glo + bucket.gflat.numel() * 4
    assert all(glo <= p.grad.data_ptr() < ghi for p in net.parameters() if p.grad is not None)
    assert all(lo <= p.data_ptr() < hi for p in net.parameters())
    state = opt.state[net[0].weight]["exp_avg"]
    core_state = torch.as_tensor(bucket.core.state["exp_avg"], device="cuda")
    assert core_state.data_ptr() <= state.data_ptr() < core_state.data_ptr() + core_state.numel() * 4


@pytest.mark.parametrize("name, kwargs", [
    ("AdamW", dict(lr=1e-3, weight_decay=0.1)),
    ("Adam", dict(lr=1e-3)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("RMSprop", dict(lr=1e-3)),
])
def test_training_on_cuda_matches_torch_optim(name, kwargs):
    x = torch.randn(64, 37, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    y = torch.randint(0, 3, (64,), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    nets = [model("cuda"), model("cuda")]
    opts = [getattr(ft, name)(nets[0].parameters(), **kwargs),
            getattr(torch.optim, name)(nets[1].parameters(), foreach=False, **kwargs)]
    for _ in range(30):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_torch_save_load_resume_on_cuda_is_bitwise():
    steps = gradients(model("cpu"), 10)
    net_a = model("cuda")
    opt_a = ft.Adam(groups(net_a), lr=1e-3)
    run(net_a, opt_a, steps)

    net_b = model("cuda")
    opt_b = ft.Adam(groups(net_b), lr=1e-3)
    run(net_b, opt_b, steps[:4])
    blob = io.BytesIO()
    torch.save({"model": net_b.state_dict(), "opt": opt_b.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=False)
    net_c = model("cuda", seed=7)
    net_c.load_state_dict(saved["model"])
    opt_c = ft.Adam(groups(net_c), lr=1e-3)
    opt_c.load_state_dict(saved["opt"])
    run(net_c, opt_c, steps[4:])
    for a, c in zip(net_a.parameters(), net_c.parameters()):
        assert same_bits(a, c)


def test_lookahead_on_cuda_matches_cpu():
    results = []
    for device in ("cpu", "cuda"):
        net = model(device)
        opt = ft.Lookahead(ft.AdamW(net.parameters(), lr=1e-2), k=3, alpha=0.5)
        run(net, opt, gradients(net, 10))
        results.append(net)
    for a, b in zip(*(n.parameters() for n in results)):
        assert same_bits(a, b)


def test_whole_buffer_steps_then_add_param_group_on_cuda_match_cpu():
    """The first steps update every parameter of the optimizer (the core's groupless path on
    the GPU); add_param_group then re-lays the buffers out and carries the state across,
    which reads the CUDA state back through the core's state_dict."""
    results = {}
    for device in ("cpu", "cuda"):
        net = model(device)
        opt = ft.Adam([net[0].weight, net[0].bias], lr=1e-3, amsgrad=True)
        steps = gradients(net, 8)
        run(net, opt, steps[:4])
        opt.add_param_group({"params": [net[2].weight, net[2].bias, net[4].weight, net[4].bias], "lr": 3e-3})
        run(net, opt, steps[4:])
        if device == "cuda":
            torch.cuda.synchronize()
        results[device] = (net, opt)
    (cpu_net, cpu_opt), (gpu_net, gpu_opt) = results["cpu"], results["cuda"]
    for (name, a), (_, b) in zip(cpu_net.named_parameters(), gpu_net.named_parameters()):
        assert same_bits(a, b), name
    assert cpu_opt.state[cpu_net[0].weight]["step"].item() == gpu_opt.state[gpu_net[0].weight]["step"].item() == 8
    for p_cpu, p_gpu in zip(cpu_net.parameters(), gpu_net.parameters()):
        sa, sb = cpu_opt.state.get(p_cpu, {}), gpu_opt.state.get(p_gpu, {})
        assert sorted(sa) == sorted(sb)
        for key in sa:
            assert same_bits(sa[key].reshape(-1), sb[key].reshape(-1)), key
