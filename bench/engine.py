"""In-process engine vs transformers' `generate`, side by side in one run.

    python -m bench.engine                      # CPU, fp32, `small` random checkpoint, 2 threads
    python -m bench.engine --quick              # fewer runs, smaller mixed workload
    python -m bench.engine --device cuda        # GPU, bf16, the 8x7b shape (--layers N to fit)

Prints medians over --runs runs and our/transformers ratios for
  * static batches (prompt 128, 64 new tokens): decode tokens/s and time to first token,
  * a mixed workload (seeded prompt lengths 16-512, outputs 16-256; transformers runs it in
    static batches of --hf-batch in arrival order, each running until its longest output),
  * the memory-bandwidth floor of one decode step (weights + KV read once, at a bandwidth
    measured in this run) against our measured step time.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import logging
import random
import statistics
import time

import torch

from bench.machine import add_device_arguments, compute_dtype
from model.config import PRESETS, MixtralConfig
from model.engine import Engine, SamplingParams
from model.random_checkpoint import cached_random_checkpoint

log = logging.getLogger("bench.engine")


@dataclasses.dataclass
class Result:
    seconds: float                  # wall time of the whole run
    ttft: list[float]               # per request, from the run's start
    decode_tps: float               # generated tokens after the first, per second of decode
    tokens: int                     # useful generated tokens


# ---- our engine ------------------------------------------------------------------------------
def run_ours(engine: Engine, prompts: list[list[int]], max_tokens: list[int]) -> Result:
    start = time.perf_counter()
    rids = [engine.add_request(p, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))
            for p, m in zip(prompts, max_tokens)]
    first: dict[str, float] = {}
    while engine.has_unfinished():
        chunks = engine.step()
        now = time.perf_counter()
        for c in chunks:
            first.setdefault(c.request_id, now)
    end = time.perf_counter()
    for rid in rids:
        engine.abort(rid)
    return _result(start, end, [first[r] for r in rids], sum(max_tokens), len(prompts))


def _result(start, end, first_times, tokens, n) -> Result:
    decode_start = max(first_times)
    ttft = [t - start for t in first_times]
    return Result(end - start, ttft, (tokens - n) / max(end - decode_start, 1e-9), tokens)


# ---- transformers ------------------------------------------------------------------------------
class _FirstToken:
    """generate() streamer: records when the first new token of the batch appears."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def run_hf(model, prompts: list[list[int]], max_tokens: list[int], batch: int) -> Result:
    device = next(model.parameters()).device
    start = time.perf_counter()
    first_times, decode_time, decode_tokens = [], 0.0, 0
    for b in range(0, len(prompts), batch):
        group, outs = prompts[b:b + batch], max_tokens[b:b + batch]
        width = max(map(len, group))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        streamer = _FirstToken()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=max(outs),
                           min_new_tokens=max(outs), do_sample=False, streamer=streamer,
                           pad_token_id=0)
        _sync(device)
        now = time.perf_counter()
        first_times += [streamer.first] * len(group)
        decode_time += now - streamer.first
        decode_tokens += sum(outs) - len(group)
    end = time.perf_counter()
    ttft = [t - start for t in first_times]
    return Result(end - start, ttft, decode_tokens / decode_time, sum(max_tokens))


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---- floors ----------------------------------------------------------------------------------
def measure_read_bandwidth(device: str, trials: int = 10) -> float:
    """Best bytes/s of summing a 1 GiB (CPU) / 4 GiB (GPU) buffer over `trials` (the machine's
    peak: the floor it gives is the lowest a step could reach; this shared machine varies)."""
    n = (2**30 if device == "cpu" else 2**32) // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(trials):
        _sync(device)
        t = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    del x
    return n * 4 / best


