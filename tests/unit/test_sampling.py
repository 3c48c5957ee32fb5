"""model/sampling.py on hand-made distributions: validation, tiny temperatures, per-row errors,
top-k ties, the nucleus boundary, and temperature scaling (chi-square over seeded draws)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.errors import InvalidRequest
from model.sampling import INT64_MAX, INT64_MIN, SamplingError, SamplingParams, sample, token_seed

CHI2_DF3_P001 = 16.266      # chi-square critical value, 3 degrees of freedom, p = 0.001


GEN = torch.Generator()


def draws(logits: list[float], params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    """The tokens drawn at positions 0..n-1 of a request seeded `seed`."""
    row = torch.tensor([logits])
    return [sample(row, [params], [token_seed(seed, pos)], GEN)[0][0] for pos in range(n)]


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
    [result] = sample(row, [params], [token_seed(1, 0)], GEN)
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
    results = sample(logits, params, [None, token_seed(3, 5), token_seed(3, 5)], GEN)
    assert isinstance(results[1], SamplingError)
    assert results[0][0] == int(logits[0].argmax())
    again = sample(logits[2:], params[2:], [token_seed(3, 5)], GEN)
    assert results[2] == again[0]           # the neighbour drew what it draws alone


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(1, 6).flatmap(lambda width: st.lists(
    st.lists(st.sampled_from([0.0, 1.5, 1.5, -2.0, math.inf, -math.inf, math.nan]),
             min_size=width, max_size=width), min_size=1, max_size=4)))
def test_greedy_takes_the_first_maximum_and_fails_exactly_the_non_finite_rows(rows):
    logits = torch.tensor(rows, dtype=torch.float32)
    results = sample(logits, [SamplingParams(temperature=0.0)] * len(rows), [None] * len(rows),
                     None)
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
    [(token, logprob)] = sample(logits, [params], [token_seed(0, 0)], GEN)
    assert token == 0 and logprob == pytest.approx(torch.log_softmax(logits, -1)[0, 0].item())
