"""Token ids -> text, one token at a time: sentencepiece's `DecodeIds` as a state machine.

Contract (checked against sentencepiece in tests/unit/test_tokenizer.py):
- From the start of a sequence (no prefix), `"".join(push(t) for t in ids) + flush()` equals
  sentencepiece's `decode(ids)`: control tokens vanish, unk is " ⁇ ", runs of byte tokens are read
  as UTF-8 with each invalid byte -> U+FFFD, and the leading space of the first piece that is not
  a control token is dropped (the dummy prefix; unk keeps its space).
- After a prefix (`prefix_ids`, e.g. a prompt), the stream continues that sequence: for any ids
  `out` it emits `decode(prefix + out)[len(decode(prefix)):]` whenever `decode(prefix)` is a
  prefix of `decode(prefix + out)`; so a completion's first "▁word" keeps its space unless the
  prefix holds only control tokens (BOS alone). The one other case: the prefix ends inside a
  UTF-8 character spelled with k <= 3 byte tokens, which `decode(prefix)` shows as k U+FFFD. Those
  bytes are carried, and when `out` completes the character it is emitted whole, by the first
  delta: the stream emits `decode(prefix + out)[len(decode(prefix)) - k:]`.
- `push` is O(1); a delta never ends inside a UTF-8 character (at most 3 bytes are held back).
  Starting after a prefix reads its leading control tokens and the token after them, and at most
  4 tokens at its end (pushing its last <= 3 byte tokens), never the whole prefix.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

UNK_SURFACE = " ⁇ "
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class DecodeTable(NamedTuple):
    """What decoding needs of a vocabulary, indexed by token id (length V)."""
    surfaces: list[str]  # the piece with "▁" -> " "; unk -> " ⁇ "
    byte_values: list[int]  # the byte of a "<0xNN>" piece, else -1
    controls: frozenset[int]  # ids that decode to nothing (bos, eos, ...); not unk
    unk_id: int
    strip_first_space: bool  # the tokenizer adds a dummy prefix (sentencepiece's is_bos_ws)


def decode_table(pieces: list[str], specials: set[int], unk_id: int,
                 strip_first_space: bool) -> DecodeTable:
    """The table of SentencePiece-style `pieces` ("▁" for space, "<0xNN>" byte pieces)."""
    surfaces, byte_values = [], []
    for i, piece in enumerate(pieces):
        byte = _BYTE_PIECE.fullmatch(piece)
        byte_values.append(int(byte.group(1), 16) if byte else -1)
        surfaces.append(UNK_SURFACE if i == unk_id else piece.replace("▁", " "))
    return DecodeTable(surfaces, byte_values, frozenset(specials - {unk_id}), unk_id,
                       strip_first_space)


def _utf8_length(lead: int) -> int:
    """Length of the UTF-8 sequence a lead byte announces; 0 for a byte that cannot lead."""
    if lead < 0x80:
        return 1
    if 0xC0 <= lead < 0xE0:
        return 2
    if 0xE0 <= lead < 0xF0:
        return 3
    return 4 if 0xF0 <= lead < 0xF8 else 0


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
    """push(id) -> text delta; flush() at end of stream. ValueError for an id outside [0, V)."""

    def __init__(self, table: DecodeTable, prefix_ids: Sequence[int] = ()):
        self._table = table
        self._pending = bytearray()  # bytes of an unfinished character
        self._owed = 0  # leading pending bytes from the prefix: it already showed them as U+FFFD
        self._at_start = table.strip_first_space and all(
            self._check(t) in table.controls for t in prefix_ids)  # stops at the first non-control
        self._carry_incomplete_character(prefix_ids)

    def _carry_incomplete_character(self, prefix_ids: Sequence[int]) -> None:
        """Pending bytes as after pushing the whole prefix: the last 3 byte tokens suffice, as
        no valid character spans a lead byte, so decoding from any earlier byte ends alike."""
        tail = []
        for t in reversed(prefix_ids):
            if len(tail) == 3 or self._table.byte_values[self._check(t)] < 0:
                break
            tail.append(t)
        for t in reversed(tail):
            self.push(t)  # what the prefix already showed
        self._owed = len(self._pending)

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < len(self._table.surfaces):
            raise ValueError(f"token id {token_id} out of range [0, {len(self._table.surfaces)})")
        return token_id

    def push(self, token_id: int) -> str:
        table = self._table
        byte = table.byte_values[self._check(token_id)]
        if byte >= 0:
            self._pending.append(byte)
            self._at_start = False
            return self._drain(final=False)
        if token_id in table.controls:
            return self._drain(final=True)
        text = table.surfaces[token_id]
        if self._at_start and text.startswith(" ") and token_id != table.unk_id:
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
            if i >= self._owed:
                out.append("\ufffd")
            i += 1
        del buf[:i]
        self._owed = max(0, self._owed - i)
        return "".join(out)