def decode_step_bytes(cfg: MixtralConfig, dtype: torch.dtype, batch: int, context: int) -> int:
    """Bytes a decode step must read: every weight but the embedding table (at batch >= 8 nearly
    every expert of every layer is hit: P(expert unused) = (1 - A/E)^B), plus the KV cache."""
    d, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = d * dh * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    miss = (1 - cfg.num_experts_per_tok / cfg.num_local_experts) ** batch
    experts = cfg.num_local_experts * (1 - miss) * 3 * d * f
    per_layer = attn + experts + cfg.num_local_experts * d + 2 * d
    weights = cfg.num_hidden_layers * per_layer + cfg.vocab_size * d + d
    kv = batch * context * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * dh
    return int((weights + kv) * dtype.itemsize)


def gemm_only_step_ms(engine: Engine, batch: int, repeats: int = 5) -> float:
    """Time of just the GEMMs of a decode step (same kernels and weights as the engine):
    q/k/v/o of every layer, the experts hit (min(E, batch*A)) on their share of rows, lm_head.
    What no scheduling,
    attention or Python overhead can go below."""
    from model.linear import linear
    from model.moe import expert_mlp
    cfg, model = engine.cfg, engine.model
    pairs = batch * cfg.num_experts_per_tok
    active = min(cfg.num_local_experts, pairs)                # experts hit, rows each
    rows = -(-pairs // active)
    x = torch.randn(batch, cfg.hidden_size, dtype=engine.dtype, device=engine.device)
    xe = x[:rows].contiguous()
    experts = engine.moe.__self__.weights

    def step():
        for i, layer in enumerate(model.model.layers):
            a = layer.self_attn
            for proj in (a.qkv_proj, a.o_proj):
                linear(x, proj.weight)
            for e in range(active):
                expert_mlp(xe, *experts[(i, e)])
        linear(x, model.lm_head.weight)
        _sync(engine.device)

    step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


# ---- driver ----------------------------------------------------------------------------------
def median(results: list[Result], key) -> float:
    return statistics.median(key(r) for r in results)


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def mixed_workload(n: int, seed: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, vocab) for _ in range(rng.randint(16, 512) - 1)]
               for _ in range(n)]
    outs = [rng.randint(16, 256) for _ in range(n)]
    return prompts, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(ap)
    ap.add_argument("--preset", default=None, help="default: small on CPU, 8x7b on CUDA")
    ap.add_argument("--layers", type=int, default=None,
                    help="override num_hidden_layers (GPU memory)")
    ap.add_argument("--batches", default=None,
                    help="static batch sizes, default 1,8,32 (CPU) / 1,32,256 (GPU)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mixed", type=int, default=64,
                    help="requests in the mixed workload (0: skip)")
    ap.add_argument("--hf-batch", type=int, default=16,
                    help="transformers' static batch for the mixed workload")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 run, mixed workload of 16")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    dtype = compute_dtype(args)
    preset = args.preset or ("8x7b" if gpu else "small")
    batches = [int(b) for b in (args.batches or ("1,32,256" if gpu else "1,8,32")).split(",")]
    runs, n_mixed = (1, min(args.mixed, 16)) if args.quick else (args.runs, args.mixed)

    cfg = PRESETS[preset]
    if args.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    bandwidth = measure_read_bandwidth(args.device)
    log.info("read bandwidth %.1f GB/s", bandwidth / 1e9)

    prompt_len, new_tokens = 128, 64
    rng = random.Random(0)
    static = {b: [[1] + [rng.randrange(3, cfg.vocab_size) for _ in range(prompt_len - 1)]
                  for _ in range(b)] for b in batches}
    mixed = mixed_workload(n_mixed, 0, cfg.vocab_size) if n_mixed else None

    results: dict[tuple[str, str], list[Result]] = {}

    def measure(name, fn):
        for label, (prompts, outs) in workloads.items():
            fn(prompts[:1], [2])                                       # warm-up
            results[(name, label)] = []
            for _ in range(runs if label != "mixed" else max(1, runs - 1)):
                results[(name, label)].append(fn(prompts, outs))
                log.info("%s %s: %.2f s", name, label, results[(name, label)][-1].seconds)

    workloads = {f"batch {b}": (ps, [new_tokens] * b) for b, ps in static.items()}
    if mixed:
        workloads["mixed"] = mixed

    # prefix caching off: every run sends the same prompts (and the warm-up the first), which
    # transformers recomputes each time; a cached prefill would not be the same work
    engine = (Engine.from_config(cfg, dtype=dtype, device=args.device,
                                 enable_prefix_caching=False) if gpu or args.layers
              else Engine.from_pretrained(cached_random_checkpoint(preset), dtype=dtype,
                                          device=args.device, enable_prefix_caching=False))
    measure("ours", functools.partial(run_ours, engine))
    gemm_ms = {b: gemm_only_step_ms(engine, b) for b in batches}
    del engine
    gc.collect()
    if not args.no_hf:
        hf = load_hf(cfg, preset, dtype, args.device, gpu or bool(args.layers))
        measure("hf", lambda ps, outs, hf=hf: run_hf(
            hf, ps, outs, args.hf_batch if len(ps) > max(batches) else len(ps)))
        del hf
        gc.collect()
    bandwidth = max(bandwidth, measure_read_bandwidth(args.device))   # again, after the runs
    report(results, workloads, cfg, dtype, bandwidth, gemm_ms, prompt_len, new_tokens, args)


