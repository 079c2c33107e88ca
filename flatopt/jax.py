"""JAX adapter: pytrees flattened to one flat buffer (``jax.flatten_util.ravel_pytree``), so
each step is one flatopt kernel call however many leaves the tree has.

* :func:`as_optax` wraps a flatopt optimizer as an optax ``GradientTransformation``.  It is
  a pure one, as optax's own: ``init`` returns a fresh state that is a pytree of arrays (the
  optimizer's flat state buffers and its step counters, :class:`FlatoptState`), and
  ``update`` returns a new state without changing the one it was given.  The optimizer
  passed in only supplies hyperparameters and param groups; it is copied by ``as_optax``
  and never stepped.  So the transformation composes with ``jax.jit``, ``optax.chain``,
  ``optax.apply_if_finite``, ``optax.MultiSteps`` and anything else that treats the state
  as a value.
* :func:`update_and_apply` is ``tx.update`` followed by ``optax.apply_updates`` in one pass,
  for such a transformation: it returns the new parameters (exactly ``opt.step``'s) and the
  new state, and on the CPU steps donated parameters in place.
* :class:`TreeOptimizer` is the direct path: pytree of gradients in, updated pytree of
  parameters out, with the flat master copy and the optimizer's state kept between steps.

How an update runs.  flatopt's rules are Numba code, which runs on buffers, not on JAX
tracers, so ``update`` is a jitted function (the caller's ``jax.jit`` or, called eagerly,
its own) that hands the step to one of two paths, chosen by the platform it is lowered for:

* On the CPU: XLA calls the optimizer's rule itself, through an FFI handler
  (:mod:`flatopt.kernels.xla`), on the leaves of ``params`` and ``grads`` as XLA holds them
  and on the flat state buffers, aliased in place.  Nothing is flattened or copied; only the
  step's scalars come from the host, through a small ``jax.pure_callback`` that turns the
  step counters into the rule's table with the optimizer's own code.  At 10^7 elements in
  200 leaves an update takes 10 ms on this project's VM (optax's Adam: 8 ms), where the
  callback path below took 169 ms.
* Elsewhere (JAX on a GPU), where XLA refuses the handler, and for a Lookahead whose
  groups are all frozen: ``jax.pure_callback`` hands the flattened buffers and the state to
  a host function that steps a private copy of the optimizer on NumPy copies
  (:class:`_HostSteps`).  JAX copies each input and each result of a callback, into fresh
  pages at large sizes.

Both give the numbers of ``opt.step`` on the same flat buffer, bit for bit, under
``jax.jit`` or not.

Why the host path keeps buffers between updates (:class:`_HostSteps`): an update that
allocated its copies afresh (the state twice, the parameters, the updates) spent most of its
time on first touches of new pages, not on the step (at 10^7 elements on this project's VM,
345 ms an update against 175 ms with them kept).
"""
import copy
import functools
import numbers
import threading
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from flatopt.backend import Gather, GatherCut, aligned_zeros, host_array, host_span
from flatopt.lookahead import Lookahead, check_slow_fits
from flatopt.optimizers import Optimizer
from flatopt.optimizers.base import _unwrap, check_reach, check_state_fits


# Bytes above which glibc maps every allocation afresh (the ceiling of its mmap threshold), so that
# a buffer that large, made at every step, is first touched page by page at every step.
FRESH_PAGES = 32 << 20


@jax.jit
def _ravel(tree):
    return ravel_pytree(tree)[0]


def _check_dtype(dtype):
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"params have dtype {dtype}; flatopt supports float32 and float64")


def _flat(tree):
    """A pytree's leaves as one NumPy buffer (a zero-copy read-only view when JAX allows).
    Jitted: ravel_pytree run eagerly dispatches one operation per leaf (5 ms for 200 leaves)."""
    return np.asarray(_ravel(tree))


class FlatoptState(NamedTuple):
    """:func:`as_optax`'s state for a flatopt optimizer."""
    counters: dict  # entry of the optimizer's group_state ('step', ...) -> int32 array, one per param group
    buffers: dict  # state buffer name ('exp_avg', ...) -> flat array in the parameters' dtype


class LookaheadState(NamedTuple):
    """:func:`as_optax`'s state for :class:`flatopt.Lookahead`."""
    inner: FlatoptState
    slow: jax.Array  # the slow weights; unused until the first update (step_count 0)
    step_count: jax.Array  # int32 scalar: inner steps taken


