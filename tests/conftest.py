"""Shared helpers for the parity suites (test_parity_torch, test_adopt, test_lookahead_parity,
test_momentum).

Import the helpers with ``from conftest import ...`` (``tests/`` has no ``__init__.py``, so
pytest puts it on ``sys.path``).  Nothing here is autouse and nothing imports torch, jax or
optax at module level: the other suites (and the CUDA simulator run) are not affected.

Tolerance vocabulary used by the suites:

* ``max_ulp_diff(got, ref)``: ``max |got - ref|`` in units of ``ulp(max |ref|)`` in ref's
  dtype, so a number near 1 means "one rounding of the largest parameter".  This is robust
  for elements near zero, whose relative error is meaningless after many steps.
* ``assert_close64(got, ref)``: float64, ``rtol=1e-12`` plus an ``atol`` of ``1e-14 *
  max |ref|`` (elements that pass through zero have no meaningful relative error).
* ``assert_same_nonfinite(got, ref)``: NaN and +-Inf at the same positions.
"""
import atexit
import contextlib
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

# The threaded paths are tested on any machine: on one core (the CPUs this process may run on,
# as Numba counts them) Numba would start one thread and never take them.  Set before anything
# imports Numba, which reads it once.
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
if CPUS < 2:
    os.environ.setdefault("NUMBA_NUM_THREADS", "2")
NUMBA_THREADS = int(os.environ.get("NUMBA_NUM_THREADS") or CPUS)
needs_threads = pytest.mark.skipif(NUMBA_THREADS < 2, reason="NUMBA_NUM_THREADS=1: no step is threaded")

import numpy as np  # noqa: E402
from hypothesis import settings  # noqa: E402

# The same examples in every run unless FLATOPT_SWEEP_RANDOM=1 asks for fresh ones (a CI run
# must not fail on an example no earlier run drew).  Nothing is written into the checkout:
# no example database, and Hypothesis's other caches go to a temporary directory.
settings.register_profile("flatopt", derandomize=os.environ.get("FLATOPT_SWEEP_RANDOM") != "1", database=None)
settings.load_profile("flatopt")
if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = tempfile.mkdtemp(prefix="flatopt-hypothesis-")
    atexit.register(shutil.rmtree, os.environ["HYPOTHESIS_STORAGE_DIRECTORY"], ignore_errors=True)

# CI (FLATOPT_REQUIRE_EXTRAS=1, set by .ci/run): a test skipped because a package of the test
# extra could not be imported fails instead, so that a README install step lacking a package
# fails the run rather than passing it with skips.  CuPy is the cuda extra's, not the test's.
REQUIRE_EXTRAS = os.environ.get("FLATOPT_REQUIRE_EXTRAS") == "1"
NOT_IN_TEST_EXTRA = {"cupy"}


