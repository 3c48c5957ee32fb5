"""RayEngine (frontend actor + expert actors + dispatcher) on a real local multi-node Ray
cluster equals the in-process Engine; placement, per-actor bytes, faults, impossible plans."""
from __future__ import annotations

import asyncio
import collections
import os
import signal
import time

import pytest
import ray
import torch

from actors.experts.dispatcher import Dispatcher, ExpertCallError
from cluster.plan import PlacementError
from model.config import MixtralConfig
from model.engine import Engine, SamplingParams
from model.mixtral import expert_names, non_expert_names, tensor_shapes
from tests.choices import ONE_ENDS_EARLY, Choices, assert_same_choices

PROMPTS = ["Hello, my name is", "The capital of France is", "def fib(n):\n    return",
           "Once upon a time there was a very long prompt about experts and routers " * 3, "日本語"]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def assert_same_as_in_process(engine, reference: Engine) -> None:
    ids = [reference.tokenizer.encode(p) for p in PROMPTS]
    for got, want in zip(engine.logits(ids), reference.logits(ids)):
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    assert ([o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
            == [o.token_ids for o in reference.generate(PROMPTS, GREEDY)])


def test_default_engine_equals_in_process_engine(tiny_ray_engine, tiny_checkpoint):
    """The defaults: tiny, 1 replica, channel transport, 1 expert per actor, 1 micro-batch."""
    assert_same_as_in_process(tiny_ray_engine, Engine.from_pretrained(tiny_checkpoint))


@pytest.mark.parametrize("which, replicas, transport, experts_per_actor, micro_batches", [
    ("tiny", 2, "channel", 1, 1), ("tiny", 1, "channel", 4, 1),
    ("tiny", 2, "channel", 4, 2), ("small", 1, "channel", 1, 1), ("small", 2, "channel", 1, 2),
    ("tiny", 1, "object_refs", 1, 1), ("small", 1, "object_refs", 1, 2)])
def test_equals_in_process_engine(ray_engine, tiny_checkpoint, small_checkpoint, which, replicas,
                                  transport, experts_per_actor, micro_batches):
    path = tiny_checkpoint if which == "tiny" else small_checkpoint
    engine = ray_engine(path, replicas, transport=transport, experts_per_actor=experts_per_actor,
                        engine_args={"micro_batches": micro_batches})
    try:
        assert_same_as_in_process(engine, Engine.from_pretrained(path))
        if replicas == 2:
            placement = engine.placement()["experts"]
            assert all(len(set(nodes)) == 2 for nodes in placement.values()), placement
    finally:
        engine.shutdown()


def test_experts_spread_over_the_expert_nodes(ray_cluster, tiny_ray_engine, tiny_checkpoint):
    head = ray_cluster.head_node.node_id
    expert_nodes = {n.node_id for n in ray_cluster.worker_nodes}
    placement = tiny_ray_engine.placement()
    assert placement["frontend"] == head
    per_node = collections.Counter(nodes[0] for nodes in placement["experts"].values())
    assert set(per_node) == expert_nodes and sorted(per_node.values()) == [2, 3, 3]
    assert sorted(placement["experts"]) == list(range(8))
    assert_same_as_in_process(tiny_ray_engine, Engine.from_pretrained(tiny_checkpoint))


def assert_each_actor_reads_and_holds_only_its_own(engine, cfg: MixtralConfig) -> None:
    """Every tensor an actor's process read from the checkpoint, and every one it keeps, is its
    own: its experts' w1/w2/w3 of every layer, or (frontend) everything but the experts."""
    per_expert = cfg.num_hidden_layers * 3 * cfg.hidden_size * cfg.intermediate_size * 4
    workers = engine.expert_info()
    assert [list(w.expert_ids) for w in workers] == engine.actor_experts
    for ids, worker in zip(engine.actor_experts, workers):
        own = set(expert_names(cfg, ids))
        assert worker.read == own, f"actor {ids} read {sorted(worker.read - own)[:3]}..."
        assert worker.kept == own and worker.nbytes == per_expert * len(ids)
    front = engine.frontend_info()
    assert front.read == set(non_expert_names(cfg)) == front.kept
    shapes = tensor_shapes(cfg)
    assert front.nbytes == sum(torch.Size(shapes[n]).numel() * 4 for n in non_expert_names(cfg))


def test_each_actor_holds_only_its_own_bytes(tiny_ray_engine, tiny_checkpoint):
    assert_each_actor_reads_and_holds_only_its_own(tiny_ray_engine,
                                                   MixtralConfig.from_json(tiny_checkpoint))


def test_threads_and_openmp_spin_are_set_per_process(ray_cluster, tiny_checkpoint, monkeypatch):
    """The frontend gets every core and a short OpenMP spin (actors/experts/pool.py:
    FRONTEND_CPU_ENV), so its idle threads leave the cores to its experts; the experts get what
    they are told."""
    from actors import RayEngine
    from cluster.local import EXPERT_SLOT, FRONTEND_SLOT
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    engine = RayEngine.from_pretrained(tiny_checkpoint, expert_resources=EXPERT_SLOT,
                                       frontend_resources=FRONTEND_SLOT, expert_threads=2)
    try:
        front = engine.frontend_info()
        assert front.threads == len(os.sched_getaffinity(0))
        assert front.env.get("GOMP_SPINCOUNT") == "30000"
        assert all(w.threads == 2 and "GOMP_SPINCOUNT" not in w.env for w in engine.expert_info())
    finally:
        engine.shutdown()


def test_leaving_a_stream_of_n_choices_frees_every_one(tiny_ray_engine):
    """A caller that stops reading RayEngine.stream once one of n = 4 choices finished (the
    others mid-way, one 1,500+ tokens from its end) cancels them all: within seconds the
    frontend holds no request and every KV block is free."""
    params = SamplingParams(max_tokens=4000, **ONE_ENDS_EARLY)

    async def leave_once_a_choice_finished() -> set[int]:
        seen, chunks = set(), tiny_ray_engine.stream("Once", params)
        async for chunk in chunks:
            seen.add(chunk.index)
            if chunk.finish_reason is not None:
                break
        await chunks.aclose()
        return seen

    assert len(asyncio.run(leave_once_a_choice_finished())) > 1   # others had begun
    deadline = time.monotonic() + 10
    while (info := tiny_ray_engine.info()).tracked_requests or \
            info.free_blocks != info.total_blocks:
        assert time.monotonic() < deadline, f"still held: {info}"
        time.sleep(0.25)


@pytest.mark.parametrize("field, value", [("transport", "bogus"), ("dtype", "fp8"),
                                          ("expert_threads", 0)])
def test_bad_arguments_fail_before_any_actor_starts(ray_cluster, tiny_checkpoint, alive_actors,
                                                    field, value):
    from actors import RayEngine
    before = {a["ActorID"] for a in alive_actors()}
    with pytest.raises(ValueError, match=field):
        RayEngine.from_pretrained(tiny_checkpoint, **{field: value})
    assert {a["ActorID"] for a in alive_actors()} == before


def test_actors_of_two_experts_equal_the_in_process_engine(ray_engine, tiny_checkpoint):
    engine = ray_engine(tiny_checkpoint, experts_per_actor=2)
    try:
        assert engine.actor_experts == [[0, 1], [2, 3], [4, 5], [6, 7]]
        assert_same_as_in_process(engine, Engine.from_pretrained(tiny_checkpoint))
        assert_each_actor_reads_and_holds_only_its_own(
            engine, MixtralConfig.from_json(tiny_checkpoint))
        placement = engine.placement()["experts"]
        assert all(placement[e] == placement[e + 1] for e in range(0, 8, 2)), placement
    finally:
        engine.shutdown()


@pytest.mark.parametrize("transport, micro_batches", [("channel", 1), ("channel", 2),
                                                       ("object_refs", 1)])
def test_killing_an_expert_actor_mid_generation_loses_nothing(ray_engine, tiny_checkpoint,
                                                              transport, micro_batches):
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids
                for o in Engine.from_pretrained(tiny_checkpoint).generate(PROMPTS, params)]
    engine = ray_engine(tiny_checkpoint, transport=transport,
                        engine_args={"micro_batches": micro_batches})
    victim = engine.expert_info()[3].pid

    async def run():
        async def collect(prompt, kill_after=None):
            ids = []
            async for chunk in engine.stream(prompt, params):
                ids += chunk.token_ids
                if kill_after is not None and len(ids) == kill_after:
                    os.kill(victim, signal.SIGKILL)
            return ids
        return await asyncio.gather(collect(PROMPTS[0], kill_after=5),
                                    *(collect(p) for p in PROMPTS[1:]))

    try:
        got = asyncio.run(run())
        assert got == expected
        assert engine.info().retries > 0
        assert engine.expert_info()[3].pid != victim        # Ray restarted it
    finally:
        engine.shutdown()


