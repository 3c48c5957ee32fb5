"""One expert pool shared by every engine replica of a served application (`expert_pool:
shared`, issue 24), driven as an operator drives it: a Serve config deployed through the
controller (as `serve deploy` does), whose EngineServer `num_replicas` is changed in place.
Under steady streaming load (bench/loadgen.py: gRPC and HTTP, greedy and seeded; no client
retries, so an error is a lost request), in this order, on one application:

1. engine replicas 1 -> 2: 8 expert actors still (not 16), the same processes;
2. with 2 replicas, both serving: every output equals the in-process engine's, and the pool
   reports both frontends;
3. an engine replica SIGKILLed: its streams resume on the other, the experts stay;
4. the pool's owner (ExpertPoolServer) SIGKILLed: streams go on, the restarted owner adopts the
   same actors, and a later set_expert_replicas (through an engine replica) works;
5. engine replicas 2 -> 1: the drained replica's streams move, the experts stay;
6. the application deleted: no expert actor alive, every placement group it made REMOVED.

Each output is compared with the in-process engine's, run alone."""
from __future__ import annotations

import asyncio
import itertools
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from ray import serve

from actors.serving.pool_server import pool_prefix
from bench import loadgen
from cluster.local import EXPERT_SLOT, HEAD_RESOURCE
from model.engine import Engine

APP = "mixtral-ep-shared-pool"
EXPERTS = 8                         # the tiny checkpoint's num_local_experts, one per actor
CLIENTS = 6                         # concurrent streams, back to back
JOBS = loadgen.make_jobs(24, seed=24, cancel_every=0, max_tokens=(8, 32))
ENGINE = f"ServeReplica:{APP}:EngineServer"
OWNER = f"ServeReplica:{APP}:ExpertPoolServer"


def app_config(checkpoint: Path, engine_replicas: int) -> dict:
    """The application's entry of a Serve config: several engine replicas fit on the head (a
    head resource, not the one `frontend` slot)."""
    return {"import_path": "deploy.app:build_app",
            "args": {"model": str(checkpoint), "expert_pool": "shared", "dtype": "float32",
                     "expert_resources": EXPERT_SLOT, "expert_threads": 1,
                     "frontend_resources": {"CPU": 0.01, HEAD_RESOURCE: 1},
                     "frontend_threads": 1},
            "deployments": [{"name": "EngineServer", "num_replicas": engine_replicas}]}


def live_groups() -> set[str]:
    """Ids of the placement groups not REMOVED (from the GCS, as tests/conftest.py's actors)."""
    return {i for i, g in ray.util.placement_group_table().items() if g["state"] != "REMOVED"}


@pytest.fixture(scope="module")
def groups_before(serve_apps) -> set[str]:
    """The placement groups alive before APP is deployed."""
    return live_groups()


@pytest.fixture(scope="module")
def scale(serve_apps, tiny_checkpoint, groups_before):
    """scale(n): (re)deploy APP with n engine replicas and wait until exactly n run; APP runs
    with 1 from the first test on."""
    def run(engine_replicas: int):
        return serve_apps.apply(APP, app_config(tiny_checkpoint, engine_replicas))
    run(1)
    yield run
    serve_apps.delete(APP)


@pytest.fixture(scope="module")
def want(tiny_checkpoint) -> list[list[int]]:
    return loadgen.expected_outputs(Engine.from_pretrained(tiny_checkpoint), JOBS)


