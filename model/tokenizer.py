"""Mixtral's tokenizer: text <-> token ids, chat prompts, and streaming detokenization.

Contract (checked against sentencepiece and mistral-common in tests/unit/test_tokenizer.py):
- `encode(text)` equals sentencepiece's `encode(text)` on Mixtral's `tokenizer.model`, with BOS
  prepended. Text never yields control ids: a literal "<s>" is encoded as plain characters.
- `decode(ids)` equals sentencepiece's `decode(ids)` for any ids: control tokens vanish, unk is
  " ⁇ ", runs of byte tokens are read as UTF-8 with each invalid byte -> U+FFFD, and the leading
  "▁" of the first piece that is not a control token is dropped (the dummy prefix).
- `IncrementalDetokenizer` runs that same state machine one token at a time (O(1) per token);
  its deltas never end inside a UTF-8 character, and `"".join(push(t)...) + flush() == decode`.
- `apply_chat_template(messages)` equals `MistralTokenizer.v1().encode_chat_completion`: the Jinja
  template is rendered with random sentinels for bos/eos, which become ids, and each text segment
  is encoded without a dummy prefix (the template supplies the spaces; HF's `legacy=False`).

A `tokenizer.model` (SentencePiece BPE proto) is converted to a `tokenizers` BPE tokenizer the
"legacy" way (normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, byte fallback,
merges from piece scores); the result is cached under $MIXTRAL_EP_CACHE by the file's sha256.
The decoder assumes SentencePiece-style pieces ("▁" for space, "<0xNN>" byte pieces).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import struct
import time
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, normalizers, processors
from tokenizers import Tokenizer as Backend

from model.config import cache_dir
from model.errors import InvalidRequest

logger = logging.getLogger(__name__)

SPACE = "▁"
UNK_SURFACE = " ⁇ "
MODEL_MAX_LENGTH = 32768
_CONVERSION_VERSION = 1  # bump when _build_backend changes, to invalidate cached builds
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_LEGACY_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": SPACE},
    {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]}

DEFAULT_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the "
    "exception of an initial optional system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)


class ChatTemplateError(InvalidRequest):
    """Messages that the chat template cannot render; the message names the field."""


# ---- SentencePiece .model: a tiny protobuf wire-format reader -------------------------------

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


class Piece(NamedTuple):
    piece: str
    score: float
    type: int


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _fields(buf: bytes):
    """Yields (field number, value) of one message; value is int (varint) or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"tokenizer.model: unsupported protobuf wire type {wire}")
        yield key >> 3, value


def read_sentencepiece_model(data: bytes) -> list[Piece]:
    """The pieces of a `ModelProto` (field 1: SentencePiece {1 piece, 2 score, 3 type})."""
    pieces = []
    for number, value in _fields(data):
        if number == 1:
            fields = dict(_fields(value))
            score = struct.unpack("<f", fields[2])[0] if 2 in fields else 0.0
            pieces.append(Piece(fields[1].decode("utf-8"), score, fields.get(3, NORMAL)))
    return pieces


def _bpe_merges(pieces: list[Piece]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best merged score first."""
    normal = {p.piece: i for i, p in enumerate(pieces) if p.type == NORMAL}
    ranked = []
    for piece, merged in normal.items():
        for k in range(1, len(piece)):
            left, right = normal.get(piece[:k]), normal.get(piece[k:])
            if left is not None and right is not None:
                ranked.append((-pieces[merged].score, merged, left, right))
    ranked.sort()
    return [(pieces[left].piece, pieces[right].piece) for _, _, left, right in ranked]


def _build_backend(pieces: list[Piece]) -> Backend:
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    unk = next(p.piece for p in pieces if p.type == UNKNOWN)
    bpe = models.BPE(vocab=vocab, merges=_bpe_merges(pieces), byte_fallback=True,
                     unk_token=unk, fuse_unk=True)
    backend = Backend(bpe)
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = [p.piece for p in pieces if p.type in (UNKNOWN, CONTROL)]
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = next(p.piece for p in pieces if p.type == CONTROL)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return backend


def _cached_conversion(model_file: Path) -> str:
    """tokenizer.json text for a .model file, built once and cached by the file's sha256."""
    data = model_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    cache = cache_dir()
    cached = cache / f"spm-{digest}-v{_CONVERSION_VERSION}.tokenizer.json"
    if cached.is_file():
        logger.debug("tokenizer: loading cached conversion %s", cached)
        return cached.read_text(encoding="utf-8")
    start = time.perf_counter()
    logger.info("tokenizer: converting %s (sha256 %s) to a tokenizers BPE", model_file, digest)
    text = _build_backend(read_sentencepiece_model(data)).to_str()
    cache.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, cached)
    logger.info("tokenizer: built in %.2fs, cached at %s", time.perf_counter() - start, cached)
    return text


