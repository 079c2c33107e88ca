"""as_optax's XLA FFI step (flatopt.kernels.xla): used on the CPU, bitwise equal to the core step
on trees whose leaves, param groups, threads' chunks and FFI calls cut the flat buffer in
every way, in place on a donated state, from several threads; and the chunk and call plans."""
import ctypes
import functools
import mmap
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import in_workqueue_process, sweep

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import flatopt  # noqa: E402
from flatopt.jax import as_optax, update_and_apply  # noqa: E402
from flatopt.kernels import xla  # noqa: E402
from test_jax import PATHS, assert_state_is_core, flat, on_path  # noqa: E402

jax_core = pytest.importorskip("jax._src.core")  # EvalTrace: where an eager JAX operation is evaluated
# What these tests read off the compiled update (the FFI call) is JAX's CPU path: with a GPU as JAX's default
# backend the update takes the host path (seen on an H200)
on_jax_cpu = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason=f"JAX's default backend is {jax.default_backend()}: the FFI step is the CPU's")


def leaves_tree(sizes, seed, scale=1.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {f"leaf{i:03d}": jnp.asarray(scale * rng.standard_normal(size), dtype) for i, size in enumerate(sizes)}


def check_against_core(make_opt, sizes, steps=4, dtype=np.float32, donate=False, apply=False):
    """``steps`` jitted updates (``update_and_apply``'s with ``apply``) against the core
    optimizer on the flat buffer, bit for bit: updates or new params, state buffers (and
    Lookahead's slow weights), counters.  ``donate``: the state (and the params) donated."""
    tx, core = as_optax(make_opt()), make_opt()
    params = leaves_tree(sizes, 0, dtype=dtype)
    state = tx.init(params)
    if apply:
        step = jax.jit(lambda g, s, p: update_and_apply(tx, g, s, p), donate_argnums=(1, 2) if donate else ())
    else:
        step = jax.jit(tx.update, donate_argnums=(1,) if donate else ())
    for t in range(steps):
        grads = leaves_tree(sizes, 1 + t, 0.1, dtype)
        before = flat(params)
        expected = before.copy()
        core.step(expected, flat(grads))
        result, state = step(grads, state, params)
        np.testing.assert_array_equal(flat(result), expected if apply else expected - before)
        assert_state_is_core(state, core)
        params = result if apply else optax.apply_updates(params, result)


@on_jax_cpu
@pytest.mark.parametrize("lookahead", [False, True])
def test_the_cpu_runs_the_ffi_step(lookahead):
    opt = flatopt.Adam(lr=1e-2)
    tx = as_optax(flatopt.Lookahead(opt) if lookahead else opt)
    params = leaves_tree([3, 4], 0)
    hlo = jax.jit(tx.update).lower(params, tx.init(params), params).as_text()
    assert xla.target(np.float32) == "flatopt_cpu_step_float32"
    assert "flatopt_cpu_step_float32" in hlo


GROUPS = [  # flat elements 0..99 of leaves [7, 30, 1, 0, 22, 40]
    None,
    [{"start": 0, "stop": 30}, {"start": 30, "stop": 60, "lr": 1e-3, "weight_decay": 0.0},
     {"start": 60, "stop": 100, "amsgrad": True}],
    [{"start": 5, "stop": 38, "frozen": True}, {"start": 40, "stop": 45}, {"start": 50, "stop": 90, "lr": 0.3}],
]


@pytest.mark.parametrize("apply", [False, True], ids=["update", "update_and_apply"])
@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("groups", range(len(GROUPS)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_leaves_and_groups_cut_anywhere(groups, dtype, lookahead, apply):
    """Lookahead (k=2, synced twice) takes the slow weights from every element and pulls
    together only those its inner optimizer updates.  update_and_apply: donated, in place."""
    def make():
        inner = flatopt.AdamW(lr=1e-2, param_groups=GROUPS[groups])
        return flatopt.Lookahead(inner, k=2, alpha=0.3) if lookahead else inner

    with jax.enable_x64(dtype == np.float64):
        check_against_core(make, [7, 30, 1, 0, 22, 40], steps=5, dtype=dtype, donate=apply, apply=apply)


@pytest.mark.parametrize("make_opt", [
    lambda: flatopt.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    lambda: flatopt.RMSprop(lr=1e-2, momentum=0.5, centered=True),
    lambda: flatopt.Adam(lr=1e-2, amsgrad=True, maximize=True),
    lambda: flatopt.ADOPT(lr=1e-2, decouple=True, weight_decay=0.1),
    lambda: flatopt.Lookahead(flatopt.Adam(lr=1e-2), k=2),
], ids=["sgd", "rmsprop", "adam", "adopt", "lookahead"])
@pytest.mark.parametrize("apply", [False, True], ids=["update", "update_and_apply"])
def test_threaded_chunks_across_several_ffi_calls(make_opt, apply, monkeypatch):
    """Large enough for Numba's threads; small chunks and calls, so that every leaf spans
    several chunks and the state goes through several FFI calls in one update (one call for
    update_and_apply, which has no temporary to bound)."""
    monkeypatch.setattr(xla, "CHUNK", 1000)
    monkeypatch.setattr(xla, "CALL_BYTES", 150_000)
    sizes = [40_011, 1, 35_000, 15_500, 0, 4_097]
    assert xla.leaf_groups(sizes, 4) == [(0, 1), (1, 3), (3, 6)]  # threaded, threaded, serial
    check_against_core(make_opt, sizes, steps=3, apply=apply)


def test_a_donated_state_is_updated_in_place():
    tx = as_optax(flatopt.Adam(lr=1e-2))
    params = leaves_tree([50_000, 30], 0)
    state = tx.init(params)
    update = jax.jit(tx.update, donate_argnums=(1,))
    _, state = update(params, state, params)
    where = {name: buf.unsafe_buffer_pointer() for name, buf in state.buffers.items()}
    _, state = update(params, state, params)
    assert {name: buf.unsafe_buffer_pointer() for name, buf in state.buffers.items()} == where
    check_against_core(lambda: flatopt.Adam(lr=1e-2), [50_000, 30], donate=True)


def test_update_and_apply_steps_donated_params_in_place_and_leaves_others_untouched():
    tx = as_optax(flatopt.Lookahead(flatopt.Adam(lr=1e-2), k=2))
    sizes = [50_000, 30, 0]
    step = jax.jit(lambda g, s, p: update_and_apply(tx, g, s, p), donate_argnums=(1, 2))
    params = leaves_tree(sizes, 0)
    state = tx.init(params)
    grads = leaves_tree(sizes, 1, 0.1)
    params, state = step(grads, state, params)
    where = [x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves((params, state))]
    for _ in range(3):  # the third syncs the slow weights
        params, state = step(grads, state, params)
    assert [x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves((params, state))] == where
    # not donated: XLA steps a copy, and the caller's params and state stay as they were
    kept = jax.jit(lambda g, s, p: update_and_apply(tx, g, s, p))
    before = (flat(params).copy(), flat(state.inner.buffers).copy())
    new_params, _ = kept(grads, state, params)
    assert not np.array_equal(flat(new_params), before[0])
    np.testing.assert_array_equal(flat(params), before[0])
    np.testing.assert_array_equal(flat(state.inner.buffers), before[1])
    check_against_core(lambda: flatopt.Lookahead(flatopt.Adam(lr=1e-2), k=2), sizes, steps=5, donate=True,
                       apply=True)


@on_jax_cpu
def test_update_and_apply_makes_one_ffi_call_and_update_one_per_call_bytes(monkeypatch):
    monkeypatch.setattr(xla, "CALL_BYTES", 150_000)
    tx = as_optax(flatopt.Adam(lr=1e-2))
    params = leaves_tree([40_011, 1, 35_000, 15_500, 0, 4_097], 0)
    state = tx.init(params)
    for step, calls in ((tx.update, 3), (functools.partial(update_and_apply, tx), 1)):
        hlo = jax.jit(step).lower(params, state, params).as_text()
        assert hlo.count("flatopt_cpu_step_float32") == calls


@on_jax_cpu
@pytest.mark.parametrize("lookahead", [False, True])
def test_update_and_apply_aliases_at_most_aliased_leaves_per_call(lookahead, monkeypatch):
    """One call aliasing every leaf to its result took XLA a time growing as the cube of the
    leaves to compile (2000 leaves: 25 s); calls of ALIASED_LEAVES leaves, the numbers unchanged."""
    monkeypatch.setattr(xla, "ALIASED_LEAVES", 4)
    sizes = [3, 0, 70_000, 5, 1, 9, 2, 4, 6]  # 9 leaves: calls of 4, 4 and 1; one threaded leaf
    make = (lambda: flatopt.Lookahead(flatopt.AdamW(lr=1e-2), k=2)) if lookahead else (lambda: flatopt.AdamW(lr=1e-2))
    tx, params = as_optax(make()), leaves_tree(sizes, 0)
    hlo = jax.jit(functools.partial(update_and_apply, tx)).lower(params, tx.init(params), params).as_text()
    assert hlo.count("flatopt_cpu_step_float32") == 3
    assert xla.aliased_groups(9) == [(0, 4), (4, 8), (8, 9)] and xla.aliased_groups(0) == [(0, 0)]
    check_against_core(make, sizes, steps=5, apply=True)


@on_jax_cpu
def test_update_and_apply_on_donated_buffers_compiles_without_a_copy():
    """Each params leaf's result aliased to it: with params and state donated, XLA copies no
    array (without the alias it would step into a new buffer and copy that into the donated one)."""
    tx = as_optax(flatopt.Adam(lr=1e-2))
    params = leaves_tree([2100, 5], 0)
    compiled = jax.jit(lambda g, s, p: update_and_apply(tx, g, s, p), donate_argnums=(1, 2)).lower(
        params, tx.init(params), params).compile().as_text()
    copies = re.findall(r"= f(?:32|64)\[([0-9,]*)\][^ ]* copy\(", compiled)
    assert [shape for shape in copies if shape not in ("", "0")] == []


def test_threaded_updates_from_several_python_threads():
    tx = as_optax(flatopt.AdamW(lr=1e-2))
    update = jax.jit(tx.update)
    sizes = [40_000, 17]

    def run(seed):
        params = leaves_tree(sizes, seed)
        state = tx.init(params)
        for t in range(4):
            updates, state = update(leaves_tree(sizes, seed + 10 + t, 0.1), state, params)
            params = optax.apply_updates(params, updates)
        return flat(params), flat(state.buffers)

    expected = [run(seed) for seed in range(4)]
    got = [None] * 4
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, run(i))) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (p, s), (p_ref, s_ref) in zip(got, expected):
        np.testing.assert_array_equal(p, p_ref)
        np.testing.assert_array_equal(s, s_ref)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("api", ["update", "update_and_apply"])
@pytest.mark.parametrize("lookahead", [False, True])
def test_callbacks_evaluate_no_jax_operation(path, api, lookahead, monkeypatch):
    """The host callbacks turn the jax.Arrays JAX hands them into NumPy before touching them.
    A JAX operation evaluated inside a callback needs an XLA worker while it holds one: from
    several Python threads at once that deadlocked (each callback on an XLA worker, waiting
    for another; seen in about one run in 15 of the threaded test, on 2 cores).  Every
    primitive evaluated with flatopt.jax's callback on the stack is recorded.  (Not those of
    a jitted function called again, which JAX dispatches without Python: lr schedules have
    tests of their own below.)"""
    opt = flatopt.AdamW(lr=1e-2)
    tx = as_optax(flatopt.Lookahead(opt, k=2) if lookahead else opt)
    params, grads = leaves_tree([300, 7], 0), leaves_tree([300, 7], 1, 0.1)
    with on_path(path):
        state = tx.init(params)
        step = jax.jit(tx.update if api == "update" else functools.partial(update_and_apply, tx))
        jax.block_until_ready(step(grads, state, params))  # compiled before anything is recorded
        evaluated, process_primitive = [], jax_core.EvalTrace.process_primitive

        def recording(trace, primitive, args, params):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename != flatopt.jax.__file__:
                frame = frame.f_back
            if frame is not None:
                evaluated.append((frame.f_code.co_name, primitive.name))
            return process_primitive(trace, primitive, args, params)

        monkeypatch.setattr(jax_core.EvalTrace, "process_primitive", recording)
        for _ in range(3):  # Lookahead: its first step, a step between syncs and a sync
            result, state = jax.block_until_ready(step(grads, state, params))
    assert not evaluated


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("api", ["update", "update_and_apply"])
@pytest.mark.parametrize("lookahead", [False, True])
def test_a_jax_schedule_is_evaluated_in_the_update_not_in_the_callback(path, api, lookahead):
    """An lr schedule of JAX operations is called while the update is traced, on the traced
    step count, and never from the host callback: there its operations deadlocked XLA's CPU
    client with several threads updating at once (six threads hung in every run)."""
    calls = []

    def schedule(count):
        calls.append(type(count).__name__)
        return optax.cosine_decay_schedule(1e-2, 8)(count)

    opt = flatopt.AdamW(lr=schedule)
    tx = as_optax(flatopt.Lookahead(opt, k=2) if lookahead else opt)
    params, grads = leaves_tree([300, 7], 0), leaves_tree([300, 7], 1, 0.1)
    with on_path(path):
        state = tx.init(params)
        step = jax.jit(tx.update if api == "update" else functools.partial(update_and_apply, tx))
        jax.block_until_ready(step(grads, state, params))  # traced and compiled: its calls are done
        calls.clear()
        for _ in range(3):
            _, state = jax.block_until_ready(step(grads, state, params))
    assert calls == []


# Python threads updating at once, against the same updates run one after another; it prints
# whether steps of that size are threaded, whether Numba's layer takes one launch at a time,
# and whether every thread's numbers are the serial ones
THREADED_UPDATES = """
    import functools, threading, numpy as np, jax, jax.numpy as jnp, optax, flatopt
    from jax.flatten_util import ravel_pytree
    from flatopt.backend import CPU
    from flatopt.jax import as_optax, update_and_apply
    tx = as_optax(flatopt.AdamW(lr={lr}))
    update, apply = jax.jit(tx.update), jax.jit(functools.partial(update_and_apply, tx))
    def run(seed, out):
        rng = np.random.default_rng(seed)
        params = {{"a": jnp.asarray(rng.standard_normal({size}), jnp.float32), "b": jnp.ones(17)}}
        state = tx.init(params)
        for t in range({steps}):
            grads = jax.tree_util.tree_map(lambda x: 0.1 * x + t, params)
            if t % 2:
                params, state = apply(grads, state, params)
            else:
                updates, state = update(grads, state, params)
                params = optax.apply_updates(params, updates)
        out[seed] = np.asarray(ravel_pytree(params)[0])
    expected, got = {{}}, {{}}
    for seed in range({threads}):
        run(seed, expected)
    threads = [threading.Thread(target=run, args=(seed, got)) for seed in range({threads})]
    [t.start() for t in threads]
    [t.join() for t in threads]
    same = all(np.array_equal(got[s], expected[s]) for s in range({threads}))
    print(CPU.threaded({size} + 17), CPU.one_launch_at_a_time, same)
"""


def test_updates_with_a_jax_schedule_from_several_threads():
    """Six threads updating at once with an optax schedule as lr finish, with the numbers of
    the same updates run one after another (they hung while the host callback evaluated
    the schedule)."""
    code = THREADED_UPDATES.format(lr="optax.cosine_decay_schedule(1e-2, 20)", size=20_000, steps=24, threads=6)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "True"


def test_updates_from_several_threads_on_numbas_workqueue_layer():
    """Numba's workqueue layer aborts the process when two threads launch parallel work at
    once, and XLA calls the handler from its own threads, several at a time: there the
    handler runs serially, with the result of the threaded handler elsewhere."""
    code = THREADED_UPDATES.format(lr="1e-2", size=200_000, steps=12, threads=4)
    assert in_workqueue_process(code, JAX_PLATFORMS="cpu") == ["True", "True", "True"]


def test_every_group_frozen_changes_nothing():
    tx = as_optax(flatopt.Adam(lr=1e-2, param_groups=[{"start": 0, "stop": 5, "frozen": True}]))
    params = leaves_tree([5, 3], 0)
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(params, state, params)
    assert not np.any(flat(updates))
    assert [int(c) for c in new_state.counters["step"]] == [0]
    new_params, new_state = jax.jit(functools.partial(update_and_apply, tx))(params, state, params)
    np.testing.assert_array_equal(flat(new_params), flat(params))
    assert [int(c) for c in new_state.counters["step"]] == [0]


def test_a_refused_handler_leaves_the_host_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("handler's API version is incompatible")

    monkeypatch.setattr(jax.ffi, "register_ffi_target", refuse)
    assert xla._register("flatopt_test_refused", np.dtype(np.float32)) is None


# --- the plans ------------------------------------------------------------------------------

@sweep(40)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=8), data=st.data(), threaded=st.booleans())
def test_chunks_cover_every_element_once_with_its_row(sizes, data, threaded):
    """For the leaves ``first:stop`` of one call: every element in exactly one chunk, at its
    place in the flat buffers, with its segment's row (or -1)."""
    n, offsets = sum(sizes), np.cumsum([0] + sizes)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, n), max_size=8), label="cuts")) | {0, n})
    spans = [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]
    segments = [(a, b, row) for row, (a, b) in enumerate(s for s in spans if data.draw(st.booleans(), label="on"))]
    row_of = np.full(n, -1)
    for a, b, row in segments:
        row_of[a:b] = row
    first = data.draw(st.integers(0, len(sizes) - 1), label="first")
    stop = data.draw(st.integers(first + 1, len(sizes)), label="stop")
    covered = np.zeros(n, np.int64)
    for leaf, lo, hi, flat_start, row in xla.leaf_chunks(sizes[first:stop], segments, threaded, int(offsets[first])):
        assert 0 <= lo < hi <= sizes[first + leaf]
        assert flat_start == offsets[first + leaf] + lo
        assert hi - lo <= xla.CHUNK or not threaded
        assert np.all(row_of[flat_start:flat_start + hi - lo] == row)
        covered[flat_start:flat_start + hi - lo] += 1
    assert np.all(covered[offsets[first]:offsets[stop]] == 1) and not covered[:offsets[first]].any()
    assert not covered[offsets[stop]:].any()


