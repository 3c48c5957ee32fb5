"""bench/pool.py's pure parts (no Ray): reading a process's resident bytes, a run's merge counts,
the tables, and the H100 estimate's arithmetic (bench/pool_estimate.py)."""
from __future__ import annotations

import argparse
import math
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.info import MergeStats
from bench.pool import (
    Memory,
    Throughput,
    memory_table,
    merges_between,
    parse_counts,
    resident,
    smaps_rollup,
    throughput_table,
)
from bench.pool_estimate import Gpu, Model, estimate, expert_call_s, layer_period_s, table


def test_smaps_rollup_reads_sizes_in_bytes_and_skips_the_header():
    text = ("561145c73000-7ffe03bdf000 ---p 00000000 00:00 0      [rollup]\n"
            "Rss:                1744 kB\nPss:                 215 kB\n")
    assert smaps_rollup(text) == {"Rss": 1744 * 1024, "Pss": 215 * 1024}


def test_resident_bytes_of_this_process_and_of_a_gone_one():
    rss, pss = resident(os.getpid())
    assert rss >= pss > 0
    assert resident(2**22 + 12345) == (0, 0)            # above any pid_max: never a process


def test_a_runs_merge_counts_are_after_less_before():
    assert merges_between(MergeStats(3, 2, 2, 10), MergeStats(10, 6, 5, 40)) == \
        MergeStats(7, 4, 3, 30)


def test_the_tables_show_ratios_to_one_replica_and_to_a_pool_each():
    mib = 2**20
    lines = memory_table({("per_replica", 1): Memory(8, 800 * mib, 400 * mib, mib),
                          ("per_replica", 2): Memory(16, 1600 * mib, 800 * mib, 2 * mib),
                          ("shared", 2): Memory(8, 800 * mib, 400 * mib, mib)})
    assert lines[2] == "| 1 | per_replica | 8 | 800 | 400 | 1.00 | 1.00 |"
    assert lines[3] == "| 2 | per_replica | 16 | 1600 | 800 | 2.00 | 2.00 |"
    assert lines[4] == "| 2 | shared | 8 | 800 | 400 | 1.00 |  |"        # no 1-replica row
    speeds = {"per_replica": Throughput(32, 32, 1000, 10.0, MergeStats(100, 100, 0, 300), 5.0),
              "shared": Throughput(32, 32, 1500, 10.0, MergeStats(100, 80, 30, 300), 5.0),
              "old": Throughput(32, 32, 500, 10.0, None, 5.0)}
    rows = throughput_table(speeds, 2)[2:]
    assert rows[0] == ("| per_replica | 32 | 32 | 1000 | 100.0 | 1.00 | 100 | 100 | 0.0% | 3.0 "
                       "| 5.0 |")
    assert rows[1] == "| shared | 32 | 32 | 1500 | 150.0 | 1.50 | 100 | 80 | 30.0% | 3.8 | 5.0 |"
    assert rows[2] == "| old | 32 | 32 | 500 | 50.0 | 0.50 | - | - | - | - | 5.0 |"


def test_replica_counts_parse_and_refuse_zero():
    assert parse_counts("1,2,3") == [1, 2, 3]
    with pytest.raises(argparse.ArgumentTypeError, match=">= 1"):
        parse_counts("0,2")


def test_an_expert_layer_of_mixtral_is_memory_bound_up_to_the_ridge_point():
    gpu, model = Gpu(), Model()
    assert model.expert_bytes == 3 * 4096 * 14336 * 2           # 352 MB
    weights_s = model.expert_bytes / gpu.hbm / gpu.efficiency + gpu.call_s
    assert expert_call_s(1) == pytest.approx(weights_s)
    assert expert_call_s(16) == pytest.approx(weights_s)         # decode batches: same cost
    ridge = gpu.flops / gpu.hbm                                  # FLOP per byte, ~295
    assert expert_call_s(2 * ridge) > 1.9 * weights_s - gpu.call_s


@given(st.integers(1, 512), st.integers(1, 8192), st.lists(st.integers(1, 16), min_size=1,
                                                           max_size=6, unique=True))
def test_a_shared_pool_never_needs_more_gpus_than_a_pool_each(batch, context, frontends):
    for r in estimate(tuple(frontends), batch, context):
        assert r.gpus_per_replica == r.frontends * 9
        assert r.gpus_shared == r.frontends + 8 * r.replicas
        assert r.frontends + 8 <= r.gpus_shared_merged <= r.gpus_shared <= r.gpus_per_replica
        assert r.utilisation_shared <= 0.8 + 1e-9
        assert r.replicas == math.ceil(r.frontends * r.utilisation_per_replica / 0.8)


def test_the_estimate_for_64_sequences_of_2048_tokens():
    rows = estimate((1, 2, 4, 8), batch=64, context=2048)
    assert layer_period_s(64, 2048) == pytest.approx(479e-6, rel=0.01)
    assert [r.gpus_shared for r in rows] == [9, 10, 20, 40]
    assert [r.gpus_per_replica for r in rows] == [9, 18, 36, 72]
    assert rows[0].utilisation_per_replica == pytest.approx(0.355, abs=0.01)
    assert table(rows).splitlines()[3].startswith("| 2 | 18 | 10 / 10 | 1 |")
    with pytest.raises(ValueError, match="max_utilisation"):
        estimate(max_utilisation=0)
