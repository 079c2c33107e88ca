#!/usr/bin/env bash
# Everything that needs a real CUDA GPU, in one go (a few minutes):
#   the CUDA tests on the GPU (tests/cuda without the simulator, tests/gpu: CuPy, Numba device
#   arrays, torch CUDA tensors, flatopt.torch on CUDA), flatopt.jax's tests with JAX on the GPU, and the
#   bandwidth tables.
#
#   bash benchmarks/gpu_checks.sh            # logs go to $OUT (default: a temporary folder)
#
# Needs numba-cuda, CuPy and torch with CUDA in the current Python (`pip install -e ".[cuda,torch]"`
# plus a CUDA build of torch).  Run from the repository root.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
$PY - <<'EOF' | tee -a "$OUT/gpu.txt"
import platform, numpy, numba, numba_cuda
print("python", platform.python_version(), "numpy", numpy.__version__, "numba", numba.__version__,
      "numba-cuda", numba_cuda.__version__)
for name in ("cupy", "torch"):
    try:
        print(name, __import__(name).__version__)
    except Exception as exc:
        print(name, "unavailable:", exc)
EOF

timeout 300 $PY -m pytest -q -rs -p no:cacheprovider -n 8 tests/gpu tests/cuda 2>&1 | tee "$OUT/gpu_tests.log" || status=1
# flatopt.jax with JAX's arrays on the GPU (the host path); XLA must not take 75% of the GPU per test process
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 200 $PY -m pytest -q -rfs -p no:cacheprovider -n 8 \
    tests/test_jax.py tests/test_jax_sweep.py tests/test_jax_xla.py 2>&1 | tee "$OUT/jax_gpu_tests.log" || status=1

timeout 150 $PY benchmarks/gpu_bandwidth.py --sizes 1e6,1e7,1e8 --steps 50 2>&1 | tee "$OUT/bandwidth_float32.txt" || status=1
timeout 90 $PY benchmarks/gpu_bandwidth.py --sizes 1e7,1e8 --dtype float64 --steps 50 --model-tensors 0 2>&1 \
    | tee "$OUT/bandwidth_float64.txt" || status=1
echo "gpu_checks: logs in $OUT; status $status"
exit $status