@sweep(40)
@given(sizes=st.lists(st.integers(0, 3_000_000), min_size=1, max_size=12), itemsize=st.sampled_from([4, 8]))
def test_calls_take_whole_leaves_up_to_their_byte_budget(sizes, itemsize):
    groups = xla.leaf_groups(sizes, itemsize)
    assert groups[0][0] == 0 and groups[-1][1] == len(sizes)
    for (_, stop), (first, _) in zip(groups, groups[1:]):
        assert stop == first
    for first, stop in groups:
        assert stop > first
        assert stop - first == 1 or sum(sizes[first:stop]) * itemsize <= xla.CALL_BYTES


def test_scalar_empty_and_python_float_leaves_match_the_host_path():
    params = {"s": jnp.float32(0.5), "e": jnp.zeros((0, 3), jnp.float32), "m": jnp.ones((2, 3), jnp.float32),
              "py": 1.5}
    grads = {"s": jnp.float32(0.1), "e": jnp.zeros((0, 3), jnp.float32), "m": jnp.full((2, 3), 0.2, jnp.float32),
             "py": 0.3}

    def run():
        tx = as_optax(flatopt.Adam(lr=0.1))
        state, results = tx.init(params), []
        for _ in range(3):
            updates, state = jax.jit(tx.update)(grads, state, params)
            results.append(updates)
        return results, state

    ffi = run()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(xla, "target", lambda dtype: None)
        host = run()
    assert jax.tree_util.tree_structure(ffi) == jax.tree_util.tree_structure(host)
    for a, b in zip(jax.tree_util.tree_leaves(ffi), jax.tree_util.tree_leaves(host)):
        assert jnp.shape(a) == jnp.shape(b) and jnp.result_type(a) == jnp.result_type(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- the handler called directly, with call frames built as c_api.h lays them out -------------

class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("dtype", ctypes.c_int),
                ("data", ctypes.c_void_p), ("rank", ctypes.c_int64), ("dims", ctypes.POINTER(ctypes.c_int64))]


