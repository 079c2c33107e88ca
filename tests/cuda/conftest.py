"""tests/cuda: the CUDA backend under Numba's CUDA simulator, in its own pytest run:

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda -q -p no:cacheprovider

The simulator must be switched on before ``numba.cuda`` is first imported, so it cannot be
turned on from here for a run that also holds other tests.  Without it these tests run on a
real GPU when one is present (same assertions: the kernels are bitwise equal to the CPU
kernels there too) and are skipped otherwise, with the command above as the reason.
"""
from pathlib import Path

import pytest
from numba import config

SIMULATOR = bool(config.ENABLE_CUDASIM)
HERE = Path(__file__).resolve().parent


def _real_gpu():
    if SIMULATOR:
        return False
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:  # noqa: BLE001 - no driver, no numba-cuda: no GPU
        return False


RUNNABLE = SIMULATOR or _real_gpu()
REASON = ("CUDA backend tests need NUMBA_ENABLE_CUDASIM=1 (set before numba.cuda is imported; run them on their own: "
          "`NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda -q -p no:cacheprovider`) or a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if RUNNABLE:
        return
    skip = pytest.mark.skip(reason=REASON)
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)
