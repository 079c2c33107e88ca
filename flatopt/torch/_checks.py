"""What flatopt.torch requires of a parameter and a group, checked before anything changes."""
import numpy as np
import torch

NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}  # the dtypes flatopt.torch lays out


def check_flags(group):
    """torch's implementation flags: ``foreach`` and ``fused`` are recorded only (a flatopt step
    is one fused kernel anyway); the two that promise what a flatopt step cannot do raise."""
    if group.get("differentiable"):
        raise ValueError("flatopt.torch does not support differentiable=True: its step runs outside autograd")
    if group.get("capturable"):
        raise ValueError("flatopt.torch does not support capturable=True: its step runs host code, "
                         "which a CUDA graph cannot capture")


def check_param(p):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {torch.typename(p)}")
    if p.dtype not in NP_DTYPES:
        raise TypeError(f"flatopt.torch supports float32 and float64 parameters, got {p.dtype}")
    if p.is_sparse:
        raise TypeError("flatopt.torch does not support sparse parameters")
    if p.device.type == "meta":
        raise TypeError("flatopt.torch cannot optimize meta tensors: they have no memory to lay out")
    if not (p.is_leaf or p.retains_grad):
        raise ValueError("can't optimize a non-leaf Tensor")


def check_unique(params):
    if len({id(p) for p in params}) != len(params):
        raise ValueError("a parameter is listed twice in param_groups; flatopt.torch lays each parameter out "
                         "once: list it once (torch warns, updates it twice per step, and plans to make this "
                         "an error)")


def check_disjoint(params):
    """Parameters that share memory (views of one tensor) would be untied by the layout, which
    gives each its own place: refuse them."""
    spans = []
    for i, p in enumerate(params):
        if p.numel():
            start = p.storage_offset()
            extent = 1 + sum((n - 1) * abs(st) for n, st in zip(p.shape, p.stride()))
            spans.append((p.device, p.untyped_storage().data_ptr(), start * p.element_size(),
                          (start + extent) * p.element_size(), i))
    spans.sort(key=lambda s: (str(s[0]), s[1], s[2]))
    for a, b in zip(spans, spans[1:]):
        if a[:2] == b[:2] and b[2] < a[3]:
            raise ValueError(f"parameters {a[4]} and {b[4]} share memory (views of one tensor); flatopt.torch "
                             "gives each parameter its own place in a flat buffer, which would untie them")


def moved_error(p, device, dtype):
    return RuntimeError(f"a parameter changed from {dtype} on {device} to {p.dtype} on {p.device} after the "
                        "optimizer was built (e.g. model.double() or .to()); flatopt.torch keeps one flat buffer "
                        "per (device, dtype): build a new optimizer")
