"""The gateway: a stateless Serve deployment serving two APIs side by side. Behind Serve's gRPC
proxy it implements `mixtral_ep.v1.Generator` (method names are the RPC names); behind Serve's
HTTP proxy it is a FastAPI ingress with the OpenAI-compatible API (actors/serving/openai_api.py):
POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health. Both validate in
one place (actors/serving/requests.py), tokenize (prompt or chat template), and stream token ids from
the engine deployment, detokenized there. Every engine stream is a ResumableStream
(actors/failover.py): when the engine replica serving a request dies, the request continues on
another (or the restarted) one, and the client's stream goes on unbroken.

Errors reach the client as a gRPC status or an HTTP status with OpenAI's error body, never as
a traceback (`status_of`):
    InvalidRequest (and subclasses: ChatTemplateError...)   INVALID_ARGUMENT / 400, its message
    Unauthenticated (an API key is set: actors/serving/auth.py)      UNAUTHENTICATED / 401
    QueueFull (max_waiting), Serve's BackPressureError       RESOURCE_EXHAUSTED / 429
    EngineUnavailable (no engine took a request back
    within the failover bound: actors/failover.py),
    DeploymentUnavailableError, RayActorError                UNAVAILABLE / 503
    anything else (other ValueErrors too: config, checkpoint,
    torch; ExpertCallError...)                               INTERNAL / 500, no internal text
Ray wraps an exception raised in another actor in RayTaskError (nested once per hop), and
`as_instanceof_cause()` makes it an instance of the cause's class as well: the cause is
unwrapped first, so a wrapped torch ValueError is INTERNAL. Client errors are logged as one
info line, INTERNAL as one error line (its traceback at debug level); no method raises for a
client's error, so neither Serve's replica nor its proxy logs a traceback for one (a failed
stream ends with one empty message that carries its status).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from grpc_health.v1 import health_pb2
from ray import serve
from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from actors.serving import openai_api as oai
from actors.serving import auth
from actors.serving.auth import Unauthenticated, authorized, grpc_authorization
from actors.failover import EngineUnavailable, ResumableStream, unwrap, with_seed
from actors.info import EngineInfo
from actors.serving.requests import (model_info, prompt_ids, sampling_params,
                             stream_response, unary_response)
from model.engine import Completion
from model.errors import InvalidRequest, QueueFull
from model.tokenizer import Tokenizer
from protos import generator_pb2 as pb

# a child of Serve's logger: its handlers (replica log files, the console of `serve run`) and
# its LoggingConfig apply; a plain module logger has no handler in a Serve process
log = logging.getLogger(f"ray.serve.{__name__}")


HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
               grpc.StatusCode.INTERNAL: 500}
# a readiness probe's own timeout should exceed this (the RayService sets 3 s; Kubernetes'
# default is 1 s, grpc_health_probe's -rpc-timeout too)
HEALTH_TIMEOUT_S = 2.0
HEALTH_SERVICES = {"", "mixtral_ep.v1.Generator"}    # names grpc.health.v1.Health/Check knows

openai_app = FastAPI(title="mixtral-ep", summary="OpenAI-compatible API of a Mixtral MoE server")


class _ApiKey:
    """With an API key set (Gateway's `api_key_digest`: actors/serving/auth.py), every /v1 path needs
    it, before its body is read: 401 in OpenAI's shape otherwise. Plain ASGI, not
    `@app.middleware("http")` (Starlette's BaseHTTPMiddleware runs every response in a task
    group of its own). A client that leaves is a disconnect message here: Serve's `receive`
    raises TaskCancelledError instead once it has cancelled the request, and the streaming
    response's disconnect listener would end with it, printed as a traceback ("Task exception
    was never retrieved")."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = Headers(scope=scope).get("authorization")
            if not authorized(auth.required_digest(), header):
                log.info("request answered 401: missing or wrong API key")
                response = JSONResponse(oai.error_body(401, str(Unauthenticated())), 401)
                return await response(scope, receive, send)

        async def receive_or_disconnect():
            try:
                return await receive()
            except TaskCancelledError:
                return {"type": "http.disconnect"}
        await self.app(scope, receive_or_disconnect, send)


openai_app.add_middleware(_ApiKey)


@openai_app.exception_handler(RequestValidationError)
async def _malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that is not JSON or does not fit the request model: 400 naming the field."""
    errors = exc.errors()
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    if err.get("type") == "json_invalid":
        param, message = None, f"the body is not valid JSON: {err.get('msg')}"
    elif not loc:                                       # the body itself: missing, not an object
        message = ("body: a JSON object is required" if err.get("type") == "missing"
                   else f"body: {err.get('msg')}")
        if "json" not in request.headers.get("content-type", ""):
            message += " (send the header Content-Type: application/json)"
    elif err.get("type") == "extra_forbidden":
        message = f"unknown field {'.'.join(loc)!r}"
    elif param in oai.FIELD_FORMS and len(errors) > 1:    # a union: say what is accepted
        message = f"{param} must be {oai.FIELD_FORMS[param]}"
    else:
        message = f"{'.'.join(loc)}: {err.get('msg')}"
    log.info("request answered 400: %s", message)
    return JSONResponse(oai.error_body(400, message, param), status_code=400)


@openai_app.exception_handler(StarletteHTTPException)
async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown paths (404), wrong methods (405), unreadable bodies: OpenAI's error shape too."""
    return JSONResponse(oai.error_body(exc.status_code, str(exc.detail)),
                        status_code=exc.status_code)


async def _events(out: oai.Response, first, chunks, prompt_tokens: int, include_usage: bool):
    """Server-sent events of one stream; an error after the first token ends it with an error
    event (the status line has been sent). A client that goes away cancels the engine stream,
    which frees the request's KV blocks."""
    produced = 0
    try:
        chunk, is_first = first, True
        while True:
            produced += len(chunk.token_ids)
            yield out.chunk(chunk.text, chunk.token_ids, chunk.logprobs, chunk.finish_reason,
                            first=is_first)
            if chunk.finish_reason:
                break
            chunk, is_first = await chunks.__anext__(), False
        if include_usage:
            yield out.usage_chunk(prompt_tokens, produced)
    except Exception as e:  # noqa: BLE001
        code, details = status_of(e)
        _log_error(code, e)
        yield oai.sse(oai.error_body(HTTP_STATUS[code], details))
    finally:
        chunks.cancel()
    yield oai.DONE


def _http_error(error: Exception) -> JSONResponse:
    code, details = status_of(error)
    if isinstance(unwrap(error), oai.ModelNotFound):
        log.info("request answered 404: %s", details)
        return JSONResponse(oai.error_body(404, details, "model", "model_not_found"),
                            status_code=404)
    _log_error(code, error)
    return JSONResponse(oai.error_body(HTTP_STATUS[code], details), status_code=HTTP_STATUS[code])


async def collect(chunks) -> tuple[str, list[int], list[float], str]:
    """A whole completion from an engine stream: (text, token ids, logprobs, finish reason)."""
    text, tokens, logprobs, reason = "", [], [], ""
    async for chunk in chunks:
        text += chunk.text
        tokens += chunk.token_ids
        logprobs += chunk.logprobs
        reason = chunk.finish_reason or reason
    return text, tokens, logprobs, reason


def _set_status(grpc_context, error: Exception) -> None:
    code, details = status_of(error)
    _log_error(code, error)
    grpc_context.set_code(code)
    grpc_context.set_details(details)


def _log_error(code: grpc.StatusCode, error: Exception) -> None:
    """One line: INFO for a client's error, ERROR for INTERNAL (its traceback at DEBUG)."""
    cause = unwrap(error)
    if code == grpc.StatusCode.INTERNAL:
        log.error("request failed: %s: %s", type(cause).__name__, _first_line(cause))
        log.debug("request failed", exc_info=error)
    else:
        log.info("request answered %s: %s", code.name, _first_line(cause))


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """(gRPC status code, details for the client) of an error; see the module docstring.
    Only request validation sends its own text."""
    cause = unwrap(error)
    if isinstance(cause, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(cause)
    if isinstance(cause, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(cause)
    if isinstance(cause, (QueueFull, BackPressureError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests are waiting; try again later"
    if isinstance(cause, (DeploymentUnavailableError, RayActorError, EngineUnavailable)):
        return grpc.StatusCode.UNAVAILABLE, "the engine is starting or restarting; try again"
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


# Everything the Gateway's methods call is defined above it: `serve.ingress` copies the class
# when it is defined, and the copy's methods see only the module names that exist by then.


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(openai_app)
class Gateway:
    def __init__(self, engine, tokenizer_path: str | None, model_name: str,
                 failover_timeout_s: float = 120.0, api_key_digest: str | None = None):
        """`api_key_digest`: SHA-256 hex digest of the API key every call must carry
        (actors/serving/auth.py), None for none."""
        self.engine = engine                       # DeploymentHandle of actors.serving.engine_server.EngineServer
        self.failover_timeout_s = failover_timeout_s
        self.api_key_digest = api_key_digest
        auth.require(api_key_digest)                        # for the HTTP middleware
        self.tokenizer = Tokenizer.from_pretrained(tokenizer_path)
        self.model_name = model_name
        self._info: EngineInfo | None = None
        self._created = int(time.time())

    async def _engine_info(self) -> EngineInfo:
        if self._info is None:                     # the context length never changes
            self._info = await self.engine.info.remote()
        return self._info

    def _check_key(self, grpc_context) -> None:
        """Unauthenticated unless the call's metadata carries the API key (if one is set)."""
        if not authorized(self.api_key_digest,
                          grpc_authorization(grpc_context.invocation_metadata())):
            raise Unauthenticated()

    async def _prepare(self, request: pb.GenerateRequest, grpc_context):
        self._check_key(grpc_context)
        context = (await self._engine_info()).context_length
        ids = await asyncio.to_thread(prompt_ids, request, self.tokenizer, context)  # off the loop
        return ids, sampling_params(request, len(ids), context)

    def _stream(self, ids: list[int], params) -> ResumableStream:
        params = with_seed(params)
        return ResumableStream(lambda resume: self.engine.options(stream=True).stream.remote(
            ids, params, resume), self.failover_timeout_s)

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        try:
            ids, params = await self._prepare(request, grpc_context)
            text, tokens, logprobs, reason = await collect(self._stream(ids, params))
            return unary_response(Completion("", ids, tokens, text, reason, logprobs),
                                  request.logprobs)
        except Exception as e:  # noqa: BLE001 - every error becomes a status, never a traceback
            _set_status(grpc_context, e)
            return pb.GenerateResponse()

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        try:
            ids, params = await self._prepare(request, grpc_context)
            produced = 0
            async for chunk in self._stream(ids, params):
                produced += len(chunk.token_ids)
                yield stream_response(chunk, len(ids), produced, request.logprobs)
        except Exception as e:  # noqa: BLE001
            _set_status(grpc_context, e)
            # Serve's proxy passes the status on with the next message (the stream then ends
            # with it), so one empty message carries it; raising instead would make Serve's
            # replica and proxy each log the exception with its traceback
            yield pb.GenerateResponse()

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context) -> pb.ModelInfoResponse:
        try:
            self._check_key(grpc_context)
            return model_info(self.model_name, await self.engine.info.remote())
        except Exception as e:  # noqa: BLE001
            _set_status(grpc_context, e)
            return pb.ModelInfoResponse()


    # ---- health: gRPC grpc.health.v1.Health/Check and HTTP GET /health ----------------------
    async def _engine_unready(self) -> str | None:
        """None once the engine answers within HEALTH_TIMEOUT_S, else why not."""
        try:
            await asyncio.wait_for(self.engine.ping.remote(), HEALTH_TIMEOUT_S)
            return None
        except Exception as e:  # noqa: BLE001 - any failure means not ready
            return _first_line(unwrap(e)) or type(unwrap(e)).__name__

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    grpc_context) -> health_pb2.HealthCheckResponse:
        """SERVING once the engine answers, NOT_SERVING while it starts or restarts; for the
        whole server ("") or the Generator service; NOT_FOUND for any other service name."""
        if request.service not in HEALTH_SERVICES:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}; known: "
                                     f"{sorted(HEALTH_SERVICES)}")
            return health_pb2.HealthCheckResponse()
        status = (health_pb2.HealthCheckResponse.SERVING if await self._engine_unready() is None
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=status)

    @openai_app.api_route("/health", methods=["GET", "HEAD"])
    async def health(self) -> JSONResponse:
        """200 once the engine answers (within HEALTH_TIMEOUT_S), else 503."""
        reason = await self._engine_unready()
        if reason is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    # ---- OpenAI-compatible HTTP API (actors/serving/openai_api.py) ----------------------------------

    @openai_app.get("/v1/models")
    async def models(self) -> JSONResponse:
        try:
            return JSONResponse(oai.models_body(self.model_name, await self._engine_info(),
                                                self._created))
        except Exception as e:  # noqa: BLE001
            return _http_error(e)

    @openai_app.get("/v1/models/{model:path}")
    async def model(self, model: str) -> JSONResponse:
        """One model's card (`client.models.retrieve`); 404 in OpenAI's shape for another."""
        try:
            oai.check_model(model, self.model_name)
            return JSONResponse(oai.model_card(self.model_name, await self._engine_info(),
                                               self._created))
        except Exception as e:  # noqa: BLE001
            return _http_error(e)

    @openai_app.post("/v1/completions")
    async def completions(self, request: oai.CompletionRequest):
        return await self._openai(request, oai.completion_inputs, False,
                                  request.logprobs is not None)

    @openai_app.post("/v1/chat/completions")
    async def chat_completions(self, request: oai.ChatCompletionRequest):
        return await self._openai(request, oai.chat_inputs, True, request.logprobs)

    async def _openai(self, request, inputs, chat: bool, logprobs: bool):
        try:
            oai.check_model(request.model, self.model_name)
            info = await self._engine_info()
            ids, params = await asyncio.to_thread(inputs, request, self.tokenizer, info)
            out = oai.Response(chat, self.model_name, self.tokenizer, logprobs,
                               request.return_token_ids, ids)
            chunks = self._stream(ids, params)
            if not request.stream:
                return JSONResponse(out.whole(*await collect(chunks), len(ids)))
            first = await chunks.__anext__()    # an error before the first token: an HTTP status
            usage = request.stream_options is not None and request.stream_options.include_usage
            return StreamingResponse(_events(out, first, chunks, len(ids), usage),
                                     media_type="text/event-stream")
        except Exception as e:  # noqa: BLE001 - every error becomes a status, never a traceback
            return _http_error(e)
