"""model/sampling.py on hand-made distributions: validation, tiny temperatures, per-row errors,
top-k ties, the nucleus boundary, and temperature scaling (chi-square over seeded draws)."""
from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.draw import _top_k_top_p_weights
from model.errors import InvalidRequest
from model.sampler import process_logits
from model.sampling import (
    INT64_MAX,
    INT64_MIN,
    SamplingError,
    SamplingParams,
    SamplingRow,
    SequenceState,
    sample,
    token_seed,
)

CHI2_DF3_P001 = 16.266      # chi-square critical value, 3 degrees of freedom, p = 0.001


GEN = torch.Generator()
EOS = 2                     # the EOS id these hand-made vocabularies pretend to have


def rows_of(params: list[SamplingParams], seeds: list[int | None],
            outputs: list[list[int]] | None = None) -> list[SamplingRow]:
    """Sampling rows with empty prompts (or `outputs` so far) and fresh sequence states."""
    outputs = outputs or [[] for _ in params]
    return [SamplingRow(p, s, [], out, SequenceState())
            for p, s, out in zip(params, seeds, outputs)]


def draws(logits: list[float], params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    """The tokens drawn at positions 0..n-1 of a request seeded `seed`."""
    row = torch.tensor([logits])
    return [sample(row, rows_of([params], [token_seed(seed, pos)]), EOS, GEN)[0].token
            for pos in range(n)]


# ---- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=True), "max_tokens"),
    (dict(max_tokens=2.0), "max_tokens"),
    (dict(temperature=-1), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=math.nan), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k=1.5), "top_k"),
    (dict(seed="x"), "seed"), (dict(seed=2**63), "seed"), (dict(seed=-2**63 - 1), "seed"),
    (dict(seed=2**64), "seed"), (dict(seed=True), "seed"),
    (dict(stop=("",)), "stop"), (dict(stop=(1,)), "stop"), (dict(stop=5), "stop"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"), (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(logit_bias=[(5, 100.0), (5, 100.0)]), "logit_bias"),   # twice: +200 past the limit
])
def test_every_bad_field_is_named_with_its_range(kwargs, field):
    with pytest.raises(InvalidRequest, match=f"^{field} must"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("seed", [INT64_MIN, -1, 0, INT64_MAX])
def test_seeds_at_the_int64_bounds_sample(seed):
    params = SamplingParams(temperature=1.0, seed=seed)
    first = draws([0.0, 0.1, 0.2, 0.3], params, 8, seed=seed)
    assert first == draws([0.0, 0.1, 0.2, 0.3], params, 8, seed=seed)


@pytest.mark.parametrize("a, b", [(1, 2**32 + 1), (0, 2**32), (-1, 2**63 - 1), (0, -2**63),
                                  (5, 5 + 7 * 2**32)])
def test_seeds_differing_only_in_high_bits_draw_differently(a, b):
    """torch's CPU generator keeps only a seed's low 32 bits: these pairs once drew alike."""
    logits = torch.zeros(1000).tolist()
    params = SamplingParams(temperature=1.0)
    assert draws(logits, params, 8, seed=a) != draws(logits, params, 8, seed=b)


def test_a_single_stop_string_is_a_list_of_one():
    assert SamplingParams(stop="\n").stop == ("\n",)


# ---- tiny temperatures and per-row failures -------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(temperature=st.floats(min_value=1e-45, max_value=1e-6),
       logits=st.lists(st.floats(min_value=-1e4, max_value=1e4), min_size=2, max_size=64))
def test_a_tiny_temperature_gives_the_greedy_token(temperature, logits):
    row = torch.tensor([logits], dtype=torch.float32)
    top2 = torch.topk(row[0], 2).values
    if (top2[0] - top2[1]).item() < 1e-3:
        return                              # near-ties are genuinely random at this temperature
    params = SamplingParams(temperature=temperature, seed=1)
    [result] = sample(row, rows_of([params], [token_seed(1, 0)]), EOS, GEN)
    assert not isinstance(result, SamplingError)
    assert result[0] == int(row.argmax()) and math.isfinite(result[1])


