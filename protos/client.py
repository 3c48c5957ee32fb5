"""Stream a completion from a running mixtral-ep server.

    python -m protos.client "Tell me a story" --max-tokens 64 [--address localhost:9000] [--chat]

Prints the text as it arrives, then a line with the finish reason and token counts. A refused
request prints its gRPC status and details and exits 1.
"""
from __future__ import annotations

import argparse
import sys

import grpc

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc


def request_from_args(args: argparse.Namespace) -> pb.GenerateRequest:
    req = pb.GenerateRequest(max_tokens=args.max_tokens, temperature=args.temperature,
                             top_p=args.top_p, stop=args.stop or [])
    if args.seed is not None:
        req.seed = args.seed
    if args.chat:
        req.messages.append(pb.ChatMessage(role="user", content=args.prompt))
    else:
        req.prompt = args.prompt
    return req


def _integer(bits: int):
    """An argparse type: an integer that fits the proto's signed `bits`-bit field."""
    lo, hi = -2**(bits - 1), 2**(bits - 1) - 1

    def parse(text: str) -> int:
        value = int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside the int{bits} range [{lo}, {hi}]")
        return value
    parse.__name__ = f"int{bits}"
    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m protos.client", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt")
    ap.add_argument("--address", default="localhost:9000")
    ap.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    ap.add_argument("--max-tokens", type=_integer(32), default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=_integer(64), default=None)
    ap.add_argument("--stop", action="append", help="a stop string (repeatable)")
    ap.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    args = ap.parse_args(argv)
    with grpc.insecure_channel(args.address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        try:
            last = None
            for last in stub.GenerateStream(request_from_args(args), timeout=args.timeout):
                sys.stdout.write(last.text)
                sys.stdout.flush()
        except grpc.RpcError as e:
            sys.stderr.write(f"\nerror: {e.code().name}: {e.details()}\n")
            return 1
    if last is not None:
        sys.stdout.write(f"\n[finish_reason={last.finish_reason} prompt_tokens="
                         f"{last.usage.prompt_tokens} completion_tokens="
                         f"{last.usage.completion_tokens}]\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
