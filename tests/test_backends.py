"""Backend loading: graceful fallback, `scorefast info`, required backends, the Triton interpreter run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
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
    files = ["tests/test_ops.py", "tests/test_ops_table.py", "tests/test_noise.py", "tests/test_noise_contract.py"]
    files += ["tests/test_library.py", "tests/test_step_control.py", "tests/test_sde_coefs.py"]
    # the plain emulated run has the large cases; here a 1M-element row once, not per term dtype
    skip_large = "not grid_row_limit and not (terms and 1000003) and not large_odd_row"
    select = ["-m", "cuda_emulated and not cuda", "-k", skip_large, *files]
    allowed = ("compile runs the compiled CPU path",)
    _run_backend_suite(tmp_path, "cuda", env, select, allowed, min_ran=100, logs="asan.*")


# -- the host emulation's warp shuffles --------------------------------------------------------

_SHUFFLE_PROGRAM = r"""
#include <cstdio>
#include <cstring>
#include <vector>

__global__ void shuffles(int* out, int width) {
  const int v = 1000 + static_cast<int>(threadIdx.x);
  int* o = out + threadIdx.x * 4;
  o[0] = __shfl_sync(0xffffffffu, v, 5, width);
  o[1] = __shfl_up_sync(0xffffffffu, v, 3u, width);
  o[2] = __shfl_down_sync(0xffffffffu, v, 3u, width);
  o[3] = __shfl_xor_sync(0xffffffffu, v, 6, width);
}

// the fused corrector's pattern: a butterfly in each warp, then the warps through shared memory
__global__ void reduce(float* out) {
  __shared__ float part[8];
  float v = static_cast<float>(threadIdx.x);
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < 8; ++w) s += part[w];
  out[threadIdx.x] = s;
}

__global__ void own_lane_not_in_mask(int* out) { out[threadIdx.x] = __shfl_xor_sync(0x1u, 1, 1); }
__global__ void lane_exited(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}
__global__ void lanes_at_barrier(int* out) {
  if (threadIdx.x % 32 < 16) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  } else {
    __syncthreads();
  }
}
__global__ void source_outside_mask(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1, 20);
}

int main(int argc, char** argv) {
  const char* mode = argv[1];
  std::vector<int> out(64 * 4);
  if (!std::strcmp(mode, "semantics")) {
    for (int width = 32; width >= 1; width /= 2) {
      SF_LAUNCH(shuffles, dim3(1), dim3(64), 0, out.data(), width);
      for (int v : out) std::printf("%d ", v);
      std::printf("\n");
    }
    std::vector<float> sums(256);
    SF_LAUNCH(reduce, dim3(1), dim3(256), 0, sums.data());
    for (float s : sums) std::printf("%.1f ", s);
    std::printf("\n");
  }
  if (!std::strcmp(mode, "own_lane")) SF_LAUNCH(own_lane_not_in_mask, dim3(1), dim3(32), 0, out.data());
  if (!std::strcmp(mode, "exited")) SF_LAUNCH(lane_exited, dim3(1), dim3(32), 0, out.data());
  if (!std::strcmp(mode, "barrier")) SF_LAUNCH(lanes_at_barrier, dim3(1), dim3(64), 0, out.data());
  if (!std::strcmp(mode, "outside")) SF_LAUNCH(source_outside_mask, dim3(1), dim3(32), 0, out.data());
  return 0;
}
"""


def _expected_shuffles(width: int) -> list[int]:
    """CUDA's documented lane rules for 64 threads (2 warps) holding 1000 + thread index."""
    out = []
    for t in range(64):
        warp, lane = divmod(t, 32)
        start = lane - lane % width
        end = start + width - 1
        srcs = [
            start + 5 % width,  # __shfl_sync: lane srcLane % width of the caller's segment
            lane - 3 if lane - 3 >= start else lane,  # up: below the segment -> own value
            lane + 3 if lane + 3 <= end else lane,  # down: past the segment -> own value
            lane ^ 6 if lane ^ 6 <= end else lane,  # xor: a later segment -> own value
        ]
        out += [1000 + 32 * warp + s for s in srcs]
    return out


