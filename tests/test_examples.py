"""The copyable examples run as shipped."""
import pathlib
import subprocess
import sys

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
