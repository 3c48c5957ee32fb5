"""Structured outputs at the edges of llguidance (model/grammar.py): a grammar that hits its
limits mid-generation, one whose language is empty or only "", one too slow to mask, and
choice strings the Lark lexer refuses raw. Each fails its request alone with an InvalidRequest
naming the constraint's field (HTTP 400 / INVALID_ARGUMENT), never the sampler's or an
internal error, and its neighbours in the step are unchanged."""
from __future__ import annotations

import asyncio
import itertools
import json
import types

import pytest

import model.grammar
from model.constraint import Constraint
from model.engine import InvalidRequest, SamplingParams
from model.grammar import compiler_for

FIELD = "structured_outputs.grammar"
# llguidance's limits hit at the first output tokens: lexer expressions, Earley items
# ('e: e e e | e e | "x" | e "x" e' exceeds 2,000 items in a row by token ~150: the same path,
# ~30 s here)
HUGE_REGEX = Constraint("regex", "(a{1000}){1000}", "structured_outputs.regex")
NEVER_ENDS = Constraint("grammar", 'start: a\na: "x" a', FIELD)


def _p(c: Constraint, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 400, "seed": 1, "constraint": c, **kw})


def _fails_alone(engine, plain: SamplingParams, alone, bad_params: SamplingParams) -> None:
    """Stepped beside a plain request, the bad one fails with an InvalidRequest and the plain
    one's tokens equal `alone` (its run by itself)."""
    rid = engine.add_request("Hello", plain)
    bad = engine.add_request("x", bad_params)
    while engine.has_unfinished():
        engine.step()
    assert isinstance(engine._tracked[bad].error, InvalidRequest)
    assert engine._tracked[rid].outputs[0].completion().token_ids == alone.token_ids
    for r in (rid, bad):
        engine.abort(r)


async def _chunks(engine, prompt, p) -> list:
    return [c async for c in engine.stream(prompt, p)]


@pytest.mark.parametrize("c, kw", [(HUGE_REGEX, {"max_tokens": 5}), (NEVER_ENDS, {})])
def test_a_grammar_over_its_limits_mid_generation_fails_alone_naming_the_field(
        tiny_engine, monkeypatch, c, kw):
    monkeypatch.setattr(model.grammar, "MAX_MASK_MS", float("inf"))   # llguidance's limits
    plain = SamplingParams(max_tokens=30, temperature=0.0)
    alone = tiny_engine.generate("Hello", plain)[0]
    with pytest.raises(InvalidRequest,
                       match=rf"^{c.field}: the grammar failed at output token \d+: it exceeded "
                             "its limits: "):
        tiny_engine.generate(["Hello", "x"], [plain, _p(c, **kw)])
    assert not tiny_engine.has_unfinished()
    _fails_alone(tiny_engine, plain, alone, _p(c, **kw))


@pytest.mark.parametrize("c", [
    Constraint("grammar", "start: start", FIELD),
    Constraint.json_schema({"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/A"}}},
                           "response_format"),
    Constraint.json_schema({"$ref": "#"}, "response_format"),
    Constraint.json_schema(False, "response_format"),
])
def test_a_grammar_that_matches_no_text_is_refused_at_compile(tiny_engine, c):
    with pytest.raises(InvalidRequest, match=rf"^{c.field}: .*matches no "):
        compiler_for(tiny_engine.tokenizer).compile(c).result()
    with pytest.raises(InvalidRequest, match=rf"^{c.field}: .*matches no "):
        tiny_engine.generate("x", _p(c, min_tokens=2))


@pytest.mark.parametrize("spec", ['start: <[2]>', 'start: ""', 'start: "" | <[2]>'])
@pytest.mark.parametrize("min_tokens", [0, 2, 50])
def test_a_grammar_of_only_the_empty_text_ends_stop_whatever_min_tokens(tiny_engine, spec,
                                                                         min_tokens):
    c = Constraint("grammar", spec, FIELD)
    for seed in (None, 1, 2, 3):
        p = _p(c, min_tokens=min_tokens, max_tokens=60, seed=seed,
               temperature=0.0 if seed is None else 1.0)
        [out] = tiny_engine.generate("x", p)
        assert (out.text, out.finish_reason) == ("", "stop")
        chunks = asyncio.run(_chunks(tiny_engine, "x", p))
        assert chunks[-1].finish_reason == "stop" and "".join(ch.text for ch in chunks) == ""


def test_min_tokens_never_bans_everything_a_grammar_allows(tiny_engine):
    """A mask that only stop tokens pass: the grammar wins over min_tokens (no sampler
    error), and the stop token stops."""
    yes = tiny_engine.tokenizer.encode("yes", bos=False)
    c = Constraint("grammar", f"start: <[{yes[-1]}]> \"a\"", FIELD)
    [out] = tiny_engine.generate("x", _p(c, min_tokens=5, stop_token_ids=[yes[-1]]))
    assert out.finish_reason == "stop" and out.token_ids[-1] == yes[-1]


