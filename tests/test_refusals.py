"""Refusals that no other suite reached (a branch-coverage run of the whole suite listed them):
each names the problem, and leaves everything as it was, so that the next step goes on as if
the refused call had not been made."""
import copy
import operator

import numpy as np
import pytest

import flatopt
from test_core_behaviour import assert_same, snapshot


TWO_GROUPS = [{"start": 0, "stop": 6}, {"start": 6, "stop": 10, "lr": 0.05}]


@pytest.mark.parametrize("groups", [None, TWO_GROUPS], ids=["one group", "two groups"])
@pytest.mark.parametrize("make, key, words", [
    (lambda groups: flatopt.SGD(lr=0.1, momentum=0.9, param_groups=groups), "momentum_started",
     "need 'momentum_started'"),
    (lambda groups: flatopt.Adam(lr=0.1, param_groups=groups), "step", "need an int step >= 0"),
], ids=["SGD momentum flag", "Adam step"])
def test_a_count_removed_from_group_state_is_named_and_put_back_the_steps_go_on(make, key, words, groups):
    """After a step the next takes the prepared path (one group: the step's own fast path), which
    reads only what depends on the count: an entry removed from ``group_state`` must still be
    named there, before the kernel, and the steps go on once it is back."""
    rng = np.random.default_rng(0)
    params = rng.standard_normal(10).astype(np.float32)
    twin_params = params.copy()
    opt, twin = make(groups), make(groups)
    for _ in range(2):
        grads = rng.standard_normal(10).astype(np.float32)
        opt.step(params, grads)
        twin.step(twin_params, grads)
    held = opt.group_state[-1].pop(key)
    before, params_before = snapshot(opt), params.copy()
    with pytest.raises(ValueError, match=words):
        opt.step(params, rng.standard_normal(10).astype(np.float32))
    assert_same(snapshot(opt), before)
    np.testing.assert_array_equal(params, params_before)
    opt.group_state[-1][key] = held
    grads = rng.standard_normal(10).astype(np.float32)
    opt.step(params, grads)
    twin.step(twin_params, grads)
    np.testing.assert_array_equal(params, twin_params)


def _lookahead_checkpoint():
    params, grads = np.linspace(-1, 1, 10, dtype=np.float32), np.full(10, 0.5, np.float32)
    opt = flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2)
    for _ in range(3):
        opt.step(params, grads)
    return opt.state_dict()


@pytest.mark.parametrize("edit, error, words", [
    (lambda sd: dict(sd, extra=1), ValueError, r"state_dict keys \[.*'extra'.*\] do not match"),
    (lambda sd: dict(sd, optimizer="Adam"), ValueError, "state_dict is for Adam, not Lookahead"),
    (lambda sd: dict(sd, slow=np.ones((2, 5), np.float32)), ValueError,
     r"slow weights must be 1-D, got shape \(2, 5\)"),
    (lambda sd: dict(sd, slow=np.ones(10, np.float16)), TypeError,
     "slow weights must be float32 or float64, got float16"),
    (lambda sd: dict(sd, synced=object()), ValueError, "synced ranges must be .start, stop. pairs of integers"),
    (lambda sd: dict(sd, synced=[[0, 4], [6]]), ValueError, "synced ranges must be .start, stop. pairs of integers"),
    (lambda sd: dict(sd, slow=np.zeros(6, np.float32), synced=[[0, 6]]), ValueError,
     "slow weights have 6 elements but the inner state has 10"),
    (lambda sd: dict(sd, k=3, alpha=0.8, inner=dict(sd["inner"], group_state=[{"step": -1}])), ValueError,
     "group_state entries need an int step >= 0"),
], ids=["extra key", "another optimizer", "2-D slow weights", "float16 slow weights", "synced not ranges",
        "synced ragged", "slow weights of another length", "its own fields fine, the inner state's refused"])
