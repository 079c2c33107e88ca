"""How flatopt.torch's methods sit in torch's machinery around an optimizer: torch.compile
(dynamo), which must not trace them, torch.optim's step hooks and profilers, which a step
serves only when one of them is there to see it, and autograd's version counters, which a
write that torch did not make must bump."""
import functools

import torch
import torch.optim.optimizer as _torch_optimizer

_optimizer_globals = vars(_torch_optimizer)
_autograd_profiler = torch.autograd.profiler
_profiler_enabled = torch.autograd._profiler_enabled
# (torch.autograd.graph.increment_version, less its check for one tensor: a step passes a list)
increment_version = getattr(torch._C, "_increment_version", torch.autograd.graph.increment_version)


def profiling():
    """Whether a profiler records (torch.profiler's or torch.autograd.profiler's)."""
    return _autograd_profiler._is_profiler_enabled or _profiler_enabled()


def global_hooks_or_profiler():
    """Whether torch.optim's global step hooks or a profiler want to see every step (if a
    torch release moves the hook registries, every step takes torch's own path)."""
    return bool(_optimizer_globals.get("_global_optimizer_pre_hooks", True)
                or _optimizer_globals.get("_global_optimizer_post_hooks", True) or profiling())


def labelled_zero_grad(zero_grad):
    """``zero_grad``, labelled for a recording profiler as torch.optim labels its own
    (``Optimizer.zero_grad#Adam.zero_grad``); unlabelled otherwise, where the label would cost
    more than the call."""
    @functools.wraps(zero_grad)
    def run(self, set_to_none=True):
        if not profiling():
            return zero_grad(self, set_to_none)
        with _autograd_profiler.record_function(f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"):
            return zero_grad(self, set_to_none)
    return run


def _frame_callback_reader():
    """torch's C function that returns dynamo's frame callback, or ``None`` where a torch
    release lacks it (private to torch; imported from its C extension, so that dynamo's Python
    package stays unimported)."""
    try:
        from torch._C._dynamo.eval_frame import get_eval_frame_callback
    except ImportError:
        return None
    return get_eval_frame_callback


_frame_callback = _frame_callback_reader()


def _eager():
    """Whether no torch.compile'd function is running.  Dynamo folds ``is_compiling()`` to
    True where it traces the call; a compiled function that runs code between its graphs, or
    a frame it chose not to trace, keeps its frame callback installed, and would trace the
    frames called from there."""
    return not torch.compiler.is_compiling() and _frame_callback is not None and _frame_callback() is None


def outside_dynamo(fn):
    """``fn``, which dynamo (torch.compile) does not trace: a compiled caller runs it as it is,
    between its graphs, as it runs torch.optim.Optimizer's own methods.  Traced, a step's NumPy
    bookkeeping would become torch operations, some of which torch lacks (uint64 comparisons),
    and its Numba kernel cannot be traced at all.

    In eager code (every call outside torch.compile) ``fn`` is called as it is; else through
    ``torch.compiler.disable``, which removes dynamo's frame callback for the call and costs as
    much again as a small model's step.  Traced, the wrapper breaks the graph where it calls
    the disabled function, before ``fn`` runs (an error under ``fullgraph=True``, with nothing
    changed).  The disabled function is made at its first use, as torch.optim makes its own:
    ``torch.compiler.disable`` imports dynamo.

    Each wrapper has a code object of its own: dynamo keeps what it compiled of a frame with
    the frame's code, and where the wrappers of two methods shared theirs, the code it had
    compiled for one method's wrapper ran for the other's and called its ``disabled`` while it
    was still ``None`` (a compiled ``opt.step()`` called twice, then a compiled
    ``opt.zero_grad()``)."""
    disabled = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal disabled
        if _eager():
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)
    run.__code__ = run.__code__.replace(co_name=fn.__name__)  # (a new code object, named as the method)
    run.outside_dynamo = True
    return run