def load_hf(cfg: MixtralConfig, preset: str, dtype, device: str, in_memory: bool):
    import transformers
    if not in_memory:
        path = cached_random_checkpoint(preset)
        return transformers.MixtralForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    hf_cfg = transformers.MixtralConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                           if k not in ("architectures", "model_type")})
    with torch.device(device):
        return transformers.MixtralForCausalLM(hf_cfg).to(dtype).eval()


def ttft_cell(results: list[Result]) -> str:
    """'p50 / p99' time to first token in s, each the median over the runs."""
    p50 = median(results, lambda r: p(r.ttft, .5))
    p99 = median(results, lambda r: p(r.ttft, .99))
    return f"{p50:.2f} / {p99:.2f}"


def report(results, workloads, cfg, dtype, bandwidth, gemm_ms, prompt_len, new_tokens,
           args) -> None:
    lines = [f"device {args.device}, {dtype}, {args.threads} threads, "
             f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}; read bandwidth "
             f"{bandwidth / 1e9:.1f} GB/s; medians of {args.runs if not args.quick else 1} runs",
             ""]
    lines.append("| workload | ours decode tok/s | hf decode tok/s | ratio | ours TTFT p50 / p99 s "
                 "| hf TTFT p50 / p99 s | ours total tok/s | hf total tok/s | ratio |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for label in workloads:
        o = results[("ours", label)]
        h = results.get(("hf", label))
        ours_decode = median(o, lambda r: r.decode_tps)
        row = [label, f"{ours_decode:.1f}"]
        if h:
            hf_decode = median(h, lambda r: r.decode_tps)
            row += [f"{hf_decode:.1f}", f"{ours_decode / hf_decode:.2f}x"]
        else:
            row += ["-", "-"]
        row += [ttft_cell(o), ttft_cell(h) if h else "-"]
        ours_total = median(o, lambda r: r.tokens / r.seconds)
        row += [f"{ours_total:.1f}"]
        if h:
            hf_total = median(h, lambda r: r.tokens / r.seconds)
            row += [f"{hf_total:.1f}", f"{ours_total / hf_total:.2f}x"]
        else:
            row += ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| batch | context | floor ms (bytes / bandwidth) | GEMMs alone ms | ours ms per "
              "decode step | ours / floor | GEMMs alone / floor |", "|---|---|---|---|---|---|---|"]
    for label in workloads:
        if not label.startswith("batch"):
            continue
        b = int(label.split()[1])
        context = prompt_len + new_tokens // 2
        floor = decode_step_bytes(cfg, dtype, b, context) / bandwidth * 1e3
        step = b / median(results[("ours", label)], lambda r: r.decode_tps) * 1e3
        lines.append(f"| {b} | {context} | {floor:.1f} | {gemm_ms[b]:.1f} | {step:.1f} | "
                     f"{step / floor:.2f}x | {gemm_ms[b] / floor:.2f}x |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