def as_optax(opt):
    """``opt`` (a flatopt optimizer or ``Lookahead``) as an optax ``GradientTransformation``.

    An ``optax.GradientTransformationExtraArgs``, as optax's own optimizers are: ``update``
    takes and ignores extra keyword arguments (``value=loss``, which generic training loops
    pass to every transformation).

    ``update(grads, state, params)`` returns ``updates = new_params - params`` in the
    parameters' dtype, where ``new_params`` is what ``opt.step`` computes from a flat copy
    of ``params`` (one kernel call), and the new state.  ``params`` is required (flatopt's
    rules read the parameters: weight decay, and the update itself).  ``opt`` is copied
    here: later changes to it do not reach the transformation, and its own state (if it
    was stepped directly) is not used.
    """
    if not isinstance(opt, (Optimizer, Lookahead)):
        raise TypeError(f"as_optax wraps a flatopt optimizer or Lookahead, got {type(opt).__name__}")
    template = copy.deepcopy(opt)
    template.load_state_dict(_fresh_checkpoint(template))
    host_steps = _HostSteps(template)

    def init(params):
        flat = jax.eval_shape(lambda p: ravel_pytree(p)[0], params)
        _check_dtype(flat.dtype)
        return _fresh_state(template, flat.size, flat.dtype)

    @functools.partial(jax.jit, static_argnames="new_params")
    def traced_update(grads, state, params, new_params):  # the checks run when it is traced (once per shapes)
        flat_params, unravel = ravel_pytree(params)
        flat_grads, _ = ravel_pytree(grads)
        n, dtype = flat_params.size, flat_params.dtype
        if flat_grads.size != n:
            raise ValueError(f"grads have {flat_grads.size} elements but params have {n}")
        if jax.tree_util.tree_structure(grads) != jax.tree_util.tree_structure(params):
            raise ValueError(f"grads' tree structure {jax.tree_util.tree_structure(grads)} does not match "
                             f"params' {jax.tree_util.tree_structure(params)}")
        shapes = [jnp.shape(x) for x in jax.tree_util.tree_leaves(grads)]
        if shapes != [jnp.shape(x) for x in jax.tree_util.tree_leaves(params)]:
            raise ValueError(f"grads' leaf shapes {shapes} do not match params'")
        for leaf_dtype in map(jnp.result_type, jax.tree_util.tree_leaves(grads)):
            # (cast to the params' dtype below: a complex one would lose its imaginary part)
            if jnp.issubdtype(leaf_dtype, jnp.complexfloating) or leaf_dtype == jnp.bool_:
                raise TypeError(f"grads have a leaf of dtype {leaf_dtype}; flatopt's update takes real "
                                "gradients (float32 and float64, or another real dtype it converts)")
        _check_state(template, state, n, dtype)
        _convert_scalars(_inner(template), dtype)
        like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (flat_params, state))
        scheduled = _scheduled_values(template, state)

        def on_host(grads, state, params, scheduled):  # the flat buffers above; on the CPU path XLA drops them unused
            flat_result, new_state = jax.pure_callback(_on_numpy(functools.partial(host_steps, new_params=new_params)),
                                                       like, flat_grads.astype(dtype), state, flat_params, scheduled,
                                                       vmap_method="sequential")
            return (unravel(flat_result) if new_params else _unravel_updates(flat_result, params)), new_state

        in_kernel = _kernel_update(template, params, dtype, new_params)
        if in_kernel is None:
            return on_host(grads, state, params, scheduled)
        # XLA's CPU runs the kernel on its own buffers; other platforms hand them to the host
        return jax.lax.platform_dependent(grads, state, params, scheduled, cpu=in_kernel, default=on_host)

    def update(grads, state, params=None, **extra_args):  # extra args (value=loss) unused, as by optax's adam
        if params is None:
            raise ValueError("flatopt's optax transformation needs params: tx.update(grads, state, params)")
        return traced_update(grads, state, params, new_params=False)

    update.flatopt_update_and_apply = functools.partial(traced_update, new_params=True)
    try:
        import optax
    except ImportError:
        from types import SimpleNamespace
        return SimpleNamespace(init=init, update=update)
    return optax.GradientTransformationExtraArgs(init, update)


def update_and_apply(tx, grads, state, params):
    """``tx.update`` and ``optax.apply_updates`` in one pass, for ``tx = as_optax(opt)``:
    returns ``(new_params, new_state)``, the new parameters exactly those ``opt.step``
    computes (``params + updates`` rounds once more).

    On the CPU, XLA runs the step on the parameters' own buffers, in place where they are
    donated (``jax.jit(..., donate_argnums=...)``), so an update moves the bytes of
    ``opt.step`` and nothing more: no updates buffer, and no pass of ``apply_updates`` over
    it.  Elsewhere (JAX on a GPU) it takes :func:`as_optax`'s host path.  Use it where the
    optimizer is the last transformation; ``tx.update`` composes with optax's."""
    apply = getattr(getattr(tx, "update", None), "flatopt_update_and_apply", None)
    if apply is None:
        raise TypeError(f"update_and_apply takes a transformation made by flatopt.jax.as_optax, got {tx!r}")
    return apply(grads, state, params)


