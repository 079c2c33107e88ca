"""JAX adapter: as_optax (``tx.update`` and ``update_and_apply``) against optax's own optimizers
and against the core optimizer on the same flat buffer; as_optax as a pure optax transformation
(fresh inits, pure updates, jit, chain, apply_if_finite, MultiSteps); TreeOptimizer.  The tests marked with ``path`` run
as_optax both ways: the XLA FFI kernel (the CPU default) and the host callback (other
platforms, Lookahead, and a JAX that refuses the FFI handler)."""
import contextlib
import copy
import functools
import re
from unittest import mock

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import flatopt  # noqa: E402
from flatopt.jax import FlatoptState, LookaheadState, TreeOptimizer, as_optax, update_and_apply  # noqa: E402
from flatopt.kernels import xla as xla_kernels  # noqa: E402

PATHS = ["xla", "host"]


@contextlib.contextmanager
def on_path(path):
    """as_optax transformations traced inside run on ``path``."""
    if path == "xla":
        yield
    else:  # as where the FFI handler cannot be registered
        with mock.patch.object(xla_kernels, "target", lambda dtype: None):
            yield


@pytest.fixture(params=PATHS)
def path(request):
    with on_path(request.param):
        yield request.param


def tree(seed, scale=1.0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    leaf = lambda *shape: jnp.asarray(scale * rng.standard_normal(shape), dtype=dtype)
    return {"dense": {"w": leaf(7, 5), "b": leaf(5)}, "layers": [leaf(3, 2, 2), (leaf(1), leaf(11))]}  # 64 elements


def flat(t):
    return np.asarray(ravel_pytree(t)[0])


def host(t):
    """A NumPy copy of a pytree's leaves, to compare later."""
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), t)


def assert_trees_equal(a, b):
    """Same structure, same dtypes, same bits."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def optax_loop(tx, params, grads_list, update=None):
    update = update or tx.update
    state = tx.init(params)
    for grads in grads_list:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def worst_relative(ours, theirs):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / np.max(np.abs(np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)))


# --- against optax's own optimizers -------------------------------------------------------

CASES = [
    (lambda: flatopt.SGD(lr=0.05), lambda: optax.sgd(0.05)),
    (lambda: flatopt.SGD(lr=0.05, momentum=0.9), lambda: optax.sgd(0.05, momentum=0.9)),
    (lambda: flatopt.SGD(lr=0.05, momentum=0.9, nesterov=True), lambda: optax.sgd(0.05, momentum=0.9, nesterov=True)),
    (lambda: flatopt.Adam(lr=1e-2), lambda: optax.adam(1e-2)),
    (lambda: flatopt.AdamW(lr=1e-2, weight_decay=0.1), lambda: optax.adamw(1e-2, weight_decay=0.1)),
]


@pytest.mark.parametrize("make_flat, make_optax", CASES)
def test_as_optax_matches_optax_float32(make_flat, make_optax):
    params, grads_list = tree(0), [tree(s, 0.1) for s in range(1, 51)]
    ours = optax_loop(as_optax(make_flat()), params, grads_list)
    theirs = optax_loop(make_optax(), params, grads_list)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)


@pytest.mark.parametrize("make_flat, make_optax", CASES)
def test_as_optax_matches_optax_float64_to_1e12(make_flat, make_optax):
    with jax.enable_x64(True):
        params, grads_list = tree(0, dtype=jnp.float64), [tree(s, 0.1, jnp.float64) for s in range(1, 61)]
        ours = optax_loop(as_optax(make_flat()), params, grads_list)
        theirs = optax_loop(make_optax(), params, grads_list)
        assert all(x.dtype == jnp.float64 for x in jax.tree_util.tree_leaves(ours))
        assert worst_relative(ours, theirs) < 1e-12


@pytest.mark.parametrize("make_flat, make_optax", CASES)
def test_tree_optimizer_matches_optax_float32(make_flat, make_optax):
    params, grads_list = tree(0), [tree(s, 0.1) for s in range(1, 51)]
    tree_opt = TreeOptimizer(make_flat(), params)
    for grads in grads_list:
        ours = tree_opt.step(grads)
    theirs = optax_loop(make_optax(), params, grads_list)
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)


def test_tree_optimizer_float64_matches_optax_to_1e12():
    with jax.enable_x64(True):
        params, grads_list = tree(0, dtype=jnp.float64), [tree(s, 0.1, jnp.float64) for s in range(1, 61)]
        tree_opt = TreeOptimizer(flatopt.Adam(lr=1e-2), params)
        for grads in grads_list:
            ours = tree_opt.step(grads)
        assert worst_relative(ours, optax_loop(optax.adam(1e-2), params, grads_list)) < 1e-12


# --- against the core optimizer on the same flat buffer: bit for bit ------------------------

CORE = {
    "sgd": lambda: flatopt.SGD(lr=0.05),
    "sgd-nesterov-l2": lambda: flatopt.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "momentum": lambda: flatopt.Momentum(lr=0.05, beta=0.8),
    "rmsprop-centered": lambda: flatopt.RMSprop(lr=1e-2, momentum=0.5, centered=True),
    "adam-amsgrad": lambda: flatopt.Adam(lr=1e-2, amsgrad=True),
    "adamw-lr-schedule": lambda: flatopt.AdamW(lr=lambda t: 1e-2 / (1 + t), weight_decay=0.1),
    "adopt": lambda: flatopt.ADOPT(lr=1e-2),
    "param-groups": lambda: flatopt.AdamW(lr=1e-2, param_groups=[
        {"start": 0, "stop": 20, "weight_decay": 0.0}, {"start": 20, "stop": 30, "frozen": True},
        {"start": 30, "stop": 60, "lr": 1e-3, "amsgrad": True}]),  # elements 60-63 in no group
    "lookahead": lambda: flatopt.Lookahead(flatopt.Adam(lr=1e-2), k=3),
}


def assert_state_is_core(state, core):
    if isinstance(core, flatopt.Lookahead):
        assert isinstance(state, LookaheadState) and int(state.step_count) == core.step_count
        np.testing.assert_array_equal(np.asarray(state.slow), core.slow)
        state, core = state.inner, core.inner
    assert isinstance(state, FlatoptState)
    assert set(state.buffers) == set(core.state)
    for name, buf in state.buffers.items():
        assert buf.dtype == core.state[name].dtype
        np.testing.assert_array_equal(np.asarray(buf), core.state[name])
    for key, counts in state.counters.items():
        assert [int(c) for c in counts] == [int(s[key]) for s in core.group_state]


@pytest.mark.parametrize("api", ["update", "update_and_apply"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(CORE))
def test_as_optax_equals_core_step_bitwise(name, dtype, jit, api, path):
    """``tx.update``'s updates are the core step's ``new - params``; ``update_and_apply``'s new
    params are the core step's own (jitted: params and state donated)."""
    with jax.enable_x64(dtype == np.float64):
        params, grads_list = tree(0, dtype=dtype), [tree(s, 0.1, dtype) for s in range(1, 12)]
        tx = as_optax(CORE[name]())
        fused = api == "update_and_apply"
        step = functools.partial(update_and_apply, tx) if fused else tx.update
        step = jax.jit(step, donate_argnums=(1, 2) if fused else ()) if jit else step
        core = CORE[name]()
        state = (jax.jit(tx.init) if jit else tx.init)(params)
        for grads in grads_list:
            # the core steps the loop's parameters: apply_updates' p + (new - p) may round
            # away from new by an ulp, so the two trajectories would drift apart
            before = flat(params).copy()
            core_params = before.copy()
            core.step(core_params, flat(grads))
            result, state = step(grads, state, params)
            assert jax.tree_util.tree_structure(result) == jax.tree_util.tree_structure(grads)
            ours = flat(result)
            assert ours.dtype == dtype
            np.testing.assert_array_equal(ours, core_params if fused else core_params - before)
            assert_state_is_core(state, core)
            params = result if fused else optax.apply_updates(params, result)


