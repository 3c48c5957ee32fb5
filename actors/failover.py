"""Engine failover for one request: a stream of its chunks that survives the death of the
frontend serving it (which holds the request's KV cache): the engine replica of the served path,
or RayEngine's frontend actor.

    params = with_seed(params)              # before the first call, so a failover draws alike
    chunks = ResumableStream(lambda resume: engine_handle.options(stream=True).stream.remote(
        prompt_ids, params, resume), timeout_s=120)
    async for chunk in chunks: ...          # StreamChunks, as from the frontend's stream
    chunks.cancel()                         # when the client goes away

The caller (the gateway, RayEngine) streams to the client; this keeps what the client already has
of the request: from the chunks passed on, per choice (n > 1), the completion's token ids, their
logprobs (and top alternatives) and how many characters of text were sent, and which choices
finished. When the stream fails because its frontend died (RayActorError: killed, OOM, its node
lost; DeploymentUnavailableError), or its replica shuts down (Draining, sent as a value at the end
of its grace: a scale-down, a redeploy), the request is sent again with that state as a `Resume`
per unfinished choice (model/output.py): a live frontend, or the restarted one, prefills prompt +
tokens so far and goes on, so the client's stream continues with no token repeated or missing.
Greedy requests continue identically; so do sampled ones, since each draw is seeded by the
request's seed and the token's position (model/sampling.py: token_seed) and a request without a
seed is given one (`with_seed`). After a failure the request waits at most `timeout_s` for a
frontend to send its next chunk (a restarting one loads its weights first); past it, or when
`max_failovers` frontends in a row died with it before a chunk, the stream raises EngineUnavailable
(UNAVAILABLE / HTTP 503, retryable).
Any other error (a bad request, a full queue) passes through unchanged.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError

from model.engine import Resume, SamplingParams, StreamChunk

# a child of Serve's logger: its handlers and LoggingConfig apply in a replica
log = logging.getLogger(f"ray.serve.{__name__}")

RETRY_DELAY_S = 0.25            # before re-sending a request whose engine died, doubling to 2 s


class EngineUnavailable(RuntimeError):
    """No engine took the request back within the failover bound."""


class Draining(EngineUnavailable):
    """A replica is shutting down (actors/serving/draining.py): a new request is refused, a
    long one ended (UNAVAILABLE / 503, retryable). From an engine replica, the request is
    resumed on another (ResumableStream); from the gateway, the client retries."""

    def __init__(self, message: str = "the server is shutting down; retry the request"):
        super().__init__(message)


def unwrap(error: BaseException) -> BaseException:
    """The exception inside Ray's task-error wrappers, however deeply nested:
    RayTaskError(cause=RayTaskError(cause=ValueError(...))) -> the ValueError."""
    while isinstance(error, RayTaskError) and error.cause is not None and error.cause is not error:
        error = error.cause
    return error


def engine_died(error: BaseException) -> bool:
    """Whether a failed call means the frontend it went to is gone (or restarting)."""
    return isinstance(unwrap(error), (RayActorError, DeploymentUnavailableError))


def with_seed(params: SamplingParams) -> SamplingParams:
    """`params`, with a random seed if it samples without one (so a resumed or re-sent request
    draws what the first run would have)."""
    if params.greedy or params.seed is not None:
        return params
    return dataclasses.replace(params, seed=secrets.randbits(63))


class ChunkStream(Protocol):
    """What `call(resume)` returns: a Serve DeploymentResponseGenerator, or RayEngine's
    wrapper of an actor's ObjectRefGenerator."""
    def __anext__(self) -> Awaitable[StreamChunk]: ...
    def cancel(self) -> None: ...


@dataclasses.dataclass
class _Sent:
    """What the client has of one choice."""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list = dataclasses.field(default_factory=list)
    chars: int = 0
    finished: bool = False

    def add(self, chunk: StreamChunk) -> None:
        self.tokens += chunk.token_ids
        self.logprobs += chunk.logprobs
        self.top_logprobs += chunk.top_logprobs
        self.chars += len(chunk.text)
        self.finished = chunk.finish_reason is not None

    def resume(self, index: int) -> Resume:
        return Resume(tuple(self.tokens), tuple(self.logprobs), self.chars,
                      tuple(self.top_logprobs), index)


