"""Call a running mixtral-ep server over gRPC (also installed as `mixtral-ep-client`).

    python -m protos.client "Tell me a story" --max-tokens 64        # stream a completion
    python -m protos.client "Hi" --system "Be brief." --unary        # chat, one response
    python -m protos.client info           # what is served: ModelInfo, the shared expert pool
    python -m protos.client --prompt-file long.txt --max-tokens 64   # the prompt from a file
    cat question.txt | python -m protos.client - --chat              # ... or from stdin
    MIXTRAL_EP_API_KEY=... python -m protos.client "Hi" --address host:443 --tls --ca-cert ca.pem
    python -m protos.client "Hi" --n 3 --temperature 1 --top-logprobs 2   # 3 choices, alternatives
    python -m protos.client --prompt-token-ids 1,22557 --max-tokens 0 --prompt-logprobs 1  # score
    python -m protos.client "A user as JSON" --json-schema @user.schema.json   # structured output
    python -m protos.client "Weather in Paris?" --tool @weather.json --tool-choice required

Streams the text as it arrives, then a line with the finish reason and token counts; what else
it prints (logprobs, alternatives, prompt logprobs, n > 1 choices, tool calls):
protos/client_output.py; the structured-output and tool flags: protos/client_structured.py.
`info` as the only argument asks for ModelInfo; to send the word "info" as a prompt, use --chat.
A prompt too long for an argument (a shell allows ~128 KB per argument) is read from a file
(--prompt-file) or from stdin (`-`), as UTF-8, with --chat and --system too. A refused request
prints its gRPC status and details and exits 1; Ctrl-C stops quietly (exit 130); a reader that
closes the pipe early (`| head -1`) ends it quietly (exit 1, as Python does on a broken pipe).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc

from protos import client_structured
from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from protos.client_output import write_replies

# optional request fields sent only when their option is given (unset: the server's default)
OPTIONAL = ("seed", "n", "top_logprobs", "prompt_logprobs", "presence_penalty",
            "frequency_penalty", "repetition_penalty", "min_tokens", "cache_salt")


def request_from_args(args: argparse.Namespace) -> pb.GenerateRequest:
    req = pb.GenerateRequest(max_tokens=args.max_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, stop=args.stop or [],
                             logprobs=args.logprobs, logit_bias=dict(args.logit_bias or []),
                             stop_token_ids=args.stop_token_id or [], ignore_eos=args.ignore_eos)
    for field in OPTIONAL:
        if getattr(args, field) is not None:
            setattr(req, field, getattr(args, field))
    if args.prompt_token_ids is not None:
        req.prompt_token_ids.extend(args.prompt_token_ids)
    elif args.chat or args.system is not None or args.tool:
        if args.system is not None:
            req.messages.append(pb.ChatMessage(role="system", content=args.system))
        req.messages.append(pb.ChatMessage(role="user", content=args.prompt))
    else:
        req.prompt = args.prompt
    client_structured.apply(req, args)
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


def token_ids(text: str) -> list[int]:
    """An argparse type: comma-separated int32 token ids ("1,22557,1526")."""
    return [_integer(32)(part) for part in text.split(",")]


def logit_bias(text: str) -> tuple[int, float]:
    """An argparse type: a logit_bias entry, ID=BIAS ("13=-100")."""
    token, sep, bias = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not ID=BIAS (e.g. 13=-100)")
    return _integer(32)(token), float(bias)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default."""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m protos.client", description=__doc__,
                                 formatter_class=_Formatter)
    ap.add_argument("prompt", nargs="?", default=None,
                    help='the prompt text, "-" to read it from stdin, or "info" alone for '
                         'ModelInfo')
    ap.add_argument("--prompt-file", default=None, metavar="PATH",
                    help="read the prompt from this UTF-8 file instead")
    ap.add_argument("--address", default="localhost:9000", help="host:port of Serve's gRPC proxy")
    ap.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    ap.add_argument("--system", default=None,
                    help="a system message before the prompt (implies --chat)")
    ap.add_argument("--max-tokens", type=_integer(32), default=64, help="tokens to generate")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]")
    ap.add_argument("--top-k", type=_integer(32), default=0, help="keep the k likeliest; 0 is off")
    ap.add_argument("--seed", type=_integer(64), default=None, help="the request's sampler seed")
    ap.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    ap.add_argument("--logprobs", action="store_true",
                    help="print each generated token id with its logprob")
    ap.add_argument("--prompt-token-ids", type=token_ids, default=None, metavar="ID,ID,...",
                    help="send these token ids as the prompt (no prompt argument then)")
    ap.add_argument("--n", type=_integer(32), default=None,
                    help="choices (samples) of the prompt, 1..16; the server's default is 1")
    ap.add_argument("--top-logprobs", type=_integer(32), default=None, metavar="K",
                    help="print each token's K most likely alternatives, 0..20")
    ap.add_argument("--prompt-logprobs", type=_integer(32), default=None, metavar="K",
                    help="print each prompt token's logprob and K alternatives, 0..20 (allows "
                         "--max-tokens 0)")
    ap.add_argument("--presence-penalty", type=float, default=None, help="in [-2, 2]")
    ap.add_argument("--frequency-penalty", type=float, default=None, help="in [-2, 2]")
    ap.add_argument("--repetition-penalty", type=float, default=None, help="> 0; 1 is off")
    ap.add_argument("--logit-bias", type=logit_bias, action="append", default=None,
                    metavar="ID=BIAS",
                    help="add BIAS in [-100, 100] to token ID's logit (repeatable)")
    ap.add_argument("--min-tokens", type=_integer(32), default=None,
                    help="no EOS or stop token before this many tokens")
    ap.add_argument("--stop-token-id", type=_integer(32), action="append", default=None,
                    metavar="ID", help="a token id that ends the completion (repeatable)")
    ap.add_argument("--ignore-eos", action="store_true", help="generate on past EOS")
    ap.add_argument("--cache-salt", default=None, metavar="SALT",
                    help="share prefix-cached KV blocks only with requests of this salt")
    client_structured.add_arguments(ap)
    ap.add_argument("--unary", action="store_true",
                    help="one Generate call (the whole completion at once) instead of a stream")
    ap.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    ap.add_argument("--api-key", default=argparse.SUPPRESS,    # never print a key in --help
                    help="the server's API key, sent as `authorization: Bearer <key>` "
                         "(default: $MIXTRAL_EP_API_KEY, else none)")
    ap.add_argument("--tls", action="store_true",
                    help="connect over TLS (a TLS-terminating front: deploy/nginx/)")
    ap.add_argument("--ca-cert", default=argparse.SUPPRESS,
                    help="PEM file of the CA that signed the server's certificate, with --tls "
                         "(default: the system's roots)")
    return ap


