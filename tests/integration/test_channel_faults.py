"""The channel transport on the real local cluster: an expert actor that dies in the middle of a
layer call, one whose channel thread dies, one that dies on every call, several clients watching
one actor, the secret, and an idle engine's CPU use."""
from __future__ import annotations

import gc
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from actors.experts.channel import ChannelTransport, PeerLost
from actors.experts.channel_server import CallBound, ChannelServer
from actors.experts.dispatcher import Dispatcher, ExpertCallError
from actors.experts.worker import ACTOR_OPTIONS, ExpertWorker
from model.checkpoint import WeightSource
from model.config import MixtralConfig
from model.engine import SamplingParams
from model.mixtral import expert_names
from model.moe import LocalExperts, route

# the test actors below are defined here: ship them by value (workers cannot import this file)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ONCE = dict(ACTOR_OPTIONS, max_restarts=0)          # an expert actor that stays dead


class _DiesOnceMidCall(ExpertWorker):
    """An expert actor that kills its own process inside its first channel call of layer 1."""

    def __init__(self, source, expert_ids, marker: str):
        super().__init__(source, expert_ids, threads=1)
        self._marker = marker

    def compute(self, layer, x, counts):
        if layer == 1 and not os.path.exists(self._marker):
            Path(self._marker).touch()
            self._die()
        return super().compute(layer, x, counts)

    def _die(self):
        os._exit(1)


def _actors(cls, path, *args):
    remote = ray.remote(**ACTOR_OPTIONS)(cls)
    return [remote.options(resources={"expert": 1}, num_cpus=0.01).remote(
        WeightSource(path=str(path)), [e], *args) for e in range(8)]