def test_update_and_apply_takes_only_flatopt_transformations_and_checks_as_update():
    params, grads = tree(0), tree(1, 0.1)
    with pytest.raises(TypeError, match="update_and_apply takes a transformation made by flatopt.jax.as_optax"):
        update_and_apply(optax.adam(1e-3), grads, optax.adam(1e-3).init(params), params)
    tx = as_optax(flatopt.Adam(lr=1e-3))
    state = tx.init(params)
    with pytest.raises(ValueError, match="grads have 63 elements but params have 64"):
        update_and_apply(tx, {**grads, "layers": [grads["layers"][0], (grads["layers"][1][0][:0],
                                                                         grads["layers"][1][1])]}, state, params)
    with pytest.raises(ValueError, match="the state was made for"):
        update_and_apply(tx, tree(1, 0.1), tx.init({"w": jnp.zeros(3)}), params)


# --- a pure optax transformation ----------------------------------------------------------

def test_inits_are_fresh_and_independent_and_opt_is_untouched():
    opt = flatopt.Adam(lr=0.1)
    tx = as_optax(opt)
    params, grads = tree(0), tree(1, 0.1)
    first = tx.init(params)
    state = tx.init(params)
    for _ in range(3):  # a first run
        _, state = tx.update(grads, state, params)
    assert [int(c) for c in state.counters["step"]] == [3]
    again = tx.init(params)  # a new run starts fresh
    assert_trees_equal(again, first)
    assert [int(c) for c in again.counters["step"]] == [0]
    assert all(not np.any(np.asarray(b)) for b in again.buffers.values())
    other = as_optax(flatopt.Adam(lr=0.1))
    assert_trees_equal(tx.update(grads, again, params), other.update(grads, other.init(params), params))
    # opt only supplied the hyperparameters: never stepped, and later changes do not reach tx
    assert opt.state == {} and opt.group_state == [{"step": 0}]
    opt.lr = 5.0
    assert_trees_equal(tx.update(grads, again, params), other.update(grads, other.init(params), params))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", ["sgd-nesterov-l2", "adamw-lr-schedule", "lookahead"])
def test_update_is_pure(name, jit, path):
    tx = as_optax(CORE[name]())
    update = jax.jit(tx.update) if jit else tx.update
    params, grads = tree(0), tree(1, 0.1)
    state = tx.init(params)
    for s in range(2, 5):
        _, state = update(tree(s, 0.1), state, params)
    saved = host((grads, state, params))
    first = update(grads, state, params)
    second = update(grads, state, params)
    assert_trees_equal(first, second)  # the same inputs give the same outputs
    assert_trees_equal((grads, state, params), saved)  # and stay as they were
    assert not np.array_equal(flat(first[1]), flat(state))  # while the returned state moved on


# The host keeps its buffers from one update to the next and returns them (JAX copies a
# callback's results): nothing returned earlier may change, whatever runs after it.

@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", ["adam-amsgrad", "param-groups", "lookahead"])
def test_earlier_results_stay_as_returned(name, jit, path):
    tx = as_optax(CORE[name]())
    update = jax.jit(tx.update) if jit else tx.update
    params, state = tree(0), tx.init(tree(0))
    returned = []
    for s in range(1, 8):
        grads = tree(s, 0.1)
        updates, new_state = update(grads, state, params)
        returned.append(((updates, new_state), host((updates, new_state)), (grads, host(state), host(params))))
        params, state = optax.apply_updates(params, updates), new_state
    fresh = as_optax(CORE[name]())
    for result, saved, (grads, state, params) in returned:
        assert_trees_equal(result, saved)  # unchanged by the updates after it
        assert_trees_equal(result, fresh.update(grads, state, params))  # and what a fresh transformation gives
    for _, saved, inputs in reversed(returned):  # earlier states again (a restart): the same results
        assert_trees_equal(update(*inputs), saved)


def test_one_transformation_on_two_models(path):
    """Alternating between models of two sizes, each update equals that of a transformation of
    its own (on the host path, the kept buffers switch sizes every update)."""
    tx, tx_small, tx_large = (as_optax(flatopt.Lookahead(flatopt.Adam(lr=1e-2), k=2)) for _ in range(3))
    small, large = tree(0), {"w": jnp.asarray(np.random.default_rng(1).standard_normal(300), jnp.float32)}
    models = {"small": [small, tx.init(small), tx_small.init(small)],
              "large": [large, tx.init(large), tx_large.init(large)]}
    for s in range(6):  # alternating: the host's kept buffers switch sizes every update
        for key, alone in (("small", tx_small), ("large", tx_large)):
            params, state, own = models[key]
            grads = jax.tree_util.tree_map(lambda x: 0.1 * x + s, params)
            updates, state = tx.update(grads, state, params)
            expected, own = alone.update(grads, own, params)
            assert_trees_equal((updates, state), (expected, own))
            models[key] = [optax.apply_updates(params, updates), state, own]


def test_updates_from_several_threads(path):
    import threading

    tx = as_optax(CORE["sgd-nesterov-l2"]())

    def run(seed):
        params, state = tree(seed), tx.init(tree(seed))
        for s in range(5):
            updates, state = tx.update(tree(seed + s + 1, 0.1), state, params)
            params = optax.apply_updates(params, updates)
        return host((params, state))

    expected = [run(seed) for seed in range(4)]
    got = [None] * 4

    def worker(i):
        got[i] = run(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got, expected):
        assert_trees_equal(a, b)


def test_numpy_leaves_are_not_modified(path):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    grads = {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}
    saved = host((params, grads))
    tx = as_optax(flatopt.AdamW(lr=0.1))
    updates, _ = tx.update(grads, tx.init(params), params)
    assert_trees_equal((params, grads), saved)
    assert np.all(np.asarray(updates["b"]) < 0)


@pytest.mark.parametrize("api", ["update", "update_and_apply"])
def test_vmap_over_a_batch_of_parameter_sets(api, path):
    tx = as_optax(flatopt.Adam(lr=0.1))
    step = tx.update if api == "update" else functools.partial(update_and_apply, tx)
    params, grads = [tree(0), tree(1)], [tree(2, 0.1), tree(3, 0.1)]
    stack = lambda trees: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)
    state = tx.init(params[0])
    batched = jax.jit(jax.vmap(step, in_axes=(0, None, 0)))(stack(grads), state, stack(params))
    assert_trees_equal(batched, stack([step(g, state, p) for g, p in zip(grads, params)]))


