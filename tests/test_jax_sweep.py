"""as_optax (``tx.update`` and ``update_and_apply``) on random histories against the core
optimizer, bitwise; TreeOptimizer on random trees, both ways in.

Each example draws an optimizer (the configurations of test_jax.CORE: groups, a frozen group,
amsgrad, an lr schedule, Lookahead), a dtype and a history of updates.  Each update starts
from the newest state or from an earlier one (what ``apply_if_finite``, ``MultiSteps`` or a
restart do), with fresh gradients.  The reference for an update from state i is a copy of the
core optimizer as it was when that state was made, stepped on the same flat buffer.  On the
host path this exercises the kept buffers: every update refills them from whatever state it
is given; on the XLA path, the step counters the host turns into each update's scalars.
"""
import copy
import functools
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import sweep

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

from test_jax import CORE, PATHS, assert_state_is_core, flat, on_path, tree  # noqa: E402

import flatopt.jax  # noqa: E402
from flatopt.jax import TreeOptimizer, as_optax, update_and_apply  # noqa: E402


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", sorted(CORE))
@sweep(8)
@given(dtype=st.sampled_from([np.float32, np.float64]), jit=st.booleans(), data=st.data())
def test_random_histories_with_replays_match_the_core(name, path, dtype, jit, data):
    with jax.enable_x64(dtype == np.float64), on_path(path):
        tx = as_optax(CORE[name]())
        update = jax.jit(tx.update) if jit else tx.update
        apply = functools.partial(update_and_apply, tx)
        apply = jax.jit(apply) if jit else apply
        params = tree(0, dtype=dtype)
        # history[i]: (params, state, core optimizer) as they were after i updates along that branch
        history = [(params, tx.init(params), CORE[name]())]
        for t in range(data.draw(st.integers(3, 10), label="updates")):
            i = data.draw(st.integers(0, len(history) - 1), label="from state") if t else 0
            params, state, core = history[i]
            grads = tree(100 + t, 0.1, dtype)
            core = copy.deepcopy(core)
            expected = flat(params).copy()
            before = expected.copy()
            core.step(expected, flat(grads))
            if data.draw(st.booleans(), label="update_and_apply"):  # both APIs on one history of states
                new_params, new_state = apply(grads, state, params)
                np.testing.assert_array_equal(flat(new_params), expected)
            else:
                updates, new_state = update(grads, state, params)
                np.testing.assert_array_equal(flat(updates), expected - before)
                new_params = optax.apply_updates(params, updates)
            assert_state_is_core(new_state, core)
            history.append((new_params, new_state, core))


@pytest.mark.parametrize("name", sorted(CORE))
@sweep(4)
@given(in_place=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]),
       sizes=st.lists(st.integers(0, 300), max_size=8), steps=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_tree_optimizer_random_trees_match_the_core(name, in_place, dtype, sizes, steps, seed):
    """Leaves of random sizes (zero-size ones too), read in place (a large tree's way in) or
    through ravel_pytree, against the core step on the flat buffer."""
    fresh_pages = 0 if in_place else flatopt.jax.FRESH_PAGES
    with jax.enable_x64(dtype == np.float64), mock.patch.object(flatopt.jax, "FRESH_PAGES", fresh_pages):
        rng = np.random.default_rng(seed)
        sizes = sizes + [64]  # the configurations' param groups reach element 60
        leaves = lambda scale: [jax.numpy.asarray(scale * rng.standard_normal(n), dtype) for n in sizes]
        params = leaves(1.0)
        tree_opt = TreeOptimizer(CORE[name](), params)
        assert (tree_opt._grads is not None) == in_place
        core, master = CORE[name](), flat(params).copy()
        for _ in range(steps):
            grads = leaves(0.1)
            got = tree_opt.step(grads)
            core.step(master, flat(grads))
            np.testing.assert_array_equal(flat(got), master)
