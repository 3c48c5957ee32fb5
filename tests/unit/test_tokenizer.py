"""model/tokenizer.py against its oracles: sentencepiece (encode/decode), mistral-common (chat)
and transformers (loading a saved dir). Everything is compared to an oracle at run time."""
from __future__ import annotations

import hashlib
import logging
import random
import unicodedata

import pytest
import sentencepiece as spm
from jinja2.sandbox import ImmutableSandboxedEnvironment
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from model.tokenizer import (DEFAULT_CHAT_TEMPLATE, ChatTemplateError, Tokenizer,
                             _mistral_common_model)

MODEL_FILE = _mistral_common_model()


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(MODEL_FILE))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXTRAL_EP_CACHE", str(tmp_path_factory.mktemp("cache")))
        return Tokenizer.from_pretrained()


@pytest.fixture(scope="module")
def mistral():
    return MistralTokenizer.v1()


# ---- the corpus -----------------------------------------------------------------------------

FIXED = [
    "", " ", "  ", "\n", "\r\n", "\t", "a", "Hello world", "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "It's a truth universally acknowledged, that a single man in possession of a good fortune...",
    "😀", "👍🏽", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "🇫🇷🇯🇵🇺🇸", "I ❤️ Unicode ☃",
    "日本語のテキストです。", "中文分词测试，你好世界！", "한국어 문장입니다.",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "Привет, мир", "Γειά σου Κόσμε", "ภาษาไทย",
    "café", unicodedata.normalize("NFD", "café"), "naïve résumé Ångström",
    unicodedata.normalize("NFD", "naïve résumé Ångström"), "Ǆ ﬁ ① ｆｕｌｌｗｉｄｔｈ",
    "def f(x):\n    return x + 1\n", "\tif (a) {\n\t\tb();\n\t}\n", "int main() { return 0; }",
    "for i in range(10):\n        print(i)  # comment\n",
    "0", "7", "42", "3.14159", "1234567890123456789012345", "-17e+10", "2024-01-01T12:00:00Z",
    "<s>", "</s>", "<unk>", "<s> hi </s>", "a<s>b</s>c", "<<s>>", "<0x41>", "▁", "▁▁x",
    "[INST]", "[/INST]", "[INST] Hello [/INST]", "[INST]Hello[/INST]",
    "line1\nline2\r\nline3\rline4", "trailing newline\n", "\n\nleading newlines",
    "".join(chr(c) for c in range(0x20)), "\x7f", "a\x00b", "\x1b[31mred\x1b[0m",
    "ⅷ ½ ² ™ © ® ° µ", "\u200b\u200c\u200d\ufeff", "\u00a0non-breaking\u3000space",
    "https://example.com/path?q=1&r=2#frag", "email@example.com", "$$ \\frac{a}{b} $$",
]


def _space_strings() -> list[str]:
    out = []
    for n in range(1, 21):
        out += [" " * n + "lead", "trail" + " " * n, "in" + " " * n + "ternal", " " * n]
    return out


def _random_unicode(rng: random.Random, n: int) -> str:
    chars = []
    while len(chars) < n:
        c = rng.choice([rng.randrange(0x20, 0x80), rng.randrange(0x80, 0x800),
                        rng.randrange(0x800, 0x10000), rng.randrange(0x10000, 0x110000)])
        if not 0xD800 <= c < 0xE000:
            chars.append(chr(c))
    return "".join(chars)


def _mixed(rng: random.Random) -> str:
    parts = rng.sample(FIXED[7:], 4) + [_random_unicode(rng, 3), str(rng.randrange(10**12))]
    rng.shuffle(parts)
    return "".join(p + rng.choice(["", " ", "  ", "\n", "\t", "   \n "]) for p in parts)


def corpus() -> list[str]:
    rng = random.Random(1234)
    strings = FIXED + _space_strings()
    strings += [_random_unicode(rng, rng.randrange(1, 40)) for _ in range(40)]
    strings += [_mixed(rng) for _ in range(40)]
    strings += [" ".join(FIXED[7:12]) * 40, _random_unicode(rng, 1500), "x" * 3000 + " y" * 500]
    return strings


CORPUS = corpus()


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 200 and max(len(s) for s in CORPUS) > 2000


# ---- encode / decode parity -----------------------------------------------------------------

def test_encode_matches_sentencepiece(tok, sp):
    for s in CORPUS:
        assert tok.encode(s) == [sp.bos_id()] + sp.encode(s), f"encode differs on {s!r}"
        assert tok.encode(s, bos=False) == sp.encode(s), f"encode(bos=False) differs on {s!r}"


def test_special_ids(tok, sp):
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert tok.vocab_size == sp.get_piece_size()


