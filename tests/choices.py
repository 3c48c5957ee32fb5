"""What a client received of each choice of a request (n >= 1), gathered from its stream chunks
in whatever order the choices interleave, and the comparison the failover tests make between a
disturbed run and an undisturbed one: per choice, the same token ids, text, top-logprob
entries (ids or token strings) and prompt logprobs (received once, on the choice's first
chunk, when asked), and the same logprobs within `LOGPROB_TOLERANCE` (a resumed
choice's logprobs come from a prefill of prompt + tokens so far, not from the decode steps of
the first run; over gRPC they are float32)."""
from __future__ import annotations

import dataclasses

import pytest

LOGPROB_TOLERANCE = 1e-4
# sampling options of n = 4 seeded choices of the prompt "Once" on the tiny checkpoint (seed 0)
# where choice 0 stops at its 2nd token (one of stop_token_ids) while choice 2 goes on past
# 1,500 tokens (seen in-process): a caller that leaves once a choice finished leaves the
# others mid-way
ONE_ENDS_EARLY = {"n": 4, "seed": 9, "temperature": 1.0, "ignore_eos": True,
                  "stop_token_ids": list(range(300, 340))}


@dataclasses.dataclass
class Choice:
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    logprobs: list[float] = dataclasses.field(default_factory=list)
    # per token: its alternatives as (token id or token string, logprob), most likely first
    top: list[list[tuple[object, float]]] = dataclasses.field(default_factory=list)
    # each prompt_logprobs list received: per prompt token None (the first) or (logprob,
    # [(token id, logprob), ...]) as model/output.py's PromptLogprob
    prompt: list[list] = dataclasses.field(default_factory=list)


class Choices(dict[int, Choice]):
    """index -> Choice, grown chunk by chunk."""

    def add(self, index: int, token_ids=(), text: str = "", logprobs=(), top=(),
            prompt_logprobs: list | None = None) -> None:
        choice = self.setdefault(index, Choice())
        choice.token_ids += token_ids
        choice.text += text
        choice.logprobs += logprobs
        choice.top += [[(key, logprob) for key, logprob in alternatives] for alternatives in top]
        if prompt_logprobs is not None:
            choice.prompt.append(list(prompt_logprobs))

    def tokens(self) -> int:
        """Tokens received over every choice."""
        return sum(len(c.token_ids) for c in self.values())


def assert_same_choices(got: Choices, want: Choices, name: str) -> None:
    """`got` received what `want` did, choice by choice (see the module docstring)."""
    assert sorted(got) == sorted(want), f"{name}: choices {sorted(got)} != {sorted(want)}"
    for i, w in want.items():
        g, where = got[i], f"{name}, choice {i}"
        assert (g.token_ids, g.text) == (w.token_ids, w.text), where
        assert g.logprobs == pytest.approx(w.logprobs, abs=LOGPROB_TOLERANCE), where
        assert [[k for k, _ in top] for top in g.top] == [[k for k, _ in top] for top in w.top], \
            where
        assert [v for top in g.top for _, v in top] == \
            pytest.approx([v for top in w.top for _, v in top], abs=LOGPROB_TOLERANCE), where
        (g_keys, g_values), (w_keys, w_values) = _split(g.prompt), _split(w.prompt)
        assert g_keys == w_keys, f"{where}: prompt logprobs"
        assert g_values == pytest.approx(w_values, abs=LOGPROB_TOLERANCE), f"{where}: prompt"


def _split(prompt: list[list]) -> tuple[list, list[float]]:
    """Prompt logprob lists -> (their lengths and alternatives' ids, every logprob in order)."""
    keys, values = [], []
    for entries in prompt:
        keys.append(len(entries))
        for entry in entries:
            if entry is None:
                keys.append(None)
            else:
                logprob, alternatives = entry[:2]          # (the engine's entries add a rank)
                keys.append([k for k, _ in alternatives])
                values += [logprob, *(v for _, v in alternatives)]
    return keys, values
