"""Sparse MoE: route -> dispatch -> compute -> combine, with Hugging Face Mixtral semantics.

route:   p = softmax(x @ gate.T) in fp32 over E experts, keep the top A, renormalise to sum 1.
compute: y_e = w2(silu(w1 x) * w3 x) for the rows routed to expert e.
combine: out[row] += p * y_e[row].

`group_by_expert` is the dispatch step shared by the in-process experts here and the
distributed dispatcher (actors/): it sorts the (row, slot) pairs by expert once per layer.
Shapes: N tokens (packed), D hidden, F expert hidden, E experts, A experts per token, P = N*A.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from model.linear import Weight, linear, nbytes, pack
from model.quant import concat


def expert_name(layer: int, expert: int, w: str) -> str:
    """Checkpoint name of one expert weight, w in {"w1", "w2", "w3"}."""
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"


def is_expert_name(name: str) -> bool:
    """Whether a checkpoint name is one of the experts' weights (see `expert_name`)."""
    return ".block_sparse_moe.experts." in name and name.endswith(".weight")


def route(x: torch.Tensor, gate: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D), gate (E, D) -> routing weights (N, A) in x's dtype, expert ids (N, A) int64."""
    logits = F.linear(x, gate)                                          # (N, E)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)          # (N, E)
    weights, experts = torch.topk(probs, top_k, dim=-1)                 # (N, A)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), experts


@dataclasses.dataclass
class ExpertGroups:
    """The step's (row, slot) pairs sorted by expert; `counts[e]` pairs go to expert e."""
    order: torch.Tensor     # (P,) flat pair index (row * A + slot) of each sorted pair
    weights: torch.Tensor   # (N, A) routing weights, unsorted
    counts: list[int]       # (E,) pairs per expert (host ints: one sync per layer)

    @property
    def rows(self) -> torch.Tensor:
        """(P,) token row of each pair, grouped by expert."""
        return self.order // self.weights.shape[1]

    def segments(self):
        """Yield (expert id, start, end): pairs [start, end) of `rows` go to that expert."""
        start = 0
        for e, n in enumerate(self.counts):
            if n:
                yield e, start, start + n
            start += n

    def combine(self, y: torch.Tensor, num_rows: int) -> torch.Tensor:
        """y (P, D), one output per pair in `rows` order -> sum of weight * y per row (N, D).
        Undoes the sort with one index_copy and sums each row's A outputs in slot order: a few
        ops instead of a scatter-add (which added them in expert order: the same bits for
        A <= 2, a last-bit difference possible for more)."""
        unsorted = torch.empty_like(y).index_copy_(0, self.order, y)   # (P, D) pair order
        top_k = self.weights.shape[1]
        return (unsorted.view(num_rows, top_k, y.shape[1]) * self.weights[:, :, None]).sum(dim=1)


def group_by_expert(weights: torch.Tensor, experts: torch.Tensor, num_experts: int) -> ExpertGroups:
    """Routing weights and expert ids (N, A) -> the pairs sorted (stably) by expert."""
    flat = experts.flatten()                                            # (P,)
    order = torch.argsort(flat, stable=True)                            # (P,)
    counts = torch.bincount(flat, minlength=num_experts).tolist()       # (E,)
    return ExpertGroups(order, weights, counts)


def expert_mlp(x: torch.Tensor, w13: Weight, w2: Weight) -> torch.Tensor:
    """SwiGLU expert: x (n, D), w13 = [w1; w3] (2F, D), w2 (D, F), plain, packed or quantized
    -> (n, D)."""
    h = linear(x, w13)                                                  # (n, 2F)
    gate, up = h.chunk(2, dim=-1)                                       # (n, F) each
    return linear(F.silu(gate).mul_(up), w2)                            # (n, D)


def fuse_w13(w1: Weight, w3: Weight) -> Weight:
    """One (2F, D) weight for w1 and w3: one GEMM instead of two (0.51 vs 0.68 ms here, 8 rows)."""
    return concat([w1, w3])


class LocalExperts:
    """Expert weights of some expert ids for every layer, computed in this process.

    `weights[(layer, e)] = (w13, w2)`, packed for `linear`. The in-process engine holds all
    experts; an expert actor holds its own ids only.
    """

    def __init__(self, weights: dict[tuple[int, int], tuple[Weight, Weight]],
                 num_experts: int):
        self.weights = weights
        self.num_experts = num_experts

    @classmethod
    def from_tensors(cls, cfg, tensors: dict[str, Weight], expert_ids=None) -> LocalExperts:
        """Take (pop) the expert weights of `expert_ids` (default: all) out of `tensors`, packed
        (tensors or QuantizedWeights, model/checkpoint.py `WeightSource.load`)."""
        ids = range(cfg.num_local_experts) if expert_ids is None else expert_ids
        weights = {}
        for i in range(cfg.num_hidden_layers):
            for e in ids:
                w1, w2, w3 = (tensors.pop(expert_name(i, e, w)) for w in ("w1", "w2", "w3"))
                weights[(i, e)] = (pack(fuse_w13(w1, w3)), pack(w2))
        return cls(weights, cfg.num_local_experts)

    def compute(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        return expert_mlp(x, *self.weights[(layer, expert)])

    def moe(self, layer: int, x: torch.Tensor, weights: torch.Tensor,
            experts: torch.Tensor) -> torch.Tensor:
        """x (N, D), routing (N, A) -> sum over the chosen experts of p * expert(x), (N, D)."""
        groups = group_by_expert(weights, experts, self.num_experts)
        xs = x[groups.rows]                                             # (P, D) by expert
        ys = torch.empty_like(xs)                                       # (P, D)
        for e, start, end in groups.segments():
            ys[start:end] = self.compute(layer, e, xs[start:end])
        return groups.combine(ys, x.shape[0])

    def moe_begin(self, layer: int, x: torch.Tensor, weights: torch.Tensor,
                  experts: torch.Tensor):
        """`moe` computed now, returned later: the in-process side of micro-batching."""
        out = self.moe(layer, x, weights, experts)
        return lambda: out

    def nbytes(self) -> int:
        return sum(nbytes(t) for ws in self.weights.values() for t in ws)

