"""Structured outputs in the in-process engine (model/grammar.py): every kind's outputs match
their constraint, exactly (the leading-space rule), in every path a sequence can take: batched
beside unconstrained rows, n > 1, preempted, resumed, streamed; bad grammars are refused naming
the field, and the engine serves others meanwhile.

Random weights close a JSON string only by chance, so the schemas here bound what runs on:
`maxLength`, `maxItems`, integer ranges, `additionalProperties: false` (measured: they finish
8/8 greedy and seeded on `tiny`)."""
from __future__ import annotations

import asyncio
import json
import re
import threading

import jsonschema
import llguidance as llg
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.constraint import JSON_OBJECT, Constraint
from model.engine import Engine, InvalidRequest, Resume, SamplingParams
from model.grammar import GrammarCompiler, compiler_for, fill_masks


def strict(props: dict, **extra) -> dict:
    return {"type": "object", "properties": props, "required": list(props),
            "additionalProperties": False, **extra}


NAME = {"type": "string", "maxLength": 10}
SCHEMAS = [
    strict({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    strict({"tags": {"type": "array", "items": NAME, "maxItems": 3},
            "kind": {"enum": ["a", "b", "c"]}, "ok": {"type": "boolean"}}),
    strict({"p": strict({"x": {"type": "integer", "minimum": -9, "maximum": 9},
                         "email": {"type": "string",
                                   "pattern": "^[a-z]{1,6}@[a-z]{1,6}\\.com$"}})}),
    {"$defs": {"pt": strict({"x": {"type": "integer", "minimum": 0, "maximum": 9}})},
     **strict({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}})},
]
# ASCII classes: Rust's regex (llguidance) and Python's re differ in Unicode version ("\d")
REGEXES = ["(yes|no|maybe)", "[0-9]{3}-[a-z]{2,4}", "[A-Z][a-z]{1,5}( [A-Z][a-z]{1,5}){0,2}",
           r"[0-9]+\.[0-9]{2}", " ?ab{1,5}", "(a|b)*c"]
CHOICES = ["red", "green", "blue sky", 'quote "q"', "back\\slash", "new\nline", "ünï 😀"]
# a Lark grammar and the Python regex of the same language
LARK = 'start: "x=" NUM ("," NUM)* ";"\nNUM: /[0-9]{1,3}/'
LARK_RE = r"x=[0-9]{1,3}(,[0-9]{1,3})*;"
PROMPT = "Answer in JSON:"


def examples(n: int):
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def params(c: Constraint, seed: int | None = 0, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=kw.pop("max_tokens", 64),
                          temperature=0.0 if seed is None else 1.0, seed=seed, constraint=c, **kw)


def schema_c(i: int) -> Constraint:
    return Constraint.json_schema(SCHEMAS[i], "response_format")


async def _chunks(engine, prompt, p, resume=None) -> list:
    return [c async for c in engine.stream(prompt, p, resume)]


def _check_json(text: str, schema: dict) -> None:
    assert text[:1] == "{" and text[-1:] == "}", repr(text)    # exactly the document
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_json_schema_outputs_validate(tiny_engine, i):
    outs = tiny_engine.generate([PROMPT] * 5, [params(schema_c(i), s) for s in (None, 0, 1, 2, 3)])
    for out in outs:
        assert out.finish_reason == "stop", out.text
        _check_json(out.text, SCHEMAS[i])


def test_json_object_mode_gives_an_object(tiny_engine):
    # greedy on tiny, "Hello" closes the object at once (other prompts run on in a key)
    [out] = tiny_engine.generate("Hello", params(Constraint("json", JSON_OBJECT, "response_format"),
                                                 None))
    assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict)


@examples(25)
@given(regex=st.sampled_from(REGEXES), seed=st.one_of(st.none(), st.integers(0, 2**32)))
def test_regex_outputs_match_whole(tiny_engine, regex, seed):
    [out] = tiny_engine.generate("x", params(Constraint("regex", regex, "structured_outputs.regex"),
                                             seed))
    assert out.finish_reason in ("stop", "length")
    if out.finish_reason == "stop":
        assert re.fullmatch(regex, out.text), (regex, out.text)


@examples(15)
@given(seed=st.one_of(st.none(), st.integers(0, 2**32)))
def test_choice_and_lark_outputs_match(tiny_engine, seed):
    choice, lark = tiny_engine.generate(["x", "y"], [
        params(Constraint.choice(CHOICES, "structured_outputs.choice"), seed),
        params(Constraint("grammar", LARK, "structured_outputs.grammar"), seed)])
    assert choice.finish_reason == "stop" and choice.text in CHOICES
    assert lark.finish_reason in ("stop", "length")
    if lark.finish_reason == "stop":
        assert re.fullmatch(LARK_RE, lark.text), lark.text


