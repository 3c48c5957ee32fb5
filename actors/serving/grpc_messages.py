"""gRPC messages <-> engine inputs and outputs: a GenerateRequest's prompt, sampling options,
constraint and tools through the protocol-free checks (actors/serving/validation.py; the proto's
structured-output and tool fields: actors/serving/grpc_structured.py), and the GenerateResponse
and ModelInfoResponse built from engine chunks, Completions, EngineInfo and PoolInfo (tool calls:
actors/serving/grpc_tool_calls.py). Pure functions (and `Responses`, which remembers a
request's constants and, with tools, each streamed choice's parser); with the gRPC servicer the
only modules of the front door that read or build protobuf messages.

Logprobs cross as the engine reports them, under the model's raw distribution: a token's in
`logprobs`, its alternatives as `TopLogprobs` (most likely first), a prompt token's as a
`PromptLogprob` (the first prompt token's without a logprob: nothing precedes it).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from actors.info import EngineInfo, PoolInfo
from actors.serving import grpc_structured
from actors.serving.grpc_tool_calls import ToolCallStreams, read_completion, whole_calls
from actors.serving.validation import ToolInputs, constraint_of, prompt_ids_of, sampling_params_of
from model.constraint import Constraint
from model.engine import Completion, SamplingParams, StreamChunk
from model.errors import InvalidRequest
from model.output import PromptLogprob
from model.sampling import TopLogprobs
from model.tokenizer import Tokenizer
from model.tools import finish_reason_of
from protos import generator_pb2 as pb

PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids")   # a request sets exactly one


def prompt_ids(req: pb.GenerateRequest, tokenizer: Tokenizer, context_length: int,
               vocab_size: int) -> list[int]:
    """Token ids of a gRPC request's prompt, chat messages or prompt_token_ids (exactly one
    must be set; token ids must be in [0, vocab_size))."""
    check_one_prompt(req)
    if req.prompt_token_ids:
        try:
            return prompt_ids_of(tokenizer, context_length, prompt=list(req.prompt_token_ids),
                                 vocab_size=vocab_size)
        except InvalidRequest as e:
            raise InvalidRequest(f"prompt_token_ids: {e}") from None
    messages = [{"role": m.role, "content": m.content} for m in req.messages]
    return prompt_ids_of(tokenizer, context_length, prompt=req.prompt or None,
                         messages=messages or None)


def check_one_prompt(req: pb.GenerateRequest) -> None:
    """InvalidRequest unless at most one of prompt, messages and prompt_token_ids is set."""
    given = [field for field in PROMPT_FIELDS if getattr(req, field)]
    if len(given) > 1:
        raise InvalidRequest(f"set exactly one of prompt, messages and prompt_token_ids, "
                             f"got {' and '.join(given)}")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A checked request: its prompt ids, its SamplingParams (with its constraint) and, with
    tools, its ToolInputs (how each choice's output is read)."""
    prompt_ids: list[int]
    params: SamplingParams
    tools: ToolInputs | None = None


def inputs(req: pb.GenerateRequest, tokenizer: Tokenizer, context_length: int,
           vocab_size: int) -> Inputs:
    """Inputs of a request (blocking: tokenizes); InvalidRequest naming the field. A request
    with tools (or tool messages) is prompted through validation.tools_inputs."""
    check_one_prompt(req)
    tools = grpc_structured.tool_inputs(req, tokenizer, context_length)
    ids = (tools.prompt_ids if tools is not None
           else prompt_ids(req, tokenizer, context_length, vocab_size))
    params = sampling_params(req, len(ids), context_length, vocab_size,
                             tools.constraint if tools is not None else None)
    return Inputs(ids, params, tools)


