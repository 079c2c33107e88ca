"""The CUDA kernels compiled for real GPUs, without a GPU: NVVM (``numba.cuda.compile_ptx``)
produces PTX for sm_80 and sm_90 and ``ptxas -v`` assembles it.

Checked for every kernel, float32 and float64:

* it assembles with no local memory: ``0 bytes stack frame, 0 bytes spill stores/loads``
  and no ``ld.local``/``st.local`` (registers per thread are recorded; run this file as a
  script to print the table);
* every floating-point operation is explicitly rounded (``add/mul/div/sqrt/fma.rn``): no
  contractible ``mul``/``add`` without a rounding mode, no ``approx``, no ``ftz``;
* the ``fma.rn`` instructions are exactly the kernel's own FMAs: rebuilt with its FMAs
  turned into ``fma.rz``, the kernel holds no ``fma.rn`` at all, so NVVM contracted nothing;
* a float32 kernel holds no float64 instruction;
* Adam's loads and stores are addressed from ``%tid.x`` (consecutive threads, consecutive
  elements: coalesced) and its loops stride by ``%ntid.x`` and ``%nctaid.x``.

Needs numba-cuda with NVVM (``numba-cuda[cu13]``) and a ``ptxas`` that accepts the PTX
version NVVM emits: the one in PyPI's ``nvidia-cuda-nvcc`` of the same CUDA release
(``pip install "cuda-toolkit[nvcc]==13.*"``), found through ``cuda.pathfinder``, then
``$FLATOPT_PTXAS``, then ``PATH``.  Missing tools fail the test (set ``FLATOPT_SKIP_PTX=1``
to skip it).  Skipped under ``NUMBA_ENABLE_CUDASIM=1``, where ``compile_ptx`` does not exist.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
from numba import config

KERNELS = ("sgd", "rmsprop", "adam", "adopt", "lookahead")
DTYPES = ("float32", "float64")
CCS = ((8, 0), (9, 0))

pytestmark = [
    pytest.mark.skipif(os.environ.get("FLATOPT_SKIP_PTX", "") not in ("", "0"), reason="FLATOPT_SKIP_PTX is set"),
    pytest.mark.skipif(bool(config.ENABLE_CUDASIM),
                       reason="compile_ptx does not exist under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"),
]


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _requirement_hint():
    nvvm = _version("nvidia-nvvm")
    release = ".".join(nvvm.split(".")[:2]) if nvvm else "13"
    return (f'pip install "cuda-toolkit[nvcc]=={release}.*" (its nvidia-cuda-nvcc wheel ships bin/ptxas for the '
            f"same CUDA release as NVVM{f' {nvvm}' if nvvm else ''})")


class Toolchain:
    """compile_ptx + a ptxas that accepts its output, with every result cached."""

    def __init__(self):
        try:
            from numba import cuda

            from flatopt.kernels import cuda as kernels
        except ImportError as exc:
            pytest.fail(f"numba-cuda is needed to compile the CUDA kernels ({exc}); "
                        f'pip install "numba-cuda[cu13]", or set FLATOPT_SKIP_PTX=1 to skip', pytrace=False)
        self.cuda, self.kernels = cuda, kernels
        self._ptx, self._asm = {}, {}
        probe = self.ptx("lookahead", "float32", (9, 0))
        self.ptx_version = re.search(r"^\.version\s+(\S+)", probe, re.M).group(1)
        self.ptxas, tried = None, []
        for candidate in self._ptxas_candidates():
            ok, out = self._assemble(candidate, probe, (9, 0))
            tried.append(f"{candidate}: {'ok' if ok else out.strip().splitlines()[0] if out.strip() else 'failed'}")
            if ok:
                self.ptxas = candidate
                break
        if self.ptxas is None:
            pytest.fail(f"no ptxas accepts PTX ISA {self.ptx_version} (emitted by NVVM {_version('nvidia-nvvm')}); "
                        f"tried: {tried or 'none found'}. {_requirement_hint()}, or point FLATOPT_PTXAS at a "
                        "matching ptxas, or set FLATOPT_SKIP_PTX=1 to skip", pytrace=False)

    @staticmethod
    def _ptxas_candidates():
        found = []
        try:
            import cuda.pathfinder
            path = cuda.pathfinder.find_nvidia_binary_utility("ptxas")
            if path:
                found.append(path)
        except Exception:  # noqa: BLE001 - no cuda-pathfinder, or it found nothing
            pass
        for path in (os.environ.get("FLATOPT_PTXAS"), shutil.which("ptxas")):
            if path and path not in found:
                found.append(path)
        return found

    @staticmethod
    def _assemble(ptxas, ptx, cc):
        with tempfile.TemporaryDirectory(prefix="flatopt-ptx-") as tmp:
            src = Path(tmp) / "kernel.ptx"
            src.write_text(ptx)
            try:
                proc = subprocess.run([ptxas, "-v", f"-arch=sm_{cc[0]}{cc[1]}", str(src), "-o", os.devnull],
                                      capture_output=True, text=True, timeout=120)
            except OSError as exc:
                return False, str(exc)
        return proc.returncode == 0, proc.stdout + proc.stderr

    def ptx(self, name, dtype, cc, fma=None):
        """PTX of one kernel; ``fma`` replaces the kernels' ``cu.fma`` (a libdevice name)."""
        key = (name, dtype, cc, fma)
        if key not in self._ptx:
            kernels, sig = self.kernels, self.kernels.signature(name, dtype)
            bounds = kernels.launch_bounds(name, dtype)
            if fma is None:
                self._ptx[key] = self.cuda.compile_ptx(kernels.get_kernel(name, dtype).py_func, sig, cc=cc,
                                                       launch_bounds=bounds)[0]
            else:  # the kernels read the global ``cu`` when they are compiled
                shim = types.ModuleType("fma_shim")
                shim.fma = getattr(self.cuda.libdevice, fma)
                saved, kernels.cu = kernels.cu, shim
                try:
                    fn = kernels._build(np.dtype(dtype))[name].py_func
                    self._ptx[key] = self.cuda.compile_ptx(fn, sig, cc=cc, launch_bounds=bounds)[0]
                finally:
                    kernels.cu = saved
        return self._ptx[key]

    def assemble(self, name, dtype, cc):
        key = (name, dtype, cc)
        if key not in self._asm:
            ok, out = self._assemble(self.ptxas, self.ptx(name, dtype, cc), cc)
            assert ok, f"ptxas failed on {name} {dtype} sm_{cc[0]}{cc[1]}:\n{out}"
            self._asm[key] = out
        return self._asm[key]


