"""flatopt's core against independent references: torch.optim, optax, pytorch-optimizer's
Lookahead, the seed's Lookahead wrapper, and float64 NumPy transcriptions of the formulas.

Exactness expected and asserted:
* SGD: bitwise equal to ``torch.optim.SGD(foreach=False)``, float32 and float64.
* Adam/AdamW: bitwise equal to torch's ``fused=True`` kernel on lengths that are a multiple
  of 16 (torch's fused CPU kernel rounds its last ``n % 16`` elements on a scalar path).
  Against ``foreach=False`` they differ only through torch's MKL-VML ``sqrt``, which is not
  correctly rounded: a few ulps.
* RMSprop: bitwise equal to torch's single-tensor rule run with a correctly rounded square
  root (torch's own CPU ``sqrt``, MKL-VML's, is not: against it, a few ulps).
* Lookahead(SGD): bitwise equal to the seed's reference wrapper.
"""
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import flatopt

torch = pytest.importorskip("torch")
from seed_lookahead import SeedLookahead  # noqa: E402 - the seed's reference wrapper, needs torch
from conftest import assert_f32_like_plain_float32, correctly_rounded_sqrt, sweep  # noqa: E402

DTYPES = [np.float32, np.float64]
SWEEP = sweep(12)  # (FLATOPT_SWEEP_EXAMPLES runs it deeper: see conftest.sweep)


def max_ulp(got, ref):
    """Max |got - ref| measured in ulps of max|ref| in ref's dtype (robust near zero)."""
    ref = np.asarray(ref)
    unit = np.spacing(np.max(np.abs(ref)).astype(ref.dtype))
    return float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))) / unit)


def data(n, steps, dtype, seed=0):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(steps)]
    return p0, grads


def run_pair(opt, torch_cls, torch_kwargs, n, steps, dtype, lrs=None, seed=0, **torch_extra):
    """Same gradients through flatopt and torch; the lr schedule is applied to both."""
    p0, grads = data(n, steps, dtype, seed)
    params = p0.copy()
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch_cls([tp], **torch_kwargs, **torch_extra)
    for i, g in enumerate(grads):
        if lrs is not None:
            opt.lr = lrs[i]
            topt.param_groups[0]["lr"] = lrs[i]
        opt.step(params, g)
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
    return params, tp.detach().numpy()


# --- SGD: bitwise -------------------------------------------------------------------------
@SWEEP
@given(n=st.sampled_from([1, 2, 7, 16, 33, 1000, 4097]),
       momentum=st.sampled_from([0.0, 0.5, 0.9]), dampening=st.sampled_from([0.0, 0.1]),
       nesterov=st.booleans(), weight_decay=st.sampled_from([0.0, 1e-2, 0.3]), maximize=st.booleans(),
       dtype=st.sampled_from(DTYPES))
def test_sgd_bitwise_equal_to_torch(n, momentum, dampening, nesterov, weight_decay, maximize, dtype):
    assume(not (nesterov and (momentum == 0 or dampening != 0)))  # (torch refuses those: a draw that tests nothing)
    kw = dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay, maximize=maximize)
    lrs = [0.05 * (1 + 0.5 * math.sin(i)) for i in range(50)]
    got, ref = run_pair(flatopt.SGD(lr=0.05, **kw), torch.optim.SGD, dict(lr=0.05, **kw), n, 50, dtype,
                        lrs=lrs, foreach=False)
    np.testing.assert_array_equal(got, ref)


def test_sgd_bitwise_large_parallel_path():
    kw = dict(momentum=0.9, nesterov=True, weight_decay=1e-4)
    got, ref = run_pair(flatopt.SGD(lr=0.01, **kw), torch.optim.SGD, dict(lr=0.01, **kw), 100_003, 5,
                        np.float32, foreach=False)
    np.testing.assert_array_equal(got, ref)