class Load:
    """CLIENTS clients sending JOBS round robin, each request as soon as its previous one
    ended, from a thread of their own until `stop`: (job index, loadgen.Result) per request."""

    def __init__(self, grpc_port: int, http_port: int, model: str):
        self.address, self.url, self.model = (f"127.0.0.1:{grpc_port}",
                                              f"http://127.0.0.1:{http_port}", model)
        self.done: list[tuple[int, loadgen.Result]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)
        self.thread.start()

    async def _run(self) -> None:
        async with loadgen.Clients(self.address, self.url, self.model, CLIENTS) as clients:
            await asyncio.gather(*(self._client(clients, i) for i in range(CLIENTS)))

    async def _client(self, clients: loadgen.Clients, first: int) -> None:
        for n in itertools.count(first, CLIENTS):
            if self._stop.is_set():
                return
            job = n % len(JOBS)
            self.done.append((job, await clients.run(JOBS[job], timeout_s=300)))

    def until(self, more: int, timeout_s: float = 300) -> None:
        """Wait until `more` requests ended from now."""
        goal, deadline = len(self.done) + more, time.monotonic() + timeout_s
        while len(self.done) < goal:
            assert self.thread.is_alive() and time.monotonic() < deadline, len(self.done)
            time.sleep(0.2)

    def close(self) -> None:
        """Stop once the requests running now have ended."""
        self._stop.set()
        self.thread.join(timeout=300)
        assert not self.thread.is_alive()

    def stop(self, want: list[list[int]]) -> int:
        """close(); assert that every request completed with the in-process engine's output
        (none lost, none wrong) -> how many there were."""
        self.close()
        jobs, results = [JOBS[j] for j, _ in self.done], [r for _, r in self.done]
        tally = loadgen.check(jobs, results, [want[j] for j, _ in self.done])
        assert tally.ok and tally.completed == len(self.done) > 0, tally
        return len(self.done)


@pytest.fixture
def load(grpc_port, http_port, tiny_checkpoint, want):
    """A running Load on APP; its requests are checked by `load.stop(want)` in the test (and
    stopped, unchecked, after a test that failed before)."""
    running = Load(grpc_port, http_port, Path(tiny_checkpoint).name)
    running.until(CLIENTS)                      # requests flow
    yield running
    running.close()


def expert_pids(alive_actors) -> dict[str, int]:
    """Every ExpertWorker actor alive: actor id -> pid."""
    return {a["ActorID"]: a["Pid"] for a in alive_actors("ExpertWorker")}


def ongoing(replica: dict) -> int:
    """Requests a Serve replica (a GCS actor-table entry) is serving now."""
    actor = ray.get_actor(replica["Name"], namespace="serve")
    return ray.get(actor.get_num_ongoing_requests.remote(), timeout=30)


def until_serving(replicas: list[dict], timeout_s: float = 120) -> None:
    """Wait until each of `replicas` has been seen serving a request."""
    idle, deadline = {r["Name"]: r for r in replicas}, time.monotonic() + timeout_s
    while idle:
        idle = {name: r for name, r in idle.items() if ongoing(r) == 0}
        assert time.monotonic() < deadline, f"never served a request: {sorted(idle)}"
        time.sleep(0.1)


def engine_handle():
    return serve.get_deployment_handle("EngineServer", app_name=APP)


def test_scaling_the_engine_up_keeps_one_set_of_expert_actors(scale, load, want, alive_actors):
    """Engine replicas 1 -> 2 (a num_replicas-only change of the config) while streams run:
    none lost, the first replica and every expert actor the same processes, and 8 expert
    actors in all (a pool per replica: 16)."""
    [first] = alive_actors(ENGINE)
    before = expert_pids(alive_actors)
    assert len(before) == EXPERTS
    scale(2)
    load.until(2 * CLIENTS)                     # served after the change too
    assert expert_pids(alive_actors) == before
    assert first["Pid"] in {r["Pid"] for r in alive_actors(ENGINE)}
    assert len(alive_actors(ENGINE)) == 2
    load.stop(want)


def test_two_engine_replicas_serve_from_one_pool_as_the_in_process_engine(
        scale, load, want, alive_actors):
    """With 2 engine replicas both serving (each seen with requests in flight), every request,
    greedy and seeded, gRPC and HTTP, ends with the in-process engine's tokens; the pool (asked
    through an engine replica) has its 8 actors, the ones alive, and hears from 2 frontends."""
    until_serving(alive_actors(ENGINE))
    load.until(2 * CLIENTS)
    info = engine_handle().pool_info.remote().result(timeout_s=60)
    assert info.name.startswith(pool_prefix(APP)) and info.frontends == 2
    assert {actor for _, _, actor in info.actors} == set(expert_pids(alive_actors))
    assert len(info.actors) == EXPERTS
    assert load.stop(want) >= 4 * CLIENTS


