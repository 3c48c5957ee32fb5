"""Automatic prefix caching: which full KV blocks are the same, by content.

A full block of `block_size` tokens is named by a hash of (its parent block's hash, its token
ids), the first block's parent being a salt that names the weights and the KV dtype: two
blocks with the same hash hold the same keys and values, whatever request computed them, as
a block's keys depend on every token before it (through attention) and on the weights. This
is vLLM's design (https://docs.vllm.ai/en/latest/design/prefix_caching/, "Automatic Prefix
Caching"), with sha256 as the hash (as vLLM's `prefix_caching_hash_algo="sha256"`): a
collision would hand a request another request's keys, so a 64-bit `hash()` is not enough
where clients choose the tokens.

`BlockAllocator` hands out the KV cache's block ids with reference counts (the n choices of
a prompt, and every request whose prompt starts the same way, hold its blocks together). A
block whose last holder lets go keeps its content and, if cached, its hash: it waits in an
LRU of evictable blocks, and `allocate` takes never-cached free blocks first, then evicts the
least recently released cached block. Which request takes which cached blocks, and when a
block becomes cached, is model/scheduler.py's.

    salt = weights_salt(model, torch.float32)
    hashes = extend_hashes([], salt, token_ids, block_size=16)   # one hash per full block
    blocks = allocator.cached_prefix(hashes)                      # longest cached chain
    allocator.take(blocks)                                        # now held (reference +1)
"""
from __future__ import annotations

import array
import collections
import dataclasses
import hashlib
import json
from collections.abc import Sequence

import torch


@dataclasses.dataclass
class PrefixCacheStats:
    """Cumulative counts in tokens since the engine started (vLLM's `prefix_cache_queries`
    and `prefix_cache_hits`): `queries` counts the tokens of each request looked up when it is
    first admitted (its prompt, or prompt + resumed tokens after a failover; not a preempted
    request's re-admission, nor a request that never reads the cache: prompt logprobs, logits);
    `hits`, of those, the tokens whose keys and values were taken from the cache."""
    queries: int = 0
    hits: int = 0


def weights_salt(model: torch.nn.Module, kv_dtype: torch.dtype) -> bytes:
    """The first block's parent hash: the model's config, the KV dtype and a fingerprint of the
    weights (the first rows of the embedding and of every layer's router, the final norm), so
    blocks computed by other weights or another dtype never match."""
    digest = hashlib.sha256()
    digest.update(json.dumps(dataclasses.asdict(model.cfg), sort_keys=True).encode())
    digest.update(str(kv_dtype).encode())
    with torch.no_grad():
        for _, weight in model.named_parameters():     # small, never packed (model/linear.py)
            digest.update(weight[:4].float().cpu().numpy().tobytes())
    return digest.digest()


# one tag per kind of hashed input, so that no input of one kind can be read as the other's: a
# cache_salt's bytes spelling a block's token ids must not make a salted chain's first parent
# equal that block's hash in the unsalted chain (it would then name a block computed without
# that block before it as if it were)
_SALTED, _BLOCK = b"cache_salt\0", b"block\0"


def salted(salt: bytes, cache_salt: str) -> bytes:
    """The engine's salt mixed with a request's `cache_salt` (vLLM's field of that name)."""
    return hashlib.sha256(_SALTED + salt + cache_salt.encode()).digest()


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """sha256 of the parent block's hash (or the salt: 32 bytes either way) and the block's
    token ids (int64)."""
    return hashlib.sha256(_BLOCK + parent + array.array("q", token_ids).tobytes()).digest()


def extend_hashes(hashes: list[bytes], salt: bytes, token_ids: Sequence[int],
                  block_size: int) -> list[bytes]:
    """Append to `hashes` (the chain of a sequence's first len(hashes) full blocks) the hash of
    every further full block of `token_ids`; return `hashes`."""
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[-1] if hashes else salt
        hashes.append(block_hash(parent, token_ids[i * block_size:(i + 1) * block_size]))
    return hashes


class BlockAllocator:
    """KV-cache block ids with reference counts and a content-addressed cache of full blocks.

    `allocate` hands out blocks (count 1), `share` adds a holder, `free` drops one; at count 0
    a block goes back to the free list, or, if cached, to the tail of the evictable LRU.
    `cache(block, h)` names a full block's content; `cached_prefix(hashes)` finds the blocks of
    the longest cached chain and `take` holds them. `num_free` counts both free and evictable
    blocks: all that `allocate` can hand out. Errors: RuntimeError on allocating more than
    `num_free`, sharing a free block, freeing a free one, or caching a block that nobody holds.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))        # never cached; pop() = lowest
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}                    # cached block -> its hash
        self._block_of: dict[bytes, int] = {}                   # hash -> its cached block
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks whose content is cached (held by a request or evictable)."""
        return len(self._hash_of)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def evictable(self) -> list[int]:
        """Cached blocks no request holds, the next to be evicted first."""
        return list(self._evictable)

    def allocate(self, n: int) -> list[int]:
        """`n` blocks for new content: never-cached ones first, then evicted cached ones."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks, {self.num_free} free")
        blocks = [self._free.pop() for _ in range(min(n, len(self._free)))]
        while len(blocks) < n:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            blocks.append(block)
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refs[b] == 0:
                raise RuntimeError(f"KV block {b} is free; it cannot be shared")
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one holder of each block; a block table's blocks are released last first, so
        the end of a chain is evicted before its start."""
        released = []
        for b in blocks:
            if self._refs[b] == 0:
                raise RuntimeError(f"KV block {b} is already free")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                released.append(b)
        for b in reversed(released):
            if b in self._hash_of:
                self._evictable[b] = None
            else:
                self._free.append(b)

    def cache(self, block: int, block_hash: bytes) -> bool:
        """Name a held, full block by its content's hash; False if it is named already, or if
        another block has that content (this one stays uncached: a duplicate, freed as usual)."""
        if self._refs[block] == 0:
            raise RuntimeError(f"KV block {block} is free; it cannot be cached")
        if block in self._hash_of or block_hash in self._block_of:
            return False
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block
        return True

    def uncache(self, block: int) -> None:
        """Forget a block's name (its content is not what the name says); an evictable block
        becomes plainly free."""
        block_hash = self._hash_of.pop(block, None)
        if block_hash is None:
            return
        del self._block_of[block_hash]
        if block in self._evictable:
            del self._evictable[block]
            self._free.append(block)

    def cached_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (changes nothing)."""
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def take(self, blocks: list[int]) -> None:
        """Hold cached blocks (from `cached_prefix`): one more holder each; an evictable block
        leaves the LRU."""
        for b in blocks:
            if b not in self._hash_of:
                raise RuntimeError(f"KV block {b} is not cached; it cannot be taken")
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