class _List(ctypes.Structure):  # XLA_FFI_Args, XLA_FFI_Rets (and the attributes' first fields)
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("size", ctypes.c_int64),
                ("types", ctypes.c_void_p), ("items", ctypes.POINTER(ctypes.c_void_p))]


class _Attrs(ctypes.Structure):
    _fields_ = _List._fields_ + [("attrs", ctypes.c_void_p)]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("api", ctypes.c_void_p),
                ("ctx", ctypes.c_void_p), ("stage", ctypes.c_int), ("args", _List), ("rets", _List),
                ("attrs", _Attrs), ("future", ctypes.c_void_p)]


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion), ("traits", ctypes.c_uint32),
                ("state_type_id", ctypes.c_int64)]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int), ("next", ctypes.c_void_p),
                ("metadata", ctypes.POINTER(_Metadata))]


def _call(frame):
    handler = xla._registered[xla.target(np.float32)][1]  # registered: the compiled callback
    return handler(ctypes.addressof(frame))


def _frame(args, rets, stage=3):
    """A call frame over NumPy arrays; ``keep`` holds everything it points to."""
    keep = []

    def buffers(arrays):
        structs = []
        for a in arrays:
            dims = (ctypes.c_int64 * max(1, a.ndim))(*a.shape)
            structs.append(_Buffer(ctypes.sizeof(_Buffer), None, 11, a.ctypes.data, a.ndim, dims))
            keep.extend([a, dims])
        pointers = (ctypes.c_void_p * len(structs))(*[ctypes.addressof(s) for s in structs])
        keep.extend([structs, pointers])
        return _List(ctypes.sizeof(_List), None, len(structs), None, pointers)

    frame = _CallFrame(ctypes.sizeof(_CallFrame), None, None, None, stage, buffers(args), buffers(rets))
    return frame, keep


