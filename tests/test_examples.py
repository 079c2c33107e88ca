"""The copyable examples run as shipped."""
import ast
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
NEEDS = {"numpy_mlp.py": "sklearn", "jax_optax.py": "optax", "torch_adamw_scheduler.py": "torch"}


def test_every_example_is_run():
    """The examples below are those in the folder (a folder missing, from an sdist say, would
    leave nothing to run and every example untested)."""
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(NEEDS)


@pytest.mark.parametrize("script", sorted(NEEDS))
def test_example_runs(script):
    pytest.importorskip(NEEDS.get(script, "numpy"))
    result = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("script", sorted(NEEDS))
def test_an_examples_install_line_installs_a_project_extra(script):
    """The line a newcomer pastes installs this project with one of its extras, whose pins hold
    (a bare ``torch`` beside ``-e .`` pulled the newest torch, a CUDA build of several GB)."""
    doc = ast.get_docstring(ast.parse((EXAMPLES / script).read_text()))
    lines = [line.strip() for line in doc.splitlines() if line.strip().startswith("pip install")]
    assert len(lines) == 1, lines
    extras = tomllib.loads((EXAMPLES.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    match = re.fullmatch(r'pip install -e "\.\[(\w+)\]" && python examples/' + re.escape(script), lines[0])
    assert match and match.group(1) in extras, lines[0]
