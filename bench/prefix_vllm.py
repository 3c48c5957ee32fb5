"""bench/prefix.py's vLLM worker: vLLM's CPU build, prefix caching on or off, on the prefix
workload (bench/prefix_workload.py); one JSON line on stdout. Imports only the standard library,
bench/prefix_workload.py and vLLM: it runs in vLLM's own virtualenv (`make peer-venv`):

    .peer-venv/bin/python -m bench.prefix_vllm '{"path": ..., "caching": true, ...}'

vLLM is driven step by step through its offline engine (`LLM.llm_engine`: add_request / step),
as bench/prefix.py drives ours, so both time a first token the same way: when the step that
made it returns. Its cached tokens are its RequestOutput.num_cached_tokens.
"""
from __future__ import annotations

import itertools
import json
import sys

from bench.prefix_workload import measure, step_batch


def worker(spec: dict) -> dict:
    """spec: bench/prefix_workload.py's measure's, plus path, caching, step_tokens."""
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    longest = spec["system_tokens"] + spec["turn_tokens"] + spec["new_tokens"]
    llm = LLM(model=spec["path"], dtype="float32", skip_tokenizer_init=True, seed=0,
              max_model_len=longest + 16, max_num_seqs=max(spec["requests"], 1),
              max_num_batched_tokens=spec["step_tokens"],
              enable_prefix_caching=spec["caching"])
    engine, ids = llm.llm_engine, itertools.count()

    def add(prompt: list[int], max_tokens: int) -> str:
        rid = str(next(ids))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                detokenize=False, output_kind=RequestOutputKind.DELTA)
        engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
        return rid                                  # outputs carry this id (not the internal)

    def step():
        return [(o.request_id, list(o.outputs[0].token_ids), o.finished,
                 o.num_cached_tokens or 0) for o in engine.step()]
    return measure(step_batch(add, step), spec)


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))), flush=True)
