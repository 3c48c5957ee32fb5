"""One SharedExpertPool (actors/experts/shared.py) and two RayEngines on it, on the shared local
cluster (tests/conftest.py: ray_cluster): one set of expert actors serves both; outputs equal
the in-process engine's, alone and concurrently; a scaling change reaches both frontends; the
pool's load is the sum of theirs; a SIGKILLed owner is restarted and adopts the actors while
both generate; an engine's shutdown leaves the experts, the pool's leaves nothing. The tests
run in order on one module-scoped pool. All fail before issue 24 (no SharedExpertPool, no
`pool=`: each RayEngine started 8 actors of its own)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import signal
import threading
import time

import pytest
import ray

from actors import RayEngine
from actors.experts.shared import SharedExpertPool
from actors.info import MergeStats
from cluster.local import EXPERT_SLOT
from model.engine import Engine, SamplingParams
from tests.choices import LOGPROB_TOLERANCE

PROMPTS = ["Hello, my name is", "The capital of France is", "def fib(n):\n    return", "日本語"]
PARAMS = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
          SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)]
# streamed while the owner is killed: long enough to outlast the kill
LONG = [dataclasses.replace(params, max_tokens=48) for params in PARAMS]
FRONTEND = {"CPU": 0.01}        # anywhere: the head's one `frontend` slot holds one frontend


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_checkpoint):
    pool = SharedExpertPool.start(tiny_checkpoint, dtype="float32", expert_threads=1,
                                  expert_resources=EXPERT_SLOT)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def engines(pool, tiny_checkpoint):
    """Two frontends on `pool`, started together."""
    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        started = list(threads.map(lambda _: RayEngine.from_pretrained(
            tiny_checkpoint, pool=pool, dtype="float32", frontend_resources=FRONTEND,
            frontend_threads=1), range(2)))
    yield started
    for engine in started:
        engine.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """(prompt, params) -> the in-process engine's Completion of that prompt alone."""
    engine, done = Engine.from_pretrained(tiny_checkpoint, dtype="float32"), {}

    def completion(prompt: str, params: SamplingParams):
        if (prompt, params) not in done:
            done[prompt, params] = engine.generate([prompt], params)[0]
        return done[prompt, params]
    return completion


def assert_as_in_process(engine, reference) -> None:
    """Both PARAMS over PROMPTS, one batch each: token ids equal, logprobs within tolerance."""
    for params in PARAMS:
        for prompt, got in zip(PROMPTS, engine.generate(PROMPTS, params)):
            want = reference(prompt, params)
            assert got.token_ids == want.token_ids, (prompt, params)
            assert got.logprobs == pytest.approx(want.logprobs, abs=LOGPROB_TOLERANCE), prompt


def expert_pids(pool) -> list[int]:
    return sorted(w.pid for w in ray.get([a.info.remote() for a in pool.experts.actors]))


def wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_two_engines_share_one_set_of_expert_actors(pool, engines, reference, alive_actors):
    workers = alive_actors("ExpertWorker")
    assert len(workers) == 8                                        # 8 x expert_replicas, not 16
    assert all(w["IsDetached"] and w["Name"].startswith(f"{pool.name}/expert/") for w in workers)
    assert sorted(w["Pid"] for w in workers) == expert_pids(pool)
    assert len(alive_actors("PoolOwner")) == 1
    nodes = {e: (node,) for (e,), node, _ in pool.info().actors}
    assert [dict(engine.info().experts) for engine in engines] == [nodes, nodes]
    for engine in engines:
        assert_as_in_process(engine, reference)


def test_both_engines_at_once_equal_the_in_process_engine(pool, engines, reference):
    """Their calls of one layer may meet at an actor (merged into one compute); the pool's
    info sums the actors' merge counts."""
    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        for done in [threads.submit(assert_as_in_process, e, reference) for e in engines]:
            done.result()
    merges = pool.info().merges                     # idle now: the counts stand still
    assert merges == MergeStats.merged(ray.get([a.merge_stats.remote()
                                                for a in pool.experts.actors]))
    assert 0 < merges.computes <= merges.calls and merges.rows > 0


