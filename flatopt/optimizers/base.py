"""What every flat-buffer optimizer shares: hyperparameters, parameter groups, lazily
allocated state, checkpoints and the validate-then-launch ``step``.

A subclass supplies the math's inputs only:

* ``kernel``: the kernel's name in each backend (``flatopt.kernels``);
* ``state_names``: the flat state buffers, in the kernel's argument order;
* ``_check(hp)``: torch.optim's hyperparameter checks and messages;
* ``_row(hp, group_state, dt)``: one segment's scalars for this step, in the kernel's row
  order, as Python numbers: the backend's table rounds them to the buffers' dtype once,
  as torch rounds Python scalars (``dt`` is that dtype's scalar type, for the rare value
  torch computes in the buffers' dtype);
* ``_needs(hp)``: which state buffers a group with these hyperparameters uses;
* ``_set_step_entries(row, hp, group_state)``: writes the row entries that change from one
  step to the next (bias corrections, first-step flags); the ``_row`` of an optimizer with
  such entries calls it, and between two steps with unchanged hyperparameters it is all that
  runs in Python;
* ``_set_lr_entries(row, hp)``: writes every other row entry that depends on ``lr``; ``_row``
  calls it, and so does a step whose lr changed (a schedule's, every step) while the other
  hyperparameters stayed as they were.
"""
import functools
import math
import numbers
import weakref
from operator import is_

import numpy as np

from flatopt.backend import CPU, SUPPORTED_DTYPES, backend_for, check_fits, check_gather, host_array, kernel_ran

GROUP_KEYS = ("start", "stop", "frozen")


