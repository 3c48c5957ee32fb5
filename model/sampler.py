"""The sampler pipeline: one batched pass from a step's raw logits to each row's token.

For the B rows that sample this step, in vLLM's order and with its formulas (read, then written
afresh here: vllm/v1/sample/sampler.py `Sampler.forward`; the builtin MinTokens and LogitBias
processors of vllm/v1/sample/logits_processor/builtin.py; `apply_penalties` of
vllm/model_executor/layers/utils.py):
  1. logit bias   logits[t] += bias[t]
  2. mask         tokens outside `row.mask` -> -inf (the seam a grammar fills later)
  3. min_tokens   EOS (unless ignore_eos, which never stops on it) and stop_token_ids -> -inf
                  while fewer than min_tokens tokens are generated
  4. penalties    repetition r on tokens of the prompt or the output: logit / r if > 0, else
                  logit * r (CTRL's, as transformers' RepetitionPenaltyLogitsProcessor); then
                  frequency and presence on output tokens, OpenAI's documented formula
                  mu[j] - c[j] * frequency - float(c[j] > 0) * presence
  5. the draw     greedy rows: argmax of the processed logits (the first maximum); sampled rows:
                  temperature, top-k, top-p (ties with the last kept logit stay in both), then
                  one uniform from a generator seeded by the row's `draw_seed`, inverted
                  through the row's cumulative weights (exact inverse-transform sampling).
Each stage gathers only the rows that use it, so a step with every feature off pays for none;
per-row Python work is over a row's own entries (its bias pairs, its new output tokens), never
over the vocabulary. Penalty counts live in the row's `SequenceState`: one bincount when first
needed, then the new output tokens only.
A seeded draw depends on its row's logits, params and draw_seed alone (batch invariance and
reproducibility): every op is row-wise, sorts are stable, each draw has its own seeded generator.
Temperature divides the logits *after* subtracting the row's maximum, in float64, so any
temperature small enough that sampling is numerically greedy gives the argmax (never inf - inf
or 0 / 0 = NaN), down to the smallest positive double.
Reported logprobs (the chosen token's and the top-k alternatives) are of the model's RAW
distribution, log_softmax of the unprocessed logits (OpenAI's, and vLLM's default
`raw_logprobs`); alternatives of equal logprob may list in either order.
A row whose raw logits are not finite (NaN, +inf, or all -inf), that allows no token after
processing, whose inputs do not fit the vocabulary, or whose draw fails yields a SamplingError
for that row only: one request's failure never fails its neighbours in the step.
Shapes: B rows (sequences that sample this step), V vocab, R rows that use one stage.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from model.sampling import SamplingParams


class SamplingError(RuntimeError):
    """One row could not be sampled (non-finite logits, no allowed token, or the draw failed)."""


TopLogprobs = list[tuple[int, float]]       # (token id, raw logprob), most likely first


class Draw(NamedTuple):
    """One row's sampled token, its raw logprob and (when asked) the most likely alternatives."""
    token: int
    logprob: float
    top: TopLogprobs


Sampled = Draw | SamplingError                      # a row's draw, or its error


