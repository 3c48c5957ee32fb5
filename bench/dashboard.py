"""A picture of deploy/grafana-dashboard.json with live data, without Grafana or Prometheus.

    python -m bench.dashboard                   # 3-min workload, ~4 min in all: writes
                                                # deploy/grafana-dashboard.png
    python -m bench.dashboard --minutes 1 --out /tmp/dashboard.png --save /tmp/samples.json
    python -m bench.dashboard --replay /tmp/samples.json     # redraw (after a dashboard edit)

Starts a local Ray cluster (cluster/local.py: a head and 2 expert nodes) and Serve on free
ports, and deploys the demo `tiny` random checkpoint (fp32, CPU; `max_num_seqs` 12 and a 2 MiB
KV cache, so the queue and the cache usage show). Then a workload that changes in phases: 1
streaming gRPC client, 8, 16 plus 4 streaming OpenAI chat clients, the 4 chat clients alone,
then none; each request has a random prompt and max_tokens (8-64), half of them a stop string,
so they finish by `stop` or `length`; the chat clients' prompts start with one shared system
prompt, so the prefix cache's hit-rate panel shows their hits. Midway one expert actor is killed
(`--no-kill` to skip): Ray restarts it and the dispatcher re-sends its calls (the retries
panel). Every `--interval` s it scrapes every node's metrics endpoint, as Prometheus would. At
the end it evaluates every panel's PromQL over those samples with a small evaluator of exactly
the forms the dashboard uses (any other form raises), and draws the panels in the dashboard's
grid with matplotlib.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import io
import json
import logging
import os
import random
import re
import signal
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import matplotlib
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import numpy as np
import openai
import ray
from matplotlib.ticker import EngFormatter, FuncFormatter, PercentFormatter
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from bench.loadgen import COMMON_WORDS as WORDS
from cluster.local import EXPERT_SLOT, FRONTEND_SLOT, free_port, local_cluster
from deploy.app import build_app, serve_start_options
from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc

matplotlib.use("Agg")               # draws to files only (switches pyplot's backend)
ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench.dashboard")
APP = "mixtral-ep"
# (share of the run, gRPC streaming clients, OpenAI streaming chat clients)
PHASES = [(0.15, 1, 0), (0.2, 8, 0), (0.3, 16, 4), (0.2, 0, 4), (0.15, 0, 0)]
KILL_AT = 0.5                                    # share of the run: one expert actor killed
STOP = ["on"]                                    # in about one in 30 tokens of the tiny model
# the chat clients' shared system prompt (~80 tokens): their requests hit the prefix cache
SYSTEM = " ".join(random.Random(0).choices(WORDS, k=60))
Samples = dict[tuple[str, frozenset], float]     # (sample name, labels) -> value, one scrape
Series = dict[frozenset, np.ndarray]             # labels -> a value per scrape (nan: absent)


# ---- the PromQL evaluator ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Query:
    """One target: [histogram_quantile(q,] sum|max [by (..)] ([rate(]metric{..}[[w])]))."""
    metric: str
    matchers: tuple[tuple[str, str, str], ...]   # (label, "=" or "=~", value)
    agg: str                                     # sum | max
    by: tuple[str, ...]
    window_s: float | None                       # rate(..[w]); None: the gauge as is
    quantile: float | None                       # histogram_quantile(q, ..) over `le`


_SEL = r"(?P<metric>[a-zA-Z_:][\w:]*)\{(?P<matchers>[^{}]*)\}"
_RATE = rf"rate\(\s*{_SEL}\[(?P<window>\d+)(?P<unit>[sm])\]\s*\)"
_AGG = r"(?P<agg>sum|max)\s*(?:by\s*\((?P<by>\s*\w+(?:\s*,\s*\w+)*\s*)\))?\s*"
FORMS = [re.compile(rf"histogram_quantile\(\s*(?P<q>\d*\.?\d+)\s*,\s*{_AGG}\(\s*{_RATE}\s*\)\s*\)"),
         re.compile(rf"{_AGG}\(\s*{_RATE}\s*\)"),
         re.compile(rf"{_AGG}\(\s*{_SEL}\s*\)")]
_MATCHER = r'\s*(\w+)\s*(=~|=)\s*"([^"]*)"\s*'


@dataclasses.dataclass(frozen=True)
class Ratio:
    """`a / b` of two Queries (a hit rate): series of equal labels divided, nan where b is 0."""
    num: Query
    den: Query


def parse(expr: str, variables: dict[str, str]) -> Query | Ratio:
    """The Query of one of the forms above (or the Ratio of two, `a / b`), with Grafana's
    $variables substituted; ValueError for anything else (so a dashboard edit cannot be drawn
    wrong)."""
    if expr.count(" / ") == 1:
        return Ratio(*(parse(part, variables) for part in expr.split(" / ")))
    text = re.sub(r"\$\{?(\w+)\}?", lambda v: variables.get(v[1], v[0]), expr).strip()
    m = next((m for form in FORMS if (m := form.fullmatch(text))), None)
    if m is None or "$" in text:
        raise ValueError(f"{expr!r}: bench/dashboard.py evaluates only histogram_quantile(q, "
                         "sum by (le[, l..]) (rate(m_bucket{..}[w]))), sum|max [by (..)] "
                         "(rate(m{..}[w])) and sum|max [by (..)] (m{..}), with $application, "
                         "and a / b of two of those")
    if not re.fullmatch(rf"(?:{_MATCHER},)*{_MATCHER}", m["matchers"]):
        raise ValueError(f"{expr!r}: only label=\"v\" and label=~\"regex\" matchers")
    by = tuple(b.strip() for b in (m["by"] or "").split(",") if b.strip())
    groups = m.groupdict()
    q = float(groups["q"]) if groups.get("q") is not None else None
    if q is not None and not (m["metric"].endswith("_bucket") and "le" in by):
        raise ValueError(f"{expr!r}: histogram_quantile needs sum by (le, ..) of a _bucket")
    window = groups.get("window")
    return Query(m["metric"], tuple(re.findall(_MATCHER, m["matchers"])), m["agg"], by,
                 int(window) * (60 if m["unit"] == "m" else 1) if window else None, q)


def evaluate(query: Query | Ratio, times: np.ndarray, scrapes: list[Samples]) -> Series:
    """The query at every scrape time, over the scrapes up to then."""
    if isinstance(query, Ratio):
        num, den = (evaluate(q, times, scrapes) for q in (query.num, query.den))
        with np.errstate(divide="ignore", invalid="ignore"):
            return {k: np.where(den[k] > 0, v / den[k], np.nan) for k, v in num.items() if k in den}
    series: Series = {}
    for i, samples in enumerate(scrapes):
        for (name, labels), value in samples.items():
            if name == query.metric and matches(dict(labels), query.matchers):
                series.setdefault(labels, np.full(len(times), np.nan))[i] = value
    if query.window_s is not None:
        series = {k: rate(times, v, query.window_s) for k, v in series.items()}
    series = aggregate(series, query.agg, query.by)
    return histogram_quantile(query.quantile, series) if query.quantile is not None else series


def matches(labels: dict[str, str], matchers: tuple[tuple[str, str, str], ...]) -> bool:
    """PromQL's: `=` equal, `=~` the whole value matches the regex; a missing label is ""."""
    return all(re.fullmatch(v, labels.get(k, "")) if op == "=~" else labels.get(k, "") == v
               for k, op, v in matchers)


