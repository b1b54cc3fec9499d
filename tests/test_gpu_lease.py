"""bench/gpu_lease.sh: its CPU dry run (the same steps at toy sizes) and its summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from scorefast.bench import validate

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_lease.sh"
sys.path.insert(0, str(ROOT / "bench"))

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")


def _lease(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("SCOREFAST_BACKEND", "TRITON_INTERPRET")}
    environ.update(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=environ, timeout=600
    )


def test_dry_run_runs_every_step_and_summarizes_last(tmp_path):
    out = tmp_path / "lease"
    res = _lease(str(out), "--dry-run")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    summary = res.stdout[res.stdout.index("== scorefast GPU lease summary") :]
    assert summary.splitlines()[-1].startswith("total ")  # the summary is the last thing printed
    for name in ("info", "tests", "gpu", "gpu-e2e-mlp", "gpu-e2e-unet"):
        assert f"step {name} " in summary and f"step {name:<14} ok" in summary, summary
    assert "would run: SCOREFAST_CUDA_ARCHS=" in res.stdout and "MAX_JOBS=" in res.stdout
    # the cuda tests were collected and skipped (no GPU), none failed
    cases = list(ElementTree.parse(out / "cuda-tests.xml").getroot().iter("testcase"))
    assert cases and all(c.find("skipped") is not None for c in cases)
    assert "0 failed" in summary and f"{len(cases)} skipped" in summary
    for suite in ("gpu", "gpu-e2e-mlp"):
        data = json.loads((out / f"{suite}.json").read_text())
        validate(data)
        assert data["results"], suite
    assert "gpu-e2e-unet: no results file" in summary  # collected only in a dry run
    assert "vs copy" in summary and "fused_update_table" in summary and "us/NFE" in summary
    assert (out / "summary.txt").read_text().strip() in res.stdout and (out / "lease.log").exists()


def test_usage_errors():
    assert _lease().returncode == 2
    assert _lease("a", "b").returncode == 2
    res = _lease("/tmp/x", "--fast")
    assert res.returncode == 2 and "unknown option --fast" in res.stderr


def test_without_a_gpu_the_real_run_stops_before_building(tmp_path):
    res = _lease(str(tmp_path), PATH=f"{tmp_path}:{os.environ['PATH']}")  # no nvidia-smi, no CUDA torch
    said = res.stdout + res.stderr  # the script's output also goes to its log
    assert res.returncode == 1 and "no GPU found" in said and "--dry-run" in said


def test_summary_reports_missing_files_and_time_limits(tmp_path):
    from lease_summary import summarize

    (tmp_path / "gpu.json").write_text('{"results": [')  # a results file cut off mid-write
    text = summarize(tmp_path, ["build=0:80", "tests=124:110", "gpu-e2e-unet=skipped:0", "gpu=1:3"])
    assert "build          ok" in text and "TIMED OUT" in text and "skipped" in text and "FAILED rc=1" in text
    assert "no junit file" in text and "gpu: unreadable results file" in text
    assert "gpu-e2e-mlp: no results file" in text