def test_a_malformed_lookahead_checkpoint_is_refused_before_anything_changes(edit, error, words):
    rng = np.random.default_rng(1)
    params = rng.standard_normal(10).astype(np.float32)
    opt, twin = (flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2) for _ in range(2))
    twin_params = params.copy()
    grads = rng.standard_normal(10).astype(np.float32)
    opt.step(params, grads)
    twin.step(twin_params, grads)
    before = snapshot(opt)
    with pytest.raises(error, match=words):
        opt.load_state_dict(edit(_lookahead_checkpoint()))
    assert_same(snapshot(opt), before)
    for _ in range(3):  # through a sync: k, alpha, the count and the slow weights are as they were
        grads = rng.standard_normal(10).astype(np.float32)
        opt.step(params, grads)
        twin.step(twin_params, grads)
    np.testing.assert_array_equal(params, twin_params)


@pytest.mark.parametrize("where", ["constructor", "assignment", "load_state_dict"])
def test_a_groups_invalid_hyperparameter_is_refused_where_the_groups_are_given(where):
    """With torch's message, where torch's constructor (or add_param_group) refuses it: not at the
    first step.  The optimizer's groups stay as they were."""
    bad = [{"start": 0, "stop": 4, "alpha": -0.1}]
    opt = flatopt.RMSprop(param_groups=[{"start": 0, "stop": 4}])
    before = copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match="Invalid alpha value: -0.1"):
        if where == "constructor":
            flatopt.RMSprop(param_groups=bad)
        elif where == "assignment":
            opt.param_groups = bad
        else:
            opt.load_state_dict(dict(opt.state_dict(), param_groups=[dict(bad[0], frozen=False)]))
    assert opt.param_groups == before


def test_a_checkpoint_with_another_number_of_groups_loads_them_as_saved():
    """The loader keeps its own callable group lrs only where the groups pair up one to one; a
    checkpoint of three groups loaded into two (or two into three) takes its groups as saved."""
    for saved, mine in [([(0, 4), (4, 6), (6, 8)], [(0, 4), (4, 8)]), ([(0, 4), (4, 8)], [(0, 2), (2, 6), (6, 8)])]:
        saver = flatopt.SGD(lr=0.1, param_groups=[{"start": a, "stop": b} for a, b in saved])
        groups = [{"start": a, "stop": b} for a, b in mine]
        groups[0]["lr"] = lambda t: 5.0  # (a schedule of the loader's own, not saved)
        loader = flatopt.SGD(lr=0.1, param_groups=groups)
        loader.load_state_dict(saver.state_dict())
        params = np.zeros(8)
        loader.step(params, np.ones(8))
        np.testing.assert_array_equal(params, np.full(8, -0.1))


def test_slow_weights_assigned_between_steps_are_taken_over_a_range_that_joins_at_the_next_step():
    inner = flatopt.SGD(lr=0.1, param_groups=[{"start": 0, "stop": 4}, {"start": 4, "stop": 8, "frozen": True}])
    opt = flatopt.Lookahead(inner, k=1, alpha=0.5)
    params, grads = np.arange(8.0), np.ones(8)
    opt.step(params, grads)  # syncs [0, 4) only
    opt.slow = np.full(8, 100.0)
    inner.param_groups[1]["frozen"] = False
    fast = params - 0.1 * grads
    opt.step(params, grads)
    np.testing.assert_array_equal(params, 0.5 * fast + 0.5 * 100.0)


