"""Benchmark runner and results schema (DESIGN.md "Benchmarks").

A results file is JSON::

    {"suite", "date" (ISO 8601), "machine": {"gpu", "cpu", "torch", "triton", "cuda"},
     "results": [{"name", "backend", "dtype", "size", "median_s", ...}]}

Rows may add fields: ``bytes``, ``gbps``, ``vs_copy`` (bandwidth over the same-bytes copy in the
same run), ``ratio_vs_eager`` / ``ratio_vs_compile`` (the baseline's median over this row's, same
group, same run), ``peer``, ``nfe``.  Measurements are pytest-benchmark suites in ``bench/``;
``scorefast bench --suite cpu|gpu --out bench/results/NAME.json`` runs one and writes the file
row by row (atomically), so a run that is cut off still leaves its results.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from ._io import atomic_savefig, atomic_write_bytes, writable_dir
from .cli import CommandError, one_line, register, user_input

SCHEMA_KEYS = ("suite", "date", "machine", "results")
# suite -> pytest-benchmark file in bench/ (micro-benchmarks and end-to-end run as separate commands)
SUITES = {
    "cpu": "test_cpu_micro.py",
    "cpu-e2e": "test_cpu_e2e.py",
    "cpu-likelihood": "test_cpu_likelihood.py",
    "cpu-compat": "test_cpu_compat.py",
    "cpu-quality": "test_cpu_quality.py",
    "cpu-train": "test_cpu_train.py",
    "glue-ops": "test_glue_ops.py",
    "gpu": "test_gpu_micro.py",
    "gpu-e2e-mlp": "test_gpu_e2e.py",
    "gpu-e2e-unet": "test_gpu_e2e.py",
}
SUITE_ALIASES = {"quality": "cpu-quality"}  # --suite quality is the cpu-quality suite (cpu-quality.json)
MACHINE_KEYS = ("gpu", "cpu", "torch", "triton", "cuda")
ROW_KEYS = ("name", "backend", "dtype", "size", "median_s")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cpu": f"{_cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def validate(results: dict) -> None:
    """Raise ValueError unless ``results`` follows the schema."""
    if not isinstance(results, dict):
        raise ValueError(f"results: expected a JSON object, got {type(results).__name__}")
    for key in SCHEMA_KEYS:
        if key not in results:
            raise ValueError(f"results: missing {key!r}")
    if not isinstance(results["date"], str):
        raise ValueError("results.date: must be an ISO 8601 string")
    datetime.datetime.fromisoformat(results["date"])
    if not isinstance(results["machine"], dict):
        raise ValueError("results.machine: must be an object")
    for key in MACHINE_KEYS:
        if key not in results["machine"]:
            raise ValueError(f"results.machine: missing {key!r}")
    if not isinstance(results["results"], list):
        raise ValueError("results.results: must be a list of rows")
    for i, row in enumerate(results["results"]):
        if not isinstance(row, dict):
            raise ValueError(f"results[{i}]: must be an object")
        for key in ROW_KEYS:
            if key not in row:
                raise ValueError(f"results[{i}]: missing {key!r}")
        if not (isinstance(row["median_s"], float) and row["median_s"] > 0):
            raise ValueError(f"results[{i}].median_s: must be a positive float")


def derive(rows: list[dict]) -> list[dict]:
    """Add bandwidth and same-run ratios: baselines are rows of the same group with role eager/compile/copy."""
    by_group: dict[str, dict[str, dict]] = {}
    for row in rows:
        if "group" in row and "role" in row:
            by_group.setdefault(row["group"], {})[row["role"]] = row
    for row in rows:
        if row.get("bytes"):
            row["gbps"] = row["bytes"] / row["median_s"] / 1e9
        base = by_group.get(row.get("group"), {})
        if row.get("role") in ("fused", "fused_out"):
            for role, key in (("eager", "ratio_vs_eager"), ("compile", "ratio_vs_compile")):
                if role in base:
                    row[key] = base[role]["median_s"] / row["median_s"]
            if "copy" in base and row.get("bytes"):
                row["vs_copy"] = (row["bytes"] / row["median_s"]) / (base["copy"]["bytes"] / base["copy"]["median_s"])
        if "peer" in base and row.get("nfe"):  # GPU end-to-end: a peer's loop, our eager, graphed, compiled
            row["samples_per_s"] = row["size"] / row["median_s"]
            row["s_per_nfe"] = row["median_s"] / row["nfe"]
            for role, key in (("peer", "ratio_vs_peer"), ("eager", "ratio_vs_eager"), ("compile", "ratio_vs_compile")):
                if role in base and role != row["role"]:
                    row[key] = base[role]["median_s"] / row["median_s"]
    return rows


class ResultsWriter:
    """Collects rows and rewrites the results file after each one (temp file + rename)."""

    def __init__(self, path: str | os.PathLike, suite: str):
        self.path = Path(path)
        self.data = {
            "suite": suite,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "results": [],
        }

    def add(self, row: dict) -> None:
        self.data["results"].append(row)
        derive(self.data["results"])
        self.flush()

    def flush(self) -> None:
        atomic_write_bytes(self.path, (json.dumps(self.data, indent=1) + "\n").encode())


def _caption(results: dict) -> str:
    """A table's first line: suite, date, machine, torch."""
    m = results["machine"]
    return f"`{results['suite']}` suite, {results['date'][:10]}, {m['gpu'] or m['cpu']}, torch {m['torch']}"