@pytest.fixture(scope="module")
def shuffle_program(tmp_path_factory):
    from scorefast.info import build_info

    record = build_info().get("cuda_host", {})
    if not record:
        pytest.skip("no record of the scorefast._cuda_host build (no CUDA toolkit at build time)")
    first = record["commands"][0]
    includes = [arg for arg in first if arg.startswith("-I")]
    tmp = tmp_path_factory.mktemp("shuffles")
    src, exe = tmp / "shuffles.cpp", tmp / "shuffles"
    src.write_text(_SHUFFLE_PROGRAM)
    emulation = ROOT / "csrc" / "cuda" / "host_emulation.h"
    cmd = [first[0], "-x", "c++", "-std=c++17", "-O1", *includes, "-include", str(emulation), str(src), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def test_emulated_warp_shuffles_follow_cuda_lane_rules(shuffle_program):
    res = subprocess.run([str(shuffle_program), "semantics"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for line, width in zip(lines, (32, 16, 8, 4, 2, 1)):
        assert [int(v) for v in line.split()] == _expected_shuffles(width), width
    assert [float(v) for v in lines[6].split()] == [float(sum(range(256)))] * 256


@pytest.mark.parametrize(
    "mode,message",
    [
        ("own_lane", "does not name the calling lane"),
        ("exited", "names a thread that has exited"),
        ("barrier", "deadlock"),
        ("outside", "reads a lane outside its mask"),
    ],
)
def test_emulated_warp_shuffles_abort_on_undefined_use(shuffle_program, mode, message):
    """What a GPU leaves undefined (or hangs on) stops the emulated run with its reason."""
    res = subprocess.run([str(shuffle_program), mode], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and message in res.stderr, (res.returncode, res.stderr)


# -- device guards at the launch sites -----------------------------------------------------------


class _FakeCudaTensor:
    """Metadata and a pointer of a tensor on a GPU this machine does not have."""

    def __init__(self, shape, device="cuda:1", dtype=torch.float32, value=None):
        self.shape, self.device, self.dtype = torch.Size(shape), torch.device(device), dtype
        self._value = value

    def data_ptr(self):
        return 0x1000

    def stride(self, dim=None):
        strides = [1] * len(self.shape)
        for d in range(len(self.shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * self.shape[d + 1]
        return tuple(strides) if dim is None else strides[dim]

    def element_size(self):
        return torch.empty((), dtype=self.dtype).element_size()

    def numel(self):
        return self.shape.numel()

    def __int__(self):
        return self._value


class _GuardRecorder:
    """Stands in for torch.cuda.device / current_stream: which device is current at each launch."""

    def __init__(self):
        self.current = 0
        self.streams = []

    def device(self, device):
        recorder = self

        class Guard:
            def __enter__(self):
                self.previous, recorder.current = recorder.current, torch.device(device).index

            def __exit__(self, *exc):
                recorder.current = self.previous

        return Guard()

    def current_stream(self, device=None):
        index = torch.device(device).index if device is not None else self.current
        self.streams.append((self.current, index))
        return type("Stream", (), {"cuda_stream": 7000 + index})()


def _launches_on_cuda1(monkeypatch, backend_module, launchers):
    """Run each launcher with cuda:1 tensors while cuda:0 is current; return the recorded launches."""
    recorder = _GuardRecorder()
    monkeypatch.setattr(torch.cuda, "device", recorder.device)
    monkeypatch.setattr(torch.cuda, "current_stream", recorder.current_stream)
    seen = []
    for name, call in launchers.items():
        call(lambda *a, name=name, **k: seen.append((name, recorder.current, a, k)))
    assert recorder.current == 0  # restored after every launch
    return seen, recorder


def _fakes(B=2, D=9):
    f = _FakeCudaTensor
    return dict(
        out=f((B, D)), x=f((B, D)), t=f((B, D)), coefs=f((3, 1)), ids=f((B,), dtype=torch.int64),
        table=f((4, 3)), row=f((), dtype=torch.int64, value=2), flag=f((), dtype=torch.int64),
        eps=f((B,)), mask=f((B,), dtype=torch.bool), state=f((9, B), dtype=torch.float64),
        per_sample=f((B,), dtype=torch.float64), pairs=f((2, B), dtype=torch.float64),
        stage_t=f((7, B), dtype=torch.float64), few=f((3,), dtype=torch.float64), coef_table=f((10, B)),
    )  # fmt: skip


def test_cuda_launches_run_under_the_tensors_device_guard_on_its_stream(monkeypatch):
    from scorefast.backends import cuda_backend

    v = _fakes()

    class Module:
        def norm_tiles(self, D):
            return 1

        def snr_scratch_floats(self, B, D):
            return 0

    module = Module()
    monkeypatch.setattr(cuda_backend, "_EMULATED", False)
    monkeypatch.setattr(cuda_backend, "_KERNEL_DEVICE", "cuda")
    monkeypatch.setattr(cuda_backend, "_module", module)
    monkeypatch.setattr(cuda_backend, "_empty", lambda shape, device: _FakeCudaTensor(shape, device))

    def launcher(name, run):
        def call(record):
            setattr(module, name, record)
            run()

        return call

    seen, recorder = _launches_on_cuda1(
        monkeypatch,
        cuda_backend,
        {
            "fill_noise": launcher("fill_noise", lambda: cuda_backend.fill_noise(v["out"], v["ids"], 1, 2, 0, 0, 1)),
            "fused_update": launcher(
                "fused_update",
                lambda: cuda_backend.fused_update(
                    v["out"], v["x"], [v["t"]], v["table"], None, 1, v["row"], 0, True, row=v["row"], flag=v["flag"]
                ),
            ),
            "sumsq_norms": launcher(
                "sumsq_norms", lambda: cuda_backend.sumsq_norms(v["t"], v["ids"], 9, 1, 2, 0, True)
            ),
            "snr_langevin_step": launcher(
                "snr_langevin_step",
                lambda: cuda_backend.snr_langevin_step(
                    v["out"], v["eps"], v["x"], v["t"], None, 0.05, v["ids"], 1, 2, 0, flag=v["flag"]
                ),
            ),
            "scaled_sumsq": launcher("scaled_sumsq", lambda: cuda_backend.scaled_sumsq(v["x"], v["t"], v["out"], 1e-3,
                                                                                        1e-4, "rk45")),
            "step_control": launcher("step_control", lambda: cuda_backend.step_control(
                v["mask"], v["state"], v["eps"], v["per_sample"], v["per_sample"], v["row"], v["few"], v["stage_t"],
                v["few"], v["few"], v["table"], 9, False, "rk45", 0.9, 0.2, 0.2, 0.1, 10.0, True)),
            "select_rows": launcher("select_rows", lambda: cuda_backend.select_rows(v["mask"], [v["out"]], [v["x"]],
                                                                                      [v["t"]])),
            "sde_coefs": launcher("sde_coefs", lambda: cuda_backend.sde_coefs(
                v["coef_table"], v["per_sample"], v["pairs"], v["pairs"], v["pairs"], v["pairs"], v["pairs"])),
        },
    )  # fmt: skip
    assert [(name, device) for name, device, _, _ in seen] == [
        ("fill_noise", 1), ("fused_update", 1), ("sumsq_norms", 1), ("snr_langevin_step", 1),
        ("scaled_sumsq", 1), ("step_control", 1), ("select_rows", 1), ("sde_coefs", 1),
    ]  # fmt: skip
    assert all(args[-1] == 7001 for _, _, args, _ in seen)  # cuda:1's current stream
    assert recorder.streams and all(entry == (1, 1) for entry in recorder.streams)
    # a host row (a CPU tensor beside CUDA data) is folded into the table pointer: row 2, 3 floats a row
    fused = next(args for name, _, args, _ in seen if name == "fused_update")
    assert fused[5:10] == (0x1000 + 2 * 3 * 4, 0, 0, 1, 0)


def test_triton_launches_run_under_the_tensors_device_guard(monkeypatch):
    pytest.importorskip("triton")
    from scorefast.backends import triton_backend
    from scorefast.kernels import fused_update, noise, snr_langevin_step

    kernels = SimpleNamespace(noise=noise, fused_update=fused_update, snr_langevin_step=snr_langevin_step)

    v = _fakes()

    def launcher(module, name, run):
        def call(record):
            monkeypatch.setattr(module, name, record)
            run()

        return call

    seen, _ = _launches_on_cuda1(
        monkeypatch,
        triton_backend,
        {
            "fill_noise": launcher(
                kernels.noise, "fill_noise", lambda: triton_backend.fill_noise(v["out"], v["ids"], 1, 2, 0, 0, 1)
            ),
            "fused_update": launcher(
                kernels.fused_update,
                "fused_update",
                lambda: triton_backend.fused_update(
                    v["out"], v["x"], [v["t"]], v["coefs"], v["ids"], 1, 2, 0, True, flag=v["flag"]
                ),
            ),
            "snr_langevin_step": launcher(
                kernels.snr_langevin_step,
                "snr_langevin_step",
                lambda: triton_backend.snr_langevin_step(v["out"], v["eps"], v["x"], v["t"], None, 0.05, None, 1, 2, 0),
            ),
        },
    )
    # Triton launches on the current device's current stream: the guard makes that cuda:1's
    assert [(name, device) for name, device, _, _ in seen] == [
        ("fill_noise", 1), ("fused_update", 1), ("snr_langevin_step", 1)
    ]  # fmt: skip


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_launch_sites_refuse_mixed_devices(monkeypatch, backend):
    from scorefast.backends import cuda_backend, triton_backend

    module = cuda_backend if backend == "cuda" else triton_backend
    monkeypatch.setattr(torch.cuda, "device", _GuardRecorder().device)
    v = _fakes()
    elsewhere = _FakeCudaTensor((2, 9), device="cuda:0")
    with pytest.raises(ValueError, match=r"terms\[0\]: on cuda:0, but x is on cuda:1"):
        module.fused_update(v["out"], v["x"], [elsewhere], v["coefs"], v["ids"], 1, 2, 0, True)
    flag0 = _FakeCudaTensor((), device="cuda:0", dtype=torch.int64)
    with pytest.raises(ValueError, match="flag: on cuda:0, but x is on cuda:1"):
        module.fused_update(v["out"], v["x"], [v["t"]], v["coefs"], v["ids"], 1, 2, 0, True, flag=flag0)
    with pytest.raises(ValueError, match="score: on cuda:0, but x is on cuda:1"):
        module.snr_langevin_step(v["out"], v["eps"], v["x"], elsewhere, None, 0.05, None, 1, 2, 0)
    if backend == "cuda":  # the adaptive ops' launch sites too
        with pytest.raises(ValueError, match=r"news\[0\]: on cuda:0, but x is on cuda:1"):
            module.select_rows(v["mask"], [v["out"]], [elsewhere], [v["t"]])
        with pytest.raises(ValueError, match="y2: on cuda:0, but x is on cuda:1"):
            module.scaled_sumsq(v["x"], v["t"], elsewhere, 1e-3, 1e-4, "sde")
        # a captured attempt's counter on the device is read there by pointer: it must be x's device
        monkeypatch.setattr(module, "_on_device", lambda t: getattr(t, "device", None) is not None)
        counter0 = _FakeCudaTensor((), device="cuda:0", dtype=torch.int64)
        with pytest.raises(ValueError, match="n: on cuda:0, but x is on cuda:1"):
            module.step_control(v["mask"], v["state"], v["eps"], v["per_sample"], v["per_sample"], counter0, v["few"],
                                v["stage_t"], v["few"], v["few"], v["table"], 9, False, "rk45", 0.9, 0.2, 0.2, 0.1,
                                10.0, True)  # fmt: skip
