"""Mixtral model configuration: one frozen dataclass, read once from `config.json`.

Field names are those of Hugging Face's `config.json`. `MixtralConfig.from_dict` accepts both
spellings of the RoPE base (top-level `rope_theta`, written by the real Mixtral checkpoints, and
`rope_parameters.rope_theta`, written by transformers 5), a null `head_dim` (then
hidden_size / num_attention_heads) and a null or integer `sliding_window`. Every invalid or missing
field raises `ConfigError` naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json field is missing or invalid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    head_dim: int | None = None
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "num_local_experts",
                     "num_experts_per_tok", "max_position_embeddings"):
            _check_positive_int(name, getattr(self, name))
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}) when head_dim is not given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        _check_positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_local_experts "
                f"({self.num_local_experts})")
        if self.sliding_window is not None:
            _check_positive_int("sliding_window", self.sliding_window)
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int)
                    or not 0 <= value < self.vocab_size):
                raise ConfigError(f"{name} must be an int in [0, vocab_size={self.vocab_size}), "
                                  f"got {value!r}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MixtralConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in fields}
        rope = raw.get("rope_parameters")
        if "rope_theta" not in raw and isinstance(rope, dict) and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        eos = values.get("eos_token_id")
        if isinstance(eos, list) and eos:  # some checkpoints list several; the first is EOS
            values["eos_token_id"] = eos[0]
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in values]
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> MixtralConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that Hugging Face's MixtralForCausalLM reads."""
        d = dataclasses.asdict(self)
        d.update(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_act="silu",
                 attention_dropout=0.0, initializer_range=0.02, output_router_logits=False,
                 router_aux_loss_coef=0.02, use_cache=True)
        return d


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


# Shapes for random-weight checkpoints. vocab_size is the real tokenizer's: 32000 (Mixtral-8x7B's
# v1) everywhere but `tiny-v3`, which has the v3 vocabulary (32768 ids, with Mistral's tool
# tokens) of Mixtral-8x22B-Instruct, so tool calls run natively in tests and the demo.
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
             max_position_embeddings=4096)
PRESETS: dict[str, MixtralConfig] = {
    "tiny": MixtralConfig(vocab_size=32000, **_TINY),
    "tiny-v3": MixtralConfig(vocab_size=32768, **_TINY),
    "small": MixtralConfig(vocab_size=32000, hidden_size=512, intermediate_size=1792,
                           num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                           num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=8192),
    "medium": MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=3584,
                            num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                            num_local_experts=8, num_experts_per_tok=2,
                            max_position_embeddings=16384),
    "8x7b": MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                          num_local_experts=8, num_experts_per_tok=2,
                          max_position_embeddings=32768),
}


def resolve_config(preset_or_config: str | MixtralConfig | dict[str, Any]) -> MixtralConfig:
    """A preset name, a config dict (config.json fields) or a MixtralConfig -> MixtralConfig."""
    if isinstance(preset_or_config, MixtralConfig):
        return preset_or_config
    if isinstance(preset_or_config, dict):
        return MixtralConfig.from_dict(preset_or_config)
    if preset_or_config not in PRESETS:
        raise ConfigError(f"unknown preset {preset_or_config!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset_or_config]


def cache_dir() -> Path:
    """Where built artefacts are cached: $MIXTRAL_EP_CACHE, default ~/.cache/mixtral-ep."""
    return Path(os.environ.get("MIXTRAL_EP_CACHE", "~/.cache/mixtral-ep")).expanduser()