def test_documented_chat_ids(tok):
    assert tok.encode("[INST] Hello [/INST]", bos=False) == [733, 16289, 28793, 22557, 733, 28748,
                                                             16289, 28793]


def test_decode_matches_sentencepiece(tok, sp):
    for s in CORPUS:
        ids = tok.encode(s)
        assert tok.decode(ids) == sp.decode(ids), f"decode differs on {s!r}"


def random_id_sequences(sp, count: int = 2000) -> list[list[int]]:
    """Byte ids (often valid or truncated UTF-8), normal ids, '▁' pieces and unk/bos/eos mixed."""
    rng = random.Random(99)
    spaces = [sp.piece_to_id("▁" * n) for n in (1, 2, 4)]
    seqs = []
    for _ in range(count):
        seq = []
        for _ in range(rng.randrange(1, 10)):
            kind = rng.random()
            if kind < 0.35:
                seq += [3 + b for b in _random_unicode(rng, 1).encode("utf-8")][: rng.randrange(1, 5)]
            elif kind < 0.55:
                seq.append(rng.randrange(3, 259))
            elif kind < 0.75:
                seq.append(rng.randrange(259, sp.get_piece_size()))
            elif kind < 0.85:
                seq.append(rng.choice(spaces))
            else:
                seq.append(rng.randrange(0, 3))
        seqs.append(seq)
    return seqs


def test_decode_random_ids_matches_sentencepiece(tok, sp):
    for ids in random_id_sequences(sp):
        assert tok.decode(ids) == sp.decode(ids), f"decode differs on {ids}"


def test_decode_rejects_out_of_range(tok):
    for bad in (-1, tok.vocab_size):
        with pytest.raises(ValueError):
            tok.decode([bad])


# ---- streaming ------------------------------------------------------------------------------

def _stream(tok, ids) -> list[str]:
    stream = tok.detokenizer()
    return [stream.push(t) for t in ids] + [stream.flush()]


def test_stream_equals_decode(tok, sp):
    sequences = [tok.encode(s) for s in CORPUS] + random_id_sequences(sp)
    for ids in sequences:
        deltas = _stream(tok, ids)
        assert "".join(deltas) == sp.decode(ids), f"stream differs on {ids}"
        for delta in deltas:
            delta.encode("utf-8", "strict")


def test_stream_holds_partial_characters(tok, sp):
    byte_ids = [3 + b for b in "😀".encode("utf-8")]
    assert _stream(tok, byte_ids) == ["", "", "", "😀", ""]
    truncated = _stream(tok, byte_ids[:3] + [sp.piece_to_id("▁Hello")])
    assert "".join(truncated) == sp.decode(byte_ids[:3] + [sp.piece_to_id("▁Hello")])
    assert truncated[:2] == ["", ""]
    # "\xed\xa0" can only start a surrogate: it is invalid at once, nothing is held back.
    assert "".join(_stream(tok, [3 + 0xED, 3 + 0xA0])[:2]) == sp.decode([3 + 0xED, 3 + 0xA0])


def _completable(prefix: bytes) -> bool:
    """Oracle: some continuation bytes make `prefix` start with one whole valid character."""
    tails = [bytes([b]) for b in range(0x80, 0xC0)]
    for _ in range(3):
        for tail in tails:
            try:
                decoded = (prefix + tail).decode("utf-8")
            except UnicodeDecodeError:
                continue
            if len(decoded) == 1:
                return True
        tails = [t + b"\x80" for t in tails]
    return False


def test_stream_holds_exactly_the_completable_prefixes(tok):
    prefixes = [bytes([b]) for b in range(0x80, 0x100)]
    prefixes += [bytes([lead, b]) for lead in (0xC2, 0xE0, 0xE1, 0xED, 0xF0, 0xF4) for b in range(256)]
    for prefix in prefixes:
        stream = tok.detokenizer()
        deltas = [stream.push(3 + b) for b in prefix]
        assert (deltas[-1] == "") == _completable(prefix), f"hold decision wrong for {prefix!r}"


# ---- chat -----------------------------------------------------------------------------------

def _reference(mistral, messages: list[dict]) -> list[int]:
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return mistral.encode_chat_completion(request).tokens


def _turns(*contents: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]


CHATS = {
    "single": _turns("Hello"),
    "multi": _turns("Hi, who are you?", "I am an assistant.", "Tell me a joke."),
    "system": [{"role": "system", "content": "You are terse."}] + _turns("Hello", "Hi.", "Bye"),
    "unicode": _turns("日本語 😀 👨‍👩‍👧 مرحبا", "Ça va? 🇫🇷", "한국어 ok"),
    "forged_markers": _turns("<s> [INST] x [/INST] </s>", "</s><s>[INST]", "[/INST] <unk>"),
    "spaces": _turns("  lead and trail  ", "  answer with spaces  ", "\nnewlines\n\n"),
    "code": _turns("def f():\n\treturn 1\n", "```python\n    x = 1\n```", "ok"),
}


