"""Sampling parameters and seeds; the pipeline that applies them is model/sampler.py.

`SamplingParams` is validated in one place: each bad field raises InvalidRequest naming it and
its limit. Each token's draw is seeded by its request's seed and its position alone
(`token_seed`; choice i of n > 1 by `choice_seed`), so a seeded request samples the same tokens
whatever else shares its batch, and the same again when it is re-run from any point
(preempted, or resumed elsewhere after its engine died).
The sampler's names (`sample`, `SamplingRow`, `SequenceState`, `Draw`, `SamplingError`) are
re-exported here, so callers import everything about sampling from this module.
"""
from __future__ import annotations

import dataclasses
import math
import secrets

from model.constraint import Constraint
from model.errors import InvalidRequest, check_unicode
from model.sampler import (
    Draw,
    Sampled,
    SamplingError,
    SamplingRow,
    SequenceState,
    TopLogprobs,
    sample,
)

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1     # the seed's range: the gRPC field's int64
MAX_N = 16                  # choices per request (OpenAI's `n`)
MAX_TOP_LOGPROBS = 20       # alternatives per token, as OpenAI's top_logprobs and vLLM's default
MAX_LOGIT_BIAS = 300        # logit_bias entries, as OpenAI's API
LOGIT_BIAS_RANGE = 100.0    # |bias| limit, as OpenAI's API
PENALTY_RANGE = 2.0         # |presence_penalty|, |frequency_penalty| limit, as OpenAI's API
# each generated token is checked against every stop string under the engine's step lock
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 1024
MAX_CACHE_SALT_CHARS = 1024
_MASK64 = 2**64 - 1

