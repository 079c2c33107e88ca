"""The copyable examples run as shipped."""
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
NEEDS = {"numpy_mlp.py": "sklearn", "jax_optax.py": "optax", "torch_adamw_scheduler.py": "torch"}


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(script):
    pytest.importorskip(NEEDS.get(script, "numpy"))
    result = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
