"""JAX adapter: trajectories of as_optax / TreeOptimizer against optax's own optimizers."""
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import flatopt  # noqa: E402
from flatopt.jax import TreeOptimizer, as_optax  # noqa: E402


def tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    leaf = lambda *shape: jnp.asarray(scale * rng.standard_normal(shape), dtype=jnp.float32)
    return {"dense": {"w": leaf(7, 5), "b": leaf(5)}, "layers": [leaf(3, 2, 2), (leaf(1), leaf(11))]}


CASES = [
    (lambda: flatopt.SGD(lr=0.05), lambda: optax.sgd(0.05)),
    (lambda: flatopt.SGD(lr=0.05, momentum=0.9), lambda: optax.sgd(0.05, momentum=0.9)),
    (lambda: flatopt.Adam(lr=1e-2), lambda: optax.adam(1e-2)),
    (lambda: flatopt.AdamW(lr=1e-2, weight_decay=0.1), lambda: optax.adamw(1e-2, weight_decay=0.1)),
]


def optax_loop(tx, params, grads_list):
    state = tx.init(params)
    for grads in grads_list:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("make_flat, make_optax", CASES)
def test_as_optax_matches_optax_float32(make_flat, make_optax):
    params, grads_list = tree(0), [tree(s, 0.1) for s in range(1, 51)]
    ours = optax_loop(as_optax(make_flat()), params, grads_list)
    theirs = optax_loop(make_optax(), params, grads_list)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)


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


X64 = r"""
import jax, numpy as np, optax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, flatopt
from flatopt.jax import as_optax, TreeOptimizer
rng = np.random.default_rng(0)
params = {"a": jnp.asarray(rng.standard_normal((4, 3))), "b": [jnp.asarray(rng.standard_normal(6))]}
grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape)), params) for _ in range(60)]
def loop(tx):
    p, s = params, tx.init(params)
    for g in grads:
        u, s = tx.update(g, s, p); p = optax.apply_updates(p, u)
    return p
worst = 0.0
for ours, theirs in [(flatopt.Adam(lr=1e-2), optax.adam(1e-2)), (flatopt.AdamW(lr=1e-2, weight_decay=0.1), optax.adamw(1e-2, weight_decay=0.1)),
                     (flatopt.SGD(lr=0.05, momentum=0.9), optax.sgd(0.05, momentum=0.9))]:
    a, b = loop(as_optax(ours)), loop(theirs)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == jnp.float64
        worst = max(worst, float(np.max(np.abs(np.asarray(x) - np.asarray(y)) / np.max(np.abs(np.asarray(y))))))
t = TreeOptimizer(flatopt.Adam(lr=1e-2), params)
for g in grads: out = t.step(g)
ref = loop(optax.adam(1e-2))
for x, y in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
    worst = max(worst, float(np.max(np.abs(np.asarray(x) - np.asarray(y)) / np.max(np.abs(np.asarray(y))))))
print(worst)
"""


def test_float64_with_x64_matches_optax_to_1e12():
    # x64 is process-global in JAX: run it in its own interpreter so no other test sees it.
    out = subprocess.run([sys.executable, "-c", X64], capture_output=True, text=True, check=True).stdout
    assert float(out.strip()) < 1e-12


def test_update_needs_params_and_matching_sizes():
    tx = as_optax(flatopt.Adam())
    params = tree(0)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, state)
    with pytest.raises(ValueError, match="elements"):
        tx.update({"x": jnp.ones(3)}, state, params)


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
