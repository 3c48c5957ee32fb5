"""bench/dashboard.py's PromQL evaluator reads every panel of deploy/grafana-dashboard.json (a
form it cannot draw fails here, not after a 4-minute run), and its one arithmetic form, `a / b`
(the prefix cache's hit rate, issue 23), divides series of equal labels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.dashboard import Ratio, evaluate, parse

ROOT = Path(__file__).resolve().parents[2]


def test_every_panel_of_the_dashboard_is_a_form_the_bench_draws():
    dashboard = json.loads((ROOT / "deploy/grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            parse(target["expr"], {"application": "app"})        # raises on another form
    [rate] = [p for p in dashboard["panels"] if p["title"] == "Prefix cache hit rate"]
    assert isinstance(parse(rate["targets"][0]["expr"], {"application": "app"}), Ratio)


def test_a_hit_rate_is_the_rate_of_hits_over_the_rate_of_queries():
    query = parse('sum(rate(hits_total{application=~"$application"}[1m])) / '
                  'sum(rate(queries_total{application=~"$application"}[1m]))',
                  {"application": "app"})
    app = frozenset({("application", "app")})
    scrapes = [{("hits_total", app): h, ("queries_total", app): q}
               for h, q in ((0, 0), (0, 0), (30, 40), (30, 40))]
    [(labels, got)] = evaluate(query, np.array([0.0, 10, 20, 30]), scrapes).items()
    assert np.isnan(got[0]) and np.isnan(got[1])              # one sample; then nothing asked
    assert got[2:].tolist() == [0.75, 0.75]
