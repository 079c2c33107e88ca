"""``flatopt bench`` smoke test and the bandwidth-floor kernels.  No timing assertions."""
import shutil
import sys

import numpy as np
import pytest

from flatopt.backend import split_chunks
from flatopt.kernels.floor import adam_floor, adam_floor_serial


@pytest.mark.parametrize("floor", [adam_floor, adam_floor_serial])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, nchunks", [(1, 1), (1000, 1), (1000, 7), (100_003, 8)])
def test_adam_floor_moves_adams_data(dtype, n, nchunks, floor):
    rng = np.random.default_rng(n)
    p, g, m, v = (rng.standard_normal(n).astype(dtype) for _ in range(4))
    ref_m, ref_v = m + g, v + g
    ref_p = p + ref_m
    g0 = g.copy()
    floor(p, g, m, v, split_chunks(((0, n, 0),), nchunks))
    # reads p, g, m, v and writes p, m, v: every element of every buffer touched, g unchanged
    np.testing.assert_array_equal(m, ref_m)
    np.testing.assert_array_equal(v, ref_v)
    np.testing.assert_array_equal(p, ref_p)
    np.testing.assert_array_equal(g, g0)


def test_bench_smoke(capsys):
    from flatopt.bench import FLOOR, main
    results = main(["--sizes", "1000,20000", "--rounds", "3"])
    out = capsys.readouterr().out
    assert sorted(results) == [1000, 20000]
    for n, rows in results.items():
        names = [r["name"] for r in rows]
        for name in ("flatopt Adam", "flatopt AdamW", FLOOR, "NumPy in place"):
            assert name in names
        assert f"n = {n:,}" in out
        if "flatopt.jax TreeOptimizer Adam, 200 leaves" in names:
            assert f"n = {n:,}, the JAX adapter" in out
        for r in rows:
            assert set(r) == {"name", "median", "iqr", "vs_floor", "vs_best_peer"}
            assert r["median"] > 0 and r["iqr"] >= 0
            assert r["vs_floor"] > 0
        floor = next(r for r in rows if r["name"] == FLOOR)
        assert floor["vs_floor"] == pytest.approx(1.0)
    for column in ("implementation", "median µs", "IQR µs", "x floor", "best peer / this"):
        assert column in out


def test_bench_peers_present_when_installed():
    pytest.importorskip("torch")
    from flatopt.bench import implementations
    impls, notes = implementations(1000, np.random.default_rng(0))
    for name in ("torch Adam foreach=False", "torch Adam foreach=True", "torch Adam fused=True",
                 "torch Adam foreach=False, 200 tensors", "torch Adam foreach=True, 200 tensors",
                 "torch Adam fused=True, 200 tensors"):
        assert name in impls
    for label in ("foreach=False", "foreach=True", "fused=True"):  # each on its own 200 tensors, as torch asked
        opt = impls[f"torch Adam {label}, 200 tensors"].__self__
        flag, value = label.split("=")
        assert len(opt.param_groups[0]["params"]) == 200 and opt.defaults[flag] is (value == "True")
    models = [impls[f"torch Adam {label}, 200 tensors"].__self__.param_groups[0]["params"][0]
              for label in ("foreach=False", "foreach=True", "fused=True")]
    assert len({p.data_ptr() for p in models}) == 3
    for fn in impls.values():  # every implementation runs a step
        fn()


def test_bench_quick_leaves_torchs_slowest_model_rows_out_and_says_so():
    pytest.importorskip("torch")
    from flatopt.bench import implementations
    impls, notes = implementations(1000, np.random.default_rng(0), quick=True)
    assert "torch Adam fused=True, 200 tensors" in impls and "torch Adam foreach=True" in impls
    assert not any(name in impls for name in ("torch Adam foreach=False, 200 tensors",
                                              "torch Adam foreach=True, 200 tensors"))
    assert any("foreach=False and foreach=True on the 200-tensor model are left out" in note for note in notes)


