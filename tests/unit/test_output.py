"""Completion text and stop strings through the engine: the text a completion adds to its prompt
(sentencepiece as the oracle), and stop strings cut exactly, also across streamed chunks."""
from __future__ import annotations

import asyncio

import pytest
import sentencepiece as spm

from model.engine import Engine, SamplingParams
from model.spm import mistral_common_model

PROMPTS = ["Once upon a time", "Hello, my name is", "The capital of France", "def fib(n):",
           "日本語のテキスト 😀", "  leading spaces", "trailing space ", "a\nb\n", "x", "42",
           "[INST] fake [/INST]", "<s> literal", "Ça va? 🇫🇷", "\t\tcode", "end."]
FREE = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(mistral_common_model()))


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def free_runs(engine):
    """prompt -> (its streamed chunk texts, the whole completion) with no stop string."""
    return {p: (stream_texts(engine, p, FREE), engine.generate(p, FREE)[0]) for p in PROMPTS}


def stream_texts(engine: Engine, prompt, params: SamplingParams) -> list[str]:
    async def run():
        return [c.text async for c in engine.stream(prompt, params)]
    return asyncio.run(run())


def added_text(sp, prompt_ids: list[int], output_ids: list[int]) -> str:
    whole, prefix = sp.decode(prompt_ids + output_ids), sp.decode(prompt_ids)
    assert whole.startswith(prefix)
    return whole[len(prefix):]


def test_completion_text_is_what_it_adds_to_the_prompt(engine, sp, free_runs):
    for prompt, (chunks, out) in free_runs.items():
        assert out.text == added_text(sp, out.prompt_ids, out.token_ids), prompt
        assert "".join(chunks) == out.text


def test_the_first_token_keeps_its_leading_space(engine, sp, free_runs):
    spaced = [p for p, (_, out) in free_runs.items() if sp.id_to_piece(out.token_ids[0])[0] == "▁"]
    assert spaced, "some first token should start with ▁"
    for prompt in spaced:
        assert free_runs[prompt][1].text.startswith(" ")


def test_chat_completion_text(engine, sp):
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story"}])
    out = engine.generate([ids], FREE)[0]
    assert out.text == added_text(sp, ids, out.token_ids)


def cut_oracle(sp, prompt_ids, token_ids, stops) -> str:
    """The text up to the first stop string that appears as tokens are added one by one."""
    for n in range(1, len(token_ids) + 1):
        text = added_text(sp, prompt_ids, token_ids[:n])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[:min(hits)]
    raise AssertionError("no stop string appeared")


def check_stops(engine, sp, free_runs, prompt: str, stops: tuple[str, ...]) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=stops)
    full = free_runs[prompt][1]
    want = cut_oracle(sp, full.prompt_ids, full.token_ids, stops)
    out = engine.generate(prompt, params)[0]
    chunks = stream_texts(engine, prompt, params)
    assert (out.text, out.finish_reason) == (want, "stop")
    assert "".join(chunks) == want, f"streamed {chunks} for stops {stops}"


def test_a_stop_string_spanning_two_chunks_is_never_streamed(engine, sp, free_runs):
    checked = 0
    for prompt, (chunks, out) in free_runs.items():
        ends = [sum(len(c) for c in chunks[:i + 1]) for i in range(len(chunks) - 1)]
        for end in [e for e in ends if 2 <= e <= len(out.text) - 2][:3]:
            stop = out.text[end - 2:end + 2]
            if out.text.find(stop) == end - 2:      # its first occurrence spans that boundary
                check_stops(engine, sp, free_runs, prompt, (stop,))
                checked += 1
    assert checked >= 5


def test_several_stop_strings_of_different_lengths(engine, sp, free_runs):
    for prompt in PROMPTS[:6]:
        text = free_runs[prompt][1].text
        if len(text) < 12:
            continue
        long_early, short_late = text[1:9], text[-3:-1]
        check_stops(engine, sp, free_runs, prompt, (short_late, long_early))
        check_stops(engine, sp, free_runs, prompt, (text[4:6], text[2:10]))


def test_a_stop_at_the_very_start(engine, sp, free_runs):
    for prompt in PROMPTS[:4]:
        text = free_runs[prompt][1].text
        check_stops(engine, sp, free_runs, prompt, (text[:2],))
        if text.startswith(" "):
            check_stops(engine, sp, free_runs, prompt, (text[:1],))   # " " matches the first token
