"""Scraping an application's metrics as Prometheus would: every live node's Ray metrics endpoint
(Ray's exporter, over HTTP), this application's `ray_mixtral_ep_*` samples summed over nodes
and replicas. Used by test_metrics.py (the shared app) and test_failover.py (its own app)."""
from __future__ import annotations

import collections
import time
import urllib.request

import ray
from prometheus_client.parser import text_string_to_metric_families

COUNTERS = ("_total", "_count")  # samples that only grow, with each request
LABELS = ("layer", "expert", "finished_reason", "le")   # kept; Serve's replica labels summed


def scrape(app: str, keep: tuple[str, ...] = LABELS) -> dict[str, dict[tuple, float]]:
    """Sample name -> {sorted labels of `app`'s samples: value}, summed over every node and
    over the labels not in `keep` (LABELS: Serve's deployment and replica labels summed)."""
    out: dict[str, dict[tuple, float]] = collections.defaultdict(
        lambda: collections.defaultdict(float))
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("ray_mixtral_ep_") and s.labels.get("application") == app:
                    labels = tuple(sorted((k, v) for k, v in s.labels.items() if k in keep))
                    out[s.name][labels] += s.value
    return out


def total(metrics, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for k, v in metrics.get(name, {}).items() if set(labels.items()) <= set(k))


def settled(app: str) -> dict[str, dict[tuple, float]]:
    """scrape(app) once its counters stand still (two scrapes a report interval apart agree)."""
    def counters(m):
        return {name: dict(series) for name, series in m.items() if name.endswith(COUNTERS)}
    deadline = time.monotonic() + 60
    last = scrape(app)
    while True:
        time.sleep(2)                   # the exporters' report interval: 1 s (cluster/local.py)
        now = scrape(app)
        if counters(now) == counters(last):
            return now
        assert time.monotonic() < deadline, "the counters never stood still"
        last = now


def until_equal(app: str, want: dict[tuple[str, tuple], float], timeout_s: float = 60) -> tuple:
    """(got, last scrape) once `want`'s {(sample name, labels): value} are all scraped as such,
    or at `timeout_s` (the exporters lag by a report interval); got as want's keys."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(app)
        got = {key: total(m, key[0], **dict(key[1])) for key in want}
        if got == want or time.monotonic() > deadline:
            return got, m
        time.sleep(1)
