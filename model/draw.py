"""Stage 5 of the sampler pipeline (model/sampler.py): the seeded draw of each sampled row,
after temperature, top-k and top-p, from its processed logits.

Each row draws one uniform from a generator seeded by its `draw_seed` alone and inverts it
through its cumulative weights in token-id order (exact inverse-transform sampling), so a
seeded draw depends on the row's logits, params and seed only: batch invariance and
reproducibility. Temperature divides the logits *after* subtracting the row's maximum, in
float64, so any temperature small enough that sampling is numerically greedy gives the argmax
(never inf - inf or 0 / 0 = NaN), down to the smallest positive double. top-k keeps ties with
the k-th logit; top-p keeps the token that crosses top_p and ties with it (as vLLM's, whose
cut is the same mass test: vllm/v1/sample/ops/topk_topp_sampler.py). A row with a cut draws
among its most likely tokens only, with the weights (and so the token) the whole vocabulary
gives it; a row whose kept tokens may reach past them draws over the whole vocabulary.
Shapes: R rows drawn, V vocab, W most likely tokens looked at.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from model.sampler import SamplingRow
    from model.sampling import SamplingParams


class SamplingError(RuntimeError):
    """One row could not be sampled (non-finite logits, no allowed token, or the draw failed)."""


def draw(processed: torch.Tensor, top: torch.Tensor, rows: Sequence[SamplingRow],
         tokens: torch.Tensor, generator: torch.Generator | None,
         errors: dict[int, SamplingError]) -> None:
    """Stage 5 for the sampled rows (greedy ones keep the argmax in `tokens`; `top` (B,) is
    each row's max of `processed`), in place: one
    uniform per row from its own seeded generator, inverted through the row's cumulative
    weights in token-id order (exact inverse-transform sampling; one vectorised search for all
    rows). A row with a top-k or top-p cut draws among its most likely tokens alone
    (`_draw_among_top`), which gives the token the whole vocabulary would (zero weights add
    nothing to a cumulative sum); the others, and a row whose cut reaches past them, draw over
    the whole vocabulary."""
    uniforms: dict[int, torch.Tensor] = {}
    for i, row in enumerate(rows):
        if row.params.greedy or i in errors:
            continue
        try:
            gen = generator.manual_seed(row.draw_seed)
            uniforms[i] = torch.rand(1, dtype=torch.float64, generator=gen,
                                     device=processed.device)
        except (RuntimeError, TypeError, AttributeError) as e:
            errors[i] = SamplingError(f"sampling failed: {e}")
    vocab = processed.shape[1]
    cut = [i for i in uniforms if 0 < rows[i].params.top_k < vocab or rows[i].params.top_p < 1]
    rest = [i for i in uniforms if i not in cut]
    if cut:
        rest += _draw_among_top(processed, top, rows, cut, uniforms, tokens)
    if rest:
        x = _scaled(rows_of(processed, rest), top[rest, None], [rows[i].params for i in rest])
        weights = _top_k_top_p_weights(x, [rows[i].params for i in rest])
        _invert(weights, None, torch.cat([uniforms[i] for i in rest]), rest, tokens)


def rows_of(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """x[idx], without a copy when idx is every row in order."""
    return x if idx == list(range(x.shape[0])) else x[idx]


def _scaled(x: torch.Tensor, row_max: torch.Tensor, params: list[SamplingParams]
            ) -> torch.Tensor:
    """(R, W) logits and (R, 1) each row's max -> float64 (x - row max) / temperature: <= 0,
    the max at 0 (any positive Python float temperature is a float64)."""
    x = x.double()
    temperature = torch.tensor([p.temperature for p in params], dtype=x.dtype, device=x.device)
    return x.sub_(row_max.double()).div_(temperature[:, None])


def _invert(weights: torch.Tensor, ids: torch.Tensor | None, uniforms: torch.Tensor,
            idx: list[int], tokens: torch.Tensor) -> None:
    """tokens[idx] = the token where each row's uniform falls in its cumulative weights
    (R, W), in that order; `ids` (R, W) names the tokens of the columns (None: column j is
    token j)."""
    cdf = weights.cumsum_(dim=-1)                                     # (R, W)
    total = cdf[:, -1:]                                               # (R, 1) >= 1
    at = torch.minimum(uniforms[:, None] * total,                     # never past the last
                       torch.nextafter(total, torch.zeros_like(total)))   # weighted token
    column = torch.searchsorted(cdf, at, right=True)                  # (R, 1)
    drawn = column if ids is None else ids.gather(1, column)
    tokens[torch.tensor(idx, device=tokens.device)] = drawn[:, 0]


def _draw_among_top(processed: torch.Tensor, top: torch.Tensor, rows: Sequence[SamplingRow],
                    idx: list[int], uniforms: dict[int, torch.Tensor], tokens: torch.Tensor
                    ) -> list[int]:
    """Draw the rows `idx` (each with a top-k or top-p cut) among their W most likely tokens
    (W: the largest top_k + 1, NUCLEUS_GUESS for a top-p-only row): the weights the whole
    vocabulary would give them, in token-id order. Returns the rows whose kept tokens may
    reach past the W (a tie with the k-th at the edge, a nucleus wider than W): they draw over
    the whole vocabulary."""
    vocab = processed.shape[1]
    params = [rows[i].params for i in idx]
    # one more than the largest top_k, so that a tie with a k-th logit shows at the edge
    width = min(vocab, max(p.top_k + 1 if 0 < p.top_k < vocab else NUCLEUS_GUESS
                           for p in params))
    values, ids = rows_of(processed, idx).topk(width, dim=-1)         # (R, W) descending
    x = _scaled(values, values[:, :1], params)                          # (R, W)
    floor = _top_k_floor(x, params, vocab)                              # (R, 1)
    kept = x.masked_fill(x < floor, -math.inf)
    weights = kept.exp()
    mass = weights.sum(dim=-1, keepdim=True)         # what top-k kept: all of it is in the W
    no_k = [j for j, p in enumerate(params) if not 0 < p.top_k < vocab]
    if no_k:                # top-p alone: the nucleus is a share of every token's weight
        rows_no_k = [idx[j] for j in no_k]
        mass[no_k] = _scaled(processed[rows_no_k], top[rows_no_k, None],
                             [params[j] for j in no_k]).exp_().sum(dim=-1, keepdim=True)
    p = torch.tensor([q.top_p for q in params], dtype=x.dtype, device=x.device)[:, None]
    nucleus, found = _nucleus_floor(kept, mass, p)
    weights.masked_fill_(x < nucleus, 0)
    # both cuts keep ties with their last token, so what top-k keeps (the mass top-p shares)
    # or what top-p keeps may go on past the W
    last = x[:, -1:]
    spill = ~found | ((((floor > -math.inf) & (last >= floor)) | (last >= nucleus))[:, 0]
                      & (width < vocab))
    ok = (~spill).nonzero()[:, 0].tolist()
    if ok:
        kept_ids = torch.where(weights[ok] > 0, ids[ok], vocab)         # (R', W) cut: vocab
        order_ids, order = kept_ids.sort(dim=-1)                         # token-id order
        _invert(weights[ok].gather(1, order), order_ids,
                torch.cat([uniforms[idx[j]] for j in ok]), [idx[j] for j in ok], tokens)
    return [idx[j] for j in spill.nonzero()[:, 0].tolist()]


NUCLEUS_GUESS = 1024        # top-p looks for its cut among this many most likely tokens first


def _top_k_top_p_weights(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """exp(x) with each row's top-k logits kept, then those whose more likely tokens weigh
    < top_p of what top-k kept (so the token that crosses top_p stays); ties with the last
    kept stay in both; the rest weigh 0. One topk serves both (a full sort only for a row whose
    nucleus is wider than NUCLEUS_GUESS tokens). In place where it can (these are the step's
    largest tensors). x (R, V) float64, each row's max 0 -> (R, V) weights in [0, 1]."""
    vocab = x.shape[1]
    top_p = [p.top_p for p in params]
    if all(not 0 < p.top_k < vocab for p in params) and all(p >= 1 for p in top_p):
        return x.exp_()
    width = min(vocab, max(p.top_k if 0 < p.top_k < vocab else NUCLEUS_GUESS if p.top_p < 1
                           else 1 for p in params))
    ordered = x.topk(width, dim=-1).values                           # (R, width), descending
    floor = _top_k_floor(ordered, params, vocab)                     # (R, 1) the k-th logit
    weights = x.exp().masked_fill_(x < floor, 0)                     # (R, V)
    if any(p < 1 for p in top_p):
        p = torch.tensor(top_p, dtype=x.dtype, device=x.device)[:, None]
        mass = weights.sum(dim=-1, keepdim=True)                       # (R, 1)
        nucleus, found = _nucleus_floor(ordered.masked_fill(ordered < floor, -math.inf), mass, p)
        for j in (~found).nonzero()[:, 0].tolist():                  # wider than the guess
            row = x[j].sort(descending=True).values
            nucleus[j] = _nucleus_floor(row.masked_fill(row < floor[j], -math.inf)[None],
                                        mass[j:j + 1], p[j:j + 1])[0][0]
        weights.masked_fill_(x < nucleus, 0)
    return weights


def _top_k_floor(ordered: torch.Tensor, params: list[SamplingParams], vocab: int
                 ) -> torch.Tensor:
    """(R, 1) each row's k-th logit from its most likely logits `ordered` (R, W) descending
    (W >= its top_k), or -inf for a row without a top-k cut."""
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params],
                         device=ordered.device)[:, None]
    kth = ordered.gather(1, top_k.clamp(max=ordered.shape[1]) - 1)
    return torch.where(top_k < vocab, kth, -math.inf)


def _nucleus_floor(ordered: torch.Tensor, mass: torch.Tensor, p: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest logit whose more likely tokens weigh < p of `mass`, from the most likely
    logits `ordered` (R, W) descending; and whether the cut lies among them ((R,) bool; p >= 1
    keeps everything). -> (R, 1) logits, (R,) found."""
    probs = ordered.exp() / mass                                      # (R, W)
    before = probs.cumsum(dim=-1) - probs                             # mass more likely than it
    inside = (before < p).sum(dim=-1, keepdim=True)                   # (R, 1) >= 1
    found = ((inside < ordered.shape[1]) | (before[:, -1:] + probs[:, -1:] >= p))[:, 0]
    floor = ordered.gather(1, inside - 1)
    return torch.where(p >= 1, -math.inf, floor), found | (p >= 1)[:, 0]
