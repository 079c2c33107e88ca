"""Edits users make between steps, in place or by assignment, and odd hyperparameter types:
each must reach the next step (as in torch.optim, which reads everything every step) or be
refused with a clear error before anything changes."""
import copy
import math
import pickle

import numpy as np
import pytest

import flatopt

from test_core_behaviour import assert_same, rand, snapshot


def steps(opt, p, grads):
    for g in grads:
        opt.step(p, g)
    return p


def grads_for(n, count=4, dtype=np.float64):
    return [rand(n, dtype, seed=10 + i) for i in range(count)]


# --- flag hyperparameters: torch reads them by truth value -----------------------------------
@pytest.mark.parametrize("make, flag", [
    (flatopt.Adam, "amsgrad"), (flatopt.Adam, "maximize"), (flatopt.AdamW, "maximize"),
    (flatopt.RMSprop, "centered"), (flatopt.RMSprop, "maximize"), (flatopt.SGD, "maximize"),
    (flatopt.ADOPT, "decouple"), (flatopt.ADOPT, "maximize"), (flatopt.Momentum, "maximize"),
])
@pytest.mark.parametrize("value, same_as", [(None, False), (0, False), (1, True), ("yes", True)])
def test_flags_act_by_truth_value(make, flag, value, same_as):
    """``amsgrad=None`` once sized no ``max_exp_avg_sq`` yet sent NaN (not 0) as the flag: the
    kernel wrote into an empty buffer.  torch uses ``if amsgrad:``; so do the kernels now."""
    n, g = 70_000, grads_for(70_000, count=3)  # above the parallel threshold too
    kwargs = dict(lr=1e-2, weight_decay=0.1) if flag == "decouple" else dict(lr=1e-2)
    expected = steps(make(**kwargs, **{flag: same_as}), rand(n, np.float64), g)
    actual = steps(make(**kwargs, **{flag: value}), rand(n, np.float64), g)
    np.testing.assert_array_equal(actual, expected)


def test_a_table_value_that_cannot_be_converted_modifies_nothing():
    """torch checks no ``dampening``; a complex one fails only when the scalars are converted,
    which now happens before the first buffers are allocated."""
    opt = flatopt.SGD(lr=0.1, momentum=0.9, dampening=1j)
    p, g = rand(8), rand(8, seed=1)
    with pytest.raises(TypeError):
        opt.step(p, g)
    assert opt.state == {} and opt.group_state == [{"step": 0, "momentum_started": False}]
    np.testing.assert_array_equal(p, rand(8))


# --- hyperparameter values of other array libraries --------------------------------------------
@pytest.mark.parametrize("make", [flatopt.Adam, flatopt.AdamW, flatopt.SGD, flatopt.RMSprop, flatopt.ADOPT])
def test_zero_d_array_lr_acts_as_a_python_float(make):
    g = grads_for(50)
    expected = steps(make(lr=0.01), rand(50, np.float64), g)
    np.testing.assert_array_equal(steps(make(lr=np.array(0.01)), rand(50, np.float64), g), expected)
    np.testing.assert_array_equal(steps(make(lr=lambda t: np.array(0.01)), rand(50, np.float64), g), expected)


def test_numpy_scalars_set_in_a_group_or_loaded_act_as_python_floats():
    g = grads_for(20)
    expected = steps(flatopt.Adam(lr=0.1, param_groups=[dict(start=0, stop=20)]), rand(20, np.float64), g)
    opt = flatopt.Adam(lr=0.1, param_groups=[dict(start=0, stop=20)])
    opt.param_groups[0]["lr"] = np.float64(0.1)  # edited in place: no assignment converts it
    np.testing.assert_array_equal(steps(opt, rand(20, np.float64), g), expected)
    sd = flatopt.Adam(lr=0.1).state_dict()
    sd["hyperparameters"]["lr"] = np.float64(0.1)
    loaded = flatopt.Adam(lr=0.5)
    loaded.load_state_dict(sd)
    assert type(loaded.lr) is float


# --- param groups edited in place ------------------------------------------------------------
@pytest.mark.parametrize("edit, words", [
    (lambda gs: gs[0].update(stop=15), "inside or before group 0"),
    (lambda gs: gs[0].update(start=-5), "need 0 <= start < stop"),
    (lambda gs: gs[1].update(start=18, stop=12), "need 0 <= start < stop"),
    (lambda gs: gs[1].update(stop=2.5), "'stop' must be an int"),
    (lambda gs: gs[1].pop("start"), "needs 'start'"),
    (lambda gs: gs.append(dict(start=20, stop=25)), "assign opt.param_groups"),
    (lambda gs: gs.pop(0), "assign opt.param_groups"),
])
def test_group_ranges_edited_in_place_are_checked_before_anything_changes(edit, words):
    opt = flatopt.Adam(lr=0.1, param_groups=[dict(start=0, stop=10), dict(start=10, stop=20)])
    p, g = rand(30, np.float64), rand(30, np.float64, seed=1)
    opt.step(p, g)
    before, p_before = snapshot(opt), p.copy()
    edit(opt.param_groups)
    with pytest.raises((ValueError, TypeError), match=words):
        opt.step(p, g)
    assert_same(snapshot(opt), before)
    np.testing.assert_array_equal(p, p_before)


def test_group_range_moved_in_place_is_used_like_an_assigned_one():
    g = grads_for(30)
    edited = flatopt.SGD(lr=0.1, momentum=0.9, param_groups=[dict(start=0, stop=10), dict(start=10, stop=20)])
    assigned = copy.deepcopy(edited)
    p1, p2 = rand(30, np.float64), rand(30, np.float64)
    for opt, p in ((edited, p1), (assigned, p2)):
        opt.step(p, g[0])
    edited.param_groups[1]["stop"] = 25
    assigned.param_groups = [dict(start=0, stop=10), dict(start=10, stop=25)]
    for opt, p in ((edited, p1), (assigned, p2)):
        steps(opt, p, g[1:])
    np.testing.assert_array_equal(p1, p2)