@pytest.mark.parametrize("make, edit", [
    (lambda: flatopt.SGD(lr=0.1, momentum=0.9, param_groups=TWO_GROUPS), lambda gs: gs[1].update(step=-1)),
    (lambda: flatopt.RMSprop(lr=0.01, param_groups=TWO_GROUPS), lambda gs: gs[0].update(step="3")),
    (lambda: flatopt.Adam(lr=0.01, param_groups=TWO_GROUPS), lambda gs: gs[1].update(step=2.0)),
    (lambda: flatopt.SGD(lr=lambda t: 0.1, momentum=0.9), lambda gs: gs[0].update(step=2.0)),
], ids=["SGD groups, -1", "RMSprop groups, '3'", "Adam groups, 2.0", "SGD lr schedule, 2.0"])
def test_a_count_edited_in_place_is_refused_by_the_prepared_step(make, edit):
    """With groups or an lr schedule the step after the first takes the prepared path: a count
    edited to what the full step refuses is refused there too, before anything changes."""
    opt = make()
    params, grads = np.linspace(-1, 1, 10), np.cos(np.arange(10.0))
    for _ in range(2):
        opt.step(params, grads)
    edit(opt.group_state)
    before, params_before = snapshot(opt), params.copy()
    with pytest.raises(ValueError, match="group_state entries need an int step >= 0"):
        opt.step(params, grads)
    assert_same(snapshot(opt), before)
    np.testing.assert_array_equal(params, params_before)