def test_handler_answers_xlas_version_query():
    metadata = _Metadata(ctypes.sizeof(_Metadata), _ApiVersion(ctypes.sizeof(_ApiVersion), None, -1, -1), 7, 0)
    extension = _MetadataExtension(ctypes.sizeof(_MetadataExtension), 1, None, ctypes.pointer(metadata))
    frame = _CallFrame(ctypes.sizeof(_CallFrame), ctypes.addressof(extension))
    assert _call(frame) is None  # the null error
    assert (metadata.api_version.major_version, metadata.api_version.minor_version) == xla.FFI_API_VERSION
    assert metadata.traits == 0


@pytest.mark.parametrize("new_params", [False, True], ids=["updates", "new-params"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_handler_steps_on_execute_only_and_copies_unaliased_state_in(stage, new_params):
    """A frame whose state results (and, for new params, whose params results) are not the
    arguments' memory (XLA aliases them; the handler copies them in where it did not): the
    results are the core step's."""
    from flatopt.kernels.cpu import rule_address

    n, rng = 10, np.random.default_rng(0)
    params, grads = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    m_in, v_in = 0.1 * rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)
    arguments = [params.copy(), grads.copy(), m_in.copy(), v_in.copy()]
    core = flatopt.Adam(lr=1e-2)
    core.state = {"exp_avg": m_in.copy(), "exp_avg_sq": v_in.copy()}
    core.group_state = [{"step": 3}]
    table = np.array([core._row(core.__dict__, {"step": 3}, np.float32)], np.float32)
    expected = params.copy()
    core.step(expected, grads)
    empty = np.zeros(0, np.float32)
    chunks = xla.leaf_chunks([6, 4], [(0, n, 0)], False).view(np.uint32)
    flags = xla.NEW_PARAMS if new_params else 0
    control = np.array([rule_address("adam", np.float32), 0, 0, flags], np.int64).view(np.uint32)
    updates = [np.full(6, np.nan, np.float32), np.full(4, np.nan, np.float32)]
    m_out, v_out = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    frame, _keep = _frame([params[:6], params[6:], grads[:6], grads[6:], m_in, v_in, empty, empty, chunks, table,
                          control], updates + [m_out, v_out, empty, empty], stage)
    assert _call(frame) is None
    if stage != 3:
        assert np.isnan(m_out).all() and all(np.isnan(u).all() for u in updates)
        return
    np.testing.assert_array_equal(np.concatenate(updates), expected if new_params else expected - params)
    np.testing.assert_array_equal(m_out, core.state["exp_avg"])
    np.testing.assert_array_equal(v_out, core.state["exp_avg_sq"])
    for now, before in zip([params, grads, m_in, v_in], arguments):  # the arguments are left as they were
        np.testing.assert_array_equal(now, before)


def _huge_page_advice(address):
    """Whether the mapping holding ``address`` asked for transparent huge pages (VmFlags hg)."""
    mapping = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            start, stop = (int(x, 16) for x in head.split("-"))
            mapping = start <= address < stop
        elif mapping and line.startswith("VmFlags:"):
            return "hg" in line.split()[1:]
    raise LookupError(f"no mapping holds {address:#x}")


def _unadvised_float32(n):
    """``n`` float32s on a plain anonymous mapping (NumPy asks for huge pages on its own large
    arrays), at an offset that is no 2 MiB boundary; nothing asked for yet."""
    mapping = mmap.mmap(-1, 4 * n + 2 * xla.HUGE_PAGE)
    base = np.frombuffer(mapping, np.uint8).ctypes.data
    array = np.frombuffer(mapping, np.float32, n, 4096 if (base + 4096) % xla.HUGE_PAGE else 8192)
    assert not _huge_page_advice(array.ctypes.data)
    return array  # holds the mapping


NEEDS_THP = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and Path("/sys/kernel/mm/transparent_hugepage").is_dir()),
    reason="needs Linux with transparent huge pages")