class Optimizer:
    kernel = None
    state_names = ()
    defaults = {}

    def __init__(self, param_groups=None, **hyperparameters):
        self.__dict__.update((name, _plain(value, name)) for name, value in hyperparameters.items())
        self._check(self._resolve(None, 0))
        self.param_groups = param_groups
        self.state = {}
        self.__dict__.update(_unplaced())

    def __setattr__(self, name, value):
        # Hyperparameters become Python scalars: a NumPy float32 lr would make the scalar
        # arithmetic of the step (e.g. lr / (1 - beta1**t)) run in float32, not in double as torch's.
        if name == "state":
            value = _StateBuffers(self, value)
        object.__setattr__(self, name, _plain(value, name) if name in self.defaults else value)
        # Whatever else changed (hyperparameters, groups, state, group_state), the next step
        # validates and prepares everything again; a new lr (as a schedule sets one every
        # step) is checked and written into the step's scalars by the steps that follow.
        if name != "lr":
            self.__dict__["_ready"] = None
        if name == "state":
            self._state_replaced()

    def _state_replaced(self):
        """The state buffers were assigned, replaced or removed: the next step checks them and
        copies them next to the parameters, as after ``load_state_dict``."""
        self.__dict__.update(_backend=None, _ready=None, _state_key=None, _state_args=None)

    # --- hyperparameters and groups -------------------------------------------------
    def hyperparameters(self):
        """The optimizer-wide hyperparameters, as given (``lr`` may be a callable)."""
        return {name: getattr(self, name) for name in self.defaults}

    def _resolve(self, group, step):
        """Effective hyperparameters of ``group`` (``None``: the defaults) at ``step``."""
        hp = {name: self.__dict__[name] for name in self.defaults}
        if group is not None:  # a group dict may have been edited in place since it was checked
            hp.update((k, _plain(v, k)) for k, v in group.items() if k in hp)
        hp["lr"] = _lr_at(hp["lr"], step)
        return hp

    @property
    def param_groups(self):
        """Contiguous segments of the flat buffer, each a dict with ``start``, ``stop``,
        optional per-group hyperparameters and ``frozen``.  ``None``: the whole buffer is
        one group, created at the first step.  Elements outside every group are left alone.
        """
        return self._groups

    @param_groups.setter
    def param_groups(self, groups):
        old, old_groups = getattr(self, "group_state", None), getattr(self, "_groups", None)
        if groups is None:
            # One group over the whole buffer: it keeps the groups' count if they all had one.
            same = bool(old) and all(s == old[0] for s in old)
            self._groups, self.group_state = None, [dict(old[0]) if same else self._new_group_state()]
            self._planned = None
            return
        groups = [self._checked_group(i, g) for i, g in enumerate(groups)]
        _check_ranges(groups)
        group_state = [dict(old and _continued(i, g, old, old_groups, len(groups)) or self._new_group_state())
                       for i, g in enumerate(groups)]
        self._groups, self.group_state = groups, group_state
        self._planned = None

    def _checked_group(self, i, group):
        if not isinstance(group, dict):
            raise TypeError(f"param group {i} must be a dict, got {type(group).__name__}")
        unknown = set(group) - self._group_keys()
        if unknown:
            raise ValueError(f"param group {i} has unknown keys {sorted(unknown)}; allowed: "
                             f"{sorted(set(GROUP_KEYS) | set(self.defaults))}")
        _check_range(i, group)
        group = {k: _plain(v, k) if k in self.defaults else v for k, v in group.items()}
        group.setdefault("frozen", False)
        self._check(self._resolve(group, 0))
        return group

    def _group_keys(self):
        return frozenset(GROUP_KEYS) | self.defaults.keys()

    def _new_group_state(self):
        return {"step": 0}

    def _check_group_state(self, group_state):
        """A step count (and flags) the step can advance: checked before the kernel runs."""
        step = group_state.get("step") if isinstance(group_state, dict) else None
        if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
            raise ValueError(f"group_state entries need an int step >= 0, got {group_state!r}")

    def _groups_for(self, n):
        if self._groups is None:
            return ({"start": 0, "stop": n, "frozen": False},)
        # The group dicts (and the list) can be edited in place: check the ranges every step.
        if len(self._groups) != len(self.group_state):
            raise ValueError(f"param_groups has {len(self._groups)} groups but the optimizer keeps step counts "
                             f"for {len(self.group_state)}; assign opt.param_groups = [...] to change the groups")
        stop, allowed = 0, self._group_keys()
        for i, group in enumerate(self._groups):
            start = group.get("start")
            if not (type(start) is int and type(group.get("stop")) is int and stop <= start < group["stop"]
                    and group.keys() <= allowed):
                self._checked_group(i, group)  # says what is wrong
                _check_ranges(self._groups)
            stop = group["stop"]
        check_reach(self._groups[-1]["stop"] if self._groups else 0, n)
        return self._groups

    # --- the step -----------------------------------------------------------------------
    def step(self, params, grads, _gather=None):
        """One update of ``params`` in place from ``grads``: a single kernel launch.

        Everything is validated first; on any error nothing has been modified.  ``_gather``
        (flatopt.torch's and TreeOptimizer's, host buffers only): a
        :class:`flatopt.backend.Gather` whose buffers hold the gradients; ``grads`` is then
        checked but not read.
        """
        backend = CPU if type(params) is np.ndarray and type(grads) is np.ndarray else backend_for(params, grads)
        backend.check(params, grads)
        n = len(params) if backend is CPU else backend.length(params)  # (a CUDA exporter need not define len)
        dtype = backend.dtype(params)  # a NumPy dtype, also for torch tensors
        ready = self._ready
        if ready is not None and ready.backend is backend and ready.n == n and ready.dtype == dtype:
            solo = ready.solo
            if solo is not None and self.__dict__["lr"] is solo.lr_source and len(self.group_state) == 1:
                # The common case: one group over the whole buffer, its lr the one checked.  Only
                # the entries that depend on the step are new.  (_Ready.step, written out: at 10^3
                # elements a call more is 2% of the step.)
                group_state = self.group_state[0]
                step = group_state.get("step") if type(group_state) is dict else None
                if type(step) is not int or step < 0:  # edited in place since
                    self._check_group_state(group_state)
                try:
                    self._set_step_entries(solo.row, solo.hp, group_state)  # rounded as a full table build rounds
                except KeyError:  # an entry removed since
                    self._check_group_state(group_state)  # says which
                    raise
                try:
                    if _gather is None:
                        ready.launch(params, grads, ready.table)
                    else:  # (a launcher of a backend that cannot gather refuses it: see check_gather)
                        ready.launch(params, grads, ready.table, _gather)
                except KeyboardInterrupt as interrupt:  # (a Ctrl-C during the kernel: the step is taken)
                    if kernel_ran(interrupt):
                        self._advance(solo.hp, group_state)
                    raise
                self._advance(solo.hp, group_state)
                return
            rows = self._ready_rows(ready)
            if rows is not None:
                ready.step(self, rows, params, grads, _gather)
                return
        if self.state:
            unknown = self.state.keys() - set(self.state_names)
            if unknown:
                raise ValueError(f"optimizer state has unknown buffers {sorted(unknown)}; "
                                 f"{type(self).__name__} keeps {list(self.state_names)}")
            self._check_state_fits(backend, params, n, dtype)
        active, segments = self._active(n)
        if not active:
            return
        rows = [self._row(hp, self._stepping_from(group_state), dtype.type) for group_state, hp in active]
        table = self._table(backend, dtype, rows)  # converting the scalars is the last thing that can fail
        if _gather is not None:
            check_gather(backend)
        plan = planned_for(self, backend, segments)  # (a plan can be refused: NUMBA_DISABLE_JIT)
        # Nothing above modified anything; from here on the step happens.
        states = self._states(backend, n, dtype, active)
        try:
            if _gather is None:
                backend.launch(self.kernel, params, grads, states, plan, table)
            else:
                backend.launch(self.kernel, params, grads, states, plan, table, _gather)
        except KeyboardInterrupt as interrupt:  # (a Ctrl-C during the kernel: the step is taken)
            if kernel_ran(interrupt):
                for group_state, hp in active:
                    self._advance(hp, group_state)
            raise
        for group_state, hp in active:
            self._advance(hp, group_state)
        # The next steps reuse all of this until an attribute other than lr is assigned
        # (__setattr__) or a group is edited in another way than its lr (_ready_rows); not where
        # a group holds a value that can change in place (an array, a list), which only the full
        # step reads again at every step.
        groups = self._groups
        if groups is not None and not all(map(_fixed, (v for g in groups for v in g.values()))):
            self.__dict__["_ready"] = None
            return
        table = backend.table(rows, dtype)  # the ready path's own: it writes into it
        launch = backend.launcher(self.kernel, plan, dtype, states)
        indices = [0] if groups is None else [i for i, g in enumerate(groups) if not g.get("frozen", False)]
        self.__dict__["_ready"] = _Ready(self, backend, n, dtype, launch, table, active, indices)

    def _ready_rows(self, ready):
        """A step on what ``ready`` holds: its rows, each with the hyperparameters and group
        state the step uses, after every check of the full step; ``None`` where a group was
        edited in another way than its lr since (the full step then runs).

        Between two steps only three things can change without an assignment that drops
        ``ready``: the group states (edited in place: checked here as ``_active`` checks them),
        the groups (edited in place: compared with what was checked, object by object) and the
        lr (a schedule's value, a number assigned, or a group's lr edited): the lr is resolved
        and checked again wherever it is another object than the one checked."""
        groups, states, top_lr = self._groups, self.group_state, self.__dict__["lr"]
        if len(states) != ready.n_states or (groups is None) != (ready.groups is None):
            return None
        if groups is not None:
            if not (len(groups) == len(ready.groups) and all(map(is_, groups, ready.groups))):
                return None
            for i, (group, keys, values) in enumerate(zip(groups, ready.keys, ready.values)):
                if len(group) == len(values) and all(map(is_, group, keys)) and all(map(is_, group.values(), values)):
                    continue
                lr_only = tuple(group) == keys and all(
                    v is w or k == "lr" for k, v, w in zip(keys, group.values(), values))
                if not (lr_only and _fixed(group["lr"])):
                    return None
                ready.values[i] = tuple(group.values())  # only its lr: resolved below
        for group_state in states:
            if type(group_state) is not dict or type(group_state.get("step")) is not int or group_state["step"] < 0:
                self._check_group_state(group_state)  # refuses what the full step refuses
        rows = []
        for entry in ready.rows:
            group = None if groups is None else groups[entry.index]
            source = group["lr"] if group is not None and "lr" in group else top_lr
            group_state = states[entry.index]
            hp = entry.hp
            if source is not entry.lr_source or callable(source):
                hp = self._with_lr(hp, source, group_state["step"])
            rows.append((entry, hp, source, group_state))
        return rows

    def _check_step(self, n):
        """Refuses what a step on ``n`` elements would refuse before it changes anything, and
        changes nothing a step reads (flatopt.torch checks every buffer's step before the first
        one runs).  It may note in the prepared step that a group's only edit is its lr: the
        step resolves and checks that lr all the same, its source being another object than
        the one checked."""
        ready = self._ready
        if ready is None or ready.n != n or self._ready_rows(ready) is None:
            self._active(n)

    def _with_lr(self, hp, lr, step):
        """``hp`` with ``lr`` (a number, or a schedule of the step count) resolved in it and
        checked, as the full step's ``_resolve`` and ``_check`` do."""
        hp = dict(hp, lr=_plain(_lr_at(lr, step), "lr"))  # (a group's lr may be edited in unconverted)
        self._check(hp)
        return hp

    def _active(self, n):
        """The groups this step updates, checked: ``[(group_state, hp)]``, and their segments of
        the buffer, ``((start, stop, row), ...)`` (``row`` indexes the first list); both empty
        when every group is frozen."""
        for group_state in self.group_state:
            self._check_group_state(group_state)
        if self._groups is None:  # the common case: one group over the whole buffer
            hp = self._resolve_default()
            self._check(hp)
            return ((self.group_state[0], hp),), ((0, n, 0),)
        active, segments = [], []
        for group, group_state in zip(self._groups_for(n), self.group_state):
            if not group.get("frozen", False):
                hp = self._resolve(group, group_state["step"])
                self._check(hp)
                segments.append((group["start"], group["stop"], len(active)))
                active.append((group_state, hp))
        return active, tuple(segments)

    def _set_step_entries(self, row, hp, group_state):
        pass

    def _stepping_from(self, group_state):
        """The group state a full step builds its row from (see SGD's): the group's own.  Only
        the full step reads it, the prepared one being dropped by any edit of ``state``."""
        return group_state

    def _set_lr_entries(self, row, hp):
        pass

    def _table(self, backend, dtype, rows):
        """The step's scalars as the kernel's table: rebuilt only when they change (they
        settle once bias corrections reach 1), refilled in place where the backend can."""
        cache = self._table_cache
        if (backend, dtype, rows) != cache[0]:
            reuse = cache[1] if cache[0] is not None and cache[0][0] is backend else None
            cache[:] = (backend, dtype, rows), backend.table(rows, dtype, reuse)
        return cache[1]

    def _resolve_default(self):
        hp = self.__dict__
        if callable(hp["lr"]):
            hp = dict(hp, lr=_lr_at(hp["lr"], self.group_state[0]["step"]))
        return hp

    def _advance(self, hp, group_state):
        group_state["step"] += 1

    def _check_state_fits(self, backend, params, n, dtype):
        if self._backend is not None and self._backend is not backend:
            raise TypeError(f"the optimizer state lives on {self._backend.name} but params are on "
                            f"{backend.name}; move it with state_dict() / load_state_dict()")
        # Placed buffers were checked together; assigned or loaded ones are checked one by one
        # (the kernel reads n elements of each) and placed beside the params by the step.
        buffers = self.state if self._state_args is None else dict([next(iter(self.state.items()))])
        for name, buf in buffers.items():
            check_state_fits(name, buf, n, dtype)
            if self._state_args is not None:
                backend.check_beside(buf, params)

    def _states(self, backend, n, dtype, active):
        """The kernel's state arguments, allocating (zeros) the buffers first needed now."""
        needed = self._needs(active[0][1])
        for _, hp in active[1:]:
            needed = tuple(name for name in self.state_names if name in needed or name in self._needs(hp))
        # The buffers a rule does not use are passed empty, of the params' dtype and backend:
        # an optimizer without state (SGD without momentum) may change both between steps.
        key = (backend, dtype, needed, n)
        args = self._state_args
        if key == self._state_key and args is not None:  # (None whenever the buffers are not placed)
            _check_lengths(backend, args, self.state_names, needed, n)
            return args
        if self._backend is None:  # fresh, loaded or assigned buffers: place copies next to the params
            self.state = {k: backend.place(v, np.empty(0, dtype)) for k, v in self.state.items()}
            self._backend = backend
        elif not self.state:  # none made yet: the first ones are made where these params are
            self._backend = backend
        for name in needed:
            if name not in self.state:
                dict.__setitem__(self.state, name, backend.zeros(n, dtype))
        args = [self.state[name] if name in self.state else backend.empty_state(dtype) for name in self.state_names]
        _check_lengths(backend, args, self.state_names, needed, n)
        self._state_key, self._state_args = key, args
        return args

    # --- checkpoints --------------------------------------------------------------------
    def state_dict(self):
        """Plain Python and NumPy data: picklable, ``np.savez``-able, device independent.

        A callable ``lr`` is not saved; the loading optimizer keeps its own.
        """
        return {
            "optimizer": type(self).__name__,
            "hyperparameters": {k: v for k, v in self.hyperparameters().items() if not callable(v)},
            "param_groups": None if self._groups is None else [
                {k: v for k, v in g.items() if not callable(v)} for g in self._groups],
            "group_state": [dict(s) for s in self.group_state],
            "state": {k: backend_for(v, v).to_host(v) for k, v in self.state.items()},
        }

    def load_state_dict(self, state_dict):
        """Restore a checkpoint; everything is checked before anything changes."""
        sd = {k: _unwrap(v) for k, v in dict(state_dict).items()}
        expected = {"optimizer", "hyperparameters", "param_groups", "group_state", "state"}
        if set(sd) != expected:
            raise ValueError(f"state_dict keys {sorted(sd)} do not match the expected {sorted(expected)}")
        if sd["optimizer"] != type(self).__name__:
            raise ValueError(f"state_dict is for {sd['optimizer']}, not {type(self).__name__}")
        hyper = {k: _plain(v, k) for k, v in dict(sd["hyperparameters"]).items()}
        unknown = set(hyper) - set(self.defaults)
        if unknown:
            raise ValueError(f"state_dict has unknown hyperparameters {sorted(unknown)}")
        trial = object.__new__(type(self))
        trial.__dict__.update(self.__dict__)
        trial.__dict__.update(hyper)
        trial._check(trial._resolve(None, 0))
        groups = sd["param_groups"]
        if groups is not None and self._groups is not None and len(groups) == len(self._groups):
            # A callable (an lr schedule) is not saved: this optimizer's own stays, as for the top-level lr.
            groups = [dict({k: v for k, v in mine.items() if callable(v) and k not in dict(g)}, **dict(g))
                      for g, mine in zip(groups, self._groups)]
        trial.param_groups = groups
        group_state = [dict(_unwrap(s)) for s in sd["group_state"]]
        if len(group_state) != len(trial.group_state):
            raise ValueError(f"state_dict has {len(group_state)} group states for "
                             f"{len(trial.group_state)} param groups")
        for s in group_state:
            if set(s) != set(trial._new_group_state()) or not all(
                    isinstance(v, numbers.Integral) for v in s.values()):
                raise ValueError(f"invalid group state {s}")
            trial._check_group_state(s)  # what the next step would refuse
        state = {k: host_array(v) for k, v in dict(sd["state"]).items()}
        unknown = set(state) - set(self.state_names)
        if unknown:
            raise ValueError(f"state_dict has unknown state buffers {sorted(unknown)}; "
                             f"{type(self).__name__} keeps {list(self.state_names)}")
        sizes = {len(v) if v.ndim == 1 else -1 for v in state.values()}
        dtypes = {v.dtype for v in state.values()}
        if -1 in sizes or len(sizes) > 1:
            raise ValueError("state buffers must be 1-D and of one length, got shapes "
                             f"{ {k: v.shape for k, v in state.items()} }")
        if len(dtypes) > 1 or (dtypes and dtypes.pop() not in SUPPORTED_DTYPES):
            raise TypeError("state buffers must share one dtype, float32 or float64, got "
                            f"{ {k: str(v.dtype) for k, v in state.items()} }")
        if state and trial._groups and trial._groups[-1]["stop"] > sizes.copy().pop():
            raise ValueError("state_dict's param groups reach beyond its state buffers")
        # Everything checked: commit.
        self.__dict__.update(hyper)
        self._groups, self.group_state = trial._groups, group_state
        self.state = {k: np.array(v, copy=True) for k, v in state.items()}
        self.__dict__.update(_unplaced())

    def __getstate__(self):
        """pickle and copy.deepcopy: hyperparameters, groups, step counts and the state as host
        arrays (placed next to the parameters again at the next step, as after
        ``load_state_dict``); what the steps cached is left behind."""
        kept = dict(self.__dict__, **_unplaced())
        kept["state"] = {k: backend_for(v, v).to_host(v) for k, v in self.state.items()}
        kept["group_state"] = [dict(s) for s in self.group_state]  # copy.copy too: nothing shared
        kept["_groups"] = None if self._groups is None else [dict(g) for g in self._groups]
        return kept

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__["state"] = _StateBuffers(self, state["state"])

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


