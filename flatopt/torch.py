"""PyTorch adapter: ``torch.optim.Optimizer`` subclasses that run one flatopt kernel per
(device, dtype) of parameters, on flat buffers the parameters live in (zero copy).

* ``SGD``, ``RMSprop``, ``Adam``, ``AdamW``, ``ADOPT`` take ``params`` (tensors or param
  group dicts) and the keyword arguments of ``flatopt.SGD`` etc.  Param groups,
  ``add_param_group``, ``state_dict`` / ``load_state_dict``, lr schedulers, ``GradScaler``
  and ``clip_grad_norm_`` work as with ``torch.optim`` (the machinery is torch's own).
* At construction every parameter's storage moves into one contiguous flat buffer per
  (device, dtype): ``p.data`` becomes a view of it.  From the first step on, ``p.grad`` is
  a view of a flat gradient buffer, so with ``zero_grad(set_to_none=False)`` backward
  accumulates straight into it.  With ``zero_grad()`` (``set_to_none=True``, torch's
  default) the fresh gradient autograd makes is copied into the flat buffer at the next
  step.  (Gradients are not pre-assigned at construction: a parameter that never got a
  gradient must stay ``None`` so that it is skipped, as torch skips it.)
* Parameters whose ``.grad`` is ``None`` are skipped: no update, no decay, no state or
  step change.  Replaced ``.grad`` / ``.data`` tensors are copied in and re-pointed at the
  flat views before the step.
* ``state[p]`` holds torch's names (``step``, ``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq``, ``momentum_buffer``, ``square_avg``, ``grad_avg``) as views of the
  flat state buffers; ``step`` is a float32 scalar view of one per-bucket step array.
* ``Lookahead(optimizer, k=5, alpha=0.5)`` wraps any torch optimizer (per tensor); around a
  flatopt.torch optimizer its slow weights mirror the flat buffers, so the every-``k``
  pull is two tensor ops per buffer.

CUDA parameters go to the core as tensors (its backend reads ``__cuda_array_interface__``); they
are tested on a real GPU (``tests/gpu/test_gpu_torch.py``).  Not supported: sparse gradients,
complex and half dtypes.
"""
from collections import OrderedDict, defaultdict
from contextlib import contextmanager
from operator import attrgetter, is_

import numpy as np
import torch
import torch.optim.optimizer as _torch_optimizer

import flatopt
from flatopt.backend import backend_for

__all__ = ["SGD", "RMSprop", "Adam", "AdamW", "ADOPT", "Lookahead"]

_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_data_ptr = torch.Tensor.data_ptr
_grad_of = attrgetter("grad")


def _number(value):
    """A hyperparameter as the core takes it, read now: torch allows tensors (an lr, betas)
    and a group may hold a list; both can be edited in place between steps."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if type(value) in (tuple, list):
        return tuple(map(_number, value))
    return value


def _volatile(value):
    """Whether a hyperparameter can change with no assignment to its group: a tensor or a
    list (edited in place), also inside a tuple."""
    return isinstance(value, (torch.Tensor, list)) or (type(value) is tuple and any(map(_volatile, value)))


def _global_hooks_or_profiler():
    """Whether torch.optim's global step hooks or a profiler want to see every step (if a
    torch release moves the hook registries, every step takes torch's own path)."""
    return bool(getattr(_torch_optimizer, "_global_optimizer_pre_hooks", True)
                or getattr(_torch_optimizer, "_global_optimizer_post_hooks", True)
                or torch.autograd.profiler._is_profiler_enabled or torch.autograd._profiler_enabled())


class _Bucket:
    """The parameters of one (device, dtype): flat buffers, layout and one core optimizer."""

    def __init__(self, core, device, dtype):
        self.core, self.device, self.dtype = core, device, dtype
        self.params, self.offsets, self.sizes, self.groups = [], [], [], []
        self.flat = self.gflat = self.flat_np = self.gflat_np = None
        self.views, self.gviews, self.ptrs = [], [], []
        self.steps = np.zeros(0, np.float32)   # per-param step counts (torch's state["step"])
        self.steps_t = None
        self.started = np.zeros(0, bool)       # SGD: the momentum buffer exists
        self.layout_key = self.layout = None
        self.core_groups_key = None  # the hyperparameters the core has, one tuple per run
        self.group_values = None  # the torch groups' values they were read from
        self.volatile = False  # whether those values must be read again every step
        self.state_args = None  # the core's state arguments self.state was last pointed at