def rate(times: np.ndarray, values: np.ndarray, window_s: float) -> np.ndarray:
    """Per-second increase over the samples within (t - window, t]; a drop is a counter reset.
    nan where fewer than two samples are in the window."""
    out = np.full(len(times), np.nan)
    for i, t in enumerate(times):
        inside = [j for j in range(i + 1) if t - window_s < times[j] and not np.isnan(values[j])]
        if len(inside) >= 2:
            v = values[inside]
            increase = np.where(v[1:] >= v[:-1], v[1:] - v[:-1], v[1:]).sum()
            out[i] = increase / (times[inside[-1]] - times[inside[0]])
    return out


def aggregate(series: Series, agg: str, by: tuple[str, ...]) -> Series:
    groups = collections.defaultdict(list)
    for labels, values in series.items():
        groups[frozenset((k, v) for k, v in labels if k in by)].append(values)
    out = {}
    for labels, rows in groups.items():
        stack = np.stack(rows)                                       # (series, T)
        absent = np.isnan(stack).all(axis=0)
        out[labels] = np.where(absent, np.nan, np.nansum(stack, axis=0) if agg == "sum"
                               else np.fmax.reduce(stack, axis=0))
    return out


def histogram_quantile(q: float, buckets: Series) -> Series:
    """Prometheus's: linear within the bucket that holds rank q * count (from 0 for the first
    bucket), the highest finite bound if that is +Inf; nan without observations."""
    groups = collections.defaultdict(list)
    for labels, values in buckets.items():
        le = dict(labels)["le"]
        groups[frozenset((k, v) for k, v in labels if k != "le")].append((float(le), values))
    out = {}
    for labels, pairs in groups.items():
        pairs.sort(key=lambda p: p[0])
        bounds = np.array([b for b, _ in pairs])
        counts = np.maximum.accumulate(np.stack([v for _, v in pairs]), axis=0)   # (B, T)
        out[labels] = np.array([_quantile(q, bounds, c) for c in counts.T])
    return out