def test_chain_with_clip_by_global_norm_matches_optax():
    with jax.enable_x64(True):
        params, grads_list = tree(0, dtype=jnp.float64), [tree(s, 1.0, jnp.float64) for s in range(1, 21)]
        assert float(optax.tree.norm(grads_list[0])) > 2  # the clip is active
        ours = optax.chain(optax.clip_by_global_norm(1.0), as_optax(flatopt.Adam(lr=1e-2)))
        theirs = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
        assert worst_relative(optax_loop(ours, params, grads_list), optax_loop(theirs, params, grads_list)) < 1e-12
        assert worst_relative(optax_loop(ours, params, grads_list, jax.jit(ours.update)),
                              optax_loop(theirs, params, grads_list)) < 1e-12


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_apply_if_finite_skips_a_nan_step(jit, path):
    inner = as_optax(flatopt.Adam(lr=0.1))
    tx = optax.apply_if_finite(inner, 3)
    update = jax.jit(tx.update) if jit else tx.update
    params, g1, g2 = tree(0), tree(1, 0.1), tree(2, 0.1)
    bad = jax.tree_util.tree_map(lambda x: x.at[0].set(jnp.nan) if x.ndim == 1 else x, g1)
    state = tx.init(params)
    updates, state = update(g1, state, params)
    params = optax.apply_updates(params, updates)
    before = host((params, state.inner_state))
    updates, state = update(bad, state, params)
    assert all(not np.any(np.asarray(u)) for u in jax.tree_util.tree_leaves(updates))
    params = optax.apply_updates(params, updates)
    assert_trees_equal((params, state.inner_state), before)  # nothing moved
    assert int(state.notfinite_count) == 1 and int(state.total_notfinite) == 1
    updates, state = update(g2, state, params)
    params = optax.apply_updates(params, updates)
    assert_trees_equal(params, optax_loop(inner, tree(0), [g1, g2]))  # as if the NaN step never came


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_multisteps_accumulates(jit, path):
    with jax.enable_x64(True):
        inner = as_optax(flatopt.Adam(lr=0.1))
        tx = optax.MultiSteps(inner, 2, accumulator_dtype=jnp.float64)  # its default accumulates in float32
        update = jax.jit(tx.update) if jit else tx.update
        start, grads_list = tree(0, dtype=jnp.float64), [tree(s, 0.1, jnp.float64) for s in range(1, 7)]
        params, state = start, tx.init(start)
        for i, grads in enumerate(grads_list):
            updates, state = update(grads, state, params)
            if i % 2 == 0:  # a micro step: gradients accumulated, nothing applied
                assert all(not np.any(np.asarray(u)) for u in jax.tree_util.tree_leaves(updates))
            params = optax.apply_updates(params, updates)
        assert [int(c) for c in state.inner_opt_state.counters["step"]] == [3]
        means = [jax.tree_util.tree_map(lambda a, b: a + (b - a) / 2, grads_list[i], grads_list[i + 1])
                 for i in range(0, 6, 2)]  # MultiSteps' running mean
        assert worst_relative(params, optax_loop(inner, start, means)) < 1e-12
        reference = optax.MultiSteps(optax.adam(0.1), 2, accumulator_dtype=jnp.float64)
        assert worst_relative(params, optax_loop(reference, start, grads_list)) < 1e-12


def test_float64_state_and_mixed_leaf_dtypes(path):
    with jax.enable_x64(True):
        params = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones(2, jnp.float64)}
        tx = as_optax(flatopt.Adam(lr=0.1))
        state = tx.init(params)  # ravel_pytree promotes: one float64 buffer
        assert all(b.dtype == jnp.float64 and b.shape == (5,) for b in state.buffers.values())
        updates, _ = jax.jit(tx.update)(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
        assert updates["a"].dtype == jnp.float32 and updates["b"].dtype == jnp.float64


# --- errors ---------------------------------------------------------------------------------

def test_update_needs_params_and_matching_sizes():
    tx = as_optax(flatopt.Adam())
    params = tree(0)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, state)
    with pytest.raises(ValueError, match="elements"):
        tx.update({"x": jnp.ones(3)}, state, params)
    with pytest.raises(ValueError, match="shapes"):
        tx.update(jax.tree_util.tree_map(lambda x: x.reshape(-1), params), state, params)
    with pytest.raises(ValueError, match="tx.init"):
        tx.update({"x": jnp.ones(3)}, state, {"x": jnp.ones(3)})
    with pytest.raises(ValueError, match="elements"):
        jax.jit(tx.update)({"x": jnp.ones(3)}, state, params)
    with pytest.raises(TypeError, match="LookaheadState"):
        as_optax(flatopt.Lookahead(flatopt.Adam())).update(params, state, params)


UNCONVERTIBLE = {
    "int lr beyond float": lambda: flatopt.SGD(lr=10**400),
    "complex dampening": lambda: flatopt.SGD(lr=0.1, momentum=0.9, dampening=1j),
    "a group's lr": lambda: flatopt.Adam(param_groups=[dict(start=0, stop=60), dict(start=60, stop=64, lr=10**400)]),
    "Lookahead's inner lr": lambda: flatopt.Lookahead(flatopt.RMSprop(lr=10**400)),
}