def test_bench_jax_rows_present_when_installed():
    pytest.importorskip("optax")
    from flatopt.bench import FLATOPT, FLOOR, implementations, jax_adapter_implementations
    impls, notes = implementations(1000, np.random.default_rng(0))
    assert "optax adam (jit, donated)" in impls
    impls = jax_adapter_implementations(1000, np.random.default_rng(0))
    ours = ["flatopt.jax as_optax Adam (jit, donated), 200 leaves", "flatopt.jax TreeOptimizer Adam, 200 leaves",
            "flatopt.jax update_and_apply Adam (jit, donated), 200 leaves"]
    assert set(impls) == {FLOOR, "optax adam (jit, donated), 200 leaves", *ours}
    for fn in impls.values():
        fn()
        fn()
    assert set(ours) <= set(FLATOPT)  # not counted among the peers


def test_bench_markdown_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from flatopt.bench import main
    png = tmp_path / "bench.png"
    main(["--sizes", "100,3000", "--rounds", "2", "--markdown", "--plot", str(png)])
    out = capsys.readouterr().out
    assert "| implementation | median µs/step |" in out
    assert png.stat().st_size > 1000
    lines = out.splitlines()
    notes = [i for i, line in enumerate(lines) if "note:" in line]
    assert notes and all(lines[i].startswith("- note: ") for i in notes)  # (at 100: fewer tensors)
    assert all(lines[i - 1] == "" or lines[i - 1].startswith("- note: ") for i in notes)


@pytest.mark.parametrize("args, message", [
    (["--sizes", "abc"], "expected numbers such as 1000,1e6, got 'abc'"),
    (["--sizes", "1000,0"], "sizes are whole numbers of 1 or more, got '0'"),
    (["--sizes", "1.5"], "sizes are whole numbers of 1 or more, got '1.5'"),
    (["--sizes", "inf"], "sizes are whole numbers of 1 or more, got 'inf'"),
    (["--rounds", "0"], "argument --rounds: expected 1 or more, got 0"),
    (["--plot", "/nonexistent-folder/bench.png"], "--plot: folder /nonexistent-folder does not exist"),
    (["--seed", "-1"], "argument --seed: expected 0 or more, got -1"),
    (["--plot", "bench.txt"], "does not end in a format matplotlib writes"),
    (["--plot", "plots"], "does not end in a format matplotlib writes"),  # matplotlib would write plots.png
    (["--plot", ""], "--plot needs a file name"),  # (was taken as no plot)
])
def test_bench_refuses_bad_arguments_before_it_runs(args, message, capsys, monkeypatch):
    """A bad size or round count was a traceback from deep inside the run (or, for
    ``--rounds 0``, the default taken silently), and a plot into a missing folder failed
    only after the whole run: each is now argparse's usage error, before anything is timed."""
    from flatopt import bench
    monkeypatch.setattr(bench, "implementations", lambda *a: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bench_sizes_run_once_each_in_order_and_a_plot_needs_matplotlib(monkeypatch, capsys):
    from flatopt import cli
    assert cli.sizes("1e5,1000,1000,30000") == [1000, 30000, 100000]  # (the plot joins them in this order)
    from flatopt import bench
    monkeypatch.setattr(bench, "implementations", lambda *a: pytest.fail("the run started"))
    monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", None)  # not installed
    with pytest.raises(SystemExit):
        bench.main(["--plot", "bench.png"])
    assert "--plot needs matplotlib" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("xelatex") is not None, reason="matplotlib writes .pgf with LaTeX installed")
