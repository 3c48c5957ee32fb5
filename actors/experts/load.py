"""Routing load, measured where rows are sent (the dispatcher), over a sliding window.

    window = LoadWindow(num_experts=8, window_s=30.0)
    window.routed(layer, counts)          # rows (token, expert pairs) per expert id, one layer call
    window.called(actor, rows, seconds)   # rows one actor computed in a call, its compute seconds
    window.rows_per_s(num_layers)         # (L, E) rows per second per layer and expert id
    window.actor_rows_per_s(actor); window.seconds_per_row(actor)

The window is a ring of one-second buckets, so recording is a few additions and memory is
bounded by `window_s` whatever the load. Rates divide by the seconds the window covers (at most
`window_s`, less while the engine is young).

An actor's speed is its marginal compute time per row, `b` in `seconds = a + b * rows`, fitted by
least squares over its calls in the window: the fixed cost `a` of a call (launch, the
Python around it) is paid by every replica alike, so splitting rows by plain rows / seconds
would starve whichever replica got fewer rows (fewer rows, more overhead per row, fewer rows
next time). A fit whose slope is not clearly measured (standard error above MAX_SLOPE_ERROR of
it: calls all of one size, or a fixed cost so large that rows hardly matter, as at a GPU's
weight-reading floor) counts as unmeasured, and the dispatcher splits evenly.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Hashable

MIN_CALLS = 8           # calls of an actor in the window before its speed counts
MAX_SLOPE_ERROR = 0.2   # a slope's standard error, relative to it, above which it does not count


@dataclasses.dataclass
class _Fit:
    """Sums for a least-squares line through (rows, seconds) points."""
    n: int = 0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0
    yy: float = 0.0

    def add(self, rows: float, seconds: float) -> None:
        self.n += 1
        self.x += rows
        self.y += seconds
        self.xx += rows * rows
        self.xy += rows * seconds
        self.yy += seconds * seconds

    def merge(self, other: _Fit) -> None:
        for f in ("n", "x", "y", "xx", "xy", "yy"):
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def slope(self) -> float | None:
        """Seconds per row, or None unless enough calls measure it clearly."""
        if self.n < MIN_CALLS:
            return None
        sxx = self.xx - self.x * self.x / self.n
        if sxx <= 1e-12 * max(self.xx, 1.0):
            return None                               # every call the same size
        sxy = self.xy - self.x * self.y / self.n
        syy = self.yy - self.y * self.y / self.n
        b = sxy / sxx
        residual = max(syy - b * sxy, 0.0) / (self.n - 2)
        if b <= 0 or math.sqrt(residual / sxx) > MAX_SLOPE_ERROR * b:
            return None
        return b


@dataclasses.dataclass
class _Bucket:
    second: int
    routed: dict[int, list[int]]                              # layer -> (E,)
    actors: dict[Hashable, _Fit] = dataclasses.field(default_factory=dict)


class LoadWindow:
    def __init__(self, num_experts: int, window_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        if not window_s >= 1:
            raise ValueError(f"load window_s must be >= 1 second, got {window_s!r}")
        self.num_experts, self.window_s = num_experts, window_s
        self._clock = clock
        self._started = clock()
        self._buckets: collections.deque[_Bucket] = collections.deque()
        self._lock = threading.Lock()     # the step records, metrics and the autoscaler read

    def _bucket(self) -> _Bucket:
        now = int(self._clock())
        if not self._buckets or self._buckets[-1].second != now:
            self._buckets.append(_Bucket(now, {}))
            self._drop_old(now)
        return self._buckets[-1]

    def _drop_old(self, now: int) -> None:
        while self._buckets and self._buckets[0].second <= now - self.window_s:
            self._buckets.popleft()

    # ---- recording (the per-layer path) ---------------------------------------------------
    def routed(self, layer: int, counts: list[int]) -> None:
        with self._lock:
            routed = self._bucket().routed
            row = routed.get(layer)
            if row is None:
                row = routed[layer] = [0] * self.num_experts
            for e, n in enumerate(counts):
                row[e] += n

    def called(self, actor: Hashable, rows: int, seconds: float) -> None:
        with self._lock:
            actors = self._bucket().actors
            fit = actors.get(actor)
            if fit is None:
                fit = actors[actor] = _Fit()
            fit.add(rows, seconds)

    # ---- reading --------------------------------------------------------------------------
    def span_s(self) -> float:
        """Seconds the window covers now: window_s, or the engine's age if less (>= 1)."""
        return max(1.0, min(self.window_s, self._clock() - self._started))

    def rows_per_s(self, num_layers: int) -> list[list[float]]:
        """(L, E): rows routed to each expert id in each layer, per second."""
        span, total = self.span_s(), [[0] * self.num_experts for _ in range(num_layers)]
        with self._lock:
            self._drop_old(int(self._clock()))
            for b in self._buckets:
                for layer, row in b.routed.items():
                    for e, n in enumerate(row):
                        total[layer][e] += n
        return [[n / span for n in row] for row in total]

    def _fit(self, actor: Hashable) -> _Fit:
        fit = _Fit()
        with self._lock:
            self._drop_old(int(self._clock()))
            for b in self._buckets:
                if actor in b.actors:
                    fit.merge(b.actors[actor])
        return fit

    def actor_rows_per_s(self, actor: Hashable) -> float:
        """Rows `actor` computed per second over the window (all layers)."""
        return self._fit(actor).x / self.span_s()

    def seconds_per_row(self, actor: Hashable) -> float | None:
        """`actor`'s measured marginal compute seconds per row, None until it has made
        MIN_CALLS calls in the window."""
        b = self._fit(actor).slope()
        return b if b is not None and math.isfinite(b) else None