def test_an_actor_dying_mid_layer_call_is_resent_with_the_same_result(ray_cluster, tiny_checkpoint,
                                                                      tmp_path):
    cfg = MixtralConfig.from_json(tiny_checkpoint)
    source = WeightSource(path=str(tiny_checkpoint))
    local = LocalExperts.from_tensors(cfg, source.load(
        expert_names(cfg, list(range(cfg.num_local_experts))), torch.float32, "cpu"))
    actors = _actors(_DiesOnceMidCall, tiny_checkpoint, str(tmp_path / "died"))
    dispatcher = Dispatcher(actors, [[e] for e in range(8)], 8,
                            ChannelTransport(secrets.token_hex(16)))
    x = torch.randn(32, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    gate = torch.randn(8, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    weights, experts = route(x, gate, 2)
    try:
        for layer in range(cfg.num_hidden_layers):
            want = local.moe(layer, x, weights, experts)
            got = dispatcher.moe(layer, x, weights, experts)
            assert (got - want).abs().max().item() < 1e-5
        assert (tmp_path / "died").exists() and dispatcher.retries > 0
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


class _Fatal(BaseException):
    """Not an Exception: it passes every handler on its way out of the channel's thread."""


class _ThreadDiesOnce(_DiesOnceMidCall):
    """An expert actor whose channel thread dies in its first call of layer 1 (an unexpected
    error out of its serving loop) while the process lives on."""

    def _die(self):
        raise _Fatal("the channel's serving loop cannot go on")


def test_an_actor_whose_channel_thread_dies_is_restarted_and_answers(ray_cluster, tiny_checkpoint,
                                                                     tmp_path):
    """The dead thread ends the process (the channel's on_death), so the actor fails its
    liveness at once: the call is re-sent to the restarted actor (before: the actor lived on
    deaf, each call waited out the reply timeout and the layer failed)."""
    cfg = MixtralConfig.from_json(tiny_checkpoint)
    source = WeightSource(path=str(tiny_checkpoint))
    every = list(range(cfg.num_local_experts))
    local = LocalExperts.from_tensors(cfg, source.load(expert_names(cfg, every), torch.float32,
                                                       "cpu"))
    actor = ray.remote(**ACTOR_OPTIONS)(_ThreadDiesOnce).options(
        resources={"expert": 1}, num_cpus=0.01).remote(
        source, every, str(tmp_path / "died"))
    dispatcher = Dispatcher([actor], [every], len(every),
                            ChannelTransport(secrets.token_hex(16), timeout_s=30.0),
                            retry_timeout_s=60)
    x = torch.randn(16, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    gate = torch.randn(len(every), cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    weights, experts = route(x, gate, 2)
    try:
        pid = ray.get(actor.info.remote(), timeout=120).pid
        for layer in range(cfg.num_hidden_layers):
            got = dispatcher.moe(layer, x, weights, experts)
            assert (got - local.moe(layer, x, weights, experts)).abs().max().item() < 1e-5
        assert (tmp_path / "died").exists() and dispatcher.retries > 0
        assert ray.get(actor.info.remote(), timeout=60).pid != pid          # restarted
    finally:
        ray.kill(actor, no_restart=True)


@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=4, num_cpus=0.01)
class _DiesOnEveryChannelCall:
    def open_channel(self, secret):
        self.server = ChannelServer(lambda *_: os._exit(1), ray.util.get_node_ip_address(), secret,
                                    CallBound(4, 8, torch.float32, 2))
        return self.server.endpoint

    def until_stopped(self, client="", max_s=60.0):
        threading.Event().wait(max_s)


def test_a_channel_call_that_kills_its_actor_every_time_fails_bounded(ray_cluster):
    actor = _DiesOnEveryChannelCall.remote()
    dispatcher = Dispatcher([actor], [[0, 1]], 2, ChannelTransport(secrets.token_hex(16)),
                            max_attempts=3, retry_timeout_s=60)
    start = time.monotonic()
    # the last attempt finds the actor dead (PeerLost) or, on a loaded machine, still restarting
    with pytest.raises(ExpertCallError, match=r"still failing after 3 attempts "
                                              r"\((PeerLost|ActorUnavailableError)\)"):
        dispatcher.moe(0, torch.randn(4, 8), torch.ones(4, 1),
                       torch.tensor([[0], [1], [0], [1]]))
    assert time.monotonic() - start < 60
    ray.kill(actor, no_restart=True)


def test_replies_read_ahead_wait_for_their_call_and_go_with_an_abandoned_one(ray_cluster,
                                                                             tiny_checkpoint):
    """Two calls in flight to one actor (the two micro-batches'): receiving the second first
    keeps the first's reply for it; a call never received (its step failed) leaves nothing
    behind, whether its reply was read ahead or arrives later."""
    cfg = MixtralConfig.from_json(tiny_checkpoint)
    source = WeightSource(path=str(tiny_checkpoint))
    local = LocalExperts.from_tensors(
        cfg, source.load(expert_names(cfg, [0]), torch.float32, "cpu"), [0])
    actor = ray.remote(**ONCE)(ExpertWorker).options(
        resources={"expert": 1}, num_cpus=0.01).remote(source, [0])
    transport = ChannelTransport(secrets.token_hex(16))
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, cfg.hidden_size, generator=gen) for n in (3, 5)]

    def send(x):
        return transport.send(0, [(actor, x, [x.shape[0]])])

    def check(sent, x):
        (y, _), = transport.receive(sent)
        assert (y - local.compute(0, 0, x)).abs().max().item() < 1e-5

    try:
        first, second = send(xs[0]), send(xs[1])
        check(second, xs[1])
        assert len(transport._early) == 1               # the first's reply, read ahead
        check(first, xs[0])
        third, fourth = send(xs[0]), send(xs[1])
        check(fourth, xs[1])
        del third                                       # abandoned with its reply read ahead
        gc.collect()
        fifth, sixth = send(xs[0]), send(xs[1])
        del fifth                                       # abandoned before its reply came
        check(sixth, xs[1])
        assert transport._early == {} and transport._awaited == set()
    finally:
        transport.close()
        ray.kill(actor, no_restart=True)


def test_reconnecting_clients_never_tie_up_an_actors_threads(ray_cluster, tiny_checkpoint):
    """A client that closes an actor's channel and opens it again (a retried switch-in:
    Frontend.set_experts_now) starts a new until_stopped call, which ends its own older one:
    more reconnects than the actor has threads (max_concurrency=4) leave it answering. A
    superseded call does not make its client take the live actor for dead; it sees it die."""
    source = WeightSource(path=str(tiny_checkpoint))
    actor = ray.remote(**ONCE)(ExpertWorker).options(
        resources={"expert": 1}, num_cpus=0.01).remote(source, [0])
    key, secret = actor._actor_id.hex(), secrets.token_hex(16)
    first, later = ChannelTransport(secret), ChannelTransport(secret)
    x = torch.randn(3, MixtralConfig.from_json(tiny_checkpoint).hidden_size)

    def reconnect():
        first.connect(actor)
        for _ in range(6):
            later.connect(actor)
            later.disconnect(actor)
        later.connect(actor)
    try:
        ray.get(actor.info.remote(), timeout=120)       # started (slow on loaded cores)
        thread = threading.Thread(target=reconnect, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "reconnecting hung: the actor's threads are all taken"
        assert list(ray.get(actor.info.remote(), timeout=30).expert_ids) == [0]
        for transport in (first, later):
            (y, _), = transport.receive(transport.send(0, [(actor, x, [3])]))
            assert y.shape == x.shape and not transport._dead(key)
        ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + 30
        while not later._dead(key):
            assert time.monotonic() < deadline, "the newest client never saw the actor die"
            time.sleep(0.1)
    finally:
        first.close()
        later.close()
        ray.kill(actor, no_restart=True)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_every_client_watching_an_actor_sees_it_die(ray_cluster, tiny_checkpoint):
    """Eight clients (frontends sharing a pool) watch one actor: none ends another's watch
    (before, each new client's until_stopped ended the others', which then took the dead actor
    for a slow one and waited out the 30 s reply timeout); their blocked watches leave info()
    answering (a thread group of their own, not the 4 of info/compute); a watch that expired
    (watch_s) is re-armed, not taken for "alive forever". After the actor dies every client's
    call fails with PeerLost within a few poll periods."""
    source = WeightSource(path=str(tiny_checkpoint))
    actor = ray.remote(**ONCE)(ExpertWorker).options(
        resources={"expert": 1}, num_cpus=0.01).remote(source, [0])
    key, secret = actor._actor_id.hex(), secrets.token_hex(16)
    clients = [ChannelTransport(secret, watch_s=1.0 if i == 0 else 60.0) for i in range(8)]
    x = torch.randn(3, MixtralConfig.from_json(tiny_checkpoint).hidden_size)
    try:
        pid = ray.get(actor.info.remote(), timeout=120).pid     # started (slow on loaded cores)
        for client in clients:
            client.connect(actor)
        time.sleep(2.5)                                 # client 0's first watch expired
        assert list(ray.get(actor.info.remote(), timeout=30).expert_ids) == [0]
        for client in clients:
            (y, _), = client.receive(client.send(0, [(actor, x, [3])]))
            assert y.shape == x.shape and not client._dead(key)
        os.kill(pid, signal.SIGKILL)                    # it crashes (no restart: ONCE)
        while Path(f"/proc/{pid}/status").exists() and "zombie" not in \
                Path(f"/proc/{pid}/status").read_text():
            time.sleep(0.05)
        start = time.monotonic()
        for client in clients:
            lost, = client.receive(client.send(1, [(actor, x, [3])]))
            assert isinstance(lost, PeerLost) and "died" in str(lost), lost
        assert time.monotonic() - start < 15, "a client waited for its reply timeout"
    finally:
        for client in clients:
            client.close()
        ray.kill(actor, no_restart=True)


def test_opening_a_channel_with_another_secret_is_refused(tiny_ray_engine):
    engine = tiny_ray_engine
    engine.generate("hello", SamplingParams(max_tokens=2))        # the channels are open
    with pytest.raises(ray.exceptions.RayTaskError, match="wrong secret"):
        ray.get(engine.experts[0].open_channel.remote("not-the-engine-secret"))


def _cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])              # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


