"""pytest-benchmark glue: each benchmark becomes a row of the scorefast results file.

``scorefast bench`` sets SCOREFAST_BENCH_OUT; run directly (``pytest bench``) the rows go to
bench/results/local-<suite>.json.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scorefast.bench import ResultsWriter

QUICK = os.environ.get("SCOREFAST_BENCH_QUICK") == "1"
_writer: ResultsWriter | None = None


def _results() -> ResultsWriter:
    global _writer
    if _writer is None:
        suite = os.environ.get("SCOREFAST_BENCH_SUITE", "local")
        out = os.environ.get("SCOREFAST_BENCH_OUT") or Path(__file__).parent / "results" / f"local-{suite}.json"
        _writer = ResultsWriter(out, suite)
    return _writer


@pytest.fixture
def record(benchmark):
    """record(fn, name=, backend=, dtype=, size=, group=, role=, bytes=, rounds=, **extra): time fn, add a row."""

    def run(fn, *, name, backend, dtype, size, group, role, rounds=None, **extra):
        benchmark.group = group
        benchmark.extra_info.update(dict(name=name, backend=backend, role=role))
        if rounds:
            benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
        else:
            benchmark(fn)
        row = dict(
            name=name,
            backend=backend,
            dtype=str(dtype).replace("torch.", ""),
            size=int(size),
            median_s=float(benchmark.stats.stats.median),
            group=group,
            role=role,
            rounds=int(benchmark.stats.stats.rounds),
            **extra,
        )
        _results().add(row)
        return row

    return run
