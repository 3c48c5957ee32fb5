"""model/tokenizer.py (and model/spm.py, model/detokenizer.py, model/chat.py) against its
oracles: sentencepiece (encode/decode, continuing a prompt), mistral-common (chat, property-based
with hypothesis) and transformers (loading a saved dir). Everything is compared to an oracle at
run time."""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import unicodedata
from collections.abc import Sequence

import pytest
import sentencepiece as spm
from hypothesis import event, given, settings
from hypothesis import strategies as st
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from model.spm import mistral_common_model
from model.tokenizer import DEFAULT_CHAT_TEMPLATE, ChatTemplateError, Tokenizer

MODEL_FILE = mistral_common_model()
# ~200 examples keep each property test to a few seconds; no example database in the repo.
PROPERTY = settings(max_examples=200, deadline=None, database=None)


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
                utf8 = _random_unicode(rng, 1).encode("utf-8")
                seq += [3 + b for b in utf8][: rng.randrange(1, 5)]
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
        with pytest.raises(ValueError):
            tok.detokenizer([tok.bos_id, bad])
        with pytest.raises(ValueError):
            tok.detokenizer([tok.bos_id, 500, bad])


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
    byte_ids = [3 + b for b in "😀".encode()]
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
    prefixes += [bytes([lead, b])
                 for lead in (0xC2, 0xE0, 0xE1, 0xED, 0xF0, 0xF4) for b in range(256)]
    for prefix in prefixes:
        stream = tok.detokenizer()
        deltas = [stream.push(3 + b) for b in prefix]
        assert (deltas[-1] == "") == _completable(prefix), f"hold decision wrong for {prefix!r}"


# ---- streaming after a prefix (completion text) ---------------------------------------------

def _held_bytes(prefix: list[int]) -> int:
    """Oracle: how many trailing byte tokens of `prefix` start a character that is unfinished."""
    tail = []
    for t in reversed(prefix):
        if not 3 <= t < 259 or len(tail) == 3:
            break
        tail.insert(0, t - 3)
    return next((k for k in (3, 2, 1) if len(tail) >= k and _completable(bytes(tail[-k:]))), 0)


def _assert_continues(tok, sp, prefix: list[int], out: list[int]) -> list[str]:
    """The stream after `prefix` emits decode(prefix + out) minus decode(prefix), except that a
    character the prefix left unfinished (k bytes, shown as k U+FFFD) comes whole if out ends it."""
    stream = tok.detokenizer(prefix)
    deltas = [stream.push(t) for t in out] + [stream.flush()]
    full, shown = sp.decode(prefix + out), sp.decode(prefix)
    held = 0 if full.startswith(shown) else _held_bytes(prefix)
    assert full.startswith(shown) or held > 0, f"{prefix} + {out}: prefix text changed"
    cut = len(shown) - held
    assert full[:cut] == shown[:cut] and "".join(deltas) == full[cut:], f"{prefix} + {out}"
    for delta in deltas:
        delta.encode("utf-8", "strict")
    return deltas


def test_continuation_matches_sentencepiece(tok, sp):
    prompts = [[sp.bos_id()] + sp.encode(s) for s in CORPUS]
    prompts += [[sp.bos_id()] + ids for ids in random_id_sequences(sp, 300)]  # unfinished chars
    outputs = random_id_sequences(sp) + [sp.encode(s) for s in CORPUS]
    for i, out in enumerate(outputs):
        _assert_continues(tok, sp, prompts[i % len(prompts)], out)


def test_continuation_across_split_characters(tok, sp):
    """Prompts ending inside a character, continued by its rest (or not) and random ids."""
    rng = random.Random(7)
    outputs = random_id_sequences(sp, 400)
    for i, s in enumerate(CORPUS * 2):
        char = [3 + b for b in _random_unicode(rng, 1).encode("utf-8")]
        k = rng.randrange(1, len(char)) if len(char) > 1 else 1
        rest = char[k:] if rng.random() < 0.8 else []
        _assert_continues(tok, sp, [sp.bos_id()] + sp.encode(s) + char[:k], rest + outputs[i % 400])