_TOOLCHAIN = None


@pytest.fixture(scope="module")
def tools():
    global _TOOLCHAIN
    if _TOOLCHAIN is None:
        _TOOLCHAIN = Toolchain()
    return _TOOLCHAIN


def resources(ptxas_output):
    regs = re.search(r"Used (\d+) registers", ptxas_output)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_output)
    assert regs and frame, ptxas_output
    return int(regs.group(1)), tuple(int(x) for x in frame.groups())


def instructions(ptx):
    """Instruction lines of the kernel body (no directives, labels or comments)."""
    body = ptx[ptx.index(".entry"):]
    return [line.strip() for line in body.splitlines()
            if line.strip() and not line.strip().startswith(("//", ".", "$", "{", "}", ")")) and "(" not in line]


FLOAT_OP = re.compile(r"^(?:@%p\d+\s+)?([a-z0-9]+)((?:\.[a-z0-9]+)*)\.(f32|f64)\b")


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", KERNELS)
def test_assembles_without_local_memory(tools, name, dtype, cc, record_property):
    regs, (frame, spill_stores, spill_loads) = resources(tools.assemble(name, dtype, cc))
    record_property("registers", regs)
    assert (frame, spill_stores, spill_loads) == (0, 0, 0), f"{name} {dtype}: local memory used"
    assert not re.search(r"\b(ld|st)\.local\b", tools.ptx(name, dtype, cc))
    # Blocks of 256 threads: <= 96 registers keeps at least two blocks (512 threads, each
    # with two elements' loads in flight) resident per SM; the grid-stride loop over chunks
    # lets the rest of the grid wait its turn.
    assert regs <= 96, f"{name} {dtype} needs {regs} registers per thread"
    blocks = tools.kernels.MIN_BLOCKS_PER_SM.get((name, np.dtype(dtype)), 1)
    assert tools.kernels.blocks_resident(regs) >= blocks, (
        f"{name} {dtype}: {regs} registers leave no room for {blocks} blocks per SM")


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", KERNELS)
def test_float_arithmetic_is_explicitly_rounded(tools, name, dtype, cc):
    ptx = tools.ptx(name, dtype, cc)
    other = "f64" if dtype == "float32" else "f32"
    ops = set()
    for line in instructions(ptx):
        m = FLOAT_OP.match(line)
        if not m:
            continue
        op, mods, ty = m.groups()
        ops.add(f"{op}{mods}.{ty}")
        assert ty != other, f"{name} {dtype}: {line}"
        assert ".ftz" not in mods and ".approx" not in mods and ".full" not in mods, line
        if op in ("add", "sub", "mul", "div", "sqrt", "fma"):
            assert mods == ".rn", f"{name} {dtype}: '{line}' is not explicitly rounded (contractible or approximate)"
        else:
            # (copysign moves a sign bit, exactly: the kernels' test of a row's -0.0, see cpu.taken)
            assert op in ("ld", "st", "setp", "selp", "mov", "neg", "abs", "copysign"), \
                f"{name} {dtype}: unexpected '{line}'"
    if dtype == "float32":
        assert ".f64" not in ptx, f"{name} float32 holds float64 code"
    assert f"fma.rn.{'f32' if dtype == 'float32' else 'f64'}" in ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", KERNELS)
