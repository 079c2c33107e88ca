"""flatopt.Lookahead(inner) against (a) the seed's reference wrapper around torch.optim,
written out below, and (b) pytorch-optimizer's Lookahead.

(a) The reference keeps cloned slow weights and every k steps does
``p.mul_(alpha).add_(q, alpha=1 - alpha); q.copy_(p)``: one product, then one FMA, the way
flatopt's sync kernel rounds it.  With an inner optimizer that flatopt reproduces bitwise
(SGD vs ``foreach=False``; Adam/AdamW vs ``fused=True`` on the fused kernel's SIMD body) the
whole run is bitwise equal: parameters and slow weights.  The fused kernel's scalar tail
(last ``n % 16`` float32 / ``n % 8`` float64 elements) is checked to a few ulps.

(b) pytorch-optimizer 4.1 syncs with ``torch._foreach_lerp_(p, slow, 1 - alpha)``, a
different rounding of the same formula: a few ulps (bound below, measured max in comment).
"""
import numpy as np
import pytest

import flatopt
from conftest import DTYPES, assert_close64, assert_ulp_close, dtype_name, make_problem, max_ulp_diff, record

torch = pytest.importorskip("torch")
from seed_lookahead import SeedLookahead  # noqa: E402 - the seed's reference wrapper, needs torch

STEPS = 50
N = 203  # odd: 192 elements in the fused kernel's SIMD body (both dtypes), 11 / 3 in its tail
FUSED_TAIL_ULP_K = 8  # Adam inner, fused kernel's scalar tail (measured max 0.5)
LERP_ULP_K = 8  # vs pytorch-optimizer's lerp-based sync (measured max 4)
FUSED_SIMD = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.fixture(autouse=True, scope="module")
def torch_single_thread():
    """torch's fused kernel results do not depend on its thread count; one thread avoids
    waking an OpenMP thread per step on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


INNERS = {
    # name: (flatopt inner factory, torch inner factory, bitwise on the whole buffer?)
    "sgd": (lambda: flatopt.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
            lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=False),
            True),
    "adam": (lambda: flatopt.Adam(lr=1e-2, weight_decay=1e-2),
             lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2, fused=True), False),
    "adamw-amsgrad": (lambda: flatopt.AdamW(lr=1e-2, amsgrad=True, maximize=True),
                      lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, maximize=True, fused=True), False),
}


def simd_prefix(n, dtype, whole):
    if whole:
        return n
    return n - n % (64 // np.dtype(dtype).itemsize) if FUSED_SIMD else 0


def run_pair(inner, k, alpha, dtype, n=N, steps=STEPS, seed=0, on_step=None):
    make_flat, make_torch, whole = INNERS[inner]
    p0, grads = make_problem(n, steps, dtype, seed)
    la, params = flatopt.Lookahead(make_flat(), k=k, alpha=alpha), p0.copy()
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    ref = SeedLookahead(make_torch([tp]), k=k, alpha=alpha)
    for i, g in enumerate(grads):
        la.step(params, g)
        tp.grad = torch.from_numpy(g.copy())
        ref.step()
        if on_step is not None:
            on_step(i, la, params, tp, ref)
    return la, params, tp, ref, p0, whole


def check_equal(got, ref, dtype, whole, what):
    k = simd_prefix(len(ref), dtype, whole)
    np.testing.assert_array_equal(got[:k], ref[:k], err_msg=what)
    if k < len(ref):
        assert_ulp_close(got[k:], ref[k:], FUSED_TAIL_ULP_K,
                         scale=max(float(np.max(np.abs(ref))), float(np.max(np.abs(got)))),
                         what=f"Lookahead(Adam) fused tail {dtype_name(dtype)} [ulp]")


# ================================================================ (a) the seed's reference
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("k", [1, 2, 5, 7])
@pytest.mark.parametrize("inner", list(INNERS))
def test_matches_seed_reference(inner, k, alpha, dtype):
    la, params, tp, ref, _, whole = run_pair(inner, k, alpha, dtype)
    check_equal(params, tp.detach().numpy(), dtype, whole, "fast weights")
    check_equal(la.slow, ref.slow_weights[0][0].numpy(), dtype, whole, "slow weights")
    assert la.step_count == STEPS


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_matches_seed_reference_large_buffer(dtype):
    """1e5+ elements: flatopt's threaded sync kernel."""
    la, params, tp, ref, _, whole = run_pair("sgd", 3, 0.6, dtype, n=100_003)
    np.testing.assert_array_equal(params, tp.detach().numpy())
    np.testing.assert_array_equal(la.slow, ref.slow_weights[0][0].numpy())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_synchronisation_schedule(dtype):
    """Fast and slow weights coincide exactly after every k-th step and only then; the slow
    weights only change at those steps."""
    k = 4
    seen = []

    def on_step(i, la, params, tp, ref):
        seen.append((np.array_equal(params, la.slow), la.slow.copy()))

    run_pair("sgd", k, 0.5, dtype, steps=3 * k, on_step=on_step)
    for i, (synced, _) in enumerate(seen):
        assert synced == ((i + 1) % k == 0), i
    for i in range(1, len(seen)):
        changed = not np.array_equal(seen[i][1], seen[i - 1][1])
        assert changed == ((i + 1) % k == 0), i


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_k_and_alpha_changed_between_steps(dtype):
    """``k`` and ``alpha`` are read at every step, as by the reference wrapper: a pull comes
    when the total step count is a multiple of the current ``k``."""
    changes = {6: dict(k=3), 13: dict(alpha=0.2), 20: dict(k=4), 27: dict(k=1, alpha=0.7)}
    pulls = []

    def on_step(i, la, params, tp, ref):
        pulls.append(np.array_equal(params, la.slow))
        np.testing.assert_array_equal(params, tp.detach().numpy(), err_msg=f"fast weights, step {i + 1}")
        np.testing.assert_array_equal(la.slow, ref.slow_weights[0][0].numpy(), err_msg=f"slow weights, step {i + 1}")
        for name, value in changes.get(i + 1, {}).items():
            setattr(la, name, value)
            setattr(ref, name, value)

    run_pair("sgd", 5, 0.5, dtype, steps=32, on_step=on_step)
    synced = [i + 1 for i, s in enumerate(pulls) if s]
    assert synced == [5, 9, 12, 15, 18, 24, 28, 29, 30, 31, 32]  # k = 5 to step 6, 3 to 20, 4 to 27, then 1