def _lr_at(lr, step):
    """``lr`` at a step: a schedule's value (a callable of the step count), or ``lr`` itself."""
    return _plain(lr(step), "lr (the schedule's value)") if callable(lr) else lr


_RESOLVED_EVERY_STEP = object()  # a _Row's lr_source while a schedule gives its lr


class _Row:
    """One row of a prepared step's table: the group it steps, its hyperparameters as checked
    (with the lr resolved from ``lr_source``), and the table row its scalars go to."""
    __slots__ = ("index", "hp", "lr_source", "row")

    def __init__(self, index, hp, lr_source, row):
        self.index, self.hp, self.lr_source, self.row = index, hp, lr_source, row


class _Ready:
    """What a full step checked and prepared, for the steps after it: the buffers' backend,
    length and dtype, the bound kernel launch, and the table with one :class:`_Row` a group
    stepped.  A step on it resolves the lr again where it changed, writes the rows' entries that
    depend on it and on the step count, and launches (see ``Optimizer._ready_rows``).  Of the
    groups (frozen ones too) it keeps each dict, its keys and its values, as they were checked."""
    __slots__ = ("backend", "n", "dtype", "launch", "table", "rows", "solo", "groups", "keys", "values", "n_states")

    def __init__(self, opt, backend, n, dtype, launch, table, active, indices):
        self.backend, self.n, self.dtype, self.launch, self.table = backend, n, dtype, launch, table
        groups = opt._groups
        self.groups = None if groups is None else tuple(groups)
        self.keys = None if groups is None else [tuple(g) for g in groups]
        self.values = None if groups is None else [tuple(g.values()) for g in groups]
        self.n_states = len(opt.group_state)
        top_lr = opt.__dict__["lr"]
        self.rows = []
        for (_, hp), i, row in zip(active, indices, table):
            group = None if groups is None else groups[i]
            source = group["lr"] if group is not None and "lr" in group else top_lr
            # (only the hyperparameters: ``hp`` is the optimizer's own __dict__ where no group or schedule is)
            self.rows.append(_Row(i, {name: hp[name] for name in opt.defaults}, source, row))
        # where one group steps the whole buffer with a number as lr, the steps after this one
        # need only look at that lr and the step count (see ``Optimizer.step``)
        self.solo = self.rows[0] if groups is None and not callable(top_lr) and self.n_states == 1 else None

    def step(self, opt, rows, params, grads, gather):
        """Launch the kernel on ``rows`` (``Optimizer._ready_rows``): nothing before this has
        changed anything.  (A launcher of a backend that cannot gather refuses ``gather``.)"""
        try:
            for entry, hp, source, group_state in rows:
                if hp is not entry.hp:  # its lr is new
                    opt._set_lr_entries(entry.row, hp)
                try:
                    opt._set_step_entries(entry.row, hp, group_state)  # rounded as a full table build rounds
                except KeyError:  # an entry removed since
                    opt._check_group_state(group_state)  # says which
                    raise
        except BaseException:
            opt.__dict__["_ready"] = None  # rows written for an lr not taken: the next step builds them anew
            raise
        try:
            if gather is None:
                self.launch(params, grads, self.table)
            else:
                self.launch(params, grads, self.table, gather)
        except BaseException as error:
            if isinstance(error, KeyboardInterrupt) and kernel_ran(error):  # (a Ctrl-C during the kernel)
                self._taken(opt, rows)
            else:
                opt.__dict__["_ready"] = None
            raise
        self._taken(opt, rows)

    @staticmethod
    def _taken(opt, rows):
        """The step on ``rows`` was taken: their counts advance."""
        for entry, hp, source, group_state in rows:
            opt._advance(hp, group_state)
            if hp is not entry.hp:  # the row now holds this lr's entries (a schedule's: resolved at every step)
                entry.hp, entry.lr_source = hp, _RESOLVED_EVERY_STEP if callable(source) else source


