"""The core's contract beyond the math: validation that modifies nothing, checkpoints,
parameter groups, lazy state, dtypes, recompilation, imports."""
import io
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flatopt
from conftest import collector_off, in_workqueue_process, needs_threads, sweep
from flatopt import backend
from flatopt.backend import CPU
from flatopt.kernels import cpu as kernels

SWEEP = sweep(15)  # (FLATOPT_SWEEP_EXAMPLES runs it deeper: see conftest.sweep)

MAKERS = {
    "SGD": lambda: flatopt.SGD(lr=0.05),
    "SGD-nesterov": lambda: flatopt.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "Momentum": lambda: flatopt.Momentum(lr=0.05, beta=0.9),
    "RMSprop": lambda: flatopt.RMSprop(lr=1e-3),
    "RMSprop-centered-momentum": lambda: flatopt.RMSprop(lr=1e-3, centered=True, momentum=0.9),
    "Adam": lambda: flatopt.Adam(lr=1e-2),
    "Adam-amsgrad": lambda: flatopt.Adam(lr=1e-2, amsgrad=True, weight_decay=0.1),
    "AdamW": lambda: flatopt.AdamW(lr=1e-2),
    "ADOPT": lambda: flatopt.ADOPT(lr=1e-2),
    "ADOPT-decouple": lambda: flatopt.ADOPT(lr=1e-2, weight_decay=0.1, decouple=True),
    "Lookahead-Adam": lambda: flatopt.Lookahead(flatopt.Adam(lr=1e-2), k=3, alpha=0.5),
    "Lookahead-SGD": lambda: flatopt.Lookahead(flatopt.SGD(lr=0.05, momentum=0.9), k=2, alpha=0.3),
}


def rand(n, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)


def snapshot(opt):
    """Everything a failed step must leave untouched, copied."""
    inner = opt.inner if isinstance(opt, flatopt.Lookahead) else opt
    snap = {"state": {k: v.copy() for k, v in inner.state.items()},
            "group_state": [dict(s) for s in inner.group_state]}
    if isinstance(opt, flatopt.Lookahead):
        snap["slow"] = None if opt.slow is None else opt.slow.copy()
        snap["step_count"] = opt.step_count
    return snap


def assert_same(a, b):
    """Equal snapshots or checkpoints: the same keys, arrays equal element for element, nested
    dicts (a Lookahead's inner checkpoint) alike."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same(a[key], b[key])
        elif isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


# --- bad input: a clear error, nothing modified --------------------------------------------------
def bad_inputs(n):
    p, g = rand(n), rand(n, seed=1)
    readonly = p.copy()
    readonly.flags.writeable = False
    both = rand(2 * n)
    return [
        ("2-D params", lambda: (p.reshape(1, n), g.reshape(1, n)), ValueError, "1-D"),
        ("strided params", lambda: (rand(2 * n)[::2], g), ValueError, "contiguous"),
        ("read-only params", lambda: (readonly, g), ValueError, "read-only"),
        ("length mismatch", lambda: (p, rand(n + 1)), ValueError, "elements"),
        ("dtype mismatch", lambda: (p, g.astype(np.float64)), TypeError, "dtype"),
        ("same memory", lambda: (p, p), ValueError, "share memory"),
        ("overlapping views", lambda: (both[:n], both[n // 2:n // 2 + n]), ValueError, "share memory"),
        ("int params", lambda: (np.arange(n), np.arange(n)), TypeError, "int64"),
        ("float16", lambda: (p.astype(np.float16), g.astype(np.float16)), TypeError, "float16"),
        ("complex", lambda: (p.astype(np.complex64), g.astype(np.complex64)), TypeError, "complex64"),
        ("object", lambda: (p.astype(object), g.astype(object)), TypeError, "object"),
        ("list", lambda: (list(p), g), TypeError, "NumPy array"),
        ("None grads", lambda: (p, None), TypeError, "grads"),
        ("other length than the state", lambda: (rand(n + 3), rand(n + 3, seed=1)), ValueError, "state|slow weights"),
        ("other dtype than the state", lambda: (p.astype(np.float64), g.astype(np.float64)), TypeError, "dtype"),
        ("masked grads", lambda: (p, np.ma.masked_array(g, mask=np.arange(n) % 2)), TypeError, "grads is a masked"),
        ("masked params", lambda: (np.ma.masked_array(p), g), TypeError, "params is a masked"),
    ]


def test_torch_cpu_tensors_are_not_cuda_arrays():
    """The CUDA backend's quick test for torch tensors (no __cuda_array_interface__ read) says
    no for CPU tensors, and the core names what it got, as for any other type."""
    torch = pytest.importorskip("torch")
    from flatopt.backend import is_cuda_array, is_torch_cuda_tensor
    tensor = torch.zeros(8)
    assert not is_torch_cuda_tensor(tensor) and not is_cuda_array(tensor)
    assert not is_torch_cuda_tensor(np.zeros(8)) and not is_torch_cuda_tensor(torch.zeros(8).to_sparse())
    with pytest.raises(TypeError, match=r"params must be a NumPy array or a CUDA array .*got torch\.Tensor"):
        flatopt.Adam().step(tensor, torch.zeros(8))


@pytest.mark.parametrize("name", list(MAKERS))
def test_bad_buffers_raise_and_modify_nothing(name):
    n = 40
    opt = MAKERS[name]()
    params, grads = rand(n), rand(n, seed=1)
    for _ in range(2):
        opt.step(params, grads)
    for label, make, exc, words in bad_inputs(n):
        p, g = make()
        if label.startswith("other") and not snapshot(opt)["state"] and not isinstance(opt, flatopt.Lookahead):
            continue  # plain SGD keeps no state: any length is fine for it
        before, p_before = snapshot(opt), np.array(p, copy=True) if isinstance(p, np.ndarray) else None
        g_before = np.array(g, copy=True) if isinstance(g, np.ndarray) else None
        with pytest.raises(exc, match=words):
            opt.step(p, g)
        assert_same(snapshot(opt), before)
        if p_before is not None:
            np.testing.assert_array_equal(p, p_before)
        if g_before is not None:
            np.testing.assert_array_equal(g, g_before)


def test_masked_arrays_are_refused_before_any_state_is_made(tmp_path):
    """A masked array passed the checks: in a fresh process Numba refused it after the state
    buffers were made (sized to it), and after any other ndarray subclass (a memmap) had been
    stepped it was taken, its masked values (a NaN) read into the parameters."""
    code = textwrap.dedent(f"""
        import numpy as np, flatopt
        mm = np.memmap({str(tmp_path / "p.dat")!r}, dtype=np.float64, mode="w+", shape=(8,))
        for first in (False, True):
            if first:
                flatopt.SGD(lr=0.1).step(mm, np.ones(8))  # a subclass stepped first
            opt, p = flatopt.Adam(lr=0.1), np.ones(8)
            g = np.ma.masked_array([1.0, np.nan] * 4, mask=[0, 1] * 4)
            try:
                opt.step(p, g)
                raise SystemExit("masked grads were taken: " + repr(p))
            except TypeError as error:
                assert "grads is a masked array" in str(error), error
            assert opt.state == {{}} and (p == 1).all()
            opt.step(np.ones(16), np.ones(16))  # and the next step is not held to its size
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=240)


def test_shallow_copy_of_lookahead_shares_nothing():
    """copy.copy of a Lookahead copies its inner optimizer too (it shared it, and its state)."""
    import copy
    la = flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2, alpha=0.5)
    p, g = rand(10), rand(10, seed=1)
    la.step(p, g)
    snap = copy.copy(la)
    assert snap.inner is not la.inner and snap.slow is not la.slow
    la.step(p.copy(), g)
    assert snap.inner.group_state == [{"step": 1}]
    q = p.copy()
    snap.step(q, g)  # the copy steps on from where it was copied
    assert snap.inner.group_state == [{"step": 2}]


def test_param_groups_none_after_an_empty_list():
    opt = flatopt.SGD(lr=0.1, param_groups=[])
    opt.step(rand(4), rand(4, seed=1))
    opt.param_groups = None  # raised IndexError
    p = rand(4)
    opt.step(p, rand(4, seed=1))
    assert opt.group_state == [{"step": 1, "momentum_started": False}]


