"""Prometheus metrics of the served application, through Ray's metrics (`ray.serve.metrics`:
Ray's `ray.util.metrics` plus the replica's deployment / replica / application tags). Every
node's metrics agent exports them on the port given to `ray start --metrics-export-port`, with
Ray's `ray_` prefix (a counter also gets `_total`): e.g. `ray_mixtral_ep_generation_tokens_total`.
Names follow vLLM's (https://docs.vllm.ai/en/latest/design/metrics.html), plus what only an
expert-parallel engine has: tokens routed to each expert, the per-layer dispatch round trip,
expert call retries, and for elastic experts each expert id's load over the dispatcher's window,
its replicas, and the imbalance of rows over the expert actors.

Each metric is owned by the process that a death loses least of:
- `RequestMetrics`, a gateway replica's: what its clients were delivered (prompt and generated
  tokens, TTFT, inter-token gaps, latency, finish reasons), recorded as each request's chunks
  leave the ResumableStream (actors/failover.py). An engine replica's death is invisible here: a
  resumed request's prompt and first token are counted once, and every delivered token once.
- `EngineMetrics`, an engine replica's: its own state (running / waiting requests, KV cache
  usage, the prefix cache's queries and hits in tokens, as vLLM's `prefix_cache_queries` /
  `prefix_cache_hits`) and the dispatcher's counts, read once per `interval_s` by a daemon
  thread, so the per-layer path only appends to the dispatcher's queues
  (actors/experts/dispatcher.py: `routed`, `round_trips`). A flush that fails is logged
  (WARNING, once until one succeeds); a thread that dies is logged (ERROR) and fails
  `check()`, the replica's health check, so Serve replaces the replica rather than let its
  metrics stop silently. It reports its own routing load per expert id
  (`mixtral_ep_frontend_expert_load_rows_per_second`) whichever pool it uses.
- the expert pool's figures (actors/serving/pool_metrics.py), its owner's: each expert id's
  load summed over the pool's frontends, its actors, their imbalance. With `expert_pool:
  per_replica` the engine replica owns its pool and its EngineMetrics exports them (given
  `pool`); with `shared` the one ExpertPoolServer replica does, once for all engine replicas.
`FlushThread` is the daemon thread that reads an engine's or a pool's metrics.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actors.serving.pool_metrics import PoolGauges
    from model.output import StreamChunk

log = logging.getLogger(f"ray.serve.{__name__}")

# seconds; the first three as vLLM's, the last for one layer's expert round trip
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0]
ROUND_TRIP_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                      0.25, 0.5, 1.0, 2.5]


class RequestMetrics:
    """The request metrics of one gateway replica: `request(n)` per request sent to the engine."""

    def __init__(self):
        from ray.serve import metrics as m
        self.ttft = m.Histogram("mixtral_ep_time_to_first_token_seconds",
                                "Time from a request's call to the engine (at the gateway) "
                                "to its first token.", boundaries=TTFT_BUCKETS)
        self.itl = m.Histogram("mixtral_ep_inter_token_latency_seconds",
                               "Time between two tokens of a request's stream.",
                               boundaries=ITL_BUCKETS)
        self.e2e = m.Histogram("mixtral_ep_e2e_request_latency_seconds",
                               "Time from a request's call to the engine to its last token.",
                               boundaries=E2E_BUCKETS)
        self.prompt_tokens = m.Counter("mixtral_ep_prompt_tokens",
                                       "Prompt tokens of requests that got a first token.")
        self.generation_tokens = m.Counter("mixtral_ep_generation_tokens",
                                           "Tokens generated and delivered to the gateway.")
        self.finished = m.Counter("mixtral_ep_request_success",
                                  "Requests finished, by finish reason (stop, length).",
                                  tag_keys=("finished_reason",))

    def request(self, prompt_tokens: int, choices: int = 1) -> Request:
        """A request of `prompt_tokens` prompt tokens and n `choices`, sent to the engine now."""
        return Request(self, prompt_tokens, choices)


class FlushThread:
    """A daemon thread that calls `flush()` every `interval_s` seconds: a flush that fails is
    logged (WARNING, once until one succeeds); a thread that dies is logged (ERROR) and fails
    `check()`, its replica's health check. `what` names the metrics in those lines."""

    def __init__(self, flush: Callable[[], None], interval_s: float, what: str):
        self.flush, self.interval_s, self.what = flush, interval_s, what
        self._stop = threading.Event()
        self._died: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name=what.replace(" ", "-"),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self._stop.set()

    def check(self) -> None:
        """RuntimeError if the flushing thread died (the replica's metrics stopped)."""
        if not self.thread.is_alive() and not self._stop.is_set():
            raise RuntimeError(f"the {self.what} thread died ({self._died!r}): this "
                               "replica's metrics stopped")

    def _loop(self) -> None:
        failing = False
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    self.flush()
                except Exception:
                    if not failing:
                        log.warning("%s flush failed (the metrics are stale until one "
                                    "succeeds)", self.what, exc_info=True)
                    failing = True
                else:
                    if failing:
                        log.info("%s flush works again", self.what)
                    failing = False
        except BaseException as e:          # logged, and `check` fails from now on
            self._died = e
            log.error("the %s thread died; the health check fails from now on", self.what,
                      exc_info=True)