def test_only_the_kernels_own_fmas(tools, name, dtype):
    """With ``cu.fma`` turned into ``fma.rz``, any ``fma.rn`` left would be NVVM's contraction."""
    ty = "f32" if dtype == "float32" else "f64"
    ours = tools.ptx(name, dtype, (9, 0)).count(f"fma.rn.{ty}")
    variant = tools.ptx(name, dtype, (9, 0), fma="fmaf_rz" if dtype == "float32" else "fma_rz")
    assert ours > 0
    assert variant.count(f"fma.rn.{ty}") == 0, "NVVM contracted a multiply-add of its own"
    # (the counts of fma.rz and fma.rn may differ: LLVM merges the two arms of lerp's select
    # into one llvm.fma but cannot merge opaque fma_rz calls)
    assert variant.count(f"fma.rz.{ty}") > 0


def test_nvvm_contracts_plain_multiply_add(tools):
    """Why the kernels spell every operation out: a plain ``a * b + c`` becomes one FMA."""
    cuda = tools.cuda

    def plain(a, b, c, out):
        i = cuda.grid(1)
        if i < out.shape[0]:
            out[i] = a[i] * b[i] + c[i]

    ptx, _ = cuda.compile_ptx(plain, "void(float32[::1], float32[::1], float32[::1], float32[::1])", cc=(9, 0))
    assert "fma.rn.f32" in ptx and "mul.rn.f32" not in ptx


def _tainted(lines, seed):
    """Registers computed (transitively) from the register(s) in ``seed``."""
    tainted = set(seed)
    reg = re.compile(r"%[a-z]+\d+")
    changed = True
    while changed:
        changed = False
        for line in lines:
            regs = reg.findall(line)
            if len(regs) < 2 or line.startswith(("st.", "setp", "@", "bra")):
                continue
            dst, srcs = regs[0], regs[1:]
            if dst not in tainted and tainted.intersection(srcs):
                tainted.add(dst)
                changed = True
    return tainted


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_is_coalesced_grid_stride(tools, dtype):
    ptx = tools.ptx("adam", dtype, (9, 0))
    lines = instructions(ptx)
    ty = "f32" if dtype == "float32" else "f64"
    for special in ("%tid.x", "%ntid.x", "%ctaid.x", "%nctaid.x"):
        assert special in ptx, special  # threads stride by blockDim, blocks by gridDim
    tid = {re.findall(r"%[a-z]+\d+", line)[0] for line in lines if line.endswith("%tid.x;")}
    tainted = _tainted(lines, tid)
    address = re.compile(rf"^(ld|st)\.global\.{ty}\s.*\[(%rd\d+)(?:\+\d+)?\]")
    loads = row_loads = stores = 0
    for line in lines:
        m = address.match(line)
        if not m:
            continue
        from_tid = m.group(2) in tainted
        if m.group(1) == "st":
            assert from_tid, f"store not indexed by the thread: {line}"
            stores += 1
        elif from_tid:
            loads += 1
        else:
            row_loads += 1
    assert loads >= 4 and stores >= 3  # p, g, m, v (+ vmax) read; p, m, v (+ vmax) written per element
    assert row_loads >= 12  # the segment's 12 scalars: block-uniform, not thread-indexed
    assert not re.search(r"\b(ld|st)\.local\b", ptx)


def register_table():
    tools = Toolchain()
    print(f"ptxas {tools.ptxas}, PTX ISA {tools.ptx_version}")
    print(f"{'kernel':10s}" + "".join(f"  sm_{a}{b} {d:8s}" for a, b in CCS for d in DTYPES))
    for name in KERNELS:
        cells = []
        for cc in CCS:
            for dtype in DTYPES:
                regs, spills = resources(tools.assemble(name, dtype, cc))
                cells.append(f"{regs:>3d} regs{'' if spills == (0, 0, 0) else ' SPILL'}")
        print(f"{name:10s}" + "".join(f"  {c:>15s}" for c in cells))


if __name__ == "__main__":  # python tests/test_ptx.py: registers per thread of every kernel
    sys.exit(register_table())
