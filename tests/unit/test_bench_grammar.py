"""bench/grammar.py measures what it says, on `tiny` with few steps: every row of the
constrained side is masked in every timed step (it stays inside its JSON string), the compile
figures come from a fresh compiler (a cache hit is the same object), and the report prints
both tables."""
from __future__ import annotations

import argparse

import pytest

from bench.grammar import DECODE_STEPS, SIDES, measure, report, settings
from model.engine import Engine


@pytest.fixture(scope="module")
def engine():
    return Engine.from_config("tiny", dtype="float32", max_num_batched_tokens=512)


def test_the_constrained_side_masks_every_row_of_every_step(engine):
    outs = engine.generate([[1, 300 + i] for i in range(4)], settings(True))
    for out in outs:
        assert len(out.token_ids) == DECODE_STEPS + 4 and out.finish_reason == "length"
        assert out.text.startswith('{"text": "')            # still inside the string


def test_measure_and_report(engine):
    out = measure(engine, batch=4, runs=1, steps=3, device="cpu")
    assert sorted(out["step"]) == sorted(SIDES)
    assert all(len(v) == 1 and v[0] > 0 for v in out["step"].values())
    assert out["compile"]["cold"][0] > out["compile"]["cached"][0]
    args = argparse.Namespace(device="cpu", threads=2, preset="tiny", batch=4)
    text = report(out, args, "float32", 1)
    assert "every row constrained" in text and "| cold |" in text
