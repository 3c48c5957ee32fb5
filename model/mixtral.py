"""The Mixtral decoder minus its experts: embeddings, attention, norms, routers and lm_head.

Module attributes mirror the checkpoint keys (`model.layers.{i}.block_sparse_moe.gate.weight`,
`lm_head.weight`), so loading is a lookup; one exception: q_proj, k_proj and v_proj are
concatenated at load time into `self_attn.qkv_proj` (as vLLM's QKVParallelLinear), one GEMM
instead of three.
The experts live outside this module: `forward` takes a `moe(layer, x, weights, experts)`
callable, served in-process by `moe.LocalExperts` or remotely by the dispatcher in `actors/`.

Shapes: N tokens in this step (packed), D hidden, H query heads, K kv heads, Dh head dim,
E experts, A experts per token, V vocab.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from model.attention import AttentionMetadata, KVCache, attend, write_kv
from model.config import MixtralConfig
from model.layers import RMSNorm, apply_rope, rope_cos_sin
from model.linear import Linear, Weight, nbytes
from model.moe import expert_name, route
from model.quant import QuantizedWeight, concat

MoeFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# moe_begin(layer, x, weights, experts) dispatches now and returns a function that waits for
# and returns the (N, D) result (actors/experts/dispatcher.py; LocalExperts computes at once)
MoeBeginFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], Callable[[], torch.Tensor]]


class Attention(nn.Module):
    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.qkv_proj = Linear(cfg.hidden_size,
                               (self.num_heads + 2 * self.num_kv_heads) * self.head_dim)
        self.o_proj = Linear(self.num_heads * self.head_dim, cfg.hidden_size)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata,
                rope: tuple[torch.Tensor, torch.Tensor],
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        n, h, kv = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(n, h + 2 * kv, self.head_dim)      # (N, H+2K, Dh)
        qk = apply_rope(qkv[:, :h + kv], *rope)                         # (N, H+K, Dh)
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kv:]                 # (N, H|K|K, Dh)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        o = attend(q, k_cache, v_cache, meta)                            # (N, H, Dh)
        return self.o_proj(o.reshape(n, self.num_heads * self.head_dim))  # (N, D)


class SparseMoeBlock(nn.Module):
    """Only the router; the experts are served by the `moe` callable."""

    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.block_sparse_moe = SparseMoeBlock(cfg)


class Body(nn.Module):
    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Mixtral(nn.Module):
    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Body(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)

    @classmethod
    def from_tensors(cls, cfg: MixtralConfig, tensors: dict[str, Weight]) -> Mixtral:
        """Build from checkpoint tensors (every non-expert name; `tensors` is not changed; an
        FP8 checkpoint's projections come as QuantizedWeights); q/k/v fused, linear weights
        packed."""
        with torch.device("meta"):
            module = cls(cfg)
        tensors = dict(tensors)
        if cfg.tie_word_embeddings and "lm_head.weight" not in tensors:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        for i in range(cfg.num_hidden_layers):
            fused = f"model.layers.{i}.self_attn.qkv_proj.weight"
            tensors[fused] = concat([tensors.pop(name) for name in qkv_names(fused)])
        quantized = {n: w for n, w in tensors.items() if isinstance(w, QuantizedWeight)}
        module.load_state_dict({n: quantized[n].qweight if n in quantized else w
                                for n, w in tensors.items()}, strict=True, assign=True)
        for name, weight in quantized.items():
            module.get_submodule(name.removesuffix(".weight")).load(weight)
        for m in module.modules():
            if isinstance(m, Linear):
                m.pack()
        return module.requires_grad_(False).eval()

    def held(self) -> dict[str, Weight]:
        """Every weight this module holds by its module name: its state_dict's tensors and
        the quantized projections' QuantizedWeights (which are not tensors)."""
        held: dict[str, Weight] = dict(self.state_dict())
        held.update({f"{name}.weight": m.weight for name, m in self.named_modules()
                     if isinstance(m, Linear) and isinstance(m.weight, QuantizedWeight)})
        return held

    def nbytes(self) -> int:
        """Bytes of the weights held (`held`)."""
        return sum(nbytes(w) for w in self.held().values())

    def checkpoint_names(self) -> set[str]:
        """Names of the tensors this module holds, as the checkpoint names them (`qkv_proj`
        stands for q, k and v_proj; `lm_head.weight` is listed even when tied to the embedding)."""
        names = set()
        for name in self.held():
            names.update(qkv_names(name) if name.endswith(".qkv_proj.weight") else (name,))
        return names

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv: KVCache,
                moe: MoeFn) -> torch.Tensor:
        """input_ids (N,) -> final hidden states (N, D), writing this step's keys into `kv`."""
        h = self.model.embed_tokens(input_ids)                          # (N, D)
        rope = rope_cos_sin(meta.positions, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        top_k = self.cfg.num_experts_per_tok
        for i, layer in enumerate(self.model.layers):
            h = h + layer.self_attn(layer.input_layernorm(h), meta, rope, kv.k[i], kv.v[i])
            x = layer.post_attention_layernorm(h)
            weights, experts = route(x, layer.block_sparse_moe.gate.weight, top_k)  # (N, A)
            h = h + moe(i, x, weights, experts)                         # (N, D)
        return self.model.norm(h)

    @torch.inference_mode()
    def forward_micro_batches(self, input_ids: list[torch.Tensor], metas: list[AttentionMetadata],
                              kv: KVCache, moe_begin: MoeBeginFn) -> list[torch.Tensor]:
        """Like `forward` for several micro-batches (disjoint sequences), interleaved per layer
        so that one's expert round trip overlaps the others' attention (ping-pong, as in
        MegaScale-Infer): micro-batch m waits for its layer i-1 experts only right before its
        layer i attention. Each micro-batch's rows equal what `forward` gives them."""
        hs = [self.model.embed_tokens(ids) for ids in input_ids]       # (N_m, D) each
        ropes = [rope_cos_sin(m.positions, self.cfg.head_dim, self.cfg.rope_theta, hs[0].dtype)
                 for m in metas]
        waits: list = [None] * len(hs)
        for i, layer in enumerate(self.model.layers):
            for m, meta in enumerate(metas):
                if waits[m] is not None:
                    hs[m] = hs[m] + waits[m]()                          # layer i-1's experts
                hs[m] = hs[m] + layer.self_attn(layer.input_layernorm(hs[m]), meta, ropes[m],
                                                kv.k[i], kv.v[i])
                x = layer.post_attention_layernorm(hs[m])
                weights, experts = route(x, layer.block_sparse_moe.gate.weight,
                                         self.cfg.num_experts_per_tok)  # (N_m, A)
                waits[m] = moe_begin(i, x, weights, experts)
        return [self.model.norm(h + wait()) for h, wait in zip(hs, waits)]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()                             # (n, V)


def qkv_names(fused: str) -> list[str]:
    """"...self_attn.qkv_proj.weight" -> the q, k and v_proj checkpoint names it concatenates."""
    return [fused.replace("qkv_proj", f"{x}_proj") for x in "qkv"]


def non_expert_names(cfg: MixtralConfig) -> list[str]:
    """Checkpoint tensor names the frontend needs: everything but the experts."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                  p + "block_sparse_moe.gate.weight"]
        names += [f"{p}self_attn.{x}_proj.weight" for x in "qkvo"]
    return names


def expert_names(cfg: MixtralConfig, expert_ids) -> list[str]:
    """Checkpoint tensor names of the given expert ids in every layer."""
    return [expert_name(i, e, w)
            for i in range(cfg.num_hidden_layers) for e in expert_ids for w in ("w1", "w2", "w3")]


def tensor_shapes(cfg: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor name -> its shape."""
    d, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (cfg.num_attention_heads * dh, d),
            p + "self_attn.k_proj.weight": (cfg.num_key_value_heads * dh, d),
            p + "self_attn.v_proj.weight": (cfg.num_key_value_heads * dh, d),
            p + "self_attn.o_proj.weight": (d, cfg.num_attention_heads * dh),
            p + "block_sparse_moe.gate.weight": (cfg.num_local_experts, d)})
        for e in range(cfg.num_local_experts):
            shapes.update({expert_name(i, e, "w1"): (f, d), expert_name(i, e, "w2"): (d, f),
                           expert_name(i, e, "w3"): (f, d)})
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes
