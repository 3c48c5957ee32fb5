"""ExpertFleet (actors/experts/fleet.py), the one owner of an engine's expert actors, over a
stand-in pool: no Ray. The pool itself is tested on a real cluster (tests/integration)."""
from __future__ import annotations

import pytest

import actors.experts.fleet as fleet_module
from actors.experts.fleet import ExpertFleet
from actors.experts.scaling import ExpertAutoscaling
from actors.options import EngineOptions
from model.checkpoint import WeightSource
from model.config import PRESETS


class Pool:
    """What ExpertFleet uses of an ExpertPool; `events` records the calls in order."""

    def __init__(self, events: list, fail_ready: Exception | None = None):
        self.events, self.fail_ready = events, fail_ready
        self.source = WeightSource(config=PRESETS["tiny"])
        self.members, self.closed = [], False

    def ready(self):
        self.events.append("ready")
        if self.fail_ready:
            raise self.fail_ready

    def shutdown(self):
        self.events.append("pool shutdown")
        self.closed = True


def test_a_failed_start_is_raised_once_the_actors_are_stopped():
    events = []
    fleet = ExpertFleet(Pool(events, fail_ready=RuntimeError("actor died loading")), None)
    with pytest.raises(RuntimeError, match="actor died loading"):
        fleet.attach(apply=lambda experts: None, load=lambda: None)
    assert events == ["ready", "pool shutdown"]
    assert fleet.scaler is None and fleet.autoscaler is None


def test_scaling_needs_an_attached_frontend():
    fleet = ExpertFleet(Pool([]), None)
    with pytest.raises(RuntimeError, match="no frontend is attached"):
        fleet.set_expert_replicas({0: 2})


def test_shutdown_stops_the_autoscaler_then_the_frontend_then_the_actors(monkeypatch):
    events = []

    class Autoscaler:
        def __init__(self, policy, scaler, load):
            self.scaler, self.load = scaler, load

        def start(self):
            events.append("autoscaler start")

        def stop(self):
            events.append("autoscaler stop")

    monkeypatch.setattr(fleet_module, "Autoscaler", Autoscaler)
    fleet = ExpertFleet(Pool(events), ExpertAutoscaling(target_load_ratio=1.5))
    load = object()
    fleet.attach(apply=lambda experts: None, load=lambda: load)
    assert fleet.autoscaler.load() is load and fleet.autoscaler.scaler is fleet.scaler

    def first():
        assert fleet.scaler.lock.locked()       # no scaling change runs meanwhile
        events.append("frontend killed")
    fleet.shutdown(first=first)
    assert events == ["ready", "autoscaler start", "autoscaler stop", "frontend killed",
                      "pool shutdown"]
    with pytest.raises(RuntimeError, match="shut down"):
        fleet.set_expert_replicas({0: 2})


def test_no_autoscaler_without_a_policy():
    fleet = ExpertFleet(Pool([]), None)
    fleet.attach(apply=lambda experts: None, load=lambda: None)
    assert fleet.autoscaler is None and fleet.scaler.replicas() == dict.fromkeys(range(8), 0)


@pytest.mark.parametrize("frontend_bundle, frontend", [(False, None), (True, {"CPU": 0.01})])
def test_start_passes_the_options_and_a_frontend_bundle_only_when_asked(monkeypatch,
                                                                        frontend_bundle, frontend):
    calls = []
    monkeypatch.setattr(fleet_module.ExpertPool, "start",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or Pool([]))
    options = EngineOptions(expert_replicas=2, experts_per_actor=4, expert_threads=1,
                            expert_autoscaling={"target_rows_per_s": 10.0},
                            engine_args={"max_num_batched_tokens": 96})
    fleet = ExpertFleet.start(WeightSource(config=PRESETS["tiny"]), options,
                              frontend_bundle=frontend_bundle)
    [(args, kwargs)] = calls
    assert args[1:] == ("auto", "cpu")
    assert kwargs == {"expert_replicas": 2, "experts_per_actor": 4, "expert_resources": None,
                      "frontend_resources": frontend, "expert_threads": 1,
                      "placement_timeout_s": 60.0, "max_num_batched_tokens": 96,
                      "prefix": None, "secret": None}
    assert fleet.policy == ExpertAutoscaling(target_rows_per_s=10.0)


def test_start_checks_auto_dtype_against_the_checkpoint_before_anything_starts(
        monkeypatch, tmp_path):
    monkeypatch.setattr(fleet_module.ExpertPool, "start",
                        lambda *a, **k: pytest.fail("started with a bad dtype"))
    (tmp_path / "config.json").write_text('{"torch_dtype": "float8_e4m3fn"}')
    with pytest.raises(ValueError, match="torch_dtype 'float8_e4m3fn'"):
        ExpertFleet.start(WeightSource(path=str(tmp_path)), EngineOptions())
