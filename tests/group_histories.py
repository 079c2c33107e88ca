"""Random param-group layouts and training histories for the core sweeps (CPU against torch,
CUDA against CPU).  Import after hypothesis; used with ``st.data()``."""
import numpy as np
from hypothesis import strategies as st


def draw_history(data, n, dtype, edits, max_steps=5):
    """A buffer of ``n`` elements cut into segments, each a group of kind 0 or 1 (the caller's
    hyperparameter overrides) or a gap no group covers, at least one group among them; and per
    step an edit (one of ``edits``) and which groups are frozen.  Returns ``(segments, history,
    p0, grads)``: ``[(start, stop, kind)]``, ``[(edit, frozen flags)]``, the starting parameters
    and one gradient per step."""
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=6), label="cuts"))) if n > 1 else []
    bounds = [0, *cuts, n]
    kinds = data.draw(st.lists(st.sampled_from(["gap", 0, 1]), min_size=len(bounds) - 1, max_size=len(bounds) - 1)
                      .filter(lambda k: k != ["gap"] * len(k)), label="segments")
    segments = [(a, b, kind) for a, b, kind in zip(bounds, bounds[1:], kinds) if kind != "gap"]
    steps = data.draw(st.integers(1, max_steps), label="steps")
    history = [(data.draw(st.sampled_from(edits), label="edit"),
                data.draw(st.lists(st.booleans(), min_size=len(segments), max_size=len(segments)), label="frozen"))
               for _ in range(steps)]
    rng = np.random.default_rng(n + steps)
    return (segments, history, rng.standard_normal(n).astype(dtype),
            [rng.standard_normal(n).astype(dtype) for _ in range(steps)])