def _as_tensor(buf, device):
    return torch.from_numpy(buf) if isinstance(buf, np.ndarray) else torch.as_tensor(buf, device=device)


class _FlatOptimizer(torch.optim.Optimizer):
    _core_cls = None

    def __init__(self, params, **kwargs):
        self._core_kwargs = dict(kwargs)
        proto = self._core_cls(**kwargs)  # validates with torch's messages
        hp = proto.hyperparameters()
        if callable(hp["lr"]):
            raise TypeError("flatopt.torch optimizers take a number as lr; use a torch lr_scheduler for schedules")
        # callables (ADOPT's clip_lambda) stay on the core: param_groups must stay picklable
        self._core_only = {k for k, v in hp.items() if callable(v) or k == "clip_lambda"}
        self._hp_names = tuple(k for k in proto.defaults if k not in self._core_only)
        defaults = {k: hp[k] for k in self._hp_names}
        defaults.update(foreach=None, differentiable=False, fused=None)
        self._buckets = {}
        self._building = True
        super().__init__(params, defaults)
        self._building = False
        self._rebuild()

    # --- groups and layout ---------------------------------------------------------------
    def add_param_group(self, param_group):
        n_before = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                if p.dtype not in _NP_DTYPES:
                    raise TypeError(f"flatopt.torch supports float32 and float64 parameters, got {p.dtype}")
                if p.is_sparse:
                    raise TypeError("flatopt.torch does not support sparse parameters")
            core = self._core_cls(**self._core_kwargs)
            core._check(core._resolve({k: group[k] for k in self._hp_names}, 0))
        except Exception:
            del self.param_groups[n_before:]
            raise
        if not self._building:
            self._rebuild()

    def _rebuild(self):
        """(Re)lay every parameter out in flat buffers, keeping values, grads and state."""
        old = self._buckets
        order = defaultdict(list)
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                order[(p.device, p.dtype)].append((p, gi))
        buckets = {}
        for key, entries in order.items():
            device, dtype = key
            prev = old.get(key)
            core = prev.core if prev is not None else self._core_cls(**self._core_kwargs)
            b = _Bucket(core, device, dtype)
            b.params = [p for p, _ in entries]
            b.groups = [gi for _, gi in entries]
            b.sizes = [p.numel() for p in b.params]
            b.offsets = np.concatenate([[0], np.cumsum(b.sizes)[:-1]]).astype(int).tolist()
            total = sum(b.sizes)
            b.flat = torch.empty(total, dtype=dtype, device=device)
            b.gflat = torch.zeros(total, dtype=dtype, device=device)
            b.steps = np.zeros(len(b.params), np.float32)
            b.started = np.zeros(len(b.params), bool)
            old_index = {id(p): i for i, p in enumerate(prev.params)} if prev is not None else {}
            # host copies of the previous state (CUDA state too: the core's checkpoint format)
            old_state = prev.core.state_dict()["state"] if prev is not None else {}
            new_state = {name: np.zeros(total, _NP_DTYPES[dtype]) for name in old_state}
            with torch.no_grad():
                for i, (p, off, n) in enumerate(zip(b.params, b.offsets, b.sizes)):
                    b.flat[off:off + n].copy_(p.data.reshape(-1))
                    j = old_index.get(id(p))
                    if j is not None:  # carried over from the previous layout
                        b.steps[i], b.started[i] = prev.steps[j], prev.started[j]
                        po = prev.offsets[j]
                        for name, buf in new_state.items():
                            buf[off:off + n] = old_state[name][po:po + n]
            b.views = [b.flat[off:off + n].view_as(p) for p, off, n in zip(b.params, b.offsets, b.sizes)]
            b.gviews = [b.gflat[off:off + n].view_as(p) for p, off, n in zip(b.params, b.offsets, b.sizes)]
            for p, v in zip(b.params, b.views):
                p.data = v
            b.ptrs = [v.data_ptr() for v in b.views]
            b.all_active = (True,) * len(b.params)
            with torch.no_grad():
                for p, gv in zip(b.params, b.gviews):
                    if p.grad is not None:
                        gv.copy_(p.grad)
                        p.grad = gv
            if device.type == "cpu":
                b.flat_np, b.gflat_np = b.flat.detach().numpy(), b.gflat.numpy()
            else:  # CUDA: the core's backend takes the tensors (__cuda_array_interface__)
                b.flat_np, b.gflat_np = b.flat.detach(), b.gflat
                new_state = {k: torch.as_tensor(v, device=device) for k, v in new_state.items()}
            b.steps_t = torch.from_numpy(b.steps)
            self._install_state(b, new_state)
            buckets[key] = b
        self._buckets = buckets
        self._refresh_state(force=True)

    def _install_state(self, b, state):
        core = b.core
        core.state = state
        # The state already lives on the parameters' device: naming its backend keeps the core
        # from placing (copying) it again, so the views in ``self.state`` stay valid.
        core._backend = backend_for(b.flat_np, b.gflat_np)
        core._state_key = core._state_args = None
        core.param_groups = None
        b.layout_key = b.core_groups_key = None

    def _refresh_state(self, force=False):
        """Point ``self.state[p]`` at views of the flat state (params that have stepped)."""
        for b in self._buckets.values():
            # The core rebuilds its list of state arguments whenever it (re)places a buffer.
            if not force and b.core._state_args is b.state_args:
                continue
            b.state_args = b.core._state_args
            tstate = {k: _as_tensor(v, b.device) for k, v in b.core.state.items()}
            sgd = isinstance(self, SGD)
            for i, p in enumerate(b.params):
                if b.steps[i] == 0 and not b.started[i]:
                    self.state.pop(p, None)
                    continue
                off, n = b.offsets[i], b.sizes[i]
                st = {"step": b.steps_t[i]}
                for name, t in tstate.items():
                    if name == "momentum_buffer" and sgd and not b.started[i]:
                        continue
                    st[name] = t[off:off + n].view_as(p)
                self.state[p] = st

    # --- the step --------------------------------------------------------------------------
    def _sync(self, b):
        """Pull replaced ``.data`` / ``.grad`` into the flat views; which params have a grad.

        The copies of one step go in one ``torch._foreach_copy_`` call (after ``zero_grad()``
        every gradient is a fresh tensor).
        """
        params = b.params
        if all(map(is_, map(_grad_of, params), b.gviews)) and list(map(_data_ptr, params)) == b.ptrs:
            return b.all_active  # the common zero-copy case: nothing to pull in
        with torch.no_grad():
            return self._pull_in(b, params, [p.grad for p in params])

    def _pull_in(self, b, params, grads):
        dst, src, repoint_data, repoint_grad = [], [], [], []
        active = []
        for i, p in enumerate(params):
            if p.data_ptr() != b.ptrs[i]:
                view = b.views[i]
                if p.data.shape != view.shape:
                    raise RuntimeError(f"a parameter changed shape to {tuple(p.data.shape)}; "
                                       "build a new optimizer")
                dst.append(view)
                src.append(p.data)
                repoint_data.append((p, view))
            g = grads[i]
            if g is None:
                active.append(False)
                continue
            gv = b.gviews[i]
            if g is not gv:
                if g.is_sparse:
                    raise RuntimeError("flatopt.torch does not support sparse gradients")
                if g.data_ptr() != gv.data_ptr() or g.stride() != gv.stride() or g.shape != gv.shape:
                    dst.append(gv)
                    src.append(g)
                repoint_grad.append((p, gv))
            active.append(True)
        if dst:
            torch._foreach_copy_(dst, src)
        for p, view in repoint_data:
            p.data = view
        for p, gv in repoint_grad:
            p.grad = gv
        return tuple(active)

    def _runs(self, b, active):
        """Maximal runs of neighbouring params with a grad, one torch group, one step count
        (and for SGD one momentum state): ``[(group_index, start, stop, first, last)]``."""
        runs, cur = [], None
        for i, a in enumerate(active):
            if not a or b.sizes[i] == 0:
                cur = None
                continue
            key = (b.groups[i], float(b.steps[i]), bool(b.started[i]))
            if cur is not None and cur[0] == key:
                cur[2] = b.offsets[i] + b.sizes[i]
                cur[4] = i + 1
            else:
                cur = [key, b.offsets[i], b.offsets[i] + b.sizes[i], i, i + 1]
                runs.append(cur)
        return [(k[0], s, e, i0, i1) for k, s, e, i0, i1 in runs]

    def step(self, *args, **kwargs):
        """``step(closure=None)``: one flatopt kernel per (device, dtype) bucket.

        torch wraps every optimizer's ``step`` in its hook and profiler machinery, which costs
        as much as the rest of the step on a small model; this step runs it itself, only when
        a step hook is registered or a profiler is recording (and not when a subclass overrides
        ``step``: torch wraps that override, which calls this one).
        """
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _global_hooks_or_profiler()) \
                and type(self).step is _FlatOptimizer.step:
            return self._step_with_hooks(*args, **kwargs)
        return self._step(*args, **kwargs)

    step.hooked = True  # tells torch.optim.Optimizer not to wrap it again

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for b in self._buckets.values():
            self._step_bucket(b)
        return loss

    _step_with_hooks = torch.optim.Optimizer.profile_hook_step(_step)

    def _step_bucket(self, b):
        active = self._sync(b)
        if active is not b.layout_key and active != b.layout_key:
            b.layout, b.layout_key, b.core_groups_key = self._runs(b, active), active, None
        runs = b.layout
        if not runs:
            return
        pg = self.param_groups
        values = [tuple(map(pg[gi].__getitem__, self._hp_names)) for gi, *_ in runs]
        if b.volatile or b.core_groups_key is None or values != b.group_values:
            hps = [tuple(map(_number, v)) for v in values]
            if hps != b.core_groups_key:
                self._configure_core(b, runs, hps)
                b.core_groups_key = hps
            b.group_values, b.volatile = values, any(map(_volatile, (x for v in values for x in v)))
        b.core.step(b.flat_np, b.gflat_np)
        newly = False
        sgd = isinstance(self, SGD)
        for gi, _, _, i0, i1 in runs:
            if b.steps[i0] == 0:
                newly = True
            b.steps[i0:i1] += 1
            if sgd and not b.started[i0] and pg[gi]["momentum"] != 0:
                b.started[i0:i1] = True
                newly = True
        if newly:  # new state entries; SGD runs may have split or merged
            b.layout_key = None
        self._refresh_state(force=newly)

    def _configure_core(self, b, runs, hps):
        """Hand the runs to the core as its param groups, each with its torch group's
        hyperparameters and its step count; the core advances those counts itself, in step
        with ``b.steps``, until the runs or the hyperparameters change."""
        core, names = b.core, self._hp_names
        if len(runs) == 1 and runs[0][1] == 0 and runs[0][2] == len(b.flat_np):
            # The whole buffer is one run (the common case): the core's groupless path,
            # which validates the hyperparameters once and then only computes each step's scalars.
            core.param_groups = None
            for name, value in zip(names, hps[0]):
                setattr(core, name, value)
        else:
            core.param_groups = [dict(zip(names, hp), start=s, stop=e) for hp, (_, s, e, _, _) in zip(hps, runs)]
        proto = core._new_group_state()
        states = []
        for _, _, _, i0, _ in runs:
            state = dict(proto, step=int(b.steps[i0]))
            if "momentum_started" in state:
                state["momentum_started"] = bool(b.started[i0])
            states.append(state)
        core.group_state = states

    # --- zero_grad ---------------------------------------------------------------------
    def zero_grad(self, set_to_none=True):
        """``True`` (torch's default): every ``.grad`` becomes None (the flat gradient buffer
        is kept).  ``False``: one ``zero_()`` over each flat gradient buffer; other gradient
        tensors are zeroed as torch does; ``None`` gradients stay ``None``."""
        if set_to_none:
            for b in self._buckets.values():
                for p in b.params:
                    p.grad = None
            return
        for b in self._buckets.values():
            b.gflat.zero_()
            for p, gv in zip(b.params, b.gviews):
                g = p.grad
                if g is not None and g is not gv:
                    if g.grad_fn is not None:
                        g.detach_()
                    else:
                        g.requires_grad_(False)
                    g.zero_()

    # --- checkpoints ---------------------------------------------------------------------
    def state_dict(self):
        """torch's layout; every state value a compact copy (views would pickle whole buffers)."""
        sd = super().state_dict()
        sd["state"] = {k: {n: v.clone() for n, v in st.items()} for k, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # torch's checks; replaces param_groups and state
        for group in self.param_groups:
            core = self._core_cls(**self._core_kwargs)
            core._check(core._resolve({k: group[k] for k in self._hp_names}, 0))
        loaded = self.state
        self.state = defaultdict(dict)
        index = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        for b in self._buckets.values():
            b.groups = [index[id(p)] for p in b.params]
            names = set()
            for p in b.params:
                names.update(k for k in loaded.get(p, {}) if k in b.core.state_names)
            total = b.flat.numel()
            new_state = {name: np.zeros(total, _NP_DTYPES[b.dtype]) for name in b.core.state_names if name in names}
            b.steps[:] = 0
            b.started[:] = False
            for i, p in enumerate(b.params):
                st = loaded.get(p)
                if not st:
                    continue
                off, n = b.offsets[i], b.sizes[i]
                step = st.get("step")
                b.steps[i] = float(step) if step is not None else 0.0
                b.started[i] = st.get("momentum_buffer") is not None
                for name, v in st.items():
                    if name in new_state and v is not None:
                        new_state[name][off:off + n] = v.detach().reshape(-1).cpu().numpy()
            if b.device.type != "cpu":
                new_state = {k: torch.as_tensor(v, device=b.device) for k, v in new_state.items()}
            self._install_state(b, new_state)
        self._refresh_state(force=True)


class SGD(_FlatOptimizer):
    """``torch.optim.SGD``'s rule (see :class:`flatopt.SGD`), one kernel per (device, dtype)."""
    _core_cls = flatopt.SGD


class RMSprop(_FlatOptimizer):
    """``torch.optim.RMSprop``'s rule (see :class:`flatopt.RMSprop`), one kernel per (device, dtype)."""
    _core_cls = flatopt.RMSprop


class Adam(_FlatOptimizer):
    """``torch.optim.Adam``'s rule (see :class:`flatopt.Adam`), one kernel per (device, dtype)."""
    _core_cls = flatopt.Adam


class AdamW(_FlatOptimizer):
    """``torch.optim.AdamW``'s rule (see :class:`flatopt.AdamW`), one kernel per (device, dtype)."""
    _core_cls = flatopt.AdamW


class ADOPT(_FlatOptimizer):
    """ADOPT (see :class:`flatopt.ADOPT`), one kernel per (device, dtype)."""
    _core_cls = flatopt.ADOPT


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al., 2019) around any torch optimizer.

    Slow weights start as a copy of the parameters (taken before the first inner step);
    every ``k`` inner steps ``p = alpha * p + (1 - alpha) * slow`` and ``slow = p``
    (the seed's rounding: ``p.mul_(alpha).add_(q, alpha=1 - alpha)``).
    ``param_groups`` is the inner optimizer's, so lr schedulers drive the inner optimizer.
    ``state_dict()`` holds the inner state, the slow weights and the step counter.
    """

    def __init__(self, optimizer, k=5, alpha=0.5):  # torch.optim.Optimizer.__init__ is not called
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Lookahead wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"Invalid k: {k!r}; Lookahead needs an integer k >= 1")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Invalid alpha: {alpha!r}; Lookahead needs 0 <= alpha <= 1")
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        self.step_count = 0
        self.slow = None  # tensors in the inner optimizer's parameter order
        self._flat_pairs = None
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                     "load_state_dict_post"):
            setattr(self, f"_optimizer_{name}_hooks", OrderedDict())

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def defaults(self):
        return self.optimizer.defaults

    @property
    def state(self):
        return self.optimizer.state

    def _params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @torch.no_grad()
    def _make_slow(self, params, values=None):
        """Slow weights as copies of ``values`` (default: the parameters).  Around a flatopt.torch
        optimizer they are views of one flat buffer per (device, dtype), mirroring its layout,
        so that the pull is two tensor ops per buffer; otherwise one tensor per parameter."""
        values = [p.detach() for p in params] if values is None else values
        self._flat_pairs = None
        inner = self.optimizer
        if isinstance(inner, _FlatOptimizer):
            where = {}
            pairs = []
            for b in inner._buckets.values():
                buf = torch.empty_like(b.flat)
                pairs.append((b.flat, buf))
                for p, off, n in zip(b.params, b.offsets, b.sizes):
                    where[id(p)] = buf[off:off + n].view_as(p)
            self.slow = [where[id(p)] for p in params]
            torch._foreach_copy_(self.slow, values)
            self._flat_pairs = pairs
        else:
            self.slow = [v.clone() for v in values]

    def _flat_current(self):
        """The flat pairs, if the inner optimizer's buffers are still the ones mirrored."""
        pairs = self._flat_pairs
        if pairs is None:
            return None
        flats = [b.flat for b in self.optimizer._buckets.values()]
        if len(flats) != len(pairs) or any(f is not a for f, (a, _) in zip(flats, pairs)):
            return None
        return pairs

    def step(self, closure=None):
        params = self._params()
        if self.slow is None:
            self._make_slow(params)
        loss = self.optimizer.step(closure)
        self.step_count += 1
        if self.step_count % self.k == 0:
            with torch.no_grad():
                pairs = self._flat_current()
                if pairs is not None:  # the inner step synced every .data into the flat buffers
                    for fast, slow in pairs:
                        fast.mul_(self.alpha).add_(slow, alpha=1 - self.alpha)
                        slow.copy_(fast)
                else:
                    for p, q in zip(params, self.slow):
                        p.mul_(self.alpha).add_(q, alpha=1 - self.alpha)
                        q.copy_(p)
        return loss

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        self.optimizer.add_param_group(param_group)
        if self.slow is not None:
            self._make_slow(self._params(), list(self.slow) + [
                p.detach() for p in self.optimizer.param_groups[-1]["params"]])

    @contextmanager
    def slow_weights(self):
        """Inside the block the parameters hold the slow weights; the fast ones come back after."""
        if self.slow is None:
            yield
            return
        params = self._params()
        with torch.no_grad():
            fast = [p.detach().clone() for p in params]
            for p, q in zip(params, self.slow):
                p.copy_(q)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, f in zip(params, fast):
                    p.copy_(f)

    def state_dict(self):
        return {
            "inner": self.optimizer.state_dict(),
            "k": self.k,
            "alpha": self.alpha,
            "step_count": self.step_count,
            "slow": None if self.slow is None else {i: q.clone() for i, q in enumerate(self.slow)},
        }

    def load_state_dict(self, state_dict):
        expected = {"inner", "k", "alpha", "step_count", "slow"}
        if set(state_dict) != expected:
            raise ValueError(f"state_dict keys {sorted(state_dict)} do not match the expected {sorted(expected)}")
        params = self._params()
        slow = state_dict["slow"]
        if slow is not None:
            if len(slow) != len(params):
                raise ValueError(f"state_dict has {len(slow)} slow weights for {len(params)} parameters")
            for i, p in enumerate(params):
                if slow[i].shape != p.shape:
                    raise ValueError(f"slow weight {i} has shape {tuple(slow[i].shape)}, its parameter "
                                     f"{tuple(p.shape)}")
        k, alpha, count = int(state_dict["k"]), float(state_dict["alpha"]), int(state_dict["step_count"])
        Lookahead(self.optimizer, k, alpha)  # checks k and alpha
        self.optimizer.load_state_dict(state_dict["inner"])
        self.k, self.alpha, self.step_count = k, alpha, count
        self.slow = self._flat_pairs = None
        if slow is not None:
            self._make_slow(params, [slow[i].detach().to(device=p.device, dtype=p.dtype)
                                     for i, p in enumerate(params)])

    def __repr__(self):
        return f"Lookahead({self.optimizer!r}, k={self.k}, alpha={self.alpha})"

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)