def test_scaling_the_pool_reaches_both_frontends(pool, engines, reference, alive_actors):
    assert pool.set_expert_replicas({3: 2})[3] == 2
    for engine in engines:          # every live frontend switched before the change returned
        assert len(engine.info().experts[3]) == 2
    assert len(alive_actors("ExpertWorker")) == 9
    assert pool.info().frontends == 2
    for engine in engines:
        assert_as_in_process(engine, reference)
    assert engines[0].set_expert_replicas({3: 1})[3] == 1         # forwarded to the pool
    for engine in engines:
        assert len(engine.info().experts[3]) == 1
    wait_for(lambda: len(alive_actors("ExpertWorker")) == 8, "the removed replica still runs")


def test_an_engine_that_does_not_fit_the_pool_is_refused(pool, tiny_checkpoint):
    """Its rows would be refused by the actors' channels: ValueError before it starts."""
    with pytest.raises(ValueError, match="differs from the pool's"):
        RayEngine.from_pretrained(tiny_checkpoint, pool=pool, dtype="bfloat16")
    with pytest.raises(ValueError, match="max_num_batched_tokens=1000000 is over the pool's"):
        RayEngine.from_pretrained(tiny_checkpoint, pool=pool, dtype="float32",
                                  engine_args={"max_num_batched_tokens": 1_000_000})


def rows(load, per: str, actor_ids: list[str]) -> list[float]:
    """A load's rows per second flattened: per expert id, per layer x expert id, or per actor
    (in `actor_ids` order)."""
    if per == "actor":
        by_id = {a.actor_id: a.rows_per_s for a in load.actors}
        return [by_id[a] for a in actor_ids]
    return list(load.rows_per_s) if per == "expert" else [r for row in load.per_layer for r in row]


def test_pool_load_is_the_sum_of_its_frontends_loads(pool, engines):
    """Each engine runs its own workload; the pool's load (the followers' latest reports, at
    most SYNC_WAIT_S old) lies between the sums of the engines' loads read before and after
    it: rates only fall while nothing runs (rows / a window that grows or rows that age out)."""
    engines[0].generate(PROMPTS[:2], PARAMS[0])
    engines[1].generate(PROMPTS[2:] * 3, PARAMS[1])
    before = [engine.expert_load() for engine in engines]
    time.sleep(4.0)                                     # every follower reported since `before`
    total = pool.expert_load()
    after = [engine.expert_load() for engine in engines]
    ids = [a[2] for a in pool.info().actors]
    assert [a.actor_id for a in total.actors] == ids
    for load in before + after:
        assert sorted(a.actor_id for a in load.actors) == sorted(ids)
    assert all(sum(load.rows_per_s) > 0 for load in after)      # both count in the sum
    for per in ("expert", "layer", "actor"):
        high = [sum(x) for x in zip(*(rows(load, per, ids) for load in before))]
        low = [sum(x) for x in zip(*(rows(load, per, ids) for load in after))]
        got = rows(total, per, ids)
        assert all(lo - 1e-9 <= g <= hi + 1e-9 for lo, g, hi in zip(low, got, high)), \
            (per, low, got, high)


async def stream_all(engine, jobs, started: threading.Event) -> list[list[int]]:
    """Each (prompt, params) streamed at once; `started` set once one has 4 tokens."""
    async def one(prompt, params):
        ids = []
        async for chunk in engine.stream(prompt, params):
            ids += chunk.token_ids
            if len(ids) >= 4:
                started.set()
        return ids
    return await asyncio.gather(*(one(p, s) for p, s in jobs))