# --- Adam / AdamW -------------------------------------------------------------------------
ADAM_OPTIONS = st.fixed_dictionaries(dict(
    amsgrad=st.booleans(), maximize=st.booleans(), weight_decay=st.sampled_from([0.0, 1e-2, 0.5]),
    betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.3, 0.6), (0.0, 0.99)]),
    eps=st.sampled_from([1e-8, 1e-3])))


@SWEEP
@given(cls=st.sampled_from(["Adam", "AdamW"]), n=st.sampled_from([16, 48, 1024, 4096]),
       options=ADAM_OPTIONS, dtype=st.sampled_from(DTYPES))
def test_adam_bitwise_equal_to_torch_fused(cls, n, options, dtype):
    lrs = [1e-2 / (1 + 0.1 * i) for i in range(60)]
    got, ref = run_pair(getattr(flatopt, cls)(lr=1e-2, **options), getattr(torch.optim, cls),
                        dict(lr=1e-2, **options), n, 60, dtype, lrs=lrs, fused=True)
    np.testing.assert_array_equal(got, ref)


@SWEEP
@given(cls=st.sampled_from(["Adam", "AdamW"]), n=st.sampled_from([1, 3, 17, 1001, 20_000]),
       options=ADAM_OPTIONS, dtype=st.sampled_from(DTYPES))
def test_adam_matches_torch_single_tensor(cls, n, options, dtype):
    got, ref = run_pair(getattr(flatopt, cls)(lr=1e-2, **options), getattr(torch.optim, cls),
                        dict(lr=1e-2, **options), n, 50, dtype, foreach=False)
    # torch's single-tensor sqrt (MKL VML) is not correctly rounded; flatopt's is.
    assert max_ulp(got, ref) <= (16 if dtype == np.float32 else 16)
    if dtype == np.float64:
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12 * np.max(np.abs(ref)))


def test_adam_large_parallel_path_bitwise_fused():
    got, ref = run_pair(flatopt.AdamW(lr=1e-3, amsgrad=True), torch.optim.AdamW, dict(lr=1e-3, amsgrad=True),
                        200_000, 5, np.float32, fused=True)
    np.testing.assert_array_equal(got, ref)


# --- RMSprop ----------------------------------------------------------------------------------
@SWEEP
@given(n=st.sampled_from([1, 5, 64, 1001, 30_000]), centered=st.booleans(),
       momentum=st.sampled_from([0.0, 0.9]), weight_decay=st.sampled_from([0.0, 0.1]),
       alpha=st.sampled_from([0.99, 0.9, 0.3]), maximize=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_rmsprop_matches_torch(n, centered, momentum, weight_decay, alpha, maximize, dtype):
    kw = dict(centered=centered, momentum=momentum, weight_decay=weight_decay, alpha=alpha, maximize=maximize)
    lrs = [1e-3 * (1 + (i % 7)) for i in range(50)]
    got, ref = run_pair(flatopt.RMSprop(lr=1e-3, **kw), torch.optim.RMSprop, dict(lr=1e-3, **kw), n, 50, dtype,
                        lrs=lrs, foreach=False)
    if dtype == np.float64:
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13 * np.max(np.abs(ref)))
        return
    # float32: bitwise against torch's rule given a correctly rounded sqrt.  torch.optim's own
    # MKL sqrt puts it up to 71 ulps from that rule (centered, alpha=0.3, 30000 elements): the
    # bound against torch.optim only checks that the rule replayed is torch's.
    p0, grads = data(n, 50, dtype)
    tp = torch.from_numpy(p0.copy())
    tstate = {k: torch.zeros(n, dtype=tp.dtype) for k in ("square_avg", "grad_avg", "momentum_buffer")}
    for lr, g in zip(lrs, grads):
        torch_rmsprop_step(tp, torch.from_numpy(g.copy()), tstate, lr=lr, eps=1e-8, **kw)
    np.testing.assert_array_equal(got, tp.numpy())
    assert max_ulp(got, ref) <= 256, max_ulp(got, ref)


