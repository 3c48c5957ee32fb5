"""API requests <-> engine inputs and outputs: the one place where a request from a client (gRPC
here, the OpenAI HTTP API in actors/serving/openai_api.py) is validated, with messages that name the
field and its limit, plus the gRPC response building. Pure functions; `prompt_ids_of` and
`sampling_params_of` serve both protocols, the rest reads or builds protobuf messages.
"""
from __future__ import annotations

from typing import Sequence

from actors.info import EngineInfo
from model import admission
from model.engine import Completion, SamplingParams, StreamChunk
from model.errors import InvalidRequest
from model.tokenizer import ChatTemplateError, Tokenizer
from protos import generator_pb2 as pb

DEFAULT_MAX_TOKENS = 16


def prompt_ids_of(tokenizer: Tokenizer, context_length: int, *,
                  prompt: str | Sequence[int] | None = None, messages: list[dict] | None = None,
                  vocab_size: int | None = None) -> list[int]:
    """Token ids of a prompt (text, encoded with BOS; or token ids, checked against `vocab_size`)
    or of chat messages ({"role", "content"} dicts, through the chat template): exactly one."""
    if prompt and messages:
        raise InvalidRequest("set exactly one of prompt and messages, not both")
    if not prompt and not messages:
        raise InvalidRequest("set one of prompt (non-empty text) and messages")
    if prompt:
        ids = admission.prompt_ids(prompt, tokenizer, vocab_size or tokenizer.vocab_size,
                                   context_length)
    else:
        chars = sum(len(m["role"]) + len(m["content"]) for m in messages)
        admission.check_text_size("messages", chars, tokenizer, context_length)
        try:
            ids = tokenizer.apply_chat_template(messages)
        except ChatTemplateError as e:
            raise InvalidRequest(str(e)) from None
    if len(ids) >= context_length:
        raise InvalidRequest(f"prompt is {len(ids)} tokens; the context length is "
                             f"{context_length} (prompt + max_tokens must fit)")
    return ids


def sampling_params_of(prompt_len: int, context_length: int, *, max_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None,
                       top_k: int | None = None, seed: int | None = None,
                       stop: Sequence[str] = (), ignore_eos: bool = False,
                       max_tokens_field: str = "max_tokens") -> SamplingParams:
    """SamplingParams from a request's optional fields (None: the default); raises
    InvalidRequest naming the field and its limit."""
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    room = context_length - prompt_len
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 0 < max_tokens <= room:
        raise InvalidRequest(f"{max_tokens_field} must be in [1, {room}] (context length "
                             f"{context_length} minus the prompt's {prompt_len} tokens), got "
                             f"{max_tokens}")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p, top_k=0 if top_k is None else top_k,
            seed=seed, stop=tuple(stop), ignore_eos=ignore_eos)
    except ValueError as e:       # SamplingParams names the field and its limit
        raise InvalidRequest(str(e)) from None


def prompt_ids(req: pb.GenerateRequest, tokenizer: Tokenizer, context_length: int) -> list[int]:
    """Token ids of a gRPC request's prompt or chat messages (exactly one must be set)."""
    messages = [{"role": m.role, "content": m.content} for m in req.messages]
    return prompt_ids_of(tokenizer, context_length, prompt=req.prompt or None,
                         messages=messages or None)


def sampling_params(req: pb.GenerateRequest, prompt_len: int, context_length: int) -> SamplingParams:
    def optional(field: str):
        return getattr(req, field) if req.HasField(field) else None
    return sampling_params_of(prompt_len, context_length, max_tokens=optional("max_tokens"),
                              temperature=optional("temperature"), top_p=optional("top_p"),
                              top_k=optional("top_k"), seed=optional("seed"), stop=req.stop)


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
        experts=[pb.ExpertPlacement(expert_id=e, node_ids=nodes,
                                    rows_per_second=info.expert_load.get(e, 0.0))
                 for e, nodes in sorted(info.experts.items())])