def sampling_params(req: pb.GenerateRequest, prompt_len: int, context_length: int,
                    vocab_size: int, tool_constraint: Constraint | None = None) -> SamplingParams:
    """SamplingParams of a request's options (unset optional fields: the defaults), with the
    one constraint of its `constraint` oneof or `tool_constraint` (a forced tool call's; both
    set: refused naming both)."""
    def optional(field: str):
        return getattr(req, field) if req.HasField(field) else None
    return sampling_params_of(
        prompt_len, context_length, max_tokens=optional("max_tokens"),
        temperature=optional("temperature"), top_p=optional("top_p"), top_k=optional("top_k"),
        seed=optional("seed"), stop=req.stop, ignore_eos=req.ignore_eos, n=optional("n"),
        top_logprobs=optional("top_logprobs"), prompt_logprobs=optional("prompt_logprobs"),
        presence_penalty=optional("presence_penalty"),
        frequency_penalty=optional("frequency_penalty"),
        repetition_penalty=optional("repetition_penalty"), logit_bias=dict(req.logit_bias),
        min_tokens=optional("min_tokens"), stop_token_ids=req.stop_token_ids,
        vocab_size=vocab_size,
        constraint=constraint_of(grpc_structured.constraint(req), tool_constraint),
        cache_salt=optional("cache_salt"))


class Responses:
    """Builds one request's GenerateResponses. `prompt`: its prompt ids; `logprobs`: whether
    it asked for chosen tokens' logprobs (`logprobs`, or `top_logprobs` > 0); `token_bytes`:
    a token id's bytes (Tokenizer.token_bytes); `tools`: with tools, how each choice's output
    is read into content and tool calls (a new parser per choice)."""

    def __init__(self, prompt: Sequence[int], logprobs: bool,
                 token_bytes: Callable[[int], bytes], tools: ToolInputs | None = None):
        self.prompt, self.logprobs, self.token_bytes = prompt, logprobs, token_bytes
        # tool_choice "none" (or no tools, only tool messages): no parser, the text is content
        self.tools = tools if tools is not None and tools.parser() is not None else None
        self.streams = None if self.tools is None else ToolCallStreams(self.tools.parser)

    def stream(self, chunk: StreamChunk, usage: pb.Usage | None) -> pb.GenerateResponse:
        """One GenerateStream message: a choice's delta; `usage` on the stream's last one."""
        text, calls, reason = chunk.text, [], chunk.finish_reason
        if self.streams is not None:
            text, calls, reason = self.streams.read(chunk.index, chunk.token_ids, text, reason)
        out = pb.GenerateResponse(text=text, token_ids=chunk.token_ids, tool_calls=calls,
                                  finish_reason=reason or "", index=chunk.index,
                                  top_logprobs=self._top(chunk.top_logprobs))
        if self.logprobs:
            out.logprobs.extend(chunk.logprobs)
        if chunk.prompt_logprobs is not None:
            out.prompt_logprobs.extend(self._prompt(chunk.prompt_logprobs))
        if usage is not None:
            out.usage.CopyFrom(usage)
        return out

    def unary(self, choices: Sequence[Completion]) -> pb.GenerateResponse:
        """The Generate response of a request's completions, one per choice (index order): the
        top-level fields are choice 0's, `choices` all of them when there are several."""
        first = choices[0]
        out = pb.GenerateResponse(usage=usage_of(len(self.prompt), choices), index=first.index)
        out.MergeFrom(self._choice_fields(first, pb.GenerateResponse))
        if first.prompt_logprobs is not None:
            out.prompt_logprobs.extend(self._prompt(first.prompt_logprobs))
        if len(choices) > 1:
            out.choices.extend(self._choice_fields(c, pb.Choice) for c in choices)
        return out

    def _choice_fields(self, c: Completion, message):
        """`message` (GenerateResponse or Choice) with one choice's own fields set."""
        text, calls, parser = c.text, [], None
        if self.tools is not None:
            parser = self.tools.parser()
            text, calls = read_completion(parser, c.token_ids, c.text)
        reason = finish_reason_of(c.finish_reason, calls, parser is None or parser.complete)
        out = message(text=text, token_ids=c.token_ids, tool_calls=whole_calls(calls),
                      finish_reason=reason,
                      top_logprobs=self._top(c.top_logprobs))
        if message is pb.Choice:
            out.index = c.index
        if self.logprobs:
            out.logprobs.extend(c.logprobs)
        return out

    def _alternatives(self, top: TopLogprobs) -> list[pb.TokenLogprob]:
        return [pb.TokenLogprob(token_id=t, logprob=lp, token=self.token_bytes(t))
                for t, lp in top]

    def _top(self, per_token: Sequence[TopLogprobs]) -> list[pb.TopLogprobs]:
        return [pb.TopLogprobs(alternatives=self._alternatives(top)) for top in per_token]

    def _prompt(self, entries: Sequence[PromptLogprob]) -> list[pb.PromptLogprob]:
        """One PromptLogprob per prompt token; the first has no logprob."""
        out = []
        for token, entry in zip(self.prompt, entries):
            out.append(pb.PromptLogprob(token_id=token) if entry is None else pb.PromptLogprob(
                token_id=token, logprob=entry[0], alternatives=self._alternatives(entry[1]),
                rank=entry[2]))
        return out