def torch_rmsprop_step(p, g, state, *, lr, alpha, eps, weight_decay, momentum, centered, maximize):
    """torch.optim.RMSprop's single-tensor rule, operation by operation on torch tensors (torch
    rounds every operation), with a correctly rounded square root."""
    grad = -g if maximize else g
    if weight_decay != 0:
        grad = grad.add(p, alpha=weight_decay)
    square_avg = state["square_avg"]
    square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    if centered:
        grad_avg = state["grad_avg"]
        grad_avg.lerp_(grad, 1 - alpha)
        avg = correctly_rounded_sqrt(square_avg.addcmul(grad_avg, grad_avg, value=-1))
    else:
        avg = correctly_rounded_sqrt(square_avg)
    avg = avg.add_(eps)
    if momentum > 0:
        buf = state["momentum_buffer"]
        buf.mul_(momentum).addcdiv_(grad, avg)
        p.add_(buf, alpha=-lr)
    else:
        p.addcdiv_(grad, avg, value=-lr)


RMSPROP_CASES = [dict(centered=c, momentum=m, weight_decay=wd, maximize=mx)
                 for c in (False, True) for m in (0.0, 0.9) for wd in (0.0, 0.1) for mx in (False, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("options", RMSPROP_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_rmsprop_bitwise_equal_to_torch_ops_with_a_correctly_rounded_sqrt(options, dtype):
    """Parameters and every state buffer bitwise equal to torch's rule given the same square
    root: pins the rounding of ``sqrt(v - ga^2)``, of the momentum buffer and of
    ``p - lr * g / avg``, which the tolerances above (torch's own sqrt) let pass."""
    n, steps = 37, 40
    hp = dict(lr=1e-2, alpha=0.9, eps=1e-8, **options)
    p0, grads = data(n, steps, dtype)
    opt, params = flatopt.RMSprop(**hp), p0.copy()
    tp = torch.from_numpy(p0.copy())
    tstate = {k: torch.zeros(n, dtype=tp.dtype) for k in ("square_avg", "grad_avg", "momentum_buffer")}
    for i, g in enumerate(grads):
        opt.lr = hp["lr"] = 1e-2 * (1 + (i % 5))
        opt.step(params, g)
        torch_rmsprop_step(tp, torch.from_numpy(g.copy()), tstate, **hp)
        np.testing.assert_array_equal(params, tp.numpy(), err_msg=f"params after step {i + 1}")
    for name, buf in opt.state.items():
        np.testing.assert_array_equal(buf, tstate[name].numpy(), err_msg=name)


# --- NaN / Inf propagate as in torch ---------------------------------------------------------
@pytest.mark.parametrize("make, torch_cls, kw", [
    (lambda: flatopt.SGD(lr=0.1, momentum=0.9), torch.optim.SGD, dict(lr=0.1, momentum=0.9, foreach=False)),
    (lambda: flatopt.Adam(lr=0.1, amsgrad=True), torch.optim.Adam, dict(lr=0.1, amsgrad=True, foreach=False)),
    (lambda: flatopt.AdamW(lr=0.1), torch.optim.AdamW, dict(lr=0.1, foreach=False)),
    (lambda: flatopt.RMSprop(lr=0.1, centered=True, momentum=0.5), torch.optim.RMSprop,
     dict(lr=0.1, centered=True, momentum=0.5, foreach=False)),
])
def test_nan_and_inf_propagate_like_torch(make, torch_cls, kw):
    p0, grads = data(64, 3, np.float32)
    grads[1][[3, 10]] = np.nan
    grads[1][[5, 20]] = np.inf
    grads[2][40] = -np.inf
    opt, params = make(), p0.copy()
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch_cls([tp], **kw)
    for g in grads:
        opt.step(params, g)
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
    ref = tp.detach().numpy()
    np.testing.assert_array_equal(np.isnan(params), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(params), np.isinf(ref))
    assert np.isnan(params).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_amsgrad_nan_in_a_loaded_running_maximum_propagates_like_torch(dtype):
    """A checkpoint whose ``max_exp_avg_sq`` holds NaN where ``exp_avg_sq`` is finite: torch's
    ``maximum`` gives NaN, and so does the parameter.  (From the optimizer's own steps the
    running maximum is NaN only where ``exp_avg_sq`` is, so only a loaded state tells a maximum
    that drops NaN apart.)"""
    rng = np.random.default_rng(7)
    p0, g = rng.standard_normal(20).astype(dtype), rng.standard_normal(20).astype(dtype)
    m, v = rng.standard_normal(20).astype(dtype) * 0.1, rng.random(20).astype(dtype) * 0.1
    vmax = v + dtype(0.01)
    vmax[[2, 11]] = np.nan
    opt = flatopt.Adam(lr=1e-2, amsgrad=True)
    checkpoint = opt.state_dict()
    checkpoint["group_state"] = [{"step": 3}]
    checkpoint["state"] = {"exp_avg": m.copy(), "exp_avg_sq": v.copy(), "max_exp_avg_sq": vmax.copy()}
    opt.load_state_dict(checkpoint)
    params = p0.copy()
    opt.step(params, g)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch.optim.Adam([tp], lr=1e-2, amsgrad=True, foreach=False)
    topt.state[tp] = {"step": torch.tensor(3.0), "exp_avg": torch.from_numpy(m.copy()),
                      "exp_avg_sq": torch.from_numpy(v.copy()), "max_exp_avg_sq": torch.from_numpy(vmax.copy())}
    tp.grad = torch.from_numpy(g.copy())
    topt.step()
    np.testing.assert_array_equal(np.isnan(params), np.isnan(tp.detach().numpy()))
    assert np.isnan(params[[2, 11]]).all()
    np.testing.assert_array_equal(np.isnan(opt.state["max_exp_avg_sq"]),
                                  np.isnan(topt.state[tp]["max_exp_avg_sq"].numpy()))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_sgd_momentum_switched_off_and_on_keeps_its_buffer_like_torch(dampening, dtype):
    """torch keeps ``momentum_buffer`` through steps with momentum 0 and goes on from it when
    momentum comes back (``buf = momentum * buf + (1 - dampening) * g``, not ``buf = g``)."""
    p0, grads = data(19, 6, dtype, seed=4)
    opt, params = flatopt.SGD(lr=0.05, momentum=0.9, dampening=dampening), p0.copy()
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch.optim.SGD([tp], lr=0.05, momentum=0.9, dampening=dampening, foreach=False)
    for i, g in enumerate(grads):
        opt.momentum = topt.param_groups[0]["momentum"] = 0.0 if i in (2, 3) else 0.9
        opt.step(params, g)
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
        np.testing.assert_array_equal(params, tp.detach().numpy(), err_msg=f"step {i + 1}")
    np.testing.assert_array_equal(opt.state["momentum_buffer"], topt.state[tp]["momentum_buffer"].numpy())


def test_sgd_without_momentum_never_reads_dampening_like_torch():
    """torch reads ``dampening`` only with momentum: ``SGD(dampening=None)`` steps without it, as
    here (it raised ``1 - None``'s TypeError).  With momentum turned on, torch's ``1 - None`` fails
    at its second step with momentum, here at the first, before anything changes."""
    p0, grads = data(19, 4, np.float64, seed=5)
    opt, params = flatopt.SGD(lr=0.05, dampening=None, weight_decay=0.1), p0.copy()
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch.optim.SGD([tp], lr=0.05, dampening=None, weight_decay=0.1, foreach=False)
    for i, g in enumerate(grads):
        opt.step(params, g)
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
        np.testing.assert_array_equal(params, tp.detach().numpy(), err_msg=f"step {i + 1}")
    opt.momentum, before = 0.9, params.copy()
    with pytest.raises(TypeError, match="unsupported operand"):
        opt.step(params, grads[0])
    np.testing.assert_array_equal(params, before)
    assert "momentum_buffer" not in opt.state


# --- Param groups and frozen segments against torch with several tensors --------------------------
def test_groups_and_frozen_match_torch_multi_tensor():
    sizes = [30, 17, 50]
    p0, grads = data(sum(sizes), 40, np.float64)
    bounds = np.cumsum([0] + sizes)
    groups = [dict(start=int(bounds[0]), stop=int(bounds[1]), lr=1e-2),
              dict(start=int(bounds[1]), stop=int(bounds[2]), lr=3e-2, weight_decay=0.1, betas=(0.8, 0.99)),
              dict(start=int(bounds[2]), stop=int(bounds[3]), lr=1e-3, amsgrad=True)]
    opt = flatopt.Adam(param_groups=groups)
    params = p0.copy()
    tps = [torch.nn.Parameter(torch.from_numpy(p0[a:b].copy())) for a, b in zip(bounds[:-1], bounds[1:])]
    topt = torch.optim.Adam([dict(params=[tps[0]], lr=1e-2),
                             dict(params=[tps[1]], lr=3e-2, weight_decay=0.1, betas=(0.8, 0.99)),
                             dict(params=[tps[2]], lr=1e-3, amsgrad=True)], foreach=False)
    for i, g in enumerate(grads):
        frozen = i % 3 == 1  # the middle tensor gets no gradient every third step
        opt.param_groups[1]["frozen"] = frozen
        opt.step(params, g)
        for j, (tp, a, b) in enumerate(zip(tps, bounds[:-1], bounds[1:])):
            tp.grad = None if (j == 1 and frozen) else torch.from_numpy(g[a:b].copy())
        topt.step()
    ref = np.concatenate([tp.detach().numpy() for tp in tps])
    np.testing.assert_allclose(params, ref, rtol=1e-12, atol=1e-13)
    assert [s["step"] for s in opt.group_state] == [40, 40 - 13, 40]
    assert topt.state[tps[1]]["step"].item() == 40 - 13


# --- ADOPT against the published rule and optax -----------------------------------------------------
def adopt_reference(p0, grads, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0, decouple=False,
                    clip=lambda t: t**0.25, maximize=False, dtype=np.float64):
    """Float64 transcription of the authors' ADOPT (the revision with clipping); ``dtype``
    float32: the same formula in float32 arithmetic (the hyperparameters are Python floats,
    which NumPy 2 takes in the arrays' dtype)."""
    p = p0.astype(dtype).copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads):
        g = -g.astype(dtype) if maximize else g.astype(dtype)
        if weight_decay and not decouple:
            g = g + weight_decay * p
        if t == 0:
            v = g * g
            continue
        if weight_decay and decouple:
            p = p * (1 - lr * weight_decay)
        n = g / np.maximum(np.sqrt(v), eps)
        if clip is not None:
            n = np.clip(n, -clip(t), clip(t))
        m = m + (1 - betas[0]) * (n - m)
        p = p - lr * m
        v = betas[1] * v + (1 - betas[1]) * g * g
    return p


@SWEEP
@given(n=st.sampled_from([1, 9, 100, 5000]), weight_decay=st.sampled_from([0.0, 0.1]), decouple=st.booleans(),
       maximize=st.booleans(), clip=st.sampled_from(["default", None, "linear"]),
       betas=st.sampled_from([(0.9, 0.9999), (0.5, 0.9)]), eps=st.sampled_from([1e-6, 1e-2]),
       dtype=st.sampled_from(DTYPES))
def test_adopt_matches_float64_transcription(n, weight_decay, decouple, maximize, clip, betas, eps, dtype):
    clip_fn = {"default": lambda t: t**0.25, None: None, "linear": lambda t: 0.5 + 0.1 * t}[clip]
    kw = dict(lr=1e-2, betas=betas, eps=eps, weight_decay=weight_decay, decouple=decouple, maximize=maximize)
    p0, grads = data(n, 60, dtype)
    opt = flatopt.ADOPT(**kw) if clip == "default" else flatopt.ADOPT(clip_lambda=clip_fn, **kw)
    params = p0.copy()
    for g in grads:
        opt.step(params, g)
    ref = adopt_reference(p0, grads, clip=clip_fn, **kw)
    if dtype == np.float64:
        np.testing.assert_allclose(params, ref, rtol=1e-12, atol=1e-12 * np.max(np.abs(ref)))
    else:  # (an L2 term that cancels the gradient at the first step amplifies rounding: 290 ulps in one draw,
        # where the formula in plain float32 is 379 off)
        plain = adopt_reference(p0, grads, clip=clip_fn, dtype=np.float32, **kw)
        assert_f32_like_plain_float32(params, ref, plain, 200, what="ADOPT float32 vs float64 transcription")


def test_adopt_first_step_only_initialises_v():
    p0, grads = data(50, 1, np.float32)
    opt = flatopt.ADOPT(lr=0.1, weight_decay=0.1, decouple=True)
    params = p0.copy()
    opt.step(params, grads[0])
    np.testing.assert_array_equal(params, p0)
    np.testing.assert_array_equal(opt.state["exp_avg"], 0)
    np.testing.assert_array_equal(opt.state["exp_avg_sq"], grads[0] * grads[0])


def test_adopt_matches_optax_contrib_adopt():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        p0, grads = data(300, 60, np.float64, seed=3)
        tx = optax.contrib.adopt(learning_rate=3e-3, b1=0.9, b2=0.9999, eps=1e-6, use_clipping=True)
        jp = jnp.asarray(p0)
        state = tx.init(jp)
        for g in grads:
            updates, state = tx.update(jnp.asarray(g), state, jp)
            jp = optax.apply_updates(jp, updates)
        opt, params = flatopt.ADOPT(lr=3e-3), p0.copy()
        for g in grads:
            opt.step(params, g)
        np.testing.assert_allclose(params, np.asarray(jp), rtol=1e-12, atol=1e-13)
    finally:
        jax.config.update("jax_enable_x64", old)


# --- Momentum: the textbook EMA rule ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay, maximize", [(0.0, False), (0.05, False), (0.0, True)])
def test_momentum_matches_textbook_formula(dtype, weight_decay, maximize):
    p0, grads = data(257, 80, dtype)
    lr, beta = 0.05, 0.9
    opt, params = flatopt.Momentum(lr=lr, beta=beta, weight_decay=weight_decay, maximize=maximize), p0.copy()
    w, v = p0.astype(np.float64), np.zeros(257)
    for g in grads:
        opt.step(params, g)
        g = (-1 if maximize else 1) * g.astype(np.float64) + weight_decay * w
        v = beta * v + (1 - beta) * g
        w = w - lr * v
    if dtype == np.float64:
        np.testing.assert_allclose(params, w, rtol=1e-12, atol=1e-13)
    else:
        np.testing.assert_allclose(params, w, rtol=0, atol=64 * np.spacing(np.float32(np.max(np.abs(w)))))


def test_momentum_first_step_differs_from_torch_sgd_rule():
    p0, grads = data(10, 1, np.float64)
    a, b = p0.copy(), p0.copy()
    flatopt.Momentum(lr=0.1, beta=0.9).step(a, grads[0])
    flatopt.SGD(lr=0.1, momentum=0.9, dampening=0.9).step(b, grads[0])
    np.testing.assert_allclose(p0 - a, 0.1 * 0.1 * grads[0], rtol=1e-12)  # v1 = (1 - beta) g
    np.testing.assert_allclose(p0 - b, 0.1 * grads[0], rtol=1e-12)  # torch: buf1 = g


# --- Lookahead -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k, alpha", [(1, 0.5), (3, 0.8), (5, 0.5), (6, 0.3), (4, 0.0), (4, 1.0)])
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_lookahead_bitwise_equal_to_seed_reference(dtype, k, alpha, inner):
    n = 1024  # a multiple of 16: torch's fused Adam is then bitwise reproducible
    p0, grads = data(n, 31, dtype)
    if inner == "sgd":
        flat_inner = flatopt.SGD(lr=0.05, momentum=0.9)
        make_torch = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, foreach=False)
    else:
        flat_inner = flatopt.Adam(lr=1e-2)
        make_torch = lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True)
    opt, params = flatopt.Lookahead(flat_inner, k=k, alpha=alpha), p0.copy()
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    ref = SeedLookahead(make_torch([tp]), k=k, alpha=alpha)
    for g in grads:
        opt.step(params, g)
        tp.grad = torch.from_numpy(g.copy())
        ref.step()
    np.testing.assert_array_equal(params, tp.detach().numpy())
    np.testing.assert_array_equal(opt.slow, ref.slow_weights[0][0].numpy())


