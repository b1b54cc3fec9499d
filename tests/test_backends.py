"""Backend loading: graceful fallback, `scorefast info`, required backends, the Triton interpreter run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scorefast as sf

ROOT = Path(__file__).resolve().parents[1]

# A meta-path hook that makes the compiled modules unimportable, as on a machine where they failed to build.
_BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("scorefast._C") or name == "scorefast._cuda":
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
print(len(calls), any(m.startswith("scorefast._C") or m == "scorefast._cuda" for m in sys.modules))
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


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this is the interpreter run itself")
def test_triton_interpreted():
    """Every triton-parametrised test, in a CUDA-less process with TRITON_INTERPRET=1 (DESIGN.md)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("SCOREFAST_BACKEND", None)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests",
        "-q",
        "-x",
        "-k",
        "triton",
        "-m",
        "not cuda",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    tail = "\n".join(res.stdout.splitlines()[-30:])
    assert res.returncode == 0, tail + res.stderr[-3000:]
    assert " passed" in tail and " failed" not in tail
    assert "skipped" not in tail.split("\n")[-1] or "triton" not in tail.split("\n")[-1]