def test_a_killed_engine_replica_leaves_the_experts_and_loses_no_request(
        scale, load, want, alive_actors):
    """SIGKILL an engine replica while it streams: its requests resume on the other (the
    gateway), every output as the in-process engine's; the expert actors are the same
    processes, and the replica Serve starts in its place joins the pool and serves."""
    before = expert_pids(alive_actors)
    victim = alive_actors(ENGINE)[0]
    until_serving([victim])
    os.kill(victim["Pid"], signal.SIGKILL)
    load.until(2 * CLIENTS)
    deadline = time.monotonic() + 120
    while len(replicas := [r for r in alive_actors(ENGINE) if r["Pid"] != victim["Pid"]]) < 2:
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(0.5)
    until_serving(replicas, timeout_s=180)      # the new one once its weights are loaded
    assert expert_pids(alive_actors) == before
    load.stop(want)


def test_a_killed_pool_owner_is_adopted_and_scales_afterwards(scale, load, want, alive_actors):
    """SIGKILL the pool's owner while the engines stream: no request lost or changed; Serve's
    new owner adopts the same actors (the same pids), and set_expert_replicas through an engine
    replica then adds and removes an actor of expert 0 while the load runs."""
    before = expert_pids(alive_actors)
    [owner] = alive_actors(OWNER)
    until_serving(alive_actors(ENGINE))
    os.kill(owner["Pid"], signal.SIGKILL)
    load.until(2 * CLIENTS)
    deadline = time.monotonic() + 120
    while [r["Pid"] for r in alive_actors(OWNER)] in ([], [owner["Pid"]]):
        assert time.monotonic() < deadline, "Serve did not restart the pool's owner"
        time.sleep(0.5)
    engine = engine_handle()
    assert engine.set_expert_replicas.remote({0: 2}).result(timeout_s=180)[0] == 2
    grown = expert_pids(alive_actors)
    assert len(grown) == EXPERTS + 1 and before.items() <= grown.items()
    load.until(2 * CLIENTS)
    assert engine.set_expert_replicas.remote({0: 1}).result(timeout_s=180)[0] == 1
    deadline = time.monotonic() + 60
    while len(expert_pids(alive_actors)) != EXPERTS:
        assert time.monotonic() < deadline, "the removed actor is still alive"
        time.sleep(0.5)
    info = engine.pool_info.remote().result(timeout_s=60)
    assert len(info.actors) == EXPERTS and info.frontends == 2
    load.until(2 * CLIENTS)
    load.stop(want)


def test_scaling_the_engine_down_keeps_the_experts(scale, load, want, alive_actors):
    """Engine replicas 2 -> 1 while streams run: the drained replica's requests move (none
    lost, none changed), and the expert actors are the same processes."""
    before = expert_pids(alive_actors)
    assert len(before) == EXPERTS and len(alive_actors(ENGINE)) == 2
    scale(1)
    load.until(2 * CLIENTS)
    assert len(alive_actors(ENGINE)) == 1
    assert expert_pids(alive_actors) == before
    load.stop(want)


def test_deleting_the_application_leaves_no_actor_or_placement_group(
        scale, serve_apps, groups_before, alive_actors):
    """Deleting the application stops the pool: no expert actor alive, and every placement
    group made since it was deployed REMOVED, its experts' (named after the pool) among them."""
    serve_apps.delete(APP)
    deadline = time.monotonic() + 60
    while expert_pids(alive_actors) or live_groups() - groups_before:
        assert time.monotonic() < deadline, (expert_pids(alive_actors),
                                             live_groups() - groups_before)
        time.sleep(0.5)
    named = [g for g in ray.util.placement_group_table().values()
             if g["name"].startswith(pool_prefix(APP))]
    assert len(named) >= EXPERTS and {g["state"] for g in named} == {"REMOVED"}
