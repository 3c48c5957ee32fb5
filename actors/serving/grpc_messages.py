"""gRPC messages <-> engine inputs and outputs: a GenerateRequest's prompt and sampling options
through the protocol-free checks (actors/serving/validation.py), and the GenerateResponse and
ModelInfoResponse built from engine chunks, Completions and EngineInfo. Pure functions (and
`Responses`, which only remembers a request's constants); the only module of the front door,
with the gRPC servicer, that reads or builds protobuf messages.

Logprobs cross as the engine reports them, under the model's raw distribution: a token's in
`logprobs`, its alternatives as `TopLogprobs` (most likely first), a prompt token's as a
`PromptLogprob` (the first prompt token's without a logprob: nothing precedes it).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from actors.info import EngineInfo
from actors.serving.validation import prompt_ids_of, sampling_params_of
from model.engine import Completion, SamplingParams, StreamChunk
from model.errors import InvalidRequest
from model.output import PromptLogprob
from model.sampling import TopLogprobs
from model.tokenizer import Tokenizer
from protos import generator_pb2 as pb

PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids")   # a request sets exactly one


def prompt_ids(req: pb.GenerateRequest, tokenizer: Tokenizer, context_length: int,
               vocab_size: int) -> list[int]:
    """Token ids of a gRPC request's prompt, chat messages or prompt_token_ids (exactly one
    must be set; token ids must be in [0, vocab_size))."""
    given = [field for field in PROMPT_FIELDS if getattr(req, field)]
    if len(given) > 1:
        raise InvalidRequest(f"set exactly one of prompt, messages and prompt_token_ids, "
                             f"got {' and '.join(given)}")
    if req.prompt_token_ids:
        try:
            return prompt_ids_of(tokenizer, context_length, prompt=list(req.prompt_token_ids),
                                 vocab_size=vocab_size)
        except InvalidRequest as e:
            raise InvalidRequest(f"prompt_token_ids: {e}") from None
    messages = [{"role": m.role, "content": m.content} for m in req.messages]
    return prompt_ids_of(tokenizer, context_length, prompt=req.prompt or None,
                         messages=messages or None)


def sampling_params(req: pb.GenerateRequest, prompt_len: int, context_length: int,
                    vocab_size: int) -> SamplingParams:
    """SamplingParams of a request's options (unset optional fields: the defaults)."""
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
        vocab_size=vocab_size)


class Responses:
    """Builds one request's GenerateResponses. `prompt`: its prompt ids; `logprobs`: whether
    it asked for chosen tokens' logprobs (`logprobs`, or `top_logprobs` > 0); `token_bytes`:
    a token id's bytes (Tokenizer.token_bytes)."""

    def __init__(self, prompt: Sequence[int], logprobs: bool,
                 token_bytes: Callable[[int], bytes]):
        self.prompt, self.logprobs, self.token_bytes = prompt, logprobs, token_bytes

    def stream(self, chunk: StreamChunk, usage: pb.Usage | None) -> pb.GenerateResponse:
        """One GenerateStream message: a choice's delta; `usage` on the stream's last one."""
        out = pb.GenerateResponse(text=chunk.text, token_ids=chunk.token_ids,
                                  finish_reason=chunk.finish_reason or "", index=chunk.index,
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
        out = message(text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason,
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
    """The prompt counted once, the tokens of every choice summed."""
    return pb.Usage(prompt_tokens=prompt_tokens,
                    completion_tokens=sum(len(c.token_ids) for c in choices))


def model_info(name: str, info: EngineInfo) -> pb.ModelInfoResponse:
    return pb.ModelInfoResponse(
        model=name, context_length=info.context_length, vocab_size=info.vocab_size,
        num_layers=info.num_layers, num_experts=info.num_experts,
        experts_per_token=info.experts_per_token, frontend_node_id=info.frontend_node_id,
        experts=[pb.ExpertPlacement(expert_id=e, node_ids=nodes,
                                    rows_per_second=info.expert_load.get(e, 0.0))
                 for e, nodes in sorted(info.experts.items())])
