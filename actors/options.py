"""EngineOptions: every option of an expert-parallel engine, declared once.

    RayEngine.from_pretrained(path, dtype="bfloat16", device="cuda", expert_replicas=2)
    serve run deploy.app:build_app model=DIR dtype=bfloat16 device=cuda expert_replicas=2
    python -m actors.options           # prints each option: type, default, meaning

RayEngine (actors/engine.py), the engine deployment (actors/serving/engine_server.py) and the
Serve application's args (deploy/app.py) all take these fields by these names. A bad value is a
ValueError naming the field and what it must be, raised when the options are built: before
anything starts. A Serve application's args may be typed (a YAML config) or strings (the
`serve run` command line); `EngineOptions.from_args` parses a string by its field's type.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from actors.experts.dispatcher import Dispatcher
from actors.experts.pool import default_resources, frontend_runtime_env
from actors.experts.scaling import ExpertAutoscaling
from actors.experts.transport import TRANSPORTS
from cluster.placement import resource_options
from model.checkpoint import WeightSource, torch_dtype
from model.engine import Engine
from model.quant import QUANTIZATIONS

DEVICES = ("cpu", "cuda")
EXPERT_POOLS = ("shared", "per_replica")
NONE_WORDS = ("none", "null")        # a string arg meaning None, for fields that allow it


def _option(default: Any, doc: str) -> Any:
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """One engine's options; `python -m actors.options` lists them with their docs."""
    dtype: str = _option("auto", """Dtype of the weights and activations: "auto" (the
        checkpoint's config.json torch_dtype, except a bfloat16 / float16 one on a CPU without
        native kernels for it: float32 there, logged once; float32 for random weights),
        "float32", "bfloat16" or "float16".""")
    quantization: str | None = _option(None, """"int8": the expert weights quantized at load,
        int8 weight-only with per-output-channel scales (model/quant.py), half of bf16's
        bytes in every expert actor; also accepted as engine_args' "quantization", as
        vLLM's engine args name it. None: as stored (an FP8 checkpoint is read as FP8 without
        it; int8 on one is a ValueError).""")
    device: str = _option("cpu", """Where the frontend and the expert actors compute: "cpu" or
        "cuda" (each actor then asks for a GPU unless its resources say otherwise).""")
    expert_pool: str = _option("shared", """Served: "shared" (one pool of expert actors for
        every engine replica, owned by the application's ExpertPoolServer deployment: N engine
        replicas hold one copy of each expert, and a replica that dies or restarts leaves
        every expert actor running) or "per_replica" (each engine replica starts and owns its
        own expert actors, which die with it). See actors/experts/shared.py.""")
    expert_replicas: int = _option(1, """Expert actors holding each expert id (an integer
        >= 1). More than the cluster holds: PlacementError at start, nothing left reserved.""")
    experts_per_actor: int = _option(1, """Expert ids per expert actor, which is one placement
        unit asking for expert_resources (an integer >= 1 that divides num_local_experts, else
        PlacementError at start).""")
    expert_resources: dict | None = _option(None, """Ray resources per expert actor, e.g.
        {"GPU": 1, "CPU": 1} (amounts >= 0; custom resource names allowed). None: a GPU and a
        CPU on cuda, a 0.01 CPU share on cpu.""")
    frontend_resources: dict | None = _option(None, """The frontend's Ray resources (same form
        and defaults). RayEngine reserves them in a placement group; served, they are the
        engine replica's ray_actor_options, which a Serve config's `deployments:` entry
        replaces if it sets them.""")
    frontend_threads: int | None = _option(None, """torch threads of the frontend (an integer
        >= 1). None: every core it may use on cpu, with a short OpenMP spin
        (actors/experts/pool.py: FRONTEND_CPU_ENV); torch's default on cuda.""")
    expert_threads: int | None = _option(None, """torch threads per expert actor (an integer
        >= 1). None: Ray's default for the actor's CPUs, 1 for a fractional share.""")
    placement_timeout_s: float = _option(60.0, """Seconds to wait for the cluster to reserve
        the actors' placement groups (a number > 0); then PlacementError.""")
    transport: str = _option("channel", """How the frontend sends each layer's rows to its
        expert actors: "channel" (a ZeroMQ channel per actor, authenticated by a secret) or
        "object_refs" (a Ray task per actor per layer: the reference); see
        actors/experts/dispatcher.py.""")
    engine_args: dict | None = _option(None, """Keyword args of the frontend's Engine
        (model/engine.py: max_num_seqs, max_num_batched_tokens, max_model_len, max_waiting,
        block_size, kv_cache_memory, micro_batches, attention_backend, enable_prefix_caching);
        an unknown key is a ValueError naming it. None: Engine's defaults.""")
    dispatch_args: dict | None = _option(None, """Keyword args of the frontend's Dispatcher
        (actors/experts/dispatcher.py: max_attempts, retry_timeout_s, cooldown_s,
        load_window_s); an unknown key is a ValueError naming it. None: its defaults.""")
    expert_autoscaling: dict | None = _option(None, """Replicas of each expert id follow its
        measured routing load: {min_replicas, max_replicas, target_rows_per_s or
        target_load_ratio, window_s, cooldown_s, interval_s, downscale_headroom}
        (actors/experts/scaling.py: ExpertAutoscaling, which names a bad key or value); each
        added replica asks for expert_resources on a node with room. None: off.""")
    failover_timeout_s: float = _option(120.0, """Seconds a request whose frontend died waits
        for another (or the restarted one) to take it back, per failover (a number > 0; then
        EngineUnavailable, over gRPC UNAVAILABLE). Served with one engine replica, a request
        waits for Serve to restart it, weights and all: set this above that restart.""")

    def __post_init__(self):
        self._lift_quantization()
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be None or one of {QUANTIZATIONS}, got "
                             f"{self.quantization!r} (the option or engine_args.quantization; "
                             f"an FP8 checkpoint is read as FP8 without it)")
        _one_of("device", self.device, DEVICES)
        _one_of("transport", self.transport, TRANSPORTS)
        _one_of("expert_pool", self.expert_pool, EXPERT_POOLS)
        if self.dtype != "auto":
            torch_dtype(self.dtype)             # ValueError: "dtype must be 'auto' or one of"
        for name in ("expert_replicas", "experts_per_actor"):
            _positive_int(name, getattr(self, name), "an integer >= 1")
        for name in ("frontend_threads", "expert_threads"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name), "a positive integer or None (default)")
        for name in ("placement_timeout_s", "failover_timeout_s"):
            _seconds(name, getattr(self, name))
        for name in ("expert_resources", "frontend_resources"):
            _resources(name, getattr(self, name))
        _keywords("engine_args", self.engine_args, Engine.__init__, {"device", "moe_begin"})
        _keywords("dispatch_args", self.dispatch_args, Dispatcher.__init__,
                  {"actors", "actor_experts", "num_experts", "transport", "clock", "sleep"})
        ExpertAutoscaling.from_args(self.expert_autoscaling)

    def _lift_quantization(self) -> None:
        """engine_args' "quantization" (vLLM's and Ray Serve LLM's engine_kwargs name) moved
        to the field; ValueError when both are set and differ."""
        if not isinstance(self.engine_args, Mapping) or "quantization" not in self.engine_args:
            return
        rest = {k: v for k, v in self.engine_args.items() if k != "quantization"}
        lifted = self.engine_args["quantization"]
        if self.quantization is not None and lifted is not None and lifted != self.quantization:
            raise ValueError(f"quantization={self.quantization!r} and engine_args.quantization="
                             f"{lifted!r} differ: set one")
        object.__setattr__(self, "engine_args", rest or None)
        object.__setattr__(self, "quantization", self.quantization or lifted)

    def weight_source(self, source: WeightSource) -> WeightSource:
        """`source` with this engine's `quantization` (model/checkpoint.py WeightSource):
        ValueError when the checkpoint is already quantized."""
        if source.quantization == self.quantization:
            return source
        return dataclasses.replace(source, quantization=self.quantization)

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> EngineOptions:
        """The options among a Serve application's `args` (other keys are left to the caller).
        A value is taken as typed (a YAML config), or parsed from a string (the `serve run`
        command line) by its field's type: int, float, dict as JSON, None as "none" or
        "null" where the field allows it; ValueError naming the arg and what it expects."""
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: parse_arg(f.name, hints[f.name], args[f.name])
                      for f in dataclasses.fields(cls) if f.name in args})

    @property
    def autoscaling(self) -> ExpertAutoscaling | None:
        """The autoscaling policy, None when off."""
        return ExpertAutoscaling.from_args(self.expert_autoscaling)

    @property
    def max_num_batched_tokens(self) -> int:
        """Tokens of one engine step: `engine_args`' or Engine's default. It bounds the rows of
        an expert call, and so the frames each expert's channel accepts."""
        default = inspect.signature(Engine.__init__).parameters["max_num_batched_tokens"].default
        return (self.engine_args or {}).get("max_num_batched_tokens", default)

    def frontend_dispatch_args(self) -> dict:
        """The Dispatcher's args: `dispatch_args`, its load window the autoscaler's unless set."""
        policy = self.autoscaling
        window = {"load_window_s": policy.window_s} if policy is not None else {}
        return {**window, **(self.dispatch_args or {})}

    def ray_actor_options(self) -> dict:
        """The served frontend's (the engine replica's) Ray options: `frontend_resources`,
        by default a GPU and a CPU on cuda, a small CPU share on cpu; and its runtime_env
        (actors/experts/pool.py: frontend_runtime_env)."""
        return {**resource_options(self.frontend_resources or default_resources(self.device)),
                **frontend_runtime_env(self.device)}


