"""The torch engine's prefix cache: indexed longest-prefix match, LRU eviction by tokens, bytes
and entries, and the engine computing only what the cache does not hold."""

from __future__ import annotations

import numpy as np
import torch

from tests.trainer.generate_fixtures import tiny_model
from tokenmill.trainer.generate import GenerationRequest, SamplingParams, TorchEngine
from tokenmill.trainer.generate.prefix_cache import BLOCK, PrefixCache
from tokenmill.trainer.tokenizer import get_tokenizer

BYTE = get_tokenizer("byte")


def _tokens(*parts: range | list[int]) -> np.ndarray:
    return np.array([t for part in parts for t in part], dtype=np.int64)


def _kv(length: int, width: int = 4) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One layer's keys and values whose entries name their position (to see what was reused)."""
    keys = torch.arange(length, dtype=torch.float32)[None, :, None].expand(1, length, width).clone()
    return [keys], [keys.clone()]


def _insert(cache: PrefixCache, tokens: np.ndarray) -> None:
    cache.insert(tokens, *_kv(len(tokens)))


def test_lookup_finds_the_longest_cached_prefix_among_many_entries():
    cache = PrefixCache()
    stem = range(100, 140)  # 40 shared tokens: two full blocks and 8 more
    _insert(cache, _tokens(stem, [1] * 30))
    _insert(cache, _tokens(stem, [1] * 5, [2] * 30))  # shares 45 tokens with the query below
    _insert(cache, _tokens(stem, [3] * 30))
    _insert(cache, _tokens(range(200, 260)))  # unrelated
    query = _tokens(stem, [1] * 5, [2] * 3, [9] * 20)
    reused, entry = cache.lookup(query)
    assert reused == 48 and entry is not None
    assert np.array_equal(entry.tokens[:48], query[:48])
    assert cache.hits == 1 and cache.reused_tokens == 48

    within_a_block = _tokens(stem, [1] * 2, [7] * 10)  # the common part ends inside the third block
    assert cache.lookup(within_a_block)[0] == 42
    # never the whole prompt: its last token's logits start the completion
    whole = _tokens(stem, [3] * 30)
    assert cache.lookup(whole)[0] == len(whole) - 1
    # less than one block in common is not looked up
    assert cache.lookup(_tokens(range(100, 100 + BLOCK - 1), [5] * 40)) == (0, None)
    assert cache.lookup(_tokens([7] * 60)) == (0, None)


def test_a_newer_prompt_replaces_the_cached_prefixes_it_extends():
    cache = PrefixCache()
    solution = list(range(10, 120))
    for length in (40, 48, 56):
        _insert(cache, _tokens(solution[:length]))
    assert [len(e.tokens) for e in cache.entries.values()] == [56]
    assert cache.tokens == 56
    _insert(cache, _tokens(solution[:56]))  # the same prompt again: kept once
    assert len(cache.entries) == 1 and cache.tokens == 56
    assert cache.lookup(_tokens(solution[:80]))[0] == 56


def test_eviction_is_least_recently_used_and_respects_every_budget():
    blocks = [_tokens(range(1000 * i, 1000 * i + 40)) for i in range(5)]
    by_tokens = PrefixCache(max_tokens=120)
    for tokens in blocks[:3]:
        _insert(by_tokens, tokens)
    assert by_tokens.lookup(_tokens(blocks[0], [1]))[0] == 40  # the oldest is now the most recently used
    _insert(by_tokens, blocks[3])  # 160 tokens > 120: the least recently used (blocks[1]) goes
    assert by_tokens.tokens == 120
    assert by_tokens.lookup(_tokens(blocks[1], [1])) == (0, None)
    for kept in (blocks[0], blocks[2], blocks[3]):
        assert by_tokens.lookup(_tokens(kept, [1]))[0] == 40
    # evicted entries leave the index: nothing of blocks[1] is found by its first block either
    assert by_tokens.lookup(_tokens(blocks[1][:20], [1] * 10)) == (0, None)

    entry_bytes = 2 * 40 * 4 * 4  # keys and values, 40 positions x 4 floats
    by_bytes = PrefixCache(max_bytes=2 * entry_bytes)
    for tokens in blocks[:3]:
        _insert(by_bytes, tokens)
    assert by_bytes.bytes == 2 * entry_bytes and len(by_bytes.entries) == 2
    assert by_bytes.lookup(_tokens(blocks[0], [1])) == (0, None)

    by_entries = PrefixCache(max_entries=2)
    for tokens in blocks:
        _insert(by_entries, tokens)
    assert [e.tokens[0] for e in by_entries.entries.values()] == [3000, 4000]

    nothing = PrefixCache(max_tokens=0)
    _insert(nothing, blocks[0])
    assert not nothing.entries


def test_the_engine_reuses_the_longest_cached_prefix_and_computes_the_rest():
    engine = TorchEngine(tiny_model(0), BYTE)
    sampling = SamplingParams(temperature=0.7, max_tokens=6, seed=3)
    stem = tuple(range(65, 65 + 40))
    branches = [stem + tuple([97 + i] * 12) for i in range(3)]
    for prompt in branches:
        engine.generate([GenerationRequest(prompt_token_ids=prompt, n=2, sampling=sampling)])
    computed = engine.prefill_tokens
    assert computed == 52 + 2 * 12  # the stem once, then each branch's own tokens
    query = branches[1][:46] + (120,) * 10
    (warm,) = engine.generate([GenerationRequest(prompt_token_ids=query, n=4, sampling=sampling)])
    assert engine.prefill_tokens - computed == len(query) - 46
    cold_engine = TorchEngine(tiny_model(0), BYTE, prefix_cache_tokens=0)
    (cold,) = cold_engine.generate([GenerationRequest(prompt_token_ids=query, n=4, sampling=sampling)])
    assert cold_engine.prefill_tokens == len(query)
    assert [c.token_ids for c in warm.completions] == [c.token_ids for c in cold.completions]


def test_prompts_with_cached_prefixes_are_computed_together_and_match_a_cold_engine():
    system = tuple(BYTE.encode("You are a careful assistant. Answer in one short sentence. "))
    questions = [system + tuple(BYTE.encode(q)) for q in ("Why is the sky blue?", "2+2?", "Name a prime number, please.")]
    sampling = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=4, logprobs=True)
    engine = TorchEngine(tiny_model(0), BYTE)
    engine.generate([GenerationRequest(prompt_token_ids=system + tuple(BYTE.encode("Hello")), sampling=sampling)])
    before = engine.prefill_tokens
    requests = [GenerationRequest(prompt_token_ids=q, n=2, sampling=sampling) for q in questions]
    requests.append(GenerationRequest(prompt_token_ids=tuple(BYTE.encode("An unrelated prompt, not cached")),
                                      n=2, sampling=sampling))
    warm = engine.generate(requests)
    assert engine.prefix_cache.hits == 3
    assert engine.prefill_tokens - before == sum(len(r.prompt_token_ids) for r in requests) - 3 * len(system)
    cold = TorchEngine(tiny_model(0), BYTE, prefix_cache_tokens=0).generate(requests)
    for a, b in zip(warm, cold, strict=True):
        assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
        for x, y in zip(a.completions, b.completions, strict=True):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4, rtol=0)
