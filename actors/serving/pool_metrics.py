"""An expert pool's metrics, exported by its owner only, so once per pool (the process model
of actors/serving/metrics.py):

    PoolGauges    each expert id's routing load over the load window (summed over the pool's
                  frontends), its actors, the imbalance of rows over the actors; exported by
                  the engine replica that owns its pool (`expert_pool: per_replica`, through
                  EngineMetrics) or by PoolMetrics
    PoolMetrics   a shared pool's (`expert_pool: shared`): the one ExpertPoolServer replica's
                  (actors/serving/pool_server.py), PoolGauges plus the live frontends and how
                  the pool's actors merged the calls of several frontends (MergeStats,
                  actors/info.py; actors/experts/channel_server.py)

Prometheus names (Ray adds `ray_` and, to a counter, `_total`): mixtral_ep_expert_load_rows_per_
second{expert}, mixtral_ep_expert_replicas{expert}, mixtral_ep_expert_actor_imbalance,
mixtral_ep_expert_pool_frontends, mixtral_ep_expert_calls, _computes, _merged_calls, _rows
(rows per GEMM: rate(rows) / rate(computes)).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from actors.info import ExpertLoad, MergeStats
from actors.serving.metrics import FlushThread


class PoolGauges:
    """An expert pool's gauges; `set(load)` at each flush of its owner's metrics."""

    def __init__(self):
        from ray.serve import metrics as m
        self.load = m.Gauge("mixtral_ep_expert_load_rows_per_second",
                            "Rows (token, expert pairs) routed to an expert id per second, all "
                            "layers, over the load window, summed over the pool's frontends.",
                            tag_keys=("expert",))
        self.replicas = m.Gauge("mixtral_ep_expert_replicas",
                                "Expert actors holding an expert id.", tag_keys=("expert",))
        self.imbalance = m.Gauge("mixtral_ep_expert_actor_imbalance",
                                 "Max / mean rows per second over the expert actors (1 is even).")

    def set(self, load: ExpertLoad) -> None:
        """The pool's load now (ExpertLoad, its actors included)."""
        for expert, rate in enumerate(load.rows_per_s):
            self.load.set(rate, tags={"expert": str(expert)})
        for expert, n in load.replicas().items():
            self.replicas.set(n, tags={"expert": str(expert)})
        self.imbalance.set(load.imbalance())


class PoolMetrics:
    """A shared pool's metrics, read every `interval_s` seconds by a FlushThread:

        load() -> ExpertLoad                       summed over the live frontends
        frontends() -> int                         live frontends (engine replicas)
        merge_stats() -> {actor id: MergeStats}    each actor's, cumulative; blocking

    The merge counters grow by what each actor's counts grew since the last flush; an actor
    whose counts went down restarted, and counts from zero again."""

    def __init__(self, load: Callable[[], ExpertLoad], frontends: Callable[[], int],
                 merge_stats: Callable[[], dict[str, MergeStats]], interval_s: float = 1.0):
        from ray.serve import metrics as m
        self.read_load, self.read_frontends, self.read_merges = load, frontends, merge_stats
        self.pool = PoolGauges()
        self.frontends = m.Gauge("mixtral_ep_expert_pool_frontends",
                                 "Engine replicas (frontends) using the shared expert pool.")
        self.merges = {       # by MergeStats field
            "calls": m.Counter("mixtral_ep_expert_calls",
                               "Layer calls the expert actors served (one per frontend, layer "
                               "step and actor)."),
            "computes": m.Counter("mixtral_ep_expert_computes",
                                  "Expert computes (one GEMM per expert id) made for them."),
            "merged_calls": m.Counter("mixtral_ep_expert_merged_calls",
                                      "Calls that shared a compute with another call of the "
                                      "same layer."),
            "rows": m.Counter("mixtral_ep_expert_rows",
                              "Rows (token, expert pairs) the expert actors computed.")}
        self._seen: dict[str, MergeStats] = {}      # actor id -> its counts at the last flush
        self.flusher = FlushThread(self.flush, interval_s, "expert pool metrics")

    def close(self) -> None:
        self.flusher.close()

    def check(self) -> None:
        """RuntimeError if the flushing thread died (the pool's metrics stopped)."""
        self.flusher.check()

    def flush(self) -> None:
        self.pool.set(self.read_load())
        self.frontends.set(self.read_frontends())
        self.count(self.read_merges())

    def count(self, stats: dict[str, MergeStats]) -> None:
        """Raise the merge counters by what each actor's cumulative `stats` grew since the
        last flush (an actor missing from `stats` is counted at its next answer)."""
        grown = MergeStats.merged(_grown(now, self._seen.get(actor, MergeStats()))
                                  for actor, now in stats.items())
        self._seen.update(stats)
        for name, counter in self.merges.items():
            if getattr(grown, name):
                counter.inc(getattr(grown, name))


def _grown(now: MergeStats, seen: MergeStats) -> MergeStats:
    """What an actor's cumulative counts grew by: `now` whole if any went down (restarted)."""
    pairs = [(getattr(now, f.name), getattr(seen, f.name)) for f in dataclasses.fields(now)]
    if any(n < s for n, s in pairs):
        return now
    return MergeStats(*(n - s for n, s in pairs))