def parse_arg(name: str, hint: Any, raw: Any) -> Any:
    """`raw` as the type `hint` says, if it is a string and the type is not str: "2" -> 2 for
    int, "0.5" -> 0.5 for float, '{"GPU": 1}' -> {"GPU": 1} for dict (JSON), "none" / "null"
    -> None for an optional field. Anything else passes unchanged (validated later).
    ValueError: "expert_replicas expects an integer, got 'two'"."""
    choices = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    optional = type(None) in choices
    [kind] = [c for c in choices if c is not type(None)]
    if optional and isinstance(raw, str) and raw.strip().lower() in NONE_WORDS:
        return None
    if not isinstance(raw, str) or kind is str:
        return raw
    expects = {int: "an integer", float: "a number", dict: "a JSON object"}[kind]
    try:
        value = json.loads(raw) if kind is dict else kind(raw)
    except ValueError:
        value = None
    if not isinstance(value, kind):
        or_none = f" or one of {NONE_WORDS}" if optional else ""
        raise ValueError(f"{name} expects {expects}{or_none}, got {raw!r}")
    return value


def reference() -> str:
    """Each option: name, type, default and doc, as `python -m actors.options` prints them."""
    hints = typing.get_type_hints(EngineOptions)
    out = []
    for f in dataclasses.fields(EngineOptions):
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
        doc = " ".join(f.metadata["doc"].split())
        out.append(f"{f.name} ({kind}, default {f.default!r})\n    {doc}")
    return "\n".join(out)


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _positive_int(name: str, value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _resources(name: str, value: Any) -> None:
    """None, or {resource name: amount >= 0}."""
    if value is None:
        return
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and not isinstance(v, bool) and isinstance(v, (int, float))
            and 0 <= v < math.inf for k, v in value.items()):
        raise ValueError(f"{name} must be a mapping of Ray resource names to amounts >= 0 "
                         f"(e.g. {{\"GPU\": 1, \"CPU\": 1}}) or None (default), got {value!r}")


def _keywords(name: str, value: Any, function, reserved: set[str]) -> None:
    """None, or a mapping whose keys are `function`'s parameters with a default (less
    `reserved`)."""
    if value is None:
        return
    accepted = sorted(p.name for p in inspect.signature(function).parameters.values()
                      if p.default is not p.empty and p.name not in reserved)
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping of {accepted} or None, got {value!r}")
    unknown = sorted(set(value) - set(accepted))
    if unknown:
        raise ValueError(f"unknown {name} keys {unknown}; expected some of {accepted}")


if __name__ == "__main__":
    print(reference())