# --- the state assigned or replaced --------------------------------------------------------
@pytest.mark.parametrize("reset", [
    lambda opt: setattr(opt, "state", {}),
    lambda opt: opt.state.clear(),
    lambda opt: [opt.state.pop(k) for k in list(opt.state)],
])
def test_state_reset_starts_the_buffers_over(reset):
    """torch restarts an optimizer whose state was cleared; the core keeps its step counts in
    ``group_state``, so a reset of both equals a fresh optimizer."""
    g = grads_for(40, count=6)
    fresh = steps(flatopt.Adam(lr=0.01, amsgrad=True), steps(flatopt.Adam(lr=0.01, amsgrad=True),
                                                               rand(40, np.float64), g[:3]), g[3:])
    opt = flatopt.Adam(lr=0.01, amsgrad=True)
    p = steps(opt, rand(40, np.float64), g[:3])
    reset(opt)
    opt.group_state = [{"step": 0}]
    np.testing.assert_array_equal(steps(opt, p, g[3:]), fresh)
    assert set(opt.state) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


@pytest.mark.parametrize("how", ["loaded", "removed"])
def test_a_buffer_the_state_lacks_starts_at_zero_and_the_count_goes_on(how):
    """The README's rule, against torch: a checkpoint without ``exp_avg_sq`` (or the buffer
    removed) is taken as the state it holds, the buffer at zero and the step count kept, as
    torch's Adam continues from its state with that buffer zeroed."""
    torch = pytest.importorskip("torch")
    g = grads_for(24, count=5)
    p0 = rand(24, np.float64)
    opt = flatopt.Adam(lr=0.01, weight_decay=0.1)
    p = steps(opt, p0.copy(), g[:3])
    if how == "loaded":
        sd = opt.state_dict()
        del sd["state"]["exp_avg_sq"]
        opt = flatopt.Adam(lr=0.5)
        opt.load_state_dict(sd)
    else:
        del opt.state["exp_avg_sq"]
    p = steps(opt, p, g[3:])
    assert opt.group_state == [{"step": 5}]
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    ref = torch.optim.Adam([tp], lr=0.01, weight_decay=0.1, foreach=False)
    for t, gt in enumerate(g):
        if t == 3:
            ref.state[tp]["exp_avg_sq"].zero_()
        tp.grad = torch.from_numpy(gt.copy())
        ref.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-15)


def test_state_buffer_replaced_by_item_is_copied_in_at_the_next_step():
    g = grads_for(40, count=4)
    reference = flatopt.RMSprop(lr=0.01, momentum=0.9)
    p_ref = steps(reference, rand(40, np.float64), g[:2])
    reference.state["momentum_buffer"][:] = 0.5  # in place: always worked
    opt = flatopt.RMSprop(lr=0.01, momentum=0.9)
    p = steps(opt, rand(40, np.float64), g[:2])
    mine = np.full(40, 0.5)
    opt.state["momentum_buffer"] = mine  # replaced: used from the next step on
    np.testing.assert_array_equal(steps(opt, p, g[2:]), steps(reference, p_ref, g[2:]))
    np.testing.assert_array_equal(mine, 0.5)  # copied in, as load_state_dict copies


def test_replaced_state_of_the_wrong_length_or_dtype_is_refused():
    opt = flatopt.Adam(lr=0.01)
    p, g = rand(40, np.float64), rand(40, np.float64, seed=1)
    opt.step(p, g)
    before, p_before = snapshot(opt), p.copy()
    for name, bad, words in (("exp_avg", np.zeros(39), "made for 39"), ("exp_avg_sq", np.zeros(39), "made for 39"),
                             ("exp_avg_sq", np.zeros((40, 1)), "'exp_avg_sq' must be a 1-D array"),
                             ("exp_avg_sq", [0.0] * 40, "'exp_avg_sq' must be a 1-D array")):
        good = opt.state[name]
        opt.state[name] = bad  # the second buffer too: the kernel would read 40 elements of it
        with pytest.raises(ValueError, match=words):
            opt.step(p, g)
        opt.state[name] = good
        np.testing.assert_array_equal(p, p_before)
    assert_same(snapshot(opt), before)
    opt.state = {"exp_avg": np.zeros(40, np.float32), "exp_avg_sq": np.zeros(40, np.float32)}
    with pytest.raises(TypeError, match="does not match the optimizer state's dtype"):
        opt.step(p, g)


def test_state_survives_pickle_and_deepcopy_as_a_watched_dict():
    opt = flatopt.Adam(lr=0.01)
    opt.step(rand(10, np.float64), rand(10, np.float64, seed=1))
    for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        clone.state.clear()
        clone.group_state = [{"step": 0}]
        p = rand(10, np.float64)
        clone.step(p, rand(10, np.float64, seed=1))
        np.testing.assert_array_equal(p, steps(flatopt.Adam(lr=0.01), rand(10, np.float64),
                                                [rand(10, np.float64, seed=1)]))


# --- checkpoints with callables in groups -------------------------------------------------------
def test_callable_group_lr_is_not_saved_and_the_loader_keeps_its_own():
    def schedule(t):
        return 0.1 / (1 + t)

    groups = [dict(start=0, stop=10, lr=schedule), dict(start=10, stop=20)]
    g = grads_for(20, count=6)
    straight = steps(flatopt.Adam(lr=0.01, param_groups=groups), rand(20, np.float64), g)
    first = flatopt.Adam(lr=0.01, param_groups=groups)
    p = steps(first, rand(20, np.float64), g[:3])
    sd = pickle.loads(pickle.dumps(first.state_dict()))  # picklable: no function inside
    assert "lr" not in sd["param_groups"][0]
    second = flatopt.Adam(lr=0.01, param_groups=groups)
    second.load_state_dict(sd)
    assert second.param_groups[0]["lr"] is schedule
    np.testing.assert_array_equal(steps(second, p, g[3:]), straight)


