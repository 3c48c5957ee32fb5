"""What the actors report about themselves: the contracts between the frontend, the engine
deployment and the gateway, as frozen dataclasses (picklable, so they cross Ray calls as is).

    EngineInfo   one engine (frontend + its expert actors): Frontend.info() builds it,
                 RayEngine.info() and EngineServer.info() pass it on, the gateway reads the
                 context length from it and actors/serving/grpc_messages.py turns it into
                 ModelInfoResponse.
    ExpertLoad   the routing load over the dispatcher's window (actors/experts/load.py), per
                 expert id and per expert actor: RayEngine.expert_load(),
                 EngineServer.expert_load(), ModelInfo, the autoscaler (actors/experts/scaling.py).
    WorkerInfo   one actor's process and memory (frontend or expert): which tensors it read from
                 the checkpoint (or built), which it keeps, and their bytes.
    MergeStats   how an expert actor's channel merged the calls of several frontends
                 (actors/experts/channel_server.py): ExpertWorker.merge_stats(), summed per pool.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping

import ray
import torch

from model import quant
from model.checkpoint import WeightSource, materialised_names
from model.quant_checkpoint import quantization_config


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    context_length: int                         # tokens: the engine's max_model_len
    vocab_size: int
    num_layers: int
    num_experts: int                            # num_local_experts
    experts_per_token: int                      # num_experts_per_tok
    frontend_node_id: str                       # Ray node id (hex)
    experts: Mapping[int, tuple[str, ...]]      # expert id -> node id of each actor holding it
    free_blocks: int                            # KV cache blocks free now
    total_blocks: int
    retries: int                                # expert calls re-sent by the dispatcher so far
    tracked_requests: int = 0                   # requests the engine holds state for now
    expert_load: Mapping[int, float] = dataclasses.field(default_factory=dict)
                                                # expert id -> rows per second, all layers
    dtype: str = ""                             # the frontend's compute dtype: "bfloat16", ...
    quantization: str = ""                      # QUANTIZATION_NONE, "fp8" or "int8":
                                                # checkpoint_quantization()


QUANTIZATION_NONE = ""     # EngineInfo.quantization (and ModelInfo's) of unquantized weights


def checkpoint_quantization(source: WeightSource) -> str:
    """How `source`'s weights are quantized, as EngineInfo reports it: "fp8" for an FP8
    checkpoint (config.json quantization_config: its experts' and attention's projections),
    "int8" for `quantization="int8"` (the experts' weights, quantized at load), else
    QUANTIZATION_NONE. Reads config.json (CheckpointError as `quantization_config`)."""
    if source.path is not None and quantization_config(source.path) is not None:
        return quant.FP8_METHOD
    return source.quantization or QUANTIZATION_NONE


@dataclasses.dataclass(frozen=True)
class ActorLoad:
    expert_ids: tuple[int, ...]
    node_id: str                                # Ray node id (hex)
    rows_per_s: float                           # rows it computed per second, all layers
    seconds_per_row: float | None               # measured marginal compute time per row
    actor_id: str = ""                          # Ray actor id (hex)


@dataclasses.dataclass(frozen=True)
class ExpertLoad:
    window_s: float                             # seconds the window covers
    rows_per_s: tuple[float, ...]               # (E,) per expert id, all layers summed
    per_layer: tuple[tuple[float, ...], ...]    # (L, E) per layer and expert id
    actors: tuple[ActorLoad, ...]               # every expert actor, the dispatcher's order

    @classmethod
    def merged(cls, loads: list[ExpertLoad], actors: list[ActorLoad], num_layers: int,
               num_experts: int) -> ExpertLoad:
        """The load of several frontends on one shared pool (actors/experts/shared.py): rows
        per second summed per expert id, per layer and per actor (matched by actor id, in the
        order of `actors`: the pool's members, given with no load), the window the longest,
        an actor's seconds per row the mean of those measured. No loads: all zero."""
        zero = ExpertLoad(0.0, (0.0,) * num_experts, ((0.0,) * num_experts,) * num_layers, ())
        loads = [zero, *loads]
        by_id: dict[str, list[ActorLoad]] = {}
        for a in (a for load in loads for a in load.actors):
            by_id.setdefault(a.actor_id, []).append(a)
        merged = []
        for a in actors:
            seen = by_id.get(a.actor_id, [])
            speeds = [s.seconds_per_row for s in seen if s.seconds_per_row is not None]
            merged.append(dataclasses.replace(
                a, rows_per_s=sum(s.rows_per_s for s in seen),
                seconds_per_row=sum(speeds) / len(speeds) if speeds else None))
        return cls(max(load.window_s for load in loads),
                   tuple(map(sum, zip(*(load.rows_per_s for load in loads)))),
                   tuple(tuple(map(sum, zip(*rows)))
                         for rows in zip(*(load.per_layer for load in loads))),
                   tuple(merged))

    def replicas(self) -> dict[int, int]:
        """expert id -> actors holding it."""
        out = {e: 0 for e in range(len(self.rows_per_s))}
        for a in self.actors:
            for e in a.expert_ids:
                out[e] += 1
        return out

    def imbalance(self) -> float:
        """max / mean rows per second over the expert actors (1.0 is perfect balance; 1.0 when
        idle)."""
        rates = [a.rows_per_s for a in self.actors]
        mean = sum(rates) / len(rates) if rates else 0.0
        return max(rates) / mean if mean > 0 else 1.0


@dataclasses.dataclass(frozen=True)
class MergeStats:
    """Counts of an expert actor's channel since it started (or a sum over actors): requests
    of one layer waiting together are computed as one call (one GEMM per expert id)."""
    calls: int = 0                              # well-formed requests computed (ok or failed)
    computes: int = 0                           # compute() calls made for them
    merged_calls: int = 0                       # requests that shared a compute with another
    rows: int = 0                               # rows computed, all computes

    def __add__(self, other: MergeStats) -> MergeStats:
        return MergeStats(*(getattr(self, f.name) + getattr(other, f.name)
                            for f in dataclasses.fields(self)))

    @classmethod
    def merged(cls, stats: Iterable[MergeStats]) -> MergeStats:
        """The sum of `stats` (all zeros for none)."""
        return sum(stats, cls())

    @property
    def rows_per_compute(self) -> float:
        """Mean rows per GEMM: rows / computes (0.0 before any)."""
        return self.rows / self.computes if self.computes else 0.0


@dataclasses.dataclass(frozen=True)
class PoolInfo:
    """A shared expert pool (actors/experts/shared.py), reported once for all its frontends."""
    name: str                                   # the pool's (its actors' names start with it)
    generation: int                             # of its set of actors (Experts.generation)
    frontends: int                              # frontends heard from within LIVE_S
    load: ExpertLoad                            # summed over those frontends
    actors: tuple[tuple[tuple[int, ...], str, str], ...]    # (expert ids, node id, actor id)
    merges: MergeStats = MergeStats()           # summed over the actors that answered


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    node_id: str                                # Ray node id (hex)
    pid: int
    expert_ids: tuple[int, ...]                 # () for the frontend
    nbytes: int                                 # bytes of the weights it keeps
    kept: frozenset[str]                        # checkpoint tensor names it keeps
    read: frozenset[str]                        # names this process read or built, ever
    threads: int                                # torch's intra-op threads
    env: dict[str, str]                         # its OMP_* / GOMP_* variables (Ray sets
                                                # OMP_NUM_THREADS; `threads` is torch's)

    @classmethod
    def of_this_process(cls, expert_ids: Iterable[int], nbytes: int,
                        kept: Iterable[str]) -> WorkerInfo:
        """Filled in inside the actor: its node, pid and what its process materialised."""
        return cls(ray.get_runtime_context().get_node_id(), os.getpid(), tuple(expert_ids),
                   nbytes, frozenset(kept), materialised_names(), torch.get_num_threads(),
                   {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_"))})
