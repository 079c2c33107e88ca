"""One flat buffer of parameters and one of gradients per (device, dtype): the views the
parameters and their ``.grad``s are, and the checks that tell whether they still are."""
import sys

import numpy as np
import torch

# A tensor's address, as the checks of every step read it: ``const_data_ptr`` (torch 2.1+) is
# ``data_ptr`` without its preparation for a write (a copy-on-write storage's copy), 1-2% of a
# 200-tensor step at 10^5.
data_ptr = getattr(torch.Tensor, "const_data_ptr", torch.Tensor.data_ptr)
# The number of tensors holding a storage: O(1), where a check of every gradient view's memory
# costs a data_ptr() per tensor.  (A private function of torch's; without it, that check.)
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def dense_strides(t):
    """``t``'s strides where its elements fill their span of memory without gaps or overlaps
    (contiguous, channels_last, transposed, ...), else row-major ones: the layout its view in a
    flat buffer takes, so that a parameter keeps its memory format (its gradients and its state
    follow it, as torch's ``preserve_format`` does).  A tensor of no elements keeps its own."""
    if not t.numel():
        return tuple(t.stride())
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n != 1), key=lambda d: d[1]):
        if stride != expected:
            break
        expected *= size
    else:
        return tuple(t.stride())
    strides, step = [], 1
    for n in reversed(t.shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def byte_spans(bufs):
    """The (first, end) byte addresses of each flat buffer in ``bufs``."""
    return [(buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()) for buf in bufs]


def starts_inside(ptrs, memory):
    """Which of the addresses ``ptrs`` lie in one of the buffers ``memory`` (see :func:`byte_spans`).
    A tensor that shares a buffer's bytes starts inside it, also one NumPy made (a storage of
    its own, the same bytes); none starts before a buffer and reaches into it, each buffer
    being an allocation of its own."""
    ptrs = np.array(ptrs, dtype=np.uint64)
    inside = np.zeros(len(ptrs), bool)
    for first, end in memory:
        inside |= (ptrs >= first) & (ptrs < end)
    return inside


def unaliased(sources, ptrs, memory):
    """``sources`` (with their ``data_ptr()``s), each cloned if it starts inside one of the flat
    buffers (``memory``): they are about to be copied into those buffers, and a copy between
    overlapping memory is refused or reads what it already wrote."""
    inside = starts_inside(ptrs, memory)
    if not inside.any():
        return sources
    return [src.clone() if clone else src for src, clone in zip(sources, inside.tolist())]


class Bucket:
    """The parameters of one (device, dtype): flat buffers, layout and one core optimizer."""

    def __init__(self, core, device, dtype):
        self.core, self.device, self.dtype = core, device, dtype
        self.params, self.offsets, self.sizes, self.groups = [], [], [], []
        self.strides = []  # per param: the strides of its views (dense_strides)
        self.shapes = []  # per param: its shape, a torch.Size
        self.flat = self.gflat = self.flat_np = self.gflat_np = None
        self.views, self.gviews, self.ptrs, self.gptrs = [], [], [], []  # ptrs: the views' data_ptr()s
        self.memory = []  # (first, end) byte addresses of the flat parameter and gradient buffers
        self.offsets_np = None  # self.offsets as an array (a Gather's offsets)
        self.gather_cut = None  # a GatherCut for them, kept from step to step
        self.steps = np.zeros(0, np.float32)   # per-param step counts (torch's state["step"]; see _lay_out)
        self.steps_t = None
        self.started = np.zeros(0, bool)       # SGD: the momentum buffer exists
        self.installed = []  # per param: the dict this optimizer put in opt.state, or None
        self.entries = []  # per param: the entries it put there (to see which were replaced)
        self.layout_key = None
        self.runs = self.spans = ()  # see _layout
        self.stepped = []  # the params the step updates (those with a gradient): see FlatOptimizer._stepped
        self.span_bounds = np.zeros((0, 2), np.int64)  # the spans' (first, last), an array
        self.core_groups_key = None  # the hyperparameters the core has, one tuple per run
        self.steps_taken = 0  # the steps this bucket has taken (with or without gradients)
        self.replaced_at = []  # per param: the value of steps_taken at the last step that found its .grad replaced,
        self.replaced_by = []  # and the id() of the tensor it found there
        self.group_values = None  # the torch groups' values they were read from
        self.volatile = False  # whether those values must be read again every step
        self.state_args = None  # the core's state arguments self.state was last pointed at
        self.gstorage = None  # the flat gradient buffer's storage (its _cdata), and the number of
        self.guses = None     # tensors holding it when the gradient views were last known intact

    def release_gview(self, i):
        """A new view for parameter ``i``'s gradient, in place of one held elsewhere that no
        ``.grad`` is any longer (a user kept ``p.grad`` across ``zero_grad()``): the held one
        gets a copy of its values as memory of its own, as torch never writes a gradient it
        dropped again, and the new one is where the next gradients go."""
        held = self.gviews[i]
        with torch.no_grad():
            held.data = held.clone()
        view = self.gviews[i] = self.shaped(self.gflat, i)
        return view

    def shaped(self, buf, i):
        """Parameter ``i``'s view of a flat buffer of this bucket (parameters, gradients, state)."""
        return buf[self.offsets[i]:].as_strided(self.params[i].shape, self.strides[i])

    def read_addresses(self):
        """What is derived from where the flat buffers' memory lies: the buffers as the core
        takes them (NumPy views on the CPU; CUDA tensors, read through
        ``__cuda_array_interface__``), the views' ``data_ptr()``s and the buffers' byte spans.
        Made with the layout, and again when that memory moves under its storage
        (``model.share_memory()``, or one of its tensors sent through torch.multiprocessing):
        the views move with it, NumPy views and kept addresses would not."""
        if self.device.type == "cpu":
            self.flat_np, self.gflat_np = self.flat.detach().numpy(), self.gflat.numpy()
        else:
            self.flat_np, self.gflat_np = self.flat.detach(), self.gflat
        self.ptrs = [v.data_ptr() for v in self.views]
        self.gptrs = [gv.data_ptr() for gv in self.gviews]
        self.memory = byte_spans((self.flat, self.gflat))
        self.gstorage = self.gflat.untyped_storage()._cdata
        self.note_gviews_intact()

    def _gholders(self):
        return None if _storage_use_count is None else _storage_use_count(self.gstorage)

    def note_gviews_intact(self):
        self.guses = self._gholders()

    def gviews_intact(self):
        """Whether every gradient view still lies in the flat gradient buffer: ``p.grad.data =
        t``, ``p.grad.set_(t)`` or ``model.to(memory_format=...)`` (which does the former) move a
        view's memory out of it while ``p.grad`` stays the same tensor.  Each such move drops a
        holder of the buffer's storage.  Where the count differs (a view a user keeps adds one),
        every view is looked at, and the count taken again.  (A view kept and a gradient moved
        between the same two steps would cancel out: that pair goes unseen, where a look at every
        view at every step would cost 10 µs on 200 tensors, a quarter of such a step.)"""
        uses = self._gholders()
        if uses is not None and uses == self.guses:
            return True
        if list(map(data_ptr, self.gviews)) != self.gptrs:
            return False
        self.guses = uses  # all in place: the holders now (a view kept) are the count to compare with
        return True


class Pending:
    """What a step that found replaced tensors does with them (see ``FlatOptimizer._sync``):
    before its kernel (:meth:`copy_in`), the new values go into their flat views; after the
    kernel (:meth:`repoint`), the ``.data`` and ``.grad`` they came from point at those views,
    so that backward accumulates into the flat buffer from then on.  A step refused in between
    has changed no tensor a user holds: the gradient views it copies into are no ``.grad``
    and held by no one, and where a replaced ``.data`` is copied (into the memory of the old
    ``.data``, which a tensor taken before the replacement may still share, a
    ``state_dict()``'s), the copy waits for every check."""
    __slots__ = ("views", "values", "data", "grads", "moved_grads")

    def __init__(self, views, values, data, grads, moved_grads):
        self.views, self.values = views, values  # the flat views, and what each gets
        self.data = data  # (param, view): a replaced .data
        self.grads = grads  # (param, gradient view): a .grad taken over
        self.moved_grads = moved_grads  # (index, new gradient view): a gradient view whose memory was moved

    def copy_in(self):
        if self.views:  # (one call for all)
            with torch.no_grad():
                torch._foreach_copy_(self.views, self.values)

    def repoint(self, b):
        for p, view in self.data:
            p.data = view
        for p, gv in self.grads:
            p.grad = gv
        for i, gv in self.moved_grads:
            b.params[i].grad = b.gviews[i] = gv
            b.gptrs[i] = gv.data_ptr()
        b.note_gviews_intact()


def refs_alone():
    """What :func:`held_elsewhere` and :func:`kept_elsewhere` count of an object that nothing but
    a list and a local variable of the caller's holds, measured by the caller when it asks:
    Python releases count their own references differently, and a frame hook may hold a call's
    arguments too (dynamo's does, after a ``torch.compile(fullgraph=True)`` that failed)."""
    held = [object()]
    local = held[0]
    return _counted(local)


def held_elsewhere(view, alone):
    """Whether a gradient view that the caller holds in a local variable, and its bucket in
    ``gviews``, is held by anything else as well (a tensor a user kept, or a ``.grad``).
    ``alone``: :func:`refs_alone`, from the caller."""
    return sys.getrefcount(view) > alone


def kept_elsewhere(grad, alone):
    """Whether a gradient tensor that a ``.grad`` holds, and that the caller holds in a list and
    a local variable, is held by anything else as well (a tensor the user assigned and keeps, to
    write the next gradients into), or shares its memory with something else (a view of the
    user's tensor, another tensor of its storage, or memory torch did not allocate: a NumPy
    array's, through ``torch.from_numpy``, DLPack or ``torch.frombuffer``).  torch reads
    ``p.grad`` at every step, so such a ``.grad`` stays the user's: the step copies it in
    instead of pointing ``.grad`` at its flat view.  ``alone``: :func:`refs_alone`, from the caller."""
    if sys.getrefcount(grad) > alone + _HELD_BY_ITS_TENSOR or grad._base is not None:
        return True
    storage = grad.untyped_storage()
    return not storage.resizable() or (_storage_use_count is not None
                                       and _storage_use_count(storage._cdata) > _ONLY_ITS_TENSOR)


def _lone_storage_holders():
    """What :func:`kept_elsewhere` counts of the holders of a storage only its tensor holds (the
    storage object made to ask holds it too)."""
    tensor = torch.zeros(1)
    storage = tensor.untyped_storage()
    return _storage_use_count(storage._cdata)


def _counted(view):  # (counts as held_elsewhere and kept_elsewhere count: from one frame, its argument)
    return sys.getrefcount(view)


def _refs_of_a_grad_only_its_parameter_holds():
    """What :func:`kept_elsewhere` counts of a ``.grad`` nothing else holds, read into a list and
    a local variable (torch's tensor then holds its Python object as well)."""
    p = torch.zeros(1, requires_grad=True)
    p.grad = torch.zeros(1)
    grads = [p.grad]
    grad = grads[0]
    return _counted(grad)


# the reference a tensor (a parameter's, through .grad) holds to a Python object of a tensor
# that nothing else holds
_HELD_BY_ITS_TENSOR = _refs_of_a_grad_only_its_parameter_holds() - refs_alone()
_ONLY_ITS_TENSOR = None if _storage_use_count is None else _lone_storage_holders()


def as_tensor(buf, device):
    return torch.from_numpy(buf) if isinstance(buf, np.ndarray) else torch.as_tensor(buf, device=device)