@NEEDS_THP
def test_large_updates_ask_for_huge_pages_on_their_whole_2mib_pages():
    """Updates of ADVISE_BYTES or more: huge pages asked for from their first 2 MiB boundary to
    their last (not on the pages before or after, which other allocations may share); smaller
    updates: nothing asked.  The buffers are plain anonymous mappings (NumPy asks for huge pages
    on its own large arrays) at an offset that is no 2 MiB boundary."""
    from flatopt.kernels.cpu import rule_address

    huge, sizes = xla.HUGE_PAGE, [xla.ADVISE_BYTES // 4 + 1000, xla.ADVISE_BYTES // 4 - 1]
    updates = [_unadvised_float32(n) for n in sizes]
    for u in updates:
        u[:] = np.nan
    total, rng = sum(sizes), np.random.default_rng(0)
    params, grads = rng.standard_normal(total).astype(np.float32), rng.standard_normal(total).astype(np.float32)
    core = flatopt.Adam(lr=1e-2)
    expected = params.copy()
    core.step(expected, grads)
    m, v, empty = np.zeros(total, np.float32), np.zeros(total, np.float32), np.zeros(0, np.float32)
    table = np.array([core._row(core.__dict__, {"step": 0}, np.float32)], np.float32)
    chunks = xla.leaf_chunks(sizes, [(0, total, 0)], False).view(np.uint32)
    control = np.array([rule_address("adam", np.float32), 0, 0, 0], np.int64).view(np.uint32)
    cut = sizes[0]
    frame, _keep = _frame([params[:cut], params[cut:], grads[:cut], grads[cut:], m, v, empty, empty, chunks, table,
                          control], updates + [m, v, empty, empty])
    assert _call(frame) is None
    np.testing.assert_array_equal(np.concatenate(updates), expected - params)
    big, small = updates[0].ctypes.data, updates[1].ctypes.data
    first, last = -(-big // huge) * huge, (big + updates[0].nbytes) // huge * huge - 1
    assert _huge_page_advice(first) and _huge_page_advice(last)
    assert not _huge_page_advice(big) and not _huge_page_advice(last + 1)
    assert not _huge_page_advice(small) and not _huge_page_advice(small + updates[1].nbytes - 1)


@NEEDS_THP
def test_new_params_stepped_in_place_ask_for_nothing():
    """A result aliased to its parameters (update_and_apply on donated params) is memory XLA
    already had: stepped in place, with no huge pages asked for."""
    from flatopt.kernels.cpu import rule_address

    n, rng = xla.ADVISE_BYTES // 4 + 1000, np.random.default_rng(0)
    params, grads = _unadvised_float32(n), rng.standard_normal(n).astype(np.float32)
    params[:] = rng.standard_normal(n)
    core = flatopt.Adam(lr=1e-2)
    expected = params.copy()
    core.step(expected, grads)
    m, v, empty = np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(0, np.float32)
    table = np.array([core._row(core.__dict__, {"step": 0}, np.float32)], np.float32)
    chunks = xla.leaf_chunks([n], [(0, n, 0)], False).view(np.uint32)
    control = np.array([rule_address("adam", np.float32), 0, 0, xla.NEW_PARAMS], np.int64).view(np.uint32)
    frame, _keep = _frame([params, grads, m, v, empty, empty, chunks, table, control], [params, m, v, empty, empty])
    assert _call(frame) is None
    np.testing.assert_array_equal(params, expected)
    first = -(-params.ctypes.data // xla.HUGE_PAGE) * xla.HUGE_PAGE
    assert not _huge_page_advice(first)


def test_an_update_larger_than_the_huge_page_threshold_equals_the_core_step():
    check_against_core(lambda: flatopt.AdamW(lr=1e-2), [xla.ADVISE_BYTES // 4 + 1000, 3], steps=2)