def _quantile(q: float, bounds: np.ndarray, counts: np.ndarray) -> float:
    if len(bounds) < 2 or bounds[-1] != np.inf or np.isnan(counts).any() or counts[-1] <= 0:
        return np.nan
    rank = q * counts[-1]
    b = int(np.searchsorted(counts, rank))                 # first bucket with count >= rank
    if b == len(bounds) - 1:
        return bounds[-2]
    lower, below = (0.0, 0.0) if b == 0 else (bounds[b - 1], counts[b - 1])
    return lower + (bounds[b] - lower) * (rank - below) / (counts[b] - below)


# ---- scraping and the workload -----------------------------------------------------------
def scrape() -> Samples:
    """This project's samples on every alive node's metrics endpoint (`instance` added, as
    Prometheus adds it)."""
    out: Samples = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        instance = f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
        with urllib.request.urlopen(f"http://{instance}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        ours = "\n".join(line for line in text.splitlines() if "ray_mixtral_ep_" in line)
        for family in text_string_to_metric_families(ours):
            for s in family.samples:
                out[(s.name, frozenset({**s.labels, "instance": instance}.items()))] = s.value
    return out


def scraper(interval_s: float, stop: threading.Event, times: list, scrapes: list) -> None:
    while True:
        try:
            scrapes.append(scrape())
            times.append(time.time())
        except OSError as e:
            log.warning("scrape failed: %s", e)
        if stop.wait(interval_s):
            return


def request(rng: random.Random) -> dict:
    return {"prompt": " ".join(rng.choices(WORDS, k=rng.randint(10, 90))),
            "max_tokens": rng.choice([8, 16, 32, 64]), "stop": STOP if rng.random() < 0.5 else []}


def client(kind: str, target, until: float, seed: int, done: collections.Counter) -> None:
    """Send requests back to back until `until` (monotonic): `target` is a GeneratorStub
    (grpc) or (openai.OpenAI, model) (http)."""
    rng = random.Random(seed)
    while time.monotonic() < until:
        r = request(rng)
        try:
            if kind == "grpc":
                for _ in target.GenerateStream(pb.GenerateRequest(
                        prompt=r["prompt"], max_tokens=r["max_tokens"], temperature=1.0,
                        stop=r["stop"]), timeout=300):
                    pass
            else:
                http, model = target
                for _ in http.chat.completions.create(
                        model=model, messages=[{"role": "system", "content": SYSTEM},
                                               {"role": "user", "content": r["prompt"]}],
                        max_tokens=r["max_tokens"], temperature=1.0, stop=r["stop"] or None,
                        stream=True):
                    pass
            done[kind] += 1
        except (grpc.RpcError, openai.APIError) as e:
            done[f"{kind} failed"] += 1
            log.warning("%s request failed: %s", kind, str(e).splitlines()[0][:200])


def kill_an_expert() -> None:
    """SIGKILL one expert actor's process (an actor of this script's cluster): Ray restarts it
    and the dispatcher re-sends the calls it lost."""
    # the GCS's actor table, as tests/conftest.py reads it (the state API needs the dashboard)
    actors = [a for a in ray._private.state.actors(actor_state_name="ALIVE").values()
              if a["ActorClassName"] == "ExpertWorker"]
    log.info("killing expert actor %s (pid %d)", actors[0]["ActorID"], actors[0]["Pid"])
    os.kill(actors[0]["Pid"], signal.SIGKILL)


def run_workload(stub, http, model: str, seconds: float, kill: bool) -> list[tuple[float, str]]:
    """The phases of PHASES; returns the wall-clock marks (phase starts, the kill) to draw."""
    done: collections.Counter = collections.Counter()
    marks, threads, start = [], [], time.monotonic()
    killer = threading.Timer(KILL_AT * seconds, kill_an_expert)
    if kill:
        killer.start()
        marks.append((time.time() + KILL_AT * seconds, "expert actor killed"))
    for share, n_grpc, n_http in PHASES:
        until = time.monotonic() + share * seconds
        label = " + ".join([f"{n_grpc} gRPC"] * bool(n_grpc)
                           + [f"{n_http} HTTP"] * bool(n_http)) or "idle"
        log.info("%s for %.0f s (done so far: %s)", label, share * seconds, dict(done))
        marks.append((time.time(), label))
        for i in range(n_grpc + n_http):
            kind, target = ("grpc", stub) if i < n_grpc else ("http", (http, model))
            t = threading.Thread(target=client, args=(kind, target, until, len(threads), done))
            t.start()
            threads.append(t)
        time.sleep(max(0.0, until - time.monotonic()))
    for t in threads:
        t.join()
    killer.join()
    log.info("workload done in %.0f s: %s", time.monotonic() - start, dict(done))
    return marks


# ---- drawing -------------------------------------------------------------------------------
BG, PANEL, BORDER, TEXT, GRID = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#2c3235"
COLORS = ["#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9", "#705da0"]
UNITS = {"s": EngFormatter(unit="s", sep=" "), "percentunit": PercentFormatter(1.0, decimals=0),
         "reqps": FuncFormatter(lambda v, _: f"{v:g} req/s"),
         "short": FuncFormatter(lambda v, _: f"{v:g}")}
GRID_W, UNIT_H = 24, 0.3                         # Grafana's columns; inches per grid row


def legend(fmt: str, labels: frozenset) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: dict(labels).get(m[1], ""), fmt)


def natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def draw(dashboard: dict, results: dict, times: np.ndarray, marks: list, out: Path,
         caption: str, width_in: float = 16.0, dpi: int = 90) -> None:
    """Every panel at its gridPos, under the dashboard's title and `caption`."""
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    head = 0.8                                   # inches above the grid for the caption
    fig = plt.figure(figsize=(width_in, rows * UNIT_H + head), facecolor=BG)
    fw, fh = fig.get_size_inches()
    fig.text(0.008, 1 - 0.2 / fh, dashboard["title"], color=TEXT, fontsize=14, weight="bold",
             va="top")
    wrapped = "\n".join(textwrap.fill(line, 230) for line in caption.split("\n"))
    fig.text(0.008, 1 - 0.45 / fh, wrapped, color="#8e8e8e", fontsize=8.5, va="top",
             linespacing=1.4)
    for panel in dashboard["panels"]:
        ax, legend_at = panel_axes(fig, panel, head)
        targets = results[panel["id"]]
        if not any(np.isfinite(v).any() for _, series in targets for v in series.values()):
            ax.set_xticks([]), ax.set_yticks([])
            ax.text(0.5, 0.5, "No data", color=TEXT, ha="center", va="center",
                    transform=ax.transAxes)
        elif panel["type"] == "timeseries":
            timeseries(ax, panel, targets, times, marks)
            fig.legend(*ax.get_legend_handles_labels(), loc="lower left", bbox_to_anchor=legend_at,
                       ncol=len(ax.get_lines()), frameon=False, fontsize=8, labelcolor=TEXT,
                       handlelength=1.2, columnspacing=1.2)
        elif panel["type"] == "heatmap":
            heatmap(ax, panel, targets)
        else:
            raise ValueError(f"panel {panel['title']!r}: cannot draw a {panel['type']!r} panel")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi, facecolor=BG)
    plt.close(fig)
    Image.open(png).convert("RGB").quantize(256).save(out, optimize=True)   # a third of the bytes


