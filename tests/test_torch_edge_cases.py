"""flatopt.torch's step checks, zero_grad, state and checkpoints in cases a mutation audit of
flatopt/torch/ found untested (2026-11-27): each test fails on a change of the adapter that the
rest of the suite let pass.  Each compares with torch.optim, except where its docstring says
what it checks instead."""
import copy

import pytest

torch = pytest.importorskip("torch")
import flatopt.torch as ft  # noqa: E402


def _params(shapes, seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s)) for s in shapes]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x - y).abs().max().item()


def test_replaced_data_is_followed_when_every_gradient_is_a_view():
    """zero_grad(set_to_none=False) keeps every .grad a view of the flat buffer: the step's
    fast path must still notice ``p.data = t`` (the suite's test has a param without a grad,
    so it never took the fast path).  Guards against the fast path without the .data check."""
    runs = []
    for make in (lambda ps: ft.SGD(ps, lr=0.1, momentum=0.9),
                 lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False)):
        ps = _params([(3, 4), (5,)])
        opt = make(ps)
        for t in range(4):
            opt.zero_grad(set_to_none=False)
            for p, g in zip(ps, _grads(ps, t)):
                p.grad.copy_(g) if p.grad is not None else setattr(p, "grad", g)
            if t == 2:
                ps[0].data = ps[0].data * 0.5  # a new storage
            opt.step()
        runs.append(ps)
    _same(*runs)


@pytest.mark.parametrize("move", ["model.share_memory()", "one gradient's share_memory_()"])
def test_flat_buffers_moved_into_shared_memory_when_every_param_has_a_gradient(move):
    """As the suite's test, with every parameter given a gradient, so that the step's fast path
    is the one that must notice the moved buffers.  Guards against the fast path without the
    flat gradient buffer's address check."""
    runs = []
    for make in (lambda ps: ft.Adam(ps, lr=1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True)):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))  # sizes of 16s: torch's fused rounding
        opt = make(m.parameters())
        g = torch.Generator().manual_seed(1)
        for i in range(6):
            x, y = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
            opt.zero_grad(set_to_none=False)
            torch.nn.functional.mse_loss(m(x), y).backward()
            if i == 3:
                if move == "model.share_memory()":
                    m.share_memory()
                else:
                    m[0].weight.grad.share_memory_()
            opt.step()
        runs.append(list(m.parameters()))
    _same(*runs)


def test_new_gradient_in_another_params_state_is_read_as_it_was_at_the_step():
    """Read in place (after zero_grad(), above _gather_min), a gradient that is a view of another
    parameter's momentum buffer would be read after the step wrote that buffer; torch reads a
    gradient's value at the step.  Guards against the in-place check without the state buffers."""
    runs = []
    for ours in (True, False):
        q, p = _params([(64,), (64,)])
        opt = (ft.SGD if ours else torch.optim.SGD)([q, p], lr=0.5, momentum=0.9,
                                                    **({} if ours else dict(foreach=False)))
        if ours:
            opt._gather_min = 0
        for t in range(4):
            opt.zero_grad()
            q.grad = torch.full((64,), 0.25 * (t + 1))
            if t:
                buf = opt.state[q]["momentum_buffer"]
                p.grad = buf if ours else buf.clone()  # torch's: the value at the step
            opt.step()
        runs.append([q.detach().clone(), p.detach().clone()])
    _same(*runs)


def test_zero_grad_zeroes_a_gradient_whose_memory_was_replaced():
    """``p.grad.data = t`` after a step (p.grad the same tensor, its memory outside the flat
    buffer), then zero_grad(set_to_none=False): torch zeroes that gradient and backward
    accumulates from zero.  Guards against zero_grad zeroes only gradients that are other tensors."""
    runs = []
    for make in (lambda ps: ft.SGD(ps, lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=False)):
        ps = _params([(3, 4), (5,)])
        opt = make(ps)
        for t in range(4):
            opt.zero_grad(set_to_none=False)
            sum((p * g).sum() for p, g in zip(ps, _grads(ps, t))).backward()
            opt.step()
            ps[0].grad.data = ps[0].grad.data.clone()  # same .grad tensor, new memory
        runs.append(ps)
    _same(*runs)
    assert torch.equal(runs[0][0].grad, runs[1][0].grad)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_zero_grad_detaches_a_gradient_with_a_graph_as_torch():
    """backward(create_graph=True) leaves gradients with a grad_fn; zero_grad(set_to_none=False)
    detaches them before zeroing, as torch's.  Guards against zeroed without the detach."""
    out = []
    for make in (lambda ps: ft.SGD(ps, lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=False)):
        ps = _params([(3,)])
        opt = make(ps)
        for _ in range(2):
            (ps[0] ** 3).sum().backward(create_graph=True)
            opt.step()
        (ps[0] ** 3).sum().backward(create_graph=True)  # a gradient with a graph, not yet stepped
        opt.zero_grad(set_to_none=False)
        g = ps[0].grad
        out.append((g.grad_fn is None, g.requires_grad, torch.equal(g, torch.zeros(3))))
    assert out[0] == out[1] == (True, False, True)


