"""Mixed streaming load on a running server, with the outputs it must give: for the load test
(tests/e2e/test_load.py), the chaos run (bench/chaos.py) and the soak (bench/soak.py).

    jobs = make_jobs(256, seed=0)                      # gRPC and OpenAI HTTP, mixed sampling,
    want = expected_outputs(engine, jobs)              # some cancelling; each alone, in-process
    results = asyncio.run(run_jobs(jobs, grpc_address, http_url, model))
    tally = check(jobs, results, want)                 # lost, wrong, cancelled, longest stall

A job streams one request (gRPC GenerateStream, or POST /v1/completions with `stream: true`)
and records its token ids, the longest gap between two chunks and how it ended. A job with
`cancel_after` leaves after that many chunks (its ids must be a prefix of the full output).
With `retries`, a job whose stream ends with a retryable status (gRPC UNAVAILABLE, HTTP 503, an
HTTP stream cut before `data: [DONE]`) is sent again from the start, up to that many times; with
`timeout_s`, one still running after that long is left and counted as hung. An HTTP stream that
ends with an error event is read on, to record whether `data: [DONE]` followed.

When the server shuts down under the load (no retries), `check_endings` sorts how each stream
ended: completed, the documented shutdown ending (docs/operations.md "Shutdown and draining"),
cut, or hung.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time

import grpc
import httpx2

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc

# frequent English words: the benchmarks' prompts are drawn from them
COMMON_WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as",
                "by", "at", "from", "his", "her", "it", "an", "be", "this", "are"]
WORDS = COMMON_WORDS + ["once", "upon", "a", "time", "there", "lived", "king", "who", "had",
                        "three", "daughters"]


@dataclasses.dataclass(frozen=True)
class Job:
    api: str                                   # "grpc" | "http"
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    cancel_after: int | None = None            # leave after this many chunks

    def sampling(self) -> dict:
        """The fields both APIs and SamplingParams share."""
        out = {"max_tokens": self.max_tokens, "temperature": self.temperature,
               "top_p": self.top_p, "top_k": self.top_k, "stop": list(self.stop)}
        return out | ({"seed": self.seed} if self.seed is not None else {})


@dataclasses.dataclass
class Result:
    ids: list[int]
    status: str = "ok"              # ok | cancelled | a gRPC status name | HTTP <code> | cut |
                                    # hung | "error event: <type>" (HTTP, an event with "error")
    max_gap_s: float = 0.0          # longest wait for a chunk (the first included), seconds,
                                    # across retries: from the failed try's last chunk on
    attempts: int = 1
    done: bool = False                         # HTTP: the stream ended with `data: [DONE]`
    detail: str = ""                           # the gRPC status's details, the error's message
    last_at: float = dataclasses.field(default_factory=time.monotonic)   # last chunk (or start)

    def chunk(self, ids) -> None:
        """A chunk's token ids arrived now."""
        now = time.monotonic()
        self.max_gap_s, self.last_at = max(self.max_gap_s, now - self.last_at), now
        self.ids += ids


def make_jobs(n: int, seed: int = 0, cancel_every: int = 8,
              max_tokens: tuple = (4, 24)) -> list[Job]:
    """n jobs alternating gRPC and HTTP: greedy, seeded sampling (temperature, top_p, top_k),
    some with stop strings; every `cancel_every`-th leaves early (0: none)."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        kind = rng.choice(["greedy", "seeded", "seeded-top-k", "stop"])
        kw = {"greedy": {}, "stop": {"stop": ("e t", "s a")},
              "seeded": {"temperature": 0.9, "top_p": 0.95, "seed": rng.randrange(2**31)},
              "seeded-top-k": {"temperature": 1.0, "top_k": 40,
                               "seed": -rng.randrange(2**31)}}[kind]
        jobs.append(Job(api="grpc" if i % 2 == 0 else "http",
                        prompt=" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))),
                        max_tokens=rng.randint(*max_tokens),
                        cancel_after=2 if cancel_every and i % cancel_every == cancel_every - 1
                        else None, **kw))
    return jobs


def expected_outputs(engine, jobs: list[Job]) -> list[list[int]]:
    """Each job's token ids run alone on an in-process Engine of the same checkpoint."""
    from model.engine import SamplingParams
    return [engine.generate(j.prompt, SamplingParams(**j.sampling()))[0].token_ids for j in jobs]


async def _grpc_stream(stub, job: Job, result: Result) -> None:
    req = pb.GenerateRequest(prompt=job.prompt, **job.sampling())
    call = stub.GenerateStream(req, timeout=600)
    chunks = 0
    try:
        async for part in call:
            result.chunk(part.token_ids)
            chunks += 1
            if job.cancel_after is not None and chunks >= job.cancel_after:
                call.cancel()
                result.status = "cancelled"
                return
    except grpc.aio.AioRpcError as e:
        result.status, result.detail = e.code().name, e.details() or ""


async def _http_stream(client: httpx2.AsyncClient, model: str, job: Job, result: Result) -> None:
    body = {"model": model, "prompt": job.prompt, "stream": True, "return_token_ids": True,
            **job.sampling()}
    chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                result.status = f"HTTP {resp.status_code}"
                return
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    result.done = True
                elif line.startswith("data: ") and result.status == "ok":
                    event = json.loads(line[6:])
                    if "error" in event:      # read on: does `data: [DONE]` follow?
                        result.status = f"error event: {event['error'].get('type')}"
                        result.detail = event["error"].get("message", "")
                        continue
                    result.chunk(event["choices"][0]["token_ids"])
                    chunks += 1
                    if job.cancel_after is not None and chunks >= job.cancel_after:
                        result.status = "cancelled"
                        return
    except httpx2.HTTPError:
        pass
    if not result.done and result.status == "ok":
        result.status = "cut"