def _missing_package_fails(report):
    if not (REQUIRE_EXTRAS and report.skipped):
        return
    found = re.search(r"could not import '([\w.]+)'", str(report.longrepr))
    if found and found.group(1).split(".")[0] not in NOT_IN_TEST_EXTRA:
        report.outcome = "failed"
        report.longrepr = (f"{found.group(1)} could not be imported: is a package of the test extra "
                           "(pip install -e '.[test]') missing? "
                           "(FLATOPT_REQUIRE_EXTRAS=1 turns this skip into a failure)")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _missing_package_fails(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _missing_package_fails(outcome.get_result())


DTYPES = (np.float32, np.float64)

# Sizes used by the sweeps: 1, tiny odd lengths, lengths around SIMD widths (8/16 float32,
# 4/8 float64), and a few thousand.  The 1e5-scale sizes appear only in fixed cases.
SMALL_SIZES = (1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 127, 200, 257, 1000, 1001, 4099)
LARGE_SIZE = 100_003  # odd and above flatopt's parallel threshold (2**15): the prange path


def sweep(max_examples):
    """Hypothesis settings for the sweeps: ``max_examples`` by default (keeps the suites
    fast), ``FLATOPT_SWEEP_EXAMPLES`` examples when that variable is set (deeper runs; with
    ``FLATOPT_SWEEP_RANDOM=1`` they are new examples each run)."""
    from hypothesis import HealthCheck
    n = int(os.environ.get("FLATOPT_SWEEP_EXAMPLES", max_examples))
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dtype_name(dtype):
    return np.dtype(dtype).name


def correctly_rounded_sqrt(t):
    """The square root of a CPU tensor, correctly rounded as flatopt's kernels take it (torch's
    own is MKL-VML's, which is not): for references that replay torch's rules operation by
    operation."""
    import torch
    return torch.from_numpy(np.sqrt(t.numpy()))


def ulp(x, dtype):
    """Spacing of float ``x`` in ``dtype`` (the gap to the next representable number)."""
    return float(np.spacing(np.asarray(abs(x), dtype=dtype)))


def max_ulp_diff(got, ref, scale=None):
    """``max |got - ref| / ulp(scale)`` over the finite elements, ulp taken in ref's dtype.

    ``scale`` defaults to ``max |ref|``; the torch suites pass the largest parameter
    magnitude seen along the whole trajectory (each step rounds at that magnitude, so that
    is the unit in which accumulated rounding is measured).  Non-finite positions must agree.
    """
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert_same_nonfinite(got, ref)
    finite = np.isfinite(ref)
    if not finite.any():
        return 0.0
    if scale is None:
        scale = np.max(np.abs(ref[finite].astype(np.float64)))
    unit = ulp(scale, ref.dtype) if scale > 0 else float(np.finfo(ref.dtype).smallest_subnormal)
    diff = np.max(np.abs(got[finite].astype(np.float64) - ref[finite].astype(np.float64)))
    return float(diff / unit)


def max_rel_diff(got, ref):
    """``max |got - ref| / max |ref|`` (a norm-wise relative difference, finite elements)."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    finite = np.isfinite(ref)
    scale = np.max(np.abs(ref[finite])) if finite.any() else 0.0
    if scale == 0:
        return float(np.max(np.abs(got[finite] - ref[finite]), initial=0.0))
    return float(np.max(np.abs(got[finite] - ref[finite]), initial=0.0) / scale)


def assert_same_nonfinite(got, ref):
    got, ref = np.asarray(got), np.asarray(ref)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref), err_msg="NaN positions differ")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(ref), err_msg="+Inf positions differ")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref), err_msg="-Inf positions differ")


def assert_ulp_close(got, ref, k, scale=None, what=""):
    """``max |got - ref| <= k * ulp(scale)`` (see :func:`max_ulp_diff`); records the value."""
    d = max_ulp_diff(got, ref, scale)
    record(what or "ulp", d)
    assert d <= k, f"{what}: max diff {d:.4g} ulp(scale) > {k}"
    return d


def assert_f32_like_plain_float32(got, exact, plain, k, scale=None, what=""):
    """float32 against a formula transcribed in NumPy: ``exact`` is the transcription run in
    float64, ``plain`` the same transcription run in float32 arithmetic.  Criterion::

        max |got - exact| <= max(k, 2 * max |plain - exact| + 16)   [ulps of scale]

    i.e. within ``k`` ulps, or -- where the rule itself amplifies rounding (a ratio of
    cancelling terms, a recursion whose float32-rounded coefficients do not sum to one) --
    no worse than twice what an honest float32 evaluation of the formula achieves.  Where
    the plain float32 transcription is accurate the bound is just ``k``.
    """
    exact32 = np.asarray(exact).astype(np.float32)
    err = max_ulp_diff(got, exact32, scale)
    err_plain = max_ulp_diff(plain, exact32, scale)
    record(what or "f32 vs plain", err)
    record((what or "f32 vs plain") + " / plain float32", err / max(err_plain, 1.0))
    bound = max(k, 2 * err_plain + 16)
    assert err <= bound, f"{what}: {err:.4g} ulps > max({k}, 2 * {err_plain:.4g} + 16)"
    return err


def assert_close64(got, ref, rtol=1e-12, atol_scale=1e-14, scale=None, what=""):
    """float64: ``|got - ref| <= atol + rtol*|ref|`` with ``atol = atol_scale * scale``;
    ``scale`` defaults to ``max |ref|`` (pass the trajectory's largest |param| instead)."""
    ref = np.asarray(ref, dtype=np.float64)
    assert_same_nonfinite(got, ref)
    finite = np.isfinite(ref)
    if scale is None:
        scale = np.max(np.abs(ref[finite]), initial=0.0)
    got = np.asarray(got, dtype=np.float64)
    record((what or "f64") + " rel", max_rel_diff(got, ref))
    np.testing.assert_allclose(got[finite], ref[finite], rtol=rtol, atol=atol_scale * scale, err_msg=what)


def make_problem(n, steps, dtype, seed=0, spread=True):
    """Initial parameters and a list of gradients, all in ``dtype``.

    With ``spread`` the gradients' magnitudes vary over about five decades per element and
    per step (so that ``eps``, clipping and the sign of every term matter), and a few
    gradients are exactly zero.
    """
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n).astype(dtype)
    grads = []
    for _ in range(steps):
        g = rng.standard_normal(n)
        if spread:
            g *= 10.0 ** rng.uniform(-4, 1, size=n)
            g[rng.random(n) < 0.02] = 0.0
        grads.append(g.astype(dtype))
    return p0, grads


# --- measured tolerances ------------------------------------------------------------------
# Every ulp / relative comparison records its value under a label; with
# FLATOPT_REPORT_TOLERANCES=1 the largest value per label is printed at the end of the run
# (that is how the bounds in the suites were chosen).  Off by default: no output.
MEASURED = {}


def record(label, value):
    if value == value:  # not NaN
        MEASURED[label] = max(MEASURED.get(label, 0.0), float(value))


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("FLATOPT_REPORT_TOLERANCES") and MEASURED:
        terminalreporter.section("largest measured differences (per label)")
        for label in sorted(MEASURED):
            terminalreporter.write_line(f"{label:60s} {MEASURED[label]:.4g}")


@pytest.fixture
def rng():
    """A seeded NumPy generator for non-hypothesis tests (hypothesis tests draw a seed)."""
    return np.random.default_rng(20240601)


def in_workqueue_process(code, **env):
    """``code``'s printed words, run in a new process on Numba's ``workqueue`` threading layer
    with two threads (so that large steps are threaded on a machine of any size), with ``env``
    added to the environment; its stderr (Numba's abort message, say) if it fails."""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2", **env)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


_INTERRUPTING = {}


@pytest.fixture
def ctrl_c_as_kernels_return(monkeypatch):
    """The serial float32 CPU kernels of ``names`` (``fixture(*names)``) raise a
    KeyboardInterrupt as they return, as Python raises a Ctrl-C that arrives during a compiled
    call: a Numba function runs the kernel, then sets Python's interrupt flag (no Python frame
    in between), and the frame that called it raises at its next instruction.  For optimizers
    made after the call (a prepared step keeps the kernel it was made with)."""
    import ctypes

    import numba

    from flatopt.backend import CPU
    from flatopt.kernels import cpu

    if "driver" not in _INTERRUPTING:
        set_interrupt = ctypes.CFUNCTYPE(None)(("PyErr_SetInterrupt", ctypes.pythonapi))

        @numba.njit
        def kernel_then_interrupt(rule, params, grads, s0, s1, s2, chunks, table):
            cpu.run_serial(rule, params, grads, s0, s1, s2, chunks, table)
            set_interrupt()
        _INTERRUPTING["driver"] = kernel_then_interrupt

    def interrupting(*names):
        for name in names:
            _, rule, unused = CPU._kernel(name, False, np.dtype(np.float32))
            monkeypatch.setitem(CPU._kernels, (name, False, "f", False), (_INTERRUPTING["driver"], rule, unused))
    return interrupting


@contextlib.contextmanager
def collector_off():
    """The garbage collector off inside the block (what is freed there is freed by reference
    counts alone), as it was after it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
