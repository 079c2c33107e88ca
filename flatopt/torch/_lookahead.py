"""Lookahead around any torch optimizer; around a flatopt.torch one, on its flat buffers."""
from collections import OrderedDict
from contextlib import contextmanager
from operator import is_

import torch

from flatopt.lookahead import check_k_alpha
from flatopt.torch._flat import FlatOptimizer, global_hooks_or_profiler, outside_dynamo, public


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
        self._slow_params = list(params)  # whose slow weight each of self.slow is
        inner = self.optimizer
        if isinstance(inner, FlatOptimizer):
            where = {}
            pairs = []
            for b in inner._buckets.values():
                buf = torch.empty_like(b.flat)
                pairs.append((b.flat, buf))
                for i, p in enumerate(b.params):
                    where[id(p)] = b.shaped(buf, i)
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

    step.hooked = True

    def _step(self, closure=None):
        check_k_alpha(self.k, self.alpha)
        if isinstance(self.optimizer, FlatOptimizer):
            self.optimizer._take_edits()  # a group edit lays the inner buffers out again: first
        params = self._params()
        if self.slow is None:
            self._make_slow(params)
        elif (len(params) != len(self._slow_params) or not all(map(is_, params, self._slow_params))
              or (self._flat_pairs is not None and self._flat_current() is None)):
            # the groups' lists were edited: each parameter keeps its slow weight, a new one starts
            # from its value now (as the slow weights of the first step)
            kept = {id(p): q for p, q in zip(self._slow_params, self.slow)}
            self._make_slow(params, [kept.get(id(p), p.detach()) for p in params])
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

    _step_with_hooks = torch.optim.Optimizer.profile_hook_step(_step)

    @outside_dynamo
    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @outside_dynamo
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
            "slow": None if self.slow is None else {i: q.clone() for i, q in enumerate(self.slow)},
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
            if len(slow) != len(params):
                raise ValueError(f"state_dict has {len(slow)} slow weights for {len(params)} parameters")
            for i, p in enumerate(params):
                if slow[i].shape != p.shape:
                    raise ValueError(f"slow weight {i} has shape {tuple(slow[i].shape)}, its parameter "
                                     f"{tuple(p.shape)}")
        k, alpha, count = int(state_dict["k"]), float(state_dict["alpha"]), int(state_dict["step_count"])
        check_k_alpha(k, alpha)
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