@pytest.mark.parametrize("name", ["single", "system", "unicode", "spaces"])
def test_continuation_of_a_chat_prompt(tok, sp, name):
    prefix = tok.apply_chat_template(CHATS[name])
    for out in [sp.encode(s) for s in CORPUS[:120]] + random_id_sequences(sp, 200):
        _assert_continues(tok, sp, prefix, out)


def test_completion_keeps_its_leading_space(tok, sp):
    out = sp.encode("db harvest")  # ▁db ▁harvest: the first piece's space is the completion's
    assert "".join(_assert_continues(tok, sp, tok.encode("Once upon a time"), out)) == " db harvest"
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "".join(_assert_continues(tok, sp, chat, out)) == " db harvest"
    for controls_only in ([sp.bos_id()], [], [sp.bos_id(), sp.eos_id()]):  # a sequence starts
        assert "".join(_assert_continues(tok, sp, controls_only, out)) == "db harvest"


def test_character_split_across_prompt_and_completion_comes_whole(tok, sp):
    smile = [3 + b for b in "😀".encode()]
    prefix = tok.encode("Hi") + smile[:2]
    assert sp.decode(prefix) == "Hi\ufffd\ufffd"
    assert _assert_continues(tok, sp, prefix, smile[2:] + sp.encode("x")) == ["", "😀", " x", ""]
    # not completed: the prefix already showed both bytes as U+FFFD, only the rest is new
    assert "".join(_assert_continues(tok, sp, prefix, sp.encode("x"))) == " x"
    assert "".join(_assert_continues(tok, sp, prefix, [smile[2], *sp.encode("x")])) == "\ufffd x"


class _CountingIds(Sequence):
    """A prompt's ids that count how many of them are read."""

    def __init__(self, ids: list[int]):
        self.ids, self.reads = ids, 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        self.reads += 1
        return self.ids[i]


def test_starting_after_a_long_prefix_reads_only_its_ends(tok, sp):
    smile = [3 + b for b in "😀".encode()]
    ids = [sp.bos_id()] + sp.encode("Once upon a time") * 50_000 + smile * 50_000 + smile[:3]
    prefix = _CountingIds(ids)
    stream = tok.detokenizer(prefix)
    assert prefix.reads <= 8  # BOS and one piece at the front, at most 4 byte tokens at the back
    assert [stream.push(smile[3]), stream.push(sp.piece_to_id("▁upon"))] == ["😀", " upon"]


# ---- chat -----------------------------------------------------------------------------------

def _reference(mistral, messages: list[dict]) -> list[int]:
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(
        messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return mistral.encode_chat_completion(request).tokens


def _turns(*contents: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": c}
            for i, c in enumerate(contents)]


CHATS = {
    "single": _turns("Hello"),
    "multi": _turns("Hi, who are you?", "I am an assistant.", "Tell me a joke."),
    "system": [{"role": "system", "content": "You are terse."}] + _turns("Hello", "Hi.", "Bye"),
    "unicode": _turns("日本語 😀 👨‍👩‍👧 مرحبا", "Ça va? 🇫🇷", "한국어 ok"),
    "forged_markers": _turns("<s> [INST] x [/INST] </s>", "</s><s>[INST]", "[/INST] <unk>"),
    "spaces": _turns("  lead and trail  ", "  answer with spaces  ", "\nnewlines\n\n"),
    "code": _turns("def f():\n\treturn 1\n", "```python\n    x = 1\n```", "ok"),
    "empty_system": [{"role": "system", "content": ""}] + _turns("Q"),  # issue 7: dropped, 9 ids
    "whitespace_system": [{"role": "system", "content": " "}] + _turns("Q"),
    "empty_user": [{"role": "system", "content": "S"}] + _turns("", " ", ""),
    "whitespace_assistant": _turns("Q", " ", "R"),
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
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
     "messages[1].role: a system message may only be the first message"),
    (_turns("a", "", "b"), "messages[1].content: an assistant message must not be empty"),
    ([{"role": "assistant", "content": "x"}] + _turns("a"), "messages[0].role: expected 'user'"),
    ([{"role": "system", "content": "s"}],
     "messages[0].role: the last message must be from 'user'"),
    ([], "messages"),
    (["hello"], "messages[0]"),
])
def test_chat_errors_name_the_field(tok, messages, field):
    with pytest.raises(ChatTemplateError) as info:
        tok.apply_chat_template(messages)
    assert str(info.value).startswith(field)


