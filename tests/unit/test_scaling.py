"""Elastic experts without Ray: planning added replicas, the load window, rows split by measured
speed, the dispatcher's actor swap between steps, the autoscaling policy, the biased router."""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import types

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from actors.experts.dispatcher import Dispatcher
from actors.experts.load import MIN_CALLS, LoadWindow
from actors.experts.scaling import Autoscaler, ExpertAutoscaling, ExpertScaler, _victims
from actors.info import ActorLoad, ExpertLoad
from cluster.plan import Node, PlacementError, Slot, plan_added
from model.config import PRESETS
from model.engine import Engine, SamplingParams
from tests.unit.test_dispatcher import CFG, E, FakeActor, FakeClock, in_process_transport, routed

NODES = [Node(f"n{i}", {"CPU": 2, "expert": 2}) for i in range(3)]


# ---- planning added replicas --------------------------------------------------------------
def test_added_replicas_go_to_nodes_without_one_first():
    slots = plan_added(NODES, {(0,): ["n0"], (1,): ["n1"]}, {(0,): 2, (1,): 1}, {"expert": 1})
    assert [s.node_id for s in slots[(0,)]] == ["n1", "n2"]
    assert [s.node_id for s in slots[(1,)]] == ["n2"] or [s.node_id for s in slots[(1,)]] == ["n0"]
    assert all(s.resources == {"expert": 1} for ss in slots.values() for s in ss)


def test_an_added_replica_shares_a_node_only_when_no_other_has_room():
    nodes = [Node("n0", {"expert": 2}), Node("n1", {"expert": 0})]
    assert [s.node_id for s in plan_added(nodes, {(3,): ["n0"]}, {(3,): 1}, {"expert": 1})[(3,)]] \
        == ["n0"]


def test_more_than_the_cluster_holds_names_what_is_missing():
    with pytest.raises(PlacementError) as err:
        plan_added(NODES, {(0,): ["n0"]}, {(0,): 7}, {"expert": 1})
    msg = str(err.value)
    assert "experts [0]: +7" in msg and "{expert: 1}" in msg and "replica 7" in msg
    assert "node n0: {CPU: 2, expert: 2}" in msg


# ---- the load window ------------------------------------------------------------------------
def test_rates_cover_the_window_and_forget_what_is_older():
    clock = FakeClock()
    w = LoadWindow(4, window_s=10, clock=clock)
    w.routed(0, [4, 0, 2, 0])
    w.routed(1, [4, 0, 0, 2])
    clock.now += 5
    w.routed(0, [6, 0, 0, 0])
    assert w.span_s() == 5
    assert w.rows_per_s(2) == [[2.0, 0, 0.4, 0], [0.8, 0, 0, 0.4]]
    clock.now += 6                               # the first second has left the 10 s window
    assert w.rows_per_s(2) == [[0.6, 0, 0, 0], [0, 0, 0, 0]]


@given(a=st.floats(0.0, 0.01), b=st.floats(1e-6, 1e-3),
       sizes=st.lists(st.integers(1, 512), min_size=MIN_CALLS, max_size=40))
def test_the_speed_fit_recovers_seconds_per_row(a, b, sizes):
    w = LoadWindow(8, clock=FakeClock())
    for n in sizes:
        w.called("x", n, a + b * n)
    got = w.seconds_per_row("x")
    if len(set(sizes)) > 1:
        assert got == pytest.approx(b, rel=1e-4, abs=1e-12)
    else:                                        # no spread: no slope, the split stays even
        assert got is None


def test_a_slope_lost_in_noise_counts_as_unmeasured():
    """A fixed cost that dwarfs the per-row one (a GPU's weight-reading floor) with a few %
    of timing noise: no speed, so replicas split evenly instead of by noise."""
    import random
    rng = random.Random(0)
    w = LoadWindow(8, clock=FakeClock())
    for _ in range(40):
        n = rng.randint(1, 64)
        w.called("x", n, (88e-6 + 1e-9 * n) * rng.uniform(0.97, 1.03))
    assert w.seconds_per_row("x") is None


