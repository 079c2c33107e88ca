"""flatopt.Momentum: the textbook exponentially weighted momentum,

    v_0 = 0,   g <- -g (maximize),   g <- g + wd * w,   v <- b*v + (1 - b)*g,   w <- w - lr*v,

against a float64 NumPy transcription of that formula over many steps, and the difference
from ``SGD(momentum=b, dampening=b)``, whose buffer starts as the first gradient (torch's
rule) instead of ``(1 - b) * g``.

Tolerances: float64 ``rtol=1e-12`` with ``atol = 1e-13 * M`` (M: the largest |w| along the
reference trajectory).  float32: ``max |flat - ref| <= max(K, 2 * e + 16) * ulp(M)`` against
the float64 run on the same float32 inputs, ``e`` being the error of the same transcription
in float32 NumPy arithmetic (with beta close to 1, float32-rounded beta and 1 - beta no
longer sum to one and every float32 evaluation drifts alike), K = MOMENTUM_F32_ULP_K.
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flatopt
from conftest import (DTYPES, SMALL_SIZES, assert_close64, assert_f32_like_plain_float32, assert_ulp_close, dtype_name,
                      make_problem, max_ulp_diff, sweep)

STEPS = 120
MOMENTUM_F32_ULP_K = 32  # float32 vs float64 transcription (measured max 20)


def momentum_reference(w0, grads, *, lr, beta, weight_decay=0.0, maximize=False, dtype=np.float64):
    """NumPy transcription, in float64 unless ``dtype`` says otherwise (every scalar rounded
    to it).  ``lr`` may be a callable of the step count.
    Returns (w, v, largest |w| along the way, largest |v| along the way)."""
    c = np.dtype(dtype).type
    w = np.asarray(w0).astype(dtype)
    v = np.zeros_like(w)
    beta, weight_decay = c(beta), c(weight_decay)
    scale = float(np.max(np.abs(w), initial=0.0))
    vscale = 0.0
    for t, g in enumerate(grads):
        lr_t = c(lr(t) if callable(lr) else lr)
        g = np.asarray(g).astype(dtype)
        if maximize:
            g = -g
        g = g + weight_decay * w
        v = beta * v + (c(1) - beta) * g
        w = w - lr_t * v
        scale = max(scale, float(np.max(np.abs(w), initial=0.0)))
        vscale = max(vscale, float(np.max(np.abs(v), initial=0.0)))
    return w, v, scale, vscale


def schedule(base):
    return lambda t: base * (1.0 + 0.5 * math.sin(0.7 * t + 1.0))


def run_momentum(w0, grads, *, lr, lr_mode="const", **kw):
    sched = schedule(lr)
    opt = flatopt.Momentum(lr=sched if lr_mode == "callable" else lr, **kw)
    w = w0.copy()
    for t, g in enumerate(grads):
        if lr_mode == "attr":
            opt.lr = sched(t)
        opt.step(w, g)
    return opt, w, (sched if lr_mode != "const" else lr)


def assert_params_close(w, ref, dtype, scale, what):
    """float64: 1e-12 relative to the float64 reference; float32: K ulps of the largest weight."""
    if dtype == np.float64:
        assert_close64(w, ref, rtol=1e-12, atol_scale=1e-13, scale=scale, what=what)
    else:
        assert_ulp_close(w, ref.astype(np.float32), MOMENTUM_F32_ULP_K, scale, what=what + " [ulp]")


def check(w0, grads, dtype, *, lr, lr_mode="const", **kw):
    opt, w, ref_lr = run_momentum(w0, grads, lr=lr, lr_mode=lr_mode, **kw)
    ref, v, scale, vscale = momentum_reference(w0, grads, lr=ref_lr, **kw)
    assert opt.group_state[0]["step"] == len(grads)
    if dtype == np.float64:
        assert_close64(w, ref, rtol=1e-12, atol_scale=1e-13, scale=scale, what="Momentum float64 params")
        assert_close64(opt.state["momentum_buffer"], v, rtol=1e-12, atol_scale=1e-13, what="Momentum float64 buffer")
    else:
        plain_w, plain_v, _, _ = momentum_reference(w0, grads, lr=ref_lr, dtype=np.float32, **kw)
        assert_f32_like_plain_float32(w, ref, plain_w, MOMENTUM_F32_ULP_K, scale, what="Momentum float32 params [ulp]")
        assert_f32_like_plain_float32(opt.state["momentum_buffer"], v, plain_v, MOMENTUM_F32_ULP_K, vscale,
                                      what="Momentum float32 buffer [ulp]")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("lr_mode", ["const", "attr", "callable"])
@pytest.mark.parametrize("weight_decay, maximize", [(0.0, False), (0.05, False), (0.0, True), (0.2, True)])
@pytest.mark.parametrize("beta", [0.5, 0.9, 0.99])
def test_matches_textbook_formula(beta, weight_decay, maximize, lr_mode, dtype):
    w0, grads = make_problem(257, STEPS, dtype, seed=1, spread=False)
    check(w0, grads, dtype, lr=0.05, lr_mode=lr_mode, beta=beta, weight_decay=weight_decay, maximize=maximize)


@sweep(40)
@given(n=st.sampled_from(SMALL_SIZES), beta=st.floats(1e-3, 0.999),
       weight_decay=st.one_of(st.just(0.0), st.floats(1e-4, 0.5)), maximize=st.booleans(), lr=st.floats(1e-4, 0.2),
       lr_mode=st.sampled_from(["const", "attr", "callable"]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_sweep_matches_textbook_formula(n, beta, weight_decay, maximize, lr, lr_mode, dtype, seed):
    w0, grads = make_problem(n, STEPS, dtype, seed)
    check(w0, grads, dtype, lr=lr, lr_mode=lr_mode, beta=beta, weight_decay=weight_decay, maximize=maximize)


# beta = 0 has its own tests: v = g at every step (the update is plain SGD).
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_beta_zero_updates_like_the_formula(dtype):
    w0, grads = make_problem(257, STEPS, dtype, seed=6)
    opt, w, _ = run_momentum(w0, grads, lr=0.05, beta=0.0, weight_decay=0.05)
    ref, _, scale, _ = momentum_reference(w0, grads, lr=0.05, beta=0.0, weight_decay=0.05)
    assert_params_close(w, ref, dtype, scale, "Momentum beta=0 params")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_beta_zero_keeps_the_buffer_equal_to_v(dtype):
    """With beta = 0 the formula gives v = g (+ wd*w): the state must hold it (it is what a
    checkpoint saves and what the next step starts from if beta is raised)."""
    w0, grads = make_problem(64, 3, dtype, seed=7, spread=False)
    opt, w, _ = run_momentum(w0, grads, lr=0.05, beta=0.0)
    _, v, _, _ = momentum_reference(w0, grads, lr=0.05, beta=0.0)
    np.testing.assert_allclose(opt.state["momentum_buffer"], v, rtol=1e-6 if dtype == np.float32 else 1e-15)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_beta_changed_between_steps(dtype):
    """Hyperparameters may change between steps: beta 0 for 10 steps, then 0.9 (a warm-up),
    then 0.5: the textbook recursion continues from the v it has."""
    w0, grads = make_problem(101, 40, dtype, seed=8, spread=False)
    betas = [0.0] * 10 + [0.9] * 20 + [0.5] * 10
    opt, w = flatopt.Momentum(lr=0.05, beta=betas[0]), w0.copy()
    ref, v = w0.astype(np.float64), np.zeros(101)
    scale = float(np.max(np.abs(ref)))
    for beta, g in zip(betas, grads):
        opt.beta = beta
        opt.step(w, g)
        v = beta * v + (1 - beta) * g.astype(np.float64)
        ref = ref - 0.05 * v
        scale = max(scale, float(np.max(np.abs(ref))))
    assert_params_close(w, ref, dtype, scale, "Momentum beta schedule")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_large_buffer_matches_textbook_formula(dtype):
    """1e5+ elements: flatopt's threaded path."""
    w0, grads = make_problem(100_003, 50, dtype, seed=2)
    check(w0, grads, dtype, lr=0.01, lr_mode="callable", beta=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_first_step_is_one_minus_beta_times_g(dtype):
    """v_1 = (1 - b) g: the first step moves w by lr*(1 - b)*g."""
    w0, grads = make_problem(64, 1, dtype, seed=3, spread=False)
    lr, beta = 0.1, 0.9
    opt, w = flatopt.Momentum(lr=lr, beta=beta), w0.copy()
    opt.step(w, grads[0])
    expected = w0.astype(np.float64) - lr * (1 - beta) * grads[0].astype(np.float64)
    if dtype == np.float64:
        assert_close64(w, expected, rtol=1e-15, atol_scale=1e-16, what="first step")
    else:
        assert_ulp_close(w, expected.astype(np.float32), 1, what="first step [ulp]")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_differs_from_sgd_with_dampening_on_the_first_step(dtype):
    """SGD(momentum=b, dampening=b) starts its buffer at g (torch's rule: no dampening on the
    first step), Momentum at (1 - b) g: the first steps differ by a factor 1/(1 - b) = 10."""
    w0, grads = make_problem(64, 1, dtype, seed=4, spread=False)
    lr, beta = 0.1, 0.9
    a, b = w0.copy(), w0.copy()
    momentum, sgd = flatopt.Momentum(lr=lr, beta=beta), flatopt.SGD(lr=lr, momentum=beta, dampening=beta)
    momentum.step(a, grads[0])
    sgd.step(b, grads[0])
    g, w = grads[0].astype(np.float64), w0.astype(np.float64)
    for got, expected in ((a, w - lr * (1 - beta) * g), (b, w - lr * g)):
        if dtype == np.float64:
            assert_close64(got, expected, rtol=1e-15, atol_scale=1e-16, what="first step")
        else:
            assert_ulp_close(got, expected.astype(np.float32), 1, what="first step [ulp]")
    np.testing.assert_array_equal(sgd.state["momentum_buffer"], grads[0])  # torch: buf_1 = g exactly
    np.testing.assert_allclose(momentum.state["momentum_buffer"], (1 - beta) * g,
                               rtol=1e-6 if dtype == np.float32 else 1e-15)
    assert np.all((a != b)[g != 0])


def test_converges_to_sgd_with_dampening_after_the_transient():
    """From the second step on both run v <- b v + (1 - b) g; with a constant gradient the
    two buffers are (1 - b**t) g and g: the gap shrinks like b**t."""
    g = np.full(8, 0.5)
    beta = 0.5
    momentum, sgd = flatopt.Momentum(lr=0.0, beta=beta), flatopt.SGD(lr=0.0, momentum=beta, dampening=beta)
    w1, w2 = np.zeros(8), np.zeros(8)
    for t in range(1, 40):
        momentum.step(w1, g)
        sgd.step(w2, g)
        np.testing.assert_allclose(momentum.state["momentum_buffer"], (1 - beta**t) * g, rtol=1e-15)
        np.testing.assert_array_equal(sgd.state["momentum_buffer"], g)


def test_measured_float32_error_is_small():
    """Documents the float32 accuracy the bound above allows for: a long run (500 steps)."""
    w0, grads = make_problem(1001, 500, np.float32, seed=5, spread=False)
    _, w, _ = run_momentum(w0, grads, lr=0.01, beta=0.9)
    ref, _, scale, _ = momentum_reference(w0, grads, lr=0.01, beta=0.9)
    assert max_ulp_diff(w, ref.astype(np.float32), scale) <= MOMENTUM_F32_ULP_K
