"""What flatopt.torch requires of a parameter and a group, checked before anything changes."""
import numpy as np
import torch

NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}  # the dtypes flatopt.torch lays out
_TENSOR_DISPATCH = torch.Tensor.__torch_dispatch__
_PLAIN = {torch.Tensor}
_is_neg = torch.Tensor.is_neg


def _dispatches(t):
    """Whether ``t``'s class computes its values in ``__torch_dispatch__`` (a wrapper subclass,
    DTensor, one that scales its storage)."""
    return type(t).__torch_dispatch__ is not _TENSOR_DISPATCH


def values_in_memory(t):
    """Whether ``t``'s values are what its memory holds, as the kernels read them: not so for a
    tensor subclass that dispatches (:func:`_dispatches`), nor for torch's negative view (its
    memory holds ``-t``)."""
    return (type(t) is torch.Tensor or not _dispatches(t)) and not t.is_neg()


def values_not_in_memory(tensors):
    """For each of ``tensors``, whether its values are not its memory's (:func:`values_in_memory`),
    or ``None`` where all are plain tensors with no negative bit: the common case, asked in one C
    loop over their types and one over their negative bits (a call per tensor cost three times
    as much on 200 gradients)."""
    if set(map(type, tensors)) <= _PLAIN and not any(map(_is_neg, tensors)):
        return None
    return [not values_in_memory(t) for t in tensors]


def check_flags(group):
    """torch's implementation flags: ``foreach`` and ``fused`` are recorded only (a flatopt step
    is one fused kernel anyway); the two that promise what a flatopt step cannot do raise."""
    if group.get("differentiable"):
        raise ValueError("flatopt.torch does not support differentiable=True: its step runs outside autograd")
    if group.get("capturable"):
        raise ValueError("flatopt.torch does not support capturable=True: its step runs host code, "
                         "which a CUDA graph cannot capture")


_TENSOR_WITH_FOREACH = "{} as a Tensor is not supported for capturable=False and foreach=True"


def check_tensor_lr(lr, foreach_refused=False):
    """torch's check of a tensor lr, made before the others (the core's take its value).
    ``foreach_refused``: torch's Adam and AdamW refuse a tensor lr with ``foreach=True``
    (flatopt's step would take it: torch's message, for code that must run on both)."""
    if isinstance(lr, torch.Tensor):
        if foreach_refused:
            raise ValueError(_TENSOR_WITH_FOREACH.format("lr"))
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")


def check_foreach_tensors(group):
    """torch's Adam and AdamW at a step, in a group with ``foreach=True`` whose params have
    gradients: no tensor lr (its _init_group's RuntimeError), no tensor betas (its foreach
    function's ValueError)."""
    if not group.get("foreach"):
        return
    if isinstance(group["lr"], torch.Tensor):
        raise RuntimeError(_TENSOR_WITH_FOREACH.format("lr"))
    betas = group["betas"]
    if isinstance(betas, (tuple, list, torch.Tensor)) and len(betas) == 2:  # (else the core's check names it)
        for name, beta in zip(("beta1", "beta2"), betas):
            if isinstance(beta, torch.Tensor):
                raise ValueError(_TENSOR_WITH_FOREACH.format(name))


def check_betas_types(betas):
    """torch's Adam checks this after the ranges (the core's, which a tensor of more than one
    element has failed with torch's own message): betas of one kind."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        return  # the core has refused it
    if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, torch.Tensor) for b in betas)):
        raise ValueError("betas must be either both floats or both Tensors")


def check_foreach_tensor_betas(betas):
    """torch's Adam and AdamW after the types, where ``foreach=True``: no tensor betas (the
    core's range check has refused those of more than one element)."""
    for i, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor):
            raise ValueError(_TENSOR_WITH_FOREACH.format(f"betas[{i}]"))