def planned_for(owner, backend, segments):
    """The kernel's plan for ``segments``, made once for them and kept in ``owner._planned`` with
    them, as one pair: a step never launches on the plan of another step's buffers (one
    optimizer stepped from two threads at once)."""
    planned = owner.__dict__.get("_planned")
    if planned is None or planned[0] != (backend, segments):
        planned = owner.__dict__["_planned"] = ((backend, segments), backend.plan(segments))
    return planned[1]


def _check_lengths(backend, args, names, needed, n):
    """That each state buffer the kernel reads holds ``n`` elements.  Every check of the step
    made sure of it, but for one optimizer stepped on buffers of two lengths from two threads at
    once, whose state each may make and find in between: a wrong number there (as torch's),
    never a write beyond a buffer."""
    for name, buf in zip(names, args):
        if name in needed and backend.length(buf) != n:
            raise RuntimeError(f"optimizer state '{name}' has {backend.length(buf)} elements but params {n}: "
                               "another thread is stepping this optimizer on other buffers (one optimizer is for "
                               "one thread at a time)")


def _fixed(value):
    """Whether a group's value can change only by an assignment (not an array or a list, which
    can be edited in place): then the prepared step sees every change of it."""
    return (type(value) in _PLAIN_TYPES or type(value) is str or isinstance(value, np.generic) or callable(value)
            or (type(value) is tuple and all(map(_fixed, value))))


