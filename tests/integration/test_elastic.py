"""Elastic experts on the simulated 4-node cluster (a head + 3 expert nodes of 6 slots): replicas
added and removed live during streams, autoscaling on a biased router, a replica killed while
another is added. Outputs always equal the in-process engine's; resources come back."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time

import pytest
import ray

from cluster.local import EXPERT_RESOURCE
from cluster.plan import PlacementError
from model.engine import Engine, SamplingParams

PROMPTS = ["Hello, my name is", "The capital of France is", "def fib(n):\n    return",
           "Once upon a time there was a very long prompt about experts and routers", "日本語"]
PARAMS = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
          SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)]


@pytest.fixture(scope="module")
def hot_checkpoint(tmp_path_factory):
    """`tiny` with every router biased to expert 0: about half of all rows go to it."""
    from model.config import PRESETS
    from model.random_checkpoint import write_random
    return write_random(PRESETS["tiny"], tmp_path_factory.mktemp("hot"), seed=0, hot_expert=0)


def free_expert_slots() -> float:
    return sum(r.get(EXPERT_RESOURCE, 0.0)
               for r in ray._private.state.available_resources_per_node().values())


def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def expected(path, jobs) -> list[list[int]]:
    reference = Engine.from_pretrained(path)
    return [reference.generate([prompt], params)[0].token_ids for prompt, params in jobs]


async def stream_all(engine, jobs, started: threading.Event | None = None) -> list[list[int]]:
    async def one(prompt, params):
        ids = []
        async for chunk in engine.stream(prompt, params):
            ids += chunk.token_ids
            if started is not None and len(ids) >= 4:
                started.set()
        return ids
    return await asyncio.gather(*(one(p, s) for p, s in jobs))


def test_set_expert_replicas_up_and_down_during_streams(ray_engine, hot_checkpoint):
    jobs = [(PROMPTS[i], PARAMS[i % 2]) for i in range(5)]
    want = expected(hot_checkpoint, jobs)
    wait_for(lambda: free_expert_slots() == 18, "earlier tests' slots never came back")
    engine = ray_engine(hot_checkpoint)
    try:
        start_free = free_expert_slots()
        started, events = threading.Event(), []

        def scale():
            started.wait(60)
            events.append(engine.set_expert_replicas({0: 3, 4: 2}))
            events.append(engine.expert_load().replicas())
            events.append(engine.placement()["experts"])
            events.append(engine.set_expert_replicas({0: 1, 4: 1}))
        thread = threading.Thread(target=scale)
        thread.start()
        got = asyncio.run(stream_all(engine, jobs, started))
        thread.join(120)
        assert got == want
        up, load_replicas, placement, down = events
        assert up == {**{e: 1 for e in range(8)}, 0: 3, 4: 2} == load_replicas
        assert len(set(placement[0])) == 3 and len(set(placement[4])) == 2   # distinct nodes
        assert down == {e: 1 for e in range(8)}
        assert len(engine.experts) == 8
        wait_for(lambda: free_expert_slots() == start_free, "scaled-down slots not returned")
        # after scaling back: still the same outputs, and the load is measured
        assert asyncio.run(stream_all(engine, jobs)) == want
        load = engine.expert_load()
        assert load.rows_per_s[0] == max(load.rows_per_s) > 0
        assert engine.info().expert_load[0] == pytest.approx(load.rows_per_s[0], rel=0.5)
    finally:
        engine.shutdown()


def test_more_than_the_cluster_holds_fails_and_changes_nothing(tiny_ray_engine):
    engine = tiny_ray_engine
    actors, free = list(engine.experts), free_expert_slots()
    with pytest.raises(PlacementError, match=r"cannot add expert replicas \(experts \[2\]: \+"):
        engine.set_expert_replicas({2: 30})
    with pytest.raises(ValueError, match="expert id must be an int in"):
        engine.set_expert_replicas({9: 2})
    assert engine.experts == actors and free_expert_slots() == free


def test_autoscaling_follows_a_hot_expert_and_sheds_replicas_when_load_stops(ray_engine,
                                                                              hot_checkpoint):
    jobs = [(PROMPTS[i % 5], PARAMS[i % 2]) for i in range(6)]
    want = expected(hot_checkpoint, jobs)
    policy = {"min_replicas": 1, "max_replicas": 3, "target_load_ratio": 2.0, "window_s": 4,
              "cooldown_s": 4, "interval_s": 1}
    engine = ray_engine(hot_checkpoint, expert_autoscaling=policy)
    try:
        head = engine.placement()["experts"][0][0]
        seen_during, outputs = [], []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:           # steady streaming load until it scales
            outputs.append(asyncio.run(stream_all(engine, jobs)))
            seen_during.append(engine.expert_load().replicas()[0])
            if seen_during[-1] >= 2 and len(outputs) >= 2:
                break
        assert all(o == want for o in outputs)      # before, during and after the change
        assert max(seen_during) >= 2, seen_during
        nodes = engine.placement()["experts"][0]
        assert len(set(nodes)) == len(nodes) and head in nodes     # others on other nodes
        decisions = engine.autoscaler.decisions
        assert decisions and decisions[0]["replicas"].get(0, 1) >= 2
        assert decisions[0]["load"][0] == max(decisions[0]["load"])
        # the load stops: within window + cooldown + a few intervals the extras go
        wait_for(lambda: engine.expert_load().replicas() == {e: 1 for e in range(8)},
                 "extra replicas not removed after the load stopped", 60)
        assert asyncio.run(stream_all(engine, jobs)) == want
    finally:
        engine.shutdown()


def test_killing_a_replica_while_adding_another_loses_nothing(ray_engine, hot_checkpoint):
    jobs = [(PROMPTS[i % 5], PARAMS[i % 2]) for i in range(5)]
    want = [ids for ids in expected(hot_checkpoint, jobs)]
    engine = ray_engine(hot_checkpoint, replicas=1)
    try:
        engine.set_expert_replicas({0: 2})
        victim = engine.expert_info()[-1]               # the replica of expert 0 just added
        assert list(victim.expert_ids) == [0]
        started, errors = threading.Event(), []

        def add_and_kill():
            started.wait(60)
            adder = threading.Thread(target=lambda: errors.append(
                engine.set_expert_replicas({0: 3, 3: 2})))
            adder.start()
            time.sleep(0.5)                             # the new actors are starting
            os.kill(victim.pid, signal.SIGKILL)
            adder.join(120)
        thread = threading.Thread(target=add_and_kill)
        thread.start()
        got = asyncio.run(stream_all(engine, jobs, started))
        thread.join(150)
        assert got == want
        assert errors == [{**{e: 1 for e in range(8)}, 0: 3, 3: 2}]
        assert engine.expert_load().replicas() == errors[0]
        assert engine.info().experts[0] and len(engine.experts) == 11
        assert asyncio.run(stream_all(engine, jobs)) == want        # consistent afterwards
    finally:
        engine.shutdown()


def test_a_replica_killed_while_being_added_or_removed_leaves_a_consistent_engine(
        ray_engine, hot_checkpoint, alive_actors):
    """During streams: the replica being added is SIGKILLed as soon as it is up (while it
    warms or just after; Ray restarts it and the addition goes on), then the replica being
    removed is SIGKILLed as its removal starts (the dispatcher re-sends its calls, and it is
    not restarted). Same outputs throughout; counts, actors and free slots consistent. The
    streams are long enough to outlast a new actor's start."""
    jobs = [(PROMPTS[i % 5], dataclasses.replace(PARAMS[i % 2], max_tokens=200))
            for i in range(5)]
    want = expected(hot_checkpoint, jobs)
    wait_for(lambda: free_expert_slots() == 18, "earlier tests' slots never came back")
    engine = ray_engine(hot_checkpoint)
    try:
        start_free = free_expert_slots()
        ones = {e: 1 for e in range(8)}

        def workers() -> dict[str, dict]:
            return {a["ActorID"]: a for a in alive_actors("ExpertWorker")}
        before = workers()

        def kill_while_adding(started, results, killed):
            started.wait(60)
            adder = threading.Thread(target=lambda: results.append(
                engine.set_expert_replicas({0: 2})))
            adder.start()
            deadline = time.monotonic() + 180
            while not killed and time.monotonic() < deadline:
                for actor_id, a in workers().items():
                    if actor_id not in before:              # the new replica, up
                        os.kill(a["Pid"], signal.SIGKILL)
                        killed.append(actor_id)
                        break
                time.sleep(0.02)
            adder.join(300)   # start, SIGKILL, restart, warm: slow on loaded cores

        def kill_while_removing(started, results, killed):
            started.wait(60)
            wait_for(lambda: len(workers()) == len(before) + 1, "the added replica's restart",
                     180)
            [victim] = [a for actor_id, a in workers().items() if actor_id not in before]
            remover = threading.Thread(target=lambda: results.append(
                engine.set_expert_replicas({0: 1})))
            remover.start()
            os.kill(victim["Pid"], signal.SIGKILL)
            killed.append(victim["ActorID"])
            remover.join(300)

        for scale, replicas in ((kill_while_adding, {**ones, 0: 2}), (kill_while_removing, ones)):
            started, results, killed = threading.Event(), [], []
            thread = threading.Thread(target=scale, args=(started, results, killed))
            thread.start()
            got = asyncio.run(stream_all(engine, jobs, started))
            thread.join(400)
            assert got == want, scale.__name__
            assert len(killed) == 1 and results == [replicas], (scale.__name__, results)
            assert engine.expert_load().replicas() == replicas
            assert len(engine.experts) == 7 + replicas[0]
            assert asyncio.run(stream_all(engine, jobs)) == want       # consistent afterwards
        # the removed replica stays dead, its slot is back, and only the engine's 8 remain
        wait_for(lambda: killed[0] not in workers(), "the removed replica came back")
        wait_for(lambda: free_expert_slots() == start_free, "the removed replica's slot")
        assert set(workers()) == set(before)
    finally:
        engine.shutdown()