def _mistral_common_model() -> Path:
    return Path(str(resources.files("mistral_common") / "data" / "tokenizer.model.v1"))


# ---- decoding: sentencepiece's DecodeIds, one token at a time ---------------------------------

def _utf8_length(lead: int) -> int:
    """Length of the UTF-8 sequence a lead byte announces; 0 for a byte that cannot lead."""
    if lead < 0x80:
        return 1
    return 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF8 else 0


def _is_valid_prefix(head: bytes, length: int) -> bool:
    """Whether some bytes can still complete `head` into one valid character."""
    if len(head) == 1:
        return 0xC2 <= head[0] <= 0xF4
    return _decodes(head + b"\x80" * (length - len(head)))  # later bytes only need 80..BF


def _decodes(chunk: bytes) -> bool:
    try:
        chunk.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


class IncrementalDetokenizer:
    """push(id) -> text delta; flush() at end of stream. Holds at most 3 pending bytes."""

    def __init__(self, surfaces: list[str], byte_values: list[int], controls: frozenset[int],
                 unk_id: int, strip_first_space: bool):
        self._surfaces, self._bytes, self._controls = surfaces, byte_values, controls
        self._unk_id = unk_id  # its surface " ⁇ " keeps its space even at the start
        self._at_start = strip_first_space  # sentencepiece's is_bos_ws
        self._pending = bytearray()

    def push(self, token_id: int) -> str:
        if not 0 <= token_id < len(self._surfaces):
            raise ValueError(f"token id {token_id} out of range [0, {len(self._surfaces)})")
        if self._bytes[token_id] >= 0:
            self._pending.append(self._bytes[token_id])
            self._at_start = False
            return self._drain(final=False)
        if token_id in self._controls:
            return self._drain(final=True)
        text = self._surfaces[token_id]
        if self._at_start and text.startswith(" ") and token_id != self._unk_id:
            text = text[1:]
        self._at_start = False
        return self._drain(final=True) + text

    def flush(self) -> str:
        return self._drain(final=True)

    def _drain(self, final: bool) -> str:
        """Decodes pending bytes greedily from the front; invalid byte -> U+FFFD, skip one."""
        out, buf, i = [], self._pending, 0
        while i < len(buf):
            length = _utf8_length(buf[i])
            chunk = bytes(buf[i:i + length])
            if length and len(chunk) == length and _decodes(chunk):
                out.append(chunk.decode("utf-8"))
                i += length
                continue
            if length and len(chunk) < length and not final and _is_valid_prefix(chunk, length):
                break  # wait for the rest of this character
            out.append("\ufffd")
            i += 1
        del buf[:i]
        return "".join(out)


# ---- the tokenizer --------------------------------------------------------------------------

def _token_name(config: dict, key: str, default: str) -> str:
    value = config.get(key) or default
    return value["content"] if isinstance(value, dict) else value


def _template_from(config: dict) -> str:
    template = config.get("chat_template") or DEFAULT_CHAT_TEMPLATE
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        template = {t["name"]: t["template"] for t in template}.get("default", DEFAULT_CHAT_TEMPLATE)
    return template


def _raise_exception(message: str):
    raise ChatTemplateError(message)


