"""SentencePiece `tokenizer.model` -> a `tokenizers` BPE tokenizer, built once and cached.

Contract:
- `read_sentencepiece_model(data)` returns the pieces of a SentencePiece `ModelProto` in id order
  (a tiny protobuf wire-format reader: no protobuf dependency in `model/`).
- `cached_conversion(model_file)` returns the tokenizer.json text of the "legacy" conversion:
  normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, BPE with byte fallback and
  merges ordered by piece score. It equals sentencepiece's `encode` on Mixtral's file
  (tests/unit/test_tokenizer.py); the Metaspace variants do not (see NOTES-model.md). The text is
  cached under $MIXTRAL_EP_CACHE as `spm-<sha256 of the file>-v<version>.tokenizer.json`.
- `mistral_common_model(vocab_size)` is the path of mistral-common's file of that vocabulary:
  32000 ids is v1 (Mixtral-8x7B's tokenizer), 32768 is v3 (Mixtral-8x22B-Instruct's, with the
  [INST], [TOOL_CALLS], [AVAILABLE_TOOLS], [TOOL_RESULTS] control tokens).
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from tokenizers import AddedToken, decoders, models, normalizers, processors
from tokenizers import Tokenizer as Backend

from model.config import cache_dir

logger = logging.getLogger(__name__)

SPACE = "▁"
CONVERSION_VERSION = 2  # bump when build_backend changes, to invalidate cached builds
LEGACY_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": SPACE},
    {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]}

# SentencePiece.Type in sentencepiece_model.proto
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


def build_backend(pieces: list[Piece]) -> Backend:
    """The legacy conversion of `pieces`; unk and control pieces become special tokens."""
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
    # sentencepiece matches user-defined pieces (v3's "[REFERENCE_DOC_0]") in text
    backend.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                        for p in pieces if p.type == USER_DEFINED])
    bos = next(p.piece for p in pieces if p.type == CONTROL)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return backend


def cached_conversion(model_file: Path) -> str:
    """tokenizer.json text for a .model file, built once and cached by the file's sha256."""
    data = model_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    cache = cache_dir()
    cached = cache / f"spm-{digest}-v{CONVERSION_VERSION}.tokenizer.json"
    if cached.is_file():
        logger.debug("tokenizer: loading cached conversion %s", cached)
        return cached.read_text(encoding="utf-8")
    start = time.perf_counter()
    logger.info("tokenizer: converting %s (sha256 %s) to a tokenizers BPE", model_file, digest)
    text = build_backend(read_sentencepiece_model(data)).to_str()
    cache.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, cached)
    logger.info("tokenizer: built in %.2fs, cached at %s", time.perf_counter() - start, cached)
    return text


MISTRAL_COMMON_FILES = {32000: "tokenizer.model.v1",       # Mixtral-8x7B (NOTES-model.md)
                        32768: "mistral_instruct_tokenizer_240323.model.v3"}  # 8x22B-Instruct


def mistral_common_model(vocab_size: int = 32000) -> Path:
    """mistral-common's SentencePiece file of `vocab_size` ids (MISTRAL_COMMON_FILES);
    ValueError for another size."""
    if vocab_size not in MISTRAL_COMMON_FILES:
        raise ValueError(f"vocab_size: mistral-common has no SentencePiece tokenizer of "
                         f"{vocab_size} ids; {sorted(MISTRAL_COMMON_FILES)} are known")
    return Path(str(resources.files("mistral_common") / "data"
                    / MISTRAL_COMMON_FILES[vocab_size]))
