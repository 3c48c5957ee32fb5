"""Paged KV cache and grouped-query attention over it, with an optional sliding window.

The cache of one layer is `k, v: (num_blocks, block_size, K, Dh)`; a sequence owns a list of
block ids (its block table), and its token at position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`. Blocks come from one
`BlockAllocator` (model/prefix_cache.py) shared by all layers and go back to it when the
sequence ends.

Backends, chosen once in `select_backend`: flash-attn's varlen kernel with a block table on
CUDA when flash-attn is importable (it needs block_size % 256 == 0); otherwise torch SDPA over
K/V gathered from the blocks (CPU, or CUDA without flash-attn).

Shapes: N tokens in this step (packed), B sequences, H query heads, K kv heads, Dh head dim,
L keys of a sequence (padded to whole blocks), Q queries of a sequence.
Worked example (block_size 4): sequences with q_lens [3, 1] and ctx_lens [3, 6] ->
positions [0 1 2 5], cu_seqlens_q [0 3 4], cu_seqlens_k [0 3 9].
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math

import torch
import torch.nn.functional as F

from model.prefix_cache import BlockAllocator

FLASH_BLOCK_SIZE = 256


def select_backend(device: torch.device | str, requested: str | None = None) -> str:
    """'flash' on CUDA with flash-attn installed, else 'sdpa' (or `requested`, if it can run).
    The only place the choice is made."""
    flash = (torch.device(device).type == "cuda"
             and importlib.util.find_spec("flash_attn") is not None)
    if requested is None:
        return "flash" if flash else "sdpa"
    if requested not in ("flash", "sdpa"):
        raise ValueError(f"attention_backend must be 'flash' or 'sdpa', got {requested!r}")
    if requested == "flash" and not flash:
        raise ValueError("attention_backend 'flash' needs a CUDA device and flash-attn installed")
    return requested


class KVCache:
    """Per-layer paged K and V tensors plus the allocator of their blocks."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each (source, destination) block's keys and values, in every layer: a choice
        that shares a partly filled block copies it before writing (copy-on-write)."""
        if not pairs:
            return
        device = self.k[0].device
        src = torch.tensor([s for s, _ in pairs], dtype=torch.int64, device=device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.int64, device=device)
        for cache in (*self.k, *self.v):
            cache[dst] = cache[src]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


@dataclasses.dataclass
class AttentionMetadata:
    """Everything attention needs about one step's packed batch; built once per step."""
    positions: torch.Tensor          # (N,) int64
    slot_mapping: torch.Tensor       # (N,) int64
    q_lens: list[int]                # per sequence
    ctx_lens: list[int]              # keys per sequence after this step (cached + new)
    block_tables: list[list[int]]
    backend: str
    groups: list[_SdpaGroup] = dataclasses.field(default_factory=list)   # sdpa
    flash: dict = dataclasses.field(default_factory=dict)                  # flash-attn args

    @classmethod
    def build(cls, q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]],
              block_size: int, sliding_window: int | None, backend: str,
              device: torch.device | str) -> AttentionMetadata:
        positions, slots = [], []
        for q, c, table in zip(q_lens, ctx_lens, block_tables):
            for p in range(c - q, c):
                positions.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
        meta = cls(torch.tensor(positions, dtype=torch.int64, device=device),
                   torch.tensor(slots, dtype=torch.int64, device=device),
                   q_lens, ctx_lens, block_tables, backend)
        if backend == "flash":
            meta.flash = _flash_args(q_lens, ctx_lens, block_tables, sliding_window, device)
        else:
            meta.groups = _sdpa_groups(q_lens, ctx_lens, block_tables, block_size,
                                       sliding_window, device)
        return meta


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           meta: AttentionMetadata) -> torch.Tensor:
    """q (N, H, Dh) against the cache (new keys already written) -> (N, H, Dh)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if meta.backend == "flash":
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func(q, k_cache, v_cache, softmax_scale=scale, causal=True,
                                      **meta.flash)
    if len(meta.groups) == 1:      # all decode, or one prefill chunk: its rows are all N, in order
        return _sdpa(q, k_cache, v_cache, meta.groups[0], scale)
    out = torch.empty_like(q)
    for g in meta.groups:
        out[g.rows] = _sdpa(q, k_cache, v_cache, g, scale)
    return out


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's k, v (N, K, Dh) into their slots."""
    k_cache.view(-1, *k.shape[1:])[slot_mapping] = k
    v_cache.view(-1, *v.shape[1:])[slot_mapping] = v