# --- ADOPT's clip bound ---------------------------------------------------------------------
@pytest.mark.parametrize("bound", [math.nan, -1.0])
def test_adopt_clip_bound_must_be_a_non_negative_number(bound):
    opt = flatopt.ADOPT(lr=0.1, clip_lambda=lambda t: bound)
    p, g = rand(8, np.float64), rand(8, np.float64, seed=1)
    opt.step(p, g)  # the first step only initialises exp_avg_sq: no clipping yet
    before, p_before = snapshot(opt), p.copy()
    with pytest.raises(ValueError, match=r"clip_lambda\(1\) returned"):
        opt.step(p, g)
    assert_same(snapshot(opt), before)
    np.testing.assert_array_equal(p, p_before)


# --- Lookahead syncs only what the inner optimizer updates --------------------------------------
def test_lookahead_leaves_frozen_groups_and_ungrouped_elements_alone():
    inner = flatopt.SGD(lr=0.1, param_groups=[dict(start=0, stop=10), dict(start=10, stop=20, frozen=True)])
    la = flatopt.Lookahead(inner, k=2, alpha=0.5)
    p, g = rand(30, np.float64), rand(30, np.float64, seed=1)
    la.step(p, g)
    p[10:] = 100.0  # set by hand: neither updated nor pulled back
    la.step(p, g)
    np.testing.assert_array_equal(p[10:], 100.0)
    # the active group follows the rule: slow += alpha (fast - slow), fast = slow
    q = rand(30, np.float64)[:10]
    slow = q.copy()
    for _ in range(2):
        q = q - 0.1 * g[:10]
    np.testing.assert_allclose(p[:10], 0.5 * q + 0.5 * slow, rtol=1e-15)


# --- step counts ------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: flatopt.SGD(lr=0.1, momentum=0.9), lambda: flatopt.RMSprop(lr=0.01),
                                  lambda: flatopt.Adam(lr=0.01), lambda: flatopt.Momentum(lr=0.1)])
@pytest.mark.parametrize("edit", [
    lambda gs: gs[0].update(step=None), lambda gs: gs[0].update(step="3"), lambda gs: gs[0].update(step=-1),
    lambda gs: gs[0].update(step=2.0), lambda gs: gs[0].pop("step"),
])
def test_bad_step_counts_edited_in_place_are_refused_before_the_kernel_runs(make, edit):
    """The fast path (nothing assigned since the last step) checks the count too."""
    opt = make()
    p, g = rand(40, np.float64), rand(40, np.float64, seed=1)
    opt.step(p, g)
    opt.step(p, g)
    p_before, state_before = p.copy(), {k: v.copy() for k, v in opt.state.items()}
    edit(opt.group_state)
    with pytest.raises(ValueError, match="int step >= 0"):
        opt.step(p, g)
    np.testing.assert_array_equal(p, p_before)
    for k, v in opt.state.items():
        np.testing.assert_array_equal(v, state_before[k])


def test_bad_group_states_assigned_are_refused_before_the_kernel_runs():
    for make, bad in ((lambda: flatopt.SGD(lr=0.1, momentum=0.9), [{"step": 0}]),
                      (lambda: flatopt.Adam(lr=0.1), [{}]),
                      (lambda: flatopt.Adam(lr=0.1, param_groups=[dict(start=0, stop=4), dict(start=4, stop=8)]),
                       [{"step": 1}, {"step": None}])):
        opt, p = make(), rand(8, np.float64)
        opt.group_state = bad
        with pytest.raises(ValueError, match="group_state entries need"):
            opt.step(p, rand(8, np.float64, seed=1))
        np.testing.assert_array_equal(p, rand(8, np.float64))
        assert opt.state == {}


def test_adding_a_group_keeps_the_counts_of_unchanged_ranges():
    """Like torch's add_param_group: the groups already there go on with their step counts
    (and buffers); the new one starts at step 0."""
    g = grads_for(30, count=6)
    two = [dict(start=0, stop=10), dict(start=10, stop=20, lr=0.05)]
    unchanged = flatopt.Adam(lr=0.01, param_groups=two)
    grown = flatopt.Adam(lr=0.01, param_groups=two)
    p1, p2 = steps(unchanged, rand(30, np.float64), g[:3]), steps(grown, rand(30, np.float64), g[:3])
    grown.param_groups = two + [dict(start=20, stop=30)]
    assert [s["step"] for s in grown.group_state] == [3, 3, 0]
    steps(unchanged, p1, g[3:])
    steps(grown, p2, g[3:])
    np.testing.assert_array_equal(p2[:20], p1[:20])
    fresh_tail = steps(flatopt.Adam(lr=0.01), rand(30, np.float64)[20:], [x[20:] for x in g[3:]])
    np.testing.assert_array_equal(p2[20:], fresh_tail)