def _unplaced():
    """The attributes of an optimizer whose state is host arrays (new, loaded or unpickled):
    no backend holds it yet, and nothing the steps prepare is kept."""
    return dict(_backend=None, _ready=None, _planned=None, _state_key=None, _state_args=None,
                _table_cache=[None, None])  # [key, table], updated in place: no __setattr__ on the step path


def branch_in_sign(value, taken):
    """A hyperparameter as a row holds it where a kernel branches on it, as torch branches on
    the Python float (``weight_decay != 0``; RMSprop's ``momentum > 0``): ``value`` where the
    branch is taken, else -0.0.  A value that is not 0 but rounds to +0.0 in float32 (1e-300)
    still takes the branch, as in torch (0 * p: NaN where p is infinite); the checks leave no
    negative value, so the sign is free.  The kernels' test: ``flatopt.kernels.cpu.taken``."""
    return value if taken else -0.0


def decay_row_value(hp):
    """The weight decay as a row holds it (:func:`branch_in_sign`): torch decays where
    ``weight_decay != 0``."""
    return branch_in_sign(hp["weight_decay"], hp["weight_decay"] != 0)


def lerp_weight_minus_one(weight, dt):
    """``weight - 1`` as torch's lerp computes it, from the weight rounded to the buffers'
    dtype.  Only used when ``|weight| >= 0.5``: exact then for ``weight <= 1`` (the table
    rounds it once more, as torch's ``1 - weight``, for a weight below ``-1/2``)."""
    return float(dt(weight)) - 1.0


