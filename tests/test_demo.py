"""The demo trains a NumPy MLP on the bundled digits with every optimizer."""
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
from flatopt import demo  # noqa: E402


def test_every_optimizer_learns_and_the_run_is_deterministic():
    lines = []
    first = demo.run(epochs=4, seed=0, out=lines.append)
    second = demo.run(epochs=4, seed=0, out=lambda line: None)
    assert set(first) == set(demo.OPTIMIZERS)
    for name, result in first.items():
        assert result["accuracy"] > 0.8, (name, result["accuracy"])  # chance is 0.1
        assert result["losses"][-1] < result["losses"][0]
        assert result["losses"] == second[name]["losses"]
    assert any("test accuracy" in line for line in lines)


def test_default_demo_reaches_95_percent_except_plain_sgd():
    results = demo.run(out=lambda line: None, names=["SGD+momentum", "Momentum", "RMSprop", "Adam", "AdamW", "ADOPT",
                                                     "Lookahead(Adam)"])
    for name, result in results.items():
        assert result["accuracy"] >= 0.95, (name, result["accuracy"])


def test_cli_runs_and_plots(tmp_path):
    png = tmp_path / "loss.png"
    out = subprocess.run([sys.executable, "-m", "flatopt", "demo", "--epochs", "1", "--optimizers", "Adam,ADOPT",
                          "--plot", str(png)], capture_output=True, text=True, check=True).stdout
    assert "Adam" in out and "ADOPT" in out and "test accuracy" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_unknown_optimizer():
    result = subprocess.run([sys.executable, "-m", "flatopt", "demo", "--optimizers", "Nope"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "unknown optimizers" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "argument --epochs: expected 1 or more, got 0"),
    (["--epochs", "x"], "argument --epochs: expected a whole number, got 'x'"),
    (["--plot", "/nonexistent-folder/loss.png"], "--plot: folder /nonexistent-folder does not exist"),
    (["--seed", "-1"], "argument --seed: expected 0 or more, got -1"),
    (["--plot", "loss"], "does not end in a format matplotlib writes"),
    (["--plot", ""], "--plot needs a file name"),  # (was taken as no plot)
    (["--optimizers", ""], "argument --optimizers: expected names such as Adam,ADOPT"),
    (["--optimizers", "Adam,Nope"], "flatopt demo: error: unknown optimizers ['Nope']"),
])
def test_cli_refuses_bad_arguments_before_training(args, message, capsys, monkeypatch):
    """``--epochs 0`` was an IndexError after the runs; a plot into a missing folder failed
    after all of training."""
    from flatopt import cli
    monkeypatch.setattr(demo, "run", lambda **kw: pytest.fail("the demo started"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_cli_names_flatopt_for_an_unknown_option_before_the_command(command, capsys, monkeypatch):
    """``flatopt --bogus demo`` blamed the command: "flatopt demo: error"."""
    from flatopt import cli
    monkeypatch.setattr(demo, "run", lambda **kw: pytest.fail("the demo started"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--bogus", command])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "flatopt: error: unrecognized arguments: --bogus" in err


def test_cli_help_shows_no_none_defaults(capsys):
    from flatopt import cli
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: 30)" in out and "every optimizer" in out


def test_cli_refuses_a_plot_format_matplotlib_cannot_write_here_before_training(tmp_path, capsys, monkeypatch):
    """``.pgf`` is a format matplotlib knows, whose writer needs LaTeX: without it the plot
    failed with a traceback after all of training.  An empty figure with a title (text, which
    the pgf writer measures with LaTeX) is now written in the format first, in a scratch folder
    (the writer made to fail here as it fails without LaTeX)."""
    from matplotlib.figure import Figure

    from flatopt import cli
    monkeypatch.setattr(demo, "run", lambda **kw: pytest.fail("the demo started"))

    def savefig(self, path, **kwargs):
        assert not str(path).startswith(str(tmp_path))  # (a scratch file, not the plot's)
        raise RuntimeError("'xelatex' not found")
    monkeypatch.setattr(Figure, "savefig", savefig)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--plot", str(tmp_path / "loss.pgf")])
    assert exit_info.value.code == 2
    assert "--plot: matplotlib cannot write .pgf files here ('xelatex' not found)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_names_the_extra_a_missing_package_comes_with(capsys, monkeypatch):
    from flatopt import cli
    monkeypatch.setattr(demo, "run", lambda **kw: pytest.fail("the demo started"))
    monkeypatch.setitem(sys.modules, "sklearn", None)  # not installed
    with pytest.raises(SystemExit):
        cli.main(["demo"])
    assert "the demo needs scikit-learn: pip install 'flatopt[demo]'" in capsys.readouterr().err


def test_cli_runs_each_named_optimizer_once(monkeypatch):
    from flatopt import cli
    seen = []
    monkeypatch.setattr(demo, "run", lambda **kw: seen.append(kw["names"]))
    cli.main(["demo", "--optimizers", "Adam,ADOPT,Adam"])
    assert seen == [["Adam", "ADOPT"]]


def test_timed_steps_follow_a_warm_up_that_reaches_every_kernel(monkeypatch):
    """The µs-per-step column is the steady state: before the first timed step a throwaway
    optimizer has taken more steps than Lookahead's k (so its sync kernel is compiled or
    loaded too), on scratch copies of the buffers."""
    calls = []
    make = demo.OPTIMIZERS["Lookahead(Adam)"]

    def recorded():
        opt = make()
        step = opt.step

        def recording(params, grads):
            calls.append((opt, params))
            step(params, grads)

        opt.step = recording
        return opt

    monkeypatch.setitem(demo.OPTIMIZERS, "Lookahead(Adam)", recorded)
    demo.train("Lookahead(Adam)", demo.load_digits(0), epochs=1)
    trained, model_params = calls[-1]
    warm = calls[:next(i for i, (opt, _) in enumerate(calls) if opt is trained)]
    assert len(warm) > trained.k
    assert all(opt is not trained and params is not model_params for opt, params in warm)