class Tokenizer:
    def __init__(self, spec_json: str, config: dict, model_file: Path | None = None):
        spec = json.loads(spec_json)
        self._spec_json, self._model_file = spec_json, model_file
        self._dummy_prefix = spec.get("normalizer") == _LEGACY_NORMALIZER
        if self._dummy_prefix:  # we add the "▁" ourselves, so chat segments can go without it
            spec["normalizer"] = _LEGACY_NORMALIZER["normalizers"][1]
        self._backend = Backend.from_str(json.dumps(spec))
        self._backend.encode_special_tokens = True  # user text never yields control ids
        self.bos_id = self._backend.token_to_id(_token_name(config, "bos_token", "<s>"))
        self.eos_id = self._backend.token_to_id(_token_name(config, "eos_token", "</s>"))
        self.unk_id = self._backend.token_to_id(_token_name(config, "unk_token", "<unk>"))
        self.vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        self.chat_template = _template_from(config)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        self._template = env.from_string(self.chat_template)
        self._build_decode_tables(spec)

    def _build_decode_tables(self, spec: dict) -> None:
        specials = {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}
        self._controls = frozenset(specials - {self.unk_id})
        self._surfaces, self._byte_values = [], []
        for i in range(self.vocab_size):
            piece = self._backend.id_to_token(i)
            byte = _BYTE_PIECE.fullmatch(piece)
            self._byte_values.append(int(byte.group(1), 16) if byte else -1)
            self._surfaces.append(UNK_SURFACE if i == self.unk_id else piece.replace(SPACE, " "))
        self._strip_first_space = self._dummy_prefix or _metaspace_prepends(spec.get("pre_tokenizer"))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None) -> "Tokenizer":
        """From a checkpoint dir (tokenizer.json, else tokenizer.model), else mistral-common's v1."""
        directory = Path(path) if path is not None else None
        if directory is not None and not directory.is_dir():
            raise FileNotFoundError(f"tokenizer: {directory} is not a directory")
        if directory is not None and (directory / "tokenizer.json").is_file():
            config_file = directory / "tokenizer_config.json"
            config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
            return cls((directory / "tokenizer.json").read_text(encoding="utf-8"), config)
        model_file = directory / "tokenizer.model" if directory is not None else None
        if model_file is None or not model_file.is_file():
            if directory is not None:
                logger.warning("tokenizer: %s has no tokenizer files; using mistral-common's", directory)
            model_file = _mistral_common_model()
        return cls(_cached_conversion(model_file), {}, model_file)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Like sentencepiece: BOS, then the pieces of "▁" + text (nothing for empty text)."""
        ids = [self.bos_id] if bos else []
        if text:
            ids += self._encode_segment(" " + text if self._dummy_prefix else text)
        return ids

    def _encode_segment(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        stream = self.detokenizer()
        return "".join([stream.push(int(i)) for i in ids]) + stream.flush()

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self._surfaces, self._byte_values, self._controls,
                                      self.unk_id, self._strip_first_space)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Ids of a chat prompt ending after the last "[/INST]"; ChatTemplateError if invalid."""
        _validate_messages(messages)
        bos, eos = (f"\x00{name}-{secrets.token_hex(16)}\x00" for name in ("bos", "eos"))
        text = self._template.render(messages=messages, bos_token=bos, eos_token=eos,
                                     add_generation_prompt=True)
        ids = []
        for part in re.split(f"({re.escape(bos)}|{re.escape(eos)})", text):
            if part in (bos, eos):
                ids.append(self.bos_id if part == bos else self.eos_id)
            elif part:
                ids += self._encode_segment(part)
        return ids

    def save(self, directory: str | os.PathLike) -> None:
        """Writes tokenizer.json, tokenizer_config.json (+ tokenizer.model if built from one)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text(self._spec_json, encoding="utf-8")
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": self._backend.id_to_token(self.bos_id),
            "eos_token": self._backend.id_to_token(self.eos_id),
            "unk_token": self._backend.id_to_token(self.unk_id),
            "pad_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": True,
            "clean_up_tokenization_spaces": False,
            "spaces_between_special_tokens": False,
            "model_max_length": MODEL_MAX_LENGTH,
            "chat_template": self.chat_template,
        }
        text = json.dumps(config, indent=2, ensure_ascii=False)
        (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")
        if self._model_file is not None:
            shutil.copyfile(self._model_file, directory / "tokenizer.model")


def _metaspace_prepends(pre_tokenizer: dict | None) -> bool:
    """Whether a (non-legacy) tokenizer.json adds the dummy prefix with a Metaspace pre-tokenizer."""
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_metaspace_prepends(p) for p in pre_tokenizer["pretokenizers"])
    return pre_tokenizer.get("type") == "Metaspace" and pre_tokenizer.get("prepend_scheme") != "never"


_ROLES = ("system", "user", "assistant")


def _validate_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages: expected a non-empty list of {'role', 'content'} dicts")
    for i, message in enumerate(messages):
        _validate_message(i, message)
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    offset = len(messages) - len(turns)
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ChatTemplateError(
                f"messages[{i + offset}].role: expected {expected!r}, got {message['role']!r}; roles "
                "must alternate user/assistant after an optional leading system message")
    if messages[-1]["role"] != "user":
        raise ChatTemplateError(f"messages[{len(messages) - 1}].role: the last message must be "
                                f"from 'user', got {messages[-1]['role']!r}")


def _validate_message(i: int, message) -> None:
    if not isinstance(message, dict):
        raise ChatTemplateError(f"messages[{i}]: expected a dict, got {type(message).__name__}")
    if "role" not in message:
        raise ChatTemplateError(f"messages[{i}].role: missing")
    if message["role"] not in _ROLES:
        raise ChatTemplateError(f"messages[{i}].role: unknown role {message['role']!r}; "
                                "expected 'system', 'user' or 'assistant'")
    if "content" not in message:
        raise ChatTemplateError(f"messages[{i}].content: missing")
    if not isinstance(message["content"], str):
        raise ChatTemplateError(
            f"messages[{i}].content: expected str, got {type(message['content']).__name__}")
