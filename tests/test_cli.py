"""The command line: `scorefast sample` (the README's main job) and `scorefast bench`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from scorefast.bench import derive, markdown_table, validate
from scorefast.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_sample_command_writes_samples_png_and_timing(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            [
                "sample",
                "--model",
                "gmm2d",
                "--sampler",
                "ddim",
                "--steps",
                "20",
                "--n",
                "600",
                "--batch",
                "256",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((out / "timing.json").read_text())
    assert report["nfe_per_sample"] == 20 and report["n"] == 600 and report["seconds"] > 0
    samples = load_file(str(out / "samples.safetensors"))["samples"]
    assert samples.shape == (600, 2)
    assert (out / "samples.png").stat().st_size > 10_000
    # chunking with global sample ids: a different --batch gives the same samples
    out2 = tmp_path / "run2"
    main(
        [
            "sample",
            "--model",
            "gmm2d",
            "--sampler",
            "ddim",
            "--steps",
            "20",
            "--n",
            "600",
            "--batch",
            "600",
            "--out",
            str(out2),
            "--no-progress",
        ]
    )
    assert (load_file(str(out2 / "samples.safetensors"))["samples"] == samples).all()


def test_sample_command_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="--model"):
        main(["sample", "--model", "imagenet", "--out", str(tmp_path)])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="--out"):
        main(["sample", "--out", str(blocker / "sub"), "--n", "10"])
    with pytest.raises(ValueError, match="unknown sampler"):
        main(["sample", "--sampler", "euler", "--out", str(tmp_path), "--n", "10", "--no-progress"])


def test_results_schema_and_derived_ratios():
    rows = derive(
        [
            {
                "name": "copy",
                "backend": "torch",
                "dtype": "float32",
                "size": 10,
                "median_s": 1.0,
                "bytes": 120,
                "group": "g",
                "role": "copy",
            },
            {
                "name": "eager",
                "backend": "torch",
                "dtype": "float32",
                "size": 10,
                "median_s": 4.0,
                "bytes": 120,
                "group": "g",
                "role": "eager",
            },
            {
                "name": "fused",
                "backend": "cpu",
                "dtype": "float32",
                "size": 10,
                "median_s": 2.0,
                "bytes": 120,
                "group": "g",
                "role": "fused",
            },
        ]
    )
    assert rows[2]["ratio_vs_eager"] == 2.0 and rows[2]["vs_copy"] == 0.5
    results = {
        "suite": "t",
        "date": "2026-11-24T00:00:00+00:00",
        "results": rows,
        "machine": {"gpu": None, "cpu": "x", "torch": "2", "triton": None, "cuda": None},
    }
    validate(results)
    assert "2.00x" in markdown_table(results)
    with pytest.raises(ValueError, match="median_s"):
        validate({**results, "results": [{**rows[0], "median_s": 0.0}]})


def test_committed_results_follow_the_schema():
    files = sorted((ROOT / "bench" / "results").glob("*.json"))
    assert files, "no committed results file"
    for f in files:
        validate(json.loads(f.read_text()))


def test_bench_quick_run_writes_results(tmp_path):
    out = tmp_path / "quick.json"
    res = subprocess.run(
        [sys.executable, "-m", "scorefast", "bench", "--suite", "cpu", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    validate(data)
    fused = [r for r in data["results"] if r.get("role") == "fused_out" and r["group"].startswith("fused_update")]
    assert fused and fused[0]["ratio_vs_eager"] > 0 and "vs_copy" in fused[0]
    assert not any("nfe" in r for r in data["results"])  # end-to-end rows live in the cpu-e2e suite
