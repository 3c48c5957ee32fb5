"""Mixtral's tokenizer: text <-> token ids, chat prompts and streaming detokenization.

Contract (checked against sentencepiece and mistral-common in tests/unit/test_tokenizer.py):
- `encode(text)` equals sentencepiece's `encode(text)` on Mixtral's `tokenizer.model`, with BOS
  prepended. Text never yields control ids: a literal "<s>" is encoded as plain characters.
- `decode(ids)` equals sentencepiece's `decode(ids)` for any ids in [0, vocab_size).
- `detokenizer(prefix_ids)` streams the text that ids add after `prefix_ids` (a prompt): see
  model/detokenizer.py; a completion's first "▁word" keeps its space.
- `apply_chat_template(messages)` checks the chat role rules and renders the chat template
  (model/chat.py); with the default template the ids equal mistral-common's v1
  `encode_chat_completion`. On a vocabulary whose [INST] and [TOOL_CALLS] are control tokens
  (mistral-common's v3 and later) the prompt is mistral-common's v3 encoding instead
  (model/chat_tools.py `encode_v3`; the checkpoint's Jinja template is not used there).
- `control_id(piece)` is the id of a control token ("[TOOL_CALLS]"), None if the vocabulary has
  none; text never yields it.

This file ties the pieces together: the `tokenizers` backend (from a checkpoint's
tokenizer.json, or converted from a SentencePiece tokenizer.model by model/spm.py), the decode
table, the chat template, and HF-compatible saving.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as Backend

from model.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    ChatTemplateError,
    Control,
    template_from,
    validate_messages,
)
from model.chat_tools import V3_CONTROLS, encode_v3, plain_messages
from model.detokenizer import IncrementalDetokenizer, decode_table
from model.spm import LEGACY_NORMALIZER, cached_conversion, mistral_common_model

__all__ = ["Tokenizer", "ChatTemplateError", "DEFAULT_CHAT_TEMPLATE", "IncrementalDetokenizer"]

logger = logging.getLogger(__name__)

MODEL_MAX_LENGTH = 32768


def _token_name(config: dict, key: str, default: str) -> str:
    value = config.get(key) or default
    return value["content"] if isinstance(value, dict) else value


def _metaspace_prepends(pre_tokenizer: dict | None) -> bool:
    """Whether a (non-legacy) tokenizer.json adds the dummy prefix with a Metaspace
    pre-tokenizer."""
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_metaspace_prepends(p) for p in pre_tokenizer["pretokenizers"])
    return (pre_tokenizer.get("type") == "Metaspace"
            and pre_tokenizer.get("prepend_scheme") != "never")


def _no_word_cache(backend: Backend) -> None:
    """Turn off the BPE model's word cache. With no pre-tokenizer (Mixtral's legacy layout) a
    "word" is a whole prompt, so the cache (10,000 entries per thread since tokenizers 0.23)
    kept ~4.5 KB per distinct prompt in every thread that encodes: a server's gateway grew
    ~1.4 MiB a minute under load (bench/soak.py), up to gigabytes with many threads. Token ids
    do not change; only a repeated identical prompt loses a cache hit. `_resize_cache` is the
    binding's only capacity control (`cache_capacity` in tokenizer.json is not read back)."""
    resize = getattr(backend.model, "_resize_cache", None)
    if resize is not None:
        resize(0)