def _kernel_update(template, params, dtype, new_params=False):
    """``template``'s update as XLA FFI calls of its CPU rule (:mod:`flatopt.kernels.xla`) on
    the leaves themselves, one call per ``CALL_BYTES`` of leaves, the flat state aliased in
    place through them; ``None`` where this JAX cannot register the handler (or, for
    Lookahead, where every group is frozen: the host path keeps that rare case).  With
    ``new_params`` it returns the new parameters instead of the updates, in calls of up to
    ``xla.ALIASED_LEAVES`` leaves, each leaf's result aliased to it (in place where the
    parameters are donated).

    Only the step's scalars come from the host: a callback takes the step counters and
    returns the rule's table, the control words and the new counters, computed by the
    optimizer's own code (:class:`_HostPlans`).  The chunks are fixed here, when the update
    is traced.
    """
    from flatopt.backend import CPU
    from flatopt.kernels import xla

    target = xla.target(dtype)
    if target is None:
        return None
    lookahead = isinstance(template, Lookahead)
    inner = template.inner if lookahead else template
    leaves, treedef = jax.tree_util.tree_flatten(params)
    sizes = [int(np.prod(jnp.shape(x), dtype=np.int64)) for x in leaves]
    probe = copy.deepcopy(inner)
    with jax.ensure_compile_time_eval():  # an lr schedule of jnp operations gives numbers, not tracers
        active, segments = probe._active(sum(sizes))
    if not active:  # every group frozen: a step changes nothing and counts nothing
        return None if lookahead else lambda grads, state, params, scheduled: (
            params if new_params else jax.tree_util.tree_map(jnp.zeros_like, params), state)
    row_length = len(probe._row(active[0][1], active[0][0], dtype.type))
    calls = []  # per FFI call: (first leaf, stop leaf, chunks, threaded)
    # calls of CALL_BYTES bound the updates' temporary (see leaf_groups); new params are
    # written into their leaves and have none, so they go in calls of up to ALIASED_LEAVES
    # leaves (fewer thread wake-ups: 10^7 elements in 200 leaves 5.4-5.8 ms an update against
    # 6.2-6.3 ms in 8 MiB calls), each leaf aliased to its result
    groups = xla.aliased_groups(len(sizes)) if new_params else xla.leaf_groups(sizes, np.dtype(dtype).itemsize)
    for first, stop in groups:
        lo, hi = sum(sizes[:first]), sum(sizes[:stop])
        # XLA calls the handler from its own threads, where no Python lock can order the
        # launches that Numba's workqueue layer must see one at a time: there it runs serially
        threaded = CPU.threaded(sum(max(0, min(b, hi) - max(a, lo)) for a, b, _ in segments)) \
            and not CPU.one_launch_at_a_time
        calls.append((first, stop, xla.leaf_chunks(sizes[first:stop], segments, threaded, lo), threaded))
    plans = _HostPlans(template, sum(sizes), dtype, [threaded for *_, threaded in calls], new_params)
    table_like = jax.ShapeDtypeStruct((len(active) + lookahead, row_length), dtype)
    control_like = jax.ShapeDtypeStruct((len(calls), 8), jnp.uint32)  # per call four int64s

    def update(grads, state, params, scheduled):
        inner_state = state.inner if lookahead else state
        counts = (inner_state.counters, state.step_count if lookahead else None)
        counts_like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), counts)
        table, control, (counters, step_count) = jax.pure_callback(
            _on_numpy(plans), (table_like, control_like, counts_like), counts, scheduled, vmap_method="sequential")
        empty = jnp.zeros((0,), dtype)
        slots = [inner_state.buffers.get(name, empty) for name in inner.state_names]
        slots += [empty] * (xla.STATE_ARGS - 1 - len(slots)) + [state.slow if lookahead else empty]
        p_leaves = [jnp.asarray(x, dtype) for x in jax.tree_util.tree_leaves(params)]
        g_leaves = [jnp.asarray(x, dtype) for x in jax.tree_util.tree_leaves(grads)]
        results_by_leaf = []  # the updates, or the new params
        for i, (first, stop, chunks, _) in enumerate(calls):
            count = stop - first
            aliases = {2 * count + k: count + k for k in range(xla.STATE_ARGS)}
            if new_params:
                aliases.update((k, k) for k in range(count))
            results = jax.ffi.ffi_call(
                target, [jax.ShapeDtypeStruct(jnp.shape(x), dtype) for x in p_leaves[first:stop] + slots],
                input_output_aliases=aliases, vmap_method="sequential",
            )(*p_leaves[first:stop], *g_leaves[first:stop], *slots, jnp.asarray(chunks.view(np.uint32)), table,
              control[i])
            results_by_leaf += results[:count]
            slots = list(results[count:])
        results = treedef.unflatten([_as_leaf(r, x, new_params) for r, x in zip(results_by_leaf, leaves)])
        new_state = FlatoptState(counters, {name: slots[i] for i, name in enumerate(inner.state_names)
                                            if name in inner_state.buffers})
        return results, LookaheadState(new_state, slots[-1], step_count) if lookahead else new_state

    return update


