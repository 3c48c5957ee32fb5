"""The HTTP side of the gateway: a FastAPI app behind Serve's HTTP proxy serving the
OpenAI-compatible API (actors/serving/openai_api.py, openai_responses.py): POST
/v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{model}, and GET or
HEAD /health.

Errors are an HTTP status with OpenAI's error body, never a traceback (actors/serving/status.py
maps an exception to its status), and are logged as one line in HTTP's words ("request answered
400: ..."). The routes themselves are the Serve deployment's methods (actors/serving/gateway.py),
each a line calling its body here: `serve.ingress(openai_app)` rewrites a route method's
signature to inject the replica, and only a method of the deployment's own class (pickled by
value) keeps that rewrite in the replica; an inherited one is pickled by reference and loses it
(every call then answers 400 "query.self: Field required").
"""
from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray.exceptions import RayActorError, TaskCancelledError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.failover import unwrap
from actors.serving import auth
from actors.serving import openai_api as oai
from actors.serving import openai_responses as responses
from actors.serving.auth import Unauthenticated, authorized
from actors.serving.caller import CALLER_SCOPE_KEY, cancel_if_gone
from actors.serving.engine_client import EngineClient, collect
from actors.serving.openai_errors import error_body
from actors.serving.status import http_status_of, log_failure, log_refusal

openai_app = FastAPI(title="mixtral-ep", summary="OpenAI-compatible API of a Mixtral MoE server")


OPEN_PATHS = ("/health",)        # for probes, which send no credentials


class _ApiKey:
    """With an API key set (Gateway's `api_key_digest`: actors/serving/auth.py), every path but
    /health needs it, before its body is read: the API, the docs (/docs, /redoc, the
    /openapi.json that lists every field and limit) and unknown paths alike; 401 in OpenAI's
    shape otherwise. Plain ASGI, not
    `@app.middleware("http")` (Starlette's BaseHTTPMiddleware runs every response in a task
    group of its own). A client that leaves is a disconnect message here: Serve's `receive`
    raises TaskCancelledError instead once it has cancelled the request (RayActorError once the
    proxy that carried it died: Serve logged "Request failed." with a traceback), and the streaming
    response's disconnect listener would end with it, printed as a traceback ("Task exception
    was never retrieved")."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = Headers(scope=scope).get("authorization")
            if not authorized(auth.required_digest(), header):
                log_failure(Unauthenticated(), 401)
                response = JSONResponse(error_body(401, str(Unauthenticated())), 401)
                return await response(scope, receive, send)

        async def receive_or_disconnect():
            try:
                return await receive()
            except (TaskCancelledError, RayActorError):     # cancelled, or the proxy died
                return {"type": "http.disconnect"}
        async with cancel_if_gone(scope.get(CALLER_SCOPE_KEY)):     # the proxy died: cancelled
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
    elif err.get("type") == oai.SURROGATE:              # its message names where it is
        param, message = err["ctx"]["field"], err.get("msg")
        param = None if param == "body" else param
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
    log_refusal(400, message)
    return JSONResponse(error_body(400, message, param), status_code=400)


@openai_app.exception_handler(StarletteHTTPException)
async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown paths (404), wrong methods (405), unreadable bodies: OpenAI's error shape too."""
    return JSONResponse(error_body(exc.status_code, str(exc.detail)),
                        status_code=exc.status_code)


def http_error(error: Exception) -> JSONResponse:
    """The response to a failed request (OpenAI's error body), its one log line written."""
    status, details = http_status_of(error)
    if isinstance(unwrap(error), oai.ModelNotFound):
        log_refusal(404, details)
        return JSONResponse(error_body(404, details, "model", "model_not_found"),
                            status_code=404)
    log_failure(error, status)
    return JSONResponse(error_body(status, details), status_code=status)


