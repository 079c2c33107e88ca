"""The core optimizers against torch.optim on random histories: param groups on random layouts,
and the whole buffer with hyperparameters assigned as attributes (the second test).

Each example of the first test cuts a flat buffer into segments, each either a param group (with its own
hyperparameters) or a gap no group covers, and draws a history: at every step the groups that
are frozen; between steps an edit of what the core lets a user edit: a group's ``lr`` changed in
place, a checkpoint saved and loaded into a new optimizer, or a state buffer assigned a new
array (halved).  The reference is torch.optim with one parameter per group (a copy of its
segment) in a param group of its own; a frozen group's parameter gets no gradient that step,
which torch skips as the core skips a frozen group.  Gaps never change.  SGD agrees bitwise
with torch's ``foreach=False``; Adam, AdamW and RMSprop to a few ulps (their references round
some elements in another order), far below the size of a bookkeeping error.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flatopt
from conftest import sweep
from group_histories import draw_history

torch = pytest.importorskip("torch")

OPTIMIZERS = {
    # name: (core class, torch reference kwargs, defaults, the two group overrides, bitwise?)
    "SGD": (flatopt.SGD, dict(foreach=False), dict(lr=0.05, momentum=0.9),
            ({}, dict(lr=0.02, weight_decay=0.01, nesterov=True)), True),
    "Adam": (flatopt.Adam, dict(fused=True), dict(lr=0.01), ({}, dict(lr=0.003, amsgrad=True, weight_decay=0.1)),
             False),
    "AdamW": (flatopt.AdamW, dict(fused=True), dict(lr=0.01), ({}, dict(betas=(0.8, 0.99), weight_decay=0.0)), False),
    "RMSprop": (flatopt.RMSprop, dict(foreach=False), dict(lr=0.01), ({}, dict(momentum=0.5, centered=True)), False),
}
EDITS = ["nothing", "nothing", "lr", "checkpoint", "assign state"]
RTOL = {np.float32: 1e-5, np.float64: 1e-12}


@sweep(60)
@given(name=st.sampled_from(sorted(OPTIMIZERS)), n=st.integers(1, 80), dtype=st.sampled_from([np.float32, np.float64]),
       data=st.data())
def test_random_groups_and_history_match_torch(name, n, dtype, data):
    cls, ref_kw, kw, overrides, bitwise = OPTIMIZERS[name]
    segments, history, p0, grads = draw_history(data, n, dtype, EDITS, max_steps=5)

    def core_groups():
        return [{"start": a, "stop": b, **overrides[kind]} for a, b, kind in segments]

    params, opt = p0.copy(), cls(**kw, param_groups=core_groups())
    tensors = [torch.nn.Parameter(torch.from_numpy(p0[a:b].copy())) for a, b, _ in segments]
    make_ref = getattr(torch.optim, cls.__name__)

    def reference():
        return make_ref([{"params": [q], **kw, **overrides[kind]} for q, (_, _, kind) in zip(tensors, segments)],
                        **ref_kw)

    ref = reference()
    for t, (edit, frozen) in enumerate(history):
        if edit == "lr":
            opt.param_groups[-1]["lr"] = ref.param_groups[-1]["lr"] = 0.5 ** (t + 3)
        elif edit == "checkpoint":
            opt, sd = cls(**kw, param_groups=core_groups()), opt.state_dict()
            opt.load_state_dict(sd)
            ref, ref_sd = reference(), ref.state_dict()
            ref.load_state_dict(ref_sd)
        elif edit == "assign state" and opt.state:
            for key in sorted(opt.state):
                opt.state[key] = opt.state[key] / 2
                for q in tensors:
                    if key in ref.state[q]:
                        ref.state[q][key] = ref.state[q][key] / 2
        for group, q, (a, b, _), still in zip(opt.param_groups, tensors, segments, frozen):
            group["frozen"] = still
            q.grad = None if still else torch.from_numpy(grads[t][a:b].copy())
        opt.step(params, grads[t])
        ref.step()
        gaps = np.ones(n, bool)
        for i, (q, (a, b, _)) in enumerate(zip(tensors, segments)):
            gaps[a:b] = False
            what = f"step {t + 1}, group {i} [{a}:{b}]"
            if bitwise:
                np.testing.assert_array_equal(params[a:b], q.detach().numpy(), err_msg=what)
            else:
                np.testing.assert_allclose(params[a:b], q.detach().numpy(), rtol=RTOL[dtype], atol=RTOL[dtype],
                                           err_msg=what)
            if "step" in ref.state[q]:
                assert opt.group_state[i]["step"] == float(ref.state[q]["step"]), what
        np.testing.assert_array_equal(params[gaps], p0[gaps], err_msg="elements outside every group")


# What the whole-buffer test may assign between steps: (attribute, two values).  Not the switches
# that need a state buffer torch would not have yet (amsgrad, RMSprop's momentum and centered:
# torch raises a KeyError at its next step).
ATTRIBUTE_EDITS = {
    "SGD": [("lr", (0.01, 0.1)), ("weight_decay", (0.0, 0.05)), ("momentum", (0.5, 0.95)), ("dampening", (0.0, 0.3))],
    "Adam": [("lr", (0.003, 0.03)), ("weight_decay", (0.0, 0.1)), ("betas", ((0.8, 0.99), (0.95, 0.9999))),
             ("eps", (1e-8, 1e-3))],
    "AdamW": [("lr", (0.003, 0.03)), ("weight_decay", (0.0, 0.1)), ("betas", ((0.8, 0.99), (0.95, 0.9999)))],
    "RMSprop": [("lr", (0.003, 0.03)), ("alpha", (0.9, 0.99)), ("eps", (1e-8, 1e-3)), ("weight_decay", (0.0, 0.05))],
}


@sweep(60)
@given(name=st.sampled_from(sorted(OPTIMIZERS)), n=st.integers(1, 80), dtype=st.sampled_from([np.float32, np.float64]),
       data=st.data())
def test_whole_buffer_with_attributes_assigned_between_steps_matches_torch(name, n, dtype, data):
    """No groups (the step's fast path, which keeps what it prepared until an attribute is
    assigned): hyperparameters assigned as attributes between steps, checkpoints and state
    assignments, against one torch tensor whose group gets the same values."""
    cls, ref_kw, kw, _, bitwise = OPTIMIZERS[name]
    steps = data.draw(st.integers(1, 6), label="steps")
    edits = data.draw(st.lists(st.one_of(st.sampled_from(["nothing", "checkpoint", "assign state"]),
                                         st.tuples(st.sampled_from(ATTRIBUTE_EDITS[name]), st.integers(0, 1))),
                               min_size=steps, max_size=steps), label="edits")
    rng = np.random.default_rng(n + steps)
    p0 = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(steps)]
    params, opt = p0.copy(), cls(**kw)
    q = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    ref = getattr(torch.optim, cls.__name__)([q], **kw, **ref_kw)
    for t, edit in enumerate(edits):
        if edit == "checkpoint":
            sd, opt = opt.state_dict(), cls(**kw)
            opt.load_state_dict(sd)
        elif edit == "assign state":
            for key in sorted(opt.state):
                opt.state[key] = opt.state[key] / 2
                ref.state[q][key] = ref.state[q][key] / 2
        elif edit != "nothing":
            (attribute, values), which = edit
            setattr(opt, attribute, values[which])
            ref.param_groups[0][attribute] = values[which]
        q.grad = torch.from_numpy(grads[t].copy())
        opt.step(params, grads[t])
        ref.step()
        if bitwise:
            np.testing.assert_array_equal(params, q.detach().numpy(), err_msg=f"step {t + 1}")
        else:
            np.testing.assert_allclose(params, q.detach().numpy(), rtol=RTOL[dtype], atol=RTOL[dtype],
                                       err_msg=f"step {t + 1}")
