"""The last thing ``bench/gpu_lease.sh`` prints: what a GPU lease gave, from the files it wrote.

``python bench/lease_summary.py OUTDIR NAME=RC:SECONDS ...`` reads OUTDIR's junit XML and results
JSON files and prints the steps' exit codes and times, the tests passed / failed, and each suite's
key ratios (bandwidth against the same-bytes copy, speed-ups against eager, peers and torch.compile).
Missing or partial files are reported as such: a lease cut short still gets its summary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from xml.etree import ElementTree

SUITES = ("gpu", "gpu-e2e-mlp", "gpu-e2e-unet")


def tests_line(xml: Path) -> str:
    if not xml.exists():
        return "cuda tests: no junit file (the step did not run or died before writing it)"
    root = ElementTree.parse(xml).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            key = "failed" if case.find("failure") is not None else "errors"
            counts[key] += 1
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    errors = sum(int(s.get("errors", 0)) for s in root.iter("testsuite"))  # collection errors have no case
    counts["errors"] = max(counts["errors"], errors)
    line = "cuda tests: " + ", ".join(f"{v} {k}" for k, v in counts.items())
    return line + "".join(f"\n  FAILED {name}" for name in failed[:15])


def _fmt(v, spec: str, suffix: str = "") -> str:
    return format(v, spec) + suffix if isinstance(v, int | float) else "-"


def micro_lines(rows: list[dict]) -> list[str]:
    """Each fused row's bandwidth against the same-run copy and its speed-ups, per group."""
    lines = []
    for r in rows:
        if r.get("role") not in ("fused", "fused_out"):
            continue
        lines.append(
            f"  {r['group']:<28} {r['name']:<36} {_fmt(r.get('gbps'), '.0f', ' GB/s'):>10}  "
            f"vs copy {_fmt(r.get('vs_copy'), '.0%'):>5}  vs eager {_fmt(r.get('ratio_vs_eager'), '.2f', 'x'):>6}  "
            f"vs compile {_fmt(r.get('ratio_vs_compile'), '.2f', 'x')}"
        )
    return lines


def e2e_lines(rows: list[dict]) -> list[str]:
    """The graphed sampler's speed-ups per sampler and batch (graph vs peer loop, eager, compile)."""
    lines = []
    for r in rows:
        if r.get("role") not in ("graph", "graph-bf16"):
            continue
        per_nfe = r["median_s"] / r["nfe"] * 1e6 if r.get("nfe") else None
        ratios = "  ".join(
            f"vs {who} {_fmt(r.get(f'ratio_vs_{who}'), '.2f', 'x'):>6}" for who in ("peer", "eager", "compile")
        )
        lines.append(
            f"  {r['group']:<24} {r['role']:<11} {_fmt(per_nfe, '.0f', ' us/NFE'):>11}  {ratios}  "
            f"replayed {r.get('graphed', '-')}"
        )
    return lines


def suite_lines(path: Path) -> list[str]:
    suite = path.stem
    if not path.exists():
        return [f"{suite}: no results file"]
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return [f"{suite}: unreadable results file ({err})"]
    rows = data.get("results", [])
    machine = data.get("machine", {})
    head = f"{suite}: {len(rows)} rows on {machine.get('gpu') or machine.get('cpu')}, torch {machine.get('torch')}"
    return [head, *(micro_lines(rows) if suite == "gpu" else e2e_lines(rows))]


def summarize(outdir: Path, steps: list[str]) -> str:
    lines = [f"== scorefast GPU lease summary ({outdir}) =="]
    for step in steps:
        name, _, result = step.partition("=")
        rc, _, seconds = result.partition(":")
        state = {"0": "ok", "124": "TIMED OUT", "137": "KILLED (time limit)", "skipped": "skipped"}.get(
            rc, f"FAILED rc={rc}"
        )
        lines.append(f"step {name:<14} {state:<20} {seconds}s")
    lines.append(tests_line(outdir / "cuda-tests.xml"))
    for suite in SUITES:
        lines += suite_lines(outdir / f"{suite}.json")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1]), sys.argv[2:]))
