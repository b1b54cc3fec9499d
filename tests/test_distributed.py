"""sf.distributed: chunked, atomic, resumable sampling; world size 1 vs 3 bitwise; kill -9 + resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
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


KW = dict(sample_shape=(3,), chunk=4, sampler="euler_maruyama", steps=3, seed=2)


def _bytes(out):
    return {p.name: p.read_bytes() for p in sorted((out / "chunks").iterdir())}


def test_a_chunk_copied_over_another_is_refused_by_load_and_resume(tmp_path):
    sample_sharded(_score, sf.sde.VPSDE(), 12, tmp_path, **KW)
    chunk_path(tmp_path, 1).write_bytes(chunk_path(tmp_path, 2).read_bytes())  # same size, same run
    before = _bytes(tmp_path)
    with pytest.raises(ValueError, match=r"chunk 1: .*chunk_000001\.safetensors holds chunk 2 \(ids 8\.\.11\)"):
        load_samples(tmp_path)
    with pytest.raises(ValueError, match=r"chunk_000001\.safetensors holds chunk 2 .* name is chunk 1 \(ids 4\.\.7\)"):
        sample_sharded(_score, sf.sde.VPSDE(), 12, tmp_path, **KW)
    assert _bytes(tmp_path) == before  # refused, not overwritten
    shutil.copy(chunk_path(tmp_path, 2), chunk_path(tmp_path, 7))  # a name past the run's last chunk
    chunk_path(tmp_path, 1).unlink()
    with pytest.raises(ValueError, match=r"chunk_000007\.safetensors holds chunk 2 .* name is no chunk of this run"):
        sample_sharded(_score, sf.sde.VPSDE(), 12, tmp_path, **KW)


@pytest.mark.parametrize("damage", ["delete", "garbage", "wrong type"])
def test_lost_manifest_settings_come_from_the_chunks(tmp_path, damage):
    sample_sharded(_score, sf.sde.VPSDE(), 12, tmp_path, **KW)
    want, before = load_samples(tmp_path), _bytes(tmp_path)
    manifest = tmp_path / "manifest.json"
    if damage == "delete":
        manifest.unlink()
    else:
        manifest.write_text("{not json" if damage == "garbage" else "[1, 2]")
        with pytest.raises(ValueError, match=r"manifest\.json is corrupt"):
            load_samples(tmp_path)
    with pytest.raises(ValueError, match=r"seed: .*chunk_000000\.safetensors holds a run with seed=2, this call has 3"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sample_sharded(_score, sf.sde.VPSDE(), 12, tmp_path, **{**KW, "seed": 3})
    assert _bytes(tmp_path) == before and not manifest.exists()  # nothing overwritten; the damaged one kept
    assert len(list(tmp_path.glob("manifest.json.corrupt-*"))) == (damage != "delete")
    with pytest.warns(UserWarning, match="rebuilding .*manifest.json from the headers of 3 chunk"):
        sample_sharded(_score, sf.sde.VPSDE(), 12, tmp_path, **KW)
    assert torch.equal(load_samples(tmp_path), want) and _bytes(tmp_path) == before


@pytest.mark.parametrize(
    "manifest",
    [
        '"text"',
        "5",
        '{"config": 5}',
        '{"config": {"chunk": "4", "n_samples": 12}}',
        '{"config": {}, "n_chunks": []}',
        "[" * 100_000,
    ],
    ids=["str", "int", "config-int", "chunk-str", "n_chunks-list", "deep"],
)
def test_a_manifest_of_the_wrong_type_is_a_clear_error(tmp_path, manifest):
    sample_sharded(_score, sf.sde.VPSDE(), 12, tmp_path, **KW)
    want = load_samples(tmp_path)
    (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(ValueError, match=r"out_dir: .*manifest\.json is corrupt: "):
        load_samples(tmp_path)
    with pytest.warns(UserWarning, match=r"manifest\.json is corrupt"):
        with pytest.warns(UserWarning, match="rebuilding .* from the headers of 3 chunk"):
            sample_sharded(_score, sf.sde.VPSDE(), 12, tmp_path, **KW)
    assert torch.equal(load_samples(tmp_path), want)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"sampler": "bogus"}, "sampler: unknown sampler 'bogus'"),
        ({"steps": 0}, "steps: "),
        ({"sampler": "heun", "steps": 1}, "steps: heun"),
        ({"seed": -1}, "seed"),
        ({"seed": 1 << 64}, "seed"),
        ({"snr": 0.1}, "snr: not an option of sampler 'euler_maruyama'"),
        ({"extra_args": {"c": torch.ones(5, 1)}}, r"extra_args\['c'\]"),
        ({"sample_shape": (3, 0)}, "sample_shape"),
        ({"precision": "fp8"}, "precision"),
        ({"device": "bogus"}, "device: not a device"),
        ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "cuda:999"}, "device: cuda"),
    ],
)
def test_a_bad_setting_writes_nothing(tmp_path, bad, match):
    out = tmp_path / "run"
    with pytest.raises((ValueError, TypeError), match=match):
        sample_sharded(_score, sf.sde.VPSDE(), 12, out, **{**KW, **bad})
    assert not out.exists()  # validated before anything was written: the corrected call is not locked out
    sample_sharded(_score, sf.sde.VPSDE(), 12, out, **KW)
    assert load_samples(out).shape == (12, 3)


def test_a_run_that_wrote_no_chunk_does_not_lock_the_directory(tmp_path):
    def broken(x, t):
        raise RuntimeError("network failed")

    with pytest.raises(RuntimeError, match="network failed"):
        sample_sharded(broken, sf.sde.VPSDE(), 12, tmp_path, **KW)
    assert (tmp_path / "manifest.json").exists() and not _bytes(tmp_path)
    with pytest.warns(UserWarning, match="wrote no chunk"):
        sample_sharded(_score, sf.sde.VPSDE(), 12, tmp_path, **{**KW, "steps": 4})
    assert load_samples(tmp_path).shape == (12, 3)


def test_a_damaged_chunk_is_moved_aside_not_deleted(tmp_path):
    sample_sharded(_score, sf.sde.VPSDE(), 12, tmp_path, **KW)
    want = load_samples(tmp_path)
    data = bytearray(chunk_path(tmp_path, 0).read_bytes())
    data[-1] ^= 0x01
    chunk_path(tmp_path, 0).write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"chunk 0: .* moved to chunk_000000\.safetensors\.corrupt-1"):
        sample_sharded(_score, sf.sde.VPSDE(), 12, tmp_path, **KW)
    assert (tmp_path / "chunks" / "chunk_000000.safetensors.corrupt-1").read_bytes() == bytes(data)
    assert torch.equal(load_samples(tmp_path), want)


def test_a_directory_in_use_is_refused(tmp_path):
    from scorefast._io import dir_lock

    tmp_path.mkdir(exist_ok=True)
    with dir_lock(tmp_path, "out_dir"):
        with pytest.raises(ValueError, match=rf"out_dir: .* in use by another scorefast process \(pid {os.getpid()}\)"):
            sample_sharded(_score, sf.sde.VPSDE(), 12, tmp_path, **KW)
    sample_sharded(_score, sf.sde.VPSDE(), 12, tmp_path, **KW)  # free again


class _FakeCuda:
    """What the CUDA and torch.distributed calls return on a 4-GPU node, recorded in call order."""

    def __init__(self, monkeypatch, *, cuda=True, local_rank=2, world=4):
        self.calls, self.initialised = [], False
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 4 if cuda else 0)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.calls.append(("set_device", torch.device(d))))
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: self.initialised)
        monkeypatch.setattr(torch.distributed, "init_process_group", self.init)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda: local_rank)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)

    def init(self, backend, **kwargs):
        self.calls.append(("init_process_group", backend))
        self.initialised = True


def test_under_torchrun_each_rank_uses_cuda_local_rank_set_before_nccl(monkeypatch):
    from scorefast.distributed import init_from_env, local_device

    fake = _FakeCuda(monkeypatch)
    assert init_from_env() == (2, 4, torch.device("cuda", 2))
    assert fake.calls == [("set_device", torch.device("cuda", 2)), ("init_process_group", "nccl")]
    assert local_device() == local_device("cuda") == torch.device("cuda", 2)  # sample_sharded's default
    assert local_device("cuda:3") == torch.device("cuda", 3)
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(ValueError, match="LOCAL_RANK: cuda:5 was asked for, but 4 CUDA device"):
        local_device()
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ValueError, match="LOCAL_RANK: expected an int"):
        local_device()


def test_under_torchrun_without_cuda_ranks_use_gloo_on_the_cpu(monkeypatch):
    from scorefast.distributed import init_from_env, local_device

    fake = _FakeCuda(monkeypatch, cuda=False)
    assert init_from_env() == (2, 4, torch.device("cpu"))
    assert fake.calls == [("init_process_group", "gloo")]
    with pytest.raises(ValueError, match="device: cuda was asked for, but CUDA is not available"):
        local_device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "1")
    fake.initialised, fake.calls = False, []
    assert init_from_env("cpu")[2] == torch.device("cpu") and fake.calls == []  # alone: no group
