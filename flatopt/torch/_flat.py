"""The flat layout under every flatopt.torch optimizer: parameters, gradients and state as
views of one flat buffer per (device, dtype) (a :class:`~flatopt.torch._bucket.Bucket` each),
``opt.state`` kept in step with them, and the step that checks what changed since the last one
and runs one core kernel per buffer."""
import functools
import inspect
import warnings
from collections import defaultdict
from itertools import chain
from operator import attrgetter, is_

import numpy as np
import torch

from flatopt.backend import Gather, GatherCut, aligned_zeros, backend_for, host_span, kernel_ran
from flatopt.torch._bucket import (Bucket, Pending, as_tensor, byte_spans, data_ptr, dense_strides, held_elsewhere,
                                   kept_elsewhere, refs_alone, starts_inside, unaliased)
from flatopt.torch._checks import (NP_DTYPES, check_betas_types, check_disjoint, check_flags,
                                   check_foreach_tensor_betas, check_foreach_tensors, check_fused_foreach,
                                   check_no_internal_overlap, check_param, check_tensor_lr, check_unique,
                                   moved_error, values_in_memory, values_not_in_memory)
from flatopt.torch._edits import Edits, ParamList, ParamState, State, unchanged
from flatopt.torch._hooks import global_hooks_or_profiler, increment_version, labelled_zero_grad, outside_dynamo

_grad_of = attrgetter("grad")
_SCALARS = frozenset((float, int, bool, type(None)))
_DUPLICATE_WARNING = "optimizer contains a parameter group with duplicate parameters"
PUBLIC = set()  # the classes flatopt.torch exports


def public(cls):
    """Marks a class flatopt.torch exports: reprs and pickles name it ``flatopt.torch.X``
    wherever it is defined, and its ``__init__`` holds the defaults of ``_complete_group``."""
    cls.__module__ = "flatopt.torch"
    PUBLIC.add(cls)
    return cls


@functools.lru_cache(maxsize=None)
def _cpu_kernels():
    """flatopt.kernels.cpu, imported at the first step (with Numba), not with flatopt.torch."""
    from flatopt.kernels import cpu
    return cpu


def _core_count(steps, i):
    """The count the core is to step parameter ``i`` from: one less than the step the next
    step takes, ``steps[i] + 1`` in the counts' dtype, as torch adds one to its
    ``state["step"]`` tensor before it reads it.  That is ``steps[i]``, but where a float32
    count stops growing (2^24: torch's bias corrections and ADOPT's clip stop changing there)."""
    return int(steps[i] + steps.dtype.type(1)) - 1


def _number(value):
    """A hyperparameter as the core takes it, read now: torch allows tensors (an lr, betas,
    also betas as one tensor of two) and a group may hold a list; both can be edited in place
    between steps."""
    if type(value) in _SCALARS:  # (first: a scheduler's lr at every step)
        return value
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else tuple(value.tolist())
    if isinstance(value, np.ndarray):  # (as torch takes them)
        return value.item() if value.size == 1 else tuple(value.tolist())
    if isinstance(value, (tuple, list)):  # (a namedtuple too)
        return tuple(map(_number, value))
    return value


def _volatile(value):
    """Whether a hyperparameter can change with no assignment to its group: a tensor, a NumPy
    array or a list (edited in place), also inside a tuple."""
    if type(value) in _SCALARS:
        return False
    return (isinstance(value, (torch.Tensor, np.ndarray, list))
            or (isinstance(value, tuple) and any(map(_volatile, value))))


def _same_objects(values, seen):
    """Whether every hyperparameter is the object it was.  Identity, not ``==``: a number
    replaced by a tensor of the same value compares equal to it (``==`` gives a one-element
    tensor, which is true) and would go unseen.  (What can change in place, a tensor, array or
    list, is read again at every step: ``_volatile``.)"""
    return seen is not None and len(values) == len(seen) and all(map(is_, chain.from_iterable(values),
                                                                     chain.from_iterable(seen)))


def _apart_from(values, at):
    return values[:at] + values[at + 1:]


def _reshaped_gradient(grad, shape):
    return RuntimeError(f"a gradient changed shape to {tuple(grad.shape)} (p.grad.data = ...); its parameter "
                        f"has shape {tuple(shape)}")


