"""PyTorch adapter: ``torch.optim.Optimizer`` subclasses that run one flatopt kernel per
(device, dtype) of parameters, on flat buffers the parameters live in (zero copy).

* ``SGD``, ``RMSprop``, ``Adam`` and ``AdamW`` take torch 2.13's arguments (same names, order and
  defaults, positional too); ``ADOPT`` takes :class:`flatopt.ADOPT`'s.  torch's implementation
  flags (``foreach``, ``fused``, ``capturable``, ``differentiable``) are accepted and recorded in
  the param groups, as torch records them; ``foreach`` and ``fused`` change nothing (a step is
  always one fused kernel per bucket), except that Adam and AdamW refuse a tensor ``lr`` or
  ``betas`` with ``foreach=True`` where torch does, with its errors; ``capturable=True`` and
  ``differentiable=True`` raise a ``ValueError`` (the step runs host code: no CUDA graph
  capture, no autograd through it).
  Param groups, ``add_param_group``, ``state_dict`` / ``load_state_dict`` (checkpoints of older
  torch releases too: missing group keys get torch's defaults), lr schedulers, ``GradScaler``,
  ``clip_grad_norm_``, ``copy.deepcopy`` and pickling work as with ``torch.optim``.  So does
  ``torch.compile`` of a training step: as for torch.optim's own methods, dynamo does not trace
  ``step``, ``zero_grad``, ``add_param_group``, ``state_dict`` and ``load_state_dict``, which run
  as they are between the compiled graphs (Lookahead's too).
* At construction every parameter's storage moves into one contiguous flat buffer per (device,
  dtype): ``p.data`` becomes a view of it, with the parameter's own strides where its elements
  are dense (a channels_last or transposed weight keeps its memory format; its gradient views
  and its state follow it, as torch's ``preserve_format`` state does).  A step makes each
  ``p.grad`` a view of a flat gradient buffer, so with ``zero_grad(set_to_none=False)`` backward
  accumulates straight into it.  After ``zero_grad()`` (``set_to_none=True``, torch's default)
  the fresh gradients autograd makes stay where they are: the next ``zero_grad()`` drops them,
  and pointing each ``.grad`` at its view would cost a quarter of such a step.  The step reads
  them there (CPU buckets of ``_gather_min`` = 2^18 elements or more; a gradient with other
  strides than its parameter, one inside this optimizer's buffers, one whose values are not its
  memory's (a negative view, a ``__torch_dispatch__`` subclass) or one with no memory is copied
  in first) or
  copies them into the flat buffer (smaller buckets, CUDA).  (Gradients are not pre-assigned at
  construction: a parameter that never got a gradient must stay ``None`` so that it is skipped,
  as torch skips it.)
* As torch saves a view with its whole storage, ``torch.save`` of part of the model (one
  parameter, a submodule's ``state_dict()``) writes the whole flat buffer: save clones of the
  tensors (``{k: v.clone() for k, v in sd.items()}``).  A whole model's ``state_dict()`` is
  written once, at its own size.
* The kernel writes the parameters through their memory, where autograd does not see it: the
  step bumps the version counter of every parameter it updates (``_version``; and Lookahead's
  pull, of every parameter), as torch's in-place step does (its default and foreach paths;
  torch's fused path on the CPU leaves them as they are).  A backward through a graph that
  saved a parameter before the step then fails as in torch ("modified by an inplace
  operation") instead of computing with the stepped values.
* Parameters whose ``.grad`` is ``None`` are skipped: no update, no decay, no state or
  step change.  Replaced ``.data`` tensors (new memory) are copied in before the step and
  re-pointed at the flat views once it is taken (a refused step leaves them the user's); so are
  replaced ``.grad`` tensors, but after ``zero_grad()`` (see above) and but one the user keeps
  (``p.grad = buf``, the next gradients written into ``buf``; or a view of memory the user
  keeps), which stays ``p.grad`` and is copied in at every step, as torch reads ``p.grad`` at
  every step; and gradient views whose memory was replaced (``p.grad.data = t``,
  ``p.grad.set_(t)``, ``model.to(memory_format=...)``): the step notices those from the
  number of tensors holding the flat gradient storage (O(1)), and looks at every view where
  that number changed.  A view of a gradient kept and a gradient moved between the same two
  steps cancel out in that number: that pair goes unseen.
* ``state[p]`` holds torch's names (``step``, ``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq``, ``momentum_buffer``, ``square_avg``, ``grad_avg``) as views of the
  flat state buffers, only the buffers ``p``'s group uses (SGD: ``momentum_buffer`` alone, and
  no entry at ``momentum=0``, as torch); ``step`` is a scalar view of one per-bucket step
  array, float32 as torch's (float64 where that is torch's default dtype when the parameters
  are laid out).  Zero-size parameters get state and step counts as in torch.
* Editing the state as torch allows is seen at the next step: ``opt.state = ...``,
  ``opt.state.clear()``, ``del opt.state[p]`` or ``opt.state[p].clear()`` restart those
  parameters' state (step 0, zero buffers); ``opt.state[p]['exp_avg'] = t`` or
  ``opt.state[p]['step'] = t`` copies ``t`` into the flat state.  (``opt.state`` and its
  dicts note such edits, so that a step checks them at O(1) cost.)  In-place changes of a
  state buffer (``exp_avg.zero_()``, ``copy_``) act directly: the buffers are views.
* Editing ``param_groups[i]['params']`` (append, remove, replace an element, assign a new
  list) or appending to ``param_groups`` is seen at the next step or ``zero_grad``, as
  torch reads the lists then (the lists note edits; a list a user assigned is compared
  with what it held): the parameters are laid out again, keeping their state; a parameter
  removed keeps it too, as copies in ``opt.state[p]``, taken up again if it comes back (as
  in torch, whose ``state_dict()`` fails with a ``KeyError`` meanwhile).  The state tensors and
  ``.grad`` views taken before then keep their last values (the ``state[p]`` dicts stay the
  same objects and hold the new views).  A user's own entries in ``state[p]`` stay, through
  ``load_state_dict``, copies and pickles too, as in torch.
* ``load_state_dict`` refuses a checkpoint whose groups lack a hyperparameter every
  checkpoint of this optimizer holds (another optimizer's: torch would fail at the next
  step), and one whose state does not fit its parameters, before anything changes (after
  the load pre-hooks, which may mend it, as torch's checks come after them).
* A parameter that is a view of a larger tensor which is no parameter (``nn.Parameter(
  buffer[2:6])``) moves into the flat buffer: that tensor no longer sees the updates.
* A tensor ``lr`` or ``betas`` is read as the Python float it holds: the step's scalars are
  computed in double precision, as for floats (torch computes with a float32 tensor in
  float32, which differs by that rounding on a float64 model).
* A parameter whose dtype or device changed (``model.double()``, ``p.data =
  p.data.cuda()``) raises a ``RuntimeError`` at the next step, before any update: build a
  new optimizer.  A parameter listed twice (torch warns, updates it twice per step, and
  plans to make it an error) raises a ``ValueError``: list it once.  An expanded parameter
  (a stride of 0: its elements share memory, which the layout would untie) raises torch's
  ``RuntimeError`` for a step that writes it, at construction or at the step that finds it.
* Shared memory.  ``model.share_memory()`` after the optimizer is built moves the flat
  buffers' memory into shared memory under their storage (as sending one of their tensors
  through ``torch.multiprocessing`` does); the next step follows them.  A parameter already
  in shared memory when the optimizer is built (or laid out again) raises a ``ValueError``:
  moving it into a flat buffer would hide the updates from the processes sharing it.  For
  Hogwild, build the optimizer before ``model.share_memory()`` and fork the workers with it
  (a model or optimizer sent to a spawned worker arrives in shared memory: refused there).
* ``Lookahead(optimizer, k=5, alpha=0.5)`` wraps any torch optimizer (per tensor); around a
  flatopt.torch optimizer its slow weights mirror the flat buffers, so the every-``k``
  pull is two tensor ops per buffer.  The slow weights are the parameters' values at the
  first step, as the core's (pytorch-optimizer's wrapper copies them at construction: a model
  loaded in between starts there from the values it had before).

Not seen (checking would cost a pass over every parameter at every step, as much as the
rest of the step's Python on a model of a few hundred tensors):

* ``p.data = p.data.t()`` (or any view with the same first element but other strides): the
  flat view stays in place and updates land in the old layout.  Replace ``.data`` by a
  tensor with its own memory (``p.data = p.data.t().contiguous()``).
* An in-place change of a ``step`` tensor (``state[p]['step'].zero_()``): the kernel keeps
  its own counts.  Assign a new tensor instead (``state[p]['step'] = torch.tensor(0.)``).
* ``share_memory_()`` on a state tensor: its memory moves away from the flat state the
  kernel updates, and it stops following the steps (shared optimizer state, as in A3C's
  shared Adam, needs torch.optim).

CUDA parameters go to the core as tensors (its backend reads ``__cuda_array_interface__``); they
are tested on a real GPU (``tests/gpu/test_gpu_torch.py``).  Not supported: sparse gradients,
complex and half dtypes.

The package's modules: ``_flat`` (the layout, the state views and the step, shared by every
optimizer), ``_bucket`` (one flat buffer of parameters and one of gradients, and the checks
that the views are still in them), ``_hooks`` (torch.compile, step hooks, profilers and
version counters), ``_edits`` (``opt.state`` and the groups' ``params`` lists, which note
edits), ``_checks`` (what a parameter or group must be), ``_optimizers`` (the classes with
torch's signatures) and ``_lookahead``.
"""
from flatopt.torch._lookahead import Lookahead
from flatopt.torch._optimizers import ADOPT, SGD, Adam, AdamW, RMSprop

__all__ = ["SGD", "RMSprop", "Adam", "AdamW", "ADOPT", "Lookahead"]
