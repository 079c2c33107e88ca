"""flatopt.torch's optimizers: torch.optim's signatures over flatopt's core rules."""
import inspect

import flatopt
from flatopt.torch._flat import FlatOptimizer, public


@public
class SGD(FlatOptimizer):
    """``torch.optim.SGD``'s rule (see :class:`flatopt.SGD`), one kernel per (device, dtype)."""
    _core_cls = flatopt.SGD
    _step_in_state = False
    _saved_keys = ("lr", "momentum", "dampening", "weight_decay")

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, foreach=foreach,
                                      differentiable=differentiable, fused=fused))


@public
class RMSprop(FlatOptimizer):
    """``torch.optim.RMSprop``'s rule (see :class:`flatopt.RMSprop`), one kernel per (device, dtype)."""
    _core_cls = flatopt.RMSprop
    _saved_keys = ("lr", "alpha", "eps", "weight_decay")

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                                      weight_decay=weight_decay, capturable=capturable, foreach=foreach,
                                      maximize=maximize, differentiable=differentiable))


@public
class Adam(FlatOptimizer):
    """``torch.optim.Adam``'s rule (see :class:`flatopt.Adam`), one kernel per (device, dtype)."""
    _core_cls = flatopt.Adam
    _saved_keys = ("lr", "betas", "eps", "weight_decay")
    _foreach_refuses_tensors = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize, foreach=foreach, capturable=capturable,
                                      differentiable=differentiable, fused=fused,
                                      decoupled_weight_decay=decoupled_weight_decay))


@public
class AdamW(FlatOptimizer):
    """``torch.optim.AdamW``'s rule (see :class:`flatopt.AdamW`), one kernel per (device, dtype)."""
    _core_cls = flatopt.AdamW
    _saved_keys = ("lr", "betas", "eps", "weight_decay")
    _foreach_refuses_tensors = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize, foreach=foreach, capturable=capturable,
                                      differentiable=differentiable, fused=fused, decoupled_weight_decay=True))

    def _complete_group(self, group):
        super()._complete_group(group)
        group["decoupled_weight_decay"] = True  # as torch's AdamW.__setstate__


_ADOPT_CLIP = inspect.signature(flatopt.ADOPT).parameters["clip_lambda"].default


@public
class ADOPT(FlatOptimizer):
    """ADOPT (see :class:`flatopt.ADOPT`), one kernel per (device, dtype); torch has no ADOPT:
    :class:`flatopt.ADOPT`'s arguments, and torch's implementation flags as for ``Adam``."""
    _core_cls = flatopt.ADOPT
    _saved_keys = ("lr", "betas", "eps", "weight_decay")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0, decouple=False, *,
                 clip_lambda=_ADOPT_CLIP, maximize=False, foreach=None, capturable=False, differentiable=False,
                 fused=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decouple=decouple,
                                      clip_lambda=clip_lambda, maximize=maximize, foreach=foreach,
                                      capturable=capturable, differentiable=differentiable, fused=fused))

    @property
    def clip_lambda(self):
        """The clip schedule, an attribute as in the authors' implementation (not a group key:
        param_groups stay picklable); one assigned (``None``: no clipping) acts from the next step."""
        return self._core_kwargs["clip_lambda"]

    @clip_lambda.setter
    def clip_lambda(self, value):
        self._core_cls(**dict(self._core_kwargs, clip_lambda=value))  # refused here if it is no schedule
        self._core_kwargs["clip_lambda"] = value
        for b in self._buckets.values():
            b.core.clip_lambda = value