# ============================================================= edge cases: k = 1, alpha 0/1
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("inner", list(INNERS))
def test_alpha_zero_pulls_back_to_the_start(inner, dtype):
    """alpha = 0: every sync resets the fast weights to the slow ones, which never move."""
    k = 3

    def on_step(i, la, params, tp, ref):
        if (i + 1) % k == 0:
            np.testing.assert_array_equal(params, p0_holder[0])

    p0_holder = [make_problem(N, STEPS, dtype, 0)[0]]
    la, params, tp, ref, p0, _ = run_pair(inner, k, 0.0, dtype, steps=30, on_step=on_step)
    np.testing.assert_array_equal(la.slow, p0)
    np.testing.assert_array_equal(params, p0)  # 30 is a multiple of k


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("inner", list(INNERS))
def test_k1_alpha_zero_never_moves(inner, dtype):
    la, params, tp, ref, p0, _ = run_pair(inner, 1, 0.0, dtype, steps=20)
    np.testing.assert_array_equal(params, p0)
    np.testing.assert_array_equal(tp.detach().numpy(), p0)
    # The inner optimizer still ran: its state moved.
    assert any(np.any(buf != 0) for buf in la.inner.state.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("inner", list(INNERS))
def test_alpha_one_is_the_inner_optimizer_alone(inner, k, dtype):
    """alpha = 1: slow <- fast, fast unchanged: bitwise the inner optimizer on its own."""
    make_flat, _, _ = INNERS[inner]
    la, params, tp, ref, p0, whole = run_pair(inner, k, 1.0, dtype)
    alone, plain = make_flat(), p0.copy()
    for g in make_problem(N, STEPS, dtype, 0)[1]:
        alone.step(plain, g)
    np.testing.assert_array_equal(params, plain)
    check_equal(params, tp.detach().numpy(), dtype, whole, "alpha=1 vs seed reference")


# ===================================================================== slow_weights()
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_slow_weights_context(inner, dtype):
    """Inside ``with la.slow_weights(params)``: params hold the slow weights (the reference's
    ``q``); after it: the fast weights again, and the run continues bitwise as if the block
    had not been there."""
    k = 5

    def on_step(i, la, params, tp, ref):
        fast = params.copy()
        with la.slow_weights(params) as inside:
            assert inside is params
            check_equal(params, ref.slow_weights[0][0].numpy(), dtype, INNERS[inner][2], "inside the block")
            if (i + 1) % k:  # between syncs the slow weights lag behind
                assert not np.array_equal(params, fast)
        np.testing.assert_array_equal(params, fast)

    la, params, tp, ref, _, whole = run_pair(inner, k, 0.5, dtype, steps=23, on_step=on_step)
    check_equal(params, tp.detach().numpy(), dtype, whole, "after the run")


def test_slow_weights_restores_fast_weights_on_error():
    la, params = flatopt.Lookahead(flatopt.SGD(lr=0.1), k=5), np.ones(10)
    la.step(params, np.ones(10))
    fast = params.copy()
    with pytest.raises(RuntimeError):
        with la.slow_weights(params):
            np.testing.assert_array_equal(params, np.ones(10))
            raise RuntimeError("evaluation failed")
    np.testing.assert_array_equal(params, fast)


def test_slow_weights_before_the_first_step_are_the_params():
    la, params = flatopt.Lookahead(flatopt.SGD(lr=0.1)), np.arange(5.0)
    with la.slow_weights(params) as inside:
        np.testing.assert_array_equal(inside, np.arange(5.0))
    np.testing.assert_array_equal(params, np.arange(5.0))


# ====================================================== (b) pytorch-optimizer's Lookahead
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
# (pytorch-optimizer's Lookahead refuses alpha = 1)
@pytest.mark.parametrize("k, alpha", [(1, 0.5), (5, 0.5), (3, 0.8), (6, 0.2), (4, 0.0), (4, 0.95)])
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_matches_pytorch_optimizer_lookahead(inner, k, alpha, dtype):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    make_flat, make_torch, whole = INNERS[inner]
    p0, grads = make_problem(N, STEPS, dtype, seed=1)
    la, params = flatopt.Lookahead(make_flat(), k=k, alpha=alpha), p0.copy()
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    ref = pytorch_optimizer.Lookahead(make_torch([tp]), k=k, alpha=alpha, pullback_momentum="none")
    scale = float(np.max(np.abs(p0)))
    for i, g in enumerate(grads):
        la.step(params, g)
        tp.grad = torch.from_numpy(g.copy())
        ref.step()
        scale = max(scale, float(np.max(np.abs(tp.detach().numpy()))))
        if i == STEPS // 2:  # its evaluation swap against slow_weights()
            ref.backup_and_load_cache()
            with la.slow_weights(params):
                assert_ulp_close(params, tp.detach().numpy(), LERP_ULP_K, scale,
                                 what=f"vs pytorch-optimizer slow weights {dtype_name(dtype)} [ulp]")
            ref.clear_and_load_backup()
    got, want = params, tp.detach().numpy()
    if dtype == np.float64:
        record("vs pytorch-optimizer float64 [ulp]", max_ulp_diff(got, want, scale))
        assert_close64(got, want, rtol=1e-12, atol_scale=1e-13, scale=scale, what="vs pytorch-optimizer")
    else:
        assert_ulp_close(got, want, LERP_ULP_K, scale, what="vs pytorch-optimizer float32 [ulp]")
    slow = ref.state[tp]["slow_params"].numpy()
    assert_ulp_close(la.slow, slow, LERP_ULP_K, scale, what=f"slow vs pytorch-optimizer {dtype_name(dtype)} [ulp]")


@pytest.mark.parametrize("api", ["core", "flatopt.torch"])
def test_defaults_are_the_references(api):
    """``k`` and ``alpha`` left out are the paper's, the seed reference's and pytorch-optimizer's
    (every other test here passes both): the defaults of each reference's signature, and a run
    with them left out bitwise equal to the seed reference's with its own defaults."""
    import inspect

    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    ft = pytest.importorskip("flatopt.torch")
    ours = flatopt.Lookahead if api == "core" else ft.Lookahead
    names = ("k", "alpha")
    for ref in (SeedLookahead, pytorch_optimizer.Lookahead):
        ref_defaults = {n: inspect.signature(ref).parameters[n].default for n in names}
        assert {n: inspect.signature(ours).parameters[n].default for n in names} == ref_defaults, ref
    p0, grads = make_problem(N, 13, np.float64)
    ref_param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    ref = SeedLookahead(torch.optim.SGD([ref_param], lr=0.05, momentum=0.9, foreach=False))
    if api == "core":
        la, params = flatopt.Lookahead(flatopt.SGD(lr=0.05, momentum=0.9)), p0.copy()
    else:
        param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
        la = ft.Lookahead(ft.SGD([param], lr=0.05, momentum=0.9))
    for g in grads:
        ref_param.grad = torch.from_numpy(g.copy())
        ref.step()
        if api == "core":
            la.step(params, g.copy())
        else:
            param.grad = torch.from_numpy(g.copy())
            la.step()
    got = params if api == "core" else param.detach().numpy()
    np.testing.assert_array_equal(got, ref_param.detach().numpy())
