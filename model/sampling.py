"""Per-request sampling inside a batched step.

Each request has its own `torch.Generator` (seeded when `seed` is given), so a seeded request
samples the same tokens whatever else shares its batch. Greedy rows (temperature 0) take the
argmax together; sampled rows apply temperature, then top-k, then top-p, then draw.
The reported logprob is that of the chosen token under the model's raw distribution
(log_softmax of the unscaled logits), as OpenAI-style APIs report it.
Shapes: B rows (sequences that sample this step), V vocab.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()          # stop strings: cut the text before the first one
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(isinstance(self.max_tokens, int) and self.max_tokens > 0,
               f"max_tokens must be an integer > 0, got {self.max_tokens!r}")
        _check(isinstance(self.temperature, (int, float)) and self.temperature >= 0,
               f"temperature must be >= 0, got {self.temperature!r}")
        _check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        _check(self.seed is None or isinstance(self.seed, int),
               f"seed must be an integer or None, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop must hold non-empty strings, got {self.stop!r}")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               f"stop_token_ids must hold token ids >= 0, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[list[int], list[float]]:
    """logits (B, V) fp32 -> chosen token ids and their logprobs (one host sync per step)."""
    logprobs = torch.log_softmax(logits, dim=-1)                        # (B, V)
    tokens = torch.argmax(logits, dim=-1)                               # (B,)
    for row, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[row] = _sample_row(logits[row], p, gen)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]                  # (B,)
    return tokens.tolist(), chosen.tolist()


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    scaled = logits / p.temperature                                     # (V,)
    if p.top_k and p.top_k < scaled.shape[0]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(-1) - probs >= p.top_p                   # mass before it covers p
        scaled = scaled.scatter(0, order[outside], float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[0]
