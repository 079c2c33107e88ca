"""Lookahead (Zhang et al., 2019) around any flat-buffer optimizer."""
import copy
import numbers
from contextlib import contextmanager

import numpy as np

from flatopt.backend import SUPPORTED_DTYPES, backend_for, check_1d, check_fits, host_array, kernel_ran
from flatopt.optimizers.base import Optimizer, _unwrap, planned_for


def check_k_alpha(k, alpha):
    """Lookahead's ``k`` and ``alpha`` (the torch wrapper's too), at construction and before
    every step: both may be changed between steps."""
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        raise ValueError(f"Invalid k: {k!r}; Lookahead needs an integer k >= 1")
    try:
        valid = not isinstance(alpha, bool) and 0.0 <= alpha <= 1.0
    except (TypeError, ValueError):  # (None, a string, a complex number; an array of several values)
        valid = False
    if not valid:
        raise ValueError(f"Invalid alpha: {alpha!r}; Lookahead needs a number 0 <= alpha <= 1")


def check_slow_fits(slow, n, dtype):
    """That slow weights are ones the sync kernel can take beside ``n`` params of ``dtype``."""
    check_fits(slow, n, dtype, "slow weights", "the slow weights have", "the slow weights'")


class Lookahead:
    r"""Keeps slow weights beside the parameters the inner optimizer updates (the fast
    weights).  Slow weights start as a copy of the parameters, taken before the first inner
    step; after every ``k``-th inner step one fused kernel does, over the inner optimizer's
    groups that are not frozen (the whole buffer without groups)

    .. math::
        s \leftarrow s + \alpha (p - s), \qquad p \leftarrow s

    rounded as the reference wrapper computes it, ``alpha * p + (1 - alpha) * s``.
    ``with opt.slow_weights(params):`` evaluates on the slow weights and swaps back.
    """

    _spans = None  # (the attribute a Lookahead pickled before it had one takes)

    def __init__(self, inner, k=5, alpha=0.5):
        if not isinstance(inner, Optimizer):
            raise TypeError(f"Lookahead wraps a flatopt optimizer, got {type(inner).__name__}")
        self.inner, self.k, self.alpha = inner, k, alpha
        check_k_alpha(self.k, self.alpha)
        self._slow, self._slow_own = None, True
        self._spans = None  # the spans the last step synced (None: no step yet, slow weights assigned, or an
        # older checkpoint loaded that did not record them)
        self.step_count = 0
        self._planned = None

    def step(self, params, grads, _gather=None):
        """One inner step; every ``k``-th also pulls slow and fast weights together.
        ``_gather``: the inner step's (see :meth:`flatopt.optimizers.Optimizer.step`)."""
        check_k_alpha(self.k, self.alpha)
        backend = backend_for(params, grads)
        backend.check(params, grads)
        n = backend.length(params)
        spans = self._synced_spans(n)  # (checks the groups' ranges, as the inner step does)
        joined, values = (), None
        if self._slow is not None:
            slow = self._usable_slow(backend, params, n)
            if self._spans is not None and spans != self._spans:
                joined = _without(spans, self._spans)
            if joined:  # their slow weights start from their values now, taken before the inner step
                values = backend.zeros(n, backend.dtype(params))
                backend.copy(params, values, joined, like=params)
        else:
            slow = backend.zeros(n, backend.dtype(params))
            backend.copy(params, slow, like=params)
        try:
            self.inner.step(params, grads, _gather)  # validates everything of its own before touching anything
        except KeyboardInterrupt as interrupt:  # (a Ctrl-C during the kernel: the step is taken)
            if kernel_ran(interrupt):
                self._stepped(backend, params, slow, spans, joined, values)
            raise
        self._stepped(backend, params, slow, spans, joined, values)

    def _stepped(self, backend, params, slow, spans, joined, values):
        """What follows the inner step: the slow weights kept, and every ``k``-th the sync."""
        if joined:
            backend.copy(values, slow, joined, like=params)
        self._slow, self._slow_own = slow, True  # (a copy made above is kept only now: a refused step keeps none)
        self._spans = spans
        self.step_count += 1
        if self.syncs(self.step_count):
            segments = tuple((a, b, 0) for a, b in spans)
            if segments:
                backend.launch("lookahead", params, slow, (), planned_for(self, backend, segments),
                               backend.table([self.sync_row()], backend.dtype(params)))

    def _synced_spans(self, n):
        """Only what the inner optimizer updates has slow weights of its own: frozen groups and
        elements outside every group are left alone, as by the inner step.  Elements that join
        them later (a group unfrozen, or assigned over them) take their slow weights from their
        values at the step they join, as a torch parameter added to a group does."""
        return tuple((g["start"], g["stop"]) for g in self.inner._groups_for(n) if not g.get("frozen", False))

    def syncs(self, step_count):
        """Whether the inner step that brings the count to ``step_count`` is followed by a sync."""
        return step_count % self.k == 0

    def sync_row(self):
        """The sync rule's scalars (``flatopt.kernels.cpu.lookahead_chunk``): alpha, 1 - alpha."""
        return float(self.alpha), 1 - float(self.alpha)

    @property
    def slow(self):
        """The slow weights: ``None`` before the first step.  Assigned ones are copied beside the
        parameters at the next step, as assigned state buffers are: the sync never writes into
        an array the caller holds (it may be the parameters or the gradients)."""
        return self._slow

    @slow.setter
    def slow(self, value):
        self._slow, self._slow_own, self._spans = value, False, None

    def _usable_slow(self, backend, params, n):
        """The slow weights as the sync kernel can read and write them beside ``params``: this
        optimizer's own, or a copy (of assigned ones, or of ones that are strided, read-only or
        elsewhere), taken before the inner step writes the params (which assigned ones may be)."""
        check_slow_fits(self._slow, n, backend.dtype(params))
        if self._slow_own and backend.usable(self._slow, params):
            return self._slow
        return backend.place(self._slow, params)

    @contextmanager
    def slow_weights(self, params):
        """Inside the block ``params`` holds the slow weights where the inner optimizer's groups
        that are not frozen lie (elsewhere the parameters are their own slow weights); the fast
        ones come back after."""
        if self.slow is None:  # before the first step the slow weights are the parameters
            yield params
            return
        backend = backend_for(params, params)
        shape = backend.shape(params, "params")  # (named as a step names it, before the length is read)
        check_1d("params", shape)
        n = shape[0]
        fast = backend.zeros(n, backend.dtype(params), like=params)  # (on params' GPU)
        backend.check(params, fast)  # params a step could write (read-only, strided: refused as there)
        slow = self._usable_slow(backend, params, n)
        spans = self._synced_spans(n)  # (checks the groups' ranges)
        backend.copy(params, fast, spans, like=params)
        backend.copy(slow, params, spans, like=params)
        try:
            yield params
        finally:
            backend.copy(fast, params, spans, like=params)

    def state_dict(self):
        return {
            "optimizer": "Lookahead",
            "k": self.k,
            "alpha": self.alpha,
            "step_count": self.step_count,
            "slow": None if self.slow is None else backend_for(self.slow, self.slow).to_host(self.slow),
            # The ranges the last step synced: elements outside them that join at the next step
            # take their slow weights from their values then, as in a run never interrupted.
            "synced": None if self._spans is None else [list(span) for span in self._spans],
            "inner": self.inner.state_dict(),
        }

    def load_state_dict(self, state_dict):
        sd = {k: _unwrap(v) for k, v in dict(state_dict).items()}
        expected = {"optimizer", "k", "alpha", "step_count", "slow", "synced", "inner"}
        if set(sd) != expected and set(sd) != expected - {"synced"}:  # (saved before it had "synced")
            raise ValueError(f"state_dict keys {sorted(sd)} do not match the expected {sorted(expected)}")
        if sd["optimizer"] != "Lookahead":
            raise ValueError(f"state_dict is for {sd['optimizer']}, not Lookahead")
        check_k_alpha(sd["k"], sd["alpha"])
        count = sd["step_count"]
        if not isinstance(count, numbers.Integral) or isinstance(count, bool) or count < 0:
            raise ValueError(f"invalid step_count {count!r}")
        slow = sd["slow"]
        if slow is not None:
            slow = host_array(slow)
            if slow.ndim != 1:
                raise ValueError(f"slow weights must be 1-D, got shape {slow.shape}")
            if slow.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"slow weights must be float32 or float64, got {slow.dtype}")
            inner_state = dict(_unwrap(sd["inner"])).get("state", {})
            buffers = [host_array(v) for v in dict(_unwrap(inner_state)).values()]
            sizes, dtypes = {len(b) for b in buffers}, {b.dtype for b in buffers}
            if sizes and sizes != {len(slow)}:
                raise ValueError(f"slow weights have {len(slow)} elements but the inner state has "
                                 f"{max(sizes - {len(slow)})}")
            if dtypes and dtypes != {slow.dtype}:  # the next step would refuse one or the other
                raise TypeError(f"the slow weights' dtype {slow.dtype} does not match the inner state's "
                                f"{(dtypes - {slow.dtype}).pop()}")
        spans = _loaded_spans(sd.get("synced"), slow)
        self.inner.load_state_dict(sd["inner"])  # checks everything before changing anything
        self.k, self.alpha, self.step_count = sd["k"], sd["alpha"], int(sd["step_count"])
        self._slow, self._slow_own = None if slow is None else np.array(slow, copy=True), True
        self._spans, self._planned = spans, None

    def __getstate__(self):
        """pickle and copy.deepcopy: the slow weights as a host array (placed next to the
        parameters again at the next step, as after ``load_state_dict``); the plan is made anew."""
        slow = self._slow
        return dict(self.__dict__, _slow=None if slow is None else backend_for(slow, slow).to_host(slow),
                    _slow_own=True, _planned=None)

    def __copy__(self):
        """copy.copy shares nothing, as the optimizers' own copies: the inner optimizer is copied
        too (pickle and deepcopy copy it anyway)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__getstate__(), inner=copy.copy(self.inner))
        return new

    def __repr__(self):
        return f"Lookahead({self.inner!r}, k={self.k}, alpha={self.alpha})"


def _loaded_spans(synced, slow):
    """A checkpoint's ``synced`` ranges, checked: ``None`` (not known: a checkpoint saved before
    it had them, or before the first step) or sorted, disjoint ``(start, stop)`` ranges within
    the slow weights (a list of pairs, or the array ``np.savez`` makes of one)."""
    if synced is None:
        return None
    if slow is None:
        raise ValueError("state_dict has synced ranges but no slow weights")
    try:
        ranges = np.asarray(synced)
    except (TypeError, ValueError):
        ranges = np.asarray(None)
    if ranges.shape in ((0,), (0, 2)):  # (no range: every group frozen; np.savez makes [] a float array)
        return ()
    if ranges.ndim != 2 or ranges.shape[1] != 2 or ranges.dtype.kind not in "iu":
        raise ValueError(f"state_dict's synced ranges must be (start, stop) pairs of integers, got {synced!r}")
    spans = tuple((int(a), int(b)) for a, b in ranges)
    stop = 0
    for a, b in spans:
        if not stop <= a < b <= len(slow):
            raise ValueError(f"state_dict's synced ranges {[list(span) for span in spans]} are not sorted, "
                             f"disjoint, non-empty ranges within the {len(slow)} slow weights")
        stop = b
    return spans


def _without(spans, before):
    """The parts of the ``(start, stop)`` ranges ``spans`` outside every range of ``before``
    (both sorted, disjoint)."""
    pieces = []
    for a, b in spans:
        for c, d in before:
            if d <= a or c >= b:
                continue
            if c > a:
                pieces.append((a, c))
            a = max(a, d)
            if a >= b:
                break
        if a < b:
            pieces.append((a, b))
    return tuple(pieces)
