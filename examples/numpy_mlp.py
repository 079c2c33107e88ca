"""A NumPy MLP on scikit-learn's digits, trained with flatopt.AdamW through FlatParams.

    pip install -e ".[demo]" && python examples/numpy_mlp.py
"""
import numpy as np
from sklearn.datasets import load_digits

import flatopt

x, y = load_digits(return_X_y=True)
x = (x - x.mean(0)) / (x.std(0) + 1e-3)
rng = np.random.default_rng(0)
flat = flatopt.FlatParams({
    "W1": rng.standard_normal((64, 64)) / 8, "b1": np.zeros(64),
    "W2": rng.standard_normal((64, 10)) / 8, "b2": np.zeros(10),
}, dtype=np.float32)
# No weight decay on the biases: per-array groups become segments of the one flat buffer.
opt = flatopt.AdamW(lr=3e-3, param_groups=flat.param_groups({"b1": {"weight_decay": 0.0}, "b2": {"weight_decay": 0.0}}))

for epoch in range(20):
    for batch in np.array_split(rng.permutation(len(x)), len(x) // 64):
        xb, yb = x[batch].astype(np.float32), y[batch]
        h = np.tanh(xb @ flat["W1"] + flat["b1"])
        z = h @ flat["W2"] + flat["b2"]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dz = p
        dz[np.arange(len(yb)), yb] -= 1
        dz /= len(yb)
        flat.grad("W2")[:] = h.T @ dz                 # gradients go straight into the flat buffer
        flat.grad("b2")[:] = dz.sum(0)
        dh = (dz @ flat["W2"].T) * (1 - h * h)
        flat.grad("W1")[:] = xb.T @ dh
        flat.grad("b1")[:] = dh.sum(0)
        opt.step(flat.params, flat.grads)              # every array updated in one kernel call
    accuracy = np.mean((np.tanh(x @ flat["W1"] + flat["b1"]) @ flat["W2"] + flat["b2"]).argmax(1) == y)
    print(f"epoch {epoch + 1:2d}  train accuracy {accuracy:.3f}")
