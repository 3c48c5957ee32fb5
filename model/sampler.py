"""The sampler pipeline: one batched pass from a step's raw logits to each row's token.

For the B rows that sample this step, in vLLM's order and with its formulas (read, then written
afresh here: vllm/v1/sample/sampler.py `Sampler.forward`; the builtin MinTokens and LogitBias
processors of vllm/v1/sample/logits_processor/builtin.py; `apply_penalties` of
vllm/model_executor/layers/utils.py):
  1. logit bias   logits[t] += bias[t]
  2. mask         tokens outside `row.mask` -> -inf (the seam a grammar fills later)
  3. min_tokens   EOS (unless ignore_eos, which never stops on it) and stop_token_ids -> -inf
                  while fewer than min_tokens tokens are generated; not on a masked row whose
                  mask allows nothing else (the grammar wins: its stop tokens stop)
  4. penalties    repetition r on tokens of the prompt or the output: logit / r if > 0, else
                  logit * r (CTRL's, as transformers' RepetitionPenaltyLogitsProcessor); then
                  frequency and presence on output tokens, OpenAI's documented formula
                  mu[j] - c[j] * frequency - float(c[j] > 0) * presence
  5. the draw     greedy rows: argmax of the processed logits (the first maximum); sampled rows:
                  temperature, top-k, top-p, then a seeded inverse-transform draw
                  (model/draw.py).
Each stage gathers only the rows that use it, so a step with every feature off pays for none;
per-row Python work is over a row's own entries (its bias pairs, its new output tokens), never
over the vocabulary, and the penalties rewrite only the logits of tokens a row has seen. Its
counts live in the row's `SequenceState`, kept incrementally. A seeded draw depends on its
row's logits, params and draw_seed alone (batch invariance and reproducibility).
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

from model.draw import SamplingError, draw, rows_of

if TYPE_CHECKING:
    from model.sampling import SamplingParams


TopLogprobs = list[tuple[int, float]]       # (token id, raw logprob), most likely first


class Draw(NamedTuple):
    """One row's sampled token, its raw logprob and (when asked) the most likely alternatives."""
    token: int
    logprob: float
    top: TopLogprobs


Sampled = Draw | SamplingError                      # a row's draw, or its error


