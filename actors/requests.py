"""gRPC messages <-> engine inputs and outputs: validation with messages that name the field and
its limit, and response building. Pure functions; the gateway (actors/gateway.py) is the only
caller, and these are the only functions that read or build protobuf messages.
"""
from __future__ import annotations

from actors.info import EngineInfo
from model.admission import check_text_size
from model.engine import Completion, SamplingParams, StreamChunk
from model.errors import InvalidRequest
from model.tokenizer import ChatTemplateError, Tokenizer
from protos import generator_pb2 as pb

DEFAULT_MAX_TOKENS = 16


def prompt_ids(req: pb.GenerateRequest, tokenizer: Tokenizer, context_length: int) -> list[int]:
    """Token ids of the prompt or the chat messages (exactly one must be set)."""
    if req.prompt and req.messages:
        raise InvalidRequest("set exactly one of prompt and messages, not both")
    if not req.prompt and not req.messages:
        raise InvalidRequest("set one of prompt (non-empty text) and messages")
    chars = len(req.prompt) + sum(len(m.role) + len(m.content) for m in req.messages)
    check_text_size("prompt" if req.prompt else "messages", chars, tokenizer, context_length)
    if req.prompt:
        ids = tokenizer.encode(req.prompt)
    else:
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        try:
            ids = tokenizer.apply_chat_template(messages)
        except ChatTemplateError as e:
            raise InvalidRequest(str(e)) from None
    if len(ids) >= context_length:
        raise InvalidRequest(f"prompt is {len(ids)} tokens; the context length is "
                             f"{context_length} (prompt + max_tokens must fit)")
    return ids


def sampling_params(req: pb.GenerateRequest, prompt_len: int, context_length: int) -> SamplingParams:
    max_tokens = req.max_tokens if req.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    room = context_length - prompt_len
    if max_tokens <= 0 or max_tokens > room:
        raise InvalidRequest(f"max_tokens must be in [1, {room}] (context length {context_length} "
                             f"minus the prompt's {prompt_len} tokens), got {max_tokens}")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature if req.HasField("temperature") else 1.0,
            top_p=req.top_p if req.HasField("top_p") else 1.0,
            top_k=req.top_k if req.HasField("top_k") else 0,
            seed=req.seed if req.HasField("seed") else None,
            stop=tuple(req.stop))
    except ValueError as e:       # SamplingParams names the field and its limit
        raise InvalidRequest(str(e)) from None


def stream_response(chunk: StreamChunk, prompt_tokens: int, completion_tokens: int,
                    logprobs: bool) -> pb.GenerateResponse:
    out = pb.GenerateResponse(text=chunk.text, token_ids=chunk.token_ids,
                              finish_reason=chunk.finish_reason or "")
    if logprobs:
        out.logprobs.extend(chunk.logprobs)
    if chunk.finish_reason:
        out.usage.CopyFrom(pb.Usage(prompt_tokens=prompt_tokens,
                                    completion_tokens=completion_tokens))
    return out


def unary_response(c: Completion, logprobs: bool) -> pb.GenerateResponse:
    out = pb.GenerateResponse(text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason,
                              usage=pb.Usage(prompt_tokens=len(c.prompt_ids),
                                             completion_tokens=len(c.token_ids)))
    if logprobs:
        out.logprobs.extend(c.logprobs)
    return out


def model_info(name: str, info: EngineInfo) -> pb.ModelInfoResponse:
    return pb.ModelInfoResponse(
        model=name, context_length=info.context_length, vocab_size=info.vocab_size,
        num_layers=info.num_layers, num_experts=info.num_experts,
        experts_per_token=info.experts_per_token, frontend_node_id=info.frontend_node_id,
        experts=[pb.ExpertPlacement(expert_id=e, node_ids=nodes)
                 for e, nodes in sorted(info.experts.items())])