def _on_numpy(callback):
    """``callback`` for ``jax.pure_callback``, given zero-copy NumPy views of the jax.Arrays
    JAX hands a callback: a JAX operation on them (an index, say) would dispatch a computation
    from inside this one, which deadlocks once every XLA worker waits in such a callback
    (several Python threads updating at once, or one that dispatches its next update before
    this one has finished)."""
    def on_numpy(*args):
        return callback(*jax.tree_util.tree_map(np.asarray, args))
    return on_numpy


class _HostPlans:
    """The host side of :func:`_kernel_update`: from the step counters (and Lookahead's step
    count), the rule's table (for Lookahead with its row last), the control words per call
    (rule address, threaded, Lookahead's rule address, flags) and the counts after the step,
    from the optimizer's own ``_active``, ``_row`` and ``_advance``: the numbers of
    ``opt.step``.  Each thread keeps its own copy of the optimizer: its ``group_state`` changes,
    and so do the hyperparameters a schedule gives at each call (see :func:`_set_scheduled`)."""

    def __init__(self, template, n, dtype, threaded_calls, new_params=False):
        from flatopt.kernels.cpu import rule_address
        from flatopt.kernels.xla import NEW_PARAMS

        self.lookahead = template if isinstance(template, Lookahead) else None
        self.inner = template.inner if self.lookahead else template
        self.n, self.dtype = n, dtype
        self.base = self.inner.state_dict()
        sync = rule_address("lookahead", dtype) if self.lookahead else 0
        flags = NEW_PARAMS if new_params else 0
        rule = rule_address(self.inner.kernel, dtype)
        self.control = np.array([(rule, threaded, sync, flags) for threaded in threaded_calls], np.int64)
        self.kept = threading.local()

    def __call__(self, counts, scheduled):
        from flatopt.kernels.xla import SLOW_FROM_PARAMS, SYNC

        counters, step_count = counts
        worker = getattr(self.kept, "worker", None)
        if worker is None:
            worker = self.kept.worker = copy.deepcopy(self.inner)
        _set_scheduled(worker, scheduled)
        worker.group_state = _group_state(self.base, counters)
        active, _ = worker._active(self.n)
        rows = [worker._row(hp, group_state, self.dtype.type) for group_state, hp in active]
        for group_state, hp in active:
            worker._advance(hp, group_state)
        control = self.control.copy()
        if self.lookahead:
            step_count = int(step_count)
            rows.append([*self.lookahead.sync_row()] + [0.0] * (len(rows[0]) - 2))
            control[:, 3] |= (SLOW_FROM_PARAMS if step_count == 0 else 0) | (
                SYNC if self.lookahead.syncs(step_count + 1) else 0)
            step_count = np.asarray(step_count + 1, np.int32)
        counters = {key: np.array([s[key] for s in worker.group_state], np.int32) for key in counters}
        return np.array(rows, self.dtype), control.view(np.uint32), (counters, step_count)


def _as_leaf(result, leaf, new_params):
    """A result in its leaf's dtype: new parameters always; updates where the leaf is a float
    (an integer leaf's updates stay in the step's dtype, as optax's do, so that
    ``apply_updates`` rounds the new value once)."""
    dtype = jnp.result_type(leaf)
    return result.astype(dtype) if new_params or jnp.issubdtype(dtype, jnp.floating) else result


def _unravel_updates(flat, params):
    """``flat`` cut into ``params``' leaves (``ravel_pytree``'s unravel would round an integer
    leaf's updates to integers)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    updates, start = [], 0
    for leaf in leaves:
        size = int(np.prod(jnp.shape(leaf), dtype=np.int64))
        updates.append(_as_leaf(flat[start:start + size].reshape(jnp.shape(leaf)), leaf, False))
        start += size
    return treedef.unflatten(updates)


def _fresh_checkpoint(opt):
    """``opt``'s checkpoint with the state of a fresh optimizer (no buffers, counters at their start)."""
    sd = opt.state_dict()
    if isinstance(opt, Lookahead):
        return dict(sd, step_count=0, slow=None, synced=None, inner=_fresh_checkpoint(opt.inner))
    return dict(sd, group_state=[opt._new_group_state() for _ in sd["group_state"]], state={})


