"""What CI relies on: a package the test extra should provide cannot go missing unnoticed."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

MISSING = """
import pytest
pytest.importorskip("flatopt_no_such_package")
def test_module_level():
    pass
"""
INSIDE = """
import pytest
def test_inside():
    pytest.importorskip("flatopt_no_such_package.sub")
def test_cupy_is_the_cuda_extras():
    pytest.importorskip("cupy_not_here_either".replace("_not_here_either", ""))
"""


def run(tmp_path, files, **env):
    """pytest on ``files`` (name -> source) beside this suite's conftest: its summary counts."""
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    for name, source in files.items():
        (tmp_path / name).write_text(source)
    environ = {k: v for k, v in os.environ.items() if k != "FLATOPT_REQUIRE_EXTRAS"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=dict(environ, **env), timeout=120)
    return re.sub(r" in [\d.]+s.*", "", done.stdout.splitlines()[-1]).strip("= ")


def test_a_missing_test_package_is_a_skip_locally_and_a_failure_in_ci(tmp_path):
    both = {"test_missing.py": MISSING, "test_inside.py": INSIDE}
    assert run(tmp_path, both) == "3 skipped"
    assert run(tmp_path, both, FLATOPT_REQUIRE_EXTRAS="1") == "1 error"  # the module's: collection stops
    (tmp_path / "test_missing.py").unlink()
    assert run(tmp_path, {"test_inside.py": INSIDE}, FLATOPT_REQUIRE_EXTRAS="1") == "1 failed, 1 skipped"


def test_ci_requires_the_extras_and_pytest_knows_every_option():
    assert "export FLATOPT_REQUIRE_EXTRAS=1" in (HERE.parent / ".ci" / "run").read_text()
    assert "--strict-config" in (HERE.parent / "pyproject.toml").read_text()
