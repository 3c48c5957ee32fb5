"""A shared expert pool's bookkeeping, without Ray: the load it reports (ExpertLoad.merged, the
sum over its frontends) and its owner's view of the frontends (PoolOwner in
actors/experts/shared.py: who is live, who is late to switch, the publish-and-wait of a change).
The pool on a real cluster: tests/integration/test_shared_pool.py. Both are new with issue 24:
before it neither ExpertLoad.merged nor actors/experts/shared.py existed."""
from __future__ import annotations

import asyncio
import threading
import time
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import actors.experts.shared as shared
from actors.experts.pool import Experts
from actors.experts.shared import LIVE_S, PoolOwner
from actors.info import ActorLoad, ExpertLoad

RATES = st.floats(0.0, 1e4, allow_nan=False)


@st.composite
def pool_and_loads(draw):
    """(num_layers L, num_experts E, the pool's idle ActorLoads, frontends' ExpertLoads). A
    frontend reports some of the pool's actors (any order) and maybe one the pool dropped."""
    num_layers, num_experts = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    n = draw(st.integers(0, 5))
    pool = [ActorLoad((i % num_experts,), f"node{i % 2}", 0.0, None, f"actor{i}")
            for i in range(n)]

    def load():
        seen = draw(st.permutations(pool + [ActorLoad((0,), "node9", 0.0, None, "dropped")]))
        seen = seen[:draw(st.integers(0, len(seen)))]
        return ExpertLoad(
            draw(st.floats(1.0, 60.0)),
            tuple(draw(RATES) for _ in range(num_experts)),
            tuple(tuple(draw(RATES) for _ in range(num_experts)) for _ in range(num_layers)),
            tuple(ActorLoad(a.expert_ids, a.node_id, draw(RATES),
                            draw(st.none() | st.floats(1e-6, 1.0)), a.actor_id) for a in seen))
    return num_layers, num_experts, pool, [load() for _ in range(draw(st.integers(0, 3)))]


@settings(max_examples=200, deadline=None)
@given(pool_and_loads())
def test_pool_load_is_the_sum_over_frontends(case):
    """Rows per second summed per expert id, per layer and per actor (matched by actor id, in
    the pool's order; an actor the pool dropped is not listed); the longest window; an actor's
    seconds per row the mean of the frontends that measured it."""
    num_layers, num_experts, pool, loads = case
    merged = ExpertLoad.merged(loads, pool, num_layers, num_experts)
    assert merged.window_s == max([0.0] + [load.window_s for load in loads])
    assert merged.rows_per_s == tuple(sum(load.rows_per_s[e] for load in loads)
                                      for e in range(num_experts))
    assert merged.per_layer == tuple(
        tuple(sum(load.per_layer[layer][e] for load in loads) for e in range(num_experts))
        for layer in range(num_layers))
    assert [(a.expert_ids, a.node_id, a.actor_id) for a in merged.actors] \
        == [(a.expert_ids, a.node_id, a.actor_id) for a in pool]
    for a in merged.actors:
        seen = [s for load in loads for s in load.actors if s.actor_id == a.actor_id]
        assert a.rows_per_s == sum(s.rows_per_s for s in seen)
        speeds = [s.seconds_per_row for s in seen if s.seconds_per_row is not None]
        assert a.seconds_per_row == (sum(speeds) / len(speeds) if speeds else None)


def test_no_frontend_load_is_zeros_of_the_pool_shape():
    pool = [ActorLoad((e,), "n", 0.0, None, f"a{e}") for e in range(8)]
    merged = ExpertLoad.merged([], pool, 2, 8)
    assert merged == ExpertLoad(0.0, (0.0,) * 8, ((0.0,) * 8,) * 2, tuple(pool))
    assert merged.replicas() == {e: 1 for e in range(8)} and merged.imbalance() == 1.0


# ---- the owner's view of its frontends --------------------------------------------------

def experts(generation: int) -> Experts:
    return Experts([], [], "secret", [], generation)


def bare_owner(generation: int = 1) -> PoolOwner:
    """A PoolOwner with no fleet: the state PoolOwner.__init__ sets for its frontends."""
    owner = object.__new__(PoolOwner)
    owner.name, owner._shape, owner._published = "pool", (2, 8), experts(generation)
    owner._lock, owner._seen = threading.Lock(), {}
    owner._loop = owner._changed = None
    return owner


def seen(owner: PoolOwner, frontend: str, generation: int, ago_s: float,
         load: ExpertLoad | None = None) -> None:
    """As if `frontend` synced `ago_s` seconds ago, using set `generation`."""
    owner._seen[frontend] = shared._Seen(generation, load, time.monotonic() - ago_s)