@pytest.mark.parametrize("kw", [dict(momentum=0.9, dampening=0.5), dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.5, weight_decay=0.1)], ids=str)
@pytest.mark.parametrize("how", ["del", "assign", "clear"])
def test_sgd_momentum_buffer_removed_starts_again_as_the_gradient(kw, how):
    """As torch's SGD: a step without a momentum buffer starts it as the gradient (with dampening
    it restarted at zero, (1 - dampening) * g, 30% off torch's here)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p0, grads = rng.standard_normal(5), rng.standard_normal((5, 5))
    p, opt = p0.copy(), flatopt.SGD(lr=0.1, **kw)
    tp = torch.nn.Parameter(torch.tensor(p0.copy()))
    topt = torch.optim.SGD([tp], lr=0.1, foreach=False, **kw)
    for s, g in enumerate(grads):
        if s == 2:
            if how == "del":
                del opt.state["momentum_buffer"]
            elif how == "assign":
                opt.state = {}
            else:
                opt.state.clear()
            del topt.state[tp]["momentum_buffer"]
        opt.step(p, g.copy())
        tp.grad = torch.tensor(g.copy())
        topt.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("how", ["refused step", "clear and update", "removed and put back"])
def test_sgd_momentum_buffer_put_back_before_the_step_goes_on(how):
    """torch decides at the step whether the buffer starts anew, from whether it is there: one put
    back (or one only renamed for a step that was refused) goes on.  The flags were reset when
    the buffer left ``opt.state``, so the restored buffer was overwritten by the gradient."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p0, grads = rng.standard_normal(6), rng.standard_normal((4, 6))
    p, opt = p0.copy(), flatopt.SGD(lr=0.1, momentum=0.9, dampening=0.3)
    tp = torch.nn.Parameter(torch.tensor(p0.copy()))
    topt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, dampening=0.3, foreach=False)
    for s, g in enumerate(grads):
        if s == 2:
            saved = dict(opt.state)
            if how == "refused step":
                opt.state = {"momentum_buf": saved["momentum_buffer"]}
                with pytest.raises(ValueError, match="unknown buffers"):
                    opt.step(p, g.copy())
                opt.state = saved
            elif how == "clear and update":
                opt.state.clear()
                opt.state.update(saved)
            else:
                del opt.state["momentum_buffer"]
                opt.state["momentum_buffer"] = saved["momentum_buffer"]
        opt.step(p, g.copy())
        tp.grad = torch.tensor(g.copy())
        topt.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=0)


def test_readonly_grads_are_fine():
    p, g = rand(10), rand(10, seed=1)
    g.flags.writeable = False
    flatopt.Adam().step(p, g)


