"""A frontend's side of a shared expert pool (actors/experts/shared.py): how it calls the
pool's owner (PoolClient: a Ray actor handle or a Serve DeploymentHandle) and the thread that
follows the pool's set of actors (PoolFollower).

    follower = PoolFollower(PoolClient(handle), frontend)   # Frontend(..., pool=PoolClient(h))
    follower.stop()
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    from actors.experts.pool import Experts
    from actors.frontend import Frontend

log = logging.getLogger(f"ray.serve.{__name__}")

SYNC_WAIT_S = 2.0               # a frontend's long poll waits at most this for a newer set


@dataclasses.dataclass(frozen=True)
class PoolClient:
    """A frontend's way to its pool's owner: a Ray actor handle or a Serve DeploymentHandle
    (picklable either way), and the pool's name: a set of actors from another pool (another
    deploy's owner, reached through the same handle while Serve replaces it) is not its own."""
    handle: Any
    name: str = ""          # "": any pool's

    def ours(self, experts: Experts) -> bool:
        return not self.name or experts.pool == self.name

    def experts(self, timeout_s: float = 600.0) -> Experts:
        """The pool's set of actors now, asked until this pool's owner answers (Serve may
        route to another deploy's while it replaces the owner); TimeoutError after
        `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self.ours(experts := self.call("experts", timeout_s=timeout_s)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"expert pool {self.name} did not answer in {timeout_s:g} s "
                                   f"(pool {experts.pool} did)")
            time.sleep(1.0)
        return experts

    def call(self, method: str, *args, timeout_s: float | None = None):
        """The owner's `method(*args)`, blocking; from an event loop's thread it runs in
        another thread (a DeploymentHandle refuses blocking there)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._call(method, args, timeout_s)
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            return thread.submit(self._call, method, args, timeout_s).result()

    def _call(self, method: str, args: tuple, timeout_s: float | None):
        call = getattr(self.handle, method).remote(*args)
        if isinstance(self.handle, ray.actor.ActorHandle):
            return ray.get(call, timeout=timeout_s)
        return call.result(timeout_s=timeout_s)

    async def acall(self, method: str, *args):
        """The owner's `method(*args)`, awaited (both handle kinds' calls are awaitable)."""
        return await getattr(self.handle, method).remote(*args)


class PoolFollower:
    """A frontend's thread that follows its pool: long polls `sync` with the set it uses and
    its load, and switches to each newer set between two steps. An owner that is away
    (restarting) is logged once and asked again every second; the frontend serves on with
    the actors it has meanwhile."""

    def __init__(self, pool: PoolClient, frontend: Frontend):
        self.pool, self.frontend, self.id = pool, frontend, uuid.uuid4().hex
        self._actor = ray.get_runtime_context().get_actor_id() or ""    # its process's
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="expert-pool", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        away = False
        while not self._stop.is_set():
            try:
                experts = self.pool.call("sync", self.id, self.frontend.generation,
                                         self.frontend.expert_load(), self.pool.name,
                                         self._actor, timeout_s=SYNC_WAIT_S + 60)
            except Exception as e:  # noqa: BLE001 - the owner restarts; asked again below
                if not away:
                    log.warning("expert pool owner unreachable (%s: %s); serving with the "
                                "actors in use, asking again every second", type(e).__name__, e)
                away = True
                self._stop.wait(1.0)
                continue
            if away:
                log.info("expert pool owner answers again")
                away = False
            if experts is not None and self.pool.ours(experts) and not self._stop.is_set():
                self._switch(experts)

    def _switch(self, experts: Experts) -> None:
        """Use `experts` from the next step; a set this frontend cannot use (an actor's channel
        that does not open, an expert id no actor holds) is logged and asked again later."""
        try:
            self.frontend.set_experts_now(experts)
        except Exception as e:  # noqa: BLE001 - the actors in use serve on
            log.warning("could not switch to the expert pool's set %d (%s: %s); serving with "
                        "the actors in use", experts.generation, type(e).__name__, e)
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