class SequenceState:
    """What the sampler keeps for one sequence between its steps: its output token counts
    (frequency/presence penalties) and prompt-token set (repetition penalty), on the logits'
    device, built on first use and then brought up to date incrementally from
    `output_ids[counted:]` (no per-step recount): a sequence's output_ids only grow (fewer
    than counted rebuilds the counts). A preempted or resumed sequence keeps (or rebuilds) it;
    a forked choice starts its own."""

    def __init__(self) -> None:
        self.output_counts: torch.Tensor | None = None      # (V,) int32
        self.prompt_mask: torch.Tensor | None = None        # (V,) bool
        self.counted = 0                                    # output ids already in the counts

    def counts(self, output_ids: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
        """(V,) int32 occurrences of each token in `output_ids`, updated from the new ones."""
        n = len(output_ids)
        if (self.output_counts is None or n < self.counted
                or self.output_counts.shape[0] != vocab or self.output_counts.device != device):
            ids = torch.tensor(list(output_ids), dtype=torch.int64, device=device)
            self.output_counts = torch.bincount(ids, minlength=vocab).to(torch.int32)
        elif n > self.counted:
            new = torch.tensor(list(output_ids[self.counted:]), dtype=torch.int64, device=device)
            self.output_counts.index_add_(0, new, torch.ones_like(new, dtype=torch.int32))
        self.counted = n
        return self.output_counts

    def prompt(self, prompt_ids: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
        """(V,) bool: the tokens of the prompt, built once."""
        if (self.prompt_mask is None or self.prompt_mask.shape[0] != vocab
                or self.prompt_mask.device != device):
            ids = torch.tensor(list(prompt_ids), dtype=torch.int64, device=device)
            self.prompt_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.prompt_mask[ids] = True
        return self.prompt_mask


@dataclasses.dataclass
class SamplingRow:
    """One row of a step's sampling batch: the sequence's request parameters and state.
    `mask`: the seam for per-row constraints (a later grammar): (V,) bool of allowed tokens,
    applied after the logit bias; None allows all."""
    params: SamplingParams
    draw_seed: int | None                 # token_seed of the draw; None when greedy
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    state: SequenceState
    mask: torch.Tensor | None = None


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_id: int | None,
           generator: torch.Generator | None) -> list[Sampled]:
    """logits (B, V) fp32 -> per row a Draw or a SamplingError for that row alone.
    A sampled row draws with `generator` (on the logits' device) seeded by its `draw_seed`
    (model.sampling.token_seed); greedy rows' draw_seed is None and `generator` may be None
    when every row is greedy. Host syncs are per step, not per row: the rows in error, the
    tokens, their logprobs, the alternatives (a sampled row adds its own draw).
    ValueError if `rows` does not hold one row per line of `logits`."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"sample: logits {tuple(logits.shape)} for {len(rows)} rows")
    errors: dict[int, SamplingError] = {}
    processed = process_logits(logits, rows, eos_token_id, errors)     # (B, V)
    top, tokens = processed.max(dim=-1)                                 # (B,), first maximum
    raw_ok = top.isfinite() if processed is logits else logits.amax(dim=-1).isfinite()
    for i in (~(raw_ok & top.isfinite())).nonzero()[:, 0].tolist():
        errors.setdefault(i, SamplingError(
            f"the model's logits are not finite (row {i})" if not raw_ok[i] else
            f"no token is allowed after logit_bias, mask, min_tokens and penalties (row {i})"))
    _draw(processed, rows, tokens, generator, errors)
    return _report(logits, rows, tokens, errors)


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_id: int | None,
                   errors: dict[int, SamplingError]) -> torch.Tensor:
    """Stages 1-4 on the rows that use them: (B, V) -> (B, V), `logits` itself when no row
    uses any. A row whose inputs do not fit the vocabulary is left out and put in `errors`."""
    vocab, device = logits.shape[1], logits.device
    bias, masks, bans, penalised = [], [], [], []
    for i, row in enumerate(rows):
        p = row.params
        problem = _input_problem(row, vocab)
        if problem:
            errors[i] = SamplingError(f"{problem} (row {i})")
            continue
        if p.logit_bias:
            bias.append((i, *_bias_tensors(p.logit_bias)))
        if row.mask is not None:
            masks.append((i, row.mask))
        if len(row.output_ids) < p.min_tokens:
            stops = (*p.stop_token_ids, *(() if p.ignore_eos or eos_token_id is None
                                           else (eos_token_id,)))
            bans += [(i, t) for t in stops if t < vocab]
        if p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty:
            penalised.append(i)
    if not (bias or masks or bans or penalised):
        return logits
    out = logits.clone()
    if bias:
        _add_bias(out, bias)
    if masks:
        idx = torch.tensor([i for i, _ in masks], device=device)
        allowed = torch.stack([m.to(device) for _, m in masks])                   # (R, V)
        out[idx] = out[idx].masked_fill(~allowed, -math.inf)
    if bans:
        at = torch.tensor(bans, dtype=torch.int64, device=device)                 # (n, 2)
        out[at[:, 0], at[:, 1]] = -math.inf
    if penalised:
        _penalise(out, [rows[i] for i in penalised], penalised)
    return out


def _input_problem(row: SamplingRow, vocab: int) -> str | None:
    """Why a row's own inputs cannot apply to logits of `vocab` tokens, or None."""
    bias = row.params.logit_bias
    if bias and not 0 <= bias[0][0] <= bias[-1][0] < vocab:        # sorted by token id
        return f"logit_bias token ids must be in [0, {vocab}), got {bias[-1][0]}"
    mask = row.mask
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (vocab,)):
        return f"mask must be a ({vocab},) bool tensor, got {tuple(mask.shape)} {mask.dtype}"
    return None