def panel_axes(fig, panel: dict, head: float) -> tuple:
    """The panel's box and title at its gridPos (in inches: 24 columns, UNIT_H per row), and the
    axes inside it; plus where its legend goes (figure fraction)."""
    fw, fh = fig.get_size_inches()
    g = panel["gridPos"]
    x0, w = g["x"] * fw / GRID_W + 0.04, g["w"] * fw / GRID_W - 0.08
    y0, h = fh - head - (g["y"] + g["h"]) * UNIT_H + 0.04, g["h"] * UNIT_H - 0.08
    fig.patches.append(plt.Rectangle((x0 / fw, y0 / fh), w / fw, h / fh, transform=fig.transFigure,
                                     facecolor=PANEL, edgecolor=BORDER, lw=0.8, zorder=-1))
    fig.text((x0 + 0.12) / fw, (y0 + h - 0.1) / fh, panel["title"], color=TEXT, fontsize=10,
             weight="bold", va="top")
    bottom = 0.62 if panel["type"] == "timeseries" else 0.45           # x ticks (+ legend)
    ax = fig.add_axes(((x0 + 0.8) / fw, (y0 + bottom) / fh, (w - 1.0) / fw,
                       (h - bottom - 0.4) / fh), facecolor=PANEL)
    ax.tick_params(colors=TEXT, labelsize=8, length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return ax, ((x0 + 0.1) / fw, (y0 + 0.02) / fh)


def timeseries(ax, panel: dict, targets: list, times: np.ndarray, marks: list) -> None:
    """A line per series (targets in order, each one's series by label), named by legendFormat;
    `marks` as dashed annotations, named in the top row; the panel's unit on the y axis."""
    when = [datetime.datetime.fromtimestamp(t) for t in times]
    lines = []
    for target, series in targets:
        named = [(legend(target.get("legendFormat", ""), labels), v)
                 for labels, v in series.items()]
        lines += sorted(named, key=lambda nv: natural(nv[0]))
    for i, (name, values) in enumerate(lines):
        ax.plot(when, values, color=COLORS[i % len(COLORS)], lw=1.4, label=name)
    for t, label in marks:
        color = "#f2495c" if "killed" in label else "#6e7079"
        ax.axvline(datetime.datetime.fromtimestamp(t), color=color, lw=0.8, ls="--", zorder=0)
        if panel["gridPos"]["y"] == 0:
            ax.text(datetime.datetime.fromtimestamp(t), 1.02, f" {label}", color=color, fontsize=7,
                    transform=ax.get_xaxis_transform(), va="bottom")
    ax.set_xlim(when[0], when[-1])
    ax.set_ylim(bottom=0)
    ax.grid(color=GRID, lw=0.6)
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    ax.yaxis.set_major_formatter(UNITS.get(unit, UNITS["short"]))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))


def heatmap(ax, panel: dict, targets: list) -> None:
    """The last value of each series of the (one) target, by its two by-labels: rows x columns."""
    [(target, series)] = targets
    query = target["query"]
    if len(query.by) != 2:
        raise ValueError(f"panel {panel['title']!r}: a heatmap needs sum by (row, column)")
    row, col = query.by
    last = {(dict(k)[row], dict(k)[col]): v[np.isfinite(v)][-1] for k, v in series.items()
            if np.isfinite(v).any()}
    rs = sorted({r for r, _ in last}, key=natural)
    cs = sorted({c for _, c in last}, key=natural)
    grid = np.array([[last.get((r, c), np.nan) for c in cs] for r in rs])   # (rows, cols)
    ax.imshow(grid, cmap="Oranges", aspect="auto", vmin=0)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=8,
                color="white" if v > 0.5 * np.nanmax(grid) else "black")
    ax.set_xticks(range(len(cs)), [f"{col} {c}" for c in cs])
    ax.set_yticks(range(len(rs)), [f"{row} {r}" for r in rs])
    what = f"rate[{query.window_s / 60:g}m]" if query.window_s else "value"
    ax.set_title(f"{what} at the end of the run", color="#8e8e8e", fontsize=8, loc="right")


