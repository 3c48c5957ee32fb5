"""Engine failover for one request: a stream from the engine deployment that survives the death
of the engine replica serving it (the frontend, which holds the request's KV cache).

    chunks = ResumableStream(engine_handle, prompt_ids, params, timeout_s=120)
    async for chunk in chunks: ...          # StreamChunks, as from EngineServer.stream
    chunks.cancel()                         # when the client goes away

The gateway keeps what the client already has of the request: its prompt ids and, from the
chunks passed on, the completion's token ids, their logprobs and how many characters of text
were sent. When the stream fails because its engine died (RayActorError: the replica was killed,
OOM, its node lost; DeploymentUnavailableError), the request is sent again with that state as a
`Resume` (model/output.py): a live replica, or the one Serve restarts, prefills prompt + tokens so
far and goes on, so the client's stream continues with no token repeated or missing. Greedy
requests continue identically; so do sampled ones, since each draw is seeded by the request's
seed and the token's position (model/sampling.py: token_seed) and a request without a seed is
given one here. Each failover waits at most `timeout_s` for the new engine's first chunk (a
replica being restarted loads its weights first); past it, or past `max_failovers` in a row
without a new token, the stream raises EngineUnavailable (UNAVAILABLE / HTTP 503, retryable).
Any other error (a bad request, a full queue) passes through unchanged.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError

from model.engine import Resume, SamplingParams, StreamChunk

# a child of Serve's logger: its handlers and LoggingConfig apply in a replica
log = logging.getLogger(f"ray.serve.{__name__}")

RETRY_DELAY_S = 0.25            # before re-sending a request whose engine died, doubling to 2 s


class EngineUnavailable(RuntimeError):
    """No engine took the request back within the failover bound."""


def unwrap(error: BaseException) -> BaseException:
    """The exception inside Ray's task-error wrappers, however deeply nested:
    RayTaskError(cause=RayTaskError(cause=ValueError(...))) -> the ValueError."""
    while isinstance(error, RayTaskError) and error.cause is not None and error.cause is not error:
        error = error.cause
    return error


def engine_died(error: BaseException) -> bool:
    """Whether a failed engine call means its replica (or an actor it needs) is gone."""
    return isinstance(unwrap(error), (RayActorError, DeploymentUnavailableError))


class ResumableStream:
    """An async iterator of one request's StreamChunks that fails over to another engine
    replica; see the module docstring. `engine`: a DeploymentHandle of EngineServer."""

    def __init__(self, engine, prompt_ids: list[int], params: SamplingParams,
                 timeout_s: float = 120.0, max_failovers: int = 3):
        if not params.greedy and params.seed is None:      # so a failover draws the same
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        self._engine, self._ids, self._params = engine, prompt_ids, params
        self._timeout_s, self._max_failovers = timeout_s, max_failovers
        self._tokens: list[int] = []
        self._logprobs: list[float] = []
        self._chars = 0
        self._failovers = 0                  # in a row, without a new chunk since
        self._stream = self._call(None)

    def _call(self, resume: Resume | None):
        return self._engine.options(stream=True).stream.remote(self._ids, self._params, resume)

    def __aiter__(self) -> "ResumableStream":
        return self

    async def __anext__(self) -> StreamChunk:
        while True:
            try:
                if self._failovers:          # a restarting replica: bounded
                    chunk = await asyncio.wait_for(self._stream.__anext__(), self._timeout_s)
                else:
                    chunk = await self._stream.__anext__()
            except StopAsyncIteration:
                raise
            except asyncio.TimeoutError:
                raise EngineUnavailable(f"no engine took the request back within "
                                        f"{self._timeout_s:g} s") from None
            except Exception as e:  # noqa: BLE001 - engine deaths are retried, the rest raised
                if not engine_died(e):
                    raise
                await self._fail_over(e)
                continue
            self._failovers = 0
            self._tokens += chunk.token_ids
            self._logprobs += chunk.logprobs
            self._chars += len(chunk.text)
            return chunk

    async def _fail_over(self, error: BaseException) -> None:
        self._failovers += 1
        if self._failovers > self._max_failovers:
            raise EngineUnavailable(f"the engine died {self._max_failovers} times in a row "
                                    "without making progress") from error
        log.warning("the engine serving a request died (%s); resuming it after %d tokens "
                    "(failover %d)", type(unwrap(error)).__name__, len(self._tokens),
                    self._failovers)
        self._stream.cancel()
        await asyncio.sleep(min(RETRY_DELAY_S * 2 ** (self._failovers - 1), 2.0))
        self._stream = self._call(Resume(tuple(self._tokens), tuple(self._logprobs), self._chars))

    def cancel(self) -> None:
        """Cancel the engine call now in flight (the client went away): frees its KV blocks."""
        self._stream.cancel()