def test_a_frontend_restarted_while_idle_after_scaling_uses_the_current_actors(ray_engine,
                                                                             hot_checkpoint):
    """Ray restarts RayEngine's frontend with its constructor's expert actors; after live
    scaling those are stale (here: without the added replica). Every call carries the current
    ones, so the next request runs on them, the added replica takes rows, same output. A call
    that carries the set from before the change (it started while the change was switched in)
    does not switch the frontend back."""
    jobs = [(PROMPTS[i], PARAMS[0]) for i in range(4)]
    want = expected(hot_checkpoint, jobs)
    engine = ray_engine(hot_checkpoint)
    try:
        stale = engine._current()
        engine.set_expert_replicas({0: 2})
        added = engine.experts[-1]
        ray.get(engine.frontend.use_experts.remote(stale))
        assert len(ray.get(engine.frontend.expert_load.remote()).actors) == 9, "switched back"
        pid = ray.get(engine.frontend.worker_info.remote()).pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _restarted(engine, pid), "the frontend did not come back", 120)
        assert [o.token_ids for o in engine.generate([p for p, _ in jobs], PARAMS[0])] == want
        load = engine.expert_load()
        assert load.replicas()[0] == 2 and len(set(engine.info().experts[0])) == 2
        [new] = [a for a, handle in zip(load.actors, engine.experts) if handle == added]
        assert new.rows_per_s > 0                     # the restarted frontend sends it rows
    finally:
        engine.shutdown()


def _restarted(engine, old_pid: int) -> bool:
    try:
        return ray.get(engine.frontend.worker_info.remote(), timeout=5).pid != old_pid
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False
