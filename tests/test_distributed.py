"""sf.distributed: chunked, atomic, resumable sampling; world size 1 vs 3 bitwise; kill -9 + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import scorefast as sf
from scorefast.distributed import chunk_path, load_samples, sample_sharded

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sharded_worker.py"
N, CHUNK = 40, 8


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(out, nproc: int, *extra, wait=True, n=N, ok=True):
    """Run the worker in one process or under torchrun; wait for it unless wait=False."""
    args = [str(WORKER), str(out), str(n), str(CHUNK), *extra]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    proc = subprocess.Popen(
        [sys.executable, *launcher, *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    if wait:
        out_text, _ = proc.communicate(timeout=300)
        assert (proc.returncode == 0) == ok, out_text
        proc.output = out_text
    return proc


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("w1")
    _run(out, 1)
    return load_samples(out)


def test_chunks_are_sf_sample_calls_with_global_ids(single):
    gm = sf.testing.GaussianMixture.ring(8, 4.0, 0.35)
    sde = sf.sde.VPSDE()
    exact = gm.score_fn(sde)
    shift = 0.01 * torch.arange(2 * N, dtype=torch.float32).reshape(N, 2) / N
    torch.set_num_threads(1)
    try:
        k = 2
        ids = torch.arange(k * CHUNK, (k + 1) * CHUNK)
        x = sf.sample(
            lambda x, t, shift=None: exact(x, t) + shift,
            sde,
            (CHUNK, 2),
            sampler="euler_maruyama",
            steps=20,
            seed=11,
            sample_ids=ids,
            extra_args={"shift": shift[ids]},
        )
    finally:
        torch.set_num_threads(2)
    assert single.shape == (N, 2)
    assert torch.equal(single[k * CHUNK : (k + 1) * CHUNK], x)


def test_world_size_three_is_bitwise_equal_to_one(single, tmp_path):
    _run(tmp_path, 3)
    assert torch.equal(load_samples(tmp_path), single)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["config"]["chunk"] == CHUNK and len(manifest["chunks"]) == N // CHUNK
    # a resume with another setting fails on every rank (no rank left waiting at a barrier)
    failed = _run(tmp_path, 3, n=N + 8, ok=False)
    assert "n_samples: " in failed.output and "holds a run with n_samples=40" in failed.output


def test_kill_a_worker_then_resume(single, tmp_path):
    proc = _run(tmp_path, 3, "slow", wait=False)
    deadline = time.time() + 240
    while not any((tmp_path / "chunks").glob("chunk_*.safetensors")):
        assert proc.poll() is None and time.time() < deadline, "no chunk appeared"
        time.sleep(0.05)
    children = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "sharded_worker"], capture_output=True, text=True)
    pids = [int(p) for p in children.stdout.split()]
    assert pids, "no worker processes found"
    os.kill(pids[-1], signal.SIGKILL)  # kill -9 one rank mid-run
    proc.communicate(timeout=120)
    done = len(list((tmp_path / "chunks").glob("chunk_*.safetensors")))
    assert done < N // CHUNK, "the run finished before the kill"
    assert not json.loads((tmp_path / "manifest.json").read_text())["complete"]
    _run(tmp_path, 3)  # resume (fast worker: the config is the same)
    assert torch.equal(load_samples(tmp_path), single)


def _score(x, t):
    return -x / (1 + t[:, None])


def test_corrupt_chunk_and_manifest_are_recomputed(tmp_path):
    kw = dict(sample_shape=(3,), chunk=5, sampler="ode_euler", steps=3, seed=2)
    sample_sharded(_score, sf.sde.VPSDE(), 12, tmp_path, **kw)
    want = load_samples(tmp_path)
    path = chunk_path(tmp_path, 1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the samples
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="chunk 1"):
        load_samples(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.warns(UserWarning, match="corrupt"):
        sample_sharded(_score, sf.sde.VPSDE(), 12, tmp_path, **kw)
    assert torch.equal(load_samples(tmp_path), want)


def test_resume_may_switch_cuda_graph_which_changes_no_sample(tmp_path):
    kw = dict(sample_shape=(3,), chunk=4, sampler="euler_maruyama", steps=6, seed=2)
    sample_sharded(_score, sf.sde.VPSDE(), 8, tmp_path, **kw)
    want = load_samples(tmp_path)
    chunk_path(tmp_path, 1).unlink()
    with sf.graphs.emulated():  # the second chunk through the captured step
        sample_sharded(_score, sf.sde.VPSDE(), 8, tmp_path, cuda_graph=True, **kw)
    assert torch.equal(load_samples(tmp_path), want)


def test_changed_config_and_bad_input(tmp_path):
    kw = dict(sample_shape=(3,), chunk=5, sampler="ode_euler", seed=2)
    sample_sharded(_score, sf.sde.VPSDE(), 7, tmp_path, steps=3, **kw)
    with pytest.raises(ValueError, match=r"steps: .* steps=3"):
        sample_sharded(_score, sf.sde.VPSDE(), 7, tmp_path, steps=4, **kw)
    with pytest.raises(ValueError, match="sde_config"):
        sample_sharded(_score, sf.sde.VPSDE(beta_max=10.0), 7, tmp_path, steps=3, **kw)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="out_dir: cannot write"):
        sample_sharded(_score, sf.sde.VPSDE(), 7, blocker / "sub", steps=3, **kw)
    with pytest.raises(ValueError, match="n_samples"):
        sample_sharded(_score, sf.sde.VPSDE(), 0, tmp_path / "z", steps=3, **kw)
    with pytest.raises(ValueError, match="extra_args\\['c'\\]"):
        sample_sharded(_score, sf.sde.VPSDE(), 7, tmp_path / "e", steps=3, extra_args={"c": torch.ones(3, 1)}, **kw)
    with pytest.raises(ValueError, match=r"manifest\.json is missing"):
        load_samples(tmp_path / "nothing")
    chunk_path(tmp_path, 0).unlink()
    with pytest.raises(ValueError, match="chunk 0"):
        load_samples(tmp_path)