class Tokenizer:
    """A tokenizer.json (+ tokenizer_config.json) spec; see the module docstring."""

    def __init__(self, spec_json: str, config: dict, model_file: Path | None = None):
        spec = json.loads(spec_json)
        self._spec_json, self._model_file = spec_json, model_file
        self._dummy_prefix = spec.get("normalizer") == LEGACY_NORMALIZER
        if self._dummy_prefix:  # we add the "▁" ourselves, so chat segments can go without it
            spec["normalizer"] = LEGACY_NORMALIZER["normalizers"][1]
        self._backend = Backend.from_str(json.dumps(spec))
        self._backend.encode_special_tokens = True  # user text never yields control ids
        _no_word_cache(self._backend)
        self.bos_id = self._backend.token_to_id(_token_name(config, "bos_token", "<s>"))
        self.eos_id = self._backend.token_to_id(_token_name(config, "eos_token", "</s>"))
        self.unk_id = self._backend.token_to_id(_token_name(config, "unk_token", "<unk>"))
        self.vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        self._chat = ChatTemplate(template_from(config))
        specials = {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}
        self._controls = {self._backend.id_to_token(i): i for i in specials}
        pieces = [self._backend.id_to_token(i) for i in range(self.vocab_size)]
        strip_first_space = self._dummy_prefix or _metaspace_prepends(spec.get("pre_tokenizer"))
        self._decode_table = decode_table(pieces, specials, self.unk_id, strip_first_space)
        # the most characters one token can stand for (+1 for the dummy prefix's space): a text
        # longer than max_token_chars * n cannot fit in n tokens, which is checked before encoding
        self.max_token_chars = max(len(p) for p in pieces) + 1

    @property
    def chat_template(self) -> str:
        return self._chat.source

    @property
    def backend_json(self) -> str:
        """The tokenizer.json text this tokenizer was built from (llguidance loads it:
        model/grammar.py)."""
        return self._spec_json

    def control_id(self, piece: str) -> int | None:
        """The id of control token `piece` (e.g. "[TOOL_CALLS]"), None if there is none."""
        return self._controls.get(piece)

    @property
    def native_tools(self) -> bool:
        """Whether Mistral's instruct control tokens ([INST], [TOOL_CALLS], ...) are in the
        vocabulary (mistral-common's v3 and later): chat prompts are then encode_v3's."""
        return all(name in self._controls for name in V3_CONTROLS)

    @classmethod
    def from_model_file(cls, model_file: Path) -> Tokenizer:
        """From a SentencePiece tokenizer.model (converted once and cached: model/spm.py)."""
        return cls(cached_conversion(model_file), {}, model_file)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None) -> Tokenizer:
        """From a checkpoint dir (tokenizer.json, else tokenizer.model), else mistral-common's
        v1."""
        directory = Path(path) if path is not None else None
        if directory is not None and not directory.is_dir():
            raise FileNotFoundError(f"tokenizer: {directory} is not a directory")
        if directory is not None and (directory / "tokenizer.json").is_file():
            config_file = directory / "tokenizer_config.json"
            config = (json.loads(config_file.read_text(encoding="utf-8"))
                      if config_file.is_file() else {})
            return cls((directory / "tokenizer.json").read_text(encoding="utf-8"), config)
        model_file = directory / "tokenizer.model" if directory is not None else None
        if model_file is None or not model_file.is_file():
            if directory is not None:
                logger.warning("tokenizer: %s has no tokenizer files; using mistral-common's",
                               directory)
            model_file = mistral_common_model()
        return cls.from_model_file(model_file)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Like sentencepiece: BOS, then the pieces of "▁" + text (nothing for empty text)."""
        ids = [self.bos_id] if bos else []
        if text:
            ids += self._encode_segment(" " + text if self._dummy_prefix else text)
        return ids

    def _encode_segment(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """sentencepiece's decode; ValueError for an id outside [0, vocab_size)."""
        stream = self.detokenizer()
        return "".join([stream.push(int(i)) for i in ids]) + stream.flush()

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token adds to a text it continues (after a prompt): its piece with
        "▁" as a space, a byte token's byte ("<0x0A>" -> b"\\n"), b"" for a control token, unk's
        " ⁇ ". Joined over a completion they equal the completion's text when every character is
        whole (sentencepiece's decode; the dummy prefix's space is dropped only at a sequence's
        start). ValueError for an id outside [0, vocab_size)."""
        table = self._decode_table
        if not 0 <= token_id < len(table.surfaces):
            raise ValueError(f"token id {token_id} out of range [0, {len(table.surfaces)})")
        if table.byte_values[token_id] >= 0:
            return bytes([table.byte_values[token_id]])
        return b"" if token_id in table.controls else table.surfaces[token_id].encode()

    def detokenizer(self, prefix_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        """A stream of the text that ids add after `prefix_ids` (e.g. the prompt's ids):
        `decode(prefix_ids + out)` minus `decode(prefix_ids)`; see model/detokenizer.py."""
        return IncrementalDetokenizer(self._decode_table, prefix_ids)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Ids of a chat prompt ending after the last "[/INST]" (or the last tool result);
        ChatTemplateError if invalid. Tool calls and results in `messages` are encoded natively
        on v3 and written as text on v1 (model/chat_tools.py)."""
        if self.native_tools:
            return encode_v3(self, messages)
        validate_messages(messages)
        controls = {Control.BOS: self.bos_id, Control.EOS: self.eos_id}
        ids = []
        for part in self._chat.render(plain_messages(messages)):
            if isinstance(part, Control):
                ids.append(controls[part])
            else:
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
        if self.native_tools:   # mistral-common's v3 instruct control tokens
            config["additional_special_tokens"] = list(V3_CONTROLS)
        text = json.dumps(config, indent=2, ensure_ascii=False)
        (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")
        if self._model_file is not None:
            shutil.copyfile(self._model_file, directory / "tokenizer.model")
