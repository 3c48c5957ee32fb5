"""Continuous batching: which tokens of which requests run in the next step.

Each step has a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
Running requests go first, oldest first: one token each when decoding, or the next chunk of
their prompt when still prefilling. Waiting requests are then admitted first-come first-served
while budget, sequence slots and KV blocks allow; a long prompt is prefilled in chunks over
several steps. When a running request needs a KV block and none is free, the newest running
request is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed from its prompt plus the tokens it already generated. Requests never share blocks,
so one request's shortage never corrupts another. The scheduler knows nothing about tensors.

Example (budget 8, block_size 4): running A decoding, waiting B with a 10-token prompt ->
step 1 schedules [(A, 1), (B, 7)], step 2 [(A, 1), (B, 3)], then B decodes too.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools

from model.attention import BlockAllocator
from model.sampling import SamplingParams, SequenceState

_arrivals = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams | None               # None: a logits request (no sampling)
    seed: int | None = None                     # sampling.request_seed; None: greedy
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    block_table: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0                       # tokens whose keys are in the KV cache
    finish_reason: str | None = None
    arrival: int = dataclasses.field(default_factory=lambda: next(_arrivals))
    # the sampler's per-sequence state (penalty counts); the scheduler never reads it
    sampling_state: SequenceState = dataclasses.field(default_factory=SequenceState)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int):
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Request, int]]:
        """Return (request, number of its next tokens to compute) for the next step."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted = False
        for req in list(self.running):
            if req not in self.running or budget == 0:
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            while not self._reserve(req, req.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                scheduled.append((req, n))
                budget -= n
        while (self.waiting and not preempted and budget > 0
               and len(self.running) < self.max_num_seqs):
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._reserve(req, req.num_computed + n):
                break
            self.waiting.popleft()
            self.running.append(req)
            self.running.sort(key=lambda r: r.arrival)
            scheduled.append((req, n))
            budget -= n
        return scheduled

    def finish(self, req: Request) -> None:
        """Release a finished or aborted request's blocks, wherever it is."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.allocator.free(req.block_table)
        req.block_table = []

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _reserve(self, req: Request, num_tokens: int) -> bool:
        missing = self.blocks_needed(num_tokens) - len(req.block_table)
        if missing > self.allocator.num_free:
            return False
        if missing > 0:
            req.block_table += self.allocator.allocate(missing)
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.allocator.free(req.block_table)
        req.block_table = []
        req.num_computed = 0
        self.waiting.appendleft(req)
        self.num_preemptions += 1