class SequenceState:
    """What the sampler keeps for one sequence between its steps, on the logits' device: its
    output token counts (V,) and the distinct tokens it has seen (output, and the prompt's for
    the repetition penalty), built on first use and then brought up to date incrementally from
    `output_ids[counted:]` (no per-step recount): a sequence's output_ids only grow (fewer
    than counted rebuilds them). A preempted or resumed sequence keeps (or rebuilds) it; a
    forked choice starts its own."""

    def __init__(self) -> None:
        self.output_counts: torch.Tensor | None = None      # (V,) int32
        self.output_seen: torch.Tensor | None = None        # (n,) int64, distinct output ids
        self.prompt_seen: torch.Tensor | None = None        # (m,) int64, distinct prompt ids
        self._seen: set[int] = set()
        self.counted = 0                                    # output ids already in the counts

    def counts(self, output_ids: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
        """(V,) int32 occurrences of each token in `output_ids`, updated from the new ones."""
        n = len(output_ids)
        if (self.output_counts is None or n < self.counted
                or self.output_counts.shape[0] != vocab or self.output_counts.device != device):
            self.output_counts = torch.zeros(vocab, dtype=torch.int32, device=device)
            self.output_seen = torch.zeros(0, dtype=torch.int64, device=device)
            self._seen, self.counted = set(), 0
        if n > self.counted:
            new = list(output_ids[self.counted:])
            ids = torch.tensor(new, dtype=torch.int64, device=device)
            self.output_counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
            fresh = [t for t in dict.fromkeys(new) if t not in self._seen]
            if fresh:
                self._seen.update(fresh)
                self.output_seen = torch.cat([self.output_seen, torch.tensor(
                    fresh, dtype=torch.int64, device=device)])
        self.counted = n
        return self.output_counts

    def seen(self, row: SamplingRow, vocab: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens a row's penalties touch and their output counts: (n,) int64 ids (the
        distinct output tokens, then, for a repetition penalty, the prompt's; an id may come
        twice) and (n,) int32 counts."""
        counts = self.counts(row.output_ids, vocab, device)
        ids = self.output_seen
        if row.params.repetition_penalty != 1:
            if self.prompt_seen is None or self.prompt_seen.device != device:
                self.prompt_seen = torch.tensor(sorted(set(row.prompt_ids)), dtype=torch.int64,
                                                device=device)
            ids = torch.cat([ids, self.prompt_seen])
        return ids, counts[ids]


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
    # log Z of the raw distribution: logprob = logit - log Z; not finite iff a logit is NaN or
    # +inf, or all are -inf
    log_z = torch.logsumexp(logits, dim=-1)                             # (B,)
    processed = process_logits(logits, rows, eos_token_id, errors)     # (B, V)
    top, tokens = processed.max(dim=-1)                                 # (B,), first maximum
    raw_ok = log_z.isfinite()
    for i in (~(raw_ok & top.isfinite())).nonzero()[:, 0].tolist():
        errors.setdefault(i, SamplingError(
            f"the model's logits are not finite (row {i})" if not raw_ok[i] else
            f"no token is allowed after logit_bias, mask, min_tokens and penalties (row {i})"))
    draw(processed, top, rows, tokens, generator, errors)
    return _report(logits, log_z, rows, tokens, errors)


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
            stops = sorted({t for t in (*p.stop_token_ids, *(
                () if p.ignore_eos or eos_token_id is None else (eos_token_id,))) if t < vocab})
            if row.mask is None or _allows_more_than(row.mask, stops):   # else the grammar wins
                bans += [(i, t) for t in stops]
        if p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty:
            penalised.append(i)
    if not (bias or masks or bans or penalised):
        return logits
    out = logits.clone()
    if bias:
        _add_bias(out, bias)
    if masks:
        allowed = torch.stack([m.to(device) for _, m in masks])                   # (R, V)
        idx = [i for i, _ in masks]
        if idx == list(range(len(rows))):           # every row masked: in place, no gather
            out.masked_fill_(~allowed, -math.inf)
        else:
            at = torch.tensor(idx, device=device)
            out[at] = out[at].masked_fill(~allowed, -math.inf)
    if bans:
        at = torch.tensor(bans, dtype=torch.int64, device=device)                 # (n, 2)
        out[at[:, 0], at[:, 1]] = -math.inf
    if penalised:
        _penalise(out, [rows[i] for i in penalised], penalised)
    return out


def _allows_more_than(mask: torch.Tensor, stops: list[int]) -> bool:
    """Whether a (V,) mask allows a token outside `stops`: if not, min_tokens does not ban
    them (its grammar can only end: its stop tokens stop)."""
    return int(mask.sum()) > int(mask[stops].sum()) if stops else True


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
    Only the logits of tokens a row has seen change (what the dense formula gives elsewhere is
    the logit itself), so only those n are gathered and rewritten: no (R, V) pass. A token
    listed twice for a row gets the same value twice."""
    device, dtype = out.device, out.dtype
    seen = [r.state.seen(r, out.shape[1], device) for r in rows]
    lengths = torch.tensor([len(ids) for ids, _ in seen], device=device)
    r = torch.repeat_interleave(torch.arange(len(rows), device=device), lengths)     # (n,)
    t = torch.cat([ids for ids, _ in seen])
    c = torch.cat([counts for _, counts in seen]).to(dtype)
    at = (torch.tensor(idx, device=device)[r], t)
    x = out[at]                                                               # (n,)
    per_row = torch.tensor([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty]
                            for p in (row.params for row in rows)], dtype=dtype, device=device)
    rep, freq, pres = per_row[r].unbind(1)                                    # (n,) each
    x = torch.where(x > 0, x / rep, x * rep)
    x = x.clamp(max=torch.finfo(dtype).max)        # a tiny penalty overflows: the top, not inf
    out[at] = x - freq * c - pres * (c > 0).to(dtype)


def _report(logits: torch.Tensor, log_z: torch.Tensor, rows: Sequence[SamplingRow],
            tokens: torch.Tensor, errors: dict[int, SamplingError]) -> list[Sampled]:
    """Each row's token with its raw logprob (logit - log Z) and its top_logprobs
    alternatives (one topk over the rows that ask, k = the most asked, sliced per row), or its
    error."""
    chosen = logits.gather(1, tokens[:, None])[:, 0] - log_z            # (B,)
    tops: list[TopLogprobs] = [[] for _ in rows]
    ask = [i for i, r in enumerate(rows) if r.params.top_logprobs and i not in errors]
    if ask:
        k = max(rows[i].params.top_logprobs for i in ask)
        values, ids = rows_of(logits, ask).topk(k, dim=-1)             # (R, k)
        values -= log_z[ask][:, None]
        for i, row_ids, row_values in zip(ask, ids.tolist(), values.tolist()):
            n = rows[i].params.top_logprobs
            tops[i] = list(zip(row_ids[:n], row_values[:n]))
    return [errors.get(i, Draw(t, lp, tops[i]))
            for i, (t, lp) in enumerate(zip(tokens.tolist(), chosen.tolist()))]