def test_bench_refuses_pgf_without_latex_before_it_runs(tmp_path, capsys, monkeypatch):
    """matplotlib's pgf writer needs LaTeX (xelatex): without it, the plot failed with a
    traceback after the whole run."""
    pytest.importorskip("matplotlib")
    from flatopt import bench
    monkeypatch.setattr(bench, "implementations", lambda *a: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--plot", str(tmp_path / "bench.pgf")])
    assert exit_info.value.code == 2 and "--plot: matplotlib cannot write .pgf files here" in capsys.readouterr().err


def test_bench_refuses_a_plot_path_that_is_a_folder(tmp_path, capsys, monkeypatch):
    from flatopt import bench
    monkeypatch.setattr(bench, "implementations", lambda *a: pytest.fail("the run started"))
    (tmp_path / "plots.png").mkdir()
    with pytest.raises(SystemExit):
        bench.main(["--plot", str(tmp_path / "plots.png")])
    assert "cannot be written" in capsys.readouterr().err


def test_bench_says_when_the_many_tensor_models_are_smaller_than_their_names(capsys):
    from flatopt import bench
    bench.main(["--sizes", "10", "--rounds", "1"])
    assert "the 200-tensor and 200-leaf models have 10 tensors of one element at this size" in capsys.readouterr().out


def test_bench_ratios_below_a_tenth_keep_two_significant_digits():
    from flatopt import bench
    rows = [dict(name="slow peer", median=700.0, iqr=1.0, vs_floor=466.7, vs_best_peer=0.0023),
            dict(name="floor (Adam traffic)", median=1.5, iqr=0.1, vs_floor=1.0, vs_best_peer=None)]
    for markdown in (False, True):
        table = bench.format_table(1000, rows, markdown)
        assert "0.0023" in table and "0.00 " not in table and "466.70" in table


def test_bench_rows_keep_their_names_at_every_size_and_peers_own_their_tensors():
    """The plot joins rows by name: below 200 elements torch's many-tensor row was named for
    the tensors it had, a series of its own.  And the single-tensor torch peers shared one
    parameter, each stepping the others' weights."""
    pytest.importorskip("torch")
    from flatopt import bench
    names = [list(bench.implementations(n, np.random.default_rng(0))[0]) for n in (100, 1000)]
    assert names[0] == names[1] and "torch Adam fused=True, 200 tensors" in names[0]
    impls, _ = bench.implementations(1000, np.random.default_rng(0))
    steps = [impls[f"torch Adam {label}"] for label in ("foreach=False", "foreach=True", "fused=True")]
    weights = [step.__self__.param_groups[0]["params"][0] for step in steps]
    assert len({w.data_ptr() for w in weights}) == 3 and len({w.grad.data_ptr() for w in weights}) == 3


@pytest.mark.parametrize("quick", [True, False])
def test_bench_the_jax_table_takes_no_more_rounds_at_10_3_than_at_10_5(monkeypatch, quick):
    """Its steps take half a millisecond or more at every size: with the main table's count at
    10^3 (set for steps of microseconds) it took a third of a ``--quick`` run.  ``--rounds`` sets both."""
    from flatopt import bench
    taken = []  # (the table's implementations, rounds)
    real_measure = bench.measure
    monkeypatch.setattr(bench, "implementations",
                        lambda n, rng, quick=False: ({bench.FLOOR: lambda: None, "main": lambda: None}, []))
    monkeypatch.setattr(bench, "jax_adapter_implementations",
                        lambda n, rng: {bench.FLOOR: lambda: None, "jax": lambda: None})
    monkeypatch.setattr(bench, "measure", lambda impls, rounds, seed=0: (
        taken.append(("jax" in impls, rounds)), real_measure(impls, 1, seed))[1])
    options = ["--sizes", "1000,100000"] + (["--quick"] if quick else [])
    bench.main(options)
    main_1e3, jax_1e3, main_1e5, jax_1e5 = (rounds for _, rounds in taken)
    assert [jax for jax, _ in taken] == [False, True, False, True]
    assert main_1e3 > main_1e5 and jax_1e3 == jax_1e5 == main_1e5
    taken.clear()
    bench.main(options + ["--rounds", "4"])
    assert [rounds for _, rounds in taken] == [4, 4, 4, 4]