@functools.lru_cache(maxsize=None)
def _torch_defaults(cls):
    """The defaults of the flatopt.torch class's ``__init__`` that ``cls`` is or derives from:
    what torch's ``__setstate__`` fills into the groups of an older checkpoint that lacks a key."""
    exported = next(c for c in cls.__mro__ if c in PUBLIC)
    return {name: p.default for name, p in inspect.signature(exported.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


class FlatOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` over flat buffers: one :class:`Bucket` (and one core
    optimizer, ``_core_cls``) per (device, dtype).  A subclass gives torch's signature and
    the core class; everything else (layout, ``opt.state``, checkpoints, the step) is here."""
    _core_cls = None
    _step_in_state = True  # torch keeps state["step"] (not SGD)
    # From this many elements in a bucket on, a step after zero_grad() reads the new gradients
    # where autograd made them instead of copying them into the flat buffer first (below it
    # the per-tensor checks and chunk plan cost as much as the copy saves).
    _gather_min = 1 << 18
    # the group keys of every checkpoint of the optimizer (torch's __setstate__ fills in the others)
    _saved_keys = ("lr",)
    # torch's Adam and AdamW refuse tensor hyperparameters with foreach=True (its foreach path
    # cannot take them); flatopt's step could, but code written for both gets torch's error
    _foreach_refuses_tensors = False

    def __init__(self, params, defaults):
        """``defaults``: the group defaults in torch's order, the core's hyperparameters and
        torch's implementation flags (the subclasses take torch's signatures)."""
        core_args = inspect.signature(self._core_cls).parameters
        self._core_kwargs = {k: v for k, v in defaults.items() if k in core_args}
        foreach_refused = self._foreach_refuses_tensors and bool(defaults.get("foreach"))
        check_tensor_lr(defaults["lr"], foreach_refused)
        proto = self._core_cls(**self._core_kwargs)  # validates with torch's messages
        if "betas" in defaults:
            check_betas_types(defaults["betas"])
            if foreach_refused:
                check_foreach_tensor_betas(defaults["betas"])
            # kept as torch's Adam keeps them: a tuple, a tensor of one element squeezed to 0-d
            defaults = dict(defaults, betas=tuple(
                b.squeeze() if isinstance(b, torch.Tensor) and b.dim() != 0 else b for b in defaults["betas"]))
        hp = proto.hyperparameters()
        if callable(hp["lr"]):
            raise TypeError("flatopt.torch optimizers take a number as lr; use a torch lr_scheduler for schedules")
        # callables (ADOPT's clip_lambda) stay on the core: param_groups must stay picklable
        self._core_only = {k for k, v in hp.items() if callable(v) or k == "clip_lambda"}
        self._hp_names = tuple(k for k in proto.defaults if k not in self._core_only)
        defaults = {k: v for k, v in defaults.items() if k not in self._core_only}
        for k in self._hp_names:
            defaults.setdefault(k, hp[k])
        check_flags(defaults)
        self._init_runtime()
        self._building = True
        super().__init__(params, defaults)
        self._building = False
        check_fused_foreach(defaults)  # where torch checks it: after the params (nothing is laid out yet)
        self._rebuild()

    def _init_runtime(self):
        """What a pickled or copied optimizer makes anew (see ``__setstate__``)."""
        self._buckets = {}
        self._building = False
        self._grads_dropped = False  # zero_grad() set every .grad to None since the last step
        self._state_edits = Edits()
        self._state_seen = None  # the opt.state the last check saw
        self._group_edits = Edits()  # noted by the groups' params lists
        self._groups_seen = ()  # per group: its params list, as laid out

    # --- groups and layout ---------------------------------------------------------------
    # The methods a compiled training step calls are left alone by dynamo (outside_dynamo).
    @outside_dynamo
    def add_param_group(self, param_group):
        n_before = len(self.param_groups)
        with warnings.catch_warnings():  # a duplicate gets the error below instead
            warnings.filterwarnings("ignore", message=_DUPLICATE_WARNING)
            super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            group["params"] = ParamList(self._group_edits, group["params"])  # (torch's own copy: no one else holds it)
            for p in group["params"]:
                check_param(p)
            check_unique(group["params"])
            self._check_group(group)
            if not self._building:
                self._rebuild()  # checks the new layout before it changes anything
        except Exception:
            del self.param_groups[n_before:]
            raise

    def _check_group(self, group):
        core = self._core_cls(**self._core_kwargs)
        core._check(core._resolve({k: _number(group[k]) for k in self._hp_names}, 0))
        check_flags(group)

    def _groups_edited(self):
        """Whether a group's ``params`` list was edited or replaced, or a group was added or
        removed, since the layout was made: O(groups), and O(params) of the groups whose list
        a user assigned (see ``_note_groups``)."""
        seen = self._groups_seen
        groups = self.param_groups
        if self._group_edits.edited or len(groups) != len(seen):
            return True
        for group, (params, held) in zip(groups, seen):
            current = group["params"]
            if current is not params:
                return True
            if held is not None and (len(current) != len(held) or not all(map(is_, current, held))):
                return True
        return False

    def _take_edits(self):
        """Take in edits of ``param_groups``' lists and of ``opt.state`` made since the last step."""
        if self._groups_edited():
            self._rebuild()  # takes the state edits first
        else:
            self._take_state_edits()  # returns at once when there are none

    @torch.inference_mode(False)  # (an optimizer built under inference_mode makes buffers that train)
    def _rebuild(self):
        """(Re)lay every parameter out in flat buffers, keeping values, grads and state; the
        state of parameters new to the layout comes from ``opt.state`` if it has any (after
        ``copy.deepcopy``, or when a user put it there)."""
        old = self._buckets
        old_keys = {id(p): (key, n) for key, b in old.items() for p, n in zip(b.params, b.sizes)}
        order = defaultdict(list)
        for gi, group in enumerate(self.param_groups):  # every check before the first change
            for p in group["params"]:
                check_param(p)
                key, n = old_keys.get(id(p), (None, None))
                if key is not None and key != (p.device, p.dtype):
                    raise moved_error(p, *key)
                if n is not None and p.numel() != n:  # its state could not follow it
                    raise RuntimeError(f"a parameter changed shape to {tuple(p.shape)}; build a new optimizer")
                order[(p.device, p.dtype)].append((p, gi))
        params = [p for entries in order.values() for p, _ in entries]
        check_unique(params)
        check_disjoint(params)
        self._take_state_edits()  # into the old layout, before it goes
        ours = {id(inst) for b in old.values() for inst in b.installed if inst is not None}
        for p in params:  # the state put in opt.state for a parameter new to the layout: taken in below
            entries = dict.get(self.state, p)
            if isinstance(entries, dict) and id(entries) not in ours:
                self._check_entries(entries, p.numel(), "state['{name}']", RuntimeError)
        for group in self.param_groups:  # a list a user assigned stays theirs (torch reads it at every step)
            if not isinstance(group["params"], list):  # (a tuple, a generator: read once, into a list of ours)
                group["params"] = ParamList(self._group_edits, group["params"])
        buckets = {}
        for key, entries in order.items():
            buckets[key] = self._lay_out(key, entries, old.get(key))
        kept = {id(p) for b in buckets.values() for p in b.params}
        for b in old.values():  # parameters no longer optimized keep their state, as in torch: copies
            for p, inst in zip(b.params, b.installed):  # (of the old flat state), taken in again if they return
                if id(p) not in kept and inst is not None and dict.get(self.state, p) is inst:
                    dict.__setitem__(self.state, p, {k: v.clone() if isinstance(v, torch.Tensor) else v
                                                     for k, v in inst.items()})
        self._buckets = buckets
        for b in buckets.values():
            new = [(i, dict.get(self.state, p), None) for i, (p, inst) in enumerate(zip(b.params, b.installed))
                   if inst is None and dict.get(self.state, p)]
            if new:
                self._adopt(b, new)
        self._note_groups()
        self._refresh_state(force=True)

    def _note_groups(self):
        """Per group, its params list and, where the list is not one of ours (which note their
        edits), a copy of its contents, to compare with at every step: a list a user assigned
        (``group["params"] = their_list``) and may edit later, as torch sees such edits."""
        self._groups_seen = tuple(
            (g["params"], None if type(g["params"]) is ParamList and g["params"]._edits is self._group_edits
             else tuple(g["params"])) for g in self.param_groups)
        self._group_edits.edited = False

    def _lay_out(self, key, entries, prev):
        """One bucket over ``entries`` (``[(param, group_index)]``), taking values, grads and the
        state of the parameters ``prev`` (the old bucket of this key) had."""
        device, dtype = key
        core = prev.core if prev is not None else self._core_cls(**self._core_kwargs)
        b = Bucket(core, device, dtype)
        b.params = [p for p, _ in entries]
        b.groups = [gi for _, gi in entries]
        b.sizes = [p.numel() for p in b.params]
        b.offsets = np.concatenate([[0], np.cumsum(b.sizes)[:-1]]).astype(int).tolist()
        b.strides = [dense_strides(p.data) for p in b.params]
        b.shapes = [p.shape for p in b.params]  # (torch.Size: compared with a gradient's shape)
        total = sum(b.sizes)
        # The parameters move in one by one, each one's old memory freed as it goes (where
        # nothing else holds it), into a buffer whose pages the OS hands out as they are first
        # written: building the optimizer needs about one model's memory more, not two.  The
        # gradient buffer costs nothing until gradients arrive, as torch's own .grads; torch.zeros
        # would write all of it at once.  On the CPU both are NumPy's calloc'd zeros, which NumPy
        # asks the OS to back with huge pages from 4 MiB (torch's allocator does not): at 10^7
        # parameters a 200-tensor step ran 2-3% faster (three probes on an idle VM, 2026-11-27).
        if device.type == "cpu":
            b.flat, b.gflat = (torch.from_numpy(aligned_zeros(total, NP_DTYPES[dtype])) for _ in range(2))
        else:
            b.flat = torch.empty(total, dtype=dtype, device=device)
            b.gflat = torch.zeros(total, dtype=dtype, device=device)
        # torch's state["step"]: float32, or float64 where that is torch's default dtype (as torch
        # makes it: _get_scalar_dtype)
        b.steps = np.zeros(len(b.params), np.float64 if torch.get_default_dtype() == torch.float64 else np.float32)
        b.started = np.zeros(len(b.params), bool)
        b.installed = [None] * len(b.params)
        b.entries = [None] * len(b.params)
        old_index = {id(p): i for i, p in enumerate(prev.params)} if prev is not None else {}
        # host copies of the previous state (CUDA state too: the core's checkpoint format)
        old_state = prev.core.state_dict()["state"] if prev is not None else {}
        new_state = {name: np.zeros(total, NP_DTYPES[dtype]) for name in old_state}
        b.views = [b.shaped(b.flat, i) for i in range(len(b.params))]
        b.gviews = [b.shaped(b.gflat, i) for i in range(len(b.params))]
        with torch.no_grad():
            for i, (p, off, n) in enumerate(zip(b.params, b.offsets, b.sizes)):
                b.views[i].copy_(p.data)
                p.data = b.views[i]
                j = old_index.get(id(p))
                if j is not None:  # carried over from the previous layout
                    b.steps[i], b.started[i] = prev.steps[j], prev.started[j]
                    b.installed[i], b.entries[i] = prev.installed[j], prev.entries[j]
                    po = prev.offsets[j]
                    for name, buf in new_state.items():
                        buf[off:off + n] = old_state[name][po:po + n]
        b.read_addresses()
        b.offsets_np = np.array(b.offsets, dtype=np.int64)
        b.gather_cut = GatherCut()
        b.all_synced = ((True,) * len(b.params), None, None)  # _sync's answer when nothing changed
        b.replaced_at, b.replaced_by = [-2] * len(b.params), [None] * len(b.params)
        ours = set(map(id, prev.gviews)) if prev is not None else ()
        grads, alone = [p.grad for p in b.params], refs_alone()
        with torch.no_grad():
            for i, p in enumerate(b.params):
                grad = grads[i]  # (held as refs_alone holds its object: kept_elsewhere counts references)
                if grad is not None:
                    b.gviews[i].copy_(grad)
                    if id(grad) in ours or not kept_elsewhere(grad, alone):  # (else it stays the user's)
                        p.grad = b.gviews[i]
        if device.type != "cpu":  # CUDA: the core's state lives on the device too
            new_state = {k: torch.as_tensor(v, device=device) for k, v in new_state.items()}
        b.steps_t = torch.from_numpy(b.steps)
        self._install_state(b, new_state)
        return b

    def _install_state(self, b, state):
        core = b.core
        core.state = state
        # The state already lives on the parameters' device: naming its backend keeps the core
        # from placing (copying) it again, so the views in ``self.state`` stay valid.
        core._backend = backend_for(b.flat_np, b.gflat_np)
        core._state_key = core._state_args = None
        core.param_groups = None
        b.layout_key = b.core_groups_key = None

    # --- opt.state ------------------------------------------------------------------------
    def _own_names(self, b):
        return b.core.state_names + (("step",) if self._step_in_state else ())

    def _has_state(self, b, i):
        return b.steps[i] > 0 if self._step_in_state else b.started[i]

    def _refresh_state(self, force=False):
        """Point ``self.state[p]`` at views of the flat state, for the params that have state:
        torch's names, only the buffers their group uses (or used, or a loaded dict held: torch
        keeps them)."""
        for b in self._buckets.values():
            # The core rebuilds its list of state arguments whenever it (re)places a buffer.
            if not force and b.core._state_args is b.state_args:
                continue
            b.state_args = b.core._state_args
            tstate = {k: as_tensor(v, b.device) for k, v in b.core.state.items()}
            uses = [b.core._needs({k: _number(g[k]) for k in self._hp_names}) for g in self.param_groups]
            for i, p in enumerate(b.params):
                inst = b.installed[i]
                mine = inst is not None and dict.get(self.state, p) is inst
                if not self._has_state(b, i):
                    if mine:
                        dict.pop(self.state, p)
                    b.installed[i] = b.entries[i] = None
                    continue
                n = b.sizes[i]
                entries = {"step": b.steps_t[i]} if self._step_in_state else {}
                current = dict.get(self.state, p)
                # (a dict put in place of ours, loaded or copied, had its buffers adopted into the flat state)
                put = current if not mine and isinstance(current, dict) else {}
                for name in b.core.state_names:
                    if (name in uses[b.groups[i]] or (inst is not None and name in inst)
                            or put.get(name) is not None):
                        if name in tstate:
                            entries[name] = b.shaped(tstate[name], i)
                        elif n == 0:  # a bucket of zero-size params: no step allocated the buffer
                            entries[name] = p.detach().new_zeros(p.shape)
                own = self._own_names(b)
                # A user's entries stay, as in torch: those of the dict we installed, and those of
                # a dict put in its place, loaded or copied (its own entries are in the flat state now).
                extra = {k: v for k, v in current.items() if k not in own} if isinstance(current, dict) else {}
                if mine:  # the same dict, as torch keeps it: a reference to it stays current
                    dict.clear(inst)
                    dict.update(inst, entries)
                    dict.update(inst, extra)
                else:
                    inst = ParamState(self._state_edits, {**entries, **extra})  # (keys of any type)
                    dict.__setitem__(self.state, p, inst)
                b.installed[i], b.entries[i] = inst, entries

    def _take_state_edits(self):
        """Take in what was done to ``opt.state`` since the optimizer last wrote it: a parameter
        whose dict is gone, emptied or replaced restarts as torch's would (step 0, zero
        buffers, then whatever the new dict holds); an entry replaced in its dict is copied
        into the flat state."""
        state = self.state
        if state is self._state_seen and not self._state_edits.edited:
            return
        noted = self._state_edits  # (the flag the watched dicts set)
        if not isinstance(state, State) or state.default_factory is not noted:
            # reassigned (maybe another optimizer's, or a copy): watch the new one and its dicts
            self.state = state = State(noted, {
                k: v if type(v) is ParamState and v._edits is noted else
                ParamState(noted, v) if isinstance(v, dict) else v for k, v in state.items()})
        self._state_seen = state
        found = False
        for b in self._buckets.values():
            edits = []
            for i, p in enumerate(b.params):
                entries, inst = dict.get(state, p), b.installed[i]
                if inst is None and not entries:
                    continue  # still no state
                if entries is inst and unchanged(inst, b.entries[i], self._own_names(b)):
                    continue
                edits.append((i, entries, b.entries[i] if entries is inst else None))
            if edits:
                self._adopt(b, edits)
                found = True
        self._state_edits.edited = False  # (left set if an edit raised: the next step raises again)
        if found:
            self._refresh_state(force=True)

    def _adopt(self, b, edits):
        """Write torch-style state dicts into the flat state.  ``edits``: ``[(i, entries,
        installed)]``: the dict of ``b.params[i]`` (``None`` or empty: a fresh start) and, if it is
        the dict this optimizer installed, the entries it put there (those are in place)."""
        core = b.core
        wanted = set()
        for i, entries, _ in edits:  # every check before the first write
            self._check_entries(entries or {}, b.sizes[i], "state['{name}']", RuntimeError)
            wanted.update(name for name, value in (entries or {}).items()
                          if name in core.state_names and value is not None)
        missing = wanted - set(core.state)
        if missing:  # buffers no step has needed yet: zeros, next to the others
            state = dict(core.state)
            for name in missing:
                zeros = np.zeros(len(b.flat), NP_DTYPES[b.dtype])
                state[name] = zeros if b.device.type == "cpu" else torch.as_tensor(zeros, device=b.device)
            self._install_state(b, state)
        tstate = {k: as_tensor(v, b.device) for k, v in core.state.items()}
        memory = byte_spans(tstate.values())
        writes, counts = [], []
        with torch.no_grad():
            # Every source read first, cloned if it is a view of the flat state (state swapped
            # between parameters): a write must not change what a later one reads.
            for i, entries, installed in edits:
                entries, installed = entries or {}, installed or {}
                for name, buf in tstate.items():
                    value = entries.get(name)
                    if value is not None and value is installed.get(name):
                        continue  # this optimizer's own view, untouched
                    src = None if value is None else torch.as_tensor(value).detach().reshape(b.params[i].shape)
                    if src is not None:
                        src = unaliased([src], [src.data_ptr()], memory)[0]
                    writes.append((b.shaped(buf, i), src))
                if self._step_in_state:
                    step = entries.get("step")
                    counts.append((i, float(step) if step is not None else 0.0))
                else:  # SGD: torch starts a momentum buffer where there is none
                    counts.append((i, entries.get("momentum_buffer") is not None))
            for dst, src in writes:
                if src is None:
                    dst.zero_()
                else:
                    dst.copy_(src)
        for i, count in counts:
            if self._step_in_state:
                b.steps[i] = count
            else:
                b.started[i] = count
        b.layout_key = b.core_groups_key = None  # runs may split or merge; the core takes the new counts

    # --- the step --------------------------------------------------------------------------
    def _sync(self, b):
        """What the step takes in of replaced ``.data`` / ``.grad``: which params have a grad,
        where the gradients are read from (``None``: the flat gradient buffer; else a
        :class:`Gather` and the tensors it reads, to keep alive through the step), and a
        :class:`Pending` (``None``: nothing replaced): the values to copy into the flat views
        before the kernel (a replaced ``.data``'s once every check has passed), and the ``.data``
        and ``.grad`` to point at the views once the step is taken, so that a step refused after
        this leaves every tensor as it was, and the memory that other tensors may share with them.
        """
        params = b.params
        if (all(map(is_, map(_grad_of, params), b.gviews)) and list(map(data_ptr, params)) == b.ptrs
                and b.gflat.data_ptr() == b.memory[1][0] and b.gviews_intact()):
            return b.all_synced  # the common zero-copy case: nothing to pull in
        with torch.no_grad():
            if (b.flat.data_ptr(), b.gflat.data_ptr()) != (b.memory[0][0], b.memory[1][0]):
                b.read_addresses()  # the flat buffers' memory moved
            synced = self._pull_in(b, params, list(map(_grad_of, params)))
        b.note_gviews_intact()
        return synced

    def _pull_in(self, b, params, grads):
        dst, src, src_ptrs, repoint_data, repoint_grad = [], [], [], [], []
        active, moved_grads = [], []  # moved: (index, the param's new gradient view)
        views, gviews, ptrs, gptrs, strides, shapes = b.views, b.gviews, b.ptrs, b.gptrs, b.strides, b.shapes
        alone = refs_alone()  # (the count of a gradient or view held as g and gv are here, and nowhere else)
        # After zero_grad() (on the CPU) the new gradients are read where autograd made them,
        # unless one has other strides than its view, lies in this optimizer's own buffers, has
        # values that are not its memory's (values_in_memory) or has no memory: then it is
        # copied into its view first, as every replaced gradient is otherwise.
        may_gather = self._grads_dropped and b.device.type == "cpu" and len(b.flat_np) >= self._gather_min
        if may_gather:
            candidates = []  # (index, gradient, address)
        for i, p in enumerate(params):
            ptr = data_ptr(p)
            if ptr != ptrs[i]:
                view = views[i]
                if p.dtype != b.dtype or p.device != b.device:
                    raise moved_error(p, b.device, b.dtype)
                if p.data.shape != view.shape:
                    raise RuntimeError(f"a parameter changed shape to {tuple(p.data.shape)}; "
                                       "build a new optimizer")
                check_no_internal_overlap(p)
                dst.append(view)
                src.append(p.data)
                src_ptrs.append(ptr)
                repoint_data.append((p, view))
            g = grads[i]
            if g is None:
                active.append(False)
                continue
            gv = gviews[i]
            if g is gv and gv.data_ptr() != gptrs[i]:  # its memory was replaced (p.grad.data = t)
                if gv.shape != params[i].shape:
                    raise _reshaped_gradient(gv, params[i].shape)
                gv = b.shaped(b.gflat, i)  # a view in the flat buffer again, the values copied in
                dst.append(gv)
                src.append(g)
                src_ptrs.append(g.data_ptr())
                moved_grads.append((i, gv))
                active.append(True)
                continue
            if g is not gv:
                if held_elsewhere(gv, alone):  # (kept by a user across zero_grad: torch never writes it again)
                    gv = b.release_gview(i)
                try:
                    gptr = data_ptr(g)
                except RuntimeError:  # (a sparse tensor has no memory of its own to point at)
                    if g.is_sparse:
                        raise RuntimeError("flatopt.torch does not support sparse gradients") from None
                    raise
                # Pointed at its view after the step, so that backward accumulates into the flat
                # buffer from then on: not where zero_grad() dropped the gradients since the last
                # step (the next one drops these too, and pointing 200 .grads at their views costs
                # a quarter of such a step); nor where the user keeps the gradient tensor, which
                # stays theirs (asked before the lists below hold it too); nor where another
                # tensor replaced it at the step before (gradients given anew at every step: a
                # view would not outlive the step, and the question costs half a microsecond).
                take_over = False
                if not self._grads_dropped:
                    anew = b.replaced_at[i] == b.steps_taken - 1 and b.replaced_by[i] != id(g)
                    b.replaced_at[i], b.replaced_by[i] = b.steps_taken, id(g)
                    if anew or kept_elsewhere(g, alone):
                        if g.shape != shapes[i]:  # (its .data replaced: a copy would broadcast it)
                            raise _reshaped_gradient(g, shapes[i])
                    else:
                        take_over = True
                # Its layout is read only where it may stay where it lies: at its view's address,
                # or gathered.  (A copy takes any strides: the common case reads none.)  The kernel
                # reads memory: a tensor whose values are not its memory's (torch's negative view,
                # a subclass that computes them in __torch_dispatch__) is copied, which resolves
                # it; one with no memory (a ZeroTensor's address is 0) too.
                if gptr == gptrs[i]:
                    copy = not (g.stride() == strides[i] and g.shape == shapes[i] and values_in_memory(g))
                elif may_gather and gptr and g.stride() == strides[i] and g.shape == shapes[i] and g.dtype is b.dtype \
                        and g.is_cpu:  # (whether its values are its memory's: asked of all candidates at once)
                    candidates.append((i, g, gptr))
                    copy = False
                else:
                    copy = True
                if copy:
                    dst.append(gv)
                    src.append(g)
                    src_ptrs.append(gptr)
                if take_over:
                    repoint_grad.append((p, gv))
            active.append(True)
        if may_gather:
            addresses, kept = list(gptrs), []
            memory = b.memory + [host_span(a) for a in b.core.state.values()]
            copies = starts_inside([ptr for _, _, ptr in candidates], memory).tolist()
            odd = values_not_in_memory([g for _, g, _ in candidates])
            if odd is not None:
                copies = [copy or not_values for copy, not_values in zip(copies, odd)]
            for (i, g, gptr), copy in zip(candidates, copies):
                if copy:  # in this optimizer's own buffers, which the step writes, or not values of its memory
                    dst.append(gviews[i])
                    src.append(g)
                    src_ptrs.append(gptr)
                else:
                    addresses[i] = gptr
                    kept.append(g)
        pending = None
        if dst or repoint_data or repoint_grad or moved_grads:
            pending = Pending(dst, unaliased(src, src_ptrs, b.memory), repoint_data, repoint_grad, moved_grads)
        if may_gather and kept:
            gather = Gather(b.offsets_np, np.array(addresses, dtype=np.int64), b.gather_cut)
            return tuple(active), (gather, kept), pending
        return tuple(active), None, pending

    def _layout(self, b, active):
        """The core's runs: maximal runs of neighbouring params with a grad, one torch group,
        one step count (and for SGD one momentum state): ``[(group_index, start, stop, first,
        last)]``; and the spans whose step counts advance, ``[(group_index, first, last)]``: the
        runs' and each zero-size param's with a grad (torch counts its steps; the core has no
        element of it)."""
        runs, spans, cur = [], [], None
        for i, a in enumerate(active):
            if not a:
                cur = None
                continue
            if b.sizes[i] == 0:
                spans.append((b.groups[i], i, i + 1))
                cur = None  # a run continued past it would count its step a second time
                continue
            key = (b.groups[i], float(b.steps[i]) if self._step_in_state else 0.0, bool(b.started[i]))
            if cur is not None and cur[0] == key:
                cur[2] = b.offsets[i] + b.sizes[i]
                cur[4] = i + 1
            else:
                cur = [key, b.offsets[i], b.offsets[i] + b.sizes[i], i, i + 1]
                runs.append(cur)
        runs = [(k[0], s, e, i0, i1) for k, s, e, i0, i1 in runs]
        return runs, [(gi, i0, i1) for gi, _, _, i0, i1 in runs] + spans

    @outside_dynamo
    def step(self, *args, **kwargs):
        """``step(closure=None)``: one flatopt kernel per (device, dtype) bucket.

        torch wraps every optimizer's ``step`` in its hook and profiler machinery, which costs
        as much as the rest of the step on a small model; this step runs it itself, only when
        a step hook is registered or a profiler is recording (and not when a subclass overrides
        ``step``: torch wraps that override, which calls this one).
        """
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or global_hooks_or_profiler()) \
                and type(self).step is FlatOptimizer.step:
            return self._step_with_hooks(*args, **kwargs)
        return self._step(*args, **kwargs)

    step.hooked = True  # tells torch.optim.Optimizer not to wrap it again

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._take_edits()  # edits of opt.state or of a group's params list: O(groups) to notice
        buckets = self._buckets.values()
        if len(buckets) > 1:  # every bucket's checks (shapes, dtypes, hyperparameters) before the first update
            synced = [self._sync(b) for b in buckets]
            runs = [self._configure(b, active) for b, (active, _, _) in zip(buckets, synced)]
            for b, bucket_runs in zip(buckets, runs):
                if bucket_runs:
                    b.core._check_step(len(b.flat_np))
            for _, _, pending in synced:
                if pending is not None:
                    pending.copy_in()
            for b, bucket_runs, (_, gather, pending) in zip(buckets, runs, synced):
                self._step_bucket(b, bucket_runs, gather, pending)
        else:  # (without the list: a step of a small model is mostly Python)
            for b in buckets:
                active, gather, pending = self._sync(b)
                bucket_runs = self._configure(b, active)
                if pending is not None:
                    # A replaced .data is copied into memory that its old tensor may share: after
                    # every check (the core's run in its step).  Gradients go into views no one holds.
                    if pending.data and bucket_runs:
                        b.core._check_step(len(b.flat_np))
                    pending.copy_in()
                self._step_bucket(b, bucket_runs, gather, pending)
        self._grads_dropped = False
        return loss

    _step_with_hooks = torch.optim.Optimizer.profile_hook_step(_step)

    def _configure(self, b, active):
        """The bucket's runs for this step's ``active`` params, handed to its core with their
        groups' hyperparameters where they changed; returns the runs."""
        if active is not b.layout_key and active != b.layout_key:
            runs, b.spans = self._layout(b, active)
            b.stepped = [p for p, a in zip(b.params, active) if a]
            b.span_bounds = np.array([(i0, i1) for _, i0, i1 in b.spans], np.int64).reshape(-1, 2)
            if runs != b.runs:  # (the same runs after a first step: the core's counts advanced with them)
                b.runs, b.core_groups_key = runs, None
            b.layout_key = active
        runs = b.runs
        if runs:
            pg, names = self.param_groups, self._hp_names
            values = [tuple(map(pg[run[0]].__getitem__, names)) for run in runs]
            if (b.volatile or b.core_groups_key is None or not _same_objects(values, b.group_values)) \
                    and not self._took_new_lrs(b, values):
                if self._foreach_refuses_tensors:  # (torch: at a step, in groups with gradients)
                    for gi, *_ in runs:
                        check_foreach_tensors(pg[gi])
                hps = [tuple(map(_number, v)) for v in values]
                if hps != b.core_groups_key:
                    at, old = names.index("lr"), b.core_groups_key
                    if old is not None and len(old) == len(hps) and all(
                            _apart_from(new, at) == _apart_from(was, at) for new, was in zip(hps, old)):
                        self._hand_lrs(b, [hp[at] for hp in hps])
                    else:
                        self._configure_core(b, runs, hps)
                    b.core_groups_key = hps
                b.group_values = values
                b.volatile = any(map(_volatile, chain.from_iterable(values)))
        return runs

    def _took_new_lrs(self, b, values):
        """Where the runs' groups hold the objects they held at the last step but for their lrs,
        each now a number (a scheduler's step), hands the core the new lrs; ``False`` where
        anything else changed."""
        seen, at = b.group_values, self._hp_names.index("lr")
        if b.volatile or b.core_groups_key is None or seen is None or len(seen) != len(values):
            return False
        for new, was in zip(values, seen):
            if type(new[at]) not in _SCALARS or not all(map(is_, _apart_from(new, at), _apart_from(was, at))):
                return False
        lrs = [v[at] for v in values]
        self._hand_lrs(b, lrs)
        b.core_groups_key = [hp[:at] + (lr,) + hp[at + 1:] for hp, lr in zip(b.core_groups_key, lrs)]
        b.group_values = values
        return True

    def _hand_lrs(self, b, lrs):
        """The core's prepared step takes new lrs as they are (see ``Optimizer._ready_rows``)."""
        core = b.core
        if core.param_groups is None:
            core.lr = lrs[0]
        else:
            for group, lr in zip(core.param_groups, lrs):
                group["lr"] = lr

    def _step_bucket(self, b, runs, gather=None, pending=None):
        if runs:
            try:
                # (``gather``: a Gather, and the gradient tensors it reads, alive until the step is done)
                b.core.step(b.flat_np, b.gflat_np, None if gather is None else gather[0])
            except KeyboardInterrupt as interrupt:  # (a Ctrl-C during the kernel: the step is taken)
                if kernel_ran(interrupt):
                    self._stepped(b, runs, pending)
                raise
        self._stepped(b, runs, pending)

    def _stepped(self, b, runs, pending=None):
        """What follows the kernel: the tensors :meth:`_sync` copied from pointed at their views,
        the parameters' version counters, the step counts and the state entries."""
        b.steps_taken += 1
        if pending is not None:
            pending.repoint(b)
        # The kernel wrote the parameters behind autograd's back: their version counters go up, as
        # torch's in-place step bumps them, so that a backward through a graph that saved them
        # before the step fails as in torch instead of using the new values.  (One call; 0.1-0.2 µs a tensor)
        increment_version(b.stepped)
        kernels = _cpu_kernels()
        counted = kernels.advance_counts(b.steps, b.span_bounds)  # (the spans' step counts: one call)
        newly = counted & kernels.COUNT_STARTED
        if counted & kernels.COUNT_STUCK and runs:
            for state, (_, _, _, i0, _) in zip(b.core.group_state, runs):  # (see _core_count)
                state["step"] = _core_count(b.steps, i0)
        if not self._step_in_state:  # SGD: a momentum buffer starts with the first step that has momentum
            pg = self.param_groups
            for gi, i0, i1 in b.spans:
                if not b.started.item(i0) and pg[gi]["momentum"] != 0:
                    b.started[i0:i1] = True
                    newly = True
        if newly:  # new state entries; SGD runs may have split or merged
            b.layout_key = None
        self._refresh_state(force=newly)

    def _configure_core(self, b, runs, hps):
        """Hand the runs to the core as its param groups, each with its torch group's
        hyperparameters and its step count; the core advances those counts itself, in step
        with ``b.steps``, until the runs or a hyperparameter other than the lr change."""
        core, names = b.core, self._hp_names
        groups = core.param_groups
        # (Where the runs are the core's groups already, only their hyperparameters change: an
        # assignment of groups would drop the core's chunks, and the cut of gathered gradients
        # with them, at every step of a schedule of betas.)
        if len(runs) == 1 and runs[0][1] == 0 and runs[0][2] == len(b.flat_np):
            # The whole buffer is one run (the common case): the core's groupless path,
            # which validates the hyperparameters once and then only computes each step's scalars.
            if groups is not None:
                core.param_groups = None
            for name, value in zip(names, hps[0]):
                setattr(core, name, value)
        elif groups is not None and [(g["start"], g["stop"]) for g in groups] == [(s, e) for _, s, e, _, _ in runs]:
            for group, hp in zip(groups, hps):
                group.update(zip(names, hp))
        else:
            core.param_groups = [dict(zip(names, hp), start=s, stop=e) for hp, (_, s, e, _, _) in zip(hps, runs)]
        proto = core._new_group_state()
        states = []
        for _, _, _, i0, _ in runs:
            state = dict(proto, step=_core_count(b.steps, i0))
            if "momentum_started" in state:
                state["momentum_started"] = bool(b.started[i0])
            states.append(state)
        core.group_state = states

    # --- zero_grad ---------------------------------------------------------------------
    @outside_dynamo
    @labelled_zero_grad
    def zero_grad(self, set_to_none=True):
        """``True`` (torch's default): every ``.grad`` becomes None (the flat gradient buffer
        is kept).  ``False``: one ``zero_()`` over each flat gradient buffer; other gradient
        tensors are zeroed as torch does; ``None`` gradients stay ``None``."""
        if self._groups_edited():  # torch zeroes the grads of the params the groups list now
            self._rebuild()
        if set_to_none:
            for b in self._buckets.values():
                for p in b.params:
                    p.grad = None
            self._grads_dropped = True
            return
        for b in self._buckets.values():
            intact = b.gviews_intact()
            apart = [i for i, (p, gv, ptr) in enumerate(zip(b.params, b.gviews, b.gptrs))
                     if p.grad is not gv or not intact and gv.data_ptr() != ptr]
            if apart:
                alone = refs_alone()
                for i in apart:
                    gv = b.gviews[i]
                    # a view the user kept when its .grad was dropped or replaced: torch zeroes
                    # only the .grads, so it keeps its values (memory of its own, see release_gview)
                    if b.params[i].grad is not gv and held_elsewhere(gv, alone):
                        b.release_gview(i)
            b.gflat.zero_()
            for i in apart:
                g = b.params[i].grad
                if g is not None:
                    if g.grad_fn is not None:
                        g.detach_()
                    else:
                        g.requires_grad_(False)
                    g.zero_()

    # --- checkpoints, pickling ---------------------------------------------------------------
    @outside_dynamo
    def state_dict(self):
        """torch's layout; every state tensor a compact copy (views would pickle whole buffers)."""
        self._take_edits()
        sd = super().state_dict()
        state = sd.get("state") if isinstance(sd, dict) else None
        if isinstance(state, dict):  # a post hook may have added entries of its own: copy tensors only
            sd["state"] = {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in st.items()}
                           if isinstance(st, dict) else st for k, st in state.items()}
        return sd

    @outside_dynamo
    def load_state_dict(self, state_dict):
        self._take_edits()  # torch checks the state_dict against the groups as they are now
        # torch's load: the load pre-hooks, its checks, then __setstate__, which checks the groups
        # and the state's sizes before it replaces anything
        super().load_state_dict(state_dict)
        loaded = self.state  # every entry stays, as in torch; the optimizer's own go to the flat state below
        self.state = self._state_seen = State(self._state_edits, {
            k: ParamState(self._state_edits, v) if isinstance(k, torch.Tensor) and isinstance(v, dict) else v
            for k, v in loaded.items()})
        self._state_edits.edited = False
        index = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        for b in self._buckets.values():
            b.groups = [index[id(p)] for p in b.params]
            b.steps[:] = 0
            b.started[:] = False
            b.installed = [None] * len(b.params)
            b.entries = [None] * len(b.params)
            self._install_state(b, {})
            edits = [(i, dict.get(loaded, p), None) for i, p in enumerate(b.params) if dict.get(loaded, p)]
            if edits:
                self._adopt(b, edits)
        self._note_groups()
        self._refresh_state(force=True)

    def _check_loaded_sizes(self, state, groups):
        """Each loaded state tensor fits its parameter (torch would load any): ``state`` and
        ``groups`` as torch's load hands them to ``__setstate__``, keyed by the parameters,
        checked before anything changes.  Parameters are named by their place in the groups,
        as torch's state_dict numbers them."""
        index = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in groups))}
        for p, entries in state.items():
            if id(p) in index and isinstance(entries, dict):
                self._check_entries(entries, p.numel(), f"loaded state '{{name}}' of parameter {index[id(p)]}",
                                    ValueError)

    def _check_entries(self, entries, size, where, error):
        """Refuses a torch-style state dict (``entries``, of a parameter of ``size`` elements)
        that the flat state cannot take in: a buffer of another size or not of numbers, a
        ``step`` that is not one number.  (torch loads anything, and fails at the next step.)
        ``where``: the entry's name in the error, a format of ``name``."""
        names = self._core_cls.state_names
        for name, value in entries.items():
            if value is None or not (name in names or name == "step" and self._step_in_state):
                continue  # (entries of other names stay in opt.state, as in torch)
            try:
                values = torch.as_tensor(value)
            except Exception:
                raise error(f"{where.format(name=name)} is {type(value).__name__} {value!r}, not "
                            + ("a number" if name == "step" else "a tensor of numbers")) from None
            if name == "step" and values.numel() != 1:
                raise error(f"{where.format(name=name)} has {values.numel()} elements, not 1")
            if name in names and values.numel() != size:
                raise error(f"{where.format(name=name)} has {values.numel()} elements, its parameter {size}")

    def __getstate__(self):
        """pickle and ``copy.deepcopy``: torch's (defaults, state, param_groups) as plain dicts and
        lists, and the core's settings; the copy lays its own parameters out anew."""
        state = super().__getstate__()
        state["state"] = defaultdict(dict, {k: dict(v) if isinstance(v, dict) else v for k, v in self.state.items()})
        state["param_groups"] = [dict(g, params=list(g["params"])) for g in self.param_groups]
        state["_flatopt"] = dict(core_kwargs=self._core_kwargs, core_only=self._core_only, hp_names=self._hp_names)
        return state

    def __setstate__(self, state):
        """Unpickling, and torch's ``load_state_dict`` (which passes the new groups and state):
        as torch, fills the group keys an older checkpoint lacks with the defaults; checks the
        groups before anything changes."""
        state = dict(state)
        config = state.pop("_flatopt", None)
        if config is not None:  # unpickled or copied
            self._core_kwargs, self._core_only, self._hp_names = (
                config["core_kwargs"], config["core_only"], config["hp_names"])
        for group in state["param_groups"]:
            self._complete_group(group)
            self._check_group(group)
        if config is None:  # torch's load_state_dict
            self._check_loaded_sizes(state["state"], state["param_groups"])
        super().__setstate__(state)
        if config is not None:  # lay the copy's own parameters out, with their state
            self._init_runtime()
            for group in self.param_groups:  # (the copy's own lists: see __getstate__)
                group["params"] = ParamList(self._group_edits, group["params"])
            self._rebuild()

    def _complete_group(self, group):
        """What torch's ``__setstate__`` does to a group of an older checkpoint: each missing key
        gets its default.  A group without one of the keys every checkpoint of this optimizer
        holds is another optimizer's: refused here, where torch would fail at the next step."""
        missing = [name for name in self._saved_keys if name not in group]
        if missing:
            raise ValueError(f"a loaded param group has no {', '.join(map(repr, missing))}, which every "
                             f"{type(self).__name__} checkpoint holds ({', '.join(self._saved_keys)}): "
                             "is it another optimizer's state_dict?")
        for name, value in _torch_defaults(type(self)).items():
            if name != "lr" and name not in self._core_only:
                group.setdefault(name, value)