def test_the_leading_space_token_is_taken_and_dropped_from_the_text(tiny_engine):
    """'▁{' (Mixtral's natural first token) is allowed and the text is still the document;
    a grammar that may start with a space itself keeps it."""
    brace = tiny_engine.tokenizer.encode("{", bos=False)       # ['▁{']
    assert len(brace) == 1
    bias = {brace[0]: 100.0}
    [out] = tiny_engine.generate(PROMPT, params(schema_c(0), None, logit_bias=bias))
    assert out.token_ids[0] == brace[0]
    _check_json(out.text, SCHEMAS[0])
    compiled = compiler_for(tiny_engine.tokenizer)
    assert compiled.compile(schema_c(0)).result().strip_leading_space
    spaced = Constraint("regex", " ?ab{1,5}", "structured_outputs.regex")
    assert not compiled.compile(spaced).result().strip_leading_space
    space = tiny_engine.tokenizer.encode("ab", bos=False)[0]      # '▁ab'
    [out] = tiny_engine.generate("x", params(spaced, None, logit_bias={space: 100.0}))
    assert out.text.startswith(" ab") and re.fullmatch(" ?ab{1,5}", out.text)


def test_streaming_equals_unary(tiny_engine):
    for c in (schema_c(1), Constraint.choice(CHOICES, "c"), Constraint("regex", REGEXES[2], "r")):
        p = params(c, 7)
        [unary] = tiny_engine.generate(PROMPT, p)
        chunks = asyncio.run(_chunks(tiny_engine, PROMPT, p))
        assert "".join(ch.text for ch in chunks) == unary.text
        assert [t for ch in chunks for t in ch.token_ids] == unary.token_ids
        assert chunks[-1].finish_reason == unary.finish_reason


@pytest.mark.parametrize("c, reason", [
    (Constraint("json", '{"type": "strin"}', "response_format"),
     "response_format: Invalid type: strin"),
    (Constraint("regex", "a(b", "structured_outputs.regex"),
     r"structured_outputs.regex: .*unclosed group"),
    (Constraint("grammar", "start: foo", "structured_outputs.grammar"),
     'structured_outputs.grammar: .*unknown name: "foo"'),
])
def test_a_bad_grammar_is_refused_naming_the_field(tiny_engine, c, reason):
    with pytest.raises(InvalidRequest, match=reason):
        tiny_engine.generate("x", params(c))
    with pytest.raises(InvalidRequest, match=reason):
        asyncio.run(_chunks(tiny_engine, "x", params(c)))
    assert not tiny_engine.has_unfinished()


def test_the_same_content_under_another_field_is_refused_naming_that_field(tiny_engine):
    compiler = compiler_for(tiny_engine.tokenizer)
    for field in ("response_format", "guided_json"):
        with pytest.raises(InvalidRequest, match=f"^{field}: Invalid type"):
            compiler.compile(Constraint("json", '{"type": "strin"}', field)).result()


def test_compiled_grammars_are_cached_by_content(tiny_engine):
    compiler = GrammarCompiler(tiny_engine.tokenizer, cache_size=2)
    a = compiler.compile(Constraint("regex", "a+", "x")).result()
    assert compiler.compile(Constraint("regex", "a+", "y")).result() is a
    compiler.compile(Constraint("regex", "b+", "x")).result()
    compiler.compile(Constraint("regex", "c+", "x")).result()          # a+ is out (LRU)
    assert compiler.compile(Constraint("regex", "a+", "x")).result() is not a


def test_a_request_is_held_until_its_grammar_compiles_and_fails_alone(tiny_checkpoint):
    """add_request never waits: while the compile is blocked the request is held, not
    scheduled; a bad grammar fails its request alone; an unconstrained neighbour runs."""
    engine = Engine.from_pretrained(tiny_checkpoint)
    gate = threading.Event()
    engine.grammars._pool.submit(gate.wait)                 # the compiler thread is busy
    good = engine.add_request("x", params(Constraint.choice(["yes", "no"], "c")))
    bad = engine.add_request("x", params(Constraint("regex", "a(b", "structured_outputs.regex")))
    plain = engine.add_request("x", SamplingParams(max_tokens=3, temperature=0))
    got: dict[str, list] = {good: [], bad: [], plain: []}
    for _ in range(4):
        for chunk in engine.step():
            got[chunk.request_id].append(chunk)
    assert len(got[plain]) == 3 and not got[good] and engine.has_unfinished()
    gate.set()
    while engine.has_unfinished():
        for chunk in engine.step():
            got[chunk.request_id].append(chunk)
    assert "".join(c.text for c in got[good]) in ("yes", "no")
    assert isinstance(engine._tracked[bad].error, InvalidRequest)
    assert "structured_outputs.regex" in str(engine._tracked[bad].error)
    for r in got:
        engine.abort(r)
    assert engine.num_free_blocks() == engine.kv.allocator.num_blocks