@pytest.mark.parametrize("name", ["Adam", "SGD", "ADOPT"])
@pytest.mark.parametrize("before, after", [
    (None, [dict(start=0, stop=10), dict(start=10, stop=30, lr=0.05)]),  # groups cut out of the whole buffer
    ([dict(start=0, stop=30)], [dict(start=0, stop=12), dict(start=12, stop=30, lr=0.05)]),  # one group split
    ([dict(start=0, stop=10), dict(start=10, stop=20), dict(start=20, stop=30)],
     [dict(start=0, stop=20), dict(start=20, stop=30, lr=0.05)]),  # neighbours at one count merged
], ids=["whole buffer cut", "split", "merged"])
def test_regrouping_keeps_each_elements_count(name, before, after):
    """Each element goes on with its own step count, as each torch parameter keeps its own: the
    regrouped optimizer steps as one that had the new layout from the start, its lr changed in
    place (new groups restarted at step 0 with the state buffers kept, so that Adam's bias
    correction started over on warm moments)."""
    kw = dict(lr=0.01, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    g = grads_for(30, count=6)
    regrouped = getattr(flatopt, name)(**kw, param_groups=before)
    laid_out = getattr(flatopt, name)(**kw, param_groups=[dict(start=a["start"], stop=a["stop"]) for a in after])
    p1, p2 = steps(regrouped, rand(30, np.float64), g[:3]), steps(laid_out, rand(30, np.float64), g[:3])
    np.testing.assert_array_equal(p1, p2)
    regrouped.param_groups = after
    laid_out.param_groups[1]["lr"] = 0.05
    assert regrouped.group_state == laid_out.group_state
    steps(regrouped, p1, g[3:])
    steps(laid_out, p2, g[3:])
    np.testing.assert_array_equal(p1, p2)


def test_a_group_over_elements_of_different_counts_or_none_starts_over():
    opt = flatopt.Adam(lr=0.1, param_groups=[dict(start=0, stop=4), dict(start=4, stop=8, frozen=True),
                                             dict(start=8, stop=12)])
    steps(opt, rand(16, np.float64), grads_for(16, count=2))
    opt.param_groups = [dict(start=0, stop=8), dict(start=8, stop=16)]  # counts 2 and 0; elements in no group
    assert opt.group_state == [{"step": 0}, {"step": 0}]


def test_groups_assigned_after_a_range_was_edited_into_no_range_are_taken():
    """The rule compared every old group's range: one edited in place into None raised in the
    middle of the assignment, which had already taken the new groups but not their counts,
    and every later step was refused."""
    opt = flatopt.Adam(lr=0.1, param_groups=[dict(start=0, stop=5), dict(start=5, stop=10)])
    steps(opt, rand(10, np.float64), grads_for(10, count=2))
    opt.param_groups[1]["start"] = None
    opt.param_groups = [dict(start=0, stop=5), dict(start=5, stop=10)]
    assert opt.group_state == [{"step": 2}, {"step": 0}]
    p = rand(10, np.float64)
    opt.step(p, rand(10, np.float64, seed=1))
    assert opt.group_state == [{"step": 3}, {"step": 1}]


def test_sgd_groups_merged_at_one_count_with_and_without_momentum_keep_the_count_and_restart_momentum():
    """A flat group has one momentum flag: joined, elements whose momentum had started and
    elements whose had not start it again (buf = g); the step count, which a schedule reads,
    goes on."""
    opt = flatopt.SGD(lr=lambda step: 0.1 / (1 + step), momentum=0.9,
                      param_groups=[dict(start=0, stop=5), dict(start=5, stop=10, momentum=0.0)])
    steps(opt, rand(10, np.float64), grads_for(10, count=3))
    assert [s["momentum_started"] for s in opt.group_state] == [True, False]
    opt.param_groups = [dict(start=0, stop=10)]
    assert opt.group_state == [{"step": 3, "momentum_started": False}]


def test_dropping_groups_for_the_whole_buffer_keeps_a_shared_count():
    opt = flatopt.SGD(lr=0.1, momentum=0.9, param_groups=[dict(start=0, stop=4), dict(start=4, stop=8)])
    steps(opt, rand(8, np.float64), grads_for(8, count=2))
    opt.param_groups = None
    assert opt.group_state == [{"step": 2, "momentum_started": True}]
    other = flatopt.Adam(lr=0.1, param_groups=[dict(start=0, stop=4), dict(start=4, stop=8, frozen=True)])
    steps(other, rand(8, np.float64), grads_for(8, count=2))
    other.param_groups = None  # the counts differ (2 and 0): no count fits the whole buffer
    assert other.group_state == [{"step": 0}]


# --- unknown names edited in ------------------------------------------------------------------
def test_unknown_state_buffers_and_group_keys_edited_in_are_refused():
    opt = flatopt.SGD(lr=0.1, param_groups=[dict(start=0, stop=8)])
    p, g = rand(8, np.float64), rand(8, np.float64, seed=1)
    opt.step(p, g)
    opt.state["note"] = np.zeros(8)
    with pytest.raises(ValueError, match=r"unknown buffers \['note'\]"):
        opt.step(p, g)
    del opt.state["note"]
    opt.param_groups[0]["learning_rate"] = 0.5  # a typo must not be ignored silently
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rate'\]"):
        opt.step(p, g)
    np.testing.assert_array_equal(p, steps(flatopt.SGD(lr=0.1), rand(8, np.float64), [g]))


def test_shallow_copy_shares_nothing():
    opt = flatopt.Adam(lr=0.01, param_groups=[dict(start=0, stop=10)])
    p = steps(opt, rand(10, np.float64), grads_for(10, count=2))
    clone = copy.copy(opt)
    steps(clone, p.copy(), grads_for(10, count=2))
    clone.param_groups[0]["lr"] = 0.5
    assert opt.group_state == [{"step": 2}] and opt.param_groups[0].get("lr") is None


def test_lookahead_slow_weights_assigned_are_checked_before_the_inner_step(tmp_path):
    la = flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2, alpha=0.5)
    p, g = rand(16, np.float64), rand(16, np.float64, seed=1)
    la.step(p, g)
    before, p_before = snapshot(la), p.copy()
    good = la.slow
    la.slow = good.reshape(16, 1)
    with pytest.raises(ValueError, match="slow weights must be a 1-D array"):
        la.step(p, g)
    after = snapshot(la)
    np.testing.assert_array_equal(after.pop("slow").ravel(), before.pop("slow"))
    assert_same(after, before)
    np.testing.assert_array_equal(p, p_before)
    # a read-only or memory-mapped copy is taken in (copied), and the run goes on unchanged
    reference = copy.deepcopy(la)
    reference.slow = good.copy()
    np.save(tmp_path / "slow.npy", good)
    la.slow = np.load(tmp_path / "slow.npy", mmap_mode="r")
    p_ref = p.copy()
    for _ in range(3):
        la.step(p, g)
        reference.step(p_ref, g)
    np.testing.assert_array_equal(p, p_ref)
    assert la.slow.flags.writeable