@ray.remote(num_cpus=0.01)
class _Idle:
    def pid(self):
        return os.getpid()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_an_idle_engine_burns_no_cpu(tiny_ray_engine):
    """No busy polling: idle for 10 s, the engine's actors use no more CPU than as many idle
    plain Ray actors, plus 5% of one core (measured side by side)."""
    engine = tiny_ray_engine
    free = ray.available_resources().get("expert", 0)
    plain = [_Idle.options(resources={"expert": 1}).remote()
             for _ in range(len(engine.experts) + 1)]
    try:
        engine.generate("hello", SamplingParams(max_tokens=4))        # channels open, then idle
        ours = [w.pid for w in engine.expert_info()] + [engine.frontend_info().pid]
        theirs = ray.get([a.pid.remote() for a in plain])
        time.sleep(1.0)
        before = _cpu_seconds(ours), _cpu_seconds(theirs)
        time.sleep(10.0)
        used = _cpu_seconds(ours) - before[0], _cpu_seconds(theirs) - before[1]
        assert used[0] <= used[1] + 0.05 * 10.0, f"engine {used[0]:.2f} s vs plain {used[1]:.2f} s"
    finally:
        for actor in plain:
            ray.kill(actor)
        # slots come back asynchronously: free again for the next test, which may count them
        deadline = time.monotonic() + 60
        while ray.available_resources().get("expert", 0) < free and time.monotonic() < deadline:
            time.sleep(0.2)
