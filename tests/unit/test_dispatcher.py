"""The dispatcher with an in-process transport (no Ray): real ExpertWorkers (LocalExperts inside)
compute the rows, so the results must equal LocalExperts.moe; failures are real Ray exception
instances; a fake clock makes backoff and the time bound exact."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.exceptions import ActorDiedError, ActorUnavailableError

from actors.experts.dispatcher import Dispatcher, ExpertCallError
from actors.experts.worker import ExpertWorker
from model.checkpoint import WeightSource
from model.config import PRESETS
from model.mixtral import expert_names
from model.moe import LocalExperts, group_by_expert, route

CFG = PRESETS["tiny"]
SOURCE = WeightSource(config=CFG, seed=3)
E = CFG.num_local_experts


class FakeActor:
    """An expert actor in this process: raises the queued failures first, then computes."""

    def __init__(self, expert_ids: list[int], failures: list[Exception] = ()):
        self.expert_ids = list(expert_ids)
        self.worker = ExpertWorker(SOURCE, expert_ids)
        self.failures = list(failures)
        self.calls: list[list[int]] = []          # counts of every call it received

    def compute(self, layer: int, x: torch.Tensor, counts: list[int]):
        self.calls.append(list(counts))
        if self.failures:
            raise self.failures.pop(0)
        return self.worker.compute(layer, x, counts)


def in_process_transport(layer, requests):
    """What ObjectRefTransport does, without Ray: a failure is returned, not raised."""
    results = []
    for actor, x, counts in requests:
        try:
            results.append(actor.compute(layer, x, counts))
        except Exception as e:  # noqa: BLE001 - classified by the dispatcher
            results.append(e)
    return results


class FakeClock:
    def __init__(self):
        self.now, self.sleeps = 1000.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture(scope="module")
def reference() -> LocalExperts:
    tensors = SOURCE.load(expert_names(CFG, range(E)), torch.float32)
    return LocalExperts.from_tensors(CFG, tensors)


def routed(rows: int = 23, seed: int = 0):
    """x (rows, D) and its top-2 routing over a random gate: (x, weights, experts)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, CFG.hidden_size, generator=gen)
    gate = torch.randn(E, CFG.hidden_size, generator=gen)
    return (x, *route(x, gate, CFG.num_experts_per_tok))


def dispatcher(layout: list[list[int]], failures: dict[int, list[Exception]] | None = None,
               **kwargs) -> tuple[Dispatcher, list[FakeActor], FakeClock]:
    actors = [FakeActor(ids, (failures or {}).get(a, [])) for a, ids in enumerate(layout)]
    clock = FakeClock()
    d = Dispatcher(actors, layout, E, transport=in_process_transport, clock=clock,
                   sleep=clock.sleep, **kwargs)
    return d, actors, clock


LAYOUTS = {
    "one expert each": [[e] for e in range(E)],
    "two each": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "two each, own order descending": [[1, 0], [3, 2], [5, 4], [7, 6]],
    "uneven, shuffled": [[5, 0, 3], [7], [6, 1, 2, 4]],
    "two replicas": [[e] for e in range(E)] * 2,
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_results_equal_local_experts(reference, layout):
    d, actors, _ = dispatcher(layout)
    for layer in range(CFG.num_hidden_layers):
        x, weights, experts = routed(seed=layer)
        got = d.moe(layer, x, weights, experts)
        torch.testing.assert_close(got, reference.moe(layer, x, weights, experts))
    assert all(1 <= len(a.calls) <= CFG.num_hidden_layers for a in actors)  # <= 1 per layer


def test_an_actor_gets_its_rows_in_its_own_expert_order():
    d, actors, _ = dispatcher([[2, 0], [1], [3, 4, 5, 6, 7]])
    x, weights, experts = routed()
    d.moe(0, x, weights, experts)
    per_expert = torch.bincount(experts.flatten(), minlength=E).tolist()
    assert actors[0].calls == [[per_expert[2], per_expert[0]]]
    assert actors[2].calls == [per_expert[3:]]


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), ValueError("bad shape"),
                                   AssertionError("x must be (n, 64)")])
