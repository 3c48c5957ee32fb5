"""The gRPC gateway: a stateless Serve deployment behind Serve's gRPC proxy implementing
`mixtral_ep.v1.Generator` (method names are the RPC names). It validates, tokenizes (prompt or
chat template), and streams token ids from the engine deployment, detokenized there.

Errors reach the client as a gRPC status, never as a traceback (`status_of`):
    InvalidRequest (and subclasses: ChatTemplateError...)   INVALID_ARGUMENT, its message
    QueueFull (max_waiting), Serve's BackPressureError       RESOURCE_EXHAUSTED
    DeploymentUnavailableError, RayActorError (the engine
    replica or one of its actors died or is restarting)      UNAVAILABLE
    anything else (other ValueErrors too: config, checkpoint,
    torch; ExpertCallError...)                               INTERNAL, no internal text
Ray wraps an exception raised in another actor in RayTaskError (nested once per hop), and
`as_instanceof_cause()` makes it an instance of the cause's class as well: the cause is
unwrapped first, so a wrapped torch ValueError is INTERNAL. Client errors are logged as one
info line, INTERNAL as one error line (its traceback at debug level).
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import grpc
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from actors.info import EngineInfo
from actors.requests import (model_info, prompt_ids, sampling_params,
                             stream_response, unary_response)
from model.engine import Completion
from model.errors import InvalidRequest, QueueFull
from model.tokenizer import Tokenizer
from protos import generator_pb2 as pb

# a child of Serve's logger: its handlers (replica log files, the console of `serve run`) and
# its LoggingConfig apply; a plain module logger has no handler in a Serve process
log = logging.getLogger(f"ray.serve.{__name__}")


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.1})
class Gateway:
    def __init__(self, engine, tokenizer_path: str | None, model_name: str):
        self.engine = engine                       # DeploymentHandle of actors.server.EngineServer
        self.tokenizer = Tokenizer.from_pretrained(tokenizer_path)
        self.model_name = model_name
        self._info: EngineInfo | None = None

    async def _prepare(self, request: pb.GenerateRequest):
        if self._info is None:                     # the context length never changes
            self._info = await self.engine.info.remote()
        context = self._info.context_length
        ids = await asyncio.to_thread(prompt_ids, request, self.tokenizer, context)  # off the loop
        return ids, sampling_params(request, len(ids), context)

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        try:
            ids, params = await self._prepare(request)
            text, tokens, logprobs, reason = "", [], [], ""
            async for chunk in self.engine.options(stream=True).stream.remote(ids, params):
                text += chunk.text
                tokens += chunk.token_ids
                logprobs += chunk.logprobs
                reason = chunk.finish_reason or reason
            return unary_response(Completion("", ids, tokens, text, reason, logprobs),
                                  request.logprobs)
        except Exception as e:  # noqa: BLE001 - every error becomes a status, never a traceback
            _set_status(grpc_context, e)
            return pb.GenerateResponse()

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        try:
            ids, params = await self._prepare(request)
            produced = 0
            async for chunk in self.engine.options(stream=True).stream.remote(ids, params):
                produced += len(chunk.token_ids)
                yield stream_response(chunk, len(ids), produced, request.logprobs)
        except Exception as e:  # noqa: BLE001
            _set_status(grpc_context, e)
            raise _Aborted() from None   # a streaming method must raise for the code to reach the client

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context) -> pb.ModelInfoResponse:
        try:
            return model_info(self.model_name, await self.engine.info.remote())
        except Exception as e:  # noqa: BLE001
            _set_status(grpc_context, e)
            return pb.ModelInfoResponse()


class _Aborted(Exception):
    """Raised after the status is set, to end a stream with it."""


def _set_status(grpc_context, error: Exception) -> None:
    code, details = status_of(error)
    cause = unwrap(error)
    if code == grpc.StatusCode.INTERNAL:
        log.error("request failed: %s: %s", type(cause).__name__, _first_line(cause))
        log.debug("request failed", exc_info=error)
    else:
        log.info("request answered %s: %s", code.name, _first_line(cause))
    grpc_context.set_code(code)
    grpc_context.set_details(details)


def unwrap(error: BaseException) -> BaseException:
    """The exception inside Ray's task-error wrappers, however deeply nested:
    RayTaskError(cause=RayTaskError(cause=ValueError(...))) -> the ValueError."""
    while isinstance(error, RayTaskError) and error.cause is not None and error.cause is not error:
        error = error.cause
    return error


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """(gRPC status code, details for the client) of an error; see the module docstring.
    Only request validation sends its own text."""
    cause = unwrap(error)
    if isinstance(cause, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(cause)
    if isinstance(cause, (QueueFull, BackPressureError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests are waiting; try again later"
    if isinstance(cause, (DeploymentUnavailableError, RayActorError)):
        return grpc.StatusCode.UNAVAILABLE, "the engine is starting or restarting; try again"
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