def _check_fits_master(opt, checkpoint, master):
    """What a step of ``opt`` on ``master`` would refuse of its checkpoint (``state_dict()``'s,
    also through ``np.savez``), which its own load cannot know: its buffers or slow weights of
    another size or dtype, groups that reach past the master's end.  What is malformed (a
    buffer of another name, say) is left to the optimizer's own load to name."""
    n, dtype = len(master), master.dtype
    checkpoint = _unwrap(checkpoint)
    if not isinstance(checkpoint, Mapping):
        return
    sd = {k: _unwrap(v) for k, v in checkpoint.items()}
    if sd.get("optimizer") == "Lookahead" and isinstance(opt, Lookahead):
        if sd.get("slow") is not None:
            check_slow_fits(host_array(sd["slow"]), n, dtype)
        return _check_fits_master(opt.inner, sd.get("inner", {}), master)
    known = set(getattr(opt, "state_names", ()))
    state = _unwrap(sd.get("state"))
    for name, buffer in (state.items() if isinstance(state, Mapping) else ()):
        if name in known:
            check_state_fits(name, host_array(buffer), n, dtype)
    groups = sd.get("param_groups")
    stops = [g.get("stop") for g in (() if groups is None else groups) if isinstance(g, dict)]
    last = stops[-1] if stops else None
    if isinstance(last, numbers.Integral) and not isinstance(last, bool):
        check_reach(last, n)


def _inner(obj):
    """The optimizer a ``Lookahead`` wraps, or the inner state of a ``LookaheadState``; else ``obj``."""
    return obj.inner if isinstance(obj, (Lookahead, LookaheadState)) else obj


def _fresh_state(opt, n, dtype):
    """init's state: zero buffers (those the hyperparameters need) and fresh counters."""
    if isinstance(opt, Lookahead):
        return LookaheadState(_fresh_state(opt.inner, n, dtype), jnp.zeros(n, dtype), jnp.zeros((), jnp.int32))
    groups = opt.param_groups
    if groups and groups[-1]["stop"] > n:
        raise ValueError(f"param groups reach element {groups[-1]['stop']} but params have {n} elements")
    needs = _needed_buffers(opt)
    counters = {key: jnp.full(len(opt.group_state), int(value), jnp.int32)
                for key, value in opt._new_group_state().items()}
    return FlatoptState(counters, {name: jnp.zeros(n, dtype) for name in opt.state_names if name in needs})


SCHEDULED = ("lr", "clip_lambda")  # the hyperparameters that may be callables of the step count


def _scheduled_values(template, state):
    """Per param group, the values at the group's step count of its hyperparameters that are
    callables made of JAX operations (an ``lr`` schedule, ADOPT's ``clip_lambda``), computed
    here in the traced update, as optax computes its schedules; ``None`` for the others, in the
    order of ``SCHEDULED``.  The host callbacks take these values: a JAX operation evaluated
    inside a callback can deadlock XLA's CPU client (see :func:`_on_numpy`), which an optax
    schedule run there did, with several threads updating at once and with one.  A callable of
    Python arithmetic runs on the host as in ``opt.step``.  The count is an int32, as optax's
    own count: with ``jax_enable_x64`` an int64 count rounds a linear schedule otherwise (in
    float64, where optax's int32 count gives float32 values)."""
    opt, counts = _inner(template), _inner(state).counters["step"]
    return tuple(tuple(_traced_value(_group_value(opt, group, name), counts[i]) for name in _scheduled_names(opt))
                 for i, group in enumerate(_groups(opt)))


def _scheduled_names(opt):
    return [name for name in SCHEDULED if name in opt.defaults]


def _traced_value(value, count):
    """``value(count)`` where ``value`` is a callable made of JAX operations, else ``None``."""
    if not callable(value):
        return None
    with jax.ensure_compile_time_eval():
        traceable = isinstance(value(0), jax.Array)
    try:
        return jnp.reshape(value(count.astype(jnp.int32)), ()) if traceable else None
    except jax.errors.JAXTypeError:  # Python control flow on the count, or NumPy of it: on the host
        return None


def _groups(opt):
    """``opt``'s param groups; ``[None]`` for the one group over the whole buffer of an optimizer
    without groups (``param_groups=[]`` is no group at all: a step that updates nothing)."""
    return [None] if opt.param_groups is None else opt.param_groups


