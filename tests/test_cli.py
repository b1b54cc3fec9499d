"""The command line: `scorefast sample` (the README's main job) and `scorefast bench`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
    with pytest.raises(SystemExit, match="--sampler: unknown sampler 'euler'"):
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


def _quick_bench(suite: str, out: Path, **env: str) -> tuple[dict, str]:
    """``scorefast bench --suite SUITE --quick --out OUT`` with env added: (validated results, stdout)."""
    environ = {**os.environ, **env}
    environ.pop("SCOREFAST_BACKEND", None)
    res = subprocess.run(
        [sys.executable, "-m", "scorefast", "bench", "--suite", suite, "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
        env=environ,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    if out.is_dir():  # --out FOLDER writes the suite's own file name in it
        out = out / f"{suite}.json"
    data = json.loads(out.read_text())
    validate(data)
    return data, res.stdout


def test_bench_quick_run_writes_results(tmp_path):
    data, _ = _quick_bench("cpu", tmp_path / "quick.json")
    fused = [r for r in data["results"] if r.get("role") == "fused_out" and r["group"].startswith("fused_update")]
    assert fused and fused[0]["ratio_vs_eager"] > 0 and "vs_copy" in fused[0]
    assert not any("nfe" in r for r in data["results"])  # end-to-end rows live in the cpu-e2e suite


def test_gpu_end_to_end_suite_runs_its_grid_on_cpu(tmp_path):
    """The GPU end-to-end suite's code, smoke-run on CPU (SCOREFAST_BENCH_DEVICE=cpu: graphs a no-op)."""
    data, stdout = _quick_bench("gpu-e2e-mlp", tmp_path / "e2e.json", SCOREFAST_BENCH_DEVICE="cpu")
    roles = {(r["group"], r["role"]) for r in data["results"]}
    for sampler in ("pc", "euler_maruyama", "heun", "dpm_solver++"):
        for role in ("peer", "eager", "graph", "eager-bf16", "graph-bf16"):
            assert (f"{sampler}-mlp-B8", role) in roles
    graph = [r for r in data["results"] if r["role"] == "graph"]
    assert all(r["ratio_vs_peer"] > 0 and r["cpu_s_per_step"] > 0 and r["graphed"] is False for r in graph)
    assert "| heun | 8 |" in stdout


def test_gpu_micro_suite_runs_its_grid_on_cpu(tmp_path):
    """The GPU micro suite's code, smoke-run on CPU: the cuda backend under its host emulation,
    Triton under its interpreter, one round a benchmark, no torch.compile rows."""
    data, stdout = _quick_bench(
        "gpu",
        tmp_path / "micro.json",
        SCOREFAST_BENCH_DEVICE="cpu",
        SCOREFAST_CUDA_EMULATE="1",
        TRITON_INTERPRET="1",
        PYTEST_ADDOPTS="--benchmark-min-rounds=1 --benchmark-max-time=0 --benchmark-warmup=off",
    )
    rows = {(r["group"].split("-")[0], r["backend"], r["role"]): r for r in data["results"]}
    for kind in ("fused_update", "snr", "randn", "em", "probes"):
        for backend in ("cuda", "triton"):
            fused = rows.get((kind, backend, "fused")) or rows[(kind, backend, "fused_out")]
            assert fused["ratio_vs_eager"] > 0 and fused["gbps"] > 0, fused
    for backend in ("cuda", "triton"):
        assert rows[("fused_update", backend, "fused_out")]["vs_copy"] > 0
    assert rows[("ema", "cuda", "fused")]["ratio_vs_eager"] > 0
    assert not [r for r in data["results"] if r["role"] == "compile"]
    assert "| fused_update(out=) | triton |" in stdout