class TestTorch:
    """flatopt.torch's refusals: torch's exception types, and its messages where torch refuses too."""

    torch = None

    @pytest.fixture(autouse=True)
    def _torch(self):
        type(self).torch = pytest.importorskip("torch")

    def _refused_alike(self, make, error, words):
        """flatopt.torch's Adam refuses ``make()``'s parameters; torch's does too, with the same
        message (``words``: None where torch takes them)."""
        import flatopt.torch as ft
        with pytest.raises(error) as ours:
            ft.Adam(make())
        if words is None:
            return ours
        with pytest.raises(error) as theirs:
            self.torch.optim.Adam(make())
        assert str(ours.value) == str(theirs.value)
        assert words in str(ours.value)
        return ours

    def test_parameters_torch_refuses_are_refused_with_its_messages(self):
        torch = self.torch
        self._refused_alike(lambda: [1.0], TypeError, "optimizer can only optimize Tensors")
        leaf = torch.ones(3, requires_grad=True)
        self._refused_alike(lambda: [leaf * 2], ValueError, "can't optimize a non-leaf Tensor")

    @pytest.mark.parametrize("make, error, words", [
        (lambda torch: torch.ones(3, dtype=torch.float16, requires_grad=True), TypeError,
         "supports float32 and float64 parameters, got torch.float16"),
        (lambda torch: torch.ones(3).to_sparse().requires_grad_(), TypeError, "does not support sparse parameters"),
    ], ids=["float16", "sparse"])
    def test_parameters_flat_buffers_cannot_hold_are_refused(self, make, error, words):
        ours = self._refused_alike(lambda: [make(self.torch)], error, None)
        assert words in str(ours.value)

    def test_a_callable_lr_is_refused_pointing_at_torchs_schedulers(self):
        import flatopt.torch as ft
        with pytest.raises(TypeError, match="take a number as lr; use a torch lr_scheduler"):
            ft.Adam([self.torch.nn.Parameter(self.torch.ones(3))], lr=lambda t: 0.1)

    def _stepped(self, shapes=((2, 3),)):
        import flatopt.torch as ft
        torch = self.torch
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
        opt = ft.Adam(ps, lr=0.1)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        return ps, opt

    def _state(self, opt, ps):
        """The parameters' values, their ``.grad`` objects and the optimizer's checkpoint."""
        return [p.detach().clone() for p in ps], [p.grad for p in ps], copy.deepcopy(opt.state_dict())

    def _assert_same_state(self, a, b):
        torch = self.torch
        (pa, ga, sa), (pb, gb, sb) = a, b
        assert all(map(torch.equal, pa, pb))
        assert all(map(operator.is_, ga, gb))
        assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
        for i, entries in sa["state"].items():
            assert all(torch.equal(v, sb["state"][i][k]) for k, v in entries.items())

    @pytest.mark.parametrize("replace, words", [
        (lambda p, torch: setattr(p, "grad", torch.randn(2, 3).to_sparse()), "does not support sparse gradients"),
        (lambda p, torch: setattr(p.grad, "data", torch.randn(6)),
         r"a gradient changed shape to \(6,\) \(p.grad.data = ...\); its parameter has shape \(2, 3\)"),
    ], ids=["sparse gradient", "gradient reshaped through .data"])
    def test_a_gradient_the_step_cannot_read_is_refused_before_anything_changes(self, replace, words):
        ps, opt = self._stepped()
        replace(ps[0], self.torch)
        before = self._state(opt, ps)
        with pytest.raises(RuntimeError, match=words):
            opt.step()
        self._assert_same_state(self._state(opt, ps), before)

    def test_a_parameter_moved_to_another_dtype_is_refused_by_add_param_group_and_step(self):
        torch = self.torch
        ps, opt = self._stepped()
        ps[0].data = ps[0].data.double()
        new = torch.nn.Parameter(torch.randn(4))
        new.grad = torch.randn(4)
        words = "a parameter changed from torch.float32 on cpu to torch.float64 on cpu"
        with pytest.raises(RuntimeError, match=words):
            opt.add_param_group({"params": [new]})
        assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [ps[0]]
        with pytest.raises(RuntimeError, match=words):
            opt.step()

    def test_a_non_tensor_appended_to_a_groups_params_is_refused_by_the_step(self):
        """Where torch's step fails on the float's missing ``.grad``, flatopt's names it as torch's
        constructor names it; the parameters already there are left as they were."""
        ps, opt = self._stepped()
        before = self._state(opt, ps)
        opt.param_groups[0]["params"].append(1.0)
        with pytest.raises(TypeError, match="optimizer can only optimize Tensors, but one of the params is float"):
            opt.step()
        opt.param_groups[0]["params"].pop()
        self._assert_same_state(self._state(opt, ps), before)

    def test_lookahead_refuses_what_is_not_an_optimizer_and_a_malformed_checkpoint(self):
        import flatopt.torch as ft
        torch = self.torch
        with pytest.raises(TypeError, match="Lookahead wraps a torch.optim.Optimizer, got object"):
            ft.Lookahead(object())
        ps, inner = self._stepped(((2, 3), (4,)))
        opt = ft.Lookahead(inner, k=2)
        assert opt.defaults is inner.defaults
        assert repr(opt) == f"Lookahead({inner!r}, k=2, alpha=0.5)"
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        good = opt.state_dict()

        def held():
            wrapper = opt.state_dict()
            return self._state(inner, ps), {k: wrapper[k] for k in ("k", "alpha", "step_count")}, wrapper["slow"]

        before = held()
        for bad, error, words in [
            ({"inner": good["inner"], "k": 2}, ValueError, r"state_dict keys \['inner', 'k'\] do not match"),
            (dict(good, slow={0: good["slow"][0], 1: [0.0] * 4}), TypeError,
             "slow weight 1 must be a tensor, got list"),
            (dict(good, slow={0: good["slow"][0].t(), 1: good["slow"][1]}), ValueError,
             r"slow weight 0 has shape \(3, 2\), its parameter \(2, 3\)"),
        ]:
            with pytest.raises(error, match=words):
                opt.load_state_dict(bad)
            (state, scalars, slow), (state_before, scalars_before, slow_before) = held(), before
            self._assert_same_state(state, state_before)
            assert scalars == scalars_before and slow.keys() == slow_before.keys()
            assert all(torch.equal(slow[i], slow_before[i]) for i in slow)

    def test_lookaheads_slow_weights_before_its_first_step_are_the_parameters(self):
        import flatopt.torch as ft
        torch = self.torch
        p = torch.nn.Parameter(torch.randn(5))
        opt = ft.Lookahead(ft.Adam([p], lr=0.1))
        before = p.detach().clone()
        with opt.slow_weights():
            assert torch.equal(p, before)
        assert torch.equal(p, before)