@pytest.mark.parametrize("k, alpha", [(5, 0.5), (3, 0.7), (2, 0.2)])
def test_lookahead_matches_pytorch_optimizer(k, alpha):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    p0, grads = data(777, 30, np.float64)
    opt, params = flatopt.Lookahead(flatopt.SGD(lr=0.05, momentum=0.9), k=k, alpha=alpha), p0.copy()
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    ref = pytorch_optimizer.Lookahead(torch.optim.SGD([tp], lr=0.05, momentum=0.9, foreach=False), k=k, alpha=alpha)
    for g in grads:
        opt.step(params, g)
        tp.grad = torch.from_numpy(g.copy())
        ref.step()
    np.testing.assert_allclose(params, tp.detach().numpy(), rtol=1e-13, atol=1e-14)


def test_lookahead_slow_weights_context_swaps_and_restores():
    p0, grads = data(100, 7, np.float32)
    opt, params = flatopt.Lookahead(flatopt.Adam(lr=0.1), k=5), p0.copy()
    for g in grads:
        opt.step(params, g)
    fast, slow = params.copy(), opt.slow.copy()
    assert not np.array_equal(fast, slow)
    with opt.slow_weights(params) as inside:
        assert inside is params
        np.testing.assert_array_equal(params, slow)
    np.testing.assert_array_equal(params, fast)
    np.testing.assert_array_equal(opt.slow, slow)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.6, 3.0, 0.2])
