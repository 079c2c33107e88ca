"""Named arrays packed into one flat parameter buffer and one flat gradient buffer."""
from collections.abc import Mapping

import numpy as np

from flatopt.backend import SUPPORTED_DTYPES
from flatopt.optimizers.base import _plain


class FlatParams:
    """Packs a dict (or list) of arrays into one contiguous parameter buffer ``params`` and one
    gradient buffer ``grads`` (zeros), and hands back views with the original shapes.

    A hand-written model keeps using its named arrays while ``opt.step(flat.params,
    flat.grads)`` updates all of them in one kernel call::

        flat = FlatParams({"W1": W1, "b1": b1, "W2": W2, "b2": b2})
        W1, gW1 = flat["W1"], flat.grad("W1")      # views: writes go to the flat buffers
        opt = flatopt.AdamW(param_groups=flat.param_groups({"b1": {"weight_decay": 0.0}}))

    CuPy arrays are packed into CuPy buffers (then the CUDA kernels run).
    """

    def __init__(self, arrays, dtype=None):
        items = list(arrays.items()) if isinstance(arrays, Mapping) else list(enumerate(arrays))
        if not items:
            raise ValueError("FlatParams needs at least one array")
        names = [name for name, _ in items]
        if len(set(names)) != len(names):
            raise ValueError("FlatParams: duplicate array names")
        xp = _array_module(items[0][1])
        for name, value in items:
            if not hasattr(value, "dtype") or not hasattr(value, "shape"):
                raise TypeError(f"FlatParams: {name!r} is not an array (got {type(value).__name__})")
            if _array_module(value) is not xp:
                raise TypeError("FlatParams: mix of host and GPU arrays")
            _check_kind(name, value, converting=dtype is not None)
        dtype = np.dtype(dtype) if dtype is not None else np.result_type(*(v.dtype for _, v in items))
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"FlatParams: dtype {dtype}; flatopt supports float32 and float64")
        sizes = [int(np.prod(v.shape)) for _, v in items]
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.params = xp.empty(int(bounds[-1]), dtype=dtype)
        self.grads = xp.zeros(int(bounds[-1]), dtype=dtype)
        self.slices = {name: (int(a), int(b)) for name, a, b in zip(names, bounds[:-1], bounds[1:])}
        self.shapes = {name: tuple(v.shape) for name, v in items}
        for name, value in items:
            a, b = self.slices[name]
            self.params[a:b] = xp.asarray(value, dtype=dtype).reshape(-1)
        self._make_views()

    def _make_views(self):
        self.views = {name: self.params[a:b].reshape(self.shapes[name]) for name, (a, b) in self.slices.items()}
        self.grad_views = {name: self.grads[a:b].reshape(self.shapes[name]) for name, (a, b) in self.slices.items()}

    def __getstate__(self):
        """pickle and copy.deepcopy: the flat buffers and the layout; the named arrays are made
        again as views of the copies (copied one by one, they were arrays of their own, which
        no step updates)."""
        return {"params": self.params, "grads": self.grads, "slices": self.slices, "shapes": self.shapes}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._make_views()

    def __getitem__(self, name):
        """The parameter array ``name``: a view into ``params``."""
        return self.views[name]

    def grad(self, name):
        """The gradient array of ``name``: a view into ``grads``."""
        return self.grad_views[name]

    def __iter__(self):
        return iter(self.slices)

    def __len__(self):
        return len(self.slices)

    def keys(self):
        return self.slices.keys()

    def param_groups(self, overrides=None):
        """Core parameter groups covering every array in order, with per-array
        hyperparameter ``overrides`` (``{name: {"weight_decay": 0.0}}``); neighbours with
        the same overrides share one group."""
        overrides = dict(overrides or {})
        unknown = set(overrides) - set(self.slices)
        if unknown:
            raise KeyError(f"FlatParams has no arrays named {sorted(unknown, key=str)}")
        for name, extra in overrides.items():
            if not isinstance(extra, Mapping):
                raise TypeError(f"FlatParams: the overrides of {name!r} must be a dict of hyperparameters, "
                                f"got {type(extra).__name__}")
            ranged = sorted({"start", "stop"} & extra.keys())
            if ranged:
                raise ValueError(f"FlatParams: the overrides of {name!r} set {ranged}; a group's range is its "
                                 "arrays' place in the buffer")
        groups = []
        for name, (start, stop) in self.slices.items():
            extra = dict(overrides.get(name, {}))
            if stop == start:
                continue
            if groups and _same_overrides(groups[-1][1], extra) and groups[-1][0]["stop"] == start:
                groups[-1][0]["stop"] = stop
            else:
                groups.append(({"start": start, "stop": stop, **extra}, extra))
        return [group for group, _ in groups]

    def __repr__(self):
        shapes = ", ".join(f"{name}: {shape}" for name, shape in self.shapes.items())
        return f"FlatParams({len(self.params)} x {self.params.dtype}; {shapes})"


def _check_kind(name, value, converting):
    """Real floating-point arrays, or with an explicit ``dtype`` integer and boolean ones too:
    an integer array among floats would otherwise make the whole buffer float64 (NumPy's
    promotion), and a complex one lose its imaginary part."""
    if isinstance(value, np.ma.MaskedArray):  # its masked values would be packed and optimized
        raise TypeError(f"FlatParams: {name!r} is a masked array; flatopt does not support masked arrays")
    kind = np.dtype(value.dtype).kind
    if kind == "f" or converting and kind in "iub":
        return
    hint = " (give dtype=... to convert it)" if kind in "iub" else ""
    raise TypeError(f"FlatParams: {name!r} is {np.dtype(value.dtype)}; flatopt optimizes real floating-point "
                    f"arrays{hint}")


def _same_overrides(a, b):
    """Whether two arrays' overrides are equal, each value read as the optimizers read it (an
    array of betas as the tuple of its values: ``==`` on arrays has no single truth value)."""
    return a.keys() == b.keys() and all(_plain(a[k], k) == _plain(b[k], k) for k in a)


def _array_module(array):
    if type(array).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np