_fma = getattr(math, "fma", None)  # Python >= 3.13


@functools.lru_cache(maxsize=64)
def one_minus_product(a, b):
    """``1 - a*b`` rounded once, as a fused multiply-add computes it (torch's fused Adam
    kernels are compiled with FMA contraction).  Cached: lr changes at most once a step."""
    a, b = float(a), float(b)  # NumPy scalars too
    if _fma is not None:
        return _fma(-a, b, 1.0)
    if not (math.isfinite(a) and math.isfinite(b)):
        return 1.0 - a * b
    # Exact in integers, then one correct rounding (Python's int / int is correctly rounded);
    # a result beyond the float range is -inf, as the FMA rounds it (Python 3.13's math.fma too).
    (na, da), (nb, db) = a.as_integer_ratio(), b.as_integer_ratio()
    try:
        return (da * db - na * nb) / (da * db)
    except OverflowError:  # then a*b rounds to inf too
        return 1.0 - a * b


_PLAIN_TYPES = frozenset((float, int, bool, type(None)))


def _plain(value, name):
    """NumPy scalars as the Python scalars they hold; a list or tuple (betas) as a tuple of
    them, which cannot change behind the step's back (checked values are not checked again).
    An array (NumPy, JAX, torch) of one element is its scalar, as torch takes a tensor lr; a
    1-D one of more (betas) a tuple of its scalars.  ``name`` names the hyperparameter in the
    error for an array that cannot be read (a JAX tracer)."""
    if type(value) in _PLAIN_TYPES:
        return value
    try:
        if type(value) in (tuple, list):
            return tuple(map(_scalar, value))
        if len(getattr(value, "shape", ())) == 1 and value.shape[0] != 1 and hasattr(value, "__array__"):
            return tuple(np.asarray(value).tolist())
        return _scalar(value)
    except Exception as error:
        if "Tracer" not in type(error).__name__:
            raise
        raise TypeError(f"{name} is a value JAX is tracing ({type(value).__name__}), not a number: flatopt takes "
                        "its hyperparameters as numbers, and lr also as a schedule (a callable of the step count), "
                        "which flatopt.jax evaluates inside the update. Under jax.jit, optax.inject_hyperparams "
                        "passes its hyperparameters traced: give the schedule to flatopt instead") from error