# ---- main ----------------------------------------------------------------------------------
def collect(args) -> tuple[list[float], list[Samples], list[tuple[float, str]]]:
    """Serve the demo model on a local cluster, run the workload and scrape all along."""
    times, scrapes, stop = [], [], threading.Event()
    with local_cluster(expert_nodes=2, expert_slots=4):
        grpc_port, http_port = free_port(), free_port()
        quiet = {"enable_access_log": False}                  # no log line per request
        serve.start(logging_config=quiet, **serve_start_options(grpc_port, http_port))
        try:
            serve.run(build_app({"expert_resources": EXPERT_SLOT,
                                 "frontend_resources": FRONTEND_SLOT,
                                 "frontend_threads": 1, "expert_threads": 1,
                                 "engine_args": {"max_num_seqs": 12,
                                                 "kv_cache_memory": 2 * 2**20}}),
                      name=APP, route_prefix="/", logging_config=quiet)
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = pb_grpc.GeneratorStub(channel)
                list(stub.GenerateStream(pb.GenerateRequest(prompt="warm up", max_tokens=2),
                                         timeout=300))
                http = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused",
                                     max_retries=0, timeout=300)
                model = http.models.list().data[0].id
                log.info("serving %s: gRPC on %d, HTTP on %d; scraping every %g s",
                         model, grpc_port, http_port, args.interval)
                sampler = threading.Thread(target=scraper,
                                           args=(args.interval, stop, times, scrapes))
                sampler.start()
                marks = run_workload(stub, http, model, args.minutes * 60, args.kill)
                stop.set()
                sampler.join()
        finally:
            stop.set()
            serve.shutdown()
    return times, scrapes, marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="length of the workload")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes")
    ap.add_argument("--kill", action=argparse.BooleanOptionalAction, default=True,
                    help="kill one expert actor midway (the retries panel)")
    ap.add_argument("--out", type=Path, default=ROOT / "deploy/grafana-dashboard.png",
                    help="the PNG to write")
    ap.add_argument("--save", type=Path, help="also write the scraped samples to this JSON file")
    ap.add_argument("--replay", type=Path, help="draw from samples saved by --save; serve nothing")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("httpx", "httpx2"):                          # the openai client's, per request
        logging.getLogger(name).setLevel(logging.WARNING)
    dashboard = json.loads((ROOT / "deploy/grafana-dashboard.json").read_text())
    # a form we cannot draw fails now
    queries = {p["id"]: [{**t, "query": parse(t["expr"], {"application": APP})}
                         for t in p["targets"]]
               for p in dashboard["panels"]}
    if args.replay:
        run = json.loads(args.replay.read_text())
        times, marks, args.minutes, args.interval, args.kill = (
            run["times"], run["marks"], run["minutes"], run["interval"], run["kill"])
        scrapes = [{(name, frozenset(map(tuple, labels))): v for name, labels, v in s}
                   for s in run["scrapes"]]
    else:
        times, scrapes, marks = collect(args)
    if args.save:
        args.save.write_text(json.dumps({
            "times": times, "marks": marks, "minutes": args.minutes, "interval": args.interval,
            "kill": args.kill,
            "scrapes": [[[name, sorted(labels), v] for (name, labels), v in s.items()]
                        for s in scrapes]}))
    log.info("%d scrapes; evaluating %d panels", len(scrapes), len(queries))
    t = np.array(times)
    results = {pid: [(target, evaluate(target["query"], t, scrapes)) for target in targets]
               for pid, targets in queries.items()}
    for panel in dashboard["panels"]:
        log.info("%-45s %s", panel["title"],
                 ", ".join(f"{len(s)} series" for _, s in results[panel["id"]]))
    phases = " → ".join(label for _, label in marks if "killed" not in label)
    caption = ("Rendered by bench/dashboard.py, not a Grafana screenshot: every panel's PromQL "
               "from deploy/grafana-dashboard.json, evaluated over Ray metrics scraped every "
               f"{args.interval:g} s from all nodes of a local 3-node Ray cluster.\nThe demo tiny "
               f"random checkpoint on {os.cpu_count()} CPU cores. Workload ({args.minutes:g} min; "
               f"dashed lines): streaming clients {phases}"
               + ("; red: one expert actor killed (Ray restarts it; its calls are re-sent)."
                  if args.kill else "."))
    draw(dashboard, results, t, marks, args.out, caption)
    log.info("wrote %s (%d KB)", args.out, args.out.stat().st_size // 1024)


if __name__ == "__main__":
    main()