def test_a_row_whose_mask_takes_too_long_fails_alone(tiny_engine, monkeypatch):
    monkeypatch.setattr(model.grammar, "MAX_MASK_MS", 0.0)
    plain = SamplingParams(max_tokens=10, temperature=0.0)
    alone = tiny_engine.generate("Hello", plain)[0]
    c = Constraint.choice(["yes", "no"], "structured_outputs.choice")
    with pytest.raises(InvalidRequest, match=r"^structured_outputs.choice: the grammar took "
                       r"[0-9.]+ ms to compute one token's mask; the limit is 0 ms"):
        tiny_engine.generate("x", _p(c))
    _fails_alone(tiny_engine, plain, alone, _p(c, n=3))
    assert tiny_engine.num_free_blocks() == tiny_engine.kv.allocator.num_blocks


def test_a_requests_choices_are_bounded_together(tiny_engine, monkeypatch):
    """n choices of one request cannot multiply the bound: each row's grammar work is under
    it, their sum is not (a clock of 15 ms a reading: a fill, or a consume, reads 15 ms)."""
    clock = itertools.count(step=0.015)
    monkeypatch.setattr(model.grammar, "time",
                        types.SimpleNamespace(thread_time=lambda: next(clock)))
    monkeypatch.setattr(model.grammar, "MAX_MASK_MS", 40.0)
    c = Constraint.choice(["yes", "no"], "structured_outputs.choice")
    [one] = tiny_engine.generate("x", _p(c))            # 15-30 ms a token: under the bound
    assert one.finish_reason == "stop" and one.text in ("yes", "no")
    with pytest.raises(InvalidRequest, match=r"^structured_outputs.choice: the grammar took "
                       r"[0-9.]+ ms to compute one token's mask for its 3 choices; the limit "
                       r"is 40 ms"):
        tiny_engine.generate("x", _p(c, n=3))
    assert not tiny_engine.has_unfinished()


def test_a_really_ambiguous_grammar_is_stopped_by_the_mask_time_bound(tiny_engine):
    """'e: e e | "x"' grows its Earley sets every token (measured: masks of > 100 ms by token
    ~150 on this machine); the request fails naming the field instead of slowing every step."""
    c = Constraint("grammar", 'start: e\ne: e e | "x"', FIELD)
    with pytest.raises(InvalidRequest, match=rf"^{FIELD}: the grammar (took|exceeded)"):
        tiny_engine.generate("hi", _p(c, max_tokens=2000, ignore_eos=True, min_tokens=2000,
                                      logit_bias={2: -100}))


@pytest.mark.parametrize("ch", ["\x7f", "\x80", "\x85", "\x9f", "\x00", "\x1f", "\u2028",
                                "\ufeff", "\\", '"'])
def test_choice_strings_with_control_characters_compile_and_match(tiny_engine, ch):
    choices = [f"a{ch}b", "c"]
    c = Constraint.choice(choices, "structured_outputs.choice")
    compiler_for(tiny_engine.tokenizer).compile(c).result()
    for seed in (1, 2):
        [out] = tiny_engine.generate("x", _p(c, seed=seed, max_tokens=20))
        assert out.finish_reason == "stop" and out.text in choices


def test_the_boolean_schema_true_is_any_json(tiny_engine):
    c = Constraint.json_schema(True, "response_format")
    compiler = compiler_for(tiny_engine.tokenizer)
    any_json = compiler.compile(Constraint.json_schema({}, "response_format")).result()
    assert compiler.compile(c).result().grammar == any_json.grammar
    [out] = tiny_engine.generate("Hello", _p(c, max_tokens=20, seed=None, temperature=0.0))
    if out.finish_reason == "stop":
        json.loads(out.text)


@pytest.mark.parametrize("c", [
    Constraint("grammar", 'start: "a" b\nb: b', "structured_outputs.grammar"),
    Constraint.json_schema({"type": "object", "properties": {"x": {"$ref": "#/$defs/A"}},
                            "required": ["x"], "$defs": {"A": {"$ref": "#/$defs/A"}}},
                           "guided_json")])
def test_a_dead_end_behind_a_prefix_fails_alone_saying_so(tiny_engine, c):
    """A part whose language is empty behind a prefix compiles (the start allows the prefix)
    and llguidance finds the dead end only on the way (NoExtensionBias): the request fails
    naming the field and saying why, not that the grammar exceeded its limits."""
    with pytest.raises(InvalidRequest, match=rf"^{c.field}: the grammar failed at output token "
                       r"\d+: it reached a part that matches no text"):
        tiny_engine.generate("x", _p(c, max_tokens=30))
    assert not tiny_engine.has_unfinished()