TORCH_MESSAGES = [
    (flatopt.SGD, dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (flatopt.SGD, dict(momentum=-0.5), "Invalid momentum value: -0.5"),
    (flatopt.SGD, dict(weight_decay=-1e-3), "Invalid weight_decay value: -0.001"),
    (flatopt.SGD, dict(nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
    (flatopt.SGD, dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov momentum requires"),
    (flatopt.RMSprop, dict(alpha=-0.1), "Invalid alpha value: -0.1"),
    (flatopt.RMSprop, dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    (flatopt.RMSprop, dict(momentum=-1.0), "Invalid momentum value: -1.0"),
    (flatopt.RMSprop, dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (flatopt.RMSprop, dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (flatopt.Momentum, dict(lr=-0.1), "Invalid learning rate: -0.1"),  # (not in torch: flatopt's own check)
    (flatopt.Momentum, dict(beta=1.0), "Invalid beta value: 1.0"),  # v would stay 0: 0 <= beta < 1
    (flatopt.Momentum, dict(beta=-0.5), "Invalid beta value: -0.5"),
    (flatopt.Momentum, dict(weight_decay=-1e-3), "Invalid weight_decay value: -0.001"),
    (flatopt.Adam, dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (flatopt.Adam, dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (flatopt.Adam, dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
    (flatopt.Adam, dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (flatopt.AdamW, dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (flatopt.ADOPT, dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    (flatopt.ADOPT, dict(lr=-2.0), "Invalid learning rate: -2.0"),
]


@pytest.mark.parametrize("cls, kwargs, message", TORCH_MESSAGES)
def test_hyperparameter_messages_are_torchs(cls, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cls(**kwargs)
    torch = pytest.importorskip("torch")
    if hasattr(torch.optim, cls.__name__):
        with pytest.raises(ValueError) as torch_error:
            getattr(torch.optim, cls.__name__)([torch.nn.Parameter(torch.zeros(1))], **kwargs)
        assert str(torch_error.value).startswith(message)


@pytest.mark.parametrize("name, kwargs", [
    ("SGD", dict(lr=0.0)), ("SGD", dict(momentum=0.0, dampening=0.0, weight_decay=0.0)),
    ("SGD", dict(momentum=0.9, dampening=1.0)),
    ("RMSprop", dict(alpha=0.0)), ("RMSprop", dict(eps=0.0)), ("RMSprop", dict(alpha=1.0, centered=True)),
    ("Adam", dict(eps=0.0)), ("Adam", dict(betas=(0.0, 0.0))), ("Adam", dict(lr=0.0, weight_decay=0.0)),
    ("AdamW", dict(eps=0.0, weight_decay=0.0)), ("AdamW", dict(betas=(0.0, 0.5), amsgrad=True)),
], ids=str)
def test_the_edges_torch_accepts_are_accepted_and_step_as_torch(name, kwargs):
    """The bounds of each range, where torch accepts them (eps=0, betas of 0, lr=0, ...): a check
    made strict (``eps > 0``) would refuse what torch steps, and no other test uses these values."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p0, grads = rng.standard_normal(40), rng.standard_normal((3, 40))
    p, opt = p0.copy(), getattr(flatopt, name)(**kwargs)
    tp = torch.nn.Parameter(torch.tensor(p0))
    topt = getattr(torch.optim, name)([tp], foreach=False, **kwargs)
    for g in grads:
        opt.step(p, g.copy())
        tp.grad = torch.tensor(g)
        topt.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cls, kwargs, message", TORCH_MESSAGES)
def test_bad_hyperparameter_set_between_steps_modifies_nothing(cls, kwargs, message):
    opt, params, grads = cls(lr=1e-2), rand(30), rand(30, seed=1)
    opt.step(params, grads)
    before, p_before = snapshot(opt), params.copy()
    for key, value in kwargs.items():
        setattr(opt, key, value)
    with pytest.raises(ValueError, match="Invalid|Nesterov"):
        opt.step(params, grads)
    assert_same(snapshot(opt), before)
    np.testing.assert_array_equal(params, p_before)


@pytest.mark.parametrize("cls", [flatopt.Adam, flatopt.ADOPT])
@pytest.mark.parametrize("betas,error", [((0.9,), ValueError), ((0.9, 0.99, 0.5), ValueError), (0.9, TypeError),
                                         (None, TypeError), ("ab", TypeError)])
def test_betas_must_be_a_pair(cls, betas, error):
    """torch.optim.Adam takes three betas at construction and fails at its first step
    (``beta1, beta2 = group["betas"]``); flatopt refuses them up front, with the exception type
    torch's own failure has where betas is not a sequence ("'float' object is not subscriptable")."""
    with pytest.raises(error, match="betas must be a pair"):
        cls(betas=betas)


@pytest.mark.parametrize("clip", [3, 0.5, "t**0.25"])
def test_adopt_clip_lambda_must_be_callable_or_none(clip):
    """A number is refused at construction, not at the second call (``clip(t)`` on a number)."""
    with pytest.raises(TypeError, match="clip_lambda must be a callable"):
        flatopt.ADOPT(clip_lambda=clip)


def test_bad_group_override_and_negative_callable_lr_modify_nothing():
    params, grads = rand(20), rand(20, seed=1)
    opt = flatopt.Adam(param_groups=[dict(start=0, stop=10), dict(start=10, stop=20, lr=1e-3)])
    opt.step(params, grads)
    before, p_before = snapshot(opt), params.copy()
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        opt.step(params, grads)
    assert_same(snapshot(opt), before)
    np.testing.assert_array_equal(params, p_before)
    opt = flatopt.SGD(lr=lambda t: 0.1 - 0.05 * t)
    for _ in range(3):
        opt.step(params, grads)
    p_before = params.copy()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.step(params, grads)  # lr(2) = 0.0 was fine, lr(3) < 0 is not
    np.testing.assert_array_equal(params, p_before)


@pytest.mark.parametrize("groups, exc, words", [
    ([dict(start=0, stop=10), dict(start=5, stop=20)], ValueError, "overlap"),
    ([dict(start=10, stop=20), dict(start=0, stop=10)], ValueError, "sorted"),
    ([dict(start=0, stop=10, learning_rate=1.0)], ValueError, "unknown keys"),
    ([dict(start=5, stop=5)], ValueError, "start < stop"),
    ([dict(start=0)], ValueError, "stop"),
    ([dict(start=0.0, stop=3)], TypeError, "int"),
    ([(0, 10)], TypeError, "dict"),
])
def test_bad_param_groups(groups, exc, words):
    with pytest.raises(exc, match=words):
        flatopt.Adam(param_groups=groups)


def test_groups_beyond_the_buffer_raise_at_step_and_modify_nothing():
    params, grads = rand(20), rand(20, seed=1)
    opt = flatopt.Adam(param_groups=[dict(start=0, stop=25)])
    with pytest.raises(ValueError, match="25"):
        opt.step(params, grads)
    assert opt.state == {} and opt.group_state == [{"step": 0}]


@pytest.mark.parametrize("kwargs, words", [
    (dict(k=0), "k"), (dict(k=2.5), "k"), (dict(k=True), "k"), (dict(alpha=-0.1), "alpha"), (dict(alpha=1.5), "alpha"),
    # (these raised Python's or NumPy's own errors about comparisons, and True was taken as 1)
    (dict(alpha=None), "alpha"), (dict(alpha="0.5"), "alpha"), (dict(alpha=1 + 0j), "alpha"),
    (dict(alpha=np.array([0.5, 0.5])), "alpha"), (dict(alpha=True), "alpha")])
def test_lookahead_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=f"Invalid {words}"):
        flatopt.Lookahead(flatopt.SGD(), **kwargs)


@pytest.mark.parametrize("side", ["after", "before"], ids=["joining after", "joining before"])
@pytest.mark.parametrize("join", ["unfrozen", "a group assigned over them"])
def test_lookahead_elements_that_join_later_start_their_slow_weights_then(join, side):
    """Elements a frozen group held (or no group), given new values, then stepped: their slow
    weights were the copy taken at the very first step, to which the next sync pulled them
    halfway back.  They now start from their values at the step they join, as a torch
    parameter added to a group (flatopt.torch's Lookahead): the run equals two Lookaheads, one
    over the elements stepped from the start, one over the others from their first step.  The
    elements that join lie after those stepped from the start, or before them (a stepped range
    that grows to the left)."""
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(8) for _ in range(8)]
    params = rng.standard_normal(8)
    old, new = (slice(0, 4), slice(4, 8)) if side == "after" else (slice(4, 8), slice(0, 4))
    stepped = {"start": old.start, "stop": old.stop}
    joining = {"start": new.start, "stop": new.stop}
    groups = sorted([stepped] + ([dict(joining, frozen=True)] if join == "unfrozen" else []), key=lambda g: g["start"])
    la = flatopt.Lookahead(flatopt.Adam(lr=0.1, param_groups=groups), k=2, alpha=0.5)
    first = (flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2, alpha=0.5), params[old].copy())
    later = (flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2, alpha=0.5), rng.standard_normal(4))
    for t, g in enumerate(grads):
        if t == 2:  # (after an even count: the second Lookahead's syncs fall on the same steps)
            params[new] = later[1]  # new values while left alone (pretrained ones, say)
            if join == "unfrozen":
                la.inner.param_groups[groups.index(dict(joining, frozen=True))]["frozen"] = False
            else:
                la.inner.param_groups = sorted([stepped, joining], key=lambda g: g["start"])
        la.step(params, g)
        first[0].step(first[1], g[old].copy())
        if t >= 2:
            later[0].step(later[1], g[new].copy())
    expected, expected_slow = np.empty(8), np.empty(8)
    expected[old], expected[new] = first[1], later[1]
    expected_slow[old], expected_slow[new] = first[0].slow, later[0].slow
    np.testing.assert_array_equal(params, expected)
    np.testing.assert_array_equal(la.slow, expected_slow)


def test_lookahead_a_stepped_range_that_grows_to_the_left_starts_the_new_elements_slow_weights_then():
    """A group over [4, 8) assigned anew as one group over [0, 8): the elements it gained start
    their slow weights from their values at that step, those it had keep theirs, as two
    Lookaheads would.  (Plain SGD: no state that the reassigned group carries over.)"""
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(8) for _ in range(8)]
    params = rng.standard_normal(8)
    la = flatopt.Lookahead(flatopt.SGD(lr=0.1, param_groups=[{"start": 4, "stop": 8}]), k=2, alpha=0.5)
    first = (flatopt.Lookahead(flatopt.SGD(lr=0.1), k=2, alpha=0.5), params[4:].copy())
    later = (flatopt.Lookahead(flatopt.SGD(lr=0.1), k=2, alpha=0.5), rng.standard_normal(4))
    for t, g in enumerate(grads):
        if t == 2:
            params[:4] = later[1]
            la.inner.param_groups = [{"start": 0, "stop": 8}]
        la.step(params, g)
        first[0].step(first[1], g[4:].copy())
        if t >= 2:
            later[0].step(later[1], g[:4].copy())
    np.testing.assert_array_equal(params, np.concatenate([later[1], first[1]]))
    np.testing.assert_array_equal(la.slow, np.concatenate([later[0].slow, first[0].slow]))


def test_lookahead_a_refused_step_takes_no_slow_weights_for_elements_that_join():
    la, params = flatopt.Lookahead(flatopt.SGD(lr=0.1, param_groups=[{"start": 0, "stop": 4}]), k=2), rand(8)
    la.step(params, rand(8, seed=1))
    params[4:] = 7.0
    la.inner.param_groups = [{"start": 0, "stop": 4}, {"start": 4, "stop": 8}]
    slow = la.slow.copy()
    la.inner.lr = -1.0
    with pytest.raises(ValueError, match="learning rate"):
        la.step(params, rand(8, seed=2))
    np.testing.assert_array_equal(la.slow, slow)


def test_lookahead_needs_a_flatopt_optimizer_and_checks_changed_attributes():
    with pytest.raises(TypeError, match="flatopt optimizer"):
        flatopt.Lookahead(object())
    opt, params, grads = flatopt.Lookahead(flatopt.Adam()), rand(10), rand(10, seed=1)
    opt.step(params, grads)
    before, p_before = snapshot(opt), params.copy()
    opt.alpha = 2.0
    with pytest.raises(ValueError, match="alpha"):
        opt.step(params, grads)
    assert_same(snapshot(opt), before)
    np.testing.assert_array_equal(params, p_before)


def test_failed_first_step_leaves_no_state_and_no_slow_weights():
    opt = flatopt.Lookahead(flatopt.Adam())
    opt.inner.lr = -1.0
    with pytest.raises(ValueError):
        opt.step(rand(10), rand(10, seed=1))
    assert opt.slow is None and opt.step_count == 0 and opt.inner.state == {}


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_dropped_optimizer_frees_its_state_at_once(name):
    """``opt.state`` held its optimizer (to tell it of edits), which held it: a cycle, so a
    dropped optimizer's buffers (Adam's: twice the parameters) lived until the garbage
    collector's next full pass, never where a job turns the collector off.  Freed at ``del``
    now, as torch.optim's state is."""
    import weakref
    opt, params = MAKERS[name](), rand(1000)
    opt.step(params, rand(1000, seed=1))
    inner = opt.inner if isinstance(opt, flatopt.Lookahead) else opt
    buffers = [weakref.ref(b) for b in inner.state.values()] + [weakref.ref(opt)]
    del inner
    with collector_off():
        del opt
        assert [r() for r in buffers] == [None] * len(buffers)


# --- checkpoints ---------------------------------------------------------------------------------
def plain(obj):
    """Only plain Python and NumPy data."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(plain(v) for v in obj)
    return obj is None or isinstance(obj, (bool, int, float, str, np.ndarray))


def via_pickle(sd):
    return pickle.loads(pickle.dumps(sd))


def via_savez(sd):
    buffer = io.BytesIO()
    np.savez(buffer, **sd)
    buffer.seek(0)
    return dict(np.load(buffer, allow_pickle=True))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transport", [lambda sd: sd, via_pickle, via_savez], ids=["direct", "pickle", "savez"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_save_load_continue_is_bit_identical(name, transport, dtype):
    grads = [rand(300, dtype, seed=s) for s in range(12)]
    p0 = rand(300, dtype, seed=99)
    straight, params = MAKERS[name](), p0.copy()
    for g in grads:
        straight.step(params, g)
    first, resumed = MAKERS[name](), p0.copy()
    for g in grads[:7]:
        first.step(resumed, g)
    sd = first.state_dict()
    assert plain(sd)
    second = MAKERS[name]()
    second.load_state_dict(transport(sd))
    for g in grads[7:]:
        second.step(resumed, g)
    np.testing.assert_array_equal(resumed, params)


@pytest.mark.parametrize("transport", [lambda sd: sd, via_pickle, via_savez], ids=["direct", "pickle", "savez"])
@pytest.mark.parametrize("edit_before_save", [False, True], ids=["unfrozen after the load", "unfrozen before the save"])
def test_lookahead_checkpoint_keeps_which_elements_the_last_step_synced(transport, edit_before_save):
    """Elements a frozen group held join at the first step after a load: they start their slow
    weights then, as in the run never interrupted (which the test above checks against two
    Lookaheads), also where the group was unfrozen after the last step and before the save."""
    rng = np.random.default_rng(11)
    grads = [rng.standard_normal(8) for _ in range(6)]
    p0 = rng.standard_normal(8)

    def make():
        groups = [{"start": 0, "stop": 4}, {"start": 4, "stop": 8}]
        return flatopt.Lookahead(flatopt.SGD(lr=0.1, param_groups=groups), k=3, alpha=0.5)

    def run(resume):
        la, params = make(), p0.copy()
        for t, g in enumerate(grads):
            if t == 2:
                la.inner.param_groups[1]["frozen"] = True
            if t == 4:
                if edit_before_save:
                    la.inner.param_groups[1]["frozen"] = False
                if resume:
                    sd = la.state_dict()
                    assert plain(sd)
                    la = make()
                    la.load_state_dict(transport(sd))
                la.inner.param_groups[1]["frozen"] = False
            la.step(params, g)
        return params, la.slow

    straight, resumed = run(False), run(True)
    np.testing.assert_array_equal(resumed[0], straight[0])
    np.testing.assert_array_equal(resumed[1], straight[1])


def test_lookahead_checkpoint_saved_before_it_had_synced_ranges_still_loads():
    """A checkpoint without ``synced`` (saved by flatopt before it kept them) loads: every range
    its groups step is then taken to have slow weights already."""
    la, params = flatopt.Lookahead(flatopt.SGD(lr=0.1), k=2), rand(8, np.float64)
    la.step(params, rand(8, np.float64, seed=1))
    sd = la.state_dict()
    assert sd["synced"] == [[0, 8]]
    del sd["synced"]
    other = flatopt.Lookahead(flatopt.SGD(lr=0.1), k=2)
    other.load_state_dict(sd)
    p1, p2 = params.copy(), params.copy()
    for seed in (2, 3, 4):
        la.step(p1, rand(8, np.float64, seed=seed))
        other.step(p2, rand(8, np.float64, seed=seed))
    np.testing.assert_array_equal(p1, p2)


def test_state_dict_is_a_copy():
    opt, params, grads = flatopt.Adam(), rand(10), rand(10, seed=1)
    opt.step(params, grads)
    sd = opt.state_dict()
    sd["state"]["exp_avg"][:] = 123
    assert not np.any(opt.state["exp_avg"] == 123)


def corrupt(sd, how):
    sd = pickle.loads(pickle.dumps(sd))
    if how == "kind":
        sd["optimizer"] = "SGD"
    elif how == "missing key":
        del sd["group_state"]
    elif how == "extra key":
        sd["extra"] = 1
    elif how == "unknown buffer":
        sd["state"]["momentum"] = sd["state"]["exp_avg"]
    elif how == "lengths differ":
        sd["state"]["exp_avg"] = sd["state"]["exp_avg"][:-1]
    elif how == "2-D buffer":
        sd["state"]["exp_avg"] = sd["state"]["exp_avg"].reshape(2, -1)
    elif how == "integer buffer":
        sd["state"]["exp_avg"] = sd["state"]["exp_avg"].astype(np.int32)
    elif how == "group state count":
        sd["group_state"].append({"step": 1})
    elif how == "group state entry":
        sd["group_state"][0]["momentum_started"] = True
    elif how == "fractional step":
        sd["group_state"][0]["step"] = 1.5
    elif how == "groups beyond the buffers":
        sd["param_groups"] = [{"start": 0, "stop": 12}]
    elif how == "bad hyperparameter":
        sd["hyperparameters"]["betas"] = (0.9, 1.5)
    elif how == "unknown hyperparameter":
        sd["hyperparameters"]["momentum"] = 0.9
    return sd


BAD_CHECKPOINTS = [  # (how corrupt() spoils it, the error, words of its message)
    ("kind", ValueError, "state_dict is for SGD, not Adam"),
    ("missing key", ValueError, "state_dict keys .* do not match"),
    ("extra key", ValueError, "state_dict keys .* do not match"),
    ("unknown buffer", ValueError, r"unknown state buffers \['momentum'\]"),
    ("lengths differ", ValueError, "state buffers must be 1-D and of one length"),
    ("2-D buffer", ValueError, "state buffers must be 1-D and of one length"),
    ("integer buffer", TypeError, "state buffers must share one dtype, float32 or float64"),
    ("group state count", ValueError, "state_dict has 2 group states for 1 param groups"),
    ("group state entry", ValueError, "invalid group state"),
    ("fractional step", ValueError, "invalid group state"),
    ("groups beyond the buffers", ValueError, "param groups reach beyond its state buffers"),
    ("bad hyperparameter", ValueError, "Invalid beta parameter at index 1"),
    ("unknown hyperparameter", ValueError, r"unknown hyperparameters \['momentum'\]"),
]


@pytest.mark.parametrize("how, error, words", BAD_CHECKPOINTS, ids=[how for how, _, _ in BAD_CHECKPOINTS])
def test_load_state_dict_rejects_bad_checkpoints_and_changes_nothing(how, error, words):
    source, params = flatopt.Adam(lr=0.1), rand(10)
    source.step(params, rand(10, seed=1))
    target = flatopt.Adam(lr=0.5)
    target.step(rand(10), rand(10, seed=2))
    before, lr = snapshot(target), target.lr
    with pytest.raises(error, match=words):
        target.load_state_dict(corrupt(source.state_dict(), how))
    assert_same(snapshot(target), before)
    assert target.lr == lr


def test_lookahead_checkpoint_rejects_mismatched_slow_weights():
    source, params = flatopt.Lookahead(flatopt.Adam()), rand(10)
    source.step(params, rand(10, seed=1))
    sd = source.state_dict()
    sd["slow"] = sd["slow"][:5]
    target = flatopt.Lookahead(flatopt.Adam())
    with pytest.raises(ValueError, match="slow"):
        target.load_state_dict(sd)
    assert target.slow is None and target.inner.state == {}


def test_loaded_dtype_must_match_params():
    source = flatopt.Adam()
    source.step(rand(10, np.float32), rand(10, np.float32, seed=1))
    target = flatopt.Adam()
    target.load_state_dict(source.state_dict())
    with pytest.raises(TypeError, match="dtype"):
        target.step(rand(10, np.float64), rand(10, np.float64, seed=1))


def test_callable_lr_is_not_saved_and_the_loader_keeps_its_own():
    schedule = lambda t: 0.1 / (t + 1)
    source = flatopt.SGD(lr=schedule)
    source.step(rand(5), rand(5, seed=1))
    sd = source.state_dict()
    assert "lr" not in sd["hyperparameters"]
    pickle.dumps(sd)
    target = flatopt.SGD(lr=0.3)
    target.load_state_dict(sd)
    assert target.lr == 0.3


# --- groups ---------------------------------------------------------------------------------------
@SWEEP
@given(cuts=st.lists(st.integers(1, 60), min_size=1, max_size=5),
       frozen=st.lists(st.booleans(), min_size=5, max_size=5), gap=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_groups_equal_separate_optimizers(cuts, frozen, gap, dtype):
    overrides = [dict(lr=1e-2), dict(lr=3e-2, weight_decay=0.1), dict(betas=(0.5, 0.9), amsgrad=True),
                 dict(lr=1e-3, eps=1e-3), dict(maximize=True)]
    groups, start = [], 0
    for i, size in enumerate(cuts):
        start += 3 if gap else 0  # elements outside every group must be left alone
        groups.append(dict(start=start, stop=start + size, frozen=frozen[i], **overrides[i]))
        start += size
    n = start + 2
    p0, grads = rand(n, dtype), [rand(n, dtype, seed=s) for s in range(1, 9)]
    opt, params = flatopt.AdamW(lr=5e-3, param_groups=groups), p0.copy()
    for g in grads:
        opt.step(params, g)
    expected = p0.copy()
    for group in groups:
        a, b = group["start"], group["stop"]
        if group["frozen"]:
            continue
        kw = {k: v for k, v in group.items() if k not in ("start", "stop", "frozen")}
        single, part = flatopt.AdamW(**{"lr": 5e-3, **kw}), expected[a:b].copy()
        for g in grads:
            single.step(part, g[a:b].copy())
        expected[a:b] = part
    np.testing.assert_array_equal(params, expected)
    for group, state in zip(groups, opt.group_state):
        assert state["step"] == (0 if group["frozen"] else len(grads))
        if group["frozen"] and opt.state:
            np.testing.assert_array_equal(opt.state["exp_avg"][group["start"]:group["stop"]], 0)


def test_frozen_toggle_keeps_state_bits():
    p0, grads = rand(64), [rand(64, seed=s) for s in range(1, 6)]
    opt, params = flatopt.Adam(param_groups=[dict(start=0, stop=32), dict(start=32, stop=64)]), p0.copy()
    opt.step(params, grads[0])
    opt.param_groups[1]["frozen"] = True
    frozen_state = {k: v[32:].copy() for k, v in opt.state.items()}
    frozen_params = params[32:].copy()
    opt.step(params, grads[1])
    opt.step(params, grads[2])
    for k, v in opt.state.items():
        np.testing.assert_array_equal(v[32:], frozen_state[k])
    np.testing.assert_array_equal(params[32:], frozen_params)
    assert [s["step"] for s in opt.group_state] == [3, 1]
    opt.param_groups[1]["frozen"] = False
    opt.step(params, grads[3])
    assert [s["step"] for s in opt.group_state] == [4, 2]


@needs_threads
@pytest.mark.parametrize("name", ["SGD-nesterov", "RMSprop-centered-momentum", "Adam-amsgrad", "ADOPT-decouple"])
def test_parallel_path_equals_serial_path(name, monkeypatch):
    n = 3 * CPU.parallel_min + 7
    groups = [dict(start=0, stop=5), dict(start=5, stop=n // 2 + 3, lr=3e-3), dict(start=n // 2 + 3, stop=n)]
    p0, grads = rand(n), [rand(n, seed=s) for s in range(1, 5)]
    results = []
    for parallel_min in (CPU.parallel_min, 10**12):
        monkeypatch.setattr(CPU, "parallel_min", parallel_min)
        opt, params = MAKERS[name](), p0.copy()
        opt.param_groups = groups
        for g in grads:
            opt.step(params, g)
        results.append(params)
        assert opt._planned[1][1] is (parallel_min == CPU.parallel_min and parallel_min < n)
    np.testing.assert_array_equal(results[0], results[1])


def test_changing_hyperparameters_never_recompiles():
    opt, params = flatopt.Adam(), rand(100)
    opt.step(params, rand(100, seed=1))
    compiled = len(kernels.run_serial.overloads), len(kernels._compiled)
    for i in range(20):
        opt.lr, opt.betas, opt.weight_decay, opt.amsgrad = 10.0 ** -(i % 5), (0.5 + i / 50, 0.99), i / 100, i % 2 == 0
        opt.step(params, rand(100, seed=i))
    assert (len(kernels.run_serial.overloads), len(kernels._compiled)) == compiled


def test_callable_lr_receives_the_step_count():
    seen = []
    opt, params = flatopt.SGD(lr=lambda t: seen.append(t) or 0.1), rand(5)
    for _ in range(3):
        opt.step(params, rand(5, seed=1))
    assert seen[-3:] == [0, 1, 2]
    a, b = rand(50), rand(50)
    b[:] = a
    scheduled, manual = flatopt.Adam(lr=lambda t: 1e-2 / (1 + t)), flatopt.Adam()
    for t in range(10):
        g = rand(50, seed=t)
        scheduled.step(a, g)
        manual.lr = 1e-2 / (1 + t)
        manual.step(b, g)
    np.testing.assert_array_equal(a, b)


# --- state, dtypes, imports ---------------------------------------------------------------------------
@pytest.mark.parametrize("make, expected", [
    (lambda: flatopt.SGD(), set()), (lambda: flatopt.SGD(momentum=0.9), {"momentum_buffer"}),
    (lambda: flatopt.RMSprop(), {"square_avg"}),
    (lambda: flatopt.RMSprop(centered=True, momentum=0.1), {"square_avg", "momentum_buffer", "grad_avg"}),
    (lambda: flatopt.Adam(), {"exp_avg", "exp_avg_sq"}),
    (lambda: flatopt.AdamW(amsgrad=True), {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    (lambda: flatopt.ADOPT(), {"exp_avg", "exp_avg_sq"}),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_is_lazy_and_takes_the_params_dtype(make, expected, dtype):
    opt = make()
    assert opt.state == {}
    opt.step(rand(17, dtype), rand(17, dtype, seed=1))
    assert set(opt.state) == expected
    for buffer in opt.state.values():
        assert buffer.dtype == dtype and buffer.shape == (17,)


def test_defaults_are_torchs():
    torch = pytest.importorskip("torch")
    import inspect
    for name in ["SGD", "RMSprop", "Adam", "AdamW"]:
        ours = inspect.signature(getattr(flatopt, name)).parameters
        theirs = inspect.signature(getattr(torch.optim, name)).parameters
        for arg, param in ours.items():
            if arg in theirs and arg != "params":
                assert param.default == theirs[arg].default, (name, arg)


def test_import_flatopt_imports_no_framework():
    code = ("import sys, flatopt, numpy as np; flatopt.Adam().step(np.ones(4, np.float32), np.ones(4, np.float32));"
            "print(sorted(m for m in ('torch', 'jax', 'cupy', 'numba.cuda') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("cache_dir", [None, "set"])
def test_kernels_compile_in_every_process_where_nothing_can_be_cached(tmp_path, cache_dir):
    """A read-only install without a writable home: Numba finds no directory for its cache,
    and ``cache=True`` refused to define the kernels (the first step raised "cannot cache
    function ... no locator available").  They are compiled in every process instead, with a
    warning that names NUMBA_CACHE_DIR, and step as the cached ones do."""
    code = textwrap.dedent(f"""
        import tempfile, warnings
        def read_only(*args, dir=None, **kwargs):  # every directory Numba tries to cache in
            if dir is not None:
                raise PermissionError(13, "Read-only file system", dir)
            return real(*args, **kwargs)
        real, tempfile.TemporaryFile = tempfile.TemporaryFile, read_only
        import numpy as np, flatopt
        rng = np.random.default_rng(5)
        p, g = rng.standard_normal(1 << 16).astype(np.float32), rng.standard_normal(1 << 16).astype(np.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            flatopt.Adam(lr=0.1).step(p, g)
        from flatopt.kernels import cpu
        np.save({str(tmp_path / "p.npy")!r}, p)
        print(cpu.CACHE, sum("NUMBA_CACHE_DIR" in str(w.message) for w in caught),
              sum("is not a writable directory" in str(w.message) for w in caught))
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k != "NUMBA_CACHE_DIR"}
    if cache_dir:  # one the user chose, which cannot be written: the warning says so, not "set it"
        env["NUMBA_CACHE_DIR"] = str(tmp_path / "chosen")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(env, HOME=str(tmp_path)))
    assert done.stdout.split() == ["False", "1", "1" if cache_dir else "0"], done.stderr[-3000:]
    rng = np.random.default_rng(5)
    p, g = rng.standard_normal(1 << 16).astype(np.float32), rng.standard_normal(1 << 16).astype(np.float32)
    flatopt.Adam(lr=0.1).step(p, g)
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), p)
    assert kernels.CACHE  # this process caches (the kernels' directory or NUMBA_CACHE_DIR)


def test_numba_disable_jit_gets_a_clear_error_and_changes_nothing():
    """NUMBA_DISABLE_JIT=1 (set to debug one's own Numba code) turns off the compiler that
    flatopt's kernels need: the step says so before it allocates state or touches a buffer
    (it failed inside the kernel's launch, "<intrinsic _call_rule> is not usable in pure-python")."""
    code = textwrap.dedent("""
        import numpy as np, flatopt
        p, g = np.ones(100, np.float32), np.full(100, 0.5, np.float32)
        opt = flatopt.Adam()
        try:
            opt.step(p, g)
        except RuntimeError as error:
            print("NUMBA_DISABLE_JIT" in str(error), opt.state == {}, opt.group_state, bool((p == 1).all()))
    """)
    env = dict(__import__("os").environ, NUMBA_DISABLE_JIT="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.split() == ["True", "True", "[{'step':", "0}]", "True"], done.stderr[-3000:]


@needs_threads
def test_kernels_are_cached_on_disk(tmp_path):
    """The rules of both dtypes (two C callbacks of one function) and both drivers."""
    code = ("import flatopt, numpy as np; from flatopt.kernels import cpu; from flatopt.backend import CPU;"
            "[flatopt.Adam().step(np.ones(8, t), np.ones(8, t)) for t in (np.float32, np.float64)];"
            "CPU.parallel_min = 1; flatopt.Adam().step(np.ones(8), np.ones(8));"
            "print(sum(cpu.compiled_rule('adam', t).cache_hits for t in (np.float32, np.float64)),"
            "     sum(cpu.run_serial.stats.cache_hits.values()), sum(cpu.run_parallel.stats.cache_hits.values()))")
    env = dict(__import__("os").environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
            for _ in range(2)]
    assert runs[0].split() == ["0", "0", "0"] and runs[1].split() == ["2", "2", "1"]


def test_threads_first_steps_share_one_compiled_rule(tmp_path):
    """Eight threads take their first steps at once in a fresh process: one C callback per
    rule and dtype (a second one would be dropped while a driver still calls its address)."""
    code = textwrap.dedent("""
        import threading, numpy as np, flatopt
        from flatopt.kernels import cpu
        barrier, rules, sums = threading.Barrier(8), [], []
        def first_step():
            barrier.wait()
            rules.append(cpu.compiled_rule("sgd", np.float64))
            p = np.ones(64)
            flatopt.SGD(lr=0.5).step(p, np.ones(64))
            sums.append(float(p.sum()))
        threads = [threading.Thread(target=first_step) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(len({id(r) for r in rules}), len(cpu._compiled), sorted(set(sums)))
    """)
    env = dict(__import__("os").environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["1", "1", "[32.0]"]


def test_threaded_steps_from_several_threads_on_numbas_workqueue_layer():
    """Numba's workqueue layer (its fallback without OpenMP or TBB) aborts the process when two
    threads launch parallel work at once; threaded steps from four Python threads there run
    one at a time, each with the result it has alone."""
    out = in_workqueue_process("""
        import threading, numpy as np, flatopt
        from flatopt.backend import CPU
        n, start = 1 << 19, threading.Barrier(4)
        def run(seed, out, together=False):
            rng = np.random.default_rng(seed)
            p, grads = rng.standard_normal(n).astype(np.float32), rng.standard_normal((2, n)).astype(np.float32)
            opt = flatopt.Lookahead(flatopt.Adam(lr=1e-3), k=3) if seed % 2 else flatopt.RMSprop(lr=1e-3)
            if together:
                start.wait()
            for t in range(40):
                opt.step(p, grads[t % 2])
            out[seed] = p
        expected, got = {}, {}
        for seed in range(4):
            run(seed, expected)
        threads = [threading.Thread(target=run, args=(seed, got, True)) for seed in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(CPU.threaded(n), CPU.one_launch_at_a_time, all(np.array_equal(got[s], expected[s]) for s in range(4)))
    """)
    assert out == ["True", "True", "True"]


@pytest.mark.parametrize("make", [lambda: flatopt.Adam(lr=1e-3), lambda: flatopt.Lookahead(flatopt.SGD(momentum=0.9))],
                         ids=["Adam", "Lookahead"])
def test_one_optimizer_stepped_on_buffers_of_two_lengths_from_two_threads_never_writes_beyond_them(make, monkeypatch):
    """One optimizer is for one thread at a time, but a user's mistake must not write beyond a
    buffer: a first step on 40000 elements that another thread's first step on 1000 overtook
    (between its checks and its state) took that step's 1000-element state and cached plan, and
    its kernel wrote past them (heap corruption, 3 runs of 3 in an audit).  Now refused."""
    import threading
    opt, reached, overtaken = make(), threading.Event(), threading.Event()
    plan = CPU.plan

    def plan_after_the_other(segments):  # (the first thread, between its checks and its state)
        if threading.current_thread().name == "first":
            reached.set()
            assert overtaken.wait(60)
        return plan(segments)
    monkeypatch.setattr(CPU, "plan", plan_after_the_other)
    params, errors = np.zeros(40000, np.float32), []

    def first():
        try:
            opt.step(params, np.ones(40000, np.float32))
        except RuntimeError as error:
            errors.append(str(error))
    thread = threading.Thread(target=first, name="first")
    thread.start()
    assert reached.wait(60)
    other = np.zeros(1000, np.float32)
    opt.step(other, np.ones(1000, np.float32))
    overtaken.set()
    thread.join()
    assert len(errors) == 1 and "has 1000 elements but params 40000: another thread is stepping" in errors[0]
    assert not params.any() and other.all()


def test_one_launch_at_a_time_only_on_the_workqueue_layer():
    import numba
    numba.get_num_threads()
    assert CPU.one_launch_at_a_time == (numba.threading_layer() == "workqueue")
    driver, _, _ = CPU._kernel("adam", True, np.dtype(np.float32))
    if not CPU.one_launch_at_a_time and not backend._gnu_openmp_threads():
        assert driver is kernels.run_parallel  # Numba's own, with nothing in between


def test_threaded_drivers_run_serially_only_in_a_process_forked_after_gnu_openmp_threads(monkeypatch):
    """On GNU OpenMP a threaded driver is Numba's, behind a check of whether this process was
    forked after those threads had run; there it runs the same chunks on one thread."""
    if CPU.one_launch_at_a_time or not backend._gnu_openmp_threads():
        pytest.skip("Numba's threads here are not GNU OpenMP's")
    driver, _, _ = CPU._kernel("adam", True, np.dtype(np.float32))
    calls = []
    monkeypatch.setattr(kernels, "run_parallel", lambda *args: calls.append("threaded"))
    monkeypatch.setattr(kernels, "run_serial", lambda *args: calls.append("serial"))
    wrapped = backend._serial_after_fork(kernels.run_parallel, kernels.run_serial)
    wrapped()
    monkeypatch.setattr(backend, "_forked_after_threads", True)
    wrapped()
    assert calls == ["threaded", "serial"] and not CPU.threaded(1 << 24)
    assert driver.__code__ is wrapped.__code__  # the driver the backend hands out is such a one


FORK_SCRIPT = """
    import multiprocessing as mp, numpy as np, flatopt
    from flatopt import backend
    n = 1 << 20
    rng = np.random.default_rng(0)
    p0, grads = rng.standard_normal(n).astype(np.float32), 1e-3 * rng.standard_normal((4, n)).astype(np.float32)
    def make():
        return [flatopt.Adam(lr=1e-3), flatopt.Lookahead(flatopt.SGD(lr=1e-2, momentum=0.9), k=2),
                flatopt.RMSprop(lr=1e-3)]
    def steps(opts, ps, first, stop):
        for t in range(first, stop):
            for opt, p in zip(opts, ps):
                opt.step(p, grads[t % 4])
        return [p.copy() for p in ps]
    def child(conn, opts, ps):
        conn.send((backend.CPU.threaded(n), steps(opts, ps, 2 if THREADS_BEFORE else 0, 6),
                   steps(make(), [p0.copy() for _ in range(3)], 0, 6)))
    if __name__ == "__main__":
        opts, ps = make(), [p0.copy() for _ in range(3)]
        if THREADS_BEFORE:
            steps(opts, ps, 0, 2)  # threaded steps before the fork: ready to step again on threads
        ctx = mp.get_context("fork")
        theirs, ours = ctx.Pipe()
        worker = ctx.Process(target=child, args=(ours, opts, ps))
        worker.start()
        got = theirs.recv() if theirs.poll(60) else None
        worker.join(10)
        if not THREADS_BEFORE:
            steps(opts, ps, 0, 2)
        expected = steps(opts, ps, 2, 6), steps(make(), [p0.copy() for _ in range(3)], 0, 6)
        same = got is not None and all(np.array_equal(a, b) for a, b in zip(got[1] + got[2], expected[0] + expected[1]))
        print(worker.exitcode, backend.CPU.threaded(n), got and got[0], same, backend._gnu_openmp_threads())
"""


@needs_threads
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork() here")
def test_steps_in_a_process_forked_after_threaded_steps():
    """GNU OpenMP cannot start its threads again in a process forked after they had run, and
    Numba terminates such a process at its first threaded launch: a ``multiprocessing`` worker
    forked after its parent had stepped died, and the parent waited for it forever.  There the
    steps now run on one thread, those of optimizers stepped before the fork too, with the
    results the parent computes on two."""
    code = "THREADS_BEFORE = True\n" + textwrap.dedent(FORK_SCRIPT)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    exitcode, parent_threaded, child_threaded, same, gnu = done.stdout.split()
    assert (exitcode, parent_threaded, same) == ("0", "True", "True"), done.stderr[-3000:]
    assert child_threaded == ("False" if gnu == "True" else "True")


@needs_threads
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork() here")
def test_a_process_forked_before_any_threaded_step_keeps_its_threads():
    code = "THREADS_BEFORE = False\n" + textwrap.dedent(FORK_SCRIPT)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.stdout.split()[:4] == ["0", "True", "True", "True"], done.stderr[-3000:]


LOCKS_AT_FORK_SCRIPT = """
    import os, sys, threading, numpy as np, flatopt
    from flatopt import backend
    from flatopt.kernels import cpu, xla
    locks = [lambda: backend._launching, lambda: cpu._compiling, lambda: xla._registering]
    held, release = threading.Event(), threading.Event()
    def hold():  # another thread inside a launch, a compile and a registration at the fork
        for lock in locks:
            lock().acquire()
        held.set()
        release.wait()
        for lock in locks:
            lock().release()
    p, g = np.ones(1 << 16, np.float32), np.ones(1 << 16, np.float32)
    expected = p.copy()
    flatopt.Adam(lr=0.5).step(expected, g)  # compiled before the fork
    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    pid = os.fork()
    if pid == 0:
        free = all(lock().acquire(timeout=10) for lock in locks)
        opt = flatopt.Adam(lr=0.5)
        opt.step(p, g)  # a lookup of the compiled rule, and a (threaded or serial) launch
        os._exit(0 if free and np.array_equal(p, expected) else 1)
    release.set()
    holder.join()
    print(os.waitpid(pid, 0)[1])
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork() here")
def test_a_process_forked_while_another_thread_held_flatopts_locks_steps():
    """A process forked while another thread of its parent held the lock of the workqueue
    layer's launches, of the rule cache or of the XLA registration inherited it held, with no
    thread to release it: its first step waited forever."""
    code = textwrap.dedent(LOCKS_AT_FORK_SCRIPT)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["0"], done.stdout + done.stderr[-3000:]


@pytest.mark.parametrize("make", [lambda: flatopt.Adam(lr=0.1),
                                  lambda: flatopt.Adam(lr=0.1, param_groups=[{"start": 0, "stop": 60},
                                                                             {"start": 60, "stop": 100, "lr": 0.2}]),
                                  lambda: flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2),
                                  lambda: flatopt.Lookahead(flatopt.SGD(lr=0.1, momentum=0.9), k=1)],
                         ids=["adam", "adam, two groups", "lookahead", "lookahead of sgd, k=1"])
def test_a_ctrl_c_during_the_kernel_leaves_a_whole_step(make, ctrl_c_as_kernels_return):
    """A Ctrl-C that arrives while the kernel runs is raised as it returns, the parameters and
    buffers stepped: the counts were left behind (the next steps then used a wrong bias
    correction; a Lookahead's first step kept no slow weights).  Now the step's bookkeeping is
    done before the interrupt goes on: each interrupted step (the full one, then the prepared
    ones) leaves what a completed step leaves."""
    rng = np.random.default_rng(4)
    p0 = rng.standard_normal(100).astype(np.float32)
    grads = [rng.standard_normal(100).astype(np.float32) for _ in range(3)]
    reference, p_ref, expected = make(), p0.copy(), []
    for g in grads:
        reference.step(p_ref, g)
        expected.append((p_ref.copy(), snapshot(reference)))
    ctrl_c_as_kernels_return("adam", "sgd", "lookahead")
    opt, p = make(), p0.copy()
    for g, (p_expected, state_expected) in zip(grads, expected):
        with pytest.raises(KeyboardInterrupt):
            opt.step(p, g)
        np.testing.assert_array_equal(p, p_expected)
        assert_same(snapshot(opt), state_expected)


COMPILING_AT_FORK_SCRIPT = """
    import os, signal, sys, threading, time, numpy as np, flatopt
    from numba.core.compiler_lock import global_compiler_lock
    held = threading.Event()
    def compile_for_a_while():  # another thread inside a Numba compilation (a first step) at the fork
        with global_compiler_lock:
            held.set()
            time.sleep(0.5)
    flatopt.SGD(lr=0.5).step(np.ones(8), np.ones(8))  # flatopt imported and Numba loaded
    holder = threading.Thread(target=compile_for_a_while)
    holder.start()
    held.wait()
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)
        p, g = np.ones(1 << 16, np.float32), np.ones(1 << 16, np.float32)
        flatopt.Adam(lr=0.5).step(p, g)  # the child's first Adam step: Numba compiles or loads its rule
        os._exit(0 if np.all(p < 1) else 1)
    holder.join()
    print(os.waitpid(pid, 0)[1])
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork() here")
def test_a_process_forked_while_another_thread_compiled_steps():
    """A process forked while another thread held Numba's compiler lock (taking a first step)
    inherited it held, with no thread to release it: its own first step waited forever (here:
    until its alarm killed it).  The fork now waits for the compilation to end."""
    code = textwrap.dedent(COMPILING_AT_FORK_SCRIPT)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.stdout.split() == ["0"], done.stdout + done.stderr[-3000:]


def test_repr_names_the_hyperparameters():
    assert repr(flatopt.AdamW(lr=0.5)).startswith("AdamW(lr=0.5, betas=(0.9, 0.999)")
    assert "k=5" in repr(flatopt.Lookahead(flatopt.SGD()))


@pytest.mark.parametrize("make", [
    lambda lr, wd: flatopt.AdamW(lr=lr, weight_decay=wd),
    lambda lr, wd: flatopt.Adam(lr=lr, weight_decay=wd),
    lambda lr, wd: flatopt.ADOPT(lr=lr, weight_decay=wd, decouple=True),
    lambda lr, wd: flatopt.SGD(lr=lr, momentum=0.9, weight_decay=wd),
    lambda lr, wd: flatopt.RMSprop(lr=lr, weight_decay=wd),
])
def test_numpy_scalar_hyperparameters_act_as_python_floats(make):
    """``opt.lr = np.float32(...)`` (e.g. from a NumPy schedule) steps exactly as the same value as a float."""
    lr, wd = np.float32(3e-3), np.float32(0.02)
    rng = np.random.default_rng(5)
    p0, grads = rng.standard_normal(257).astype(np.float32), rng.standard_normal((4, 257)).astype(np.float32)
    results = []
    for args in ((lr, wd), (float(lr), float(wd))):
        opt, p = make(*args), p0.copy()
        for g in grads:
            opt.step(p, g)
        results.append(p)
    np.testing.assert_array_equal(results[0], results[1])


def test_numpy_scalar_lookahead_alpha_and_callable_lr_act_as_python_floats():
    rng = np.random.default_rng(6)
    p0, grads = rng.standard_normal(129), rng.standard_normal((6, 129))  # float64: float32 scalar math would show
    results = []
    for alpha, lr in ((np.float32(0.3), lambda t: np.float32(1e-2) * np.float32(0.9) ** t),
                      (float(np.float32(0.3)), lambda t: float(np.float32(1e-2) * np.float32(0.9) ** t))):
        opt, p = flatopt.Lookahead(flatopt.Adam(lr=lr), k=2, alpha=alpha), p0.copy()
        for g in grads:
            opt.step(p, g)
        results.append(p)
    np.testing.assert_array_equal(results[0], results[1])


def test_list_betas_are_kept_as_a_tuple():
    """A checked hyperparameter cannot change in place behind the step's back."""
    opt = flatopt.Adam(betas=[0.9, 0.99])
    assert opt.betas == (0.9, 0.99)
    opt.betas = [np.float32(0.5), 0.25]
    assert opt.betas == (0.5, 0.25) and type(opt.betas[0]) is float


@sweep(200)
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64) | st.booleans(),
                       min_size=12, max_size=12),
       dtype=st.sampled_from([np.float32, np.float64]), reuse=st.booleans())
def test_cpu_table_rounds_every_value_as_numpy_does(values, dtype, reuse):
    """The CPU table is refilled in place with a struct pack; its float32 rounding (and a finite
    double beyond float32's range, which NumPy turns into inf) must be NumPy's, bit for bit."""
    from flatopt.backend import CPU
    dtype = np.dtype(dtype)
    rows = [tuple(values[:6]), tuple(values[6:])]
    with np.errstate(over="ignore"):
        expected = np.array(rows, dtype=dtype)
    old = np.full((2, 6), 7.0, dtype) if reuse else None
    with np.errstate(over="ignore"):
        table = CPU.table(rows, dtype, old)
    assert table.dtype == dtype and table.shape == (2, 6)
    np.testing.assert_array_equal(table.view(f"u{dtype.itemsize}"), expected.view(f"u{dtype.itemsize}"))
    if reuse and np.all(np.isfinite(expected) | ~np.isfinite(np.array(rows, np.float64))):
        assert table is old  # refilled in place whenever no value overflows


@pytest.mark.parametrize("name", [n for n in MAKERS if not n.startswith("Lookahead")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_entries_are_every_row_entry_that_changes_with_the_step(name, dtype):
    """Between steps with unchanged hyperparameters only ``_set_step_entries`` runs, so every
    row entry it does not write must be the same at every step, and what it writes must be
    the row's value."""
    opt = MAKERS[name]()
    hp, dt = opt._resolve(None, 0), np.dtype(dtype).type
    rows, written = [], set()
    for t in range(6):
        state = dict(opt._new_group_state(), step=t)
        if "momentum_started" in state:
            state["momentum_started"] = t > 0
        row = opt._row(hp, state, dt)
        unset = object()
        probe = [unset] * len(row)
        opt._set_step_entries(probe, hp, state)
        entries = {i for i, v in enumerate(probe) if v is not unset}
        assert all(probe[i] == row[i] for i in entries)
        written |= entries
        rows.append(row)
    fixed = [i for i in range(len(rows[0])) if i not in written]
    assert all([row[i] for i in fixed] == [rows[0][i] for i in fixed] for row in rows)
    if name.startswith(("Adam", "ADOPT", "SGD-")):  # bias corrections, clip schedule, first momentum step
        assert written and (rows[1] != rows[2] or rows[0] != rows[1])


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickled_or_copied_optimizer_continues_bit_identically(name, how):
    """An optimizer object pickled (or deep-copied) mid-run steps on exactly as the original."""
    import copy
    opt, params = MAKERS[name](), rand(50)
    grads = [rand(50, seed=s) for s in range(1, 7)]
    for g in grads[:3]:
        opt.step(params, g)
    clone = pickle.loads(pickle.dumps(opt)) if how == "pickle" else copy.deepcopy(opt)
    cloned_params = params.copy()
    for g in grads[3:]:
        opt.step(params, g)
        clone.step(cloned_params, g)
    np.testing.assert_array_equal(cloned_params, params)
    inner, cloned_inner = getattr(opt, "inner", opt), getattr(clone, "inner", clone)
    assert cloned_inner.group_state == inner.group_state
    for key, buf in inner.state.items():
        np.testing.assert_array_equal(cloned_inner.state[key], buf)


@pytest.mark.parametrize("make", [lambda: flatopt.Adam(lr=0.1, amsgrad=True),
                                  lambda: flatopt.SGD(lr=0.1, momentum=0.9),
                                  lambda: flatopt.Lookahead(flatopt.Adam(lr=0.1), k=2)],
                         ids=["Adam(amsgrad)", "SGD(momentum)", "Lookahead(Adam)"])
def test_a_checkpoint_is_a_snapshot_and_a_load_takes_a_copy(make):
    """A checkpoint taken, then more steps: the checkpoint does not change (buffers, step
    counts, slow weights).  A checkpoint loaded, then edited: the loaded optimizer does not see
    the edit."""
    import copy
    opt, params = make(), rand(12, np.float64)
    grads = [rand(12, np.float64, seed=s) for s in range(1, 7)]
    for g in grads[:3]:
        opt.step(params, g)
    checkpoint = opt.state_dict()
    kept = copy.deepcopy(checkpoint)
    for g in grads[3:]:
        opt.step(params, g)
    assert_same(checkpoint, kept)
    loaded, twin = make(), make()
    loaded.load_state_dict(checkpoint)
    twin.load_state_dict(kept)
    inner = checkpoint["inner"] if "inner" in checkpoint else checkpoint
    for value in [*inner["state"].values(), *([checkpoint["slow"]] if "slow" in checkpoint else [])]:
        value[:] = 1e6  # an edit of the checkpoint after the load
    p1, p2 = params.copy(), params.copy()
    for g in grads[3:]:
        loaded.step(p1, g)
        twin.step(p2, g)
    np.testing.assert_array_equal(p1, p2)


def test_lookahead_load_restores_k_and_alpha():
    lookahead, params = flatopt.Lookahead(flatopt.SGD(lr=0.1), k=3, alpha=0.3), rand(8, np.float64)
    lookahead.step(params, rand(8, np.float64, seed=1))
    other = flatopt.Lookahead(flatopt.SGD(lr=0.1), k=5, alpha=0.8)
    other.load_state_dict(lookahead.state_dict())
    assert (other.k, other.alpha, other.step_count) == (3, 0.3, 1)


@SWEEP
@given(counts=st.lists(st.sampled_from([0.0, 1.0, 7.0, 2.0**24 - 1, 2.0**24, 2.0**24 + 2, 3e9, 2.0**53]), min_size=1,
                       max_size=12),
       cuts=st.sets(st.integers(0, 12)), taken=st.lists(st.booleans(), min_size=13, max_size=13),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_advance_counts_adds_one_per_span_as_numpy_does(counts, cuts, taken, dtype):
    """flatopt.torch's per-parameter step counts (float32, as torch's ``state["step"]``, or
    float64 under a float64 default dtype) advance in one compiled call: against NumPy's add in
    that dtype on each span's slice, counts beyond 2^24 and 2^53 included (where the sums
    round), whether a span started at 0, and whether a span's count now stays where it is when
    one is added (2^24 in float32).  Spans as flatopt.torch makes them: disjoint, in order, not
    always adjacent."""
    n = len(counts)
    bounds = sorted({0, n, *(c for c in cuts if c < n)})
    spans = [span for span, take in zip(zip(bounds, bounds[1:]), taken) if take]
    ours, ref = np.array(counts, dtype), np.array(counts, dtype)
    fresh = any(ref[first] == 0 for first, _ in spans)
    for first, last in spans:
        np.add(ref[first:last], dtype(1), out=ref[first:last])
    stuck = any(ref[first] + dtype(1) == ref[first] for first, _ in spans)
    found = kernels.advance_counts(ours, np.array(spans, np.int64).reshape(-1, 2))
    assert found == fresh * kernels.COUNT_STARTED + stuck * kernels.COUNT_STUCK
    assert ours.tobytes() == ref.tobytes()
