"""The expert pool's metrics without Ray (actors/serving/pool_metrics.py) and who exports them
(issue 24): the pool's figures come from its owner only, an engine replica on a shared pool
exports its own load apart; the merge counters count each actor's calls once, across flushes
that miss it and its restarts. ModelInfo's pool and frontend fields (grpc_messages)."""
from __future__ import annotations

import collections
import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.info import ActorLoad, EngineInfo, ExpertLoad, MergeStats, PoolInfo
from actors.serving import grpc_messages as gm
from actors.serving.metrics import EngineMetrics
from actors.serving.pool_metrics import PoolGauges, PoolMetrics

E, L = 3, 2                                     # expert ids, layers


class Recorder:
    """A Ray metric's stand-in: every set / inc call's value by its tags."""

    def __init__(self):
        self.calls: list[tuple[float, tuple]] = []

    def set(self, value: float, tags: dict | None = None) -> None:
        self.calls.append((value, tuple(sorted((tags or {}).items()))))

    inc = observe = set

    def last(self) -> dict[tuple, float]:
        return {tags: value for value, tags in self.calls}

    def sum(self) -> float:
        return sum(v for v, _ in self.calls)


def load_of(rates: list[float], actors: list[tuple[tuple[int, ...], float]]) -> ExpertLoad:
    """An ExpertLoad of per-expert `rates` and actors ((expert ids, rows per second), ...)."""
    return ExpertLoad(30.0, tuple(rates), (tuple(rates),) * L, tuple(
        ActorLoad(ids, f"node{i % 2}", rate, None, f"actor{i}")
        for i, (ids, rate) in enumerate(actors)))


LOAD = load_of([6.0, 2.0, 0.0], [((0,), 4.0), ((0,), 2.0), ((1,), 2.0), ((2,), 0.0)])


def recorded(metrics, *names):
    for name in names:
        setattr(metrics, name, Recorder())
    return metrics


def gauges() -> PoolGauges:
    return recorded(PoolGauges(), "load", "replicas", "imbalance")


def test_the_pool_gauges_show_each_expert_ids_actors_and_summed_load():
    g = gauges()
    g.set(LOAD)
    assert g.load.last() == {(("expert", "0"),): 6.0, (("expert", "1"),): 2.0,
                             (("expert", "2"),): 0.0}
    assert g.replicas.last() == {(("expert", "0"),): 2, (("expert", "1"),): 1,
                                 (("expert", "2"),): 1}
    assert g.imbalance.last() == {(): 4.0 / 2.0}


class Dispatcher:
    routed = round_trips = collections.deque()
    retries = 0


def engine_metrics(pool: PoolGauges | None) -> EngineMetrics:
    """EngineMetrics of an idle engine, flushed by hand, its metrics recorded."""
    engine = type("Engine", (), {})()
    engine.scheduler = type("Scheduler", (), {"running": [], "waiting": []})()
    engine.scheduler.prefix_cache = type("Stats", (), {"queries": 0, "hits": 0})()
    engine.kv = type("KV", (), {})()
    engine.kv.allocator = type("Allocator", (), {"num_free": 4, "num_blocks": 4})()
    metrics = EngineMetrics(engine, Dispatcher(), lambda: LOAD, interval_s=3600, pool=pool)
    metrics.close()
    return recorded(metrics, "running", "waiting", "kv_usage", "load")


def test_an_engine_replica_on_a_shared_pool_exports_its_own_load_and_no_pool_figures():
    """`shared`: the pool's gauges are the ExpertPoolServer's; the replica's own load per expert
    id has a name of its own (on the old code the engine exported the pool's names itself)."""
    metrics = engine_metrics(pool=None)
    metrics.flush()
    assert metrics.pool is None
    assert metrics.load.last() == {(("expert", "0"),): 6.0, (("expert", "1"),): 2.0,
                                   (("expert", "2"),): 0.0}


def test_an_engine_replica_that_owns_its_pool_exports_the_pool_figures_too():
    """`per_replica`: as before, the replica's pool's gauges are its own."""
    metrics = engine_metrics(pool=gauges())
    metrics.flush()
    assert metrics.pool.replicas.last()[(("expert", "0"),)] == 2
    assert metrics.pool.load.last() == metrics.load.last()


def pool_metrics(merges) -> PoolMetrics:
    metrics = PoolMetrics(lambda: LOAD, lambda: 2, merges, interval_s=3600)
    metrics.close()
    metrics.pool = gauges()
    metrics.merges = {name: Recorder() for name in metrics.merges}
    return recorded(metrics, "frontends")


def test_the_merge_counters_are_named_after_merge_stats_fields():
    metrics = PoolMetrics(lambda: LOAD, lambda: 2, dict, interval_s=3600)
    metrics.close()
    assert list(metrics.merges) == [f.name for f in dataclasses.fields(MergeStats)]