@pytest.mark.parametrize("bad", [math.nan, math.inf, "all -inf"])
def test_non_finite_logits_fail_only_their_row(bad):
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    if bad == "all -inf":
        logits[1] = -math.inf
    else:
        logits[1, 4] = bad
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=3),
              SamplingParams(temperature=0.7, seed=3)]
    results = sample(logits, rows_of(params, [None, token_seed(3, 5), token_seed(3, 5)]), EOS,
                     GEN)
    assert isinstance(results[1], SamplingError)
    assert results[0][0] == int(logits[0].argmax())
    again = sample(logits[2:], rows_of(params[2:], [token_seed(3, 5)]), EOS, GEN)
    assert results[2] == again[0]           # the neighbour drew what it draws alone


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(1, 6).flatmap(lambda width: st.lists(
    st.lists(st.sampled_from([0.0, 1.5, 1.5, -2.0, math.inf, -math.inf, math.nan]),
             min_size=width, max_size=width), min_size=1, max_size=4)))
def test_greedy_takes_the_first_maximum_and_fails_exactly_the_non_finite_rows(rows):
    logits = torch.tensor(rows, dtype=torch.float32)
    results = sample(logits, rows_of([SamplingParams(temperature=0.0)] * len(rows),
                                     [None] * len(rows)), EOS, None)
    for row, result in zip(rows, results):
        bad = any(math.isnan(v) or v == math.inf for v in row) or all(v == -math.inf for v in row)
        assert isinstance(result, SamplingError) == bad
        if not bad:
            assert result[0] == row.index(max(row))


# ---- the distribution ----------------------------------------------------------------------

def test_top_k_keeps_ties_with_the_kth_logit():
    drawn = set(draws([3.0, 2.0, 2.0, 1.0, 2.0], SamplingParams(temperature=1.0, top_k=2), 600))
    assert drawn == {0, 1, 2, 4}