@pytest.mark.parametrize("assigned", ["the grads", "the params", "an array of the caller's"])
def test_lookahead_slow_weights_assigned_are_copied_not_written_in_place(assigned):
    """Assigned slow weights were used in place when the kernels could write them: ``la.slow =
    grads`` had the sync write into the caller's gradients, ``la.slow = params`` made Lookahead
    the plain inner optimizer.  They are copied at the next step, as assigned state buffers."""
    la = flatopt.Lookahead(flatopt.SGD(lr=0.1, momentum=0.5), k=1, alpha=0.5)
    reference = copy.deepcopy(la)
    p, g = rand(16, np.float64), rand(16, np.float64, seed=1)
    p_ref = p.copy()
    la.step(p, g)
    reference.step(p_ref, g)
    theirs = {"the grads": g, "the params": p, "an array of the caller's": rand(16, np.float64, seed=2)}[assigned]
    held = theirs.copy()
    la.slow = theirs
    reference.slow = held.copy()
    g_before = g.copy()
    for _ in range(3):
        la.step(p, g)
        reference.step(p_ref, g_before)
    np.testing.assert_array_equal(p, p_ref)
    np.testing.assert_array_equal(la.slow, reference.slow)
    np.testing.assert_array_equal(g, g_before)  # flatopt never writes the gradients
    if assigned == "an array of the caller's":
        np.testing.assert_array_equal(theirs, held)
    assert la.slow is not theirs


def test_lookahead_slow_weights_assigned_stay_the_callers_through_a_refused_step():
    """The copy of assigned slow weights is kept only by a step that succeeds: a refused step
    copied them in anyway, and an edit of the caller's array before the next step was lost."""
    la = flatopt.Lookahead(flatopt.SGD(lr=0.1), k=1, alpha=0.5)
    p, g = rand(16, np.float64), rand(16, np.float64, seed=1)
    la.step(p, g)
    mine = rand(16, np.float64, seed=2)
    la.slow = mine
    la.inner.lr = -1.0
    before = p.copy()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        la.step(p, g)
    assert la.slow is mine and la.step_count == 1
    np.testing.assert_array_equal(p, before)
    mine += 7.0  # the caller's edit, before the next step
    la.inner.lr = 0.1
    reference = flatopt.Lookahead(flatopt.SGD(lr=0.1), k=1, alpha=0.5)
    reference.load_state_dict(dict(la.state_dict(), slow=mine.copy()))
    p_ref = p.copy()
    la.step(p, g)
    reference.step(p_ref, g)
    np.testing.assert_array_equal(p, p_ref)


@pytest.mark.parametrize("params", ["read-only", "strided"])
def test_lookahead_slow_weights_refuse_params_a_step_would_refuse(params):
    """``slow_weights(params)`` writes the slow weights into ``params``: refused, before
    anything is written, where a step would refuse them."""
    la = flatopt.Lookahead(flatopt.SGD(lr=0.1), k=2, alpha=0.5)
    p, g = rand(32, np.float64), rand(32, np.float64, seed=1)
    la.step(p, g)
    if params == "read-only":
        target = p.copy()
        target.flags.writeable = False
    else:
        target = np.repeat(p, 2)[::2]
    held = target.copy()
    with pytest.raises(ValueError, match="read-only" if params == "read-only" else "must be contiguous"):
        with la.slow_weights(target):
            pass
    np.testing.assert_array_equal(target, held)


# --- groups assigned with a new range start afresh -------------------------------------------
@pytest.mark.parametrize("make, torch_name, torch_kwargs", [
    (lambda groups: flatopt.Adam(lr=0.1, param_groups=groups), "Adam", dict(lr=0.1, foreach=False)),
    (lambda groups: flatopt.SGD(lr=0.1, momentum=0.9, param_groups=groups), "SGD", dict(lr=0.1, momentum=0.9)),
])
def test_a_group_assigned_with_a_range_no_group_had_starts_at_step_zero(make, torch_name, torch_kwargs):
    """As a torch group added with new parameters: [A, B] -> [A, C] with C disjoint from B
    (same number of groups) once gave C the step count and momentum flag of B."""
    torch = pytest.importorskip("torch")
    g, p = grads_for(30, count=5), rand(30, np.float64)
    opt = make([dict(start=0, stop=10), dict(start=10, stop=20)])
    tps = [torch.nn.Parameter(torch.from_numpy(p[a:a + 10].copy())) for a in (0, 10, 20)]
    topt = getattr(torch.optim, torch_name)([{"params": [tps[0]]}, {"params": [tps[1]]}], **torch_kwargs)

    def both(grads, stepped):
        for x in grads:
            opt.step(p, x)
            for i in stepped:
                tps[i].grad = torch.from_numpy(x[10 * i:10 * i + 10].copy())
            topt.step()

    both(g[:3], (0, 1))
    opt.param_groups = [dict(start=0, stop=10), dict(start=20, stop=30)]
    del topt.param_groups[1]
    topt.add_param_group({"params": [tps[2]]})
    assert opt.group_state[1] == opt._new_group_state()
    both(g[3:], (0, 2))
    for i, t in enumerate(tps):
        np.testing.assert_allclose(p[10 * i:10 * i + 10], t.detach().numpy(), rtol=1e-13, atol=1e-15)