def _scalar(value):
    """A NumPy scalar or an array of one element as its Python scalar; anything else as it is
    (a hyperparameter's check then refuses it, with the array library's own message)."""
    if isinstance(value, np.generic):
        return value.item()
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "__array__") and math.prod(shape) == 1:
        return np.asarray(value).item()
    return value


DICT_EDITS = ("__setitem__", "__delitem__", "__ior__", "clear", "pop", "popitem", "setdefault", "update")
LIST_EDITS = ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "pop", "remove",
              "clear", "sort", "reverse")


def note_edits(cls, base, names, note):
    """Make the methods ``names`` of ``cls`` (a subclass of ``base``, ``dict`` or ``list``) call
    ``note(self)`` after each edit: a container that tells its owner it changed."""
    def noting(method):
        def edit(self, *args, **kwargs):
            result = method(self, *args, **kwargs)
            note(self)
            return result
        return functools.wraps(method)(edit)

    for name in names:
        setattr(cls, name, noting(getattr(base, name)))
    return cls


class _StateBuffers(dict):
    """``opt.state``: a dict of flat buffers that tells its optimizer when a buffer is assigned,
    replaced or removed (the steps keep what they checked and placed until then).  It knows
    its optimizer through a weak reference: a strong one made a cycle, which kept a dropped
    optimizer's buffers until the garbage collector's next full pass."""

    def __init__(self, owner, buffers=()):
        super().__init__(buffers)
        self._owner = weakref.ref(owner)

    def __reduce__(self):
        return dict, (dict(self),)  # a copy or an unpickled one is a plain dict (its owner wraps it again)


