"""The dispatcher: top-k all-to-all between the frontend and the expert actors, once per layer.

It is the frontend engine's `moe` function (route happens in the model just before it):

    dispatch: sort the step's (row, expert) pairs by expert; split each expert's rows over its
              healthy replicas in proportion to their measured speed (evenly until measured);
              make ONE call per actor per layer with all its rows
    compute:  each actor runs its experts on its rows (actors/experts/worker.py)
    combine:  un-sort the outputs, sum weight * y over each row's A experts (ExpertGroups.combine)

All data movement sits behind one function, `transport(layer, calls)` (actors/experts/transport.py:
a ZeroMQ channel per actor, the default, or Ray object refs, the equality oracle); GPU-direct
transport can replace them without touching the rest. A call that fails because its actor died
or is restarting is sent again — to a replica if one is healthy, else to the restarted actor,
backing off 0.5, 1, 2, ... s — at most `max_attempts` times within `retry_timeout_s`; then the
layer fails with ExpertCallError, which fails the step's requests (never a loop, never a hang).
Experts hold no request state, so a re-sent call gives the same result.

Load: every layer call records the rows routed to each expert id and each actor's rows and
compute seconds in `load` (actors/experts/load.py: a sliding window); replicas' speeds come from it.
The set of actors changes only through `set_actors`, which the caller runs between two steps
(actors/frontend.py: Engine.run_between_steps), never inside one.

Shapes: N tokens in the step, D hidden, P = N * A (row, expert) pairs.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from ray.exceptions import ActorUnavailableError, RayActorError

from actors.experts.channel import PeerLost, device_rows, empty_host_like, host_rows
from actors.experts.load import LoadWindow
from actors.experts.transport import ObjectRefTransport, Transport
from model.moe import ExpertGroups, group_by_expert

log = logging.getLogger(__name__)

RETRIABLE = (RayActorError, ActorUnavailableError, PeerLost)
# replicas' speeds within SPEED_DEADBAND of each other are split evenly (measurement noise on a
# shared node is that large); otherwise a replica's share stays within about 1/2x..2x of an even one
SPEED_DEADBAND, MAX_SPEED_RATIO = 1.25, 2.0


class ExpertCallError(RuntimeError):
    """An expert call failed for good; the message names the layer, experts and cause."""


@dataclasses.dataclass
class Call:
    actor: int                          # index into Dispatcher.actors
    segments: list[tuple[int, int]]     # [start, end) slices of the sorted pairs, actor's order
    counts: list[int]                   # rows per expert id the actor holds


class Dispatcher:
    def __init__(self, actors: Sequence[object], actor_experts: Sequence[Sequence[int]],
                 num_experts: int, transport: Transport | None = None,
                 max_attempts: int = 8, retry_timeout_s: float = 60.0, cooldown_s: float = 5.0,
                 load_window_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        """actor_experts[a]: the expert ids actor a holds, in the order its `compute` takes
        them. A failed actor is avoided for `cooldown_s` seconds; load is measured over
        `load_window_s` seconds; `clock` (seconds) and `sleep` are injectable for tests.
        ValueError if some expert id has no actor."""
        self.num_experts = num_experts
        self.transport = transport or ObjectRefTransport()
        self._clock, self._sleep = clock, sleep
        self.max_attempts, self.retry_timeout_s = max_attempts, retry_timeout_s
        self.cooldown_s = cooldown_s
        self.load = LoadWindow(num_experts, load_window_s, clock)
        self._speeds: tuple[int, dict] = (-1, {})          # (second, actor -> s per row)
        self.actors: list = []
        self._down_until: list[float] = []
        self.set_actors(actors, actor_experts)
        self.timings: collections.deque[dict] = collections.deque(maxlen=4096)
        self.retries = 0
        # for metrics (actors/serving/metrics.py), drained by their reader: (layer, pairs per
        # expert id) and (layer, round-trip seconds) of each layer call; appends only on the
        # per-layer path
        self.routed: collections.deque[tuple[int, list[int]]] = collections.deque(maxlen=65536)
        self.round_trips: collections.deque[tuple[int, float]] = collections.deque(maxlen=65536)

    def set_actors(self, actors: Sequence[object], actor_experts: Sequence[Sequence[int]]) -> None:
        """Replace the expert actors (live scaling): call it between two steps, never during
        one. An actor kept keeps its cooldown; one dropped has its channel closed. ValueError
        (nothing changed) if some expert id would have no actor."""
        actor_experts = [list(ids) for ids in actor_experts]
        holders: dict[int, list[int]] = collections.defaultdict(list)
        for a, ids in enumerate(actor_experts):
            for e in ids:
                holders[e].append(a)
        missing = [e for e in range(self.num_experts) if not holders[e]]
        if missing:
            raise ValueError(f"no actor holds expert(s) {missing}")
        down = dict(zip(self.actors, self._down_until))
        disconnect = getattr(self.transport, "disconnect", None)
        for actor in self.actors:
            if actor not in actors and disconnect is not None:
                disconnect(actor)
        self.actors, self.actor_experts, self.holders = list(actors), actor_experts, holders
        self._down_until = [down.get(a, 0.0) for a in self.actors]
        self._speeds = (-1, {})

    # ---- the per-layer path -------------------------------------------------------------
    def moe(self, layer: int, x: torch.Tensor, weights: torch.Tensor,
            experts: torch.Tensor) -> torch.Tensor:
        """x (N, D), routing weights/experts (N, A) -> (N, D), like LocalExperts.moe."""
        return self.moe_begin(layer, x, weights, experts)()

    def moe_begin(self, layer: int, x: torch.Tensor, weights: torch.Tensor,
                  experts: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Dispatch now (a transport with `send` sends at once); the returned function waits
        for the experts, retries what failed, combines and returns (N, D). Between the two the
        caller can do other work: the other micro-batch's attention."""
        t0 = time.perf_counter()
        groups = group_by_expert(weights, experts, self.num_experts)
        self.routed.append((layer, groups.counts))
        self.load.routed(layer, groups.counts)
        xs = host_rows(x[groups.rows])                          # (P, D) by expert, on the host
        calls = self._calls(groups)
        send = getattr(self.transport, "send", None)
        sent = send(layer, self._requests(xs, calls)) if send else None
        t1 = time.perf_counter()

        def finish() -> torch.Tensor:
            t2 = time.perf_counter()
            ys, compute_s = self._send(layer, xs, calls, sent)          # (P, D)
            t3 = time.perf_counter()
            out = groups.combine(device_rows(ys, x.device), x.shape[0])  # (N, D)
            t4 = time.perf_counter()
            total = t1 - t0 + t4 - t2
            self.timings.append({"layer": layer, "rows": x.shape[0], "dispatch": t1 - t0,
                                 "transport": t3 - t2 - compute_s, "compute": compute_s,
                                 "combine": t4 - t3, "total": total})
            self.round_trips.append((layer, total))
            return out
        return finish

    def _requests(self, xs: torch.Tensor, calls: list[Call]) -> list:
        """(actor handle, its rows compacted (n, D), rows per expert id) per call."""
        return [(self.actors[c.actor], torch.cat([xs[s:e] for s, e in c.segments]), c.counts)
                for c in calls]

    def _calls(self, groups: ExpertGroups) -> list[Call]:
        """Split each expert's rows over its healthy replicas; one Call per actor."""
        per_actor: dict[int, dict[int, tuple[int, int]]] = collections.defaultdict(dict)
        for e, start, end in groups.segments():
            replicas = self._healthy(self.holders[e])
            for a, (lo, hi) in zip(replicas, self._split(start, end, replicas)):
                if hi > lo:
                    per_actor[a][e] = (lo, hi)
        calls = []
        for a, by_expert in per_actor.items():
            ids = self.actor_experts[a]
            segments = [by_expert[e] for e in ids if e in by_expert]
            counts = [by_expert[e][1] - by_expert[e][0] if e in by_expert else 0 for e in ids]
            calls.append(Call(a, segments, counts))
        return calls

    def _split(self, start: int, end: int, replicas: list[int]) -> list[tuple[int, int]]:
        """[start, end) cut into one range per replica: in proportion to each one's speed
        (1 / measured seconds per row) once all are measured and they differ by more than
        SPEED_DEADBAND, else evenly."""
        n, k = end - start, len(replicas)
        speeds = self.speeds()
        per_row = [speeds.get(self.actors[a]) for a in replicas]
        if k == 1 or None in per_row or max(per_row) <= SPEED_DEADBAND * min(per_row):
            return [(start + n * i // k, start + n * (i + 1) // k) for i in range(k)]
        inverse = [1.0 / s for s in per_row]
        shares = [v / sum(inverse) for v in inverse]
        for _ in range(4):                 # clamp to [1/(2k), 2/k] and renormalise (converges)
            shares = [min(max(v, 1 / (MAX_SPEED_RATIO * k)), MAX_SPEED_RATIO / k) for v in shares]
            shares = [v / sum(shares) for v in shares]
        cuts, acc = [start], 0.0
        for v in shares[:-1]:
            acc += v
            cuts.append(start + int(n * acc + 0.5))
        cuts.append(end)
        return list(zip(cuts, cuts[1:]))

    def speeds(self) -> dict:
        """actor -> measured compute seconds per row (measured actors only), refreshed at most
        once a second."""
        second = int(self._clock())
        if self._speeds[0] != second:
            measured = {a: self.load.seconds_per_row(a) for a in self.actors}
            self._speeds = (second, {a: v for a, v in measured.items() if v is not None})
        return self._speeds[1]

    def _healthy(self, actors: list[int]) -> list[int]:
        now = self._clock()
        up = [a for a in actors if self._down_until[a] <= now]
        return up or actors

    def _send(self, layer: int, xs: torch.Tensor, calls: list[Call],
              sent=None) -> tuple[torch.Tensor, float]:
        """Exchange the calls (the first attempt maybe already sent), re-sending what failed."""
        ys = empty_host_like(xs)
        pending = calls
        attempts, deadline, compute_s = 0, self._clock() + self.retry_timeout_s, 0.0
        while pending:
            attempts += 1
            if attempts == 1 and sent is not None:
                results = self.transport.receive(sent)
            else:
                results = self.transport(layer, self._requests(xs, pending))
            failed = []
            for call, result in zip(pending, results):
                if isinstance(result, Exception):
                    failed.append((call, result))
                    continue
                y, seconds = result
                compute_s = max(compute_s, seconds)
                self.load.called(self.actors[call.actor], y.shape[0], seconds)
                begin = 0
                for s, e in call.segments:
                    ys[s:e] = y[begin:begin + e - s]
                    begin += e - s
            pending = self._retry(layer, failed, attempts, deadline)
        return ys, compute_s

    def _retry(self, layer: int, failed: list[tuple[Call, Exception]], attempts: int,
               deadline: float) -> list[Call]:
        """Calls to send again (re-targeted to healthy replicas), or raise ExpertCallError."""
        again = []
        for call, error in failed:
            ids = self.actor_experts[call.actor]
            if not isinstance(error, RETRIABLE):
                raise ExpertCallError(f"layer {layer}: experts {ids} failed: {error}") from error
            if attempts >= self.max_attempts or self._clock() >= deadline:
                raise ExpertCallError(
                    f"layer {layer}: experts {ids} still failing after {attempts} attempts "
                    f"({type(error).__name__}); giving up on this step") from error
            self._down_until[call.actor] = self._clock() + self.cooldown_s
            target = self._replacement(call.actor)
            log.warning("layer %d: expert actor %d (%s) failed (%s); re-sending to actor %d",
                        layer, call.actor, ids, type(error).__name__, target)
            self.retries += 1
            again.append(dataclasses.replace(call, actor=target))
        if again and all(c.actor == f.actor for c, (f, _) in zip(again, failed)):
            self._sleep(min(0.5 * 2 ** (attempts - 1), max(0.0, deadline - self._clock())))
        return again

    def _replacement(self, actor: int) -> int:
        """A healthy actor holding exactly the same experts, else the same (restarting) one."""
        ids = self.actor_experts[actor]
        twins = [a for a in self.holders[ids[0]] if self.actor_experts[a] == ids and a != actor]
        healthy = [a for a in twins if self._down_until[a] <= self._clock()]
        return healthy[0] if healthy else actor

    # ---- measurements -------------------------------------------------------------------
    def timing_summary(self) -> dict[str, float]:
        """Median seconds per phase over the recorded layer calls."""
        timings = list(self.timings)          # a copy: the step thread may be appending
        if not timings:
            return {}
        keys = ("dispatch", "transport", "compute", "combine", "total")
        return {k: statistics.median(t[k] for t in timings) for k in keys}
