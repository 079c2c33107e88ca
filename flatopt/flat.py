"""Named arrays packed into one flat parameter buffer and one flat gradient buffer."""
from collections.abc import Mapping

import numpy as np

from flatopt.backend import SUPPORTED_DTYPES, byte_extent
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
        if hasattr(arrays, "shape") and hasattr(arrays, "dtype"):  # (a list of its rows, else)
            raise TypeError(f"FlatParams takes a dict (or list) of arrays, got one {type(arrays).__name__}: "
                            "name it, FlatParams({'w': w})")
        items = list(arrays.items()) if isinstance(arrays, Mapping) else list(enumerate(arrays))
        if not items:
            raise ValueError("FlatParams needs at least one array")
        names = [name for name, _ in items]  # (unique: a dict's keys, or a list's indices)
        xp = _array_module(items[0][1])
        for name, value in items:
            if not hasattr(value, "dtype") or not hasattr(value, "shape"):
                raise TypeError(f"FlatParams: {name!r} is not an array (got {type(value).__name__})")
            if _array_module(value) is not xp:
                raise TypeError("FlatParams: mix of host and GPU arrays")
            _check_kind(name, value, converting=dtype is not None)
        _check_untied(items, xp)
        if dtype is not None:
            dtype = np.dtype(dtype)
        else:
            try:
                dtype = np.result_type(*(v.dtype for _, v in items))
            except TypeError:  # (NumPy's DTypePromotionError: bfloat16 and float16, say)
                kinds = sorted({str(np.dtype(v.dtype)) for _, v in items})
                raise TypeError(f"FlatParams: the arrays' dtypes {kinds} have no common dtype; give dtype=np.float32 "
                                "(or np.float64) to convert them") from None
        if dtype not in SUPPORTED_DTYPES:
            hint = " (give dtype=np.float32 or np.float64 to convert the arrays)" if _is_float(dtype) else ""
            raise TypeError(f"FlatParams: dtype {dtype}; flatopt supports float32 and float64{hint}")
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

    def param_groups(self, overrides=None, opt=None):
        """Core parameter groups covering every array in order, with per-array
        hyperparameter ``overrides`` (``{name: {"weight_decay": 0.0}}``); neighbours with
        the same overrides share one group.

        ``opt``: the optimizer (or Lookahead) the groups are for, when they replace its groups
        (``opt.param_groups = flat.param_groups(overrides, opt)``): neighbours it holds at
        different step counts (or SGD momentum flags) are then kept apart, so that every array
        goes on with its own.  A group has one count, and one that joins arrays at different
        counts starts at step 0 (an array unfrozen next to one that stepped, say)."""
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
        counts_at = _counts_reader(opt, len(self.params))
        groups = []
        for name, (start, stop) in self.slices.items():
            extra = dict(overrides.get(name, {}))
            if stop == start:
                continue
            counts = counts_at(start, stop)
            if (groups and _same_overrides(groups[-1][1], extra) and groups[-1][0]["stop"] == start
                    and groups[-1][2] == counts):
                groups[-1][0]["stop"] = stop
            else:
                groups.append(({"start": start, "stop": stop, **extra}, extra, counts))
        return [group for group, _, _ in groups]

    def __repr__(self):
        shapes = ", ".join(f"{name}: {shape}" for name, shape in self.shapes.items())
        return f"FlatParams({len(self.params)} x {self.params.dtype}; {shapes})"


