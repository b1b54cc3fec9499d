"""``scorefast info``: versions, the CPU capability in use, each backend's state and why."""

from __future__ import annotations

import json
import os
import platform
from functools import cache
from importlib import metadata
from pathlib import Path

import torch

from . import backends


@cache
def build_info() -> dict:
    """The record setup.py wrote of what it built, skipped or failed (empty if none)."""
    path = Path(__file__).with_name("_build_info.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def report() -> dict:
    build = build_info()
    states = {name: backends.state(name) for name in backends.NAMES}
    from .backends import cuda_backend

    module_ok, module_why = cuda_backend.module_state()
    return {
        "scorefast": _version("scorefast"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_built_against": build.get("torch"),
        "triton": _version("triton"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backend_override": os.environ.get("SCOREFAST_BACKEND"),
        "backends": {
            n: {"available": s.available, "devices": list(s.devices), "why": s.why} for n, s in states.items()
        },
        "cuda_module": {"loaded": module_ok, "why": module_why, "build": build.get("cuda")},
        "build": build.get("parts", {}),
    }


def format_report(r: dict) -> str:
    lines = [
        f"scorefast {r['scorefast']}  python {r['python']}",
        f"torch {r['torch']} (extension built against {r['torch_built_against'] or 'nothing: not built'})",
        f"triton {r['triton'] or 'not installed'}",
        f"CPU capability {r['cpu_capability']}, {r['threads']} threads",
        f"CUDA device: {r['gpu'] or 'none'}",
        "",
        "backends:",
    ]
    for name, s in r["backends"].items():
        mark = "yes" if s["available"] else "no "
        devices = "/".join(s["devices"]) or "-"
        lines.append(f"  {name:7s} {mark} [{devices}] {s['why']}")
    m = r["cuda_module"]
    lines.append(f"  _cuda   {'yes' if m['loaded'] else 'no '} {m['why']}")
    if r["build"]:
        lines += ["", "build:"]
        lines += [f"  {k}: {v.get('state')}{' - ' + v['why'] if v.get('why') else ''}" for k, v in r["build"].items()]
    if r["torch_built_against"] and r["torch_built_against"] != r["torch"]:
        lines.append(
            f"WARNING: extension built against torch {r['torch_built_against']}, running {r['torch']}: rebuild"
        )
    return "\n".join(lines)


def main() -> None:
    print(format_report(report()))