def usage_of(prompt_tokens: int, choices: Sequence[Completion]) -> pb.Usage:
    """The prompt counted once, the tokens of every choice summed, the prompt tokens taken from
    the prefix cache (the same on every choice: the first's)."""
    return usage(prompt_tokens, sum(len(c.token_ids) for c in choices),
                 choices[0].cached_tokens if choices else 0)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    cached_tokens=cached_tokens)


def model_info(name: str, info: EngineInfo, pool: PoolInfo | None = None) -> pb.ModelInfoResponse:
    """ModelInfo of the engine replica that answered (`info`: its placement, its own load and
    figures, its dtype and quantization) and, with a shared pool, of the pool once (`pool`:
    EngineServer.pool_info)."""
    out = pb.ModelInfoResponse(
        model=name, context_length=info.context_length, vocab_size=info.vocab_size,
        num_layers=info.num_layers, num_experts=info.num_experts,
        experts_per_token=info.experts_per_token, frontend_node_id=info.frontend_node_id,
        experts=[pb.ExpertPlacement(expert_id=e, node_ids=nodes,
                                    rows_per_second=info.expert_load.get(e, 0.0))
                 for e, nodes in sorted(info.experts.items())],
        frontend=pb.FrontendStats(expert_call_retries=info.retries,
                                  kv_blocks_free=info.free_blocks,
                                  kv_blocks_total=info.total_blocks,
                                  tracked_requests=info.tracked_requests),
        dtype=info.dtype, quantization=info.quantization)
    if pool is not None:
        out.pool.CopyFrom(expert_pool(pool))
    return out


def expert_pool(pool: PoolInfo) -> pb.ExpertPool:
    """A shared pool's message: each expert id's nodes and summed load (`load.rows_per_s`,
    one per expert id), its actors (an actor's rows per second matched by actor id in the
    pool's summed load), its merged calls."""
    load = pool.load
    rates = {a.actor_id: a.rows_per_s for a in load.actors}
    nodes: dict[int, list[str]] = {e: [] for e in range(len(load.rows_per_s))}
    for ids, node, _ in pool.actors:
        for e in ids:
            nodes[e].append(node)
    m = pool.merges
    return pb.ExpertPool(
        name=pool.name, generation=pool.generation, frontends=pool.frontends,
        experts=[pb.ExpertPlacement(expert_id=e, node_ids=n,
                                    rows_per_second=load.rows_per_s[e])
                 for e, n in sorted(nodes.items())],
        actors=[pb.PoolActor(expert_ids=ids, node_id=node, actor_id=actor,
                             rows_per_second=rates.get(actor, 0.0))
                for ids, node, actor in pool.actors],
        actor_imbalance=load.imbalance(),
        merges=pb.MergeStats(calls=m.calls, computes=m.computes, merged_calls=m.merged_calls,
                             rows=m.rows))