@pytest.mark.parametrize("api", ["update", "update_and_apply"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("make", list(UNCONVERTIBLE.values()), ids=list(UNCONVERTIBLE))
def test_a_hyperparameter_no_table_takes_is_refused_as_the_core_step_refuses_it(make, jit, api, path):
    """Such a value (valid by torch's checks: torch too refuses it only at its step) once failed
    inside the host callback, and reached the caller as XLA's INTERNAL error around it."""
    params, grads = tree(0), tree(1, 0.1)
    p, g = np.array(flat(params)), flat(grads)
    with pytest.raises(Exception) as core_error:
        make().step(p, g)
    assert type(core_error.value) in (OverflowError, TypeError)
    tx = as_optax(make())
    step = tx.update if api == "update" else functools.partial(update_and_apply, tx)
    with pytest.raises(type(core_error.value), match=re.escape(str(core_error.value))):
        (jax.jit(step) if jit else step)(grads, tx.init(params), params)


@pytest.mark.parametrize("api", ["update", "update_and_apply"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_schedule_value_the_core_refuses_fails_the_update_with_its_message(jit, api, path):
    """A schedule of Python arithmetic runs on the host, in the update: its value is checked there,
    as ``opt.step`` checks it, and the error reaches the caller through XLA with that message."""
    params, grads = tree(0), tree(1, 0.1)
    tx = as_optax(flatopt.Adam(lr=lambda count: -1.0 if count == 1 else 1e-2))
    step = tx.update if api == "update" else functools.partial(update_and_apply, tx)
    step = jax.jit(step) if jit else step
    _, state = step(grads, tx.init(params), params)
    with pytest.raises(Exception, match="Invalid learning rate: -1.0"):
        jax.block_until_ready(step(grads, state, params))


def test_init_errors():
    with pytest.raises(TypeError, match="flatopt optimizer"):
        as_optax(optax.adam(1e-3))
    with pytest.raises(TypeError, match="float32 and float64"):
        as_optax(flatopt.Adam()).init({"x": jnp.ones(3, jnp.bfloat16)})
    tx = as_optax(flatopt.Adam(param_groups=[{"start": 0, "stop": 10}]))
    with pytest.raises(ValueError, match="param groups reach element 10"):
        tx.init({"x": jnp.ones(3)})


# --- TreeOptimizer --------------------------------------------------------------------------

@pytest.mark.parametrize("through", ["np.savez", "the optimizer's own np.savez", "a schedule that cannot be copied"])
def test_tree_optimizer_loads_its_checkpoint_through_savez_and_with_any_schedule(through, tmp_path):
    """``np.load`` gives the optimizer's part back as a 0-d array; and the load must not copy the
    optimizer (a deep copy of a schedule holding a lock raised)."""
    import threading

    class Schedule:
        def __init__(self):
            self.lock = threading.Lock()

        def __call__(self, step):
            return 1e-2 / (1 + step)

    params, grads_list = tree(0), [tree(s, 0.1) for s in range(1, 7)]
    n = ravel_pytree(params)[0].size
    groups = [dict(start=0, stop=n // 2), dict(start=n // 2, stop=n, weight_decay=0.1)]  # (np.load: an array of dicts)

    def make():
        return flatopt.Adam(lr=Schedule(), param_groups=[dict(g) for g in groups])
    straight = TreeOptimizer(make(), params)
    for g in grads_list:
        expected = straight.step(g)
    first = TreeOptimizer(make(), params)
    for g in grads_list[:3]:
        first.step(g)
    checkpoint = first.state_dict()
    if through == "np.savez":
        np.savez(tmp_path / "ckpt.npz", **checkpoint)
        checkpoint = np.load(tmp_path / "ckpt.npz", allow_pickle=True)
    elif through == "the optimizer's own np.savez":
        np.savez(tmp_path / "opt.npz", **checkpoint["optimizer"])
        checkpoint = dict(checkpoint, optimizer=np.load(tmp_path / "opt.npz", allow_pickle=True))
    second = TreeOptimizer(make(), params)
    second.load_state_dict(checkpoint)
    for g in grads_list[3:]:
        got = second.step(g)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tree_optimizer_checkpoint_round_trip():
    params, grads_list = tree(0), [tree(s, 0.1) for s in range(1, 9)]
    straight = TreeOptimizer(flatopt.Adam(lr=1e-2), params)
    for g in grads_list:
        expected = straight.step(g)
    first = TreeOptimizer(flatopt.Adam(lr=1e-2), params)
    for g in grads_list[:4]:
        first.step(g)
    second = TreeOptimizer(flatopt.Adam(lr=1e-2), params)
    second.load_state_dict(first.state_dict())
    for g in grads_list[4:]:
        got = second.step(g)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("leaf", [jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.bfloat16)], ids=["int32", "bfloat16"])
def test_tree_optimizer_refuses_params_of_another_dtype_when_built_as_init_does(leaf):
    """It took them and refused them at the first step."""
    with pytest.raises(TypeError, match="flatopt supports float32 and float64"):
        as_optax(flatopt.Adam(lr=1e-2)).init({"w": leaf})
    with pytest.raises(TypeError, match="flatopt supports float32 and float64"):
        TreeOptimizer(flatopt.Adam(lr=1e-2), {"w": leaf})


def _assert_same_checkpoint(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_checkpoint(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_checkpoint(x, y)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    else:
        assert a == b


def _optimizer_part(edit):
    return lambda checkpoint: edit(checkpoint["optimizer"])


@pytest.mark.parametrize("make, edit, error", [
    (lambda: flatopt.Adam(lr=1e-2),
     _optimizer_part(lambda sd: sd["state"].update({k: v[:3] for k, v in sd["state"].items()})), ValueError),
    (lambda: flatopt.Adam(lr=1e-2), _optimizer_part(lambda sd: sd["state"].update({k: v.astype(np.float64)
                                                                                   for k, v in sd["state"].items()})),
     TypeError),
    (lambda: flatopt.Lookahead(flatopt.SGD(lr=1e-2), k=2), _optimizer_part(lambda sd: sd.update(slow=sd["slow"][:3])),
     ValueError),
    (lambda: flatopt.Adam(lr=1e-2), _optimizer_part(lambda sd: sd.update(param_groups=[dict(start=0, stop=10**6)],
                                                                         group_state=[{"step": 1}])), ValueError),
    (lambda: flatopt.SGD(lr=1e-2),
     _optimizer_part(lambda sd: sd.update(param_groups=[dict(start=np.int64(0), stop=np.int64(10**6))],
                                          group_state=[{"step": 1, "momentum_started": False}])), ValueError),
    (lambda: flatopt.SGD(lr=1e-2),  # no state buffers: the core's load has nothing to check the groups against
     _optimizer_part(lambda sd: sd.update(param_groups=[dict(start=0, stop=10), dict(start=10, stop=10**6)],
                                          group_state=[{"step": 1, "momentum_started": False}] * 2)), ValueError),
    (lambda: flatopt.Adam(lr=1e-2), lambda sd: sd.update(params=sd["params"].astype(np.float64)), ValueError),
    (lambda: flatopt.Adam(lr=1e-2),
     lambda sd: (sd.update(params=sd["params"] + 1.0), sd["optimizer"]["state"].update(bogus=sd["params"].copy())),
     ValueError),
], ids=["state of another size", "state of another dtype", "slow weights of another size", "groups past the end",
        "groups past the end, NumPy ints, no state", "the last of two groups past the end, no state",
        "params of float64 for a float32 master", "other params and a buffer the optimizer does not know"])
def test_tree_optimizer_refuses_a_checkpoint_its_next_step_would_refuse(make, edit, error):
    """The core's load checks its buffers against each other only: the checkpoint replaced a
    good state, and the next step refused it.  Params of another dtype (which the master copy
    would silently round) too.  A refused load changes nothing; the next step equals that of a
    TreeOptimizer that loaded the good checkpoint."""
    params, grads = tree(0), tree(1, 0.1)
    tree_opt = TreeOptimizer(make(), params)
    tree_opt.step(grads)
    good = tree_opt.state_dict()
    bad = copy.deepcopy(good)
    edit(bad)
    with pytest.raises(error):
        tree_opt.load_state_dict(bad)
    _assert_same_checkpoint(tree_opt.state_dict(), good)
    expected = TreeOptimizer(make(), params)
    expected.load_state_dict(good)
    for a, b in zip(jax.tree_util.tree_leaves(tree_opt.step(grads)), jax.tree_util.tree_leaves(expected.step(grads))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(params=["ravel", "in place"])
def tree_path(request, monkeypatch):
    """TreeOptimizer's two ways in: jitted ravel_pytree (small trees) and, for a large tree,
    the leaves read where they lie (here ``_flat``, the ravel, fails if it is called)."""
    if request.param == "in place":
        monkeypatch.setattr(flatopt.jax, "FRESH_PAGES", 0)

        def no_ravel(tree):
            raise AssertionError("the gradients were flattened")
        monkeypatch.setattr(flatopt.jax, "_flat", no_ravel)
    return request.param


@pytest.mark.parametrize("lookahead", [False, True])
def test_tree_optimizer_paths_equal_the_core_step(tree_path, lookahead):
    def make():
        inner = flatopt.Adam(lr=1e-2, amsgrad=True, param_groups=[{"start": 0, "stop": 40},
                                                                    {"start": 40, "stop": 70, "lr": 1e-3}])
        return flatopt.Lookahead(inner, k=2) if lookahead else inner
    with jax.enable_x64(True):
        params = {"a": tree(0, dtype=jnp.float64), "b": jnp.ones((2, 3), jnp.float64), "empty": jnp.ones((0, 4))}
        tree_opt = TreeOptimizer(make(), params)
        assert (tree_opt._grads is None) == (tree_path == "ravel")
        core, master = make(), flat(params).copy()
        for s in range(1, 5):
            grads = {"a": tree(s, 0.1, jnp.float64), "b": jnp.full((2, 3), 0.1 * s, jnp.float64),
                     "empty": jnp.ones((0, 4))}
            got = tree_opt.step(grads)
            core.step(master, flat(grads))
            assert_trees_equal(got, ravel_pytree(params)[1](jnp.asarray(master)))


def test_tree_optimizer_copies_gradients_that_share_the_buffers_the_step_writes(monkeypatch):
    """Gradients in the master copy or in the optimizer's state are read before the step writes
    them, as from a copy: the large tree's in-place read is not taken for them."""
    monkeypatch.setattr(flatopt.jax, "FRESH_PAGES", 0)
    n = 4096
    params = {"a": jnp.arange(n, dtype=jnp.float32) / n, "b": jnp.ones(n, jnp.float32)}
    tree_opt = TreeOptimizer(flatopt.Adam(lr=1e-2), params)
    tree_opt.step({"a": jnp.full(n, 0.5, jnp.float32), "b": jnp.full(n, -0.25, jnp.float32)})  # allocates the state
    core, master = flatopt.Adam(lr=1e-2), flat(params).copy()
    core.step(master, np.concatenate([np.full(n, 0.5, np.float32), np.full(n, -0.25, np.float32)]))
    sources = {"master": tree_opt.master, "exp_avg": tree_opt.opt.state["exp_avg"]}
    for name, buf in sources.items():
        # each leaf's gradients are the other leaf's span of the buffer (as JAX arrays made from
        # them can be: JAX's CPU client reads an aligned NumPy array in place)
        grads = {"a": buf[n:], "b": buf[:n]}
        expected = {"a": np.array(buf[n:]), "b": np.array(buf[:n])}
        got = tree_opt.step(grads)
        core.step(master, flat(expected))
        assert_trees_equal(got, ravel_pytree(params)[1](jnp.asarray(master)))


def test_tree_optimizer_returns_arrays_already_computed():
    """JAX reads the master copy in place to make them, and the next step writes it.  (Here the
    leaves are converted back to bfloat16, which this JAX runs asynchronously: a mere slice of
    the buffer it runs before the call returns.)"""
    n = 1 << 21
    params = {"a": jnp.ones(n, jnp.float32), "b": jnp.ones(n, jnp.bfloat16)}
    tree_opt = TreeOptimizer(flatopt.SGD(lr=0.5), params)
    master = flat(params).copy()
    for s in range(1, 4):
        got = tree_opt.step({"a": jnp.full(n, s, jnp.float32), "b": jnp.full(n, s, jnp.bfloat16)})
        assert all(x.is_ready() for x in jax.tree_util.tree_leaves(got))
        flatopt.SGD(lr=0.5).step(master, np.full(2 * n, s, np.float32))
        assert_trees_equal(got, ravel_pytree(params)[1](jnp.asarray(master)))


def test_tree_optimizer_large_tree_of_other_dtypes_or_strides_goes_through_ravel(monkeypatch):
    monkeypatch.setattr(flatopt.jax, "FRESH_PAGES", 0)
    params = {"w": np.ones((6, 4), np.float32), "b": np.zeros(3, np.float32)}
    tree_opt = TreeOptimizer(flatopt.SGD(lr=0.1), params)
    assert tree_opt._grads is not None
    strided = {"w": np.arange(24, dtype=np.float32).reshape(4, 6).T, "b": np.ones(3, np.float32)}
    master = flat(params).copy()
    got = tree_opt.step(strided)
    flatopt.SGD(lr=0.1).step(master, flat(strided))
    assert_trees_equal(got, ravel_pytree(params)[1](jnp.asarray(master)))
    # gradients of another float dtype are taken rounded to the master's, as tx.update takes them
    wide = {"w": np.linspace(0, 1, 24).reshape(6, 4) / 3, "b": np.full(3, 1 / 3)}
    with jax.enable_x64(True):
        got = tree_opt.step(wide)
    flatopt.SGD(lr=0.1).step(master, np.asarray(ravel_pytree(wide)[0], np.float32))
    assert_trees_equal(got, ravel_pytree(params)[1](jnp.asarray(master)))


def test_tree_optimizer_refuses_grads_of_another_structure(tree_path):
    tree_opt = TreeOptimizer(flatopt.Adam(lr=1e-2), tree(0))
    before = tree_opt.master.copy()
    wrong = [jax.tree_util.tree_map(lambda x: x.reshape(-1), tree(1)),  # same sizes, other shapes
             {"dense": tree(1)["dense"], "other": tree(1)["layers"]}]
    for grads in wrong:
        with pytest.raises(ValueError, match="tree structure and leaf shapes"):
            tree_opt.step(grads)
    np.testing.assert_array_equal(tree_opt.master, before)
    assert tree_opt.opt.state == {}


@pytest.mark.parametrize("make_tree", [tree, lambda seed, scale=1.0: tree(seed, scale)["dense"]["b"]],
                         ids=["leaves", "one flat leaf"])
def test_tree_optimizer_returns_params_later_steps_leave_alone(tree_path, make_tree):
    """Also one 1-D leaf, which the unravel could hand back as the master copy itself."""
    tree_opt = TreeOptimizer(flatopt.SGD(lr=0.1, momentum=0.9), make_tree(0))
    first = tree_opt.step(make_tree(1, 0.1))
    saved = host(first)
    for s in range(2, 5):
        tree_opt.step(make_tree(s, 0.1))
    assert_trees_equal(first, saved)
    assert not np.array_equal(flat(first), flat(tree_opt.params))


# --- states, schedules, leaves and grads that earlier versions mishandled -------------------

def _extra_buffer(state):
    return state._replace(buffers={**state.buffers, "bogus": jnp.zeros(8, jnp.float32)})


MISMATCHED_STATES = {  # (make the transformation, make the state it is given, the refusal)
    "adam-state-to-amsgrad": (lambda: flatopt.Adam(lr=1e-2, amsgrad=True),
                              lambda p: as_optax(flatopt.Adam(lr=1e-2)).init(p), "lacks the buffers"),
    "sgd-state-to-momentum": (lambda: flatopt.SGD(lr=0.1, momentum=0.9),
                              lambda p: as_optax(flatopt.SGD(lr=0.1)).init(p), "lacks the buffers"),
    "lookahead-adam-state-to-amsgrad": (lambda: flatopt.Lookahead(flatopt.Adam(lr=1e-2, amsgrad=True)),
                                        lambda p: as_optax(flatopt.Lookahead(flatopt.Adam(lr=1e-2))).init(p),
                                        "lacks the buffers"),
    "unknown-buffer": (lambda: flatopt.Adam(lr=1e-2),
                       lambda p: _extra_buffer(as_optax(flatopt.Adam(lr=1e-2)).init(p)), "unknown buffers"),
    "adam-state-to-sgd": (lambda: flatopt.SGD(lr=0.1), lambda p: as_optax(flatopt.Adam()).init(p), "unknown buffers"),
}
TWO_GROUPS = [{"start": 0, "stop": 5}, {"start": 5, "stop": 8}]
MISMATCHED_COUNTERS = {
    "1-group-state-to-2-groups": (lambda: flatopt.Adam(lr=1e-2, param_groups=TWO_GROUPS),
                                  lambda p: as_optax(flatopt.Adam(lr=1e-2)).init(p)),
    "2-group-state-to-1-group": (lambda: flatopt.Adam(lr=1e-2),
                                 lambda p: as_optax(flatopt.Adam(lr=1e-2, param_groups=TWO_GROUPS)).init(p)),
    "no-counters": (lambda: flatopt.Adam(lr=1e-2), lambda p: as_optax(flatopt.Adam()).init(p)._replace(counters={})),
    "missing-counter": (lambda: flatopt.SGD(lr=0.1, momentum=0.9), lambda p: (lambda s: s._replace(
        counters={"step": s.counters["step"]}))(as_optax(flatopt.SGD(lr=0.1, momentum=0.9)).init(p))),
}


@pytest.mark.parametrize("api", ["update", "update_and_apply"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int16])
@pytest.mark.parametrize("lookahead", [False, True])
def test_step_counters_of_another_dtype_are_refused_when_traced(dtype, lookahead, api):
    """A cast of the whole state (tree_map(astype)) reached the host callback, which failed when
    the update ran (after donated buffers were spent) with JAX's "Incorrect output dtype"."""
    make = (lambda: flatopt.Lookahead(flatopt.Adam(lr=1e-2))) if lookahead else (lambda: flatopt.Adam(lr=1e-2))
    params, grads = {"w": jnp.ones(8, jnp.float32)}, {"w": jnp.full(8, 0.5, jnp.float32)}
    tx = as_optax(make())
    state = tx.init(params)
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.integer) else x
    state = state._replace(step_count=cast(state.step_count)) if lookahead else state._replace(
        counters=jax.tree_util.tree_map(cast, state.counters))
    step = tx.update if api == "update" else functools.partial(update_and_apply, tx)
    with pytest.raises(TypeError, match="step counters have dtype"):
        jax.jit(step)(grads, state, params)


def _mismatch_cases():
    for name, (make, make_state, match) in MISMATCHED_STATES.items():
        yield pytest.param(make, make_state, match, id=name)
    for name, (make, make_state) in MISMATCHED_COUNTERS.items():
        yield pytest.param(make, make_state, "step counters", id=name)


@pytest.mark.parametrize("api", ["update", "update_and_apply"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("make, make_state, match", list(_mismatch_cases()))
def test_state_of_another_transformation_is_refused(make, make_state, match, jit, api):
    """Small sizes: before the refusal the kernel read past the missing buffers."""
    params, grads = {"w": jnp.ones(8, jnp.float32)}, {"w": jnp.full(8, 0.5, jnp.float32)}
    tx = as_optax(make())
    step = tx.update if api == "update" else functools.partial(update_and_apply, tx)
    state = make_state(params)
    with pytest.raises(ValueError, match=match) as info:
        (jax.jit(step) if jit else step)(grads, state, params)
    assert "call tx.init(params)" in str(info.value)
    (jax.jit(step) if jit else step)(grads, tx.init(params), params)  # while its own state is taken


SCHEDULES = {"linear": optax.linear_schedule(1e-2, 1e-3, 10), "cosine": optax.cosine_decay_schedule(1e-2, 8),
             "warmup-cosine": optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 10, 1e-4)}


@pytest.mark.parametrize("api", ["update", "update_and_apply"])
@pytest.mark.parametrize("schedule", list(SCHEDULES.values()), ids=list(SCHEDULES))
def test_optax_schedule_as_lr_equals_core_step_bitwise(schedule, api, path):
    """An lr schedule of JAX operations is evaluated in the update, on the step count, as optax
    evaluates its schedules (XLA may round it otherwise than the same operations run eagerly):
    the core step with those values gives the same numbers, bit for bit."""
    traced = jax.jit(lambda count: schedule(count))
    state = _steps_as_core(flatopt.Adam(lr=schedule), flatopt.Adam(lr=lambda count: traced(np.int32(count))), api,
                           steps=12)  # past the ends
    assert [int(c) for c in state.counters["step"]] == [12]


@pytest.mark.parametrize("api", ["update", "update_and_apply"])
@pytest.mark.parametrize("grouped", [False, True], ids=["one group", "groups"])
def test_adopt_clip_of_jax_operations_is_evaluated_in_the_update(grouped, api, path):
    """ADOPT's ``clip_lambda`` made of JAX operations is evaluated in the update, on the step
    count, as an lr schedule of them is: called inside the host callback, at every update, its
    JAX operations could deadlock XLA, also with one thread updating (a jitted loop without
    ``block_until_ready`` hung in three runs of five).  It runs only while the update is traced,
    and the core step given its values as the update computes them gives the same numbers."""
    calls = []

    def clip(count):
        calls.append(count)
        return 0.05 * jnp.power(count, 0.25)  # (small: the clip binds)

    traced = jax.jit(lambda count: 0.05 * jnp.power(count, 0.25))
    groups = [{"start": 0, "stop": 40}, {"start": 40, "stop": 64, "lr": 3e-2}] if grouped else None

    def adopt(clip_lambda):
        return flatopt.ADOPT(lr=1e-2, clip_lambda=clip_lambda, param_groups=groups)
    _steps_as_core(adopt(clip), adopt(lambda count: traced(np.int32(count))), api, steps=3)
    traced_calls = len(calls)
    assert traced_calls and all(isinstance(c, (int, jax.core.Tracer)) for c in calls)
    _steps_as_core(adopt(clip), adopt(lambda count: traced(np.int32(count))), api, steps=8)
    assert len(calls) == 2 * traced_calls, "the clip ran outside the trace"


@pytest.mark.parametrize("api", ["update", "update_and_apply"])
@pytest.mark.parametrize("lr", [SCHEDULES["linear"], 1e-2], ids=["schedule", "number"])
def test_no_param_groups_at_all_update_nothing(lr, api, path):
    """``param_groups=[]`` updates nothing, as the core step: an lr schedule of JAX operations
    was evaluated for a whole-buffer group that is not there (IndexError while tracing), and
    init made the state buffers that no step of the core makes."""
    opt = flatopt.Adam(lr=lr, param_groups=[])
    state = _steps_as_core(opt, flatopt.Adam(lr=1e-2, param_groups=[]), api, steps=3)
    assert state.buffers == {} and state.counters["step"].shape == (0,)


def _steps_as_core(opt, core, api, steps):
    """``steps`` updates of ``as_optax(opt)`` equal to the core steps of ``core``, bit for bit;
    the state after them."""
    params, grads_list = tree(0), [tree(s, 0.1) for s in range(1, steps + 1)]
    tx = as_optax(opt)
    fused = api == "update_and_apply"
    step = jax.jit(functools.partial(update_and_apply, tx) if fused else tx.update)
    state = tx.init(params)
    for grads in grads_list:
        before = flat(params).copy()
        core_params = before.copy()
        core.step(core_params, flat(grads))
        result, state = step(grads, state, params)
        np.testing.assert_array_equal(flat(result), core_params if fused else core_params - before)
        params = result if fused else optax.apply_updates(params, result)
    return state


@pytest.mark.parametrize("api", ["update", "update_and_apply"])
def test_schedule_past_its_end_runs_as_optax(api, path):
    """XLA's CPU compiler computes the end of ``optax.linear_schedule(1e-2, 0.0, 10)`` as
    -1.5e-10, which optax applies; flatopt takes it too (a given lr below 0 is refused), and tracks
    optax's Adam.  (On an H200 XLA computed 0 there: the run past the end is checked still.)
    In float32 an update of 1e-10 is lost next to parameters of 1, so whether that value is
    applied, not 0 in its place, is checked in float64:
    test_a_groups_schedule_past_its_end_is_applied_as_optax_applies_it."""
    schedule = optax.linear_schedule(1e-2, 0.0, 10)
    if jax.default_backend() == "cpu":
        assert float(jax.jit(schedule)(np.int32(11))) < 0  # what this test is about
    params, grads_list = tree(0), [tree(s, 0.1) for s in range(1, 15)]
    tx, ref = as_optax(flatopt.Adam(lr=schedule)), optax.adam(schedule)
    state, ref_state, ref_params = tx.init(params), ref.init(params), params
    fused = api == "update_and_apply"
    step = jax.jit(functools.partial(update_and_apply, tx) if fused else tx.update)
    for grads in grads_list:
        result, state = step(grads, state, params)
        params = result if fused else optax.apply_updates(params, result)
        updates, ref_state = jax.jit(ref.update)(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
    np.testing.assert_allclose(flat(params), flat(ref_params), rtol=0, atol=2e-5)  # as against optax elsewhere


@pytest.mark.parametrize("schedule", [SCHEDULES["linear"], optax.polynomial_schedule(1e-2, 1e-4, 2.0, 9)],
                         ids=["linear", "polynomial"])
def test_schedule_with_x64_tracks_optax_in_float64(schedule, path):
    """With jax_enable_x64 the schedule gets optax's int32 count: float64 params track
    ``optax.adamw`` with the same schedule to float64 rounding (an int64 count, as until
    2026-11-27, gave a linear schedule other values: 1e-9 apart after six steps)."""
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((6, 5))), "b": jnp.ones(5, jnp.float64)}
        grads_list = [jax.tree_util.tree_map(lambda x, s=s: 0.1 * jnp.sin(s * x + 1.0), params) for s in range(1, 13)]
        results = []
        for tx in (as_optax(flatopt.AdamW(lr=schedule, weight_decay=0.1)), optax.adamw(schedule, weight_decay=0.1)):
            p, state = params, tx.init(params)
            for grads in grads_list:
                updates, state = jax.jit(tx.update)(grads, state, p)
                p = optax.apply_updates(p, updates)
            results.append(flat(p))
    assert results[0].dtype == np.float64
    np.testing.assert_allclose(results[0], results[1], rtol=1e-14, atol=1e-15)


def test_inject_hyperparams_under_jit_is_refused_with_a_clear_error():
    """optax.inject_hyperparams passes its hyperparameters traced under jit: the error names
    the hyperparameter and says what to do, where it was JAX's array-conversion error."""
    params, grads = tree(0), tree(1, 0.1)
    tx = optax.inject_hyperparams(lambda learning_rate: as_optax(flatopt.Adam(lr=learning_rate)))(learning_rate=1e-2)
    with pytest.raises(TypeError, match=r"lr is a value JAX is tracing .*give the schedule to flatopt"):
        jax.jit(tx.update)(grads, tx.init(params), params)
    with pytest.raises(TypeError, match=r"betas is a value JAX is tracing"):
        jax.jit(lambda b: flatopt.Adam(betas=(b, 0.999)))(jnp.float32(0.9))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_update_takes_extra_args_as_optax_adam(jit):
    """A training loop that passes ``value=loss`` to every transformation, as optax's own
    optimizers accept (GradientTransformationExtraArgs)."""
    params, grads = tree(0), tree(1, 0.1)
    tx = as_optax(flatopt.Adam(lr=1e-2))
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    update = jax.jit(tx.update) if jit else tx.update
    with_value, _ = update(grads, tx.init(params), params, value=jnp.asarray(1.0))
    without, _ = update(grads, tx.init(params), params)
    np.testing.assert_array_equal(flat(with_value), flat(without))


@pytest.mark.parametrize("api", ["update", "update_and_apply"])
def test_python_schedule_runs_on_the_host_as_in_opt_step(api, path):
    """A schedule of Python arithmetic (no JAX operation) is called on the host with the step
    count, as ``opt.step`` calls it: the same numbers bit for bit, and Python control flow on
    the count works.  So is one of JAX operations that cannot be traced (control flow on the
    count, NumPy of it): JAX runs a callback with its CPU as the default device, so its
    operations give the numbers they give on the CPU (on an H200, ``jnp.exp`` on the GPU gave
    an lr an ulp away)."""
    def schedule(count):
        return 1e-2 if count < 4 else 1e-2 * 0.8 ** (count - 3)

    def schedule_without_control_flow(count):  # traceable, but Python floats: not traced
        return 1e-2 * 0.93 ** count + 1e-3 / (1 + count)

    def jax_schedule_with_python_control_flow(count):
        return jnp.asarray(1e-2) if count < 4 else 1e-2 * jnp.exp(-0.1 * (count - 3))

    def jax_schedule_of_numpy(count):
        return jnp.asarray(1e-2 * np.cos(np.asarray(count) / 10.0))

    def on_the_cpu(lr):
        def core_lr(count):
            with jax.default_device(jax.devices("cpu")[0]):
                return lr(count)
        return core_lr

    for lr in (schedule, schedule_without_control_flow, jax_schedule_with_python_control_flow, jax_schedule_of_numpy):
        _steps_as_core(flatopt.Adam(lr=lr), flatopt.Adam(lr=on_the_cpu(lr)), api,
                       steps=12)  # (a Python schedule traced in float32 showed in 12 steps, not in 8)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_integer_leaves_get_float_updates(jit, path):
    params = {"a": jnp.ones(3, jnp.float32), "i": jnp.array([10, 20, 30], jnp.int32)}
    grads = {"a": jnp.ones(3, jnp.float32), "i": jnp.ones(3, jnp.float32)}
    tx = as_optax(flatopt.Adam(lr=0.5))
    update = jax.jit(tx.update) if jit else tx.update
    fused = jax.jit(functools.partial(update_and_apply, tx)) if jit else functools.partial(update_and_apply, tx)
    updates, _ = update(grads, tx.init(params), params)
    assert updates["i"].dtype == jnp.float32 and np.all(np.asarray(updates["i"]) < 0)  # not rounded to 0
    core_params = flat(params).copy()
    flatopt.Adam(lr=0.5).step(core_params, flat(grads))
    np.testing.assert_array_equal(flat(updates), core_params - flat(params))
    applied = optax.apply_updates(params, updates)
    assert_trees_equal(applied, fused(grads, tx.init(params), params)[0])
    theirs, _ = optax.adam(0.5).update(grads, optax.adam(0.5).init(params), params)
    assert_trees_equal(applied["i"], optax.apply_updates(params, theirs)["i"])
    assert not np.array_equal(np.asarray(applied["i"]), np.asarray(params["i"]))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_grads_of_another_tree_structure_are_refused(jit):
    params = {"b": jnp.ones(3), "w": jnp.ones((4, 3))}
    grads = [jnp.full(3, 0.1), jnp.full((4, 3), 0.2)]  # the same leaf shapes, in a list
    with pytest.raises(ValueError):  # as optax refuses them
        optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params), params)
    tx = as_optax(flatopt.Adam(lr=1e-2))
    for step in (tx.update, functools.partial(update_and_apply, tx)):
        with pytest.raises(ValueError, match="tree structure"):
            (jax.jit(step) if jit else step)(grads, tx.init(params), params)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("grad_dtype", [jnp.complex64, jnp.bool_])
def test_grads_that_are_not_real_numbers_are_refused(grad_dtype, jit):
    """A complex gradient cast to the params' dtype would lose its imaginary part (with only
    NumPy's ComplexWarning, once, when traced); a boolean one is no gradient.  Refused by name,
    as ``opt.step`` refuses them (and ``TreeOptimizer.step`` a complex one)."""
    params = {"b": jnp.ones(3), "w": jnp.ones((4, 3))}
    grads = {"b": jnp.full(3, 0.1), "w": jnp.ones((4, 3), grad_dtype)}
    tx = as_optax(flatopt.SGD(lr=0.1))
    for step in (tx.update, functools.partial(update_and_apply, tx)):
        with pytest.raises(TypeError, match=f"leaf of dtype {jnp.dtype(grad_dtype).name}"):
            (jax.jit(step) if jit else step)(grads, tx.init(params), params)
    if grad_dtype is jnp.complex64:  # (TreeOptimizer flattens the grads first: a boolean leaf becomes float)
        with pytest.raises(TypeError, match="dtype complex64"):
            TreeOptimizer(flatopt.SGD(lr=0.1), params).step(grads)


@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
@pytest.mark.parametrize("grad_dtype", [jnp.bfloat16, jnp.float16])
def test_tree_optimizer_takes_low_precision_grads_as_float32(grad_dtype, large, monkeypatch):
    if large:  # the tree the in-place read is tried for
        monkeypatch.setattr(flatopt.jax, "FRESH_PAGES", 0)
    params = tree(0)
    tree_opt, core, master = TreeOptimizer(flatopt.Adam(lr=1e-2), params), flatopt.Adam(lr=1e-2), flat(params).copy()
    tx = as_optax(flatopt.Adam(lr=1e-2))
    fused, state, tx_params = jax.jit(functools.partial(update_and_apply, tx)), tx.init(params), params
    for s in range(1, 5):
        grads = tree(s, 0.1, grad_dtype)
        assert {x.dtype for x in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(grad_dtype)}
        got = tree_opt.step(grads)
        core.step(master, flat(grads).astype(np.float32))
        assert_trees_equal(got, ravel_pytree(params)[1](jnp.asarray(master)))
        tx_params, state = fused(grads, state, tx_params)
        assert_trees_equal(tx_params, got)


# --- from a mutation audit of flatopt/jax.py (2026-11-27): cases the tests above let a change through
def _bad_slow(state, n):
    return state._replace(slow=jnp.zeros(n + 1, jnp.float32))


def _slow_of_float64(state, n):
    return state._replace(slow=jnp.zeros(n, jnp.float64))


def _buffers_of_float64(state, n):
    inner = state.inner if hasattr(state, "inner") else state
    inner = inner._replace(buffers={k: v.astype(jnp.float64) for k, v in inner.buffers.items()})
    return state._replace(inner=inner) if hasattr(state, "inner") else inner


@pytest.mark.parametrize("api", ["update", "update_and_apply"])
@pytest.mark.parametrize("path", ["xla", "host"])
@pytest.mark.parametrize("make, edit, error", [
    (lambda: flatopt.Lookahead(flatopt.Adam(lr=1e-2)), _bad_slow, ValueError),
    (lambda: flatopt.Lookahead(flatopt.Adam(lr=1e-2)), _slow_of_float64, TypeError),
    (lambda: flatopt.Adam(lr=1e-2), _buffers_of_float64, TypeError),
    (lambda: flatopt.Lookahead(flatopt.Adam(lr=1e-2)), _buffers_of_float64, TypeError),
], ids=["lookahead-slow-of-another-size", "lookahead-slow-of-float64", "adam-buffers-of-float64",
        "lookahead-inner-buffers-of-float64"])
def test_state_buffers_that_do_not_fit_the_params_are_refused_when_traced(make, edit, error, path, api):
    """Every flat buffer of the state (Lookahead's slow weights too) must have
    the params' size and dtype; refused while the update is traced (lowered only here, so a
    missed refusal never runs the kernel on a buffer it would read past or misread)."""
    with jax.enable_x64(True):
        params, grads = {"w": jnp.ones(8, jnp.float32)}, {"w": jnp.full(8, 0.5, jnp.float32)}
        with on_path(path):
            tx = as_optax(make())
            step = tx.update if api == "update" else functools.partial(update_and_apply, tx)
            state = edit(tx.init(params), 8)
            with pytest.raises(error, match="call tx.init"):
                jax.jit(step).lower(grads, state, params)
            jax.jit(step).lower(grads, tx.init(params), params)  # its own state is taken


# --- as_optax: lr schedules per param group ----------------------------------------------------

LINEAR, COSINE = optax.linear_schedule(1e-2, 1e-3, 10), optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 10, 1e-4)


def _jitted(schedule):
    """The schedule as optax evaluates it in a jitted update: traced on an int32 count."""
    traced = jax.jit(schedule)
    return lambda count: traced(np.int32(count))


GROUP_CASES = {  # (opt's lr, groups' lrs (absent: the opt's)), each schedule of JAX operations
    "schedule-then-constant": (1e-3, [LINEAR, 3e-3]),
    "constant-then-schedule": (1e-3, [3e-3, COSINE]),
    "two-schedules": (1e-3, [COSINE, LINEAR]),
    "the-opts-schedule-in-groups-without-lr": (LINEAR, [None, None]),
    "frozen-then-schedule": (1e-3, ["frozen", LINEAR]),  # the frozen group's count stays 0
}


@pytest.mark.parametrize("api", ["update", "update_and_apply"])
@pytest.mark.parametrize("path", ["xla", "host"])
@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_schedules_per_param_group_equal_the_core_step_bitwise(case, path, api):
    """Each group's lr schedule (or the optimizer's, for a group
    without an lr) is evaluated in the update on that group's count, as optax evaluates
    schedules, and given to that group; the core step with those values (and the constant
    lrs) gives the same numbers, bit for bit."""
    opt_lr, lrs = GROUP_CASES[case]
    bounds = [(0, 40), (40, 64)]

    def groups(as_core):
        made = []
        for (start, stop), lr, wd in zip(bounds, lrs, (0.1, 0.0)):
            group = {"start": start, "stop": stop, "weight_decay": wd}
            if lr == "frozen":
                group["frozen"] = True
            elif lr is not None:
                group["lr"] = _jitted(lr) if as_core and callable(lr) else lr
            made.append(group)
        return made

    core_opt_lr = _jitted(opt_lr) if callable(opt_lr) else opt_lr
    with on_path(path):  # past the schedules' ends
        state = _steps_as_core(flatopt.AdamW(lr=opt_lr, param_groups=groups(False)),
                               flatopt.AdamW(lr=core_opt_lr, param_groups=groups(True)), api, steps=12)
    assert [int(c) for c in state.counters["step"]] == [0 if lr == "frozen" else 12 for lr in lrs]


@pytest.mark.parametrize("where", ["group", "optimizer", "no groups"])
@pytest.mark.parametrize("path", ["xla", "host"])
def test_a_groups_schedule_past_its_end_is_applied_as_optax_applies_it(path, where):
    """One group's schedule of JAX operations, the other's lr a constant.  XLA's CPU
    computes the end of ``linear_schedule(1e-2, 0.0, 10)`` as -1.5e-10 (see
    test_schedule_past_its_end_runs_as_optax); optax's Adam applies it, so must this group,
    where that value evaluated eagerly (0.0) would leave it still.  The same for the optimizer's
    schedule in a group that gives no lr of its own, and in an optimizer without groups."""
    schedule = optax.linear_schedule(1e-2, 0.0, 10)
    rng = np.random.default_rng(0)
    with jax.enable_x64(True), on_path(path):  # float64: an update of 1e-10 shows on parameters of 1
        on_cpu = jax.default_backend() == "cpu"  # (XLA on an H200's GPU computed the end as 0)
        if on_cpu:
            assert float(jax.jit(schedule)(np.int32(11))) < 0 and float(schedule(11)) == 0.0  # what this is about
        params = {"a": jnp.asarray(rng.standard_normal(40)), "b": jnp.asarray(rng.standard_normal(24))}
        grads_list = [jax.tree_util.tree_map(lambda x, s=s: 0.1 * jnp.sin(s * x + 1.0), params) for s in range(1, 13)]
        first = {"start": 0, "stop": 40, "lr": schedule} if where == "group" else {"start": 0, "stop": 40}
        tx = as_optax(flatopt.Adam(lr=schedule) if where == "no groups" else
                      flatopt.Adam(lr=schedule if where == "optimizer" else 1e-3,
                                   param_groups=[first, {"start": 40, "stop": 64, "lr": 3e-3}]))
        ref = optax.adam(schedule)
        state, ref_state, ref_params = tx.init(params), ref.init(params["a"]), params["a"]
        for i, grads in enumerate(grads_list):
            updates, state = jax.jit(tx.update)(grads, state, params)
            ref_updates, ref_state = jax.jit(ref.update)(grads["a"], ref_state, ref_params)
            np.testing.assert_allclose(np.asarray(updates["a"]), np.asarray(ref_updates), rtol=1e-6, atol=1e-15)
            if i >= 10 and on_cpu:
                assert np.all(np.asarray(updates["a"]) != 0)
            params, ref_params = optax.apply_updates(params, updates), optax.apply_updates(ref_params, ref_updates)
