from tokenmill.engine.kv_cache import KVCacheManager, hash_block
from tokenmill.engine.outputs import EngineCoreRequest
from tokenmill.engine.request import Request
from tokenmill.sampling_params import SamplingParams

BLOCK = 4


def make_request(request_id: str, tokens: list[int], **params: object) -> Request:
    return Request(EngineCoreRequest(request_id, tokens, SamplingParams(**params)))  # type: ignore[arg-type]


def allocate_prompt(kv: KVCacheManager, request: Request) -> int:
    blocks, num_cached = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - num_cached, blocks)
    request.num_computed_tokens = request.num_tokens
    return num_cached


def test_allocation_counts_blocks_and_free_returns_them() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK)
    request = make_request("a", list(range(10)))
    assert allocate_prompt(kv, request) == 0
    assert len(request.block_ids) == 3 and kv.num_free_blocks == 5
    kv.free(request)
    assert kv.num_free_blocks == 8 and request.block_ids == []


def test_shared_prefix_hits_full_blocks_only() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK)
    first = make_request("a", list(range(10)))
    allocate_prompt(kv, first)
    second = make_request("b", list(range(9)) + [99, 100])
    assert allocate_prompt(kv, second) == 8  # two full shared blocks; the third differs
    assert second.block_ids[:2] == first.block_ids[:2]
    assert kv.pool.blocks[first.block_ids[0]].ref_cnt == 2
    kv.free(first)
    kv.free(second)
    assert kv.num_free_blocks == 16


def test_last_token_is_never_a_cache_hit() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK)
    allocate_prompt(kv, make_request("a", list(range(8))))
    again = make_request("b", list(range(8)))
    assert allocate_prompt(kv, again) == 4  # block 2 holds the last token: recomputed for its logits


def test_freed_blocks_stay_cached_until_evicted_lru() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK)
    first = make_request("a", list(range(9)))
    allocate_prompt(kv, first)
    kv.free(first)
    assert kv.num_free_blocks == 4
    assert allocate_prompt(kv, make_request("b", list(range(9)))) == 8
    other = make_request("d", [5] * 16)
    blocks, _ = kv.get_computed_blocks(other)
    assert kv.allocate_slots(other, 16, blocks) is False  # b holds 3 of 4 blocks
    assert other.block_ids == [] and kv.num_free_blocks == 1


def test_eviction_prefers_uncached_then_tail_blocks() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=BLOCK)
    first = make_request("a", list(range(12)))  # 3 full blocks, all hashed
    allocate_prompt(kv, first)
    kv.free(first)
    newcomer = make_request("b", [50] * 8)  # needs 2 blocks: 3 never-used blocks go first
    allocate_prompt(kv, newcomer)
    assert all(kv.pool.get_cached_block(h) is not None for h in first.block_hashes)
    third = make_request("c", [60] * 8)  # 1 uncached block left, then the tail of `first`
    allocate_prompt(kv, third)
    assert kv.pool.get_cached_block(first.block_hashes[0]) is not None
    assert kv.pool.get_cached_block(first.block_hashes[2]) is None


def test_block_hash_chains_over_the_whole_prefix() -> None:
    assert hash_block(None, [1, 2]) != hash_block(hash_block(None, [0, 0]), [1, 2])
    assert hash_block(None, [1, 23]) != hash_block(None, [12, 3])


def test_prompt_logprobs_requests_skip_the_prefix_cache() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK)
    allocate_prompt(kv, make_request("a", list(range(9))))
    assert allocate_prompt(kv, make_request("b", list(range(9)), prompt_logprobs=1)) == 0


def test_caching_disabled() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, enable_caching=False)
    allocate_prompt(kv, make_request("a", list(range(9))))
    assert allocate_prompt(kv, make_request("b", list(range(9)))) == 0


def test_the_n_sequences_of_one_request_share_its_prompt_with_caching_disabled() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, enable_caching=False)
    prompt = list(range(9))

    def child(i: int, group: str) -> Request:
        return Request(EngineCoreRequest(f"{i}_{group}", prompt, SamplingParams(), group_id=group))

    first, second = child(0, "req"), child(1, "req")
    assert allocate_prompt(kv, first) == 0
    assert allocate_prompt(kv, second) == 8  # two full blocks computed once
    assert second.block_ids[:2] == first.block_ids[:2]
    # Nothing is shared outside the group: caching is off for everyone else.
    assert allocate_prompt(kv, child(0, "other")) == 0
    assert allocate_prompt(kv, make_request("plain", prompt)) == 0
    assert kv.prefix_cache_queries == 0  # no prefix cache to report on