def check_fused_foreach(group):
    if group.get("fused") and group.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def check_param(p):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {torch.typename(p)}")
    if p.dtype not in NP_DTYPES:
        raise TypeError(f"flatopt.torch supports float32 and float64 parameters, got {p.dtype}")
    if p.is_sparse:
        raise TypeError("flatopt.torch does not support sparse parameters")
    if isinstance(p, torch.nn.parameter.UninitializedTensorMixin):
        raise ValueError("flatopt.torch lays the parameters out when it is built, and an uninitialized parameter "
                         "(a lazy module's) has no shape yet: run the model on a dummy batch first")
    if p.layout != torch.strided or p.is_nested:
        raise TypeError(f"flatopt.torch lays out dense (strided) parameters, got a {'nested ' if p.is_nested else ''}"
                        f"tensor of layout {p.layout}")
    if _dispatches(p):
        raise TypeError(f"flatopt.torch cannot optimize a {type(p).__name__} parameter: a tensor subclass with "
                        "__torch_dispatch__ (a wrapper subclass, DTensor) keeps its values elsewhere than the memory "
                        "the step would write; use torch.optim")
    if p.is_inference():
        raise ValueError("flatopt.torch cannot optimize an inference tensor (made under torch.inference_mode()): "
                         "moving it into the flat buffer would leave it unreadable; make the parameter outside "
                         "inference mode")
    if p.device.type == "meta":
        raise TypeError("flatopt.torch cannot optimize meta tensors: they have no memory to lay out")
    if p.device.type == "cpu" and p.is_shared():  # (CUDA tensors all say they are)
        raise ValueError("flatopt.torch cannot optimize a parameter in shared memory (model.share_memory(), a "
                         "tensor from another process): it moves every parameter into a flat buffer of its own, "
                         "which the other processes would not see. For Hogwild, build the optimizer before "
                         "sharing the model (its flat buffer is then what is shared) and fork the workers with it: "
                         "an optimizer or model sent to a spawned worker arrives in shared memory, where no "
                         "flatopt.torch optimizer can be built (use torch.optim there). Or unshare the parameter "
                         "first (p.data = p.data.clone())")
    if not (p.is_leaf or p.retains_grad):
        raise ValueError("can't optimize a non-leaf Tensor")
    check_no_internal_overlap(p)
    # (torch 2.13: a leaf's gradient may be kept in another dtype; a non-leaf's has no grad_dtype to read)
    grad_dtype = getattr(p, "grad_dtype", p.dtype) if p.is_leaf else p.dtype
    if grad_dtype is not None and grad_dtype != p.dtype:
        raise TypeError(f"flatopt.torch keeps each gradient in its parameter's dtype (a view of one flat gradient "
                        f"buffer), and a parameter of {p.dtype} has grad_dtype {grad_dtype}: use torch.optim")


def check_no_internal_overlap(p):
    """An expanded parameter (a stride of 0 over more than one element) is one set of values
    seen several times: the layout would give each element its own place and untie them.  torch
    refuses to write it, at the step, with this message (one of no elements, it steps).  So
    does one whose elements overlap otherwise, with fewer places in memory than elements
    (``.unfold()``, ``as_strided``): torch writes it, a shared place once per element, which a
    layout of one place per element cannot do."""
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(p.shape, p.stride()))
    if p.numel() and (extent < p.numel() or any(stride == 0 and size > 1 for size, stride in zip(p.shape, p.stride()))):
        raise RuntimeError("unsupported operation: more than one element of the written-to tensor refers to a "
                           "single memory location. Please clone() the tensor before performing the operation.")


def check_unique(params):
    if len({id(p) for p in params}) != len(params):
        raise ValueError("a parameter is listed twice in param_groups; flatopt.torch lays each parameter out "
                         "once: list it once (torch warns, updates it twice per step, and plans to make this "
                         "an error)")


def check_disjoint(params):
    """Parameters that share memory (views of one tensor, or tensors NumPy made over the same
    bytes) would be untied by the layout, which gives each its own place: refuse them.  Byte
    ranges per device, sorted by their first byte: if any two overlap, two neighbours do."""
    spans = []
    for i, p in enumerate(params):
        if p.numel():
            extent = 1 + sum((n - 1) * abs(st) for n, st in zip(p.shape, p.stride()))
            spans.append((str(p.device), p.data_ptr(), p.data_ptr() + extent * p.element_size(), i))
    spans.sort()
    for a, b in zip(spans, spans[1:]):
        if a[0] == b[0] and b[1] < a[2]:
            raise ValueError(f"parameters {a[3]} and {b[3]} share memory (views of one tensor); flatopt.torch "
                             "gives each parameter its own place in a flat buffer, which would untie them")


def moved_error(p, device, dtype):
    return RuntimeError(f"a parameter changed from {dtype} on {device} to {p.dtype} on {p.device} after the "
                        "optimizer was built (e.g. model.double() or .to()); flatopt.torch keeps one flat buffer "
                        "per (device, dtype): build a new optimizer")