def _table(results: dict, columns: list[str], rows: list[list[str]]) -> str:
    """A README table: the caption line, then a markdown table of ``columns`` and ``rows`` (cell strings)."""
    lines = [_caption(results), "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(results: dict, roles: tuple[str, ...] = ("fused", "fused_out")) -> str:
    """README table of the fused rows with their same-run ratios, rendered from a results file."""

    def fmt(v, spec, suffix=""):
        return format(v, spec) + suffix if isinstance(v, float) else "-"

    rows = [
        [
            r["name"],
            r["backend"],
            r["dtype"],
            f"{r['size']:.0e}",
            f"{r['median_s'] * 1e3:.3f} ms",
            fmt(r.get("gbps"), ".1f"),
            fmt(r.get("vs_copy"), ".0%"),
            fmt(r.get("ratio_vs_eager"), ".2f", "x"),
            fmt(r.get("ratio_vs_compile"), ".2f", "x"),
        ]
        for r in results["results"]
        if r.get("role") in roles
    ]
    columns = ["op", "backend", "dtype", "size", "median", "GB/s", "vs copy", "vs eager", "vs torch.compile"]
    return _table(results, columns, rows)


def sampler_table(results: dict) -> str:
    """README table of end-to-end sampler rows (fixed NFE budget), rendered from a results file."""
    rows = [
        [
            r["name"],
            r.get("model", "-"),
            str(r["size"]),
            str(r["nfe"]) + (f" ({r['nfe_mean']:.0f})" if r.get("nfe_mean", r["nfe"]) != r["nfe"] else ""),
            f"{r['median_s'] * 1e3:.1f} ms",
            f"{r['median_s'] / r['nfe'] * 1e6:.0f} us",
            f"{r['ratio_vs_eager']:.2f}x" if "ratio_vs_eager" in r else "-",
            r.get("peer") or "-",
            f"{r['sliced_wasserstein']:.3f} ({r['sw_floor']:.3f})" if "sliced_wasserstein" in r else "-",
        ]
        for r in results["results"]
        if r.get("role") == "fused" and "nfe" in r
    ]
    columns = ["sampler", "model", "batch", "NFE", "median", "per NFE", "vs peer loop", "peer", "sliced W (floor)"]
    return _table(results, columns, rows)


def e2e_table(results: dict) -> str:
    """README table of a GPU end-to-end suite: per sampler and batch, every role's time per NFE side by side."""
    roles = ("peer", "eager", "graph", "eager-bf16", "graph-bf16", "compile")
    lines = [
        _caption(results),
        "",
        "| sampler | batch | NFE | " + " | ".join(f"{r} /NFE" for r in roles) + " | graph vs peer | graph vs eager "
        "| graph vs compile | host CPU /step (graph) |",
        "|---|---|---|" + "---|" * (len(roles) + 4),
    ]
    groups: dict[str, dict[str, dict]] = {}
    for r in results["results"]:
        if r.get("role") in roles:
            groups.setdefault(r["group"], {})[r["role"]] = r

    def per_nfe(row):
        return f"{row['median_s'] / row['nfe'] * 1e6:.0f} us" if row else "-"

    def ratio(row, key):
        return f"{row[key]:.2f}x" if row and key in row else "-"

    for group, rows in groups.items():
        first = next(iter(rows.values()))
        graph = rows.get("graph")
        cpu = f"{graph['cpu_s_per_step'] * 1e6:.1f} us" if graph and "cpu_s_per_step" in graph else "-"
        if graph and not graph.get("graphed", True):
            cpu += " (not captured)"
        lines.append(
            f"| {group.split('-')[0]} | {first['size']} | {first['nfe']} | "
            + " | ".join(per_nfe(rows.get(role)) for role in roles)
            + f" | {ratio(graph, 'ratio_vs_peer')} | {ratio(graph, 'ratio_vs_eager')} | "
            f"{ratio(graph, 'ratio_vs_compile')} | {cpu} |"
        )
    return "\n".join(lines)


def likelihood_table(results: dict) -> str:
    """README table of the likelihood rows (ours and score_sde's scipy loop), rendered from a results file."""
    rows = [
        [
            r["name"],
            r["divergence"],
            f"{r['rtol']:g}",
            str(r["size"]),
            str(r["nfe"]) + (f" ({r['nfe_mean']:.0f})" if r.get("nfe_mean", r["nfe"]) != r["nfe"] else ""),
            f"{r['median_s'] * 1e3:.1f} ms",
            f"{r['median_s'] / r['nfe'] * 1e6:.0f} us",
            (f"{r['ratio_vs_eager']:.2f}x" if "ratio_vs_eager" in r else "-")
            + (f" / {r['ratio_cpu_paired']:.2f}x" if "ratio_cpu_paired" in r else ""),
            f"{r['abs_err_mean_nll']:.2g}" + (f" ({r['mc_floor']:.3f})" if r.get("mc_floor") is not None else ""),
        ]
        for r in results["results"]
    ]
    columns = ["method", "divergence", "rtol=atol", "batch", "NFE max (mean)", "median", "per max NFE"]
    columns.append("vs score_sde: wall / CPU paired")
    return _table(results, [*columns, "mean-NLL error (MC)"], rows) + _likelihood_goal_line(results)


LIKELIHOOD_GOAL = 1.5  # issue 21: sf.log_likelihood at 1.5x score_sde's loop (equal rtol/atol, equal error)


def _floor3(x: float) -> str:
    """x rounded down to 3 decimals: a ratio short of a goal never prints as reaching it."""
    return f"{math.floor(x * 1000) / 1000:.3f}"


def _likelihood_goal_line(results: dict) -> str:
    """The goal's verdict from the rows raced against score_sde (Hutchinson, both error norms, each
    tolerance): met where every paired CPU ratio reaches it; the wall-clock ratios are given beside."""
    raced = [r for r in results["results"] if "ratio_cpu_paired" in r]
    if not raced:
        return ""
    low = min(raced, key=lambda r: r["ratio_cpu_paired"])
    walls = [r["ratio_vs_eager"] for r in raced if "ratio_vs_eager" in r]
    met = sum(r["ratio_cpu_paired"] >= LIKELIHOOD_GOAL for r in raced)
    verdict = "met" if met == len(raced) else "**not met**"
    wall = ""
    if walls:
        wall = f"; the wall-clock ratios of the same rows span {_floor3(min(walls))}-{_floor3(max(walls))}x"
    return (
        f"\n\nGoal ({LIKELIHOOD_GOAL}x score_sde by the paired CPU ratio on every row raced against it): {verdict}; "
        f"{met} of {len(raced)} rows reach it, the lowest at {_floor3(low['ratio_cpu_paired'])}x "
        f"(error_norm={low['name'].split('=')[-1]}, rtol=atol={low['rtol']:g}){wall}."
    )


def train_table(results: dict) -> str:
    """README table of training-step rows (ours and the peer's loop, same group, same run)."""
    rows = [
        [
            r["name"],
            r["model"],
            str(r["size"]),
            str(r["threads"]),
            f"{r['median_s'] / r['steps'] * 1e3:.2f} ms",
            f"{r['ratio_vs_eager']:.2f}x" if "ratio_vs_eager" in r else "-",
            f"{r['ratio_paired']:.2f}x" if "ratio_paired" in r else "-",
        ]
        for r in results["results"]
    ]
    columns = ["loop", "model", "batch", "threads", "time / step", "vs peer: row medians", "vs peer: paired"]
    return _table(results, columns, rows) + _train_goal_line(results)


TRAIN_GOAL = 1.2  # issue 19: TrainStep at least 1.2x the peer loop on the goal rows (paired ratio)


def _train_goal_line(results: dict) -> str:
    """The goal's verdict from the goal rows' paired ratios (nothing when the file has none)."""
    goal = [r for r in results["results"] if r.get("goal") and "ratio_paired" in r]
    if not goal:
        return ""
    met = [r for r in goal if r["ratio_paired"] >= TRAIN_GOAL]
    low = min(goal, key=lambda r: r["ratio_paired"])
    where = f"{low['optimizer']}, batch {low['size']}, {low['threads']} thread{'s' * (low['threads'] > 1)}"
    verdict = "met" if len(met) == len(goal) else "**not met**"
    return (
        f"\n\nGoal ({TRAIN_GOAL}x the peer by the paired ratio on every goal row): {verdict}; {len(met)} of "
        f"{len(goal)} goal rows reach it, the lowest at {_floor3(low['ratio_paired'])}x ({where})."
    )


def glue_table(results: dict) -> str:
    """README table of glue ops per sampler step (captured and eager) against the budget."""
    rows = [
        [
            r["name"],
            r["sde"],
            str(r["glue_ops_captured"]),
            str(r["glue_ops_eager"]),
            str(r["budget"]),
            "yes" if max(r["glue_ops_captured"], r["glue_ops_eager"]) <= r["budget"] else "**no**",
        ]
        for r in results["results"]
    ]
    columns = ["sampler", "SDE", "glue ops, captured step", "glue ops, eager step", "budget", "within"]
    return _table(results, columns, rows)


def render_table(results: dict) -> str:
    """The README table for any suite's results file."""
    if results["suite"] == "cpu-quality":
        from .quality.report import quality_table

        return quality_table(results)
    if results["suite"] == "glue-ops":
        return glue_table(results)
    if results["suite"] == "cpu-likelihood":
        return likelihood_table(results)
    if results["suite"] == "cpu-train":
        return train_table(results)
    if any(r.get("role") == "peer" for r in results["results"]):
        return e2e_table(results)
    if any("nfe" in r for r in results["results"]):
        return sampler_table(results)
    return markdown_table(results)


def plot_results(results: dict, path: str | os.PathLike) -> Path:
    """A PNG of a results file: each measured row's speed over its same-run baseline (log scale); for the
    quality suite, quality against NFE (``scorefast.quality.report.plot_quality``)."""
    if results["suite"] == "cpu-quality":
        from .quality.report import plot_quality

        return plot_quality(results, path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["results"] if "ratio_vs_eager" in r]
    if not rows:
        raise ValueError("results: no row has a same-run ratio to plot")
    labels = [f"{r['name']} [{r.get('model') or r.get('rtol') or r['size']}]" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [r["ratio_vs_eager"] for r in rows])
    if any("ratio_vs_compile" in r for r in rows):
        ax.scatter(
            [r.get("ratio_vs_compile", float("nan")) for r in rows],
            range(len(rows)),
            color="k",
            marker="|",
            s=120,
            label="vs torch.compile",
            zorder=3,
        )
        ax.legend(loc="lower right")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the same-run baseline (eager / peer loop)")
    m = results["machine"]
    ax.set_title(f"{results['suite']}, {results['date'][:10]}, {m['gpu'] or m['cpu']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def read_results(path: str | os.PathLike, option: str) -> dict:
    """A results file, read and checked against the schema; a ``CommandError`` naming ``option``
    if it is missing, unreadable, not JSON or not a results file."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise CommandError(f"{option}: cannot read {path}: {one_line(err)}") from err
    try:
        results = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise CommandError(f"{option}: {path} is not JSON ({one_line(err)})") from err
    try:
        validate(results)
    except ValueError as err:
        raise CommandError(f"{option}: {path} is not a scorefast results file: {one_line(err)}") from err
    return results


@contextlib.contextmanager
def _rendering(path, option: str):
    """Within: a results file that follows the schema but lacks what a table or plot needs is a
    ``CommandError`` naming ``option`` (``SCOREFAST_DEBUG=1`` shows where)."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as err:
        what = f"missing field {err}" if isinstance(err, KeyError) else one_line(err, {"results": "its rows"})
        raise CommandError(f"{option}: {path}: cannot render it: {what}") from err


def _bench_dir() -> Path:
    here = Path(__file__).resolve().parents[1] / "bench"
    if here.is_dir():
        return here
    raise FileNotFoundError("bench/ not found: run `scorefast bench` from a scorefast checkout")


@register("bench", "run a benchmark suite (pytest-benchmark) and write bench/results/NAME.json")
def _bench_command(parser):
    parser.add_argument("--suite", type=lambda s: SUITE_ALIASES.get(s, s), choices=tuple(SUITES), default="cpu")
    parser.add_argument(
        "--out", help="results file (.json), or a folder to write <suite>.json in (default bench/results/<suite>.json)"
    )
    parser.add_argument("--quick", action="store_true", help="smallest sizes only (a smoke run)")
    parser.add_argument("--table", metavar="RESULTS", help="print the README table of a results file and exit")
    parser.add_argument("--plot", metavar="RESULTS", help="render a results file to PNG (--png) and exit")
    parser.add_argument("--png", help="where --plot writes (default: the results file with .png)")

    def run(args):
        if args.table:
            results = read_results(args.table, "--table")
            with _rendering(args.table, "--table"):
                print(render_table(results))
            return 0
        if args.plot:
            results = read_results(args.plot, "--plot")
            png = Path(args.png or Path(args.plot).with_suffix(".png"))
            with _rendering(args.plot, "--plot"):
                try:
                    plot_results(results, png)
                except OSError as err:
                    raise CommandError(f"--png: cannot write {png}: {one_line(err)}") from err
            print(f"wrote {png}")
            return 0
        with user_input():
            bench = _bench_dir()
        out = Path(args.out or bench / "results" / f"{args.suite}.json").resolve()
        if out.is_dir() or (args.out and out.suffix != ".json"):  # a folder: the suite's own file name in it
            out = out / f"{args.suite}.json"
        with user_input({"out_dir": "--out"}):
            writable_dir(out.parent, "out_dir")
        env = {
            **os.environ,
            "SCOREFAST_BENCH_OUT": str(out),
            "SCOREFAST_BENCH_SUITE": args.suite,
            "SCOREFAST_BENCH_QUICK": "1" if args.quick else "0",
        }
        files = [str(bench / SUITES[args.suite])]
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            *files,
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-only",
            "--benchmark-disable-gc",
            "--benchmark-columns=median,rounds",
        ]
        code = subprocess.call(cmd, env=env, cwd=bench.parent)
        if out.exists():
            results = json.loads(out.read_text())
            if args.suite == "cpu-quality":  # the adaptive_sde verdicts beside the rows
                from .quality.report import annotate

                results = annotate(results)
                atomic_write_bytes(out, (json.dumps(results, indent=1) + "\n").encode())
            print(render_table(results))
            print(f"wrote {out}")
            if args.suite == "cpu-quality" and results["results"]:  # the quality-vs-NFE plot beside it
                print(f"wrote {plot_results(results, out.with_suffix('.png'))}")
        return code

    return run