def test_frontends_silent_for_live_s_are_neither_live_nor_late_and_later_forgotten():
    owner = bare_owner()
    seen(owner, "now", 1, 0.0)
    seen(owner, "silent", 1, LIVE_S + 1)
    seen(owner, "long gone", 1, 10 * LIVE_S + 1)
    seen(owner, "switched", 2, 0.0)
    assert owner._live_count() == 2
    assert owner._late(2) == ["now"]
    owner._forget_gone()
    assert sorted(owner._seen) == ["now", "silent", "switched"]


def test_pool_load_counts_only_live_frontends():
    owner = bare_owner()
    member = types.SimpleNamespace(expert_ids=(0,), slot=types.SimpleNamespace(node_id="n0"),
                                   actor=types.SimpleNamespace(
                                       _actor_id=types.SimpleNamespace(hex=lambda: "a0")))
    owner.fleet = types.SimpleNamespace(pool=types.SimpleNamespace(members=[member]))

    def load(rate: float) -> ExpertLoad:
        return ExpertLoad(10.0, (rate,) + (0.0,) * 7, ((rate,) + (0.0,) * 7,) * 2,
                          (ActorLoad((0,), "n0", rate, None, "a0"),))
    seen(owner, "a", 1, 0.0, load(1.0))
    seen(owner, "b", 1, 0.0, load(2.0))
    seen(owner, "silent", 1, LIVE_S + 1, load(100.0))
    got = owner.load()
    assert got.rows_per_s[0] == 3.0 and got.per_layer[1][0] == 3.0
    assert [(a.actor_id, a.node_id, a.rows_per_s) for a in got.actors] == [("a0", "n0", 3.0)]


def test_a_change_reaches_a_waiting_frontend_and_waits_for_its_switch_only(monkeypatch):
    """`_publish` (the fleet's apply, in a thread) wakes a frontend's pending long poll with the
    new set and returns once that frontend syncs with its generation; a frontend silent for
    LIVE_S is not waited for (else: ACK_TIMEOUT_S, 60 s)."""
    monkeypatch.setattr(shared, "SYNC_WAIT_S", 30.0)    # only a publish ends a poll here
    owner, new = bare_owner(1), experts(2)
    seen(owner, "gone", 1, LIVE_S + 1)

    async def main():
        poll = asyncio.create_task(owner.sync("a", 1))
        await asyncio.sleep(0.1)
        assert not poll.done()                          # nothing newer than set 1 yet
        publishing = asyncio.create_task(asyncio.to_thread(owner._publish, new))
        assert await asyncio.wait_for(poll, 5) is new
        await asyncio.sleep(0.2)
        assert not publishing.done()                    # "a" has not switched yet
        ack = asyncio.create_task(owner.sync("a", 2))
        await asyncio.wait_for(publishing, 5)
        assert not ack.done()                           # up to date: its poll waits on
        ack.cancel()
    asyncio.run(main())


@pytest.mark.parametrize("uses, returns", [(1, True), (2, False), (3, False)])
def test_sync_returns_at_once_only_a_newer_set(monkeypatch, uses, returns):
    monkeypatch.setattr(shared, "SYNC_WAIT_S", 0.05)
    owner = bare_owner(2)
    got = asyncio.run(owner.sync("a", uses))
    assert (got is owner._published) if returns else got is None
    assert owner._seen["a"].generation == uses and owner._live_count() == 1


def test_close_waits_for_the_processes_of_its_live_frontends_within_drain_s(monkeypatch):
    """Serve's engine replicas drain their streams while the application is deleted: the owner
    stops the experts only once the processes of the frontends that used this pool lately are
    gone (another pool's, a silent one's and one that says no actor are not waited for), at
    most `drain_s`. Before, `close` stopped them at once, under the draining streams."""
    owner = bare_owner()
    now = time.monotonic()
    owner._seen = {"a": shared._Seen(1, None, now, "pool", "A"),
                   "b": shared._Seen(1, None, now, "", "B"),
                   "other": shared._Seen(1, None, now, "another-pool", "C"),
                   "silent": shared._Seen(1, None, now - LIVE_S - 1, "pool", "D"),
                   "anonymous": shared._Seen(1, None, now, "pool", "")}
    asked = []
    dies_at = {"A": 3, "B": 5}                       # alive for this many questions

    def actor_alive(actor: str) -> bool:
        asked.append(actor)
        return asked.count(actor) < dies_at.get(actor, 10**9)
    monkeypatch.setattr(shared, "actor_alive", actor_alive)
    monkeypatch.setattr(shared.time, "sleep", lambda s: None)
    owner._wait_for_frontends(drain_s=60)
    assert set(asked) == {"A", "B"} and asked.count("B") == 5
    asked.clear()
    dies_at["A"] = 10**9                             # never goes: drain_s bounds the wait
    owner._seen = {"a": shared._Seen(1, None, 0.0, "pool", "A")}
    t = iter(range(1000))
    monkeypatch.setattr(shared.time, "monotonic", lambda: float(next(t)))
    owner._wait_for_frontends(drain_s=5)
    assert 3 <= asked.count("A") <= 7