@pytest.mark.parametrize("top_p, kept", [(0.5, {0}), (0.5001, {0, 1}), (0.8, {0, 1}),
                                         (0.8001, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_nucleus_keeps_the_token_that_crosses_top_p(top_p, kept):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    drawn = set(draws(logits, SamplingParams(temperature=1.0, top_p=top_p), 800))
    assert drawn == kept


def test_nucleus_keeps_ties_with_its_cut():
    """Which of equally likely tokens stays must not depend on their ids (as top-k's ties)."""
    drawn = set(draws([1.0, 1.0, 1.0, 0.0], SamplingParams(temperature=1.0, top_p=0.2), 300))
    assert drawn == {0, 1, 2}


@pytest.mark.parametrize("top_k, top_p", [(0, 0.99), (0, 0.5), (3, 0.9), (1000, 0.95)])
def test_a_nucleus_wider_than_the_first_guess_is_cut_exactly(top_k, top_p):
    """A flat distribution over 5000 tokens: the cut lies beyond the first topk's reach."""
    logits = torch.linspace(0, -1e-3, 5000)[None].double()
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    kept = _top_k_top_p_weights(logits.clone(), [params])[0] > 0
    probs = torch.softmax(logits[0][:top_k or 5000], 0)
    expected = int(((probs.cumsum(0) - probs) < top_p).sum())
    assert kept.sum().item() == expected and bool(kept[:expected].all())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    logits = [1.0, 0.2, -0.5, 0.7]
    n = 20000
    counts = torch.bincount(torch.tensor(draws(logits, SamplingParams(temperature=temperature),
                                               n, seed=7)), minlength=4).double()
    expected = torch.softmax(torch.tensor(logits, dtype=torch.float64) / temperature, 0) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < CHI2_DF3_P001, f"frequencies {counts.tolist()} vs expected {expected.tolist()}"


def test_logprob_is_of_the_raw_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    params = SamplingParams(temperature=0.3, top_k=1)
    [(token, logprob, _)] = sample(logits, rows_of([params], [token_seed(0, 0)]), EOS, GEN)
    assert token == 0 and logprob == pytest.approx(torch.log_softmax(logits, -1)[0, 0].item())


# ---- the pipeline: bias, mask, min_tokens, penalties ---------------------------------------

def test_a_row_with_no_feature_on_is_not_copied():
    logits = torch.randn(2, 10)
    rows = rows_of([SamplingParams(temperature=0.0), SamplingParams(seed=1)], [None, 5])
    assert process_logits(logits, rows, EOS, {}) is logits


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(st.lists(st.integers(0, 9), max_size=4), min_size=1, max_size=6),
       restart=st.integers(0, 5))
def test_incremental_counts_equal_a_recount(steps, restart):
    """Counts follow output_ids as they grow, and are rebuilt when they shrink (a sequence
    re-run from fewer tokens)."""
    state, output = SequenceState(), []
    for i, new in enumerate(steps):
        if i == restart:
            output = output[:len(output) // 2]
            state.counts(output, 10, torch.device("cpu"))
        output += new
        counts = state.counts(output, 10, torch.device("cpu"))
        assert counts.tolist() == torch.bincount(torch.tensor(output, dtype=torch.int64),
                                                 minlength=10).tolist()


def test_a_tiny_repetition_penalty_keeps_the_row_finite():
    logits = torch.tensor([[0.5, 0.4, -0.3, 0.1]])
    params = SamplingParams(temperature=0.0, repetition_penalty=1e-30)
    [(token, logprob, _)] = sample(logits, rows_of([params], [None], [[1, 3]]), EOS, GEN)
    assert token == 1 and logprob == pytest.approx(torch.log_softmax(logits, -1)[0, 1].item())


def test_the_mask_seam_allows_only_its_tokens_and_fails_only_its_row():
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    allowed = torch.zeros(8, dtype=torch.bool)
    allowed[[2, 5]] = True
    params = [SamplingParams(seed=4)] * 3
    rows = rows_of(params, [token_seed(4, 0)] * 3)
    rows[0].mask, rows[1].mask = allowed, torch.zeros(8, dtype=torch.bool)
    drawn = {sample(logits[:1], rows[:1], EOS, GEN)[0].token for _ in range(50)}
    results = sample(logits, rows, EOS, GEN)
    assert drawn <= {2, 5} and isinstance(results[1], SamplingError)
    assert results[2] == sample(logits[2:], rows[2:], EOS, GEN)[0]
    rows[1].mask = torch.ones(7, dtype=torch.bool)
    assert "mask must be" in str(sample(logits, rows, EOS, GEN)[1])


def test_a_logit_bias_outside_the_vocabulary_fails_only_its_row():
    logits = torch.zeros(2, 4)
    rows = rows_of([SamplingParams(temperature=0.0, logit_bias={9: 1.0}),
                    SamplingParams(temperature=0.0, logit_bias={3: 1.0})], [None, None])
    bad, good = sample(logits, rows, EOS, GEN)
    assert isinstance(bad, SamplingError) and "logit_bias" in str(bad) and good.token == 3


@pytest.mark.parametrize("ignore_eos, generated, expected", [
    (False, 0, 3), (False, 2, 3), (True, 2, EOS), (False, 3, EOS)])
def test_min_tokens_bans_eos_and_stop_token_ids_until_reached(ignore_eos, generated, expected):
    """EOS (2) is the most likely, stop token 1 next, then 3; with ignore_eos EOS stops
    nothing, so it is not banned (vLLM's MinTokens processor)."""
    logits = torch.tensor([[0.0, 9.0, 9.5, 1.0]])
    params = SamplingParams(temperature=0.0, max_tokens=5, min_tokens=3, stop_token_ids=(1,),
                            ignore_eos=ignore_eos)
    [draw] = sample(logits, rows_of([params], [None], [[0] * generated]), EOS, GEN)
    assert draw.token == expected


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_each_row_of_a_mixed_batch_draws_what_it_draws_alone(data):
    """Rows with different features, temperatures, top-k and top-p in one call (the vectorised
    stages) draw exactly what each draws alone, with the same raw logprobs and alternatives."""
    width = data.draw(st.integers(2, 40))
    n = data.draw(st.integers(1, 5))
    logits = torch.randn(n, width, generator=torch.Generator().manual_seed(data.draw(
        st.integers(0, 2**32))))
    token = st.integers(0, width - 1)
    params = [SamplingParams(
        max_tokens=4, min_tokens=data.draw(st.integers(0, 4)),
        temperature=data.draw(st.sampled_from([0.0, 0.3, 1.0, 2.5])),
        top_k=data.draw(st.integers(0, width + 1)), top_p=data.draw(st.sampled_from([1, .9, .4])),
        seed=1, stop_token_ids=tuple(data.draw(st.lists(token, max_size=2))),
        repetition_penalty=data.draw(st.sampled_from([1.0, 0.5, 1.7])),
        frequency_penalty=data.draw(st.floats(-2, 2)), presence_penalty=data.draw(st.floats(-2, 2)),
        logit_bias=data.draw(st.dictionaries(token, st.floats(-100, 100), max_size=3)),
        top_logprobs=data.draw(st.integers(0, min(width, 20)))) for _ in range(n)]
    outputs = [data.draw(st.lists(token, max_size=5)) for _ in range(n)]
    seeds = [token_seed(data.draw(st.integers(0, 99)), 3) for _ in range(n)]
    together = sample(logits, rows_of(params, seeds, outputs), EOS, GEN)
    for i in range(n):
        alone = sample(logits[i:i + 1], rows_of(params[i:i + 1], seeds[i:i + 1],
                                                outputs[i:i + 1]), EOS, GEN)[0]
        assert outcome(together[i]) == outcome(alone)


def outcome(result):
    """A Draw, or an error's message without the row number it names."""
    if isinstance(result, SamplingError):
        return re.sub(r" \(row \d+\)", "", str(result))
    return result


@settings(max_examples=300, deadline=None)
@given(data=st.data(), vocab=st.integers(2, 3000), batch=st.integers(1, 4),
       levels=st.integers(1, 40), seed=st.integers(0, 2**32))
def test_a_cut_row_draws_among_its_top_tokens_what_the_whole_vocabulary_gives(data, vocab,
                                                                               batch, levels,
                                                                               seed):
    """Rows with a top-k or top-p cut draw among their most likely tokens only (in token-id
    order): the same token as the weights over the whole vocabulary give, ties at the edge
    and nuclei wider than the first guess included (few logit levels make many ties)."""
    logits = torch.randint(0, levels, (batch, vocab),
                           generator=torch.Generator().manual_seed(seed)).float() / 7
    params = [SamplingParams(temperature=data.draw(st.sampled_from([0.3, 1.0, 5.0])),
                             top_k=data.draw(st.sampled_from([0, 1, 2, 5, 50, 1500])),
                             top_p=data.draw(st.sampled_from([0.1, 0.5, 0.9, 0.999, 1.0])))
              for _ in range(batch)]
    seeds = [token_seed(seed, i) for i in range(batch)]
    got = [d.token for d in sample(logits, rows_of(params, seeds), EOS, GEN)]
    for row, p, draw_seed, token in zip(logits, params, seeds, got):
        x = row.double()
        weights = _top_k_top_p_weights(((x - x.max()) / p.temperature)[None], [p])[0]
        u = torch.rand(1, dtype=torch.float64, generator=GEN.manual_seed(draw_seed))
        cdf = weights.cumsum(0)
        at = torch.minimum(u * cdf[-1], torch.nextafter(cdf[-1], torch.zeros(())))
        assert token == int(torch.searchsorted(cdf, at, right=True))
