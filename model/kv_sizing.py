"""How big the paged KV cache is, and the longest sequence (`max_model_len`) it can serve.

    size_kv_cache(cfg, block_size, dtype, device, kv_cache_memory=None, max_model_len=None,
                  max_num_seqs=256) -> KVSize(num_blocks, max_model_len)

Budget (`kv_cache_memory`, bytes) when not given:
  - CUDA: 90% of the device memory free once the weights are loaded;
  - CPU: `CPU_KV_FRACTION` (10%) of the memory the OS reports available to new programs
    (Linux `MemAvailable`; total physical memory elsewhere), at least `CPU_KV_MIN_BYTES`.
  One block holds `2 (K and V) * layers * block_size * kv_heads * head_dim * dtype bytes`.
max_model_len, as vLLM does it: an explicit value must fit in the cache and in
`max_position_embeddings`, else ValueError naming both numbers; with none, it is the checkpoint's
`max_position_embeddings`, lowered to what the cache holds with a warning naming both numbers and
the knobs (`kv_cache_memory`, `max_model_len`). The cache never grows beyond what `max_num_seqs`
sequences of `max_model_len` tokens can use.
Example: Mixtral-8x7B in bf16 has 32 layers x 8 kv heads x 128 dims: a 16-token block is
2 * 32 * 16 * 8 * 128 * 2 B = 2 MiB; a 2 GiB budget holds 1024 blocks = 16384 tokens, so with no
explicit max_model_len a 32768-token checkpoint is served at 16384 (and a warning).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

from model.attention import KVCache
from model.config import MixtralConfig

log = logging.getLogger(__name__)

CUDA_KV_FRACTION = 0.9
CPU_KV_FRACTION = 0.10
CPU_KV_MIN_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class KVSize:
    num_blocks: int
    max_model_len: int


def available_memory() -> int:
    """Bytes of host memory available to a new program (Linux MemAvailable, else total)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_kv_cache_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_KV_FRACTION)
    return max(int(available_memory() * CPU_KV_FRACTION), CPU_KV_MIN_BYTES)


def size_kv_cache(cfg: MixtralConfig, block_size: int, dtype: torch.dtype, device: torch.device,
                  kv_cache_memory: int | None = None, max_model_len: int | None = None,
                  max_num_seqs: int = 256) -> KVSize:
    """Blocks to allocate and the max_model_len to serve; ValueError if nothing useful fits."""
    memory = kv_cache_memory if kv_cache_memory is not None else default_kv_cache_memory(device)
    per_block = KVCache.bytes_per_block(cfg.num_hidden_layers, block_size, cfg.num_key_value_heads,
                                        cfg.head_dim, dtype)
    fits = (memory // per_block) * block_size                           # tokens the budget holds
    limit = cfg.max_position_embeddings
    if max_model_len is not None:
        if max_model_len > limit:
            raise ValueError(f"max_model_len ({max_model_len}) exceeds the checkpoint's "
                             f"max_position_embeddings ({limit})")
        if max_model_len > fits:
            raise ValueError(
                f"max_model_len ({max_model_len}) does not fit in the KV cache: kv_cache_memory "
                f"({memory} bytes, {per_block} bytes per {block_size}-token block) holds {fits} "
                f"tokens; raise kv_cache_memory or lower max_model_len")
    elif fits < limit:
        if fits < block_size:
            raise ValueError(f"kv_cache_memory ({memory} bytes) holds no {block_size}-token "
                             f"block ({per_block} bytes); raise kv_cache_memory")
        log.warning("the KV cache (kv_cache_memory=%d bytes) holds %d tokens, fewer than the "
                    "checkpoint's max_position_embeddings (%d): serving max_model_len=%d; "
                    "raise kv_cache_memory, or set max_model_len to choose",
                    memory, fits, limit, fits)
    length = max_model_len or min(limit, fits)
    useful = max_num_seqs * -(-length // block_size)
    return KVSize(min(memory // per_block, useful), length)