def test_a_pool_flush_sets_its_gauges_and_frontends():
    metrics = pool_metrics(lambda: {"a": MergeStats(4, 3, 2, 40)})
    metrics.flush()
    assert metrics.frontends.last() == {(): 2}
    assert metrics.pool.replicas.last()[(("expert", "0"),)] == 2
    assert {n: c.sum() for n, c in metrics.merges.items()} == {
        "calls": 4, "computes": 3, "merged_calls": 2, "rows": 40}


def counts(draw, steps: int) -> list[MergeStats]:
    """One actor's cumulative counts over `steps` flushes: each never less than the last."""
    out, now = [], MergeStats()
    for _ in range(steps):
        calls = draw(st.integers(0, 5))
        merged = draw(st.integers(0, calls))
        computes = draw(st.integers(min(calls, 1), calls)) if calls else 0
        now = now + MergeStats(calls, computes, merged, draw(st.integers(0, 50)))
        out.append(now)
    return out


@settings(max_examples=60, deadline=None)
@given(data=st.data(), actors=st.integers(1, 3), steps=st.integers(1, 8))
def test_each_actors_calls_count_once_whichever_flushes_miss_it(data, actors, steps):
    """Cumulative counts read at each flush (an actor that did not answer is left out of that
    flush): the counters end at the sum of the actors' last counts read."""
    lives = {f"actor{a}": counts(data.draw, steps) for a in range(actors)}
    answered = {a: data.draw(st.lists(st.booleans(), min_size=steps, max_size=steps))
                for a in lives}
    flushes = [{a: lives[a][i] for a in lives if answered[a][i]} for i in range(steps)]
    metrics = pool_metrics(None)
    for stats in flushes:
        metrics.count(stats)
    last = MergeStats.merged(lives[a][max(i for i, ok in enumerate(answered[a]) if ok)]
                             for a in lives if any(answered[a]))
    assert {n: c.sum() for n, c in metrics.merges.items()} == dataclasses.asdict(last)


def test_a_restarted_actor_counts_from_zero_again():
    """An actor whose counts went down restarted (a new process): its new counts are added."""
    metrics = pool_metrics(None)
    for stats in (MergeStats(10, 8, 4, 100), MergeStats(12, 9, 5, 110), MergeStats(3, 3, 0, 30),
                  MergeStats(5, 4, 0, 50)):
        metrics.count({"a": stats})
    assert {n: c.sum() for n, c in metrics.merges.items()} == {
        "calls": 17, "computes": 13, "merged_calls": 5, "rows": 160}


def test_model_info_shows_the_pool_once_and_the_answering_replicas_own_figures():
    """Issue 24: ModelInfo's `pool` (a shared pool's actors, nodes, summed load, frontends and
    merged calls) apart from the replica's own `experts` load and `frontend` figures; unset
    with a pool per replica."""
    info = EngineInfo(context_length=64, vocab_size=100, num_layers=L, num_experts=E,
                      experts_per_token=2, frontend_node_id="head",
                      experts={0: ("node0", "node1"), 1: ("node0",), 2: ("node1",)},
                      free_blocks=3, total_blocks=8, retries=2, tracked_requests=1,
                      expert_load={0: 1.5, 1: 0.5, 2: 0.0})
    pool = PoolInfo("mixtral-ep-pool:app", 7, 2, LOAD,
                    tuple((a.expert_ids, a.node_id, a.actor_id) for a in LOAD.actors),
                    MergeStats(10, 6, 5, 90))
    reply = gm.model_info("tiny", info, pool)
    assert [e.rows_per_second for e in reply.experts] == [1.5, 0.5, 0.0]      # its own
    f = reply.frontend
    assert (f.expert_call_retries, f.kv_blocks_free, f.kv_blocks_total, f.tracked_requests) == (
        2, 3, 8, 1)
    p = reply.pool
    assert (p.name, p.generation, p.frontends) == ("mixtral-ep-pool:app", 7, 2)
    assert [(e.expert_id, list(e.node_ids), e.rows_per_second) for e in p.experts] == [
        (0, ["node0", "node1"], 6.0), (1, ["node0"], 2.0), (2, ["node1"], 0.0)]
    assert [(list(a.expert_ids), a.node_id, a.actor_id, a.rows_per_second) for a in p.actors] == [
        ([0], "node0", "actor0", 4.0), ([0], "node1", "actor1", 2.0),
        ([1], "node0", "actor2", 2.0), ([2], "node1", "actor3", 0.0)]
    assert p.actor_imbalance == 2.0
    assert (p.merges.calls, p.merges.computes, p.merges.merged_calls, p.merges.rows) == (
        10, 6, 5, 90)
    assert not gm.model_info("tiny", info).HasField("pool")