def test_an_actor_is_unmeasured_until_it_made_enough_calls():
    w = LoadWindow(8, clock=FakeClock())
    for n in range(1, MIN_CALLS):
        w.called("x", n, 0.001 * n)
    assert w.seconds_per_row("x") is None
    w.called("x", 9, 0.009)
    assert w.seconds_per_row("x") == pytest.approx(0.001)


# ---- the dispatcher: split by speed, swap between steps --------------------------------------
class TimedTransport:
    """In-process, reporting compute seconds = 1 ms + seconds_per_row[actor] * rows."""

    def __init__(self, seconds_per_row: dict):
        self.seconds_per_row = seconds_per_row
        self.disconnected = []

    def __call__(self, layer, requests):
        out = []
        for (actor, x, _counts), (y, _) in zip(requests, in_process_transport(layer, requests)):
            out.append((y, 0.001 + self.seconds_per_row[actor] * x.shape[0]))
        return out

    def disconnect(self, actor):
        self.disconnected.append(actor)


def run_steps(d: Dispatcher, clock: FakeClock, steps: int, rows: int = 64) -> None:
    for step in range(steps):
        x, weights, experts = routed(rows=rows, seed=step)
        d.moe(step % CFG.num_hidden_layers, x, weights, experts)
        clock.now += 0.1


def test_rows_are_split_in_proportion_to_measured_speed():
    layout = [[e] for e in range(E)] + [[0]]            # expert 0 twice: actors 0 and 8
    actors = [FakeActor(ids) for ids in layout]
    slow, fast = actors[0], actors[8]
    speed = {a: 1e-4 for a in actors} | {slow: 3e-4}   # the first replica is 3x slower
    clock = FakeClock()
    d = Dispatcher(actors, layout, E, transport=TimedTransport(speed), clock=clock,
                   sleep=clock.sleep)
    run_steps(d, clock, 20)                           # measured: even split until then
    assert d.speeds()[slow] == pytest.approx(3e-4) and d.speeds()[fast] == pytest.approx(1e-4)
    slow.calls.clear(), fast.calls.clear()
    run_steps(d, clock, 10)
    got = sum(c[0] for c in fast.calls) / sum(c[0] for c in slow.calls)
    assert got == pytest.approx(3.0, rel=0.1)


