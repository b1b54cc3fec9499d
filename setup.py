"""Build of scorefast's compiled parts.

* ``scorefast._C_default`` / ``_C_avx2`` / ``_C_avx512``: the CPU kernels (``csrc/cpu``), one
  source compiled for each instruction set; the package loads the one that matches
  ``torch.backends.cpu.get_cpu_capability()``.  Needs torch at build time, so build with
  ``pip install --no-build-isolation -e .`` after installing torch.  Without torch (a plain
  isolated ``pip install -e .``) they are skipped and the package runs on its torch/Triton
  backends.
* ``scorefast._cuda``: the CUDA kernels (``csrc/cuda``), compiled by nvcc with no torch headers
  and bound with pybind11; built whenever nvcc is found.
* ``scorefast._cuda_host``: the same CUDA sources and bindings compiled by the host C++ compiler
  over ``csrc/cuda/host_emulation.h``, which runs each grid on the CPU; built with ``_cuda``, so
  the CUDA code is tested on machines without a GPU (``SCOREFAST_CUDA_EMULATE=1``).

Environment: ``SCOREFAST_SKIP_CUDA_BUILD=1`` skips the CUDA module; ``SCOREFAST_CUDA_ARCHS``
(default ``80;90+PTX``) picks the architectures; ``MAX_JOBS`` caps parallel compile jobs;
``SCOREFAST_REQUIRE_BACKENDS`` (e.g. ``cpu,cuda_module``) turns a failed build of a named part
into a build error.  What was built, skipped or failed, and why, goes to
``scorefast/_build_info.json`` for ``scorefast info``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(ROOT, "csrc", "include")
CPU_CAPABILITIES = {
    # name: (macro, extra flags)
    "default": ("DEFAULT", []),
    "avx2": ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
    "avx512": ("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]),
}


def _required() -> set[str]:
    return {s.strip() for s in os.environ.get("SCOREFAST_REQUIRE_BACKENDS", "").split(",") if s.strip()}


def _torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def _find_nvcc() -> str | None:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    return nvcc if os.path.exists(nvcc) else None


def _cuda_home(nvcc: str) -> str:
    """The toolkit root: $CUDA_HOME, else the root that holds nvcc and include/cuda_runtime.h."""
    candidates = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
        "/usr/local/cuda",
    ]
    for root in filter(None, candidates):
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    raise RuntimeError(f"no CUDA toolkit headers (include/cuda_runtime.h) next to {nvcc}; set CUDA_HOME")


def _cudart_dir(cuda_home: str) -> str:
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        path = os.path.join(cuda_home, sub)
        if os.path.exists(os.path.join(path, "libcudart.so")):
            return path
    raise RuntimeError(f"libcudart.so not found under {cuda_home}")


def _gencode_flags(archs: str) -> list[str]:
    """``80;90+PTX`` -> -gencode flags: SASS for each, plus PTX for entries marked +PTX."""
    flags = []
    for entry in archs.replace(",", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        arch = entry.removesuffix("+PTX").replace(".", "")
        codes = f"sm_{arch},compute_{arch}" if ptx else f"sm_{arch}"
        flags += ["-gencode", f"arch=compute_{arch},code=[{codes}]"]
    return flags


def _cpu_extensions() -> list[Extension]:
    if _torch_version() is None:
        return []
    from torch.utils.cpp_extension import CppExtension

    machine = platform.machine().lower()
    names = list(CPU_CAPABILITIES) if machine in ("x86_64", "amd64") else ["default"]
    exts = []
    for name in names:
        macro, flags = CPU_CAPABILITIES[name]
        exts.append(
            CppExtension(
                f"scorefast._C_{name}",
                [f"csrc/cpu/capability_{name}.cpp"],
                include_dirs=[INCLUDE, os.path.join(ROOT, "csrc", "cpu")],
                define_macros=[("CPU_CAPABILITY", macro), (f"CPU_CAPABILITY_{macro}", None)],
                extra_compile_args=["-O3", "-fno-fast-math", "-fopenmp", *flags],
            )
        )
    return exts


class CudaModule(Extension):
    """The nvcc-built pybind11 module: its sources are compiled by ``BuildExt._build_cuda``."""

    host_emulation = False

    def __init__(self, name: str = "scorefast._cuda") -> None:
        super().__init__(name, sources=[])
        self.cu_sources = ["csrc/cuda/kernels.cu"]
        self.cpp_sources = ["csrc/cuda/module.cpp"]


class CudaHostModule(CudaModule):
    """``scorefast._cuda_host``: the CUDA sources compiled as C++ over ``host_emulation.h``."""

    host_emulation = True

    def __init__(self) -> None:
        super().__init__("scorefast._cuda_host")


def _base_build_ext():
    if _torch_version() is None:
        return build_ext
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


class BuildExt(_base_build_ext()):
    """Builds every extension it can; a failure is recorded, and fatal only if required."""

    def run(self) -> None:
        self.report: dict = {
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": _torch_version(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "parts": {},
        }
        if _torch_version() is None:
            self.report["parts"]["cpu"] = {
                "state": "skipped",
                "why": "torch was not importable at build time (isolated build); reinstall with "
                "'pip install --no-build-isolation -e .' after installing torch",
            }
        skip = os.environ.get("SCOREFAST_SKIP_CUDA_BUILD", "0") in ("1", "true", "yes")
        if skip or _find_nvcc() is None:
            why = "SCOREFAST_SKIP_CUDA_BUILD is set" if skip else "nvcc was not found at build time"
            for key in ("_cuda", "_cuda_host"):
                self.report["parts"][key] = {"state": "skipped", "why": why}
        super().run()
        # Parts that failed are dropped so that setuptools does not look for their files.
        self.extensions = [
            e
            for e in self.extensions
            if self.report["parts"].get(e.name.rsplit(".", 1)[-1], {}).get("state") == "built"
        ]
        self._write_report()

    def build_extension(self, ext: Extension) -> None:
        part = "cuda_module" if isinstance(ext, CudaModule) else "cpu"
        key = ext.name.rsplit(".", 1)[-1]
        try:
            if isinstance(ext, CudaModule):
                self._build_cuda(ext)
            else:
                super().build_extension(ext)
            self.report["parts"][key] = {"state": "built"}
        except Exception as err:  # a failed part must not stop the others or the install
            self.report["parts"][key] = {"state": "failed", "why": f"{type(err).__name__}: {err}"}
            if part in _required():
                raise
            print(f"scorefast: building {ext.name} failed ({err}); continuing without it", file=sys.stderr)

    def _build_cuda(self, ext: CudaModule) -> None:
        nvcc = _find_nvcc()
        cuda_home = _cuda_home(nvcc)
        archs = os.environ.get("SCOREFAST_CUDA_ARCHS", "80;90+PTX")
        import pybind11

        out = self.get_ext_fullpath(ext.name)
        tmp = os.path.join(self.build_temp, "cuda_host" if ext.host_emulation else "cuda")
        os.makedirs(tmp, exist_ok=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        cxx = os.environ.get("CXX", "c++")
        py_include = sysconfig.get_paths()["include"]
        cxx_flags = [
            "-O2",
            "-std=c++17",
            "-fPIC",
            "-fvisibility=hidden",
            f"-I{INCLUDE}",
            f"-I{os.path.join(cuda_home, 'include')}",
        ]
        if ext.host_emulation:
            cxx_flags.append("-DSCOREFAST_CUDA_HOST_EMULATION")
        objects: list[str] = []
        commands: list[list[str]] = []  # every command, in order (recorded for the host build)

        def run(cmd: list[str]) -> None:
            commands.append(cmd)
            self._run(cmd)

        for src in ext.cu_sources:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            if ext.host_emulation:
                emulation = os.path.join(ROOT, "csrc", "cuda", "host_emulation.h")
                run([cxx, "-x", "c++", "-c", src, "-o", obj, *cxx_flags, "-include", emulation])
            else:
                run(
                    [
                        nvcc,
                        "-c",
                        src,
                        "-o",
                        obj,
                        "-O3",
                        "-std=c++17",
                        f"-I{INCLUDE}",
                        "--threads",
                        jobs,
                        "-Xcompiler",
                        "-fPIC",
                        *_gencode_flags(archs),
                    ]
                )
            objects.append(obj)
        for src in ext.cpp_sources:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            run([cxx, "-c", src, "-o", obj, *cxx_flags, f"-I{pybind11.get_include()}", f"-I{py_include}"])
            objects.append(obj)
        lib = _cudart_dir(cuda_home)
        run([cxx, "-shared", "-o", out, *objects, f"-L{lib}", "-lcudart", f"-Wl,-rpath,{lib}"])
        if ext.host_emulation:
            # how it was built (run in ROOT), so tests can rebuild it under a sanitizer
            self.report["cuda_host"] = {"root": ROOT, "commands": commands}
        else:
            self.report["cuda"] = {"nvcc": nvcc, "archs": archs, "version": _nvcc_version(nvcc)}

    def _run(self, cmd: list[str]) -> None:
        print(" ".join(cmd))
        subprocess.run(cmd, check=True, cwd=ROOT)

    def _write_report(self) -> None:
        targets = {os.path.dirname(self.get_ext_fullpath("scorefast._C_default"))}
        if self.inplace or getattr(self, "editable_mode", False):
            targets.add(os.path.join(ROOT, "scorefast"))
        for target in targets:
            os.makedirs(target, exist_ok=True)
            with open(os.path.join(target, "_build_info.json"), "w") as f:
                json.dump(self.report, f, indent=2)


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out else "unknown"


def _extensions() -> list[Extension]:
    exts = _cpu_extensions()
    if os.environ.get("SCOREFAST_SKIP_CUDA_BUILD", "0") not in ("1", "true", "yes"):
        if _find_nvcc():
            exts += [CudaModule(), CudaHostModule()]
        elif "cuda_module" in _required():
            raise RuntimeError("SCOREFAST_REQUIRE_BACKENDS names cuda_module but nvcc was not found")
    return exts


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
