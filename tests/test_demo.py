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
    results = demo.run(out=lambda line: None, names=["SGD+momentum", "RMSprop", "Adam", "AdamW", "ADOPT",
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
