"""The expert actor: the w1/w2/w3 of some expert ids for every layer, nothing else.

It loads only its own tensors straight from the checkpoint files (or builds its own seeded
random ones), keeps them on its device, and holds no per-request state: any call can be sent
again, to it after a restart or to a replica.

    actor = ray.remote(**ACTOR_OPTIONS)(ExpertWorker).options(...).remote(source, ids, ...)
    compute(layer, x, counts) -> y        (also served over its channel: open_channel, which
                                           merges the waiting calls of several frontends)
    x (n, D) rows grouped by expert in this actor's `expert_ids` order, counts[i] rows for
    expert_ids[i]; y (n, D) the expert outputs in the same order (not yet weighted).
"""
from __future__ import annotations

import hmac
import logging
import threading
import time

import ray
import torch

from actors.experts.channel import device_rows, host_rows
from actors.experts.channel_server import CallBound, ChannelServer
from actors.info import MergeStats, WorkerInfo
from model.checkpoint import WeightSource
from model.mixtral import expert_names
from model.moe import LocalExperts, expert_name

log = logging.getLogger(__name__)

# model/engine.py Engine's max_num_batched_tokens default (a unit test keeps them equal): the
# tokens of one step, when the pool does not pass the engine's own
ENGINE_MAX_TOKENS = 2048
WATCH_GROUP = "watch"           # until_stopped's threads: one blocked per client (frontend)
MAX_WATCH_S = 3600.0            # until_stopped's max_s at most
# how every expert actor is made (actors/experts/pool.py, tests): restarted by Ray on death,
# calls never retried by Ray (the dispatcher re-sends); info/compute/warm/open_channel share 4
# threads, the clients' until_stopped watches have a group of their own, so N frontends'
# blocked watches never take those. Ray starts a group's threads up front (256 cost ~2.8 MB
# and 255 OS threads per actor): 64 watch 64 frontends at once, and a dead frontend's watch
# ends within its max_s; a 65th frontend's watch waits for a thread (its dead-actor detection
# falls back to the channel's reply timeout meanwhile)
ACTOR_OPTIONS = dict(max_restarts=-1, max_task_retries=0, max_concurrency=4,
                     concurrency_groups={WATCH_GROUP: 64})


class ExpertWorker:
    def __init__(self, source: WeightSource, expert_ids: list[int], dtype: str = "auto",
                 device: str = "cpu", threads: int | None = None,
                 max_num_batched_tokens: int = ENGINE_MAX_TOKENS):
        """`max_num_batched_tokens`: the tokens of one engine step, which bound the rows of
        one call and so the frames its channel accepts (channel_server.py: CallBound)."""
        if threads:
            torch.set_num_threads(threads)
        self.expert_ids = list(expert_ids)
        self.device = torch.device(device)
        cfg = source.model_config()
        self.dtype = source.resolve_dtype(dtype, device)
        tensors = source.load(expert_names(cfg, self.expert_ids), self.dtype, self.device)
        self.experts = LocalExperts.from_tensors(cfg, tensors, self.expert_ids)
        self.hidden_size = cfg.hidden_size
        self.bound = CallBound.of(max_num_batched_tokens, cfg.num_experts_per_tok,
                                  len(self.expert_ids), cfg.hidden_size, self.dtype)
        self._channel: ChannelServer | None = None
        self._secret = ""
        self._watches: dict[str, threading.Event] = {}  # client -> its running until_stopped's
        self._watch_lock = threading.Lock()
        log.info("expert actor %s ready: %.1f MB on %s", self.expert_ids,
                 self.experts.nbytes() / 1e6, self.device)

    def compute(self, layer: int, x: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, float]:
        """-> (y, seconds spent computing)."""
        start = time.perf_counter()
        assert x.ndim == 2 and x.shape[1] == self.hidden_size, f"x must be (n, {self.hidden_size})"
        assert sum(counts) == x.shape[0] and len(counts) == len(self.expert_ids), "bad counts"
        rows_dtype = x.dtype            # the frontend's; it may compute in another (dtype auto)
        x = device_rows(x, self.device).to(self.dtype)
        parts, begin = [], 0
        for expert, n in zip(self.expert_ids, counts):
            if n:
                parts.append(self.experts.compute(layer, expert, x[begin:begin + n]))
            begin += n
        y = host_rows((torch.cat(parts) if parts else x[:0]).to(rows_dtype))
        return y, time.perf_counter() - start

    def warm(self, sizes: tuple[int, ...] = (1, 8)) -> float:
        """Run every layer's experts once on `sizes` rows each (touches every weight, builds the
        kernels for those shapes) before a live-added actor takes rows -> seconds it took."""
        start = time.perf_counter()
        for layer in sorted({layer for layer, _ in self.experts.weights}):
            for n in sizes:
                x = torch.zeros(n * len(self.expert_ids), self.hidden_size,
                                dtype=self.dtype, device=self.device)
                self.compute(layer, x, [n] * len(self.expert_ids))
        return time.perf_counter() - start

    def open_channel(self, secret: str) -> str:
        """Start (once per process) this actor's data-plane channel on the node's address and
        return its endpoint (actors/experts/channel_server.py; frames bounded by `self.bound`);
        later calls must present the same secret. If the channel's thread dies, it ends this
        process: Ray restarts the actor."""
        if self._channel is None:
            self._channel = ChannelServer(self.compute, ray.util.get_node_ip_address(), secret,
                                          self.bound)
            self._secret = secret
        if not hmac.compare_digest(secret, self._secret):
            raise PermissionError("open_channel: wrong secret")
        return self._channel.endpoint

    @ray.method(concurrency_group=WATCH_GROUP)
    def until_stopped(self, client: str = "", max_s: float = 60.0) -> None:
        """Returns once the same `client` calls it again, or after `max_s` seconds; otherwise
        its ObjectRef fails when this actor dies, which is how a channel's client tells a dead
        actor from a slow one (one blocked thread of the watch group, no CPU). The client
        re-arms a call that returned. Ending the client's older call keeps one that reconnects
        (a retried switch-in, a restarted frontend) from piling up calls nobody waits for;
        other clients' calls are untouched. ValueError unless 0 < max_s <= MAX_WATCH_S."""
        if not 0 < max_s <= MAX_WATCH_S:
            raise ValueError(f"until_stopped: max_s must be in (0, {MAX_WATCH_S}] s, got {max_s}")
        with self._watch_lock:
            older = self._watches.get(client)
            if older is not None:
                older.set()
            self._watches[client] = watch = threading.Event()
        try:
            watch.wait(max_s)
        finally:
            with self._watch_lock:
                if self._watches.get(client) is watch:
                    del self._watches[client]

    def merge_stats(self) -> MergeStats:
        """How its channel merged calls since this process started (zeros before it opened)."""
        return self._channel.stats if self._channel is not None else MergeStats()

    def info(self) -> WorkerInfo:
        kept = [expert_name(layer, e, w) for layer, e in self.experts.weights
                for w in ("w1", "w2", "w3")]
        return WorkerInfo.of_this_process(self.expert_ids, self.experts.nbytes(), kept)
