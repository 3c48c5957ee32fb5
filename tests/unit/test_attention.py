"""Paged attention against dense causal attention, with scattered blocks and a sliding window."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.attention import AttentionMetadata, attend, select_backend, write_kv
from model.prefix_cache import BlockAllocator


def dense_reference(q, k, v, window):
    """q (T, H, Dh), k/v (T, K, Dh) of one sequence; causal (+ window) attention."""
    t, h, _ = q.shape
    pos = torch.arange(t)
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    group = h // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
                                       attn_mask=mask)
    return o.transpose(0, 1)


@pytest.mark.parametrize("window", [None, 3, 8])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("lengths", [[13, 1, 7, 20], [9]])   # mixed groups; one prefill alone
def test_paged_attention_equals_dense(window, heads, kv_heads, lengths):
    """Step 1 prefills (several groups, or one), step 2 decodes (one group); q, k and v are
    strided views, as the model's fused qkv projection gives them."""
    torch.manual_seed(0)
    block_size, dh, num_blocks = 4, 16, 64
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, dh)
    v_cache = torch.zeros_like(k_cache)
    seqs = [(torch.randn(n, heads, dh), torch.randn(n, kv_heads, dh), torch.randn(n, kv_heads, dh))
            for n in lengths]
    # scattered, non-contiguous blocks per sequence
    order = torch.randperm(num_blocks).tolist()
    tables, used = [], 0
    for n in lengths:
        need = -(-n // block_size)
        tables.append(order[used:used + need])
        used += need
    # step 1: prefill all but the last 1 (or 0) tokens; step 2: the rest, mixing decode + chunk
    done = [n - 1 if n > 1 else n for n in lengths]
    outs = [torch.empty_like(s[0]) for s in seqs]
    for step_lo, step_hi in ((lambda n, d: 0, lambda n, d: d), (lambda n, d: d, lambda n, d: n)):
        q_lens, ctx, parts = [], [], []
        for i, n in enumerate(lengths):
            lo, hi = step_lo(n, done[i]), step_hi(n, done[i])
            if hi > lo:
                q_lens.append(hi - lo)
                ctx.append(hi)
                parts.append((i, lo, hi))
        meta = AttentionMetadata.build(q_lens, ctx, [tables[i] for i, _, _ in parts], block_size,
                                       window, "sdpa", "cpu")
        q = torch.cat([seqs[i][0][lo:hi] for i, lo, hi in parts])
        k = torch.cat([seqs[i][1][lo:hi] for i, lo, hi in parts])
        v = torch.cat([seqs[i][2][lo:hi] for i, lo, hi in parts])
        q, k, v = (torch.cat([x, torch.randn_like(x)], dim=1)[:, :x.shape[1]]
                   for x in (q, k, v))                                 # strided, like qkv
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        o = attend(q, k_cache, v_cache, meta)
        start = 0
        for i, lo, hi in parts:
            outs[i][lo:hi] = o[start:start + hi - lo]
            start += hi - lo
    for (q, k, v), got in zip(seqs, outs):
        torch.testing.assert_close(got, dense_reference(q, k, v, window), rtol=1e-5, atol=1e-5)


def test_metadata_worked_example():
    meta = AttentionMetadata.build([3, 1], [3, 6], [[7], [2, 5]], 4, None, "sdpa", "cpu")
    assert meta.positions.tolist() == [0, 1, 2, 5]
    assert meta.slot_mapping.tolist() == [28, 29, 30, 21]


def test_block_allocator_hands_out_and_takes_back():
    alloc = BlockAllocator(5)
    a = alloc.allocate(3)
    assert len(set(a)) == 3 and alloc.num_free == 2
    with pytest.raises(RuntimeError, match="asked for 3 KV blocks, 2 free"):
        alloc.allocate(3)
    alloc.free(a)
    assert alloc.num_free == 5 and sorted(alloc.allocate(5)) == [0, 1, 2, 3, 4]


def test_backend_choice():
    assert select_backend("cpu") == "sdpa"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_backend("cpu", "flash")
    with pytest.raises(ValueError, match="attention_backend"):
        select_backend("cpu", "xformers")
