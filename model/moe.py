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


def route(x: torch.Tensor, gate: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D), gate (E, D) -> routing weights (N, A) in x's dtype, expert ids (N, A) int64."""
    logits = F.linear(x, gate)                                          # (N, E)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)          # (N, E)
    weights, experts = torch.topk(probs, top_k, dim=-1)                 # (N, A)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), experts


@dataclasses.dataclass
class ExpertGroups:
    """The step's (row, weight) pairs sorted by expert; `counts[e]` pairs go to expert e."""
    rows: torch.Tensor      # (P,) token row of each pair, grouped by expert
    weights: torch.Tensor   # (P,) routing weight of each pair
    counts: list[int]       # (E,) pairs per expert (host ints: one sync per layer)

    def segments(self):
        """Yield (expert id, rows, weights) for every expert that received rows."""
        start = 0
        for e, n in enumerate(self.counts):
            if n:
                yield e, self.rows[start:start + n], self.weights[start:start + n]
            start += n


def group_by_expert(weights: torch.Tensor, experts: torch.Tensor, num_experts: int) -> ExpertGroups:
    flat = experts.flatten()                                            # (P,)
    order = torch.argsort(flat, stable=True)                            # (P,)
    counts = torch.bincount(flat, minlength=num_experts).tolist()       # (E,)
    top_k = experts.shape[1]
    return ExpertGroups(order // top_k, weights.flatten()[order], counts)


def expert_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert: x (n, D), w1/w3 (F, D), w2 (D, F) -> (n, D)."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


class LocalExperts:
    """Expert weights of some expert ids for every layer, computed in this process.

    `weights[(layer, e)] = (w1, w2, w3)`. The in-process engine holds all experts; an expert
    actor holds its own ids only.
    """

    def __init__(self, weights: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 num_experts: int):
        self.weights = weights
        self.num_experts = num_experts

    @classmethod
    def from_tensors(cls, cfg, tensors: dict[str, torch.Tensor], expert_ids=None) -> "LocalExperts":
        """Take (pop) the named expert tensors of `expert_ids` (default: all) out of `tensors`."""
        ids = range(cfg.num_local_experts) if expert_ids is None else expert_ids
        prefix = "model.layers.{}.block_sparse_moe.experts.{}.{}.weight"
        weights = {(i, e): tuple(tensors.pop(prefix.format(i, e, w)) for w in ("w1", "w2", "w3"))
                   for i in range(cfg.num_hidden_layers) for e in ids}
        return cls(weights, cfg.num_local_experts)

    def compute(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = self.weights[(layer, expert)]
        return expert_mlp(x, w1, w2, w3)

    def moe(self, layer: int, x: torch.Tensor, weights: torch.Tensor,
            experts: torch.Tensor) -> torch.Tensor:
        """x (N, D), routing (N, A) -> sum over the chosen experts of p * expert(x), (N, D)."""
        groups = group_by_expert(weights, experts, self.num_experts)
        out = torch.zeros_like(x)
        for e, rows, w in groups.segments():
            y = self.compute(layer, e, x[rows])                         # (n, D)
            out.index_add_(0, rows, y * w[:, None])
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ws in self.weights.values() for t in ws)