def test_groups_assigned_after_the_counts_were_cut_short_start_over():
    """The step refuses groups and counts of different lengths and says to assign the groups:
    that assignment must work (it looked a count up by a place the counts no longer had)."""
    opt = flatopt.Adam(lr=0.1, param_groups=[dict(start=0, stop=4), dict(start=4, stop=8)])
    p, g = rand(8, np.float64), rand(8, np.float64, seed=1)
    opt.step(p, g)
    del opt.group_state[1]
    with pytest.raises(ValueError, match="assign opt.param_groups"):
        opt.step(p, g)
    opt.param_groups = [dict(start=0, stop=4), dict(start=5, stop=8)]
    assert opt.group_state == [{"step": 1}, {"step": 0}]


# --- an optimizer without state may change dtype ------------------------------------------------
@pytest.mark.parametrize("groups", [None, [dict(start=0, stop=6)]])
def test_sgd_without_state_steps_another_dtype_as_a_fresh_one(groups):
    """Its unused state slots were the empty buffers of the first step's dtype: Numba refused
    the next launch with a TypingError."""
    opt = flatopt.SGD(lr=0.5, param_groups=groups)
    opt.step(rand(8, np.float64), rand(8, np.float64, seed=1))
    for dtype in (np.float32, np.float64, np.float32):
        p, expected = rand(8, dtype), rand(8, dtype)
        opt.step(p, rand(8, dtype, seed=1))
        flatopt.SGD(lr=0.5, param_groups=groups).step(expected, rand(8, dtype, seed=1))
        np.testing.assert_array_equal(p, expected)


# --- checkpoints whose counts the next step would refuse ---------------------------------------
@pytest.mark.parametrize("bad", [{"step": -5}, {"step": True}])
def test_load_refuses_group_states_the_step_would_refuse(bad):
    opt = flatopt.Adam(lr=0.1)
    p, g = rand(8, np.float64), rand(8, np.float64, seed=1)
    opt.step(p, g)
    sd, before = opt.state_dict(), snapshot(opt)
    with pytest.raises(ValueError, match="int step >= 0"):
        opt.load_state_dict(dict(sd, group_state=[bad]))
    assert_same(snapshot(opt), before)


@pytest.mark.parametrize("edit, error", [
    (lambda sd: sd.update(step_count=True), ValueError),
    (lambda sd: sd.update(slow=np.array(list("abcdefgh"))), TypeError),
    (lambda sd: sd.update(slow=np.arange(8)), TypeError),
    (lambda sd: sd.update(synced=[[0, 9]]), ValueError),  # past the slow weights' end
    (lambda sd: sd.update(synced=[[4, 2]]), ValueError),
    (lambda sd: sd.update(synced=[[0, 4], [2, 6]]), ValueError),
    (lambda sd: sd.update(synced=[[4, 8], [0, 2]]), ValueError),
    (lambda sd: sd.update(synced=[[0, 4.0]]), ValueError),
    (lambda sd: sd.update(synced=[[0, 4, 8]]), ValueError),
    (lambda sd: sd.update(synced="0:8"), ValueError),
    (lambda sd: sd.update(synced=[[]]), ValueError),
    (lambda sd: sd.update(slow=None), ValueError),  # synced ranges of slow weights it does not have
])
def test_lookahead_load_refuses_what_its_step_would_refuse(edit, error):
    la = flatopt.Lookahead(flatopt.SGD(lr=0.1), k=2)
    p, g = rand(8, np.float64), rand(8, np.float64, seed=1)
    la.step(p, g)
    sd, before = la.state_dict(), snapshot(la)
    edit(sd)
    with pytest.raises(error):
        la.load_state_dict(sd)
    assert_same(snapshot(la), before)


def test_lookahead_load_refuses_slow_weights_of_another_dtype_than_the_inner_state():
    """The next step would refuse them (the parameters match one or the other): the load does."""
    la = flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2)
    p, g = rand(8, np.float64), rand(8, np.float64, seed=1)
    la.step(p, g)
    sd, before = la.state_dict(), snapshot(la)
    sd["slow"] = sd["slow"].astype(np.float32)
    with pytest.raises(TypeError, match="slow weights' dtype float32 does not match the inner state's float64"):
        la.load_state_dict(sd)
    assert_same(snapshot(la), before)


def test_a_flag_removed_from_the_group_state_is_named_on_the_fast_path_too():
    opt = flatopt.SGD(lr=0.1, momentum=0.9)
    p, g = rand(8, np.float64), rand(8, np.float64, seed=1)
    opt.step(p, g)
    opt.step(p, g)  # the next steps take the fast path
    del opt.group_state[0]["momentum_started"]
    before = p.copy()
    with pytest.raises(ValueError, match="group_state entries need 'momentum_started'"):
        opt.step(p, g)
    np.testing.assert_array_equal(p, before)


# --- hyperparameters as arrays of more than zero dimensions -------------------------------------
def test_array_betas_and_a_one_element_array_lr_act_as_their_numbers():
    """As torch takes a tensor lr of one element, and betas that index as a pair."""
    g = grads_for(20)
    expected = steps(flatopt.Adam(lr=0.01, betas=(0.8, 0.99)), rand(20, np.float64), g)
    got = steps(flatopt.Adam(lr=np.array([0.01]), betas=np.array([0.8, 0.99])), rand(20, np.float64), g)
    np.testing.assert_array_equal(got, expected)


# --- a new lr between steps: the prepared step takes it ------------------------------------------
# A step after a full one reuses what that one checked and prepared until something other than
# the lr changes; a new lr (a schedule's value, a number assigned, a group's lr edited in place)
# is checked and written into the step's scalars there.  These tests hold that path to the full
# step's results (which test_core_parity holds to torch) and to its refusals.
LR_MAKERS = {
    "SGD-momentum": lambda **kw: flatopt.SGD(momentum=0.9, weight_decay=1e-2, **kw),
    "Momentum": lambda **kw: flatopt.Momentum(beta=0.8, **kw),
    "RMSprop-centered": lambda **kw: flatopt.RMSprop(centered=True, momentum=0.5, **kw),
    "Adam-amsgrad": lambda **kw: flatopt.Adam(amsgrad=True, weight_decay=1e-2, **kw),
    "AdamW": lambda **kw: flatopt.AdamW(weight_decay=0.1, **kw),
    "ADOPT-decouple": lambda **kw: flatopt.ADOPT(decouple=True, weight_decay=0.1, **kw),
}
GROUPS = [dict(start=0, stop=24), dict(start=24, stop=40, weight_decay=0.0), dict(start=44, stop=64, lr=5e-3)]


