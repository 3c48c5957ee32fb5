"""The gRPC side of the gateway: `mixtral_ep.v1.Generator` (Generate, GenerateStream, ModelInfo)
and `grpc.health.v1.Health/Check`, behind Serve's gRPC proxy (which calls a deployment's methods
by RPC name). Validation and message building are actors/serving/grpc_messages.py's (a
constraint's compile is checked by EngineClient.check before the engine is asked); the engine
is reached through an EngineClient (actors/serving/engine_client.py).

No method raises for a failed request: each sets its status and details
(actors/serving/status.py), logs one line, and returns an empty message (a failed stream ends
with one empty message that carries the status), so neither Serve's replica nor its proxy logs
a traceback for a client's error.

Generate and GenerateStream run inside `cancel_if_gone(caller)` (actors/serving/caller.py),
the caller being the Serve proxy that sent the call (its actor id stamped on the context): if
that proxy dies mid-call, the call is cancelled, and with it the engine's stream.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2

from actors.serving.auth import Unauthenticated, authorized, grpc_authorization
from actors.serving.caller import caller_of, cancel_if_gone
from actors.serving.engine_client import EngineClient, collect
from actors.serving.grpc_messages import Responses, inputs, model_info, usage
from actors.serving.status import log_failure, status_of
from protos import generator_pb2 as pb

HEALTH_SERVICES = {"", "mixtral_ep.v1.Generator"}    # names grpc.health.v1.Health/Check knows


def set_status(grpc_context, error: Exception) -> None:
    """Answer a failed call with `error`'s status and details, and log its one line."""
    code, details = status_of(error)
    log_failure(error, code.name)
    grpc_context.set_code(code)
    grpc_context.set_details(details)


class GeneratorServicer:
    """The RPC methods. Reads `self.engine` (an EngineClient) and `self.api_key_digest` (SHA-256
    hex digest of the API key every call must carry, None for none), which the Serve deployment
    (actors/serving/gateway.py) or a test sets."""

    engine: EngineClient
    api_key_digest: str | None

    def _check_key(self, grpc_context) -> None:
        """Unauthenticated unless the call's metadata carries the API key (if one is set)."""
        if not authorized(self.api_key_digest,
                          grpc_authorization(grpc_context.invocation_metadata())):
            raise Unauthenticated()

    async def _prepare(self, request: pb.GenerateRequest, grpc_context):
        """(prompt ids, SamplingParams, the request's Responses) of a checked request;
        InvalidRequest names the field, a constraint that does not compile included (before
        the engine is asked, so before any message is sent)."""
        self._check_key(grpc_context)
        info = await self.engine.info()
        context, vocab, tokenizer = info.context_length, info.vocab_size, self.engine.tokenizer
        given = await asyncio.to_thread(inputs, request, tokenizer, context, vocab)  # off loop
        ids, params = given.prompt_ids, given.params
        await self.engine.check(params, given.tools)
        logprobs = request.logprobs or params.top_logprobs > 0
        return ids, params, Responses(ids, logprobs, tokenizer.token_bytes, given.tools)

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        try:
            async with cancel_if_gone(caller_of(grpc_context)):
                ids, params, responses = await self._prepare(request, grpc_context)
                choices = await collect(self.engine.stream(ids, params), ids)
            return responses.unary(choices)
        except Exception as e:  # noqa: BLE001 - every error becomes a status, never a traceback
            set_status(grpc_context, e)
            return pb.GenerateResponse()

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        chunks = None
        try:
            async with cancel_if_gone(caller_of(grpc_context)):
                ids, params, responses = await self._prepare(request, grpc_context)
                chunks, produced, finished = self.engine.stream(ids, params), 0, 0
                async for chunk in chunks:
                    produced += len(chunk.token_ids)
                    finished += bool(chunk.finish_reason)
                    last = (usage(len(ids), produced, chunk.cached_tokens)
                            if finished == params.n else None)     # every choice has finished
                    yield responses.stream(chunk, last)
                chunks = None                               # ended: nothing to cancel
        except Exception as e:  # noqa: BLE001
            set_status(grpc_context, e)
            # Serve's proxy passes the status on with the next message (the stream then ends
            # with it), so one empty message carries it; raising instead would make Serve's
            # replica and proxy each log the exception with its traceback
            yield pb.GenerateResponse()
        finally:
            if chunks is not None:          # cancelled, closed or failed mid-stream
                chunks.cancel()

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context) -> pb.ModelInfoResponse:
        try:
            self._check_key(grpc_context)
            info, pool = await asyncio.gather(self.engine.live_info(), self.engine.pool_info())
            return model_info(self.engine.model_name, info, pool)
        except Exception as e:  # noqa: BLE001
            set_status(grpc_context, e)
            return pb.ModelInfoResponse()

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    grpc_context) -> health_pb2.HealthCheckResponse:
        """SERVING once the engine answers, NOT_SERVING while it starts or restarts; for the
        whole server ("") or the Generator service; NOT_FOUND for any other service name."""
        if request.service not in HEALTH_SERVICES:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}; known: "
                                     f"{sorted(HEALTH_SERVICES)}")
            return health_pb2.HealthCheckResponse()
        status = (health_pb2.HealthCheckResponse.SERVING if await self.engine.unready() is None
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=status)