def _info(stub: pb_grpc.GeneratorStub, args: argparse.Namespace) -> None:
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=args.timeout, metadata=_metadata(args))
    print("\n".join(info_lines(info)))


def info_lines(info: pb.ModelInfoResponse) -> list[str]:
    """ModelInfo as text: the model and its precision (compute dtype, quantization; left
    out for a server from before either was reported: no dtype); the answering engine
    replica's own figures (each replica has its own: with several, its rows/s are its share
    only); the shared expert pool, once, with the load summed over every replica, when the
    server has one (expert_pool: shared)."""
    precision = (f"; {info.dtype} compute, {info.quantization or 'unquantized'} weights"
                 if info.dtype else "")
    lines = [f"model {info.model}: context {info.context_length} tokens, vocabulary "
             f"{info.vocab_size}, {info.num_layers} layers, {info.num_experts} experts "
             f"(top-{info.experts_per_token}); frontend on node {info.frontend_node_id}"
             f"{precision}"]
    stats = ""
    if info.HasField("frontend"):
        f = info.frontend
        stats = (f": {f.expert_call_retries} expert call retries, KV blocks "
                 f"{f.kv_blocks_free}/{f.kv_blocks_total} free, {f.tracked_requests} requests")
    lines.append(f"this engine replica{stats}; its expert calls:")
    lines += [f"  expert {e.expert_id}: {len(e.node_ids)} replica(s) on {', '.join(e.node_ids)}; "
              f"{e.rows_per_second:.1f} rows/s from this replica recently" for e in info.experts]
    return lines + (pool_lines(info.pool) if info.HasField("pool") else [])