def _group_value(opt, group, name):
    """Hyperparameter ``name`` of ``group`` (``None``: the optimizer's only one): its own, else ``opt``'s."""
    return getattr(opt, name) if group is None else group.get(name, getattr(opt, name))


def _set_scheduled(opt, values):
    """The values :func:`_scheduled_values` computed, as ``opt``'s (a worker copy's)
    hyperparameters: an lr as its number, a ``clip_lambda`` as a callable that returns its
    value.  An lr is taken as optax takes a schedule's value: not refused for its sign.  XLA on
    the CPU computes the end of ``optax.linear_schedule(1e-2, 0.0, 10)`` as -1.5e-10, not 0 (it
    divides by the constant step count as a product with its reciprocal), which optax applies
    and the check of a given lr would refuse.  (A NaN is refused still, where the optimizer's
    own check refuses one: all but SGD, whose check is torch's ``lr < 0``.)"""
    if all(value is None for group in values for value in group):
        return
    if "_check" not in opt.__dict__:
        check = opt._check
        opt.__dict__["_check"] = lambda hp: check(dict(hp, lr=abs(hp["lr"])))
    names = _scheduled_names(opt)
    for i, group_values in enumerate(values):
        for name, value in zip(names, group_values, strict=True):
            if value is None:
                continue
            value = float(value) if name == "lr" else functools.partial(_constant, float(value))
            if opt.param_groups is None:
                setattr(opt, name, value)
            else:
                opt.param_groups[i][name] = value


def _constant(value, step):
    return value


def _needed_buffers(opt):
    """The state buffers ``opt``'s hyperparameters use, in any of its groups.  (An ``lr``
    schedule is evaluated at step 0 here, eagerly where this runs while JAX traces.)"""
    with jax.ensure_compile_time_eval():
        return {name for group in _groups(opt) for name in opt._needs(opt._resolve(group, 0))}


def _convert_scalars(opt, dtype):
    """Refuses, when the update is traced, a hyperparameter the step's scalars cannot be
    converted from (an int beyond float's range, a complex number), as ``opt.step`` refuses it:
    the host converts them inside a callback, whose error would reach the caller as XLA's
    INTERNAL error.  (Whether a group's lr schedule gives such a value shows only where the
    update computes it.)"""
    for group, group_state in zip(_groups(opt), opt.group_state):
        if group is not None and group.get("frozen", False):
            continue  # (never resolved: no step reads it)
        if not callable(_group_value(opt, group, "lr")):
            np.array([opt._row(opt._resolve(group, 0), group_state, dtype.type)], dtype)


def _check_state(opt, state, n, dtype):
    """Clear errors (also under jit) for a state that init did not make for these params."""
    kind = LookaheadState if isinstance(opt, Lookahead) else FlatoptState
    if not isinstance(state, kind):
        raise TypeError(f"state must be the {kind.__name__} tx.init(params) returned, got {type(state).__name__}")
    inner, base = _inner(state), _inner(opt)
    # The kernel reads and writes every buffer the rule uses: one missing would be an empty one.
    missing = sorted(_needed_buffers(base) - set(inner.buffers), key=base.state_names.index)
    unknown = sorted(set(inner.buffers) - set(base.state_names))
    if missing or unknown:
        problem = f"lacks the buffers {missing}" if missing else f"has unknown buffers {unknown}"
        raise ValueError(f"the state {problem} for {type(base).__name__} with these hyperparameters (a state "
                         "made by another transformation, or before amsgrad or momentum was turned on?): "
                         "call tx.init(params)")
    expected = base._new_group_state()
    counters = [inner.counters] + ([state.step_count] if isinstance(state, LookaheadState) else [])
    dtypes = {str(jnp.result_type(c)) for c in jax.tree_util.tree_leaves(counters)}
    if dtypes - {"int32"}:
        raise TypeError(f"the state's step counters have dtype {', '.join(sorted(dtypes))}, where init makes them "
                        "int32 (a cast of the whole state?): call tx.init(params), or cast the counters back")
    shapes = {key: jnp.shape(value) for key, value in dict(inner.counters).items()}
    if shapes != {key: (len(base.group_state),) for key in expected}:
        raise ValueError(f"the state's step counters {shapes} are not those of {type(base).__name__} with "
                         f"{len(base.group_state)} param group(s), {sorted(expected)} each: call tx.init(params)")
    flat = list(inner.buffers.values()) + ([state.slow] if isinstance(state, LookaheadState) else [])
    for buf in flat:
        if jnp.shape(buf) != (n,):
            raise ValueError(f"the state was made for {jnp.shape(buf)} elements but params have {n}: "
                             "call tx.init(params)")
        if buf.dtype != dtype:
            raise TypeError(f"the state has dtype {buf.dtype} but params have {dtype}: call tx.init(params)")