def test_equal_replicas_keep_an_even_split_and_results_equal_local_experts(reference):
    layout = [[e] for e in range(E)] * 2
    actors = [FakeActor(ids) for ids in layout]
    clock = FakeClock()
    d = Dispatcher(actors, layout, E, transport=TimedTransport({a: 1e-4 for a in actors}),
                   clock=clock, sleep=clock.sleep)
    run_steps(d, clock, 20)
    for a, twin in zip(actors[:E], actors[E:]):
        mine, theirs = sum(sum(c) for c in a.calls), sum(sum(c) for c in twin.calls)
        assert abs(mine - theirs) <= 0.05 * (mine + theirs) + 2
    x, weights, experts = routed(rows=40, seed=99)
    torch.testing.assert_close(d.moe(0, x, weights, experts),
                               reference.moe(0, x, weights, experts), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def reference():
    from tests.unit.test_dispatcher import reference as ref
    return ref.__wrapped__()


def test_set_actors_adds_and_drops_replicas(reference):
    layout = [[e] for e in range(E)]
    actors = [FakeActor(ids) for ids in layout]
    clock = FakeClock()
    transport = TimedTransport({})
    transport.seconds_per_row = collections.defaultdict(lambda: 1e-4)
    d = Dispatcher(actors, layout, E, transport=transport, clock=clock, sleep=clock.sleep)
    extra = FakeActor([3])
    d.set_actors(actors + [extra], layout + [[3]])
    run_steps(d, clock, 4, rows=128)
    assert sum(c[0] for c in extra.calls) > 0 and d.holders[3] == [3, 8]
    d.set_actors(actors, layout)
    assert transport.disconnected == [extra]
    extra.calls.clear()
    run_steps(d, clock, 4, rows=128)
    assert extra.calls == []
    with pytest.raises(ValueError, match=r"no actor holds expert\(s\) \[7\]"):
        d.set_actors(actors[:7], layout[:7])
    assert d.actors == actors                      # nothing changed
    x, weights, experts = routed(rows=40, seed=5)
    torch.testing.assert_close(d.moe(1, x, weights, experts),
                               reference.moe(1, x, weights, experts), rtol=1e-5, atol=1e-6)


def test_run_between_steps_waits_for_the_running_step(tiny_checkpoint):
    engine = Engine.from_pretrained(tiny_checkpoint)
    seen = []
    inner = engine.moe

    def moe(layer, *args):
        if layer == 0 and not seen:                   # inside the first step, from another thread
            thread = threading.Thread(target=lambda: seen.append(
                engine.run_between_steps(lambda: "ran")))
            thread.start()
            thread.join()
            assert not seen[0].done()
        return inner(layer, *args)
    engine.moe = moe
    engine.generate(["Hello"], SamplingParams(max_tokens=2, temperature=0))
    assert seen[0].result(timeout=0) == "ran"
    assert engine.run_between_steps(lambda: 7).result(timeout=0) == 7     # idle: at once
    failed = engine.run_between_steps(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result(timeout=0)


# ---- the policy ------------------------------------------------------------------------------
def test_autoscaling_settings_are_checked_and_named():
    assert ExpertAutoscaling.from_args(None) is None
    with pytest.raises(ValueError, match="exactly one of target_rows_per_s and target_load_ratio"):
        ExpertAutoscaling.from_args({})
    with pytest.raises(ValueError, match=r"unknown expert_autoscaling keys \['target'\]"):
        ExpertAutoscaling.from_args({"target": 3})
    with pytest.raises(ValueError, match="expert_autoscaling.max_replicas must be an integer >= 2"):
        ExpertAutoscaling(min_replicas=2, max_replicas=1, target_rows_per_s=10)
    with pytest.raises(ValueError, match="expert_autoscaling.window_s must be a number >= 1"):
        ExpertAutoscaling(window_s=float("nan"), target_rows_per_s=10)
    with pytest.raises(ValueError, match="expert_autoscaling.target_load_ratio"):
        ExpertAutoscaling(target_load_ratio=-1)


@given(load=st.floats(0, 1e4), replicas=st.integers(1, 8), lo=st.integers(1, 3),
       span=st.integers(0, 5), target=st.floats(1, 1e3))
@example(load=3.0, replicas=1, lo=3, span=0, target=2.0)    # fewer running than min_replicas
def test_wanted_replicas_stay_in_bounds_and_never_flap(load, replicas, lo, span, target):
    policy = ExpertAutoscaling(min_replicas=lo, max_replicas=lo + span, target_rows_per_s=target)
    n = policy.wanted(load, 0.0, replicas)
    assert lo <= n <= lo + span
    if n > replicas:                               # up: the load did not fit, or below min
        assert load > target * replicas or n == lo
    if n < replicas and replicas <= lo + span:     # down: fits with headroom; no way back up
        assert load <= target * n * policy.downscale_headroom + 1e-6 or n == lo
        assert policy.wanted(load, 0.0, n) == n


class FakeScaler:
    def __init__(self, replicas: dict[int, int], room: int):
        self.counts, self.room, self.calls = dict(replicas), room, []

    def replicas(self):
        return dict(self.counts)

    def groups(self):
        return [(e,) for e in sorted(self.counts)]

    def set_expert_replicas(self, targets):
        self.calls.append(dict(targets))
        extra = sum(n - self.counts[e] for e, n in targets.items() if n > self.counts[e])
        if extra > self.room:
            raise PlacementError("no room")
        self.room -= extra
        self.room += sum(self.counts[e] - n for e, n in targets.items() if n < self.counts[e])
        self.counts.update(targets)
        return self.replicas()


def load_of(rates: list[float]) -> ExpertLoad:
    return ExpertLoad(10.0, tuple(rates), (tuple(rates),),
                      tuple(ActorLoad((e,), "n0", r, None) for e, r in enumerate(rates)))


def test_a_hot_expert_gains_replicas_as_far_as_there_is_room_then_sheds_them():
    clock = FakeClock()
    scaler = FakeScaler({e: 1 for e in range(E)}, room=2)
    rates = [800.0] + [100.0] * 7
    policy = ExpertAutoscaling(max_replicas=6, target_load_ratio=1.2, cooldown_s=30)
    auto = Autoscaler(policy, scaler, lambda: load_of(rates), clock)
    assert auto.tick() == {0: 3}                  # wanted 4 (800 / (1.2 x 187.5)), room for 2
    assert scaler.calls == [{0: 4}, {0: 3}]
    assert auto.tick() == {}                      # cooling down
    rates[0] = 0.0
    clock.now += 31
    assert auto.tick() == {0: 1}                  # the load went: back to min_replicas
    assert auto.decisions[-1]["replicas"] == {0: 1} and auto.decisions[-1]["load"][0] == 0.0


def test_victims_are_replicas_sharing_a_node_then_the_newest():
    members = [dataclasses.replace(_member(i), slot=Slot(node, {})) for i, node in
               enumerate(["a", "b", "b", "c"])]
    assert [m.actor for m in _victims(members, 1)] == [2]
    assert [m.actor for m in _victims(members, 3)] == [2, 1, 3]


def _member(i):
    from actors.experts.pool import Member
    return Member(i, (0,), Slot("a", {}), None)


def test_set_expert_replicas_checks_its_arguments_before_anything():
    class Pool:
        closed = False
        members = [_member(e) for e in range(E)]
        members = [dataclasses.replace(m, expert_ids=(e,)) for e, m in enumerate(members)]

        def groups(self):
            return {m.expert_ids: [m] for m in self.members}
    scaler = ExpertScaler(Pool(), apply=lambda experts: pytest.fail("applied"), num_experts=E)
    for bad, match in [({8: 2}, "expert id must be an int in \\[0, 8\\), got 8"),
                       ({0: 0}, "replicas of expert 0 must be an int >= 1, got 0"),
                       ({"0": 2}, "expert id must be an int"), ({1: 2.5}, "got 2.5")]:
        with pytest.raises(ValueError, match=match):
            scaler.set_expert_replicas(bad)
    assert scaler.set_expert_replicas({0: 1}) == {e: 1 for e in range(E)}    # no change
    Pool.closed = True
    with pytest.raises(RuntimeError, match="the engine is shut down"):
        scaler.set_expert_replicas({0: 2})


def test_a_call_through_an_actors_restart_waits_it_out_within_bounds(monkeypatch):
    """In Ray 2.60 a live-added actor killed mid-call fails that call, and every call while Ray
    restarts it, with ActorUnavailableError (each after ~1 s): the restart is waited out until
    RESTART_TIMEOUT_S after the first failure (a clean-clone run failed an addition: three
    quick retries all hit 'the actor is restarting'). An actor dead for good (ActorDiedError),
    a failed constructor and other errors surface at once or after RESTART_DEATHS."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

    import actors.experts.pool as pool
    clock = FakeClock()
    monkeypatch.setattr(pool, "time", types.SimpleNamespace(monotonic=clock, sleep=clock.sleep))
    restarting = ActorUnavailableError("The actor is restarting", None)

    def failing(errors, seconds_each=1.0):
        errors, calls = list(errors), []
        def call():
            calls.append(clock.now)
            clock.now += seconds_each
            if errors:
                raise errors.pop(0)
            return "warm"
        return call, calls
    call, calls = failing([restarting] * 100)                # a 150 s restart, then up
    assert pool.through_restarts(call, "warming up") == "warm" and len(calls) == 101
    wrapped = RayTaskError("set_experts", "traceback", restarting)   # through the frontend
    call, calls = failing([wrapped] * 5)
    assert pool.through_restarts(call, "being switched in") == "warm"
    call, calls = failing([restarting] * 10**6)              # a restart that never ends
    with pytest.raises(ActorUnavailableError):
        pool.through_restarts(call, "warming up")
    assert pool.RESTART_TIMEOUT_S <= calls[-1] - calls[0] <= pool.RESTART_TIMEOUT_S + 2
    call, calls = failing([ActorDiedError()] * 10)           # dead for good: soon
    with pytest.raises(ActorDiedError):
        pool.through_restarts(call, "warming up")
    assert len(calls) == pool.RESTART_DEATHS + 1
    init_failed = ActorDiedError(RayTaskError("__init__", "traceback", ValueError("bad weights")))
    for error in (init_failed, ValueError("not an actor's death")):
        call, calls = failing([error])
        with pytest.raises(type(error)):
            pool.through_restarts(call, "warming up")
        assert len(calls) == 1


def test_the_autoscaler_scales_a_group_of_experts_as_one():
    """experts_per_actor=2: the group follows its busiest id; one change per group, with a
    cooldown per group (scaling by id would flap: 0 hot asks up, 1 cold asks down)."""
    class GroupScaler(FakeScaler):
        def groups(self):
            return [(e, e + 1) for e in range(0, E, 2)]
    clock = FakeClock()
    scaler = GroupScaler({e: 1 for e in range(E)}, room=8)
    rates = [800.0, 0.0] + [100.0] * 6
    auto = Autoscaler(ExpertAutoscaling(max_replicas=4, target_load_ratio=1.5, cooldown_s=30),
                      scaler, lambda: load_of(rates), clock)
    assert auto.tick() == {0: 4, 1: 4} and scaler.calls == [{0: 4, 1: 4}]
    clock.now += 31
    assert auto.tick() == {} and scaler.counts[1] == 4     # no flapping back down


# ---- the biased router -----------------------------------------------------------------------
def test_a_hot_expert_checkpoint_routes_about_half_of_all_rows_to_it(tmp_path):
    from model.random_checkpoint import write_random
    path = write_random(PRESETS["tiny"], tmp_path, hot_expert=5)
    engine = Engine.from_pretrained(path)
    counts = collections.Counter()
    inner = engine.moe

    def moe(layer, x, weights, experts):
        counts.update(experts.flatten().tolist())
        return inner(layer, x, weights, experts)
    engine.moe = moe
    engine.generate(["Hello, my name is", "def fib(n):", "日本語"],
                    SamplingParams(max_tokens=8, temperature=0))
    total = sum(counts.values())
    assert counts[5] / total > 0.45 and max(n for e, n in counts.items() if e != 5) / total < 0.3


class _Fatal(BaseException):
    """Not an Exception: the autoscaler's per-decision handler lets it through."""


def test_an_autoscaler_thread_that_dies_says_so_in_the_log():
    """A handler of its own: Ray Serve's loggers may not propagate to caplog's."""
    def load():
        raise _Fatal("the policy thread cannot go on")
    auto = Autoscaler(ExpertAutoscaling(target_load_ratio=1.5, interval_s=0.1),
                      FakeScaler({e: 1 for e in range(E)}, room=0), load)
    logger, records = logging.getLogger("ray.serve.actors.experts.scaling"), []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        auto.start()
        auto._thread.join(10)
    finally:
        logger.removeHandler(handler)
    assert not auto._thread.is_alive()
    assert any("autoscaler: stopped" in r.getMessage() and r.exc_info for r in records)
