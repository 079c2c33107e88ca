"""flatopt.torch against torch.optim on random models and random training histories.

Each example draws tensor shapes (zero-size and scalar tensors included) and dtypes (float32 and
float64 in one model: two flat buffers), a split into two param groups with different
hyperparameters, and for every step and tensor what happens to its gradient before the step:
none (``None``), a fresh tensor assigned, an in-place addition to the one it has, or the
gradient left from the step before; ``zero_grad`` comes with either ``set_to_none``. Between
steps the history may also edit what torch lets a user edit: save a checkpoint and load it into
a new optimizer, drop a tensor's state (``del opt.state[p]``) or all of it
(``opt.state.clear()``), assign one of its state entries a new tensor (a buffer halved, or
``step`` set back to 1), change a group's ``lr``, give a tensor new memory (``p.data =
p.data.clone()``), or add the model's last tensor, held back until then, in a group of its own
(``add_param_group``). The same history drives flatopt.torch and torch's reference on twin
models. What the bookkeeping decides must agree exactly: which tensors moved, the state entries
each tensor has and its step count. The values agree bitwise for SGD (torch's ``foreach=False``)
and to a few ulps for the others (their references round some elements in another order: torch's
fused scalar tail, its sqrt), far below the size of any bookkeeping error (a skipped or doubled
update, a tensor given another's state).
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import sweep

torch = pytest.importorskip("torch")
import flatopt.torch as ft  # noqa: E402
from seed_lookahead import SeedLookahead  # noqa: E402 - the seed's reference wrapper, needs torch

OPTIMIZERS = {
    # name: (flatopt.torch class, torch reference kwargs, group 1's overrides, bitwise?)
    "SGD": (ft.SGD, dict(foreach=False), dict(lr=0.05, momentum=0.9, weight_decay=0.01), dict(lr=0.02, momentum=0.5),
            True),
    "SGD nesterov": (ft.SGD, dict(foreach=False), dict(lr=0.05, momentum=0.9, nesterov=True),
                     dict(weight_decay=0.1), True),
    "Adam": (ft.Adam, dict(fused=True), dict(lr=0.01, weight_decay=0.01), dict(lr=0.003, amsgrad=True), False),
    "AdamW": (ft.AdamW, dict(fused=True), dict(lr=0.01), dict(weight_decay=0.0, betas=(0.8, 0.99)), False),
    "RMSprop": (ft.RMSprop, dict(foreach=False), dict(lr=0.01, momentum=0.5), dict(centered=True, momentum=0.0),
                False),
    # Lookahead (k drawn from 1 to 3) around SGD, against the seed's reference wrapper; no checkpoints
    "Lookahead(SGD)": (ft.SGD, dict(foreach=False), dict(lr=0.05, momentum=0.9), dict(lr=0.02, weight_decay=0.01),
                       True),
}
GRAD_EVENTS = ["none", "assign", "add", "keep"]
EDITS = ["nothing", "nothing", "checkpoint", "drop state", "clear state", "assign state", "lr", "new memory",
         "new group"]
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}

dims = st.sampled_from([0, 1, 2, 3, 5])  # zero-size tensors often: between others they once broke the step counts
shapes = st.lists(st.lists(dims, min_size=0, max_size=3).map(tuple), min_size=1, max_size=6)


@sweep(60)
@given(name=st.sampled_from(sorted(OPTIMIZERS)), shapes=shapes, data=st.data())
def test_random_model_and_history_match_torch(name, shapes, data):
    cls, ref_kw, kw, group1, bitwise = OPTIMIZERS[name]
    groups = data.draw(st.lists(st.integers(0, 1), min_size=len(shapes), max_size=len(shapes)), label="groups")
    held = len(shapes) > 1 and data.draw(st.booleans(), label="last tensor held back")
    steps = data.draw(st.integers(1, 5), label="steps")
    history = [(data.draw(st.sampled_from(EDITS), label="edit"),
                data.draw(st.integers(0, len(shapes) - 1), label="edited tensor"),
                data.draw(st.booleans(), label="set_to_none"),
                data.draw(st.lists(st.sampled_from(GRAD_EVENTS), min_size=len(shapes), max_size=len(shapes)),
                          label="grad events"))
               for _ in range(steps)]
    dtypes = data.draw(st.lists(st.sampled_from([torch.float32, torch.float64]), min_size=len(shapes),
                                max_size=len(shapes)), label="dtypes")  # two dtypes: two flat buffers
    # After zero_grad() a large bucket reads the new gradients where they lie: here at any size.
    in_place = data.draw(st.booleans(), label="new gradients read in place")
    # Tensors (and their gradients) laid out column-major keep that layout in the flat buffers.
    column_major = data.draw(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)),
                             label="column-major")
    rng = np.random.default_rng(len(shapes) * 7 + steps)
    init = [_laid_out(torch.from_numpy(rng.standard_normal(s)).to(dt), c)
            for s, dt, c in zip(shapes, dtypes, column_major)]
    grads = [[_laid_out(torch.from_numpy(rng.standard_normal(s)).to(dt), c)
              for s, dt, c in zip(shapes, dtypes, column_major)] for _ in range(steps)]

    def optimizer(params, make):
        listed = params[:-1] if held else params
        param_groups = [{"params": [p for p, g in zip(listed, groups) if g == gi], **(group1 if gi else {})}
                        for gi in (0, 1) if gi in groups[:len(listed)]]
        return make(param_groups + ([{"params": [params[-1]], "lr": 0.02}] if added else []))

    makers = (lambda pg: _reading_in_place(cls(pg, **kw), in_place),
              lambda pg: getattr(torch.optim, cls.__name__)(pg, **kw, **ref_kw))
    if name.startswith("Lookahead"):
        k, alpha = data.draw(st.integers(1, 3), label="k"), 0.5
        inner = makers
        makers = (lambda pg: ft.Lookahead(inner[0](pg), k, alpha), lambda pg: _SeedReference(inner[1](pg), k, alpha))
    ours, theirs = ([torch.nn.Parameter(x.clone()) for x in init] for _ in range(2))
    added = False
    opt, ref = optimizer(ours, makers[0]), optimizer(theirs, makers[1])
    for t, (edit, k, set_to_none, events) in enumerate(history):
        if edit == "new group" and held and not added:
            added = True
            for params, o in ((ours, opt), (theirs, ref)):
                o.add_param_group({"params": [params[-1]], "lr": 0.02})
        elif edit == "checkpoint" and not name.startswith("Lookahead"):
            opt, ref = [_reloaded(o, optimizer(ps, make)) for o, ps, make in ((opt, ours, makers[0]),
                                                                               (ref, theirs, makers[1]))]
        for params, o in ((ours, opt), (theirs, ref)):
            if edit == "drop state" and params[k] in o.state:
                del o.state[params[k]]
            elif edit == "clear state":
                o.state.clear()
            elif edit == "assign state" and params[k] in o.state:
                entries = o.state[params[k]]
                for key in sorted(entries):
                    entries[key] = torch.tensor(1.0) if key == "step" else entries[key] / 2
            elif edit == "lr":
                o.param_groups[-1]["lr"] = 0.5 ** (t + 3)
            elif edit == "new memory":
                params[k].data = params[k].data.clone()
            o.zero_grad(set_to_none=set_to_none)
            with torch.no_grad():
                for p, event, g in zip(params, events, grads[t]):
                    if event == "none":
                        p.grad = None
                    elif event == "assign" or (event == "add" and p.grad is None):
                        p.grad = g.clone()
                    elif event == "add":
                        p.grad.add_(g)
            o.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            what = f"step {t + 1}, tensor {i} {tuple(a.shape)}"
            assert a.stride() == b.stride(), what
            if bitwise:
                assert torch.equal(a, b), what
            else:
                torch.testing.assert_close(a, b, rtol=RTOL[a.dtype], atol=RTOL[a.dtype], msg=what)
            assert (a in opt.state) == (b in ref.state), what
            if b in ref.state:
                assert sorted(opt.state[a]) == sorted(ref.state[b]), what
                if "step" in ref.state[b]:
                    assert float(opt.state[a]["step"]) == float(ref.state[b]["step"]), what


def _laid_out(x, column_major):
    """``x``, its dimensions laid out in reverse order in memory if ``column_major``."""
    if not column_major:
        return x
    reverse = tuple(reversed(range(x.dim())))
    return x.permute(reverse).contiguous().permute(reverse)


def _reading_in_place(opt, in_place):
    if in_place:
        opt._gather_min = 0
    return opt


def _reloaded(old, new):
    """``new`` after loading ``old``'s checkpoint, taken through torch.save as a user would."""
    import io
    buf = io.BytesIO()
    torch.save(old.state_dict(), buf)
    buf.seek(0)
    new.load_state_dict(torch.load(buf, weights_only=True))
    return new


class _SeedReference(SeedLookahead):
    """The seed's reference wrapper with what the sweep touches: ``state`` and ``param_groups``
    (the inner optimizer's), and ``add_param_group``, whose new slow weights start from the
    parameters' values then, as flatopt.torch.Lookahead's do."""
    state = property(lambda self: self.optimizer.state)
    param_groups = property(lambda self: self.optimizer.param_groups)

    def add_param_group(self, group):
        self.optimizer.add_param_group(group)
        self.slow_weights.append([p.detach().clone() for p in self.optimizer.param_groups[-1]["params"]])
