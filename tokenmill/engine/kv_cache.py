"""Paged KV cache bookkeeping: a pool of fixed-size blocks with reference counts and a prefix cache.

A full block is identified by a hash chained over every token up to its end, so two requests whose
prompts share a prefix share its blocks. Blocks whose reference count drops to zero keep their contents
and hash in an LRU free queue until a new allocation evicts them (uncached ones go first).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from tokenmill.engine.request import Request


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


def hash_block(parent_hash: bytes | None, token_ids: list[int]) -> bytes:
    digest = hashlib.blake2b(parent_hash or b"", digest_size=16)
    digest.update(b",".join(str(t).encode() for t in token_ids))
    return digest.digest()


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Blocks with ref_cnt 0, evicted from the front. Every block starts free.
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[bytes, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def get_cached_block(self, block_hash: bytes) -> KVBlock | None:
        return self.cached.get(block_hash)

    def touch(self, blocks: list[KVBlock]) -> None:
        """Takes a reference on blocks found in the prefix cache (reviving them if free)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        assert num_blocks <= self.num_free_blocks, "caller must check can_allocate first"
        blocks = []
        for _ in range(num_blocks):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def cache_block(self, block: KVBlock, block_hash: bytes) -> None:
        # Another block may already hold the same content (computed in parallel); keep that one.
        if block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block

    def free_blocks(self, blocks: list[KVBlock]) -> None:
        """Drops a reference from each block; blocks given first are evicted first among cached ones."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block
                if block.block_hash is None:
                    self.free_queue.move_to_end(block.block_id, last=False)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks)
        self.num_cached_blocks: dict[str, int] = {}  # request id -> leading blocks already hashed
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def shares_blocks(self, request: Request) -> bool:
        """With prefix caching off, only the n sequences of one request share (their prompt's blocks)."""
        return self.enable_caching or request.group_id is not None

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest run of the request's leading full blocks found in the prefix cache, and its tokens."""
        if not self.shares_blocks(request) or request.wants_prompt_logprobs:
            return [], 0
        self._extend_block_hashes(request, request.num_tokens)
        # The last token is always computed: its logits are needed to sample.
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * self.block_size
        if self.enable_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[KVBlock] | None = None
    ) -> bool:
        """Reserves blocks for `num_new_tokens` more tokens (after any prefix-cache hits); False if full."""
        computed_blocks = computed_blocks or []
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_required = -(-(num_computed + num_new_tokens) // self.block_size)
        num_new_blocks = num_required - len(request.block_ids) - len(computed_blocks)
        num_revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_revived:
            return False
        self.pool.touch(computed_blocks)
        new_blocks = self.pool.get_new_blocks(max(num_new_blocks, 0))
        request.block_ids.extend(b.block_id for b in computed_blocks + new_blocks)
        if self.shares_blocks(request):
            self._cache_full_blocks(request, num_computed + num_new_tokens)
        return True

    def free(self, request: Request) -> None:
        # Tail blocks are the least likely to be shared: offer them for eviction first.
        blocks = [self.pool.blocks[i] for i in reversed(request.block_ids)]
        self.pool.free_blocks(blocks)
        request.block_ids.clear()
        self.num_cached_blocks.pop(request.request_id, None)

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        self._extend_block_hashes(request, num_full * self.block_size)
        for i in range(start, num_full):
            self.pool.cache_block(self.pool.blocks[request.block_ids[i]], request.block_hashes[i])
        self.num_cached_blocks[request.request_id] = num_full

    def _extend_block_hashes(self, request: Request, num_tokens: int) -> None:
        tokens, size = request.all_token_ids, self.block_size
        # Without prefix caching the chain starts from the group: no other request's blocks can match.
        salt = None if self.enable_caching else f"group:{request.group_id}".encode()
        for i in range(len(request.block_hashes), num_tokens // size):
            parent = request.block_hashes[i - 1] if i else salt
            request.block_hashes.append(hash_block(parent, tokens[i * size : (i + 1) * size]))
