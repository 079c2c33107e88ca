"""Lookahead around any torch optimizer; around a flatopt.torch one, on its flat buffers."""
import numbers
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import contextmanager
from operator import is_

import torch

from flatopt.backend import kernel_ran
from flatopt.lookahead import check_k_alpha
from flatopt.torch._flat import FlatOptimizer, public
from flatopt.torch._hooks import global_hooks_or_profiler, increment_version, labelled_zero_grad, outside_dynamo


_HOOKS = ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre", "load_state_dict_post")


@public
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
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        check_k_alpha(self.k, self.alpha)
        self.step_count = 0
        self.slow = None  # tensors in the inner optimizer's parameter order
        self._slow_params = ()
        self._flat_pairs = None
        for name in _HOOKS:
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
    def _slow_copies(self, params, values):
        """``(slow, slow_params, flat_pairs)``: slow weights for ``params``, copies of
        ``values``, for the caller to take (a step takes them only once its inner step has
        succeeded).  Around a flatopt.torch optimizer they are views of one flat buffer per
        (device, dtype), mirroring its layout, so that the pull is two tensor ops per buffer
        (``flat_pairs``); otherwise one tensor per parameter."""
        inner = self.optimizer
        if not isinstance(inner, FlatOptimizer):
            return [v.clone() for v in values], list(params), None
        where, pairs = {}, []
        for b in inner._buckets.values():
            buf = torch.empty_like(b.flat)
            pairs.append((b.flat, buf))
            for i, p in enumerate(b.params):
                where[id(p)] = b.shaped(buf, i)
        slow = [where[id(p)] for p in params]
        torch._foreach_copy_(slow, values)
        return slow, list(params), pairs

    def _matched_slow(self, params):
        """Each parameter's slow weight, matched by identity (its value now where it has none
        yet: a parameter added to a group's list since the last step, whose slow weight the
        next step takes from its value then)."""
        kept = {id(p): q for p, q in zip(self._slow_params, self.slow)}
        return [kept.get(id(p), p.detach()) for p in params]

    def _flat_current(self):
        """The flat pairs, if the inner optimizer's buffers are still the ones mirrored."""
        pairs = self._flat_pairs
        if pairs is None:
            return None
        flats = [b.flat for b in self.optimizer._buckets.values()]
        if len(flats) != len(pairs) or any(f is not a for f, (a, _) in zip(flats, pairs)):
            return None
        return pairs

    # Not traced by dynamo (torch.compile), as FlatOptimizer's methods (see there): traced, the
    # first step failed after the inner step's graph break, the slow weights made before it read
    # back as None.
    @outside_dynamo
    def step(self, *args, **kwargs):
        """``step(closure=None)``; runs torch's step hooks and profiler label when a hook is
        registered or a profiler records (torch.optim.Optimizer.__init__, which would wrap
        ``step`` in them, is not called)."""
        if self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or global_hooks_or_profiler():
            return self._step_with_hooks(*args, **kwargs)
        return self._step(*args, **kwargs)

    step.hooked = True  # (torch's _patch_step_function would wrap it in its hooks again: kept should anything call it)

    def _step(self, closure=None):
        check_k_alpha(self.k, self.alpha)
        alpha = float(self.alpha)  # (an array or a Fraction passes the check; torch's ops take a float)
        if isinstance(self.optimizer, FlatOptimizer):
            self.optimizer._take_edits()  # a group edit lays the inner buffers out again: first
        params = self._params()
        made = None  # slow weights taken before the inner step, kept only if it succeeds
        if self.slow is None:
            made = self._slow_copies(params, [p.detach() for p in params])
        elif (len(params) != len(self._slow_params) or not all(map(is_, params, self._slow_params))
              or (self._flat_pairs is not None and self._flat_current() is None)):
            # the groups' lists were edited: each parameter keeps its slow weight, a new one starts
            # from its value now (as the slow weights of the first step)
            made = self._slow_copies(params, self._matched_slow(params))
        try:
            loss = self.optimizer.step(closure)
        except KeyboardInterrupt as interrupt:  # (a Ctrl-C during a flatopt kernel: the inner step is taken)
            if kernel_ran(interrupt):
                self._stepped(params, made, alpha)
            raise
        self._stepped(params, made, alpha)
        return loss

    def _stepped(self, params, made, alpha):
        """What follows the inner step: the slow weights kept, and every ``k``-th the pull."""
        if made is not None:
            self.slow, self._slow_params, self._flat_pairs = made
        self.step_count += 1
        if self.step_count % self.k == 0:
            with torch.no_grad():
                pairs = self._flat_current()
                if pairs is not None:  # the inner step synced every .data into the flat buffers
                    for fast, slow in pairs:
                        fast.mul_(alpha).add_(slow, alpha=1 - alpha)
                        slow.copy_(fast)
                    increment_version(params)  # (written through the buffers: see FlatOptimizer._stepped)
                else:
                    for p, q in zip(params, self.slow):
                        p.mul_(alpha).add_(q, alpha=1 - alpha)
                        q.copy_(p)

    _step_with_hooks = torch.optim.Optimizer.profile_hook_step(_step)

    @outside_dynamo
    @labelled_zero_grad
    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @outside_dynamo
    def add_param_group(self, param_group):
        self.optimizer.add_param_group(param_group)
        if self.slow is not None:  # the new parameters' slow weights start from their values now
            params = self._params()
            self.slow, self._slow_params, self._flat_pairs = self._slow_copies(params, self._matched_slow(params))

    @contextmanager
    def slow_weights(self):
        """Inside the block the parameters hold the slow weights; the fast ones come back after."""
        if self.slow is None:
            yield
            return
        params = self._params()
        with torch.no_grad():
            fast = [p.detach().clone() for p in params]
            for p, q in zip(params, self._matched_slow(params)):
                p.copy_(q)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, f in zip(params, fast):
                    p.copy_(f)

    @outside_dynamo
    def state_dict(self):
        """The inner optimizer's state_dict, the slow weights, ``k``, ``alpha`` and the step
        count; torch's state_dict hooks run as around torch.optim's."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = {
            "inner": self.optimizer.state_dict(),
            "k": self.k,
            "alpha": self.alpha,
            "step_count": self.step_count,
            "slow": None if self.slow is None else {
                i: q.clone() for i, q in enumerate(self._matched_slow(self._params()))},
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        return state_dict

    @outside_dynamo
    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)  # (a shallow copy, as torch's, for the pre hooks to edit)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        self._load(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load(self, state_dict):
        expected = {"inner", "k", "alpha", "step_count", "slow"}
        if set(state_dict) != expected:
            raise ValueError(f"state_dict keys {sorted(state_dict)} do not match the expected {sorted(expected)}")
        params = self._params()
        slow = state_dict["slow"]
        if slow is not None:
            if not isinstance(slow, Mapping) or set(slow) != set(range(len(params))):
                got = f"{len(slow)} entries" if isinstance(slow, Mapping) else type(slow).__name__
                raise ValueError(f"state_dict's slow weights must be a dict keyed by the {len(params)} "
                                 f"parameters' indices, got {got}")
            for i, p in enumerate(params):
                if not isinstance(slow[i], torch.Tensor):
                    raise TypeError(f"slow weight {i} must be a tensor, got {type(slow[i]).__name__}")
                if slow[i].shape != p.shape:
                    raise ValueError(f"slow weight {i} has shape {tuple(slow[i].shape)}, its parameter "
                                     f"{tuple(p.shape)}")
        k, alpha, count = state_dict["k"], state_dict["alpha"], state_dict["step_count"]
        check_k_alpha(k, alpha)
        float(alpha)  # what a step takes
        if not isinstance(count, numbers.Integral) or isinstance(count, bool) or count < 0:
            raise ValueError(f"invalid step_count {count!r}")
        self.optimizer.load_state_dict(state_dict["inner"])
        self.k, self.alpha, self.step_count = k, alpha, int(count)
        self.slow, self._slow_params, self._flat_pairs = None, (), None
        if slow is not None:
            self.slow, self._slow_params, self._flat_pairs = self._slow_copies(
                params, [slow[i].detach().to(device=p.device, dtype=p.dtype) for i, p in enumerate(params)])

    def __repr__(self):
        return f"Lookahead({self.optimizer!r}, k={self.k}, alpha={self.alpha})"

    def __getstate__(self):
        """pickle and ``copy.deepcopy``: what the wrapper holds (the inner optimizer, ``k``,
        ``alpha``, the count and the slow weights), as torch.optim's keeps its groups and state:
        not its hooks, nor what an lr scheduler put on it (a ``step`` that calls the original
        wrapper's, which a copy's steps then took)."""
        return {name: self.__dict__[name] for name in _KEPT}

    def __setstate__(self, state):
        self.__dict__.update(state)
        for name in _HOOKS:
            self.__dict__.setdefault(f"_optimizer_{name}_hooks", OrderedDict())


_KEPT = ("optimizer", "k", "alpha", "step_count", "slow", "_slow_params", "_flat_pairs")