def test_sample_command_on_a_checkpoint_writes_an_image_grid(tmp_path):
    from scorefast import models
    from scorefast.sde import VPSDE

    torch.manual_seed(0)
    net = models.build("UNet", in_channels=1, ch=8, ch_mult=[1, 2], num_res_blocks=1, groups=4)
    ckpt = models.save(tmp_path / "tiny.safetensors", net, sde=VPSDE(), shape=(1, 8, 8))
    out = tmp_path / "run"
    args = ["sample", "--model", str(ckpt), "--sampler", "ddim", "--steps", "4", "--n", "10", "--batch", "4"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    assert load_file(str(out / "samples.safetensors"))["samples"].shape == (10, 1, 8, 8)
    assert (out / "samples.png").stat().st_size > 5_000
    report = json.loads((out / "timing.json").read_text())
    assert report["nfe_per_sample"] == 4 and report["chunk"] == 4
    with pytest.raises(SystemExit, match="--model"):
        main(["sample", "--model", str(tmp_path / "missing.safetensors"), "--out", str(out)])
    with pytest.raises(SystemExit, match="steps"):  # a resume with other settings names the setting
        main([*args[:6], "5", *args[7:], "--out", str(out), "--no-progress"])


def test_train_command_trains_and_resumes(tmp_path):
    base = ["train", "--data", "toy2d", "--batch", "8", "--save-every", "2", "--out", str(tmp_path), "--no-progress"]
    assert main([*base, "--steps", "3", "--no-samples"]) == 0
    assert main([*base, "--steps", "5"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from"] == 3 and summary["steps"] == 5
    for name in ("model.safetensors", "train_state.safetensors", "loss.png", "samples.png"):
        assert (tmp_path / name).exists(), name
    with pytest.raises(SystemExit, match="warmup"):
        main([*base, "--steps", "6", "--warmup", "7"])
    digits = [
        "train",
        "--data",
        "digits",
        "--steps",
        "2",
        "--batch",
        "8",
        "--out",
        str(tmp_path / "d"),
        "--no-progress",
    ]
    assert main([*digits, "--no-samples"]) == 0  # the digits UNet runs a few real steps in CI
    from scorefast import models

    assert models.read_metadata(tmp_path / "d" / "model.safetensors")["trained_steps"] == 2


def test_sample_command_under_torchrun_equals_one_process(tmp_path):
    args = [
        "--model",
        "gmm2d",
        "--sampler",
        "euler_maruyama",
        "--steps",
        "10",
        "--n",
        "300",
        "--batch",
        "64",
        "--no-progress",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    one = subprocess.run(
        [sys.executable, "-m", "scorefast", "sample", *args, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "scorefast",
            "--",
            "sample",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],  # "--": torchrun would take --n as its own
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "samples.safetensors"))["samples"]
    b = load_file(str(tmp_path / "two" / "samples.safetensors"))["samples"]
    assert torch.equal(a, b)
    assert json.loads((tmp_path / "two" / "timing.json").read_text())["world_size"] == 2


def test_bench_plot_renders_a_results_file(tmp_path):
    results = json.loads((ROOT / "bench" / "results" / "cpu.json").read_text())
    src = tmp_path / "r.json"
    src.write_text(json.dumps(results))
    assert main(["bench", "--plot", str(src)]) == 0
    assert (tmp_path / "r.png").stat().st_size > 10_000
    results["results"] = [r for r in results["results"] if "ratio_vs_eager" not in r]
    from scorefast.bench import plot_results

    with pytest.raises(ValueError, match="no row"):
        plot_results(results, tmp_path / "x.png")


def _one_line_error(capsys, argv: list[str], match: str) -> str:
    """``scorefast ARGV`` fails with one line naming the option, no traceback, a non-zero exit."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    code = exc.value.code
    message = (code if isinstance(code, str) else capsys.readouterr().err).strip()
    assert code not in (0, None), argv
    assert "\n" not in message and "Traceback" not in message and re.search(match, message), (argv, message)
    return message


def _checkpoint(tmp_path, name, *, meta=None, drop=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from scorefast import models
    from scorefast.sde import VPSDE

    torch.manual_seed(0)
    path = models.save(tmp_path / name, models.build("MLP", dim=2, hidden=8, layers=1), sde=VPSDE(), shape=(2,))
    with safe_open(str(path), framework="pt") as f:
        raw = json.loads(f.metadata()["scorefast"])
    tensors = {k: v for k, v in load_file(str(path)).items() if k != drop}
    text = "[" * 100_000 if meta == "deep" else json.dumps({**raw, **(meta or {})})
    save_file(tensors, str(path), metadata={"scorefast": text})
    return str(path)


def test_every_user_mistake_is_one_line_naming_the_option(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "o"), "--no-progress"]
    sample = ["sample", "--n", "8", "--steps", "3", *out]
    no_cuda = [(["--device", "cuda"], "--device: cuda was asked for, but CUDA is not")] * (
        not torch.cuda.is_available()
    )
    for extra, match in [
        (["--sampler", "bogus"], r"^scorefast sample: --sampler: unknown sampler 'bogus'"),
        (["--device", "bogus"], r"^scorefast sample: --device: not a device: 'bogus'"),
        *no_cuda,
        (["--backend", "cuda"] if not torch.cuda.is_available() else ["--backend", "bogus"], "backend"),
        (["--n", "0"], "argument --n: expected an int >= 1, got '0'"),
        (["--batch", "x"], "argument --batch: expected an int >= 1, got 'x'"),
        (["--steps", "0"], "argument --steps: expected an int >= 1"),
        (["--sampler", "heun", "--steps", "1"], "--steps: heun .* needs steps >= 2"),
        (["--seed", "-1"], r"--seed: must lie in \[0, 2\*\*64\)"),
        (["--seed", "x"], "argument --seed: invalid int value"),
        (["--precision", "fp8"], "argument --precision: invalid choice"),
        (["--model", str(tmp_path / "missing.safetensors")], "--model: .* neither a built-in model"),
        (["--model", str(tmp_path)], "--model: .* neither a built-in model"),
        (["--model", __file__], "--model: .* is not a readable safetensors file"),
        (["--model", _checkpoint(tmp_path, "a.st", meta={"arch_kwargs": [8]})], "--model: .*'arch_kwargs' must be"),
        (["--model", _checkpoint(tmp_path, "b.st", meta={"arch_kwargs": {"x": 1}})], "--model: .*no argument 'x'"),
        (["--model", _checkpoint(tmp_path, "c.st", meta={"arch": None})], "--model: .*'arch' must be one of"),
        (["--model", _checkpoint(tmp_path, "d.st", meta={"shape": ["2"]})], "--model: .*'shape' must be"),
        (["--model", _checkpoint(tmp_path, "e.st", meta="deep")], "--model: .*nested too deeply"),
        (["--model", _checkpoint(tmp_path, "f.st", drop="out.1.weight")], "--model: .*'out.1.weight' is missing"),
        (["--model", _checkpoint(tmp_path, "g.st", meta={"arch_kwargs": {"dim": 2, "hidden": 200000}})], "200000"),
    ]:
        _one_line_error(capsys, [*sample, *extra], match)
    _one_line_error(capsys, ["sample", "--out", ""], r"^scorefast sample: --out: an empty path")
    assert not (tmp_path / "o").exists() and not (tmp_path / "shards").exists()  # nothing was written

    train = ["train", "--data", "toy2d", "--steps", "2", "--batch", "8", "--no-samples", *out]
    for extra, match in [
        (["--device", "bogus"], r"^scorefast train: --device: not a device"),
        *no_cuda,
        (["--lr", "-1"], "--lr: must be > 0"),
        (["--lr", "nan"], "argument --lr: expected a finite number"),
        (["--ema", "7"], r"--ema: must be a number in \(0, 1\)"),
        (["--grad-clip", "0"], "--grad-clip: must be > 0"),
        (["--seed", "-3"], "--seed: must lie in"),
        (["--warmup", "-1"], "argument --warmup: expected an int >= 0"),
        (["--data", "cifar"], "argument --data: invalid choice"),
    ]:
        _one_line_error(capsys, [*train, *extra], match)
    _one_line_error(capsys, ["train", "--out", ""], r"^scorefast train: --out: an empty path")
    assert not (tmp_path / "o").exists()

    from scorefast._io import dir_lock

    (tmp_path / "o").mkdir()
    with dir_lock(tmp_path / "o", "x"):  # a training already running there
        _one_line_error(capsys, train, r"^scorefast train: --out: .* in use by another scorefast process")
    assert main(train) == 0
    _one_line_error(capsys, [*train[:-3], "--batch", "16", *out], "--batch: .* was trained with 8, this run has 16")

    (tmp_path / "r.json").write_text("{not json")
    (tmp_path / "s.json").write_text('["a list"]')
    for option in ("--table", "--plot"):
        _one_line_error(capsys, ["bench", option, str(tmp_path / "x.json")], f"^scorefast bench: {option}: cannot read")
        _one_line_error(capsys, ["bench", option, str(tmp_path / "r.json")], f"{option}: .*r.json is not JSON")
        _one_line_error(capsys, ["bench", option, str(tmp_path / "s.json")], f"{option}: .*not a scorefast results")
    _one_line_error(capsys, ["bench", "--suite", "nope"], "argument --suite: invalid choice")


def test_a_user_mistake_is_one_line_on_stderr_and_debug_shows_the_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SCOREFAST_DEBUG")}
    argv = [sys.executable, "-m", "scorefast", "sample", "--sampler", "bogus", "--out", str(tmp_path / "o")]
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and res.stdout == ""
    assert res.stderr.splitlines() == [res.stderr.strip()] and res.stderr.startswith("scorefast sample: --sampler:")
    res = subprocess.run(argv, env={**env, "SCOREFAST_DEBUG": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "Traceback" in res.stderr and "unknown sampler 'bogus'" in res.stderr


def test_sample_outputs_are_written_atomically_with_a_normal_files_mode(tmp_path):
    out = tmp_path / "run"
    args = ["sample", "--sampler", "ddim", "--steps", "3", "--n", "20", "--batch", "8", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for name in ("samples.safetensors", "samples.png", "timing.json", "shards/manifest.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temp file left behind


def test_a_closed_output_pipe_ends_quietly():
    """`scorefast bench --table FILE | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    results = sorted((ROOT / "bench" / "results").glob("*.json"))[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "scorefast", "bench", "--table", str(results)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 141