class _HostSteps:
    """:func:`as_optax`'s host side: ``template``'s step from a given state, on buffers kept
    from one update to the next.

    Each thread keeps one optimizer, loaded once, and a parameter buffer; an update writes the
    state it is given into that optimizer's own buffers, steps a copy of the parameters, and
    returns those buffers.  That is safe because JAX copies a callback's results into arrays
    of its own before the thread runs anything else; other threads keep their own.  The cost:
    between updates each thread that ran one holds a copy of the state and of the parameters.
    """

    def __init__(self, template):
        self.template = template
        self.base = template.state_dict()  # hyperparameters and groups; the state comes with each update
        self.kept = threading.local()

    def __call__(self, grads, state, params, scheduled, new_params=False):
        key = (params.size, params.dtype)
        kept = getattr(self.kept, "value", None)
        if kept is None or kept[0] != key or not _refill(kept[1], self.base, state):
            worker = copy.deepcopy(self.template)
            worker.load_state_dict(_checkpoint(self.base, state))  # checks, then copies the buffers
            kept = self.kept.value = (key, worker, np.empty_like(params))
        _, worker, stepped = kept
        _set_scheduled(_inner(worker), scheduled)
        np.copyto(stepped, params)
        worker.step(stepped, grads)
        return stepped if new_params else np.subtract(stepped, params, out=stepped), _read_state(worker, state)


def _refill(opt, base, state):
    """Write ``state`` into ``opt``'s buffers and counters in place (the next step checks the
    counters again: ``group_state`` is assigned); ``False`` where its buffers are not those
    ``state`` has, and ``opt`` must be loaded instead."""
    if isinstance(state, LookaheadState):
        if not _refill(opt.inner, base["inner"], state.inner):
            return False
        opt.step_count = int(state.step_count)
        if not opt.step_count:
            opt.slow = None  # the step takes the parameters as the slow weights
        elif isinstance(opt.slow, np.ndarray):
            np.copyto(opt.slow, state.slow)
        else:
            opt.slow = np.array(state.slow)
        return True
    if opt.state.keys() != state.buffers.keys():
        return False
    for name, buf in state.buffers.items():
        np.copyto(opt.state[name], buf)
    opt.group_state = _group_state(base, state.counters)
    return True


def _group_state(base, counters):
    """``group_state`` as the optimizer keeps it, from a state's counters."""
    return [{key: type(value)(int(counters[key][i])) for key, value in fresh.items()}
            for i, fresh in enumerate(base["group_state"])]


def _checkpoint(base, state):
    """The checkpoint (``load_state_dict``'s format) of ``base``'s optimizer in ``state``."""
    if isinstance(state, LookaheadState):
        step_count = int(state.step_count)
        return dict(base, step_count=step_count, slow=np.asarray(state.slow) if step_count else None,
                    inner=_checkpoint(base["inner"], state.inner))
    return dict(base, group_state=_group_state(base, state.counters),
                state={k: np.asarray(v) for k, v in state.buffers.items()})


def _read_state(opt, like):
    """``opt``'s state after its step, as the NumPy pytree ``like`` (the state it started from)."""
    if isinstance(like, LookaheadState):
        return LookaheadState(_read_state(opt.inner, like.inner), opt.slow,
                              np.asarray(opt.step_count, np.int32))
    extra = set(opt.state) - set(like.buffers)
    if extra:  # cannot happen with the hyperparameters init saw; a guard against silently lost state
        raise RuntimeError(f"the step made state buffers {sorted(extra)} that init did not")
    counters = {key: np.array([s[key] for s in opt.group_state], np.int32) for key in like.counters}
    return FlatoptState(counters, {name: opt.state[name] for name in like.buffers})