def test_a_checkpoint_with_a_step_of_two_elements_is_refused_before_anything_changes():
    """Guards against the 'step' size check dropped (torch's load then replaces the groups before
    the step count fails to convert)."""
    ps = _params([(4,)])
    opt = ft.Adam(ps, lr=1e-2)
    ps[0].grad = torch.ones(4)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["step"] = torch.tensor([1.0, 2.0])
    sd["param_groups"][0]["lr"] = 0.5
    groups_before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(sd)
    assert [dict(g) for g in opt.param_groups] == groups_before
    assert float(opt.state[ps[0]]["step"]) == 1.0


def test_loading_a_checkpoint_without_a_params_state_restarts_it_as_torch():
    """A checkpoint in which a parameter has no state (it had no gradient yet) loaded into an
    optimizer that has stepped it: torch's state is the checkpoint's, so that parameter starts
    again at step 0.  Guards against load_state_dict keeps the old step counts."""
    runs = []
    for make in (lambda ps: ft.Adam(ps, lr=1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True)):
        ps = _params([(16,), (16,)])  # multiples of 16: torch's fused rounding
        opt = make(ps)
        ps[0].grad = torch.ones(16)
        opt.step()
        sd = copy.deepcopy(opt.state_dict())  # state for ps[0] only (torch's holds live tensors)
        for t in range(3):
            for p, g in zip(ps, _grads(ps, t)):
                p.grad = g
            opt.step()
        opt.load_state_dict(sd)
        for t in range(3, 5):
            for p, g in zip(ps, _grads(ps, t)):
                p.grad = g
            opt.step()
        runs.append((ps, float(opt.state[ps[1]]["step"])))
    (a, sa), (b, sb) = runs
    assert sa == sb
    _same(a, b)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_after_a_group_list_edit_zeroes_the_new_params_gradient(set_to_none):
    """torch's zero_grad zeroes the gradients of the params the groups list now.  Mutant M36:
    zero_grad without taking in the group edit."""
    out = []
    for make in (lambda ps: ft.SGD(ps, lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=False)):
        p, r = _params([(4,), (3,)])
        opt = make([p])
        p.grad, r.grad = torch.ones(4), torch.ones(3)
        opt.step()
        opt.param_groups[0]["params"].append(r)
        opt.zero_grad(set_to_none=set_to_none)
        out.append(None if r.grad is None else r.grad.clone())
    assert (out[0] is None) == (out[1] is None)
    if out[1] is not None:
        assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("name, on, off", [("Adam", dict(amsgrad=True), dict(amsgrad=False)),
                                           ("SGD", dict(momentum=0.9), dict(momentum=0.0))])
def test_a_buffer_a_group_stops_using_stays_in_the_state_as_torch(name, on, off):
    """torch keeps a state buffer its group no longer uses (amsgrad or momentum turned off):
    opt.state and state_dict() hold it still.  Guards against only the buffers the group uses now."""
    ref_kw = dict(fused=True) if name == "Adam" else dict(foreach=False)
    keys = []
    for make in (lambda ps: getattr(ft, name)(ps, lr=1e-2, **on),
                 lambda ps: getattr(torch.optim, name)(ps, lr=1e-2, **on, **ref_kw)):
        ps = _params([(16,)])
        opt = make(ps)
        for t in range(4):
            if t == 2:
                opt.param_groups[0].update(off)
            ps[0].grad = _grads(ps, t)[0]
            opt.step()
        opt.add_param_group(dict(params=_params([(16,)], seed=1)))  # lays the state out again
        keys.append((sorted(opt.state[ps[0]]), sorted(opt.state_dict()["state"][0])))
    assert keys[0] == keys[1]


def test_a_sparse_gradient_is_refused_with_torchs_reason_before_anything_changes():
    """torch's Adam refuses a sparse gradient ("does not support sparse gradients"); so does
    flatopt.torch, naming it, before any update.  Guards against the sparse check dropped (a
    sparse .grad then fails on its data pointer, with no word of sparsity)."""
    for make in (lambda ps: ft.Adam(ps, lr=1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False)):
        p = torch.nn.Parameter(torch.ones(5, 3))
        opt = make([p])
        p.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 3), (5, 3), check_invariants=True)
        with pytest.raises(RuntimeError, match="sparse gradients"):
            opt.step()
        assert torch.equal(p.detach(), torch.ones(5, 3))
