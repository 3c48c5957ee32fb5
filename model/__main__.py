"""Generate from a checkpoint in one process, streaming to stdout.

    python -m model "Tell me a story" [--checkpoint DIR] [--chat] [--max-tokens 64]
                                      [--dtype auto] [--quantization int8]

With no --checkpoint it creates (once, cached) the `tiny` random checkpoint with the real
Mixtral tokenizer: its weights are random, so its text is gibberish. A bad checkpoint, option or
request (a ValueError: CheckpointError, ConfigError, InvalidRequest, a quantization the checkpoint
cannot take) exits 2 with one line on stderr naming it; anything else is a bug and tracebacks.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

import torch

from model.checkpoint import DTYPES
from model.config import PRESETS
from model.engine import Engine, SamplingParams
from model.quant import QUANTIZATIONS
from model.random_checkpoint import cached_random_checkpoint

log = logging.getLogger("model")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--checkpoint", help="HF Mixtral checkpoint directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="random checkpoint to create when --checkpoint is not given")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                        help="int8: the expert weights quantized at load, weight-only, with "
                             "per-output-channel scales (an FP8 checkpoint needs none: it is "
                             "read as FP8)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` and generate. Exits 2 with one line naming a ValueError (module doc)."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        _generate(args)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {type(e).__name__}: {e}\n")


def _generate(args: argparse.Namespace) -> None:
    path = args.checkpoint or cached_random_checkpoint(args.preset)
    engine = Engine.from_pretrained(path, dtype=args.dtype, device=args.device,
                                    quantization=args.quantization)
    prompt = (engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
              if args.chat else args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    log.info("generating from %s", path)
    asyncio.run(_stream(engine, prompt, params))


async def _stream(engine: Engine, prompt, params: SamplingParams) -> None:
    start, count, reason = time.perf_counter(), 0, None
    async for chunk in engine.stream(prompt, params):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        count += len(chunk.token_ids)
        reason = chunk.finish_reason
    sys.stdout.write("\n")
    log.info("%d tokens in %.2f s, finish_reason=%s", count, time.perf_counter() - start, reason)


if __name__ == "__main__":
    main()
