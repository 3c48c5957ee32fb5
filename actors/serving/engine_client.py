"""A gateway replica's side of the engine deployment: what both front-door protocols (gRPC,
actors/serving/grpc_servicer.py; HTTP, actors/serving/http_app.py) need from the engine. It
holds the engine deployment's handle, the tokenizer and the served model's name; reads the
engine's info once (it never changes), opens a request's token stream with failover (a
ResumableStream, actors/failover.py: when the engine replica serving it dies, the request goes
on on another one) and answers readiness. Its `drain` (actors/serving/draining.py) refuses new
streams and ends running ones while the gateway replica shuts down. Each engine call names
this gateway replica as its caller, so the engine replica cancels it if this replica dies
(actors/serving/caller.py). No protobuf, no HTTP.
"""
from __future__ import annotations

import asyncio
import time

from actors.failover import ResumableStream, unwrap, with_seed
from actors.info import EngineInfo, PoolInfo
from actors.serving.caller import own_id
from actors.serving.draining import Drain, DrainedStream
from actors.serving.metrics import RequestMetrics
from actors.serving.status import first_line
from actors.serving.validation import ToolInputs
from model.constraint import Constraint
from model.engine import SamplingParams
from model.errors import InvalidRequest
from model.grammar import check_constraint
from model.output import Completion
from model.tokenizer import Tokenizer

# a readiness probe's own timeout should exceed this (the RayService sets 3 s; Kubernetes'
# default is 1 s, grpc_health_probe's -rpc-timeout too)
HEALTH_TIMEOUT_S = 2.0


class EngineClient:
    def __init__(self, engine, tokenizer: Tokenizer, model_name: str,
                 failover_timeout_s: float = 120.0):
        """`engine`: a DeploymentHandle of actors.serving.engine_server.EngineServer;
        `failover_timeout_s`: how long a request waits for an engine to take it back."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.failover_timeout_s = failover_timeout_s
        self.created = int(time.time())            # the model card's `created` (Unix seconds)
        self._info: EngineInfo | None = None
        self.caller = own_id()      # this replica's actor id: the engine watches it per call
        self.metrics = RequestMetrics()            # what this gateway's clients were delivered
        self.drain = Drain()                       # begun when this gateway replica stops

    async def info(self) -> EngineInfo:
        """The engine's info, asked once (the context length never changes)."""
        if self._info is None:
            self._info = await self.engine.info.remote()
        return self._info

    async def live_info(self) -> EngineInfo:
        """The engine's info now (expert placement and load change)."""
        return await self.engine.info.remote()

    async def pool_info(self) -> PoolInfo | None:
        """The shared expert pool now (EngineServer.pool_info), None with `per_replica`."""
        return await self.engine.pool_info.remote()

    async def check(self, params: SamplingParams, tools: ToolInputs | None = None) -> None:
        """InvalidRequest naming the constraint's field (`response_format`, `json_schema`, ...)
        and llguidance's reason if `params`' structured-output grammar does not compile: so a
        bad schema is a 400 / INVALID_ARGUMENT before any stream starts. Compiled on a thread,
        cached by content in this process (model.grammar.check_constraint); the engine
        compiles it again in its own, off its step loop. When a forced call's grammar (from
        `tools`) does not compile, the refusal names the tool whose parameters schema does not
        (`tools[1].function.parameters: ...`), not the call-list grammar."""
        if params.constraint is not None:
            await asyncio.to_thread(check_grammar, self.tokenizer, params.constraint, tools)

    def stream(self, ids: list[int], params: SamplingParams) -> DrainedStream:
        """The engine's stream of chunks for prompt `ids` (a ResumableStream, ended by this
        replica's drain); seeded here, so a resumed request samples as it would have
        (actors/failover.py), and counted as its chunks reach the client, so a resumed request
        counts once (actors/serving/metrics.py: RequestMetrics). Draining (UNAVAILABLE / 503)
        while this replica drains."""
        self.drain.check()
        params = with_seed(params)
        return DrainedStream(ResumableStream(lambda resume: self.engine.options(
            stream=True).stream.remote(ids, params, resume, self.caller),
            self.failover_timeout_s,
            observe=self.metrics.request(len(ids), params.n).chunk, choices=params.n), self.drain)

    async def unready(self) -> str | None:
        """None once the engine answers within HEALTH_TIMEOUT_S, else why not (draining: this
        gateway replica is shutting down)."""
        if self.drain.draining:
            return "draining: the server is shutting down"
        try:
            await asyncio.wait_for(self.engine.ping.remote(), HEALTH_TIMEOUT_S)
            return None
        except Exception as e:  # noqa: BLE001 - any failure means not ready
            return first_line(unwrap(e)) or type(unwrap(e)).__name__


def check_grammar(tokenizer: Tokenizer, constraint: Constraint,
                  tools: ToolInputs | None = None) -> None:
    """check_constraint (blocking); when `constraint` is `tools`' forced call and does not
    compile, InvalidRequest naming the first forced tool whose parameters schema does not
    compile on its own (`tools[1].function.parameters: ... Invalid type: strin`)."""
    try:
        check_constraint(tokenizer, constraint)
    except InvalidRequest:
        forced = tools is not None and constraint == tools.constraint
        for parameters in tools.parameter_constraints() if forced else ():
            check_constraint(tokenizer, parameters)         # the first bad one raises
        raise


async def collect(chunks, prompt_ids: list[int] = ()) -> list[Completion]:
    """The whole completions of an engine stream, one per choice, by index: each choice's
    text, token ids, logprobs and top logprobs joined over its chunks, its prompt logprobs
    (its first chunk's) and finish reason; every choice's cached_tokens is the last chunk's
    (after a failover: the resuming engine's). Cancelled or failed before its end, it cancels
    the engine call (`chunks.cancel()`)."""
    choices: dict[int, Completion] = {}
    cached = 0
    try:
        async for chunk in chunks:
            cached = chunk.cached_tokens
            c = choices.get(chunk.index)
            if c is None:
                c = choices[chunk.index] = Completion(chunk.request_id, list(prompt_ids), [], "",
                                                      "", [], index=chunk.index)
            c.text += chunk.text
            c.token_ids += chunk.token_ids
            c.logprobs += chunk.logprobs
            c.top_logprobs += chunk.top_logprobs
            if c.prompt_logprobs is None:
                c.prompt_logprobs = chunk.prompt_logprobs
            c.finish_reason = chunk.finish_reason or c.finish_reason
    except BaseException:
        chunks.cancel()
        raise
    for c in choices.values():
        c.cached_tokens = cached
    return [choices[i] for i in sorted(choices)]
