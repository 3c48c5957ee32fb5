"""A paper estimate for Mixtral-8x7B on H100s: the GPUs N frontends need with one shared pool of
expert actors vs a pool each, and how busy the expert GPUs are (bench/pool.py prints it; the
figures and every assumption are in docs/benchmarks/pool.md).

    rows = estimate(frontends=(1, 2, 4, 8), batch=64, context=2048)   # one Estimate per N

A roofline per layer of one decode step, one GPU per frontend and per expert actor (as
docs/architecture.md deploys it). The frontend reads its attention weights and the batch's KV
cache (memory-bound in decode); the rows go to the expert actors and back over the network; an
expert actor computes its rows in three GEMMs over 3 x D x F bf16 weights:
time = max(weight bytes / HBM, FLOPs / tensor peak), each peak reached at `efficiency`, plus a
fixed cost per call. The frontend waits for its experts (no overlap: the conservative case for
the frontend's period; two micro-batches ping-ponged make a frontend call more often, and its
experts busier). Top-2 routing spreads a step's rows evenly: each expert actor gets
batch x top_k / experts rows of each frontend per layer.

Expert demand: one frontend keeps an expert actor busy u1 = t_expert(rows) / period. With a
pool each, every frontend has its 8 actors at u1. A shared pool needs
ceil(N x u1 / max_utilisation) replicas of each expert when no two calls merge (each call reads
the weights again: the upper bound); when every waiting call merges (actors/experts/
channel_server.py: one GEMM for all), N calls cost t_expert(N x rows) once: the lower bound.
"""
from __future__ import annotations

import dataclasses
import math

from model.config import PRESETS


@dataclasses.dataclass(frozen=True)
class Gpu:
    """An H100 SXM (NVIDIA's datasheet: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3) and what real
    kernels and the network reach (assumptions, docs/benchmarks/pool.md)."""
    flops: float = 989e12           # FLOP/s, dense bf16 tensor cores, peak
    hbm: float = 3.35e12            # bytes/s, peak
    efficiency: float = 0.75        # share of either peak a kernel reaches
    network: float = 50e9           # bytes/s, one 400 Gb/s NIC per GPU
    call_s: float = 30e-6           # fixed cost of one expert call: launches + network latency
    frontend_s: float = 20e-6       # fixed cost of a layer on the frontend: norms, router...


_8X7B = PRESETS["8x7b"]          # Mixtral-8x7B's config.json (model/config.py)


@dataclasses.dataclass(frozen=True)
class Model:
    """Mixtral-8x7B's shape (the `8x7b` preset), bf16."""
    hidden: int = _8X7B.hidden_size                 # D
    ffn: int = _8X7B.intermediate_size              # F
    layers: int = _8X7B.num_hidden_layers
    experts: int = _8X7B.num_local_experts
    top_k: int = _8X7B.num_experts_per_tok
    heads: int = _8X7B.num_attention_heads
    kv_heads: int = _8X7B.num_key_value_heads
    head_dim: int = _8X7B.head_dim
    dtype_bytes: int = 2

    @property
    def expert_bytes(self) -> int:
        """One expert's w1, w2, w3 of one layer: 3 x D x F values (352 MB in bf16)."""
        return 3 * self.hidden * self.ffn * self.dtype_bytes

    @property
    def attention_bytes(self) -> int:
        """One layer's q, k, v, o projections."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        return (q_o + k_v) * self.dtype_bytes

    def kv_bytes(self, tokens: int) -> int:
        """One layer's K and V of `tokens` cached tokens."""
        return 2 * tokens * self.kv_heads * self.head_dim * self.dtype_bytes


def expert_call_s(rows: float, gpu: Gpu = Gpu(), model: Model = Model()) -> float:
    """Seconds one expert actor takes for `rows` rows of one layer (weights read once)."""
    flops = 2 * rows * model.expert_bytes / model.dtype_bytes     # 3 GEMMs, 2 FLOP a weight
    return max(model.expert_bytes / gpu.hbm, flops / gpu.flops) / gpu.efficiency + gpu.call_s


def layer_period_s(batch: int, context: int, gpu: Gpu = Gpu(), model: Model = Model()) -> float:
    """Seconds a frontend spends on one layer of a decode step, so the time between two of its
    calls to an expert actor (which holds every layer): its attention (weights + the batch's
    KV of `context` tokens each), the rows' round trip, and its experts' compute (in
    parallel; the frontend waits)."""
    attention = (model.attention_bytes + model.kv_bytes(batch * context)) / gpu.hbm
    rows = batch * model.top_k / model.experts
    network = 2 * batch * model.top_k * model.hidden * model.dtype_bytes / gpu.network
    return (attention / gpu.efficiency + gpu.frontend_s + network
            + expert_call_s(rows, gpu, model))


@dataclasses.dataclass(frozen=True)
class Estimate:
    frontends: int
    gpus_per_replica: int           # N x (1 + experts)
    gpus_shared: int                # N + experts x replicas, no call merged (upper bound)
    gpus_shared_merged: int         # the same when every call merges (lower bound)
    replicas: int                   # of each expert, shared, no call merged
    utilisation_per_replica: float  # of an expert GPU with a pool per frontend
    utilisation_shared: float       # the same, shared, no call merged
    tokens_per_s: float             # per frontend, at this batch


def estimate(frontends=(1, 2, 4, 8), batch: int = 64, context: int = 2048,
             max_utilisation: float = 0.8, gpu: Gpu = Gpu(),
             model: Model = Model()) -> list[Estimate]:
    """One Estimate per number of frontends, each decoding `batch` sequences of `context`
    cached tokens; a shared expert actor is loaded to `max_utilisation` at most."""
    if not 0 < max_utilisation <= 1:
        raise ValueError(f"max_utilisation must be in (0, 1]; got {max_utilisation}")
    period = layer_period_s(batch, context, gpu, model)
    rows = batch * model.top_k / model.experts
    u1 = expert_call_s(rows, gpu, model) / period
    out = []
    for n in frontends:
        replicas = math.ceil(n * u1 / max_utilisation)
        merged = math.ceil(expert_call_s(n * rows, gpu, model) / period / max_utilisation)
        out.append(Estimate(n, n * (1 + model.experts), n + model.experts * replicas,
                            n + model.experts * merged, replicas, u1, n * u1 / replicas,
                            batch / (period * model.layers)))
    return out


def table(rows: list[Estimate]) -> str:
    """The estimate as the Markdown table docs/benchmarks/pool.md shows."""
    lines = ["| frontends | GPUs, a pool each | GPUs, shared (no merge / all merged) | "
             "replicas of each expert | expert GPU busy, a pool each | shared | "
             "tokens/s per frontend |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.frontends} | {r.gpus_per_replica} | {r.gpus_shared} / "
                     f"{r.gpus_shared_merged} | {r.replicas} | {r.utilisation_per_replica:.0%} "
                     f"| {r.utilisation_shared:.0%} | {r.tokens_per_s:.0f} |")
    return "\n".join(lines)
