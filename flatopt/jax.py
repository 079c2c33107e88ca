"""JAX adapter: pytrees flattened to one flat buffer (``jax.flatten_util.ravel_pytree``), so
each step is one flatopt kernel call however many leaves the tree has.

* :func:`as_optax` wraps a flatopt optimizer as an optax ``GradientTransformation``
  (``init`` / ``update``) for an ordinary optax loop, outside ``jax.jit``.
* :class:`TreeOptimizer` is the direct path: pytree of gradients in, updated pytree of
  parameters out, with the flat master copy kept between steps.
"""
import numpy as np
from jax.flatten_util import ravel_pytree


def _flat(tree):
    """A pytree's leaves as one NumPy buffer (a zero-copy read-only view when JAX allows)."""
    flat, unravel = ravel_pytree(tree)
    return np.asarray(flat), unravel


class _FlatState:
    """optax state of :func:`as_optax`: the optimizer's own state stays in ``opt``."""

    def __init__(self, opt):
        self.opt = opt

    def __repr__(self):
        return f"FlatoptState({self.opt!r})"


def as_optax(opt):
    """``opt`` as an optax ``GradientTransformation``.

    ``update(grads, state, params)`` returns ``updates = new_params - params`` computed in
    the parameters' dtype by one kernel call on a flat copy of ``params``.  ``params`` is
    required (flatopt's rules read the parameters: weight decay, and the update itself).
    """

    def init(params):
        del params
        return _FlatState(opt)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("flatopt's optax transformation needs params: tx.update(grads, state, params)")
        flat_params, unravel = _flat(params)
        new_params = np.array(flat_params, copy=True)
        flat_grads, _ = _flat(grads)
        if flat_grads.shape != new_params.shape:
            raise ValueError(f"grads have {flat_grads.size} elements but params have {new_params.size}")
        state.opt.step(new_params, flat_grads)
        return unravel(np.subtract(new_params, flat_params)), state

    try:
        import optax
    except ImportError:
        from types import SimpleNamespace
        return SimpleNamespace(init=init, update=update)
    return optax.GradientTransformation(init, update)


class TreeOptimizer:
    """Pytree in, pytree out, one flat master copy kept between steps::

        tree_opt = TreeOptimizer(flatopt.AdamW(lr=1e-3), params)
        params = tree_opt.step(grads)        # one conversion in, one kernel call, one out
    """

    def __init__(self, opt, params):
        flat, self._unravel = _flat(params)
        self.opt = opt
        self.master = np.array(flat, copy=True)  # writable: JAX arrays' NumPy views are read-only

    def step(self, grads):
        flat_grads, _ = _flat(grads)
        self.opt.step(self.master, flat_grads)
        return self.params

    @property
    def params(self):
        return self._unravel(self.master)

    def state_dict(self):
        return {"params": self.master.copy(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state_dict):
        params = np.asarray(state_dict["params"])
        if params.shape != self.master.shape or params.dtype != self.master.dtype:
            raise ValueError(f"checkpoint params {params.shape} {params.dtype} do not match "
                             f"{self.master.shape} {self.master.dtype}")
        self.opt.load_state_dict(state_dict["optimizer"])
        self.master[:] = params