class ResumableStream:
    """An async iterator of one request's StreamChunks that fails over to another (or the
    restarted) frontend; see the module docstring. `call(resume)` starts the request's stream
    on a frontend: from the start (None) or from a tuple of Resume, one per unfinished choice
    of its `choices` (the request's n)."""

    def __init__(self, call: Callable[[tuple[Resume, ...] | None], ChunkStream],
                 timeout_s: float = 120.0, max_failovers: int = 3,
                 observe: Callable[[StreamChunk], None] | None = None, choices: int = 1):
        """`observe(chunk)`: called with each chunk as it is passed on, exactly once per chunk
        whichever frontend sent it (the gateway's request metrics, actors/serving/metrics.py)."""
        self._call = call
        self._observe = observe
        self._timeout_s, self._max_failovers = timeout_s, max_failovers
        self._sent = [_Sent() for _ in range(choices)]
        self._deaths = 0                     # frontends that died with it, since the last chunk
        self._attempts = 0                   # calls sent since the last chunk
        self._deadline: float | None = None  # set by a failure, cleared by a chunk
        self._stream = self._call(None)

    def __aiter__(self) -> ResumableStream:
        return self

    async def __anext__(self) -> StreamChunk:
        while True:
            try:
                if self._deadline is None:
                    chunk = await self._stream.__anext__()
                else:                        # waiting for a frontend to take it back: bounded
                    chunk = await asyncio.wait_for(self._stream.__anext__(),
                                                   max(0.0, self._deadline - time.monotonic()))
            except StopAsyncIteration:
                raise
            except asyncio.TimeoutError:
                raise EngineUnavailable(f"no frontend took the request back within "
                                        f"{self._timeout_s:g} s") from None
            except Exception as e:
                if not engine_died(e):
                    raise
                await self._fail_over(e)
                continue
            # a client's error, sent as a value (actors/serving/engine_server.py:
            # EngineServer.stream); an engine replica that drains hands the request back
            if isinstance(chunk, Draining):
                await self._fail_over(chunk)
                continue
            if isinstance(chunk, Exception):
                raise chunk
            self._deaths = self._attempts = 0
            self._deadline = None
            self._sent[chunk.index].add(chunk)
            if self._observe is not None:
                self._observe(chunk)
            return chunk

    async def _fail_over(self, error: BaseException) -> None:
        """Send the request again after its frontend failed: at once to another, or, while the
        only one restarts (ActorUnavailableError: Ray refuses calls until it is back), with a
        backoff until the deadline. A frontend that died with the request counts: past
        `max_failovers` in a row without a chunk, the request is given up (it may be what kills
        them)."""
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self._timeout_s
        restarting = isinstance(unwrap(error), (ActorUnavailableError, Draining))
        self._deaths += not restarting
        if self._deaths > self._max_failovers:
            raise EngineUnavailable(f"its frontend died {self._max_failovers} times in a row "
                                    "without making progress") from error
        if now >= self._deadline:
            raise EngineUnavailable(f"no frontend took the request back within "
                                    f"{self._timeout_s:g} s") from error
        if self._attempts == 0:
            log.warning("the frontend serving a request %s (%s); resuming it after %d tokens",
                        "shuts down" if isinstance(error, Draining) else "died",
                        type(unwrap(error)).__name__, sum(len(s.tokens) for s in self._sent))
        self._stream.cancel()
        await asyncio.sleep(min(RETRY_DELAY_S * 2 ** self._attempts, 2.0, self._deadline - now))
        self._attempts += 1
        self._stream = self._call(tuple(sent.resume(i) for i, sent in enumerate(self._sent)
                                        if not sent.finished))

    @property
    def finished(self) -> bool:
        """Whether every choice has sent its last chunk (a choice's finish_reason alone ends
        only that choice: with n > 1 the others may run on)."""
        return all(sent.finished for sent in self._sent)

    def cancel(self) -> None:
        """Cancel the engine call now in flight (the client went away): frees its KV blocks."""
        self._stream.cancel()