def _lrs(t):
    return 1e-2 * (1.0 + 0.5 * math.sin(0.7 * t + 1.0))  # another lr at every step


def _run_with_lrs(name, how, dtype, *, full):
    """Twelve steps whose lr changes before each; ``full``: every step takes the full path."""
    groups = copy.deepcopy(GROUPS) if "groups" in how else None
    opt = LR_MAKERS[name](lr=_lrs if how.startswith("schedule") else 1e-2, param_groups=groups)
    p, grads = rand(64, dtype), grads_for(64, 12, dtype)
    for t, g in enumerate(grads):
        if how.startswith("assigned"):
            opt.lr = _lrs(t)  # (groups: those without an lr of their own)
        elif how == "group lr edited, groups":
            opt.param_groups[2]["lr"] = _lrs(t) / 2
        if full:
            opt.__dict__["_ready"] = None
        opt.step(p, g)
    return p, opt


@pytest.mark.parametrize("name", list(LR_MAKERS))
@pytest.mark.parametrize("how", ["assigned", "schedule", "assigned, groups", "schedule, groups",
                                 "group lr edited, groups"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_new_lr_at_every_step_takes_the_prepared_step_bit_for_bit(name, how, dtype, monkeypatch):
    expected, full = _run_with_lrs(name, how, dtype, full=True)
    calls = []
    active = type(full)._active
    monkeypatch.setattr(type(full), "_active", lambda self, n: calls.append(n) or active(self, n))
    got, opt = _run_with_lrs(name, how, dtype, full=False)
    np.testing.assert_array_equal(got, expected)
    assert_same(snapshot(opt), snapshot(full))
    assert calls == [64], "only the first step takes the full path"


@pytest.mark.parametrize("name", list(LR_MAKERS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lr_entries_are_every_row_entry_that_changes_with_the_lr(name, dtype):
    """A step whose lr changed writes only ``_set_lr_entries`` and ``_set_step_entries`` into its
    prepared row: every entry that differs between two lrs must be one of theirs, at the row's
    value."""
    opt = LR_MAKERS[name](lr=1e-3)
    dt, state = np.dtype(dtype).type, dict(opt._new_group_state(), step=3)
    if "momentum_started" in state:
        state["momentum_started"] = True
    unset = object()
    rows, written = [], set()
    for lr in (1e-3, 0.0, 3e-7, 0.5, 123.0):
        hp = dict(opt._resolve(None, 3), lr=lr)
        row = opt._row(hp, state, dt)
        probe = [unset] * len(row)
        opt._set_lr_entries(probe, hp)
        opt._set_step_entries(probe, hp, state)
        entries = {i for i, v in enumerate(probe) if v is not unset}
        assert all(probe[i] == row[i] for i in entries)
        written |= entries
        rows.append(row)
    changed = {i for row in rows for i in range(len(row)) if row[i] != rows[0][i]}
    assert changed and changed <= written


@pytest.mark.parametrize("edit, error, words", [
    ("assigned", ValueError, "Invalid learning rate: -0.5"),
    ("assigned nan", ValueError, "Invalid learning rate: nan"),
    ("assigned text", TypeError, "'<=' not supported"),
    ("group lr edited", ValueError, "Invalid learning rate: -0.5"),
    ("schedule", ValueError, "Invalid learning rate: -0.5"),
])
def test_a_bad_lr_on_the_prepared_step_is_refused_and_changes_nothing(edit, error, words):
    """As the full step refuses it (torch's message), with nothing changed; the optimizer then
    steps on as one that never saw it."""
    def make():
        schedule = (lambda t: -0.5 if t == 2 else 1e-2) if edit == "schedule" else 1e-2
        return flatopt.Adam(lr=schedule, param_groups=[dict(start=0, stop=8), dict(start=8, stop=16, lr=1e-2)])
    opt, reference = make(), make()
    p, ref, grads = rand(16, np.float64), rand(16, np.float64), grads_for(16, 4)
    steps(opt, p, grads[:2])
    steps(reference, ref, grads[:2])
    good = opt.param_groups[1]["lr"]
    if edit.startswith("assigned"):
        opt.lr = {"assigned": -0.5, "assigned nan": math.nan, "assigned text": "0.1"}[edit]
    elif edit == "group lr edited":
        opt.param_groups[1]["lr"] = -0.5
    before, p_before = snapshot(opt), p.copy()
    with pytest.raises(error, match=words):
        opt.step(p, grads[2])
    np.testing.assert_array_equal(p, p_before)
    assert_same(snapshot(opt), before)
    if edit == "schedule":
        reference.lr = opt.lr = 1e-2  # (both step on with a number)
    else:
        opt.lr, opt.param_groups[1]["lr"] = 1e-2, good
    steps(opt, p, grads[2:])
    steps(reference, ref, grads[2:])
    np.testing.assert_array_equal(p, ref)


@pytest.mark.parametrize("make", [flatopt.SGD, flatopt.RMSprop, flatopt.Adam, flatopt.AdamW, flatopt.ADOPT])
@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("when", ["at construction", "between steps"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_int_lr_beyond_float_range_is_an_overflow_error_and_changes_nothing(make, groups, when, dtype):
    """torch.optim raises OverflowError for such an lr at its step.  SGD's and RMSprop's tables
    take the lr as it is, and a step with groups once refused it as ``struct.error: required
    argument is not a float``."""
    huge = 10**400
    opt = make(lr=huge if when == "at construction" else 1e-2,
               param_groups=[dict(start=0, stop=8), dict(start=8, stop=16)] if groups else None)
    p, grads = rand(16, dtype), grads_for(16, 2, dtype)
    if when == "between steps":
        opt.step(p, grads[0])
        if groups:
            opt.param_groups[1]["lr"] = huge
        else:
            opt.lr = huge
    before, p_before = snapshot(opt), p.copy()
    with pytest.raises(OverflowError, match="int too large to convert to float"):
        opt.step(p, grads[1])
    np.testing.assert_array_equal(p, p_before)
    assert_same(snapshot(opt), before)


def test_a_step_refused_after_its_lr_changed_leaves_no_scalars_of_that_lr():
    """The refused step had written the new lr's scalars into its prepared row before it found
    the group state broken; with the old lr back, the next step must not use them."""
    opt, reference = flatopt.SGD(lr=0.1, momentum=0.9), flatopt.SGD(lr=0.1, momentum=0.9)
    p, ref, grads = rand(8, np.float64), rand(8, np.float64), grads_for(8, 4)
    steps(opt, p, grads[:2])
    steps(reference, ref, grads[:2])
    lr = opt.lr
    opt.lr = 0.5
    del opt.group_state[0]["momentum_started"]
    with pytest.raises(ValueError, match="'momentum_started'"):
        opt.step(p, grads[2])
    opt.group_state[0]["momentum_started"] = True
    opt.lr = lr  # the very object the prepared step checked
    steps(opt, p, grads[2:])
    steps(reference, ref, grads[2:])
    np.testing.assert_array_equal(p, ref)


def _rename(key, new):
    def edit(opt):
        group = opt.param_groups[0]
        group[new] = group.pop(key)
    return edit


def _edits_between_steps():
    """(make, {step: edit}) pairs, each an edit the prepared step must see as the full one does.
    (The renamed key is the last: its value stays where it was among the values.)"""
    lr, array, betas = 0.1, np.array(0.1), [0.9, 0.999]
    one_group = [dict(start=0, stop=8)]

    def put(key, value):
        return lambda opt: opt.param_groups[0].__setitem__(key, value)

    def set_array(value):
        return lambda opt: array.__setitem__(..., value)

    def drop_flag(opt):
        del opt.group_state[0]["momentum_started"]

    return {
        "lr: a number, a schedule, the first number again": (
            lambda: flatopt.SGD(lr=lr),
            {1: lambda o: setattr(o, "lr", lambda t: 0.5), 2: lambda o: setattr(o, "lr", lr)}),
        "a group key renamed, its value kept": (
            lambda: flatopt.SGD(lr=0.1, param_groups=[dict(start=0, stop=8, frozen=False, momentum=0.9)]),
            {2: _rename("momentum", "dampening")}),
        "a group key renamed to an unknown one": (
            lambda: flatopt.SGD(lr=0.1, param_groups=[dict(start=0, stop=8, frozen=False, momentum=0.9)]),
            {2: _rename("momentum", "bogus")}),
        "a group lr as an array, edited in place": (
            lambda: flatopt.SGD(lr=0.1, param_groups=one_group), {0: put("lr", array), 2: set_array(0.7)}),
        "a group lr as an array, edited in place to a bad lr": (
            lambda: flatopt.SGD(lr=0.1, param_groups=one_group), {0: put("lr", array), 2: set_array(-1.0)}),
        "a group lr replaced by an array after the first step, then edited": (
            lambda: flatopt.SGD(lr=0.1, param_groups=[dict(start=0, stop=8, lr=0.1)]),
            {1: put("lr", array), 2: set_array(0.7)}),
        "group betas as a list, edited in place": (
            lambda: flatopt.Adam(lr=0.1, param_groups=one_group),
            {0: put("betas", betas), 2: lambda o: betas.__setitem__(0, 0.5)}),
        "SGD without momentum, in a group, its group state's flag removed": (
            lambda: flatopt.SGD(lr=0.1, param_groups=one_group), {2: drop_flag}),
        "Momentum in a group, its group state's flag removed": (
            lambda: flatopt.Momentum(lr=0.1, param_groups=one_group), {2: drop_flag}),
        "SGD without momentum, its group state's flag removed": (lambda: flatopt.SGD(lr=0.1), {2: drop_flag}),
        "a group state replaced by a number": (
            lambda: flatopt.SGD(lr=0.1), {2: lambda o: o.group_state.__setitem__(0, 5)}),
        "a bad group state appended": (
            lambda: flatopt.SGD(lr=0.1), {2: lambda o: o.group_state.append({"step": -1, "momentum_started": False})}),
    }, (array, betas)


@pytest.mark.parametrize("case", list(_edits_between_steps()[0]))
def test_an_edit_between_steps_acts_on_the_prepared_step_as_on_the_full_one(case):
    """The same edits, one optimizer taking the prepared step and one forced onto the full step
    (which re-reads and re-checks everything): the same parameters, or the same error with the
    parameters unchanged."""
    outcomes = []
    for full in (False, True):
        cases, (array, betas) = _edits_between_steps()
        make, edits = cases[case]
        opt, p = make(), np.linspace(-1.0, 1.0, 8)
        outcome = None
        for t in range(4):
            if t in edits:
                edits[t](opt)
            if full:
                opt.__dict__["_ready"] = None
            before = p.copy()
            try:
                opt.step(p, np.full(8, 0.5) + t)
            except Exception as error:  # noqa: BLE001 - the error is the outcome compared
                np.testing.assert_array_equal(p, before, err_msg="a refused step changed the parameters")
                outcome = (type(error), str(error))
                break
        outcomes.append(outcome or p.tobytes())
    assert outcomes[0] == outcomes[1]