def test_rmsprop_centered_grad_average_bitwise_for_any_alpha(alpha, dtype):
    """torch's lerp picks its end by |weight| < 1/2: with alpha > 1.5 the weight 1 - alpha is
    below -1/2 and the lerp runs from the gradient's end.  The averages pass through no square
    root: bitwise."""
    n, steps = 1000, 4
    p0, grads = data(n, steps, dtype)
    opt, params = flatopt.RMSprop(lr=1e-3, alpha=alpha, centered=True), p0.copy()
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch.optim.RMSprop([tp], lr=1e-3, alpha=alpha, centered=True, foreach=False)
    for g in grads:
        opt.step(params, g)
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
        for name in ("grad_avg", "square_avg"):
            np.testing.assert_array_equal(opt.state[name], topt.state[tp][name].numpy(), err_msg=name)


def test_lookahead_slow_weights_context_swaps_only_what_it_syncs():
    """Elements outside every group and in frozen groups have no slow weights of their own:
    inside the block they keep their values (a copy from the first step came back before)."""
    inner = flatopt.Adam(lr=0.1, param_groups=[dict(start=0, stop=40), dict(start=40, stop=60, frozen=True),
                                                 dict(start=70, stop=90)])
    opt, (p0, grads) = flatopt.Lookahead(inner, k=5), data(100, 7, np.float64)
    params = p0.copy()
    for g in grads:
        opt.step(params, g)
    params[40:60] += 1.0  # set by hand after the first step
    fast, synced = params.copy(), np.zeros(100, bool)
    synced[0:40] = synced[70:90] = True
    with opt.slow_weights(params):
        np.testing.assert_array_equal(params, np.where(synced, opt.slow, fast))
    np.testing.assert_array_equal(params, fast)