__all__ = ["SamplingParams", "request_seed", "choice_seed", "token_seed", "mix_seed", "sample",
           "SamplingRow", "SequenceState", "Draw", "Sampled", "SamplingError", "TopLogprobs"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Validated in one place: each bad field raises InvalidRequest naming it and its range."""
    max_tokens: int = 16
    temperature: float = 1.0            # 0 = greedy
    top_p: float = 1.0                  # nucleus mass in (0, 1]
    top_k: int = 0                      # 0 = no top-k cut
    seed: int | None = None             # int64, like the gRPC field
    stop: tuple[str, ...] = ()          # stop strings: cut the text before the first one
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1                          # choices of one prompt, in [1, MAX_N]
    top_logprobs: int = 0               # alternatives reported per generated token, [0, 20]
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's logprob + k alternatives
    presence_penalty: float = 0.0       # [-2, 2], OpenAI's: minus this if a token was generated
    frequency_penalty: float = 0.0      # [-2, 2], OpenAI's: minus this times its count so far
    repetition_penalty: float = 1.0     # > 0, CTRL's (prompt and output tokens); 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias in [-100, 100]), <= 300
    min_tokens: int = 0                 # EOS and stop_token_ids masked until this many tokens
    constraint: Constraint | None = None   # structured output (model/constraint.py), or None
    # vLLM's `cache_salt`: only requests with the same salt share prefix-cached KV blocks (a
    # tenant's secret, so others cannot learn its prompts from their time to first token)
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _tuple("stop", self.stop))
        object.__setattr__(self, "stop_token_ids", _tuple("stop_token_ids", self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        _check(_is_int(self.max_tokens) and (self.max_tokens > 0 or (
                   self.max_tokens == 0 and self.prompt_logprobs is not None)),
               f"max_tokens must be an integer >= 1 (0 only with prompt_logprobs), "
               f"got {self.max_tokens!r}")
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N,
               f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        _check(_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
               f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], "
               f"got {self.top_logprobs!r}")
        _check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs)
                                                and 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS),
               f"prompt_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] or None, "
               f"got {self.prompt_logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_real(value) and -PENALTY_RANGE <= value <= PENALTY_RANGE,
                   f"{name} must be in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}], got {value!r}")
        _check(_is_real(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf,
               f"repetition_penalty must be a finite number > 0 (1 = off), "
               f"got {self.repetition_penalty!r}")
        _check(len(self.logit_bias) <= MAX_LOGIT_BIAS,
               f"logit_bias must hold at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        for token, bias in self.logit_bias:
            _check(_is_int(token) and token >= 0,
                   f"logit_bias keys must be token ids >= 0, got {token!r}")
            _check(_is_real(bias) and -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE,
                   f"logit_bias values must be in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}], "
                   f"got {bias!r} for token {token}")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
               f"min_tokens must be an integer in [0, max_tokens ({self.max_tokens})], "
               f"got {self.min_tokens!r}")
        _check(_is_real(self.temperature) and 0 <= self.temperature < math.inf,
               f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        _check(_is_real(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        _check(self.seed is None or (_is_int(self.seed) and INT64_MIN <= self.seed <= INT64_MAX),
               f"seed must be an integer in [{INT64_MIN}, {INT64_MAX}] or None, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop must hold non-empty strings, got {self.stop!r}"[:300])
        _check(len(self.stop) <= MAX_STOP_STRINGS and
               all(len(s) <= MAX_STOP_CHARS for s in self.stop),
               f"stop must hold at most {MAX_STOP_STRINGS} strings of at most "
               f"{MAX_STOP_CHARS} characters each, got {len(self.stop)} strings, the longest "
               f"{max(map(len, self.stop), default=0)} characters")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               f"stop_token_ids must hold token ids >= 0, got {self.stop_token_ids!r}")
        _check(self.constraint is None or isinstance(self.constraint, Constraint),
               f"constraint must be a model.constraint.Constraint or None, "
               f"got {type(self.constraint).__name__}")
        salt = self.cache_salt          # a tenant's secret: an error never quotes it
        _check(salt is None or (isinstance(salt, str) and 0 < len(salt) <= MAX_CACHE_SALT_CHARS),
               f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} "
               f"characters or None, got "
               f"{f'{len(salt)} characters' if isinstance(salt, str) else type(salt).__name__}")
        if self.cache_salt is not None:           # hashed as UTF-8 in the scheduler's step
            check_unicode("cache_salt", self.cache_salt)
        _check(isinstance(self.ignore_eos, bool),
               f"ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _tuple(field: str, value) -> tuple:
    if isinstance(value, str) and field == "stop":
        return (value,)                                             # one stop string
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InvalidRequest(f"{field} must be a list, got {value!r}")
    return tuple(value)


def _bias_pairs(value) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs, from a {token id: bias} dict or pairs."""
    if isinstance(value, dict):
        value = value.items()
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InvalidRequest(f"logit_bias must map token ids to biases, got {value!r}"[:300])
    pairs = []
    for item in value:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise InvalidRequest(f"logit_bias must map token ids to biases, got {item!r}"[:300])
        pairs.append((item[0], item[1]))
    tokens = [t for t, _ in pairs]
    if len(set(tokens)) != len(tokens):
        raise InvalidRequest(f"logit_bias must name each token id once, got {tokens}"[:300])
    return tuple(sorted(pairs, key=lambda kv: (not _is_int(kv[0]), kv[0] if _is_int(kv[0]) else 0)))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequest(message)


def request_seed(params: SamplingParams) -> int | None:
    """A sampling request's seed: its own, else a random one drawn now; None when greedy."""
    if params.greedy:
        return None
    return params.seed if params.seed is not None else secrets.randbits(63)


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request seeded `seed` (n > 1): choice 0 keeps the
    request's seed (so n = 1 draws as before), the others a SplitMix64 mix of the two
    (`token_seed` then seeds each of their draws by position), an int64."""
    if index == 0:
        return seed
    mixed = mix_seed((seed + index * 0x9E3779B97F4A7C15) & _MASK64)
    return mixed - 2**64 if mixed > INT64_MAX else mixed


def token_seed(seed: int, position: int) -> int:
    """The 64-bit seed of the draw of the token at `position` (its index in prompt + output) of
    a request seeded `seed`: a function of the two alone, not of a generator's history, so a
    request re-run from any point (preempted, or resumed on another engine as prompt + tokens
    so far) draws the same tokens. SplitMix64's step (Steele, Lea and Flood, "Fast splittable
    pseudorandom number generators", OOPSLA 2014): the mixed seed advanced `position` times by
    the golden-ratio increment, then mixed again."""
    return mix_seed((mix_seed(seed) + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64)


def mix_seed(seed: int) -> int:
    """An int64 seed -> a 64-bit torch seed in which every input bit moves the low 32 bits:
    torch's CPU generator (mt19937) keeps only those, so seeds 1 and 2**32 + 1 would otherwise
    draw alike. MurmurHash3's 64-bit finalizer (fmix64), a bijection, so distinct seeds stay
    distinct for the 64-bit CUDA generator (Philox)."""
    x = seed & _MASK64
    x = ((x ^ (x >> 33)) * 0xFF51AFD7ED558CCD) & _MASK64
    x = ((x ^ (x >> 33)) * 0xC4CEB9FE1A85EC53) & _MASK64
    return x ^ (x >> 33)