class TreeOptimizer:
    """Pytree in, pytree out, one flat master copy kept between steps::

        tree_opt = TreeOptimizer(flatopt.AdamW(lr=1e-3), params)
        params = tree_opt.step(grads)        # one kernel call, and one jitted unravel out

    The gradients of a small tree come in through jitted ``ravel_pytree`` (one dispatch, not
    one per leaf).  A tree of more than ``FRESH_PAGES`` bytes is read where its leaves lie, as a
    :class:`flatopt.backend.Gather` of their addresses: a flat copy that large, made anew at
    every step, costs more in first touches of fresh pages than the step itself.  Leaves of
    another dtype than the master copy's, or sharing memory with a buffer the step writes, go
    through ``ravel_pytree`` at any size.

    The master copy is 64-byte aligned, so that JAX's CPU client reads it where it lies when
    it is unravelled into the returned pytree (an unaligned buffer is copied first: at 10^7
    elements that copy took 16 of the unravel's 18 ms).  The returned arrays are JAX's own,
    already computed (the next step writes the buffer they are made from): later steps leave
    them alone.
    """

    def __init__(self, opt, params):
        flat, unravel = ravel_pytree(params)
        _check_dtype(flat.dtype)  # (as as_optax's init: not first at the step)
        leaves, self._treedef = jax.tree_util.tree_flatten(params)
        self._shapes = [np.shape(x) for x in leaves]
        sizes = [int(np.prod(shape)) for shape in self._shapes]
        self._offsets = np.cumsum([0] + sizes[:-1]).astype(np.int64)
        self._nbytes = np.array(sizes, np.uint64) * flat.dtype.itemsize
        self._unravel_leaves = jax.jit(lambda flat: jax.tree_util.tree_leaves(unravel(flat)))
        self.opt = opt
        self.master = aligned_zeros(flat.size, flat.dtype)  # writable: JAX arrays' NumPy views are read-only
        self.master[:] = flat
        # A large tree's leaves are read where they lie, only where every leaf has the master's
        # dtype (else ravel_pytree converts them); ``_grads`` is then the buffer the core checks
        # but does not read (None: every step goes through ravel_pytree).
        in_place = self.master.nbytes > FRESH_PAGES and all(jnp.result_type(x) == flat.dtype for x in leaves)
        self._grads = np.empty_like(self.master) if in_place else None
        self._cut = GatherCut()  # (the pieces of the kernel's chunks, kept from step to step)

    def step(self, grads):
        leaves, treedef = jax.tree_util.tree_flatten(grads)
        if treedef != self._treedef or [np.shape(x) for x in leaves] != self._shapes:
            raise ValueError(f"grads must have the params' tree structure and leaf shapes: got {treedef} "
                             f"with shapes {[np.shape(x) for x in leaves]}, params have {self._treedef} "
                             f"with shapes {self._shapes}")
        leaves_read = self._grads is not None and self._read_in_place(leaves)
        if not leaves_read:
            flat = _flat(grads)
            if flat.dtype != self.master.dtype and jnp.issubdtype(flat.dtype, jnp.floating):
                flat = flat.astype(self.master.dtype)  # (as tx.update takes them: bfloat16 grads of float32 params)
            self.opt.step(self.master, flat)
        else:  # (``host`` keeps the leaves' memory alive until the step is done)
            host, addresses = leaves_read
            self.opt.step(self.master, self._grads, Gather(self._offsets, addresses, self._cut))
        return self.params

    def _read_in_place(self, leaves):
        """The gradient leaves as NumPy arrays (on JAX's CPU, views of its buffers) and their
        addresses, or None where one has another dtype, is not contiguous, or shares memory
        with the master copy or the optimizer's state, which the step writes as it reads them."""
        host = [np.asarray(x) for x in leaves]
        dtype = self.master.dtype
        if not all(h.dtype == dtype and h.flags.c_contiguous for h in host):
            return None
        starts = np.array([h.__array_interface__["data"][0] for h in host], np.uint64)
        ends = starts + self._nbytes
        core = _inner(self.opt)
        for first, end in [host_span(self.master)] + [host_span(a) for a in core.state.values()]:
            if np.any((starts < end) & (ends > first) & (ends > starts)):
                return None
        return host, starts.astype(np.int64)

    @property
    def params(self):
        # Ready before they are returned: JAX reads the master copy in place, and the next step
        # writes it.  (Blocking on a list of leaves takes two thirds of the time it takes on the tree.)
        leaves = jax.block_until_ready(self._unravel_leaves(self.master))
        return self._treedef.unflatten(leaves)

    def state_dict(self):
        return {"params": self.master.copy(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state_dict):
        """Everything the next step would refuse is refused first, nothing changed: the
        optimizer's checkpoint is checked against the master copy's size and dtype, which the
        optimizer's own load cannot know."""
        params = np.asarray(state_dict["params"])
        if params.shape != self.master.shape or params.dtype != self.master.dtype:
            raise ValueError(f"checkpoint params {params.shape} {params.dtype} do not match "
                             f"{self.master.shape} {self.master.dtype}")
        checkpoint = _unwrap(state_dict["optimizer"])  # (np.savez keeps a dict as a 0-d array)
        _check_fits_master(self.opt, checkpoint, self.master)
        self.opt.load_state_dict(checkpoint)  # checks the rest before it changes anything
        self.master[:] = params