class EngineMetrics:
    """The metrics of one engine replica; `engine` is its Engine, `dispatcher` its Dispatcher."""

    def __init__(self, engine, dispatcher, expert_load, interval_s: float = 1.0,
                 pool: PoolGauges | None = None):
        """`expert_load()`: the replica's ExpertLoad now (Frontend.expert_load); `pool`: its
        pool's gauges (actors/serving/pool_metrics.py) where this replica owns its expert
        actors (`expert_pool: per_replica`), None where a shared pool's owner exports them."""
        from ray.serve import metrics as m
        self.engine, self.dispatcher = engine, dispatcher
        self.expert_load = expert_load
        self.running = m.Gauge("mixtral_ep_num_requests_running", "Requests being decoded.")
        self.waiting = m.Gauge("mixtral_ep_num_requests_waiting", "Requests queued.")
        self.kv_usage = m.Gauge("mixtral_ep_kv_cache_usage_perc",
                                "Fraction of KV cache blocks in use (0 to 1).")
        self.routed = m.Counter("mixtral_ep_expert_routed_tokens",
                                "Tokens routed to an expert id in a layer (each token counts "
                                "once per expert it picks).", tag_keys=("layer", "expert"))
        self.round_trip = m.Histogram("mixtral_ep_dispatch_round_trip_seconds",
                                      "One layer's expert round trip at the frontend (dispatch, "
                                      "transport, expert compute, combine).",
                                      boundaries=ROUND_TRIP_BUCKETS, tag_keys=("layer",))
        self.retries = m.Counter("mixtral_ep_expert_call_retries",
                                 "Expert calls sent again after their actor failed.")
        self.load = m.Gauge("mixtral_ep_frontend_expert_load_rows_per_second",
                            "Rows (token, expert pairs) this engine replica routed to an "
                            "expert id per second, all layers, over the load window.",
                            tag_keys=("expert",))
        self.pool = pool
        self.cache_queries = m.Counter("mixtral_ep_prefix_cache_queries",
                                       "Prompt tokens looked up in the prefix cache (at a "
                                       "request's first admission).")
        self.cache_hits = m.Counter("mixtral_ep_prefix_cache_hits",
                                    "Of those, tokens whose KV was taken from the prefix cache.")
        self._seen: dict[str, int] = {}       # cumulative counts at the last flush, by name
        self.flusher = FlushThread(self.flush, interval_s, "engine metrics")

    def close(self) -> None:
        self.flusher.close()

    def check(self) -> None:
        """RuntimeError if the flushing thread died (the replica's metrics stopped)."""
        self.flusher.check()

    def flush(self) -> None:
        """Engine state now, and what the dispatcher counted since the last flush."""
        scheduler, kv = self.engine.scheduler, self.engine.kv.allocator
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        self.kv_usage.set(1.0 - kv.num_free / kv.num_blocks)
        d = self.dispatcher
        routed: collections.Counter[tuple[int, int]] = collections.Counter()
        while d.routed:
            layer, counts = d.routed.popleft()
            for expert, n in enumerate(counts):
                routed[(layer, expert)] += n
        for (layer, expert), n in routed.items():
            if n:
                self.routed.inc(n, tags={"layer": str(layer), "expert": str(expert)})
        while d.round_trips:
            layer, seconds = d.round_trips.popleft()
            self.round_trip.observe(seconds, tags={"layer": str(layer)})
        load = self.expert_load()
        for expert, rate in enumerate(load.rows_per_s):
            self.load.set(rate, tags={"expert": str(expert)})
        if self.pool is not None:
            self.pool.set(load)
        self._count("retries", self.retries, d.retries)
        self._flush_prefix_cache()

    def _flush_prefix_cache(self) -> None:
        """The prefix cache's queries and hits (tokens) since the last flush."""
        stats = self.engine.scheduler.prefix_cache       # cumulative, since the engine started
        self._count("queries", self.cache_queries, stats.queries)
        self._count("hits", self.cache_hits, stats.hits)

    def _count(self, name: str, counter, total: int) -> None:
        """Raise a Prometheus counter by what the cumulative `total` (read once: it keeps
        counting) grew since the last flush."""
        seen = self._seen.get(name, 0)
        if total > seen:
            counter.inc(total - seen)
        self._seen[name] = total


class Request:
    """One request's stream as it leaves the gateway's ResumableStream, however many engine
    replicas served it: its prompt tokens and TTFT at its first chunk, inter-token gaps (a
    chunk of k tokens counts as k gaps of equal length), and at its end the latency, tokens and
    reason. With n > 1 choices it is still one request: the prompt and TTFT count once, every
    choice's tokens count, and it ends when its last choice does (that choice's reason)."""

    def __init__(self, metrics: RequestMetrics, prompt_tokens: int, choices: int = 1):
        self.m, self.prompt_tokens = metrics, prompt_tokens
        self.start = self.last = time.monotonic()
        self.chunks = self.tokens = 0
        self.unfinished = choices

    def chunk(self, chunk: StreamChunk) -> None:
        """Record one chunk passed on to the client (ResumableStream's `observe`)."""
        now, token_ids = time.monotonic(), chunk.token_ids
        if self.chunks == 0 and self.prompt_tokens:
            self.m.prompt_tokens.inc(self.prompt_tokens)
        self.chunks += 1
        if token_ids:
            if self.tokens == 0:
                self.m.ttft.observe(now - self.start)
            else:
                gap = (now - self.last) / len(token_ids)
                for _ in token_ids:
                    self.m.itl.observe(gap)
            self.tokens += len(token_ids)
            self.last = now
            self.m.generation_tokens.inc(len(token_ids))
        if chunk.finish_reason:
            self.unfinished -= 1
        if chunk.finish_reason and not self.unfinished:
            self.m.e2e.observe(now - self.start)
            self.m.finished.inc(tags={"finished_reason": chunk.finish_reason})