def test_checkpoint_chat_template_is_rendered(tok, sp, tmp_path):
    """A tokenizer_config.json's own template is rendered, after the same rules; its
    raise_exception is a ChatTemplateError."""
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{{ bos_token }}{% for m in messages %}{{ ' ' + m['role'] + ': ' "
                               "+ m['content'] }}{% endfor %}{% if messages | length > 3 %}"
                               "{{ raise_exception('at most 3 messages') }}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    custom = Tokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert custom.apply_chat_template(messages) == [sp.bos_id()] + sp.encode("system: S user: Q")
    with pytest.raises(ChatTemplateError, match="^messages: at most 3 messages$"):
        custom.apply_chat_template(CHATS["system"])
    with pytest.raises(ChatTemplateError, match=r"^messages\[1\]\.role"):
        custom.apply_chat_template(_turns("a") * 2)


# ---- chat against the reference, property-based -------------------------------------------

SPECIAL_LIKE = ["<s>", "</s>", "[INST]", "[/INST]", "<unk>", "<0x41>", "▁", "\n\n"]
WHITESPACE = ["", " ", "  ", "\n", "\t", " \n "]
_pieces = st.one_of(st.sampled_from(SPECIAL_LIKE + WHITESPACE), st.text(max_size=8))
CONTENTS = st.one_of(st.sampled_from(SPECIAL_LIKE + WHITESPACE), st.text(max_size=16),
                     st.lists(_pieces, max_size=4).map("".join))
ROLES = ["system", "user", "assistant"]


@st.composite
def conversations(draw) -> list[dict]:
    """1-9 turns after an optional system message; half alternate user/assistant (what our
    rules allow when contents are fine), half have random roles (mostly what they reject)."""
    n = draw(st.integers(1, 9))
    if draw(st.booleans()):
        roles = ["user" if i % 2 == 0 else "assistant" for i in range(n | 1)]
    else:
        roles = draw(st.lists(st.sampled_from(ROLES), min_size=n, max_size=n))
    roles = ["system"] * draw(st.booleans()) + roles
    return [{"role": role, "content": draw(CONTENTS)} for role in roles]


def _rule_stricter_than_reference(error: str, messages: list[dict]) -> bool:
    """The documented rules (model/chat.py) that reject what mistral-common accepts."""
    return ("a system message may only be the first message" in error
            or "roles alternate user/assistant starting with user" in error
            or (len(messages) == 1
                and "the last message must be from 'user', got 'system'" in error))


def _names_the_culprit(error: str, messages: list[dict]) -> bool:
    """`messages[i].role: ...` or `messages[i].content: ...` naming a message that breaks it."""
    named = re.match(r"messages\[(\d+)\]\.(role|content): ", error)
    if not named or int(named.group(1)) >= len(messages):
        return False
    message = messages[int(named.group(1))]
    if named.group(2) == "content":
        return message["role"] == "assistant" and message["content"] == ""
    return message["role"] != "user" or "last message" not in error


@PROPERTY
@given(messages=conversations())
def test_chat_property_matches_reference(tok, mistral, messages):
    check_chat_against_reference(tok, mistral, messages)


def check_chat_against_reference(tok, mistral, messages):
    """Our ids equal mistral-common's, or we refuse naming the culprit (or a rule we hold
    stricter than it): what every vocabulary's chat property test checks."""
    try:
        expected = _reference(mistral, messages)
    except MistralCommonException:
        expected = None
    try:
        ours, error = tok.apply_chat_template(messages), None
    except ChatTemplateError as e:
        ours, error = None, str(e)
    event("reference accepts" if expected is not None else "reference rejects")
    if expected is None:
        assert error is not None and _names_the_culprit(error, messages), error
    elif error is not None:
        assert _rule_stricter_than_reference(error, messages), error
    else:
        event("equal ids checked")
        assert ours == expected


# ---- building, caching, saving --------------------------------------------------------------

def test_second_load_uses_the_cache(monkeypatch, tmp_path, caplog, sp):
    monkeypatch.setenv("MIXTRAL_EP_CACHE", str(tmp_path))
    digest = hashlib.sha256(MODEL_FILE.read_bytes()).hexdigest()
    with caplog.at_level(logging.INFO, logger="model.spm"):
        first = Tokenizer.from_pretrained()
    assert any("converting" in r.message for r in caplog.records)
    cached = list(tmp_path.glob(f"*{digest}*"))
    assert len(cached) == 1 and cached[0].stat().st_size > 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="model.spm"):
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


def test_encoding_many_distinct_prompts_keeps_no_per_prompt_memory():
    """The BPE word cache is off (model/tokenizer.py: _no_word_cache): with it, 16,000 distinct
    prompts kept ~19 MiB (a whole prompt is one cached "word"), and a gateway grew under load."""
    import random
    tok = Tokenizer.from_pretrained()
    rng = random.Random(0)

    def rss_mib() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    prompts = [" ".join(str(rng.random()) for _ in range(8)) for _ in range(16000)]
    tok.encode("warm up")
    start = rss_mib()
    assert sum(len(tok.encode(p)) for p in prompts) > 8000
    assert rss_mib() - start < 5


# ---- the v3 vocabulary (tiny-v3; Mixtral-8x22B-Instruct's) ---------------------------------

V3_FILE = mistral_common_model(32768)


@pytest.fixture(scope="module")
def tok_v3():
    return Tokenizer.from_model_file(V3_FILE)


@pytest.fixture(scope="module")
def mistral_v3():
    return MistralTokenizer.v3()


def test_v3_encode_and_decode_match_sentencepiece(tok_v3):
    sp3 = spm.SentencePieceProcessor(model_file=str(V3_FILE))
    for s in CORPUS + ["see [REFERENCE_DOC_0] and [TOOL_CALLS] x", " [REFERENCE_DOC_12]y"]:
        assert tok_v3.encode(s) == [sp3.bos_id()] + sp3.encode(s), f"encode differs on {s!r}"
        assert tok_v3.decode(tok_v3.encode(s)) == sp3.decode(sp3.encode(s))
    rng = random.Random(3)
    for _ in range(500):
        ids = [rng.randrange(tok_v3.vocab_size) for _ in range(rng.randrange(1, 8))]
        assert tok_v3.decode(ids) == sp3.decode(ids), ids


def test_v3_control_tokens_are_ids_never_text(tok_v3, tok):
    names = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
             "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
    assert [tok_v3.control_id(n) for n in names] == [3, 4, 5, 6, 7, 8, 9]
    assert tok_v3.vocab_size == 32768 and tok_v3.native_tools
    assert not any(i in range(3, 10) for i in tok_v3.encode(" ".join(names)))
    assert tok.control_id("[TOOL_CALLS]") is None and not tok.native_tools


@pytest.mark.parametrize("name", sorted(CHATS))
def test_v3_chat_matches_mistral_common(tok_v3, mistral_v3, name):
    assert tok_v3.apply_chat_template(CHATS[name]) == _reference(mistral_v3, CHATS[name])


@PROPERTY
@given(messages=conversations())
def test_v3_chat_property_matches_reference(tok_v3, mistral_v3, messages):
    check_chat_against_reference(tok_v3, mistral_v3, messages)


def test_tiny_v3_checkpoint_carries_the_v3_tokenizer(tmp_path, tok_v3):
    from model.config import PRESETS
    from model.random_checkpoint import tokenizer_for
    tokenizer_for(PRESETS["tiny-v3"]).save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "[TOOL_CALLS]" in config["additional_special_tokens"]
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.vocab_size == PRESETS["tiny-v3"].vocab_size == 32768
    chat = CHATS["system"]
    assert loaded.apply_chat_template(chat) == tok_v3.apply_chat_template(chat)
