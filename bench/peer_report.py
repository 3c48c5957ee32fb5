"""bench/peer.py's tables: every precision ours vs vLLM's side by side, then per batch our
best precision against vLLM's best."""
from __future__ import annotations

import os
import statistics
from pathlib import Path

from bench.machine import cpu_name


def _median(runs: list[dict], key: str) -> float:
    """The median of `key` over runs, past NaNs (a decode rate whose run's TTFT outlasted its
    whole generate: noise); NaN if none is left."""
    values = [r[key] for r in runs if r[key] == r[key]]
    return statistics.median(values) if values else float("nan")


def _cell(runs, key: str, fmt: str = "{:.1f}") -> str:
    if isinstance(runs, str):
        return runs
    return fmt.format(_median(runs, key)) if runs else "-"


def report(results: dict, args, precisions: list[str], preload: list[str]) -> str:
    """The markdown tables. `results`: (engine "ours" | "vllm", precision) -> per-run dicts of
    bench/peer.py's `measure` (batch -> ttft, decode_tps, ids), or a "not supported: ..." string;
    `args`: prompt_len, new_tokens, runs, max_num_batched_tokens, batches."""
    lines = [f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores; small checkpoint, prompt "
             f"{args.prompt_len} random ids, {args.new_tokens} greedy new tokens; medians of "
             f"{args.runs} run(s), alternating processes; {args.max_num_batched_tokens} tokens "
             f"per step; vLLM preloads: "
             f"{', '.join(Path(p).name for p in preload) or 'none found'}", "",
             "| precision | batch | ours decode tok/s | vLLM decode tok/s | ours / vLLM "
             "| TTFT ours / vLLM s | fp32 greedy ids equal |", "|---|---|---|---|---|---|---|"]
    best: dict = {}                                  # (engine, batch) -> (tok/s, precision)
    for precision in precisions:
        for b in map(str, args.batches):
            ours = [r[b] for r in results[("ours", precision)]]
            theirs = results.get(("vllm", precision), [])
            theirs = theirs if isinstance(theirs, str) else [r[b] for r in theirs]
            for which, runs in (("ours", ours), ("vllm", theirs)):
                tps = _median(runs, "decode_tps") if not isinstance(runs, str) else float("nan")
                if tps == tps:                                       # not NaN
                    best[(which, b)] = max(best.get((which, b), (0.0, "")), (tps, precision))
            same = "-"
            if theirs and not isinstance(theirs, str) and precision == "fp32":
                pairs = list(zip(ours[0]["ids"], theirs[0]["ids"]))
                same = f"{sum(a == c for a, c in pairs)} / {len(pairs)}"
            ratio = (f"{_median(ours, 'decode_tps') / _median(theirs, 'decode_tps'):.2f}"
                     if theirs and not isinstance(theirs, str) else "-")
            lines.append(f"| {precision} | {b} | {_cell(ours, 'decode_tps')} | "
                         f"{_cell(theirs, 'decode_tps')} | {ratio} | "
                         f"{_cell(ours, 'ttft', '{:.2f}')} / "
                         f"{'-' if isinstance(theirs, str) else _cell(theirs, 'ttft', '{:.2f}')} "
                         f"| {same} |")
    lines += ["", "| batch | our best | vLLM's best | ours / vLLM |", "|---|---|---|---|"]
    for b in map(str, args.batches):
        ours, theirs = best.get(("ours", b)), best.get(("vllm", b))
        cells = [f"{r[0]:.1f} ({r[1]})" if r else "-" for r in (ours, theirs)]
        ratio = f"{ours[0] / theirs[0]:.2f}" if ours and theirs else "-"
        lines.append(f"| {b} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)
