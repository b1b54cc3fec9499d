"""Backend loading: graceful fallback, `scorefast info`, required backends, the Triton interpreter run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch

import scorefast as sf

ROOT = Path(__file__).resolve().parents[1]

# A meta-path hook that makes the compiled modules unimportable, as on a machine where they failed to build.
_BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("scorefast._C") or name.startswith("scorefast._cuda"):
            raise ImportError(f"{name} blocked by test")
        return None
sys.meta_path.insert(0, _Block())
"""


def _python(code: str, env: dict | None = None, block: bool = False) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("SCOREFAST_BACKEND", "SCOREFAST_REQUIRE_BACKENDS")}
    full_env.update({"CUDA_VISIBLE_DEVICES": "", **(env or {})})
    return subprocess.run(
        [sys.executable, "-c", (_BLOCK if block else "") + code],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=600,
    )


def test_import_survives_missing_extensions_and_falls_back():
    code = """
import torch, scorefast as sf
x = sf.randn((2, 5), seed=0)
print(sf.backends.resolve(None, torch.device("cpu")))
from scorefast.info import report, format_report
r = report()
print(r["backends"]["cpu"]["available"], r["cuda_module"]["loaded"])
print(format_report(r))
try:
    sf.randn((2, 5), seed=0, backend="cpu")
except sf.BackendUnavailableError as err:
    print("forced:", err)
"""
    res = _python(code, block=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "torch" and lines[1] == "False False"
    assert "blocked by test" in res.stdout  # info says why
    forced = [line for line in lines if line.startswith("forced:")]
    assert forced and "backend 'cpu'" in forced[0] and "blocked by test" in forced[0]


def test_required_backend_missing_is_an_import_error():
    res = _python("import scorefast", env={"SCOREFAST_REQUIRE_BACKENDS": "cpu"}, block=True)
    assert res.returncode != 0 and "SCOREFAST_REQUIRE_BACKENDS names 'cpu'" in res.stderr
    res = _python("import scorefast", env={"SCOREFAST_REQUIRE_BACKENDS": "cuda_module"}, block=True)
    assert res.returncode != 0 and "cuda_module" in res.stderr
    res = _python("import scorefast", env={"SCOREFAST_REQUIRE_BACKENDS": "warp"})
    assert res.returncode != 0 and "unknown name 'warp'" in res.stderr


def test_import_does_not_query_the_gpu_or_load_extensions():
    code = """
import sys, torch
calls = []
torch.cuda.is_available = lambda: calls.append(1) or False
import scorefast
print(len(calls), any(m.startswith(("scorefast._C", "scorefast._cuda")) for m in sys.modules))
"""
    res = _python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["0", "False"]


@pytest.mark.parametrize("argv", [["scorefast", "info"], [sys.executable, "-m", "scorefast", "info"]])
def test_info_command(argv):
    res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    for word in ("torch", "CPU capability", "backends:", "cpu", "triton", "cuda", "_cuda"):
        assert word in res.stdout


def test_info_reports_build_against_running_torch():
    from scorefast.info import build_info, report

    r = report()
    if build_info():
        assert r["torch_built_against"] == torch.__version__
    assert r["backends"]["torch"]["available"]
    json.dumps(r)  # serialisable for bug reports


def test_default_cpu_backend_is_compiled_when_built():
    if sf.backends.state("cpu").available:
        assert sf.backends.resolve(None, torch.device("cpu")) == "cpu"
    assert sf.backends.resolve(None, torch.device("cpu"), torch.float64) == "torch"


def _run_backend_suite(
    tmp_path,
    backend: str,
    env: dict,
    select: list[str],
    allowed_skips: tuple[str, ...],
    min_ran: int = 100,
    logs: str | None = None,
) -> None:
    """Run the suite's ``backend``-parametrised tests in a subprocess with ``env``; every one must pass.

    A skip is a failure unless its reason is one of ``allowed_skips`` (tests that say why they do
    not apply there); so a backend that fails to load there cannot pass as skipped.  ``logs``: a
    glob under ``tmp_path`` of files the run may write instead of its output (a sanitizer's report).
    """
    full_env = {k: v for k, v in os.environ.items() if k not in ("SCOREFAST_BACKEND",)}
    full_env.update(CUDA_VISIBLE_DEVICES="", **env)
    report = tmp_path / "report.xml"
    paths = [] if any(arg.startswith("tests/") for arg in select) else ["tests"]
    cmd = [sys.executable, "-m", "pytest", *paths, "-q", "-x", *select, f"--junit-xml={report}"]
    cmd += ["-p", "no:cacheprovider", "-p", "no:randomly"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=1500)
    tail = "\n".join(res.stdout.splitlines()[-30:])
    if res.returncode != 0 and logs:
        tail += "".join(f"\n{log.name}:\n{log.read_text()[-6000:]}" for log in sorted(tmp_path.glob(logs)))
    assert res.returncode == 0, tail + res.stderr[-3000:]
    ran, bad_skips = 0, []
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        name = case.get("name", "")
        if f"[{backend}]" not in name and f"-{backend}]" not in name:
            continue
        skipped = case.find("skipped")
        if skipped is None:
            ran += 1
        elif not any(reason in skipped.get("message", "") for reason in allowed_skips):
            bad_skips.append(f"{case.get('classname')}::{name}: {skipped.get('message')}")
    assert not bad_skips, "\n".join(bad_skips)
    assert ran >= min_ran, f"only {ran} {backend} tests ran:\n{tail}"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this is the interpreter run itself")
def test_triton_interpreted(tmp_path):
    """Every triton-parametrised test, in a CUDA-less process with TRITON_INTERPRET=1 (DESIGN.md)."""
    pytest.importorskip("triton")
    allowed = ("statistics run on the compiled backends", "compile runs the compiled CPU path")
    _run_backend_suite(tmp_path, "triton", {"TRITON_INTERPRET": "1"}, ["-k", "triton", "-m", "not cuda"], allowed)


@pytest.mark.skipif(os.environ.get("SCOREFAST_CUDA_EMULATE") == "1", reason="this is the emulated run itself")
def test_cuda_kernels_emulated(tmp_path):
    """Every cuda-parametrised test, with the CUDA kernels, launchers and bindings compiled for the
    host (``scorefast._cuda_host``): the CUDA code is run and checked on machines without a GPU."""
    _cuda_host_build()
    allowed = ("compile runs the compiled CPU path",)
    _run_backend_suite(tmp_path, "cuda", {"SCOREFAST_CUDA_EMULATE": "1"}, ["-m", "cuda_emulated and not cuda"], allowed)


def _cuda_host_build() -> dict:
    """setup.py's record of how it built scorefast._cuda_host (skip, or fail if it was required)."""
    from scorefast.info import build_info

    info = build_info()
    if info.get("parts", {}).get("_cuda_host", {}).get("state") != "built":
        if "cuda_module" in os.environ.get("SCOREFAST_REQUIRE_BACKENDS", ""):
            pytest.fail("SCOREFAST_REQUIRE_BACKENDS names cuda_module but scorefast._cuda_host was not built")
        pytest.skip("scorefast._cuda_host was not built (no CUDA toolkit at build time)")
    return info.get("cuda_host", {})


def _sanitized_rebuild(record: dict, out_dir: Path, flags: list[str]) -> Path:
    """Re-run setup.py's commands for scorefast._cuda_host with ``flags`` added, outputs in ``out_dir``."""
    renamed: dict[str, str] = {}
    for i, cmd in enumerate(record["commands"]):
        cmd = [renamed.get(arg, arg) for arg in cmd]
        o = cmd.index("-o")
        target = str(out_dir / f"{i}-{Path(cmd[o + 1]).name}")
        renamed[cmd[o + 1]] = target
        cmd[o + 1] = target
        subprocess.run([*cmd, *flags], check=True, cwd=record["root"], capture_output=True, text=True)
    return Path(target)


@pytest.mark.skipif(os.environ.get("SCOREFAST_CUDA_EMULATE") == "1", reason="this is the emulated run itself")
def test_cuda_kernels_under_address_sanitizer(tmp_path):
    """The kernel-level cuda tests again, with the emulated CUDA kernels built under AddressSanitizer:
    a read or write past a tensor's bytes (which a GPU may not report) stops the run with its report."""
    record = _cuda_host_build()
    if not record or not Path(record["root"], "csrc", "cuda", "kernels.cu").exists():
        pytest.skip("no record of the scorefast._cuda_host build commands, or its sources are gone")
    cxx = record["commands"][0][0]
    libasan = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan):
        pytest.skip(f"{cxx} has no AddressSanitizer runtime")
    module = _sanitized_rebuild(record, tmp_path, ["-fsanitize=address", "-fno-omit-frame-pointer", "-g", "-O1"])
    env = {
        "SCOREFAST_CUDA_EMULATE": "1",
        "SCOREFAST_CUDA_HOST_MODULE": str(module),
        "LD_PRELOAD": libasan,
        # the report goes to a file: pytest's capture of the dying process's stderr is lost
        "ASAN_OPTIONS": f"detect_leaks=0:log_path={tmp_path / 'asan'}",
    }
    files = ["tests/test_ops.py", "tests/test_noise.py", "tests/test_noise_contract.py", "tests/test_library.py"]
    # the plain emulated run has the large cases; here a 1M-element row once, not per term dtype
    select = ["-m", "cuda_emulated and not cuda", "-k", "not grid_row_limit and not (terms and 1000003)", *files]
    allowed = ("compile runs the compiled CPU path",)
    _run_backend_suite(tmp_path, "cuda", env, select, allowed, min_ran=60, logs="asan.*")