def test_owner_sigkilled_while_both_generate(pool, engines, reference):
    """Ray restarts the owner, which adopts the running actors (same pids, same actor ids);
    the frontends serve on meanwhile and nothing changes; a later scaling change works."""
    pids, actor_ids = expert_pids(pool), sorted(a[2] for a in pool.info().actors)
    owner_pid = ray.get(pool.owner.__ray_call__.remote(lambda self: os.getpid()))
    jobs = [(p, LONG[i % 2]) for i, p in enumerate(PROMPTS)]
    started = [threading.Event() for _ in engines]
    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        streams = [threads.submit(asyncio.run, stream_all(e, jobs, s))
                   for e, s in zip(engines, started)]
        assert all(s.wait(60) for s in started)
        os.kill(owner_pid, signal.SIGKILL)
        assert_as_in_process(engines[0], reference)    # while the owner restarts (adopting)
        got = [s.result(120) for s in streams]
    assert got == [[reference(p, s).token_ids for p, s in jobs]] * 2
    assert sorted(a[2] for a in pool.info().actors) == actor_ids       # the new owner answers
    assert ray.get(pool.owner.__ray_call__.remote(lambda self: os.getpid())) != owner_pid
    assert expert_pids(pool) == pids
    assert pool.set_expert_replicas({5: 2})[5] == 2
    assert all(len(engine.info().experts[5]) == 2 for engine in engines)
    assert pool.set_expert_replicas({5: 1})[5] == 1
    assert expert_pids(pool) == pids
    assert_as_in_process(engines[1], reference)


def test_engine_shutdown_keeps_the_experts_pool_shutdown_removes_everything(
        pool, engines, reference, alive_actors):
    pids, name = expert_pids(pool), pool.name
    engines[0].shutdown()
    assert expert_pids(pool) == pids
    assert_as_in_process(engines[1], reference)
    engines[1].shutdown()
    assert expert_pids(pool) == pids
    groups = [g for g in ray.util.placement_group_table().values()
              if g["name"].startswith(name)]
    assert sum(g["state"] == "CREATED" for g in groups) == 8, groups
    pool.shutdown()
    wait_for(lambda: not alive_actors("ExpertWorker") and not alive_actors("PoolOwner"),
             "expert actors or the owner outlived pool.shutdown()")
    groups = [g for g in ray.util.placement_group_table().values()
              if g["name"].startswith(name)]
    assert groups and {g["state"] for g in groups} == {"REMOVED"}, groups


def owner_pid(pool) -> int:
    return ray.get(pool.owner.__ray_call__.remote(lambda self: os.getpid()))


def test_an_owner_gone_for_good_leaves_nothing_behind(ray_cluster, tiny_checkpoint,
                                                      alive_actors):
    """A restarted owner that finds an expert group held by no actor (one killed for good)
    starts one, so the pool is whole again; once the owner is killed for good, `reap` (what
    the application's next owner does, actors/experts/detached.py) and `shutdown` remove its
    actors and groups. Before: the adopted set lacked that group (every call of its experts
    failed) and both left all the actors and groups running."""
    from actors.experts.detached import reap
    pool = SharedExpertPool.start(tiny_checkpoint, dtype="float32", expert_threads=1,
                                  expert_resources=EXPERT_SLOT)
    lost = pool.experts.actors[3]
    ray.kill(lost, no_restart=True)
    os.kill(owner_pid(pool), signal.SIGKILL)
    wait_for(lambda: sorted(e for ids in pool.experts.actor_experts for e in ids)
             == list(range(8)) and lost not in pool.experts.actors,
             "the restarted owner did not start the missing expert group", timeout_s=90)
    assert len(alive_actors("ExpertWorker")) == 8
    ray.kill(pool.owner, no_restart=True)
    reap(pool.name, keep="")
    assert not alive_actors("ExpertWorker")
    assert {g["state"] for g in ray.util.placement_group_table().values()
            if g["name"].startswith(pool.name)} == {"REMOVED"}
    pool.shutdown()                                 # the owner is gone: nothing left to do
