"""The Triton kernels compile for sm_80 and sm_90, on this GPU-less machine, as the launchers call them.

CI runs the Triton kernels only under the interpreter, which accepts code the compiler rejects
(an un-``constexpr`` global once broke every GPU launch without a failing test).  The worker
(``gpu_compile_worker.py``) runs each launcher with compile-only launches against a fake sm_80 /
sm_90 driver, so Triton types, specialises, lowers and assembles (ptxas) exactly what a GPU
run would.  The PTX is then checked for the approximate math DESIGN.md forbids in noise code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parent
ARCHS = (80, 90)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for a GPU: run outside the interpreter"
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    triton = pytest.importorskip("triton")
    if Version(triton.__version__) < Version("3.6"):
        pytest.skip(f"triton {triton.__version__} < 3.6")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SCOREFAST_BACKEND")}
    env.update(CUDA_VISIBLE_DEVICES="", TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("triton-cache")))
    res = subprocess.run(
        [sys.executable, str(ROOT / "gpu_compile_worker.py"), *map(str, ARCHS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.splitlines()[-1])["report"]


def _by_case(report, arch):
    cases: dict[str, list] = {}
    for row in report:
        if row["arch"] == arch:
            cases.setdefault(row["case"], []).append(row)
    return cases


@pytest.mark.parametrize("arch", ARCHS)
def test_every_launch_assembles(report, arch):
    cases = _by_case(report, arch)
    # 2 counter forms x (3 noise kinds + 5 dtype pairs x 5 term counts x 2 + 5 sumsq inputs),
    # one case of each launcher with wide ints, with B = D = 1 and with misaligned rows; the step
    # ops (2 counter forms x 3 dtype pairs of table updates, 1 flagged per-sample update, 5 SNR
    # correctors of one kernel or three); 1 large sample
    assert len(cases) == 2 * (3 + 5 * 5 * 2 + 5) + 3 + 3 + 3 + (2 * 3 + 1 + 5) + 1
    for case, rows in cases.items():
        kernels = [r["kernel"] for r in rows]
        op = case.split()[0]
        one_kernel_snr = op == "snr_langevin_step" and int(case.split("D=")[1].split()[0]) <= 8192
        expected = {
            "noise": ["_noise_kernel"],
            "fused_update": ["_fused_update_kernel"],
            "sumsq_norms": ["_sumsq_partial_kernel", "_sumsq_finish_kernel"],
            "snr_langevin_step": ["_snr_rows_kernel"]
            if one_kernel_snr
            else ["_sumsq_partial_kernel", "_snr_coef_kernel", "_fused_update_kernel"],
        }[op]
        assert kernels == expected, case
        assert all(r["cubin_bytes"] > 0 for r in rows), case


CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)  # blocks along x, y, z: a larger grid fails to launch


@pytest.mark.parametrize("arch", ARCHS)
def test_every_launch_fits_the_cuda_grid_limits(report, arch):
    """The interpreter runs any grid; a GPU refuses a launch past these limits.  The large case is one
    sample with 65537 norm tiles, which once sat on grid axis 1."""
    for case, rows in _by_case(report, arch).items():
        for r in rows:
            grid = r["grid"]
            assert 1 <= len(grid) <= 3, (case, r["kernel"], grid)
            assert all(1 <= n <= limit for n, limit in zip(grid, CUDA_GRID_LIMITS)), (case, r["kernel"], grid)
    from scorefast.backends.triton_backend import _COMPILED_GROUPS

    sizes = {case: int(case.split("D=")[1].split()[0]) for case in _by_case(report, arch) if "D=" in case}
    large = [case for case, size in sizes.items() if size > 65535 * 4 * _COMPILED_GROUPS]
    assert large and all(r["grid"][0] > 65535 for case in large for r in _by_case(report, arch)[case][:1]), large


@pytest.mark.parametrize("arch", ARCHS)
def test_noise_code_uses_precise_math_only(report, arch):
    from gpu_compile_worker import APPROX

    for case, rows in _by_case(report, arch).items():
        for r in rows:
            assert not any(r["ops"][op] for op in APPROX), (case, r["kernel"], r["ops"])
        draws_normals = "kind=1" in case or "noise=True" in case or case.startswith(("sumsq_norms", "snr"))
        first = rows[0]["ops"]
        # Box-Muller's square root, correctly rounded (tl.sqrt_rn), twice per group of 4 normals
        assert (first["sqrt.rn.f32"] > 0) == draws_normals, (case, first)


def _cuobjdump() -> str | None:
    import shutil

    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


def test_cuda_module_carries_each_arch_and_precise_ptx():
    """The nvcc-built module holds SASS for every SCOREFAST_CUDA_ARCHS entry and PTX for the '+PTX'
    ones, and none of its PTX uses approximate math (no --use_fast_math, no __logf)."""
    from scorefast.info import report

    module = report()["cuda_module"]
    if not module["loaded"]:
        pytest.skip(f"scorefast._cuda not built: {module['why']}")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's bundled copy)")
    from gpu_compile_worker import APPROX

    import scorefast._cuda as cuda_module

    path = cuda_module.__file__
    elves = subprocess.run([tool, "--list-elf", path], capture_output=True, text=True, check=True).stdout
    ptx_list = subprocess.run([tool, "--list-ptx", path], capture_output=True, text=True, check=True).stdout
    for entry in module["build"]["archs"].replace(",", ";").split(";"):
        arch = entry.removesuffix("+PTX").strip()
        assert f".sm_{arch}.cubin" in elves, (entry, elves)
        assert (f".sm_{arch}.ptx" in ptx_list) == entry.endswith("+PTX"), (entry, ptx_list)
    ptx = subprocess.run([tool, "-ptx", path], capture_output=True, text=True, check=True).stdout
    kernels = ("fill_noise_kernel", "fused_update_kernel", "sumsq_partial_kernel", "snr_row_kernel")
    kernels += ("scaled_partial_kernel", "step_control_kernel", "select_rows_kernel", "sde_coefs_kernel")
    for kernel in kernels:
        assert kernel in ptx
    assert "sqrt.rn.f32" in ptx
    assert not [op for op in APPROX if op in ptx]
    # adaptive_sde's table rounds each product and sum apart, as its reference: nvcc, which contracts
    # a * b + c into an fma by default (the host emulation does not), must have fused none of them
    coefs = [body for name, body in _ptx_entries(ptx).items() if "sde_coefs_kernel" in name]
    assert coefs and not [body for body in coefs if "fma.rn" in body]


def _ptx_entries(ptx: str) -> dict[str, str]:
    """Kernel name -> its PTX body (from ``.entry`` to the closing brace)."""
    out = {}
    for part in re.split(r"\n(?=(?:\.visible )?\.entry )", ptx)[1:]:
        name = re.match(r"(?:\.visible )?\.entry (\S+?)\(", part)
        if name:
            out[name.group(1)] = part.split("\n}\n", 1)[0]
    return out