def _check_kind(name, value, converting):
    """Real floating-point arrays, or with an explicit ``dtype`` integer and boolean ones too:
    an integer array among floats would otherwise make the whole buffer float64 (NumPy's
    promotion), and a complex one lose its imaginary part."""
    if isinstance(value, np.ma.MaskedArray):  # its masked values would be packed and optimized
        raise TypeError(f"FlatParams: {name!r} is a masked array; flatopt does not support masked arrays")
    try:
        dtype = np.dtype(value.dtype)
    except TypeError:  # (a torch tensor's dtype, say)
        raise TypeError(f"FlatParams: {name!r} is a {type(value).__module__}.{type(value).__name__} of dtype "
                        f"{value.dtype}, which NumPy does not read; pass NumPy, CuPy or JAX arrays (for a torch "
                        "model, flatopt.torch)") from None
    kind = dtype.kind
    if _is_float(dtype) or converting and kind in "iub":
        return
    hint = " (give dtype=... to convert it)" if kind in "iub" else ""
    raise TypeError(f"FlatParams: {name!r} is {dtype}; flatopt optimizes real floating-point arrays{hint}")


def _is_float(dtype):
    """Whether ``dtype`` is a real floating-point one: NumPy's, or one of ml_dtypes' (bfloat16,
    float8_*: JAX's), which NumPy files under kind ``V``."""
    if dtype.kind == "f":
        return True
    if dtype.type.__module__ != "ml_dtypes":
        return False
    import ml_dtypes  # (imported already: an array of its dtype exists)
    try:
        ml_dtypes.finfo(dtype)
    except ValueError:  # (int4 and the like)
        return False
    return True


def _check_untied(items, xp):
    """Refuses arrays that share memory (the same array twice, a tensor and its transpose):
    packing gives each its own place in the flat buffer, which would untie them.  Arrays whose
    byte ranges overlap are looked at element by element (interleaved views share none)."""
    array_type = np.ndarray if xp is np else xp.ndarray  # (JAX arrays are values: nothing to tie)
    spans = []
    for name, value in items:
        if isinstance(value, array_type) and value.size:
            start, end = _byte_range(value)
            spans.append((start, end, name, value))
    spans.sort(key=lambda span: span[:2])
    open_spans = []
    for start, end, name, value in spans:
        open_spans = [span for span in open_spans if span[1] > start]
        for _, _, other_name, other in open_spans:
            if xp.shares_memory(other, value):
                raise ValueError(f"FlatParams: {other_name!r} and {name!r} share memory (the same array twice, or "
                                 "views of one array); packing gives each its own place in the flat buffer, which "
                                 "would untie them: pass a tied array once")
        open_spans.append((start, end, name, value))


def _byte_range(array):
    """The (first, end) byte addresses an array's elements span (any strides)."""
    first = array.__array_interface__["data"][0] if isinstance(array, np.ndarray) else array.data.ptr
    low, high = byte_extent(array.shape, array.strides, array.itemsize)
    return first + low, first + high


def _counts_reader(opt, n):
    """A function of an array's element range: the step counts (and flags) ``opt`` (an
    optimizer or Lookahead, or ``None``) holds for the groups that range lies in, as a
    comparable tuple; always ``None`` without ``opt``."""
    if opt is None:
        return lambda start, stop: None
    inner = getattr(opt, "inner", opt)
    groups, states = inner.param_groups, inner.group_state
    if groups is None:
        held = [(0, n, states[0])]
    else:
        held = [(g["start"], g["stop"], s) for g, s in zip(groups, states)
                if isinstance(g, Mapping) and isinstance(s, Mapping)]

    def counts_at(start, stop):
        return tuple((a, tuple(sorted(s.items()))) for a, b, s in held if a < stop and start < b)
    return counts_at


def _same_overrides(a, b):
    """Whether two arrays' overrides are equal, each value read as the optimizers read it (an
    array of betas as the tuple of its values: ``==`` on arrays has no single truth value, and
    one of more than one dimension is compared as an array)."""
    return a.keys() == b.keys() and all(_same_value(_plain(a[k], k), _plain(b[k], k)) for k in a)


def _same_value(x, y):
    if hasattr(x, "__array__") or hasattr(y, "__array__"):
        return np.array_equal(np.asarray(x), np.asarray(y))
    return x == y


def _array_module(array):
    if type(array).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np
