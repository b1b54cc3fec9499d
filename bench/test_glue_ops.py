"""Glue ops per sampler step (``bench/_glue.py``): the count of non-view aten ops of one captured step
besides the network's and scorefast's fused ops, the same count for one eager step, and the budget;
each row is timed as one eager 8-step ``sf.sample`` of the stand-in network (batch 4, 3 dims).
``scorefast bench --suite glue-ops`` writes ``bench/results/glue-ops.json``; the README table is
rendered from it."""

from __future__ import annotations

import pytest

import scorefast as sf
from bench import _glue

CASES = _glue.cases()


@pytest.mark.parametrize("name,options,sde", CASES, ids=[_glue.case_id(*c) for c in CASES])
def test_glue_ops(record, name, options, sde):
    captured = _glue.captured_ops(name, options, sde)
    eager = _glue.eager_ops(name, options, sde)

    def run():
        sf.sample(_glue.plain_score, sde, (4, 3), sampler=name, steps=8, seed=3, **options)

    record(
        run,
        name=_glue.case_id(name, options, sde),
        backend="cpu",
        dtype="float32",
        size=4,
        group="glue-ops",
        role="count",
        rounds=5,
        sampler=name,
        sde=type(sde).__name__,
        glue_ops_captured=len(captured),
        glue_ops_eager=len(eager),
        budget=_glue.budget(name),
        ops=sorted(set(captured)),
    )