def test_a_non_retriable_error_fails_at_once(error):
    d, actors, clock = dispatcher([[e] for e in range(E)] * 2, failures={0: [error]})
    with pytest.raises(ExpertCallError, match=r"layer 1: experts \[0\] failed") as raised:
        d.moe(1, *routed())
    assert raised.value.__cause__ is error
    assert all(len(a.calls) <= 1 for a in actors)               # one round: nothing re-sent
    assert clock.sleeps == [] and d.retries == 0


@pytest.mark.parametrize("error", [ActorDiedError(), ActorUnavailableError("restarting", None)])
def test_a_retriable_error_is_resent_to_a_healthy_replica(reference, error):
    layout = [[0, 1], [2, 3], [4, 5], [6, 7]] * 2              # actor a + 4 holds what a holds
    d, actors, clock = dispatcher(layout, failures={1: [error]})
    x, weights, experts = routed()
    torch.testing.assert_close(d.moe(0, x, weights, experts), reference.moe(0, x, weights, experts))
    # the replica got its own half of the rows, then the failed actor's half again
    assert len(actors[1].calls) == 1 and actors[5].calls[1:] == actors[1].calls
    assert clock.sleeps == [] and d.retries == 1                  # a replica: no backoff
    d.moe(1, x, weights, experts)                                 # within the cooldown
    assert len(actors[1].calls) == 1, "a failed actor got work during its cooldown"


def test_the_only_holder_is_retried_with_backoff_until_it_answers(reference):
    d, actors, clock = dispatcher([[e] for e in range(E)],
                                  failures={4: [ActorUnavailableError("restarting", None)] * 3})
    x, weights, experts = routed()
    torch.testing.assert_close(d.moe(0, x, weights, experts), reference.moe(0, x, weights, experts))
    assert clock.sleeps == [0.5, 1.0, 2.0] and len(actors[4].calls) == 4


def test_attempts_are_bounded():
    d, actors, clock = dispatcher([[e] for e in range(E)], max_attempts=4, retry_timeout_s=1e6,
                                  failures={2: [ActorDiedError()] * 100})
    with pytest.raises(ExpertCallError, match=r"experts \[2\] still failing after 4 attempts"):
        d.moe(0, *routed())
    assert len(actors[2].calls) == 4 and clock.sleeps == [0.5, 1.0, 2.0]


def test_time_is_bounded():
    d, actors, clock = dispatcher([[e] for e in range(E)], max_attempts=100, retry_timeout_s=3.0,
                                  failures={2: [ActorDiedError()] * 100})
    start = clock.now
    with pytest.raises(ExpertCallError, match=r"experts \[2\] still failing after 4 attempts"):
        d.moe(0, *routed())
    assert clock.sleeps == [0.5, 1.0, 1.5] and clock.now - start == 3.0


def test_every_expert_needs_an_actor():
    with pytest.raises(ValueError, match=r"no actor holds expert\(s\) \[3\]"):
        Dispatcher([object()] * 2, [[0, 1, 2], [4, 5, 6, 7]], E)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 12), top_k=st.integers(1, 3), experts=st.integers(3, 8),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_combine_equals_a_weighted_scatter_add(rows, top_k, experts, bf16, seed):
    """ExpertGroups.combine (un-sort, sum each row's slots) against index_add_ of weight * y,
    with experts that get no rows; the same bits for top_k <= 2, rounding beyond."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(rows)])
    weights = torch.rand(rows, top_k, generator=gen).to(dtype)
    groups = group_by_expert(weights, ids, experts)
    assert sum(groups.counts) == rows * top_k and len(groups.counts) == experts
    y = torch.randn(rows * top_k, 16, generator=gen).to(dtype)       # one output per sorted pair
    flat_weights = weights.flatten()[groups.order]
    want = torch.zeros(rows, 16, dtype=dtype).index_add_(0, groups.rows, y * flat_weights[:, None])
    got = groups.combine(y, rows)
    if top_k <= 2:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want)