def _tell_owner(buffers):
    owner = buffers._owner()
    if owner is not None:
        owner._state_replaced()


note_edits(_StateBuffers, dict, DICT_EDITS, _tell_owner)


def _check_range(i, group):
    for key in ("start", "stop"):
        if key not in group:
            raise ValueError(f"param group {i} needs '{key}'")
        if not isinstance(group[key], numbers.Integral) or isinstance(group[key], bool):
            raise TypeError(f"param group {i}: '{key}' must be an int, got {group[key]!r}")
    if not 0 <= group["start"] < group["stop"]:
        raise ValueError(f"param group {i}: need 0 <= start < stop, got start={group['start']}, "
                         f"stop={group['stop']}")


def _check_ranges(groups):
    for i in range(1, len(groups)):
        if groups[i]["start"] < groups[i - 1]["stop"]:
            raise ValueError(f"param group {i} starts at {groups[i]['start']}, inside or before "
                             f"group {i - 1} (which stops at {groups[i - 1]['stop']}); "
                             "groups must be sorted and must not overlap")


def _continued(i, group, old, old_groups, count):
    """The step count (and flags) that assigned group ``i`` of ``count`` carries on, if any:
    those of the groups that held its elements, where they held all of them at one count (the
    group had its range, is part of one, or joins neighbours at one count: each element goes
    on with its own count, as each of torch's parameters keeps its own); a flag they differ on
    (SGD's ``momentum_started``) is False, so what it names starts again for the whole group,
    which has one.  Else, where the number of groups is unchanged, those of the group in its
    place if their ranges overlap (a moved boundary, which an in-place edit of
    ``start``/``stop`` keeps too).  Any other group starts at step 0, as a torch param group
    added with fresh parameters does.  The state buffers are kept either way.  Old groups
    whose ranges were edited in place into something that is not a range are passed over."""
    if old_groups is None:  # one group over the whole buffer held every element
        return old[0]
    start, stop = group["start"], group["stop"]
    ranged = [(g, s) for g, s in zip(old_groups, old) if _is_range(g)]
    held = [(g, s) for g, s in ranged if g["start"] < stop and start < g["stop"]]
    if (held and held[0][0]["start"] <= start and held[-1][0]["stop"] >= stop
            and all(a["stop"] == b["start"] for (a, _), (b, _) in zip(held, held[1:]))
            and all(s.get("step") == held[0][1].get("step") for _, s in held)):
        first = held[0][1]
        return {k: v if k == "step" or all(s.get(k) == v for _, s in held) else False for k, v in first.items()}
    if count == len(old_groups) == len(old) and _is_range(old_groups[i]):
        placed = old_groups[i]
        if placed["start"] < stop and start < placed["stop"]:
            return old[i]
    return None


def check_state_fits(name, buffer, n, dtype):
    """That state buffer ``name`` is one a step on ``n`` elements of ``dtype`` can take."""
    check_fits(buffer, n, dtype, f"optimizer state '{name}'", "the optimizer state was made for",
               "the optimizer state's")


def check_reach(last, n):
    """That groups ending at element ``last`` fit a buffer of ``n`` elements."""
    if last > n:
        raise ValueError(f"param groups reach element {last} but the buffer has {n} elements")


def _is_range(group):
    return all(isinstance(group.get(k), numbers.Integral) and not isinstance(group.get(k), bool)
               for k in ("start", "stop"))


def _unwrap(value):
    """``np.savez`` stores dicts and scalars as 0-d arrays; take them back out."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value