@functools.lru_cache(maxsize=1024)
def _bias_tensors(pairs: tuple[tuple[int, float], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's logit_bias as (n,) int64 token ids and (n,) fp32 biases, built once."""
    return (torch.tensor([t for t, _ in pairs], dtype=torch.int64),
            torch.tensor([b for _, b in pairs], dtype=torch.float32))


def _add_bias(out: torch.Tensor, bias: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
    """Stage 1: out[row, token] += bias, for every (row, token ids, biases) at once."""
    device = out.device
    row_ids = torch.cat([torch.full_like(ids, i) for i, ids, _ in bias]).to(device)
    token_ids = torch.cat([ids for _, ids, _ in bias]).to(device)
    values = torch.cat([v for _, _, v in bias]).to(device, out.dtype)
    out.index_put_((row_ids, token_ids), values, accumulate=True)


def _penalise(out: torch.Tensor, rows: list[SamplingRow], idx: list[int]) -> None:
    """Stage 4 on the R rows `idx` of `out`, in place: repetition, then frequency, presence.
    Only the logits of tokens a row has seen change, so only those n are gathered and
    rewritten (what the dense formula gives elsewhere is the logit itself)."""
    vocab, device, dtype = out.shape[1], out.device, out.dtype
    counts = torch.stack([r.state.counts(r.output_ids, vocab, device) for r in rows])  # (R, V)
    seen = counts > 0                                                         # (R, V)
    if any(r.params.repetition_penalty != 1 for r in rows):
        no_prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
        seen |= torch.stack([r.state.prompt(r.prompt_ids, vocab, device)
                             if r.params.repetition_penalty != 1 else no_prompt for r in rows])
    r, t = seen.nonzero(as_tuple=True)                                        # (n,) each
    at = (torch.tensor(idx, device=device)[r], t)
    x, c = out[at], counts[r, t].to(dtype)                                    # (n,)
    per_row = torch.tensor([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty]
                            for p in (row.params for row in rows)], dtype=dtype, device=device)
    rep, freq, pres = per_row[r].unbind(1)                                    # (n,) each
    x = torch.where(x > 0, x / rep, x * rep)
    x = x.clamp(max=torch.finfo(dtype).max)        # a tiny penalty overflows: the top, not inf
    out[at] = x - freq * c - pres * (c > 0).to(dtype)


def _draw(processed: torch.Tensor, rows: Sequence[SamplingRow], tokens: torch.Tensor,
          generator: torch.Generator | None, errors: dict[int, SamplingError]) -> None:
    """Stage 5 for the sampled rows (greedy ones keep the argmax in `tokens`), in place: one
    uniform per row from its own seeded generator, inverted through the row's cumulative
    weights (exact inverse-transform sampling; one vectorised search for all rows)."""
    idx, uniforms = [], []
    for i, row in enumerate(rows):
        if row.params.greedy or i in errors:
            continue
        try:
            gen = generator.manual_seed(row.draw_seed)
            uniforms.append(torch.rand(1, dtype=torch.float64, generator=gen,
                                       device=processed.device))
            idx.append(i)
        except (RuntimeError, TypeError, AttributeError) as e:
            errors[i] = SamplingError(f"sampling failed: {e}")
    if not idx:
        return
    params = [rows[i].params for i in idx]
    x = processed[idx].double()           # any positive Python float temperature is a float64
    temperature = torch.tensor([p.temperature for p in params], dtype=x.dtype, device=x.device)
    x.sub_(x.amax(dim=-1, keepdim=True)).div_(temperature[:, None])   # (R, V) <= 0, max at 0
    cdf = _top_k_top_p_weights(x, params).cumsum_(dim=-1)             # (R, V)
    total = cdf[:, -1:]                                               # (R, 1) >= 1
    at = torch.minimum(torch.cat(uniforms)[:, None] * total,          # never past the last
                       torch.nextafter(total, torch.zeros_like(total)))   # weighted token
    tokens[torch.tensor(idx, device=tokens.device)] = torch.searchsorted(cdf, at, right=True)[:, 0]


NUCLEUS_GUESS = 1024        # top-p looks for its cut among this many most likely tokens first


def _top_k_top_p_weights(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """exp(x) with each row's top-k logits kept, then those whose more likely tokens weigh
    < top_p of what top-k kept (so the token that crosses top_p stays); ties with the last
    kept stay in both; the rest weigh 0. One topk serves both (a full sort only for a row whose
    nucleus is wider than NUCLEUS_GUESS tokens). In place where it can (these are the step's
    largest tensors). x (R, V) float64, each row's max 0 -> (R, V) weights in [0, 1]."""
    vocab = x.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    if all(k == vocab for k in top_k) and all(p >= 1 for p in top_p):
        return x.exp_()
    width = min(vocab, max(k if k < vocab else NUCLEUS_GUESS if p < 1 else 1
                           for k, p in zip(top_k, top_p)))
    ordered = x.topk(width, dim=-1).values                           # (R, width), descending
    k = torch.tensor([min(k, width) for k in top_k], device=x.device)[:, None] - 1
    floor = torch.where(torch.tensor(top_k, device=x.device)[:, None] < vocab,
                        ordered.gather(1, k), -math.inf)              # (R, 1) the k-th logit
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


def _report(logits: torch.Tensor, rows: Sequence[SamplingRow], tokens: torch.Tensor,
            errors: dict[int, SamplingError]) -> list[Sampled]:
    """Each row's token with its raw logprob and its top_logprobs alternatives (one topk over
    the rows that ask, k = the most asked, sliced per row), or its error."""
    logprobs = torch.log_softmax(logits, dim=-1)                        # (B, V)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]                  # (B,)
    tops: list[TopLogprobs] = [[] for _ in rows]
    ask = [i for i, r in enumerate(rows) if r.params.top_logprobs and i not in errors]
    if ask:
        k = max(rows[i].params.top_logprobs for i in ask)
        values, ids = logprobs[ask].topk(k, dim=-1)                     # (R, k)
        for i, row_ids, row_values in zip(ask, ids.tolist(), values.tolist()):
            n = rows[i].params.top_logprobs
            tops[i] = list(zip(row_ids[:n], row_values[:n]))
    return [errors.get(i, Draw(t, lp, tops[i]))
            for i, (t, lp) in enumerate(zip(tokens.tolist(), chosen.tolist()))]