def test_impossible_plans_fail_fast_with_a_clear_message(ray_engine, tiny_checkpoint):
    start = time.monotonic()
    with pytest.raises(PlacementError, match=r"8 experts x 4 replica\(s\)"):
        ray_engine(tiny_checkpoint, replicas=4)
    with pytest.raises(PlacementError, match=r"GPU"):
        from actors import RayEngine
        RayEngine.from_pretrained(tiny_checkpoint, device="cuda")
    assert time.monotonic() - start < 30


@ray.remote(max_restarts=-1, max_task_retries=0, num_cpus=0.01)
class _DiesOnEveryCall:
    def compute(self, layer, x, counts):
        os._exit(1)


def test_a_call_that_kills_its_actor_every_time_fails_bounded(ray_cluster):
    actor = _DiesOnEveryCall.remote()
    dispatcher = Dispatcher([actor], [[0, 1]], 2, max_attempts=3, retry_timeout_s=30)
    x = torch.randn(4, 8)
    weights = torch.full((4, 1), 1.0)
    experts = torch.tensor([[0], [1], [0], [1]])
    start = time.monotonic()
    with pytest.raises(ExpertCallError,
                       match=r"layer 0: experts \[0, 1\] still failing after 3 attempts"):
        dispatcher.moe(0, x, weights, experts)
    assert time.monotonic() - start < 30
    ray.kill(actor, no_restart=True)


