"""gRPC messages <-> engine inputs and outputs: a GenerateRequest's prompt and sampling options
through the protocol-free checks (actors/serving/validation.py), and the GenerateResponse and
ModelInfoResponse built from engine chunks and EngineInfo. Pure functions; the only module of
the front door, with the gRPC servicer, that reads or builds protobuf messages.
"""
from __future__ import annotations

from actors.info import EngineInfo
from actors.serving.validation import prompt_ids_of, sampling_params_of
from model.engine import Completion, SamplingParams, StreamChunk
from model.tokenizer import Tokenizer
from protos import generator_pb2 as pb


def prompt_ids(req: pb.GenerateRequest, tokenizer: Tokenizer, context_length: int) -> list[int]:
    """Token ids of a gRPC request's prompt or chat messages (exactly one must be set)."""
    messages = [{"role": m.role, "content": m.content} for m in req.messages]
    return prompt_ids_of(tokenizer, context_length, prompt=req.prompt or None,
                         messages=messages or None)


def sampling_params(req: pb.GenerateRequest, prompt_len: int,
                    context_length: int) -> SamplingParams:
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