def pool_lines(pool: pb.ExpertPool) -> list[str]:
    """The shared expert pool's block of `info_lines`: name, generation, frontends, each expert
    id's nodes and rows/s summed over the frontends, the actors' imbalance, their merges."""
    m = pool.merges
    share = m.merged_calls / m.calls if m.calls else 0.0
    per_gemm = m.rows / m.computes if m.computes else 0.0
    return [f"shared expert pool {pool.name}: generation {pool.generation}, {pool.frontends} "
            f"engine replica(s) polling, {len(pool.actors)} actor(s), imbalance "
            f"{pool.actor_imbalance:.2f} (max / mean rows/s)",
            *(f"  expert {e.expert_id}: {len(e.node_ids)} actor(s) on {', '.join(e.node_ids)}; "
              f"{e.rows_per_second:.1f} rows/s from all replicas" for e in pool.experts),
            f"  merges: {m.merged_calls} of {m.calls} calls computed with another's "
            f"({share:.0%}), {m.computes} computes, {per_gemm:.1f} rows per GEMM"]


def _generate(stub: pb_grpc.GeneratorStub, args: argparse.Namespace) -> None:
    req = request_from_args(args)
    if args.unary:
        replies = [stub.Generate(req, timeout=args.timeout, metadata=_metadata(args))]
    else:
        replies = stub.GenerateStream(req, timeout=args.timeout, metadata=_metadata(args))
    write_replies(replies, live=req.n <= 1, logprobs=args.logprobs or bool(args.top_logprobs))


def _metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {args.api_key}")] if args.api_key else []


# a unary reply has no size limit here (n choices with 20 alternatives per token pass gRPC's
# default 4 MiB at ~12,000 tokens); the server bounds what it receives, not what it sends
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1)]


def channel_of(args: argparse.Namespace) -> grpc.Channel:
    if not args.tls:
        return grpc.insecure_channel(args.address, options=CHANNEL_OPTIONS)
    roots = Path(args.ca_cert).read_bytes() if args.ca_cert else None
    return grpc.secure_channel(args.address, grpc.ssl_channel_credentials(roots),
                               options=CHANNEL_OPTIONS)


def read_prompt(args: argparse.Namespace, ap: argparse.ArgumentParser) -> str | None:
    """The prompt: the argument, stdin for "-", or --prompt-file's text (exactly one); None
    with --prompt-token-ids (then none of the others). Exits with a usage error naming the
    option otherwise."""
    if args.prompt_token_ids is not None:
        if (args.prompt is not None or args.prompt_file is not None or args.chat
                or args.system or args.tool):
            ap.error("--prompt-token-ids is the whole prompt: not with a prompt argument, "
                     "--prompt-file, --chat, --system or --tool")
        return None
    if args.prompt_file is not None:
        if args.prompt is not None:
            ap.error(f"give the prompt as an argument or --prompt-file, not both "
                     f"(got {args.prompt!r} and --prompt-file {args.prompt_file!r})")
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            ap.error(f"--prompt-file: cannot read {args.prompt_file!r}: {e}")
    if args.prompt is None:
        ap.error("a prompt is required: an argument, - for stdin, or --prompt-file PATH")
    if args.prompt == "-":
        return sys.stdin.read()
    return args.prompt


def _stdout_closed() -> int:
    """After a BrokenPipeError: the reader closed stdout early (`| head -1`). Point stdout at
    devnull so the flush at exit raises nothing, as Python's documentation recommends
    (https://docs.python.org/3/library/signal.html#note-on-sigpipe), and exit 1, quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    args.api_key = getattr(args, "api_key", None) or os.environ.get("MIXTRAL_EP_API_KEY")
    args.ca_cert = getattr(args, "ca_cert", None)
    if args.ca_cert and not args.tls:
        ap.error("--ca-cert needs --tls")
    info = (args.prompt == "info" and args.prompt_file is None and args.prompt_token_ids is None
            and not (args.chat or args.system is not None or args.tool))
    if not info:
        args.prompt = read_prompt(args, ap)
    try:
        with channel_of(args) as channel:
            stub = pb_grpc.GeneratorStub(channel)
            if info:
                _info(stub, args)
            else:
                _generate(stub, args)
        sys.stdout.flush()                     # a closed pipe shows here, not at exit
    except grpc.RpcError as e:
        sys.stderr.write(f"\nerror: {e.code().name}: {e.details()}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:
        return _stdout_closed()
    return 0


def cli() -> None:
    """The `mixtral-ep-client` console script."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
