"""flatopt.ADOPT against (a) a float64 NumPy transcription of the authors' rule, written here
from the paper's algorithm with clipping (Taniguchi et al., NeurIPS 2024, official code), and
(b) ``optax.contrib.adopt`` in float64.

The rule (t = number of earlier calls, so the first real update has t = 1):

* ``g <- -g`` if maximize; ``g <- g + wd * p`` (L2, every call, the first one included)
  unless ``decouple``;
* first call: ``v <- g * g`` and nothing else (no parameter, momentum or decay change);
* later calls: ``p <- p + (-lr * wd) * p`` if decouple (the authors' ``p.add_(p, alpha=-lr*wd)``,
  not AdamW's ``p * (1 - lr*wd)``); ``n = g / max(sqrt(v), eps)`` (the
  previous v; eps is a floor, not added); ``n = clip(n, -c(t), c(t))`` with ``c(t) = t**0.25``
  by default; ``m <- m + (1 - b1) * (n - m)`` (m starts at 0, no bias correction);
  ``p <- p - lr * m``; then ``v <- b2 * v + (1 - b2) * g * g``.

pytorch-optimizer's ADOPT is deliberately NOT used: its clip schedule is shifted by one step
and it decays on the first call.

Tolerances: float64 ``rtol=1e-12`` with ``atol = 1e-13 * M``, M being the largest |param|
along the reference trajectory.  float32: ``max |flat - ref| <= max(K, 2 * e + 16) * ulp(M)``
against the float64 reference run on the same (float32) inputs, where ``e`` is the error of
the same transcription evaluated in float32 NumPy arithmetic and K = ADOPT_F32_ULP_K: K ulps
where the rule is well conditioned, and never worse than twice an honest float32 evaluation
where ``g / sqrt(v)`` amplifies rounding (L2 decay cancelling the gradient, b2 = 0).
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flatopt
from conftest import (DTYPES, SMALL_SIZES, assert_close64, assert_f32_like_plain_float32, assert_same_nonfinite,
                      assert_ulp_close, correctly_rounded_sqrt, dtype_name, make_problem, max_ulp_diff, record, sweep)

STEPS = 60
ADOPT_F32_ULP_K = 32  # float32 trajectory vs float64 reference, well-conditioned (measured max 16)
SWEEP = sweep(60)


def default_clip(t):
    return t**0.25


CLIPS = {
    "default": default_clip,  # also what flatopt uses when clip_lambda is not given
    "none": None,
    "tight": lambda t: 0.1 * t**0.5,  # clips most elements early on
    "linear": lambda t: 0.5 + 0.05 * t,
}


def schedule(base):
    return lambda t: base * (1.0 + 0.5 * math.sin(0.7 * t + 1.0))


def adopt_step(p, m, v, g, t, *, lr, betas, eps, weight_decay, decouple, clip, maximize, coef=None):
    """One ADOPT call in the arrays' dtype (every scalar rounded to it).  ``t`` = earlier
    calls, ``clip`` = the clip value for this call or None.  ``coef`` may give the derived
    scalars ``1 - b1``, ``1 - b2`` and ``-lr*wd`` explicitly (keys w1, w2, decay).
    Returns (p, m, v, n) with ``n`` the clipped normalised gradient (None on the first call)."""
    c = p.dtype.type
    coef = coef or {}
    w1 = c(coef.get("w1", c(1) - c(betas[0])))
    w2 = c(coef.get("w2", c(1) - c(betas[1])))
    g = -g if maximize else g
    if weight_decay != 0 and not decouple:
        g = g + c(weight_decay) * p
    if t == 0:
        return p, m, g * g, None
    if weight_decay != 0 and decouple:
        p = p + c(coef.get("decay", -c(lr) * c(weight_decay))) * p
    n = g / np.maximum(np.sqrt(v), c(eps))
    if clip is not None:
        n = np.clip(n, -c(clip), c(clip))
    m = m + w1 * (n - m)
    p = p - c(lr) * m
    v = c(betas[1]) * v + w2 * g * g
    return p, m, v, n


def adopt_reference(p0, grads, *, lr, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0, decouple=False,
                    clip=default_clip, maximize=False, dtype=np.float64):
    """NumPy transcription of ADOPT over all ``grads``, computed in ``dtype`` (float64 by
    default; float32 and longdouble for the accuracy comparisons).  ``lr`` may be a
    callable of t.  Returns (p, m, v, number of clipped elements, largest |m| or |n| on the
    way, largest |p| on the way): each step rounds m at the magnitude of its inputs, so a
    final m far smaller than them (b1 = 0 after a large m, say) is compared to that scale."""
    p = np.asarray(p0).astype(dtype)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    clipped = 0
    scale, m_scale = float(np.max(np.abs(p), initial=0.0)), 0.0
    for t, g in enumerate(grads):
        bound = None if (clip is None or t == 0) else clip(t)
        p, m, v, n = adopt_step(p, m, v, np.asarray(g).astype(dtype), t, lr=lr(t) if callable(lr) else lr,
                                betas=betas, eps=eps, weight_decay=weight_decay, decouple=decouple, clip=bound,
                                maximize=maximize)
        if n is not None and bound is not None:
            with np.errstate(invalid="ignore"):
                clipped += int(np.count_nonzero(n == bound) + np.count_nonzero(n == -bound))
        with np.errstate(invalid="ignore"):
            scale = max(scale, float(np.max(np.abs(p[np.isfinite(p)]), initial=0.0)))
            for x in (m, n) if n is not None else ():
                m_scale = max(m_scale, float(np.max(np.abs(x[np.isfinite(x)]), initial=0.0)))
    return p, m, v, clipped, m_scale, scale


LOCAL_ULP_K = 6  # one step from flatopt's own state: that step's rounding only (measured max 2.9)


def exact_l2(g, p, weight_decay, high):
    """``g + weight_decay * p`` for ``p`` in float32 or float64, computed in ``high`` without
    the rounding that a cancelling sum would magnify: a float32 product is exact in float64,
    and a float64 product is split exactly into two float64 parts (Dekker's TwoProduct) before
    the long-double sums.  (Long double alone keeps 11 more bits than float64; a sum that
    cancels 15 bits, g ~ -wd*p, would leave the reference 10 ulps off.)"""
    if p.dtype == np.float32:
        return g.astype(high) + high(weight_decay) * p.astype(high)
    a, b = np.float64(weight_decay), p.astype(np.float64)
    split = np.float64(2.0**27 + 1)
    ca, cb = split * a, split * b
    a_hi, b_hi = ca - (ca - a), cb - (cb - b)
    a_lo, b_lo = a - a_hi, b - b_hi
    prod = a * b
    err = a_lo * b_lo - (((prod - a_hi * b_hi) - a_lo * b_hi) - a_hi * b_lo)
    return (g.astype(high) + prod.astype(high)) + err.astype(high)


def check_one_step(before, after, g, t, lr, dtype, *, clip, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0,
                   decouple=False, maximize=False):
    """The step just taken, recomputed in higher precision (float64 for float32, long double
    for float64) from flatopt's state before it, with the hyperparameters rounded to the
    buffers' dtype as any kernel in that dtype must round them.
    Conditioning plays no part here (no error is carried over), so this holds in every
    regime to a few ulps of each element's own magnitudes."""
    r = (lambda x: float(np.float32(x))) if dtype == np.float32 else float
    step = dict(lr=r(lr), betas=(r(betas[0]), r(betas[1])), eps=r(eps), weight_decay=r(weight_decay),
                decouple=decouple, clip=None if clip is None or t == 0 else r(clip(t)), maximize=maximize,
                coef=dict(w1=r(1 - betas[0]), w2=r(1 - betas[1]), decay=r(-lr * weight_decay)))
    high = np.float64 if dtype == np.float32 else np.longdouble  # with exact_l2, its own rounding stays negligible
    if np.finfo(high).nmant <= np.finfo(dtype).nmant:
        return
    p0, m0, v0 = (x.astype(high) for x in before)
    g_eff = (-1 if maximize else 1) * g
    step["maximize"] = False
    if not decouple and weight_decay != 0:  # the L2 term goes in exactly; the step then applies none
        g_eff, step["weight_decay"] = exact_l2(g_eff, before[0], step["weight_decay"], high), 0.0
    p, m, v, n = adopt_step(p0, m0, v0, np.asarray(g_eff).astype(high), t, **step)
    g2 = np.asarray(g_eff).astype(high) ** 2
    # Each quantity's own magnitude, including its inputs' (an error of one ulp of m0 in m
    # is one rounding, and it reaches p multiplied by lr).
    scales = {"v": np.maximum(np.abs(v0), g2), "m": np.maximum(np.abs(m0), np.abs(n) if n is not None else 0)}
    scales["p"] = np.maximum(np.maximum(np.abs(p0), np.abs(p)), high(step["lr"]) * scales["m"])
    for name, got, want in (("p", after[0], p), ("m", after[1], m), ("v", after[2], v)):
        unit = np.spacing(scales[name].astype(dtype)).astype(high)
        with np.errstate(invalid="ignore"):
            err = (np.abs(got.astype(high) - want) / np.where(unit > 0, unit, 1)).astype(np.float64)
        worst = float(np.max(err, initial=0.0))
        record(f"ADOPT one step {dtype_name(dtype)} {name} [ulp of own magnitude]", worst)
        assert worst <= LOCAL_ULP_K, (f"step {t}: {name} off by {worst:.3g} ulps", int(np.argmax(err)))


def run_flat(p0, grads, *, lr, lr_mode="const", clip="default", local_check=False, **kw):
    """flatopt.ADOPT over ``grads``; ``lr_mode`` "attr" sets ``opt.lr`` before each step,
    "callable" passes ``lr`` itself (flatopt calls it with the steps already taken).
    ``local_check``: verify every step against :func:`check_one_step`."""
    sched = schedule(lr)
    extra = {} if clip == "default" else dict(clip_lambda=CLIPS[clip])
    opt = flatopt.ADOPT(lr=sched if lr_mode == "callable" else lr, **extra, **kw)
    params = p0.copy()
    zeros = np.zeros_like(p0)
    for t, g in enumerate(grads):
        if lr_mode == "attr":
            opt.lr = sched(t)
        before = g.copy()
        state = (params.copy(), opt.state.get("exp_avg", zeros).copy(), opt.state.get("exp_avg_sq", zeros).copy())
        opt.step(params, g)
        np.testing.assert_array_equal(g, before, err_msg="ADOPT modified the gradient")
        if local_check:
            lr_t = sched(t) if lr_mode != "const" else lr
            check_one_step(state, (params, opt.state["exp_avg"], opt.state["exp_avg_sq"]), g, t, lr_t,
                           p0.dtype.type, clip=CLIPS[clip], **kw)
    ref_lr = sched if lr_mode != "const" else lr
    return opt, params, ref_lr


def well_conditioned(weight_decay, decouple, clip, betas):
    """Whether whole trajectories can be compared: L2 decay makes ``g + wd*p`` cancel, and
    ``g / sqrt(v)`` then amplifies rounding without bound unless clipping caps it and v
    averages over several gradients (b2 >= 0.5)."""
    return weight_decay == 0 or decouple or (clip != "none" and betas[1] >= 0.5)


def check_against_reference(p0, grads, dtype, *, lr, lr_mode="const", clip="default", expect_clipping=None,
                            local_check=True, **kw):
    opt, params, ref_lr = run_flat(p0, grads, lr=lr, lr_mode=lr_mode, clip=clip, local_check=local_check, **kw)
    p, m, v, clipped, m_scale, scale = adopt_reference(p0, grads, lr=ref_lr, clip=CLIPS[clip], **kw)
    if expect_clipping is not None:
        # Make sure the clip branch was exercised (or, without clipping, not).
        assert (clipped > 0) == expect_clipping, clipped
    assert opt.group_state[0]["step"] == len(grads)
    if not well_conditioned(kw.get("weight_decay", 0), kw.get("decouple", False), clip, kw.get("betas", (0.9, 0.9999))):
        return  # the step-by-step check above is the one that holds there
    if dtype == np.float64:
        assert_close64(params, p, rtol=1e-12, atol_scale=1e-13, scale=scale, what="ADOPT float64 params")
        assert_close64(opt.state["exp_avg"], m, rtol=1e-12, atol_scale=1e-13, scale=m_scale,
                       what="ADOPT float64 exp_avg")
        assert_close64(opt.state["exp_avg_sq"], v, rtol=1e-12, atol_scale=1e-13, what="ADOPT float64 exp_avg_sq")
    else:
        plain_p, plain_m, plain_v, *_ = adopt_reference(p0, grads, lr=ref_lr, clip=CLIPS[clip], dtype=np.float32,
                                                          **kw)
        assert_f32_like_plain_float32(params, p, plain_p, ADOPT_F32_ULP_K, scale, what="ADOPT float32 params [ulp]")
        # m is rounded at the magnitude of its inputs (m_scale), as in the float64 check above:
        # with b1 ~ 0 the final m may be a thousand times smaller than those.
        assert_f32_like_plain_float32(opt.state["exp_avg"], m, plain_m, ADOPT_F32_ULP_K, m_scale,
                                      what="ADOPT float32 exp_avg [ulp]")
        assert_f32_like_plain_float32(opt.state["exp_avg_sq"], v, plain_v, ADOPT_F32_ULP_K,
                                      what="ADOPT float32 exp_avg_sq [ulp]")


# ======================================================================= (a) transcription
GRID = [dict(weight_decay=wd, decouple=dec, maximize=mx, clip=clip)
        for wd in (0.0, 0.1) for dec in (False, True) for mx in (False, True) for clip in ("default", "none", "tight")
        if not (wd == 0 and dec)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("options", GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_option_combination_matches_transcription(options, dtype):
    p0, grads = make_problem(101, STEPS, dtype, seed=1)
    check_against_reference(p0, grads, dtype, lr=1e-2, lr_mode="attr", betas=(0.9, 0.9999), eps=1e-6,
                            expect_clipping=options["clip"] != "none", **options)


@SWEEP
@given(n=st.sampled_from(SMALL_SIZES), lr=st.floats(1e-4, 0.1), lr_mode=st.sampled_from(["const", "attr", "callable"]),
       b1=st.one_of(st.sampled_from([0.0, 0.5, 0.9]), st.floats(0.0, 0.99)),
       b2=st.one_of(st.sampled_from([0.5, 0.9, 0.999, 0.9999]), st.floats(0.0, 0.9999)),
       eps=st.sampled_from([1e-8, 1e-6, 1e-3, 0.1]), weight_decay=st.one_of(st.just(0.0), st.floats(1e-4, 0.5)),
       decouple=st.booleans(), maximize=st.booleans(), clip=st.sampled_from(list(CLIPS)),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_sweep_matches_transcription(n, lr, lr_mode, b1, b2, eps, weight_decay, decouple, maximize, clip, dtype,
                                     seed):
    p0, grads = make_problem(n, STEPS, dtype, seed)
    check_against_reference(p0, grads, dtype, lr=lr, lr_mode=lr_mode, betas=(b1, b2), eps=eps,
                            weight_decay=weight_decay, decouple=decouple, maximize=maximize, clip=clip)


ILL_CONDITIONED = [
    dict(lr=3.5e-3, betas=(0.2, 0.0), eps=1e-8, weight_decay=0.31, clip="none"),
    dict(lr=0.0625, betas=(0.0, 0.0), eps=1e-8, weight_decay=0.3125, clip="default"),
    dict(lr=1e-2, betas=(0.9, 0.9999), eps=1e-8, weight_decay=0.1, clip="default"),
    dict(lr=3e-2, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.5, clip="tight", maximize=True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", ILL_CONDITIONED, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_ill_conditioned_l2_within_rounding_error(case, dtype):
    """L2 decay with gradients spread over five decades: ``g + wd*p`` cancels, and
    ``g / sqrt(v)`` magnifies the cancellation, so any two roundings of the same rule drift
    apart (hundreds of thousands of float32 ulps, 1e-11 relative in float64).  Criterion:
    flatopt's error against a higher-precision transcription (float64 for float32, long
    double for float64) is at most twice that of the same transcription run in flatopt's
    dtype, plus 16 ulps."""
    high = np.float64 if dtype == np.float32 else np.longdouble
    if np.finfo(high).nmant <= np.finfo(dtype).nmant:
        pytest.skip("no wider floating-point type on this platform")
    p0, grads = make_problem(257, STEPS, dtype, seed=6)
    options = dict(case)
    clip = options.pop("clip")
    _, params, _ = run_flat(p0, grads, clip=clip, **options)
    exact, *_, scale = adopt_reference(p0, grads, clip=CLIPS[clip], dtype=high, **options)
    plain, *_ = adopt_reference(p0, grads, clip=CLIPS[clip], dtype=dtype, **options)
    exact = exact.astype(dtype)
    err_flat, err_plain = max_ulp_diff(params, exact, scale), max_ulp_diff(plain, exact, scale)
    record(f"ADOPT ill-conditioned {dtype_name(dtype)} err_flat/err_plain", err_flat / max(err_plain, 1.0))
    assert err_flat <= 2 * err_plain + 16, (err_flat, err_plain)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_large_buffer_matches_transcription(dtype):
    """1e5+ elements: flatopt's threaded path."""
    p0, grads = make_problem(100_003, STEPS, dtype, seed=2)
    check_against_reference(p0, grads, dtype, lr=3e-3, lr_mode="callable", weight_decay=0.01, decouple=True,
                            expect_clipping=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("decouple", [False, True])
def test_first_call_only_initialises_v(decouple, dtype):
    """First call: v = g*g (after maximize and L2 decay), nothing else; decoupled decay and
    the parameter update wait for the second call."""
    p0, grads = make_problem(50, 2, dtype, seed=3)
    wd = 0.1
    opt = flatopt.ADOPT(lr=0.1, weight_decay=wd, decouple=decouple, maximize=True)
    params = p0.copy()
    opt.step(params, grads[0])
    np.testing.assert_array_equal(params, p0)
    np.testing.assert_array_equal(opt.state["exp_avg"], 0)
    g = -grads[0].astype(np.float64) + (0 if decouple else wd * p0.astype(np.float64))
    tol = 4 if dtype == np.float32 else 1e-12
    if dtype == np.float64:
        assert_close64(opt.state["exp_avg_sq"], g * g, rtol=tol)
    else:
        assert_ulp_close(opt.state["exp_avg_sq"], (g * g).astype(np.float32), tol)
    opt.step(params, grads[1])
    assert not np.array_equal(params, p0)
    # Second call: the first update, clipped at 1**0.25 = 1 (|n| <= 1 so |m| <= 1 - b1).
    assert np.max(np.abs(opt.state["exp_avg"])) <= (1 - 0.9) * (1 + 1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_nan_and_inf_gradients_match_transcription(dtype):
    p0, grads = make_problem(64, 10, dtype, seed=4)
    grads[0][7] = np.nan
    grads[2][[3, 9]] = np.nan
    grads[3][[5, 11]] = np.inf
    grads[4][[6, 12]] = -np.inf
    opt, params, _ = run_flat(p0, grads, lr=1e-2, weight_decay=0.01)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        p, m, v, *_ = adopt_reference(p0, grads, lr=1e-2, weight_decay=0.01)
    assert_same_nonfinite(params, p)
    assert_same_nonfinite(opt.state["exp_avg"], m)
    assert_same_nonfinite(opt.state["exp_avg_sq"], v)
    assert np.isnan(p).any() and np.isfinite(p).any()


def authors_step(p, g, m, v, t, *, lr, betas, eps, weight_decay, decouple, clip, maximize=False, sqrt=None):
    """One call of the authors' single-tensor PyTorch code, operation by operation, on torch
    tensors (updated in place): torch's rounding of each operation is the reference's.  ``sqrt``
    replaces torch's own square root (MKL-VML's on the CPU, not correctly rounded); ``maximize``
    negates the gradient first, as torch.optim's optimizers do."""
    if maximize:
        g = -g
    if weight_decay != 0 and not decouple:
        g = g.add(p, alpha=weight_decay)
    if t == 0:
        v.addcmul_(g, g)
        return
    if weight_decay != 0 and decouple:
        p.add_(p, alpha=-lr * weight_decay)
    n = g.div((v.sqrt() if sqrt is None else sqrt(v)).clamp(min=eps))
    if clip is not None:
        n.clamp_(-clip(t), clip(t))
    m.lerp_(n, 1 - betas[0])
    p.add_(m, alpha=-lr)
    v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])


@pytest.mark.parametrize("weight_decay, decouple", [(0.0, False), (1e-2, True), (0.1, True), (0.1, False)])
def test_float32_follows_the_authors_torch_code(weight_decay, decouple):
    """float32 over 1500 steps against the authors' PyTorch code run in float32: within an ulp
    or two of the largest weight, NaN and inf where it has them (an infinite weight decays to
    NaN, inf - inf).  The decoupled decay is their ``p.add_(p, alpha=-lr*wd)``; as AdamW's
    product with ``1 - lr*wd`` (rounded to float32) it was 600-800 ulps off here."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal(1000).astype(np.float32)
    p0[[3, 7]] = np.inf, -np.inf
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(1500)]
    hp = dict(lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=weight_decay, decouple=decouple)
    opt, params = flatopt.ADOPT(**hp), p0.copy()
    ref = [torch.from_numpy(p0.copy()), torch.zeros(1000), torch.zeros(1000)]
    for t, g in enumerate(grads):
        opt.step(params, g)
        authors_step(*ref[:1], torch.from_numpy(g), *ref[1:], t, clip=default_clip, **hp)
    want = ref[0].numpy()
    assert_same_nonfinite(params, want)
    finite = np.isfinite(want)
    ulps = np.max(np.abs(params[finite] - want[finite])) / np.spacing(np.max(np.abs(want[finite])))
    record("ADOPT float32 vs the authors' torch code [ulp of the largest weight]", float(ulps))
    assert ulps <= 4, ulps


def tight_clip(t):
    return 0.1 * t**0.5


AUTHORS_CASES = [
    dict(betas=(0.9, 0.9999), weight_decay=0.0, decouple=False, maximize=False, clip="default"),
    dict(betas=(0.9, 0.999), weight_decay=0.1, decouple=False, maximize=True, clip="default"),
    dict(betas=(0.9, 0.99), weight_decay=0.1, decouple=True, maximize=False, clip="tight"),
    dict(betas=(0.5, 0.9), weight_decay=0.05, decouple=True, maximize=False, clip="none"),
    # lerp weight > 1/2; at 0.2, unlike 0.3, float32(1 - beta1) - 1 is not -beta1 rounded (asserted below)
    dict(betas=(0.2, 0.9), weight_decay=0.0, decouple=False, maximize=False, clip="tight"),
]


def test_the_lerp_case_tells_the_roundings_of_w_minus_one_apart():
    """The case above whose lerp weight exceeds 1/2 pins the rounding of ``w - 1`` in float32
    only if its two roundings differ there (at beta1 = 0.3 they coincide)."""
    (beta1, _), = [c["betas"] for c in AUTHORS_CASES if 1 - c["betas"][0] > 0.5]
    assert np.float32(1 - beta1) - np.float32(1) != np.float32((1 - beta1) - 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", AUTHORS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_bitwise_equal_to_the_authors_torch_code_with_a_correctly_rounded_sqrt(case, dtype):
    """Parameters and both moments bitwise equal to the authors' code given the same square
    root, call by call: pins the rounding of the decoupled decay, of ``p - lr*m``, of ``v``'s
    update and of the lerp's ``w - 1``, which the tolerances above let pass."""
    pytest.importorskip("torch")
    clip = {"default": default_clip, "tight": tight_clip, "none": None}[case["clip"]]
    hp = dict(lr=3e-3, eps=1e-6, **{k: v for k, v in case.items() if k != "clip"})
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(37).astype(dtype)
    grads = [rng.standard_normal(37).astype(dtype) for _ in range(40)]
    assert_calls_equal_the_authors(flatopt.ADOPT(clip_lambda=clip, **hp), p0, grads, clip, hp)


def assert_calls_equal_the_authors(opt, p0, grads, clip, hp):
    """``opt`` from ``p0`` through ``grads``: parameters and both moments bitwise equal to the
    authors' code given a correctly rounded square root, after every call.  Returns the params."""
    import torch
    params, p = p0.copy(), torch.from_numpy(p0.copy())
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads):
        opt.step(params, g)
        authors_step(p, torch.from_numpy(g.copy()), m, v, t, clip=clip, sqrt=correctly_rounded_sqrt, **hp)
        np.testing.assert_array_equal(params, p.numpy(), err_msg=f"params after call {t + 1}")
        np.testing.assert_array_equal(opt.state["exp_avg"], m.numpy(), err_msg=f"m after call {t + 1}")
        np.testing.assert_array_equal(opt.state["exp_avg_sq"], v.numpy(), err_msg=f"v after call {t + 1}")
    return params


@pytest.mark.parametrize("decouple", [False, True], ids=["l2", "decoupled"])
def test_a_weight_decay_that_rounds_to_zero_in_float32_decays_as_the_authors_code_does(decouple):
    """The authors' code tests ``weight_decay != 0`` on the Python float: 1e-300, 0 in float32,
    still adds ``0 * p`` (NaN where p is infinite, +0.0 to a gradient of -0.0)."""
    pytest.importorskip("torch")
    hp = dict(lr=3e-3, eps=1e-6, betas=(0.9, 0.999), weight_decay=1e-300, decouple=decouple, maximize=False)
    rng = np.random.default_rng(4)
    p0 = rng.standard_normal(37).astype(np.float32)
    p0[[0, 5]] = np.inf, -np.inf
    grads = [rng.standard_normal(37).astype(np.float32) for _ in range(4)]
    grads[0][1] = grads[1][1] = -0.0
    params = assert_calls_equal_the_authors(flatopt.ADOPT(**hp), p0, grads, default_clip, hp)
    assert np.isnan(params[0])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_flatopt_torch_adopt_follows_the_authors_code_per_parameter(dtype):
    """flatopt.torch.ADOPT with its defaults but lr and a weight decay, on three parameters, two
    of which skip steps (no gradient): each follows the authors' code with its own count of
    calls (its first call only sets v; the clip schedule runs on its own count), bitwise given
    the same square root.  Pins the adapter's defaults against the authors' signature: betas
    (0.9, 0.9999), eps 1e-6, clip t**0.25, and a weight decay added to the gradient
    (``decouple=False``), not decoupled."""
    torch = pytest.importorskip("torch")
    ft = pytest.importorskip("flatopt.torch")
    import inspect

    authors = dict(lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0, decouple=False)  # their signature
    signature = inspect.signature(ft.ADOPT).parameters
    assert {name: signature[name].default for name in authors} == authors
    tdtype = getattr(torch, dtype)
    rng = np.random.default_rng(7)
    shapes = [(5,), (3, 4), (7,)]
    params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s)).to(tdtype)) for s in shapes]
    refs = [(p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    calls = [0, 0, 0]
    hp = dict(authors, lr=3e-3, weight_decay=0.1)
    opt = ft.ADOPT(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
    for t in range(12):
        for i, p in enumerate(params):
            if (i == 1 and t % 3 == 0) or (i == 2 and t < 4):  # no gradient: not stepped, its count stays
                p.grad = None
                continue
            g = torch.from_numpy(rng.standard_normal(shapes[i])).to(tdtype)
            p.grad = g.clone()
            authors_step(*refs[i][:1], g, *refs[i][1:], calls[i], clip=default_clip, sqrt=correctly_rounded_sqrt,
                         **hp)
            calls[i] += 1
        opt.step()
    for p, (ref_p, ref_m, ref_v) in zip(params, refs):
        assert torch.equal(p.detach(), ref_p)
        assert torch.equal(opt.state[p]["exp_avg"], ref_m) and torch.equal(opt.state[p]["exp_avg_sq"], ref_v)


# ============================================================================== (b) optax
@pytest.fixture(scope="module")
def jax_x64():
    """optax in float64: enable jax_enable_x64 for this module, restore it afterwards."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", old)


def decoupled_decay_after_first_call(weight_decay):
    """``updates + wd * params`` from the second call on (the authors' decoupled decay is
    skipped on the first call).  Placed between scale_by_adopt and the lr scaling, the
    parameter update becomes ``-lr * (m + wd * p)``, i.e. ``p - lr*wd*p - lr*m``."""
    import jax
    import jax.numpy as jnp
    import optax

    def init(params):
        return jnp.zeros([], jnp.int32)

    def update(updates, count, params=None):
        scale = jnp.where(count > 0, weight_decay, 0.0)
        return jax.tree.map(lambda u, p: u + scale * p, updates, params), count + 1

    return optax.GradientTransformation(init, update)


def run_optax(p0, grads, *, lr, lr_mode, betas, eps, clip, weight_decay, decouple, maximize):
    import jax.numpy as jnp
    import optax

    if lr_mode == "callable":
        base = lr
        learning_rate = lambda t: base * (1.0 + 0.5 * jnp.sin(0.7 * t + 1.0))  # noqa: E731
    else:
        learning_rate = lr
    clip_fn = CLIPS[clip]
    adopt = optax.contrib.scale_by_adopt(b1=betas[0], b2=betas[1], eps=eps, use_clipping=clip_fn is not None,
                                         **({} if clip_fn is None else dict(clip_value_fn=clip_fn)))
    parts = []
    if weight_decay and not decouple:
        parts.append(optax.add_decayed_weights(weight_decay))  # L2: g + wd*p, first call included
    parts.append(adopt)
    if weight_decay and decouple:
        parts.append(decoupled_decay_after_first_call(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    tx = optax.chain(*parts)
    params = jnp.asarray(p0)
    state = tx.init(params)
    for g in grads:
        g = jnp.asarray(-g if maximize else g)
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params)


def test_optax_contrib_adopt_signature(jax_x64):
    """The reference's own defaults are the paper's (and flatopt's)."""
    import inspect

    import optax
    sig = inspect.signature(optax.contrib.adopt).parameters
    assert (sig["b1"].default, sig["b2"].default, sig["eps"].default) == (0.9, 0.9999, 1e-6)
    assert sig["use_clipping"].default is True
    assert sig["clip_value_fn"].default(16.0) == 2.0
    defaults = flatopt.ADOPT().hyperparameters()
    assert (defaults["betas"], defaults["eps"]) == ((0.9, 0.9999), 1e-6)


OPTAX_CASES = [
    dict(),  # the defaults
    dict(clip="none"),
    dict(clip="tight"),
    dict(clip="linear", betas=(0.5, 0.9)),
    dict(betas=(0.0, 0.5), eps=1e-2),
    dict(maximize=True, lr_mode="callable"),
    dict(weight_decay=0.1),
    dict(weight_decay=0.1, decouple=True),
    dict(weight_decay=0.05, decouple=True, maximize=True, clip="none", lr_mode="callable"),
    dict(weight_decay=0.3, clip="tight", betas=(0.8, 0.99), eps=1e-3),
]


@pytest.mark.parametrize("case", OPTAX_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_matches_optax_contrib_adopt_float64(jax_x64, case):
    options = dict(lr=3e-3, lr_mode="const", betas=(0.9, 0.9999), eps=1e-6, clip="default", weight_decay=0.0,
                   decouple=False, maximize=False)
    options.update(case)
    p0, grads = make_problem(300, STEPS, np.float64, seed=5)
    ref = run_optax(p0, grads, **options)
    _, params, _ = run_flat(p0, grads, **options)
    assert_close64(params, ref, rtol=1e-12, atol_scale=1e-13, what=f"ADOPT vs optax {case}")
    # The reference and the transcription agree too (both are independent of flatopt).
    lr = schedule(options["lr"]) if options["lr_mode"] == "callable" else options["lr"]
    p, *_ = adopt_reference(p0, grads, lr=lr, betas=options["betas"], eps=options["eps"],
                            weight_decay=options["weight_decay"], decouple=options["decouple"],
                            clip=CLIPS[options["clip"]], maximize=options["maximize"])
    assert_close64(ref, p, rtol=1e-12, atol_scale=1e-13, what="optax vs transcription")