def test_from_config_builds_random_weights_inside_the_actors(ray_cluster):
    from actors import RayEngine
    from cluster.local import EXPERT_SLOT, FRONTEND_SLOT
    engine = RayEngine.from_config("tiny", seed=5, expert_resources=EXPERT_SLOT,
                                   frontend_resources=FRONTEND_SLOT)
    try:
        assert_same_as_in_process(engine, Engine.from_config("tiny", seed=5))
    finally:
        engine.shutdown()


def test_killing_the_frontend_actor_loses_no_request(ray_engine, tiny_checkpoint):
    """SIGKILL RayEngine's frontend actor (its KV cache and requests go with it) while 10
    streams (greedy and seeded; n = 3 seeded choices with top and prompt logprobs, n = 2 greedy
    ones with top logprobs) and a generate call run: Ray restarts it in its bundle, and every
    stream resumes there as prompt + tokens so far, per unfinished choice, and ends exactly as
    undisturbed (each choice's tokens, text, top-logprob ids and prompt logprobs, sent once;
    logprobs within tests/choices.py's tolerance); generate runs again with the same outputs."""
    engine = ray_engine(tiny_checkpoint)
    params = [SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=48, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=48, temperature=1.0, top_k=40, seed=-3, stop=("zz",))]
    choices = [SamplingParams(max_tokens=48, temperature=0.9, seed=11, n=3, top_logprobs=3,
                              prompt_logprobs=2, ignore_eos=True),
               SamplingParams(max_tokens=48, temperature=0.0, n=2, top_logprobs=3,
                              ignore_eos=True)]
    jobs = ([(PROMPTS[i % len(PROMPTS)], params[i % len(params)]) for i in range(8)]
            + [(PROMPTS[1], choices[0]), (PROMPTS[2], choices[1])])

    async def run(kill: bool):
        started = asyncio.Event()
        counts = [0] * len(jobs)

        async def one(i, prompt, p):
            got = Choices()
            async for chunk in engine.stream(prompt, p):
                got.add(chunk.index, chunk.token_ids, chunk.text, chunk.logprobs,
                        chunk.top_logprobs, chunk.prompt_logprobs)
                counts[i] += 1
                if min(counts) >= 3:
                    started.set()
            return got

        batch = asyncio.to_thread(engine.generate, PROMPTS, params[1])
        tasks = [asyncio.ensure_future(one(i, *job)) for i, job in enumerate(jobs)]
        if kill:
            await asyncio.wait_for(started.wait(), 120)
            os.kill(engine.frontend_info().pid, signal.SIGKILL)
        return await asyncio.gather(*tasks), [c.token_ids for c in await batch]

    try:
        before = engine.frontend_info().pid
        undisturbed, undisturbed_batch = asyncio.run(run(kill=False))
        assert [len(got) for got in undisturbed[-2:]] == [3, 2]
        assert all(len(c.top) == 48 for got in undisturbed[-2:] for c in got.values())
        assert all(len(c.prompt) == 1 for c in undisturbed[-2].values())    # once per choice
        killed, killed_batch = asyncio.run(run(kill=True))
        for i, (got, want) in enumerate(zip(killed, undisturbed, strict=True)):
            assert_same_choices(got, want, f"job {i}")
        assert killed_batch == undisturbed_batch
        assert engine.frontend_info().pid != before          # it was restarted
    finally:
        engine.shutdown()