@dataclasses.dataclass
class _SdpaGroup:
    rows: torch.Tensor          # (B*Q,) which of the N packed rows this group answers
    q_index: torch.Tensor       # (B, Q) row of each padded query (padding points at a valid row)
    valid: torch.Tensor         # (B, Q) bool
    block_table: torch.Tensor   # (B, L / block_size)
    mask: torch.Tensor          # (B, 1, Q, L) bool, True = may attend
    _bias: dict = dataclasses.field(default_factory=dict)

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """Decode groups: `mask` as SDPA's additive mask (0 where True, -inf where False) in
        `dtype`, made once per step; given the bool mask, SDPA would make this same tensor again
        in every layer. Prefill groups keep the bool mask: their conversion is small next to
        their attention, and a kept (Q, L) float mask would hold 4x its memory all step."""
        if self.q_index.shape[1] > 1:
            return self.mask
        if dtype not in self._bias:
            bias = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            self._bias[dtype] = bias.masked_fill_(~self.mask, -math.inf)
        return self._bias[dtype]


def _sdpa_groups(q_lens, ctx_lens, block_tables, block_size, window, device) -> list[_SdpaGroup]:
    """Decode sequences (one query each) form one group; every prefill chunk is its own group."""
    starts = list(itertools.accumulate(q_lens, initial=0))
    decode = [i for i, q in enumerate(q_lens) if q == 1]
    members = ([decode] if decode else []) + [[i] for i, q in enumerate(q_lens) if q > 1]
    return [_sdpa_group(m, starts, q_lens, ctx_lens, block_tables, block_size, window, device)
            for m in members]


def _sdpa_group(members, starts, q_lens, ctx_lens, block_tables, block_size, window,
                device) -> _SdpaGroup:
    qmax = max(q_lens[i] for i in members)
    nblocks = max(len(block_tables[i]) for i in members)
    q_index = torch.tensor([[starts[i] + min(j, q_lens[i] - 1) for j in range(qmax)]
                            for i in members], device=device)                       # (B, Q)
    valid = torch.tensor([[j < q_lens[i] for j in range(qmax)] for i in members], device=device)
    table = torch.tensor([block_tables[i] + [0] * (nblocks - len(block_tables[i]))
                          for i in members], device=device)                         # (B, L/bs)
    ctx = torch.tensor([ctx_lens[i] for i in members], device=device)               # (B,)
    qpos = ctx[:, None] - torch.tensor([q_lens[i] for i in members], device=device)[:, None] \
        + torch.arange(qmax, device=device)[None, :]                                # (B, Q)
    kpos = torch.arange(nblocks * block_size, device=device)                        # (L,)
    mask = kpos[None, None, :] <= qpos[:, :, None]                                  # (B, Q, L)
    if window is not None:
        mask &= kpos[None, None, :] > qpos[:, :, None] - window
    return _SdpaGroup(q_index[valid], q_index, valid, table, mask[:, None])


def _sdpa(q, k_cache, v_cache, g: _SdpaGroup, scale: float) -> torch.Tensor:
    b, nq = g.q_index.shape
    kv_heads = k_cache.shape[2]
    kv_shape = (b, -1, *k_cache.shape[2:])
    blocks = g.block_table.flatten()    # index_select: ~5x faster than k_cache[table] here
    k = k_cache.index_select(0, blocks).view(kv_shape).transpose(1, 2)              # (B, K, L, Dh)
    v = v_cache.index_select(0, blocks).view(kv_shape).transpose(1, 2)              # (B, K, L, Dh)
    if nq == 1:  # decode: the H/K query heads of a kv head act as its queries, no GQA expand
        qg = q[g.q_index[:, 0]].view(b, kv_heads, -1, q.shape[-1])                # (B, K, H/K, Dh)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=g.bias(q.dtype), scale=scale)
        return o.reshape(b, -1, q.shape[-1])                                        # (B, H, Dh)
    qg = q[g.q_index].transpose(1, 2)                                               # (B, H, Q, Dh)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=g.bias(q.dtype), scale=scale,
                                       enable_gqa=True)                             # (B, H, Q, Dh)
    return o.transpose(1, 2)[g.valid]                                               # (B*Q, H, Dh)


def _flash_args(q_lens, ctx_lens, block_tables, window, device) -> dict:
    def cumulative(xs):
        return torch.tensor(list(itertools.accumulate(xs, initial=0)), dtype=torch.int32,
                            device=device)
    nblocks = max(len(t) for t in block_tables)
    table = torch.tensor([t + [0] * (nblocks - len(t)) for t in block_tables],
                         dtype=torch.int32, device=device)
    return dict(cu_seqlens_q=cumulative(q_lens), cu_seqlens_k=cumulative(ctx_lens),
                max_seqlen_q=max(q_lens), max_seqlen_k=max(ctx_lens), block_table=table,
                window_size=(window - 1, 0) if window is not None else (-1, -1))

