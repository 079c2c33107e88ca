"""A small JAX model trained in a jitted optax loop, with flatopt's AdamW as the transformation;
then on, from the same state, with update_and_apply (update and apply_updates in one pass).

    pip install -e ".[jax]" && python examples/jax_optax.py
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flatopt
from flatopt.jax import as_optax, update_and_apply

rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((256, 8)), jnp.float32)
y = jnp.sin(x @ jnp.arange(1.0, 9.0) / 8)[:, None]
params = {"hidden": {"w": jnp.asarray(rng.standard_normal((8, 32)) / 3, jnp.float32), "b": jnp.zeros(32)},
          "out": {"w": jnp.asarray(rng.standard_normal((32, 1)) / 6, jnp.float32), "b": jnp.zeros(1)}}


def loss_fn(p):
    h = jnp.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"])
    return jnp.mean((h @ p["out"]["w"] + p["out"]["b"] - y) ** 2)


tx = as_optax(flatopt.AdamW(lr=1e-2, weight_decay=1e-4))   # the whole pytree: one flat buffer, one kernel call
state = tx.init(params)                                      # a pytree of arrays, as optax's own states


@jax.jit                                                     # on the CPU XLA runs flatopt's kernel itself
def train_step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss


@functools.partial(jax.jit, donate_argnums=(0, 1))          # params and state donated: stepped in place
def fused_step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    params, state = update_and_apply(tx, grads, state, params)  # the new params exactly as opt.step makes them
    return params, state, loss


for step in range(300):
    params, state, loss = (train_step if step < 150 else fused_step)(params, state)  # one state format for both
    if step % 50 == 0:
        print(f"step {step:3d}  loss {float(loss):.5f}")
print(f"final loss {float(loss_fn(params)):.5f}")