RETRYABLE = {"UNAVAILABLE", "cut", "HTTP 503"}


class Clients:
    """One gRPC channel and one HTTP connection pool to a server, shared by many jobs:

        async with Clients(grpc_address, http_url, model) as clients:
            result = await clients.run(job, retries=3)
    """

    def __init__(self, grpc_address: str, http_url: str, model: str, connections: int = 256):
        self._channel = grpc.aio.insecure_channel(grpc_address)
        self._stub = pb_grpc.GeneratorStub(self._channel)
        self._http = httpx2.AsyncClient(base_url=http_url, timeout=600,
                                        limits=httpx2.Limits(max_connections=connections))
        self._model = model

    async def __aenter__(self) -> Clients:
        return self

    async def __aexit__(self, *exc) -> None:
        await self._http.aclose()
        await self._channel.close()

    async def run(self, job: Job, retries: int = 0, timeout_s: float | None = None) -> Result:
        """One job; a retryable end is retried from the start up to `retries` times; an attempt
        still running after `timeout_s` seconds is left, with status "hung"."""
        result = Result([])
        for attempt in range(1, retries + 2):     # a retry's stall counts from the last chunk
            result = Result([], attempts=attempt, max_gap_s=result.max_gap_s,
                            last_at=result.last_at)
            stream = (_grpc_stream(self._stub, job, result) if job.api == "grpc"
                      else _http_stream(self._http, self._model, job, result))
            try:
                await asyncio.wait_for(stream, timeout_s)
            except asyncio.TimeoutError:
                result.status = "hung"
            if result.status not in RETRYABLE or attempt > retries:
                return result
            await asyncio.sleep(min(0.5 * attempt, 3.0))
        return result


async def run_jobs(jobs: list[Job], grpc_address: str, http_url: str, model: str,
                   retries: int = 0, timeout_s: float | None = None) -> list[Result]:
    """Every job at once, over one gRPC channel and one HTTP connection pool (Clients.run)."""
    async with Clients(grpc_address, http_url, model, connections=len(jobs) + 8) as clients:
        return list(await asyncio.gather(*(clients.run(j, retries, timeout_s) for j in jobs)))


@dataclasses.dataclass
class Tally:
    jobs: int
    completed: int = 0                          # finished with exactly the expected ids
    cancelled: int = 0                          # left early, ids a prefix of the expected
    lost: int = 0                               # ended with an error, even after retries
    wrong: int = 0                              # ids differ from the expected
    retried: int = 0                            # needed more than one attempt
    max_gap_s: float = 0.0
    errors: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.wrong == 0


def check(jobs: list[Job], results: list[Result], expected: list[list[int]]) -> Tally:
    tally = Tally(len(jobs))
    for _job, result, want in zip(jobs, results, expected):
        tally.max_gap_s = max(tally.max_gap_s, result.max_gap_s)
        tally.retried += result.attempts > 1
        if result.status == "cancelled":
            tally.cancelled += 1
            tally.wrong += result.ids != want[:len(result.ids)]
        elif result.status != "ok":
            tally.lost += 1
            tally.errors[result.status] = tally.errors.get(result.status, 0) + 1
        elif result.ids == want:
            tally.completed += 1
        else:
            tally.wrong += 1
    return tally


def shutdown_ending(result: Result) -> bool:
    """Whether `result` ended as a draining server ends a stream (docs/operations.md "Shutdown
    and draining"): gRPC UNAVAILABLE; HTTP 503 (refused), or a `service_unavailable` error
    event followed by `data: [DONE]`."""
    return (result.status in ("UNAVAILABLE", "HTTP 503")
            or (result.status == "error event: service_unavailable" and result.done))


@dataclasses.dataclass
class Endings:
    """How the streams of a server that shut down under them ended (clients not retrying)."""
    jobs: int
    completed: int = 0                  # the whole expected output
    drained: int = 0                    # the shutdown ending (shutdown_ending), ids so far right
    cut: int = 0                        # any other end: no [DONE], another status or event
    hung: int = 0                       # still running after the client's timeout
    wrong: int = 0                      # ids not the expected, or (drained) not a prefix of it
    errors: dict = dataclasses.field(default_factory=dict)   # "status: detail" -> count

    @property
    def ok(self) -> bool:
        return self.cut == 0 and self.hung == 0 and self.wrong == 0


def check_endings(results: list[Result], expected: list[list[int]]) -> Endings:
    """Sort `results` (no cancelling jobs) by how they ended, against `expected` ids."""
    endings = Endings(len(results))
    for result, want in zip(results, expected):
        if result.status != "ok":
            key = f"{result.status}: {result.detail}"
            endings.errors[key] = endings.errors.get(key, 0) + 1
        if result.status == "ok":
            endings.completed += result.ids == want
            endings.wrong += result.ids != want
        elif shutdown_ending(result):
            endings.drained += 1
            endings.wrong += result.ids != want[:len(result.ids)]
        elif result.status == "hung":
            endings.hung += 1
        else:
            endings.cut += 1
    return endings
