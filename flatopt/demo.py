"""``flatopt demo``: a two-layer NumPy MLP on scikit-learn's bundled digits, trained once per
optimizer.  The model is written against :class:`flatopt.FlatParams`: named arrays for the
maths, one flat buffer for the optimizer."""
import time

import numpy as np

import flatopt

# Learning rates chosen for this model and data; everything else is the optimizer's default.
OPTIMIZERS = {
    "SGD": lambda: flatopt.SGD(lr=0.05),
    "SGD+momentum": lambda: flatopt.SGD(lr=0.05, momentum=0.9),
    # an average of the gradients, where SGD's buffer is their sum: lr 0.05 / (1 - 0.9) takes SGD+momentum's steps
    "Momentum": lambda: flatopt.Momentum(lr=0.5, beta=0.9),
    "RMSprop": lambda: flatopt.RMSprop(lr=1e-3),
    "Adam": lambda: flatopt.Adam(lr=3e-3),
    "AdamW": lambda: flatopt.AdamW(lr=3e-3, weight_decay=1e-2),
    "ADOPT": lambda: flatopt.ADOPT(lr=3e-3),
    "Lookahead(Adam)": lambda: flatopt.Lookahead(flatopt.Adam(lr=3e-3), k=5, alpha=0.5),
}


def load_digits(seed):
    """Standardised 8x8 digits, split 80/20 with a seeded shuffle."""
    from sklearn.datasets import load_digits as sklearn_digits
    x, y = sklearn_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order]
    cut = int(0.8 * len(x))
    mean, std = x[:cut].mean(0), x[:cut].std(0) + 1e-3
    x = (x - mean) / std
    return x[:cut], y[:cut], x[cut:], y[cut:]


class MLP:
    """64 -> hidden (tanh) -> 10, softmax cross-entropy; parameters live in one FlatParams."""

    def __init__(self, n_in, n_hidden, n_out, seed):
        rng = np.random.default_rng(seed)
        self.flat = flatopt.FlatParams({
            "W1": rng.standard_normal((n_in, n_hidden)) / np.sqrt(n_in),
            "b1": np.zeros(n_hidden),
            "W2": rng.standard_normal((n_hidden, n_out)) / np.sqrt(n_hidden),
            "b2": np.zeros(n_out),
        }, dtype=np.float32)

    def logits(self, x):
        f = self.flat
        return np.tanh(x @ f["W1"] + f["b1"]) @ f["W2"] + f["b2"]

    def loss_and_grads(self, x, y):
        """Mean cross-entropy; gradients written into the flat gradient buffer."""
        f = self.flat
        h = np.tanh(x @ f["W1"] + f["b1"])
        z = h @ f["W2"] + f["b2"]
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        loss = -np.mean(np.log(p[np.arange(len(y)), y] + 1e-12))
        dz = p
        dz[np.arange(len(y)), y] -= 1
        dz /= len(y)
        np.matmul(h.T, dz, out=f.grad("W2"))
        f.grad("b2")[:] = dz.sum(0)
        dh = (dz @ f["W2"].T) * (1 - h * h)
        np.matmul(x.T, dh, out=f.grad("W1"))
        f.grad("b1")[:] = dh.sum(0)
        return float(loss)

    def accuracy(self, x, y):
        return float(np.mean(self.logits(x).argmax(1) == y))


WARM_UP_STEPS = 10  # past Lookahead's k = 5: its sync kernel too


def warm_up(name, flat):
    """Compiles (or loads from the cache) every kernel a run of ``name`` calls, so that the timed
    steps are the steady state: a throwaway optimizer steps scratch copies of the buffers."""
    opt, params, grads = OPTIMIZERS[name](), flat.params.copy(), flat.grads.copy()
    for _ in range(WARM_UP_STEPS):
        opt.step(params, grads)


def train(name, data, epochs=30, batch_size=64, hidden=64, seed=0, progress=None):
    """Train one optimizer; returns per-epoch train losses, test accuracy, µs per opt.step."""
    x_train, y_train, x_test, y_test = data
    model, opt = MLP(x_train.shape[1], hidden, 10, seed), OPTIMIZERS[name]()
    warm_up(name, model.flat)
    rng = np.random.default_rng(seed + 1)
    losses, step_seconds, steps = [], 0.0, 0
    for _ in range(epochs):
        order, epoch_loss = rng.permutation(len(x_train)), 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            epoch_loss += model.loss_and_grads(x_train[batch], y_train[batch]) * len(batch)
            t0 = time.perf_counter()
            opt.step(model.flat.params, model.flat.grads)
            step_seconds += time.perf_counter() - t0
            steps += 1
        losses.append(epoch_loss / len(order))
        if progress is not None:
            progress.update(1)
    return dict(losses=losses, accuracy=model.accuracy(x_test, y_test), step_us=1e6 * step_seconds / max(steps, 1))


def run(epochs=30, seed=0, names=None, plot=None, out=print):
    names = list(names or OPTIMIZERS)
    data = load_digits(seed)
    try:
        from tqdm import tqdm
        progress = tqdm(total=epochs * len(names), desc="training", unit="epoch", leave=False)
    except ImportError:
        progress = None
    results = {}
    for name in names:
        if progress is not None:
            progress.set_postfix_str(name)
        results[name] = train(name, data, epochs=epochs, seed=seed, progress=progress)
    if progress is not None:
        progress.close()
    out(f"digits: {len(data[0])} train / {len(data[2])} test images, MLP 64-64-10, {epochs} epochs, seed {seed}")
    out(f"{'optimizer':<17} {'final train loss':>16} {'test accuracy':>14} {'µs per step':>12}")
    for name, r in results.items():
        out(f"{name:<17} {r['losses'][-1]:>16.5f} {r['accuracy']:>14.2%} {r['step_us']:>12.1f}")
    if plot:
        save_plot(results, plot)
        out(f"loss curves saved to {plot}")
    return results


def save_plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{name} ({r['accuracy']:.1%})")
    ax.set(xlabel="epoch", ylabel="train loss", yscale="log", title="flatopt demo: MLP on digits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