@pytest.mark.parametrize("seed", [None, 5])
def test_unconstrained_rows_are_unchanged_by_constrained_neighbours(tiny_engine, seed):
    plain = SamplingParams(max_tokens=20, temperature=0.0 if seed is None else 1.0, seed=seed)
    alone = tiny_engine.generate(["Hello", "The sky"], plain)
    mixed = tiny_engine.generate(["Hello", PROMPT, "The sky", "x"],
                                 [plain, params(schema_c(0), seed), plain,
                                  params(Constraint.choice(CHOICES, "c"), seed)])
    assert [o.token_ids for o in (mixed[0], mixed[2])] == [o.token_ids for o in alone]
    assert [o.logprobs for o in (mixed[0], mixed[2])] == [o.logprobs for o in alone]


def test_n_choices_are_each_valid_and_choice_0_is_n_1(tiny_engine):
    one = tiny_engine.generate(PROMPT, params(schema_c(1), 11))[0]
    outs = tiny_engine.generate(PROMPT, params(schema_c(1), 11, n=4))
    assert outs[0].token_ids == one.token_ids and outs[0].text == one.text
    for out in outs:
        _check_json(out.text, SCHEMAS[1])
    assert len({o.text for o in outs}) > 1


def test_preemption_keeps_each_matcher_exact(tiny_checkpoint, tiny_engine):
    ps = [params(schema_c(i % len(SCHEMAS)), i) for i in range(5)]
    reference = [o.token_ids for o in tiny_engine.generate([PROMPT] * 5, ps)]
    # prefix caching off: the five equal prompts would share their blocks and never run short
    engine = Engine.from_pretrained(tiny_checkpoint, block_size=4, max_model_len=96,
                                    kv_cache_memory=24 * 4 * 2 * 2 * 2 * 16 * 4,
                                    enable_prefix_caching=False)
    outs = engine.generate([PROMPT] * 5, ps)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == reference


@examples(20)
@given(i=st.integers(0, len(SCHEMAS) - 1), seed=st.one_of(st.none(), st.integers(0, 2**32)),
       cut=st.integers(0, 40))
def test_a_resumed_constrained_stream_continues_exactly(tiny_engine, i, seed, cut):
    p = params(schema_c(i), seed)
    whole = asyncio.run(_chunks(tiny_engine, PROMPT, p))
    if cut >= len(whole):
        return
    got = whole[:cut]
    resume = Resume(tuple(t for c in got for t in c.token_ids),
                    tuple(lp for c in got for lp in c.logprobs), sum(len(c.text) for c in got))
    rest = asyncio.run(_chunks(tiny_engine, PROMPT, p, resume))
    assert [t for c in got + rest for t in c.token_ids] == [t for c in whole for t in c.token_ids]
    assert "".join(c.text for c in got + rest) == "".join(c.text for c in whole)
    assert rest[-1].finish_reason == whole[-1].finish_reason


def test_a_resume_the_grammar_rejects_is_refused(tiny_engine):
    bad = tiny_engine.tokenizer.encode("hello", bos=False)
    with pytest.raises(InvalidRequest, match="resume: the grammar rejects token"):
        asyncio.run(_chunks(tiny_engine, PROMPT, params(schema_c(0)),
                            Resume(tuple(bad), (0.0,) * len(bad), 0)))
    assert not tiny_engine.has_unfinished()


def test_the_grammar_end_wins_over_min_tokens(tiny_engine):
    [out] = tiny_engine.generate("x", params(Constraint.choice(["yes"], "c"), None, min_tokens=8))
    assert out.text == "yes" and out.finish_reason == "stop" and len(out.token_ids) < 8


def test_masks_allow_eos_exactly_when_the_grammar_accepts(tiny_engine):
    tok = tiny_engine.tokenizer
    matcher = compiler_for(tok).compile(Constraint("regex", "a+b?", "r")).result().matcher()
    vocab = tiny_engine.cfg.vocab_size
    assert not fill_masks([matcher], vocab, "cpu")[0, tok.eos_id]
    matcher.consume(tok.encode("a", bos=False)[-1])
    assert fill_masks([matcher], vocab, "cpu")[0, tok.eos_id]
    assert not matcher.finished
    matcher.consume(_token(tok, "b"))
    assert matcher.finished


def _token(tok, text: str) -> int:
    return next(i for i in range(tok.vocab_size) if tok.token_bytes(i) == text.encode())


def test_fill_masks_equals_llguidance_per_row(tiny_engine):
    tok = tiny_engine.tokenizer
    compiler = compiler_for(tok)
    matchers = [compiler.compile(c).result().matcher() for c in (
        schema_c(0), Constraint("regex", "[0-9]+", "r"), Constraint.choice(CHOICES, "c"))]
    matchers[1].consume(_token(tok, "7"))
    masks = fill_masks(matchers, tiny_engine.cfg.vocab_size + 40, "cpu")     # padded vocab
    for matcher, mask in zip(matchers, masks):
        bits = np.frombuffer(matcher._m.compute_bitmask(), dtype=np.uint8)
        want = np.unpackbits(bits, bitorder="little")[:tok.vocab_size].astype(bool)
        assert (mask[:tok.vocab_size].numpy() == want).all()
        assert not mask[tok.vocab_size:].any()
    assert isinstance(matchers[0]._m, llg.LLMatcher)