async def _events(out: responses.Response, first, chunks, prompt_tokens: int, n: int,
                  include_usage: bool):
    """Server-sent events of one stream of `n` choices (their chunks interleaved), ended once
    each has finished; an error after the first token ends it with an error event (the status
    line has been sent). The usage chunk's cached_tokens is the last chunk's (after a failover:
    the resuming engine's). A client that goes away cancels the engine stream, which frees the
    request's KV blocks."""
    produced = finished = 0
    try:
        chunk = first
        while True:
            produced += len(chunk.token_ids)
            # a first chunk with prompt logprobs can be megabytes: encoded off the event loop
            yield (out.chunk(chunk) if chunk.prompt_logprobs is None
                   else await asyncio.to_thread(out.chunk, chunk))
            finished += chunk.finish_reason is not None
            if finished >= n:
                break
            chunk = await chunks.__anext__()
        if include_usage:
            yield out.usage_chunk(prompt_tokens, produced, chunk.cached_tokens)
    except Exception as e:  # noqa: BLE001 - an error event, never a traceback
        status, details = http_status_of(e)
        log_failure(e, status)
        yield responses.sse(error_body(status, details))
    finally:
        chunks.cancel()
    yield responses.DONE


class EventStream(StreamingResponse):
    """Server-sent events whose last one, `data: [DONE]`, ends the body in the same ASGI
    message. Starlette's StreamingResponse ends a body with an empty message of its own after
    the last event, and a client that closes once it has read `data: [DONE]` (the OpenAI SDK's
    sync client does) was gone before that message reached Serve's proxy, which then logged a
    normally finished stream as "Client ... disconnected, cancelling request": the proxy stops
    watching for a disconnect once it sees a body's last message."""

    media_type = "text/event-stream"

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        more = True
        async for event in self.body_iterator:                # each event as soon as it is there
            more = event != responses.DONE
            await send({"type": "http.response.body", "body": event.encode(self.charset),
                        "more_body": more})
        if more:                                              # no [DONE]: end the body anyway
            await send({"type": "http.response.body", "body": b"", "more_body": False})


# ---- the routes' bodies: Gateway (actors/serving/gateway.py) declares the routes ------------
async def health(engine: EngineClient) -> JSONResponse:
    """200 once the engine answers (within HEALTH_TIMEOUT_S), else 503."""
    reason = await engine.unready()
    if reason is None:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)


async def models(engine: EngineClient) -> JSONResponse:
    try:
        return JSONResponse(responses.models_body(engine.model_name, await engine.info(),
                                            engine.created))
    except Exception as e:  # noqa: BLE001 - every error becomes a status
        return http_error(e)


async def model(engine: EngineClient, name: str) -> JSONResponse:
    """One model's card (`client.models.retrieve`); 404 in OpenAI's shape for another."""
    try:
        oai.check_model(name, engine.model_name)
        return JSONResponse(responses.model_card(engine.model_name, await engine.info(),
                                           engine.created))
    except Exception as e:  # noqa: BLE001 - every error becomes a status
        return http_error(e)


async def completion(engine: EngineClient, request, chat: bool):
    """A /v1/completions (`chat` False) or /v1/chat/completions request's response: the whole
    completion, or its server-sent events; an error before the first token is an HTTP status."""
    inputs_of = oai.chat_request if chat else oai.completion_request
    try:
        oai.check_model(request.model, engine.model_name)
        info = await engine.info()
        inputs = await asyncio.to_thread(inputs_of, request, engine.tokenizer, info)
        ids, params = inputs.ids, inputs.params
        await engine.check(params, inputs.tools)    # a grammar that does not compile: 400
        shape = responses.shape_of(request, chat, engine.tokenizer, ids)
        parsers = inputs.tools.parser if inputs.tools is not None else None
        out = responses.Response(chat, engine.model_name, engine.tokenizer, shape, ids, parsers)
        chunks = engine.stream(ids, params)
        if not request.stream:       # a body of n choices with logprobs can be megabytes:
            done = await collect(chunks, ids)      # built and encoded off the event loop
            return await asyncio.to_thread(lambda: JSONResponse(out.whole(done, len(ids))))
        first = await chunks.__anext__()
        usage = request.stream_options is not None and request.stream_options.include_usage
        return EventStream(_events(out, first, chunks, len(ids), params.n, usage))
    except Exception as e:  # noqa: BLE001 - every error becomes a status, never a traceback
        return http_error(e)