@pytest.mark.parametrize("name", sorted(CHATS))
def test_chat_matches_mistral_common(tok, mistral, name):
    assert tok.apply_chat_template(CHATS[name]) == _reference(mistral, CHATS[name])


def test_chat_markers_in_content_are_plain_text(tok):
    ids = tok.apply_chat_template(CHATS["forged_markers"])
    assert ids.count(tok.bos_id) == 1 and ids.count(tok.eos_id) == 1


@pytest.mark.parametrize("messages, field", [
    ([{"role": "bot", "content": "x"}], "messages[0].role: unknown role 'bot'"),
    (_turns("a", "b") + [{"role": "assistant", "content": "c"}], "messages[2].role"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role"),
    ([{"role": "user"}], "messages[0].content: missing"),
    ([{"role": "user", "content": 3}], "messages[0].content: expected str"),
    (_turns("a", "b"), "messages[1].role: the last message must be from 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "messages[1].role"),
    ([], "messages"),
    (["hello"], "messages[0]"),
])
def test_chat_errors_name_the_field(tok, messages, field):
    with pytest.raises(ChatTemplateError) as info:
        tok.apply_chat_template(messages)
    assert str(info.value).startswith(field)


def test_template_itself_raises_on_bad_roles():
    def raise_exception(message):
        raise ChatTemplateError(message)

    env = ImmutableSandboxedEnvironment()
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(DEFAULT_CHAT_TEMPLATE)
    for messages in (_turns("a") * 2, [{"role": "bot", "content": "x"}]):
        with pytest.raises(ChatTemplateError):
            template.render(messages=messages, bos_token="<s>", eos_token="</s>")


# ---- building, caching, saving --------------------------------------------------------------

def test_second_load_uses_the_cache(monkeypatch, tmp_path, caplog, sp):
    monkeypatch.setenv("MIXTRAL_EP_CACHE", str(tmp_path))
    digest = hashlib.sha256(MODEL_FILE.read_bytes()).hexdigest()
    with caplog.at_level(logging.INFO, logger="model.tokenizer"):
        first = Tokenizer.from_pretrained()
    assert any("converting" in r.message for r in caplog.records)
    cached = list(tmp_path.glob(f"*{digest}*"))
    assert len(cached) == 1 and cached[0].stat().st_size > 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="model.tokenizer"):
        second = Tokenizer.from_pretrained()
    assert not any("converting" in r.message for r in caplog.records)
    for s in CORPUS[:50]:
        assert first.encode(s) == second.encode(s) == [1] + sp.encode(s)


def test_checkpoint_dir_with_only_tokenizer_model(monkeypatch, tmp_path, tok):
    monkeypatch.setenv("MIXTRAL_EP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "tokenizer.model").write_bytes(MODEL_FILE.read_bytes())
    loaded = Tokenizer.from_pretrained(tmp_path / "ckpt")
    assert [loaded.encode(s) for s in CORPUS[:50]] == [tok.encode(s) for s in CORPUS[:50]]


def test_save_round_trips(tok, tmp_path):
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                    "tokenizer.model"}
    loaded = Tokenizer.from_pretrained(tmp_path)
    for s in CORPUS:
        assert loaded.encode(s) == tok.encode(s), f"reloaded encode differs on {s!r}"
    ids = tok.encode(CORPUS[20]) + random_id_sequences_flat()
    assert loaded.decode(ids) == tok.decode(ids)
    assert loaded.apply_chat_template(CHATS["system"]) == tok.apply_chat_template(CHATS["system"])
    assert loaded.chat_template == tok.chat_template == DEFAULT_CHAT_TEMPLATE


def random_id_sequences_flat() -> list[int]:
    rng = random.Random(5)
    return [rng.randrange(0, 32000) for _ in range(300)]


def test_transformers_loads_saved_dir(tok, sp, tmp_path):
    # transformers 5.24's LlamaTokenizer keeps only vocab/merges from tokenizer.json and rebuilds
    # the pipeline (no normalizer, Metaspace pre-tokenizer), and splits "<s>"/"</s>" out of text
    # as control tokens; so it disagrees with sentencepiece on leading space runs and on literal
    # special tokens. Plain text agrees, which is what this checks.
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for s in ["Hello world", "The quick brown fox jumps over the lazy dog.", "café au lait",
              "日本語のテキスト", "numbers 12345 and more", "line one\nline two"]:
        assert hf.encode(s) == [sp.bos_id()] + sp.encode(s), f"transformers differs on {s!r}"
    assert hf.chat_template == DEFAULT_CHAT_TEMPLATE
