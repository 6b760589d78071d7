"""The torch engine's prefix cache: keys and values of recent prompts, reused by any prompt that
starts the same way (the N rollouts of one prefix, the successive prefixes of one solution).

Lookups are indexed, not scanned: every entry registers a chained hash of each of its
block-aligned prefixes (`BLOCK` tokens per block), so finding the longest cached prefix of a
prompt walks the prompt's own blocks, one dictionary probe each, and then extends the match
token by token into the next block among the entries that share the matched blocks. A match
shorter than one block is not worth a lookup and is not made. The chosen entry's tokens are
compared with the prompt before use, so a hash collision can only cost a miss.

Entries leave least recently used first once the cache holds more than `max_tokens` tokens,
`max_bytes` bytes of keys and values, or `max_entries` prompts. An entry that is a prefix of
a newer one is dropped: the newer one serves it too.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 16
DEFAULT_PREFIX_CACHE_TOKENS = 65_536
DEFAULT_PREFIX_CACHE_ENTRIES = 256


@dataclass
class PrefixEntry:
    tokens: np.ndarray
    keys: list[torch.Tensor]  # per layer [kv_heads, length, head_dim]
    values: list[torch.Tensor]
    chain: list[int]  # the hash of each block-aligned prefix
    whole: tuple[int, bytes]  # the hash of the last full block and the rest: the whole prompt
    nbytes: int


def _chain(tokens: np.ndarray) -> list[int]:
    """hash(tokens[:BLOCK * k]) for k = 1 .. len // BLOCK, each from the one before."""
    hashes, running = [], 0
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        running = hash((running, tokens[start:start + BLOCK].tobytes()))
        hashes.append(running)
    return hashes


def _whole(tokens: np.ndarray, chain: list[int], length: int) -> tuple[int, bytes]:
    """The key of tokens[:length], given the chain of tokens (or of a longer sequence)."""
    blocks = length // BLOCK
    return (chain[blocks - 1] if blocks else 0, tokens[blocks * BLOCK:length].tobytes())


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """The length of the common prefix of two equally long arrays."""
    same = a == b
    return len(a) if same.all() else int(same.argmin())


class PrefixCache:
    def __init__(self, max_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS,
                 max_entries: int = DEFAULT_PREFIX_CACHE_ENTRIES, max_bytes: int | None = None) -> None:
        self.max_tokens = max_tokens
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, PrefixEntry] = OrderedDict()  # least recently used first
        self.tokens = 0
        self.bytes = 0
        self.hits = 0
        self.reused_tokens = 0
        self._blocks: dict[int, dict[int, None]] = {}  # block-prefix hash -> ids of entries holding it
        self._wholes: dict[tuple[int, bytes], int] = {}
        self._lengths: Counter[int] = Counter()
        self._next_id = 0

    def lookup(self, prompt: np.ndarray) -> tuple[int, PrefixEntry | None]:
        """The longest cached prefix of `prompt`, at most len(prompt) - 1 tokens (the last
        prompt token is always computed: its logits start the completion), and its entry."""
        limit = len(prompt) - 1
        if limit < BLOCK or not self.entries:
            return 0, None
        chain = _chain(prompt[:limit])
        blocks = 0
        while blocks < len(chain) and chain[blocks] in self._blocks:
            blocks += 1
        if not blocks:
            return 0, None
        matched = blocks * BLOCK
        best, best_id = -1, None
        for entry_id in self._blocks[chain[blocks - 1]]:
            entry = self.entries[entry_id]
            end = min(len(entry.tokens), matched + BLOCK, limit)
            extra = _common(entry.tokens[matched:end], prompt[matched:end])
            if extra > best:
                best, best_id = extra, entry_id
        entry = self.entries[best_id]
        reused = matched + best
        if not np.array_equal(entry.tokens[:reused], prompt[:reused]):
            return 0, None  # a hash collision
        self.entries.move_to_end(best_id)
        self.hits += 1
        self.reused_tokens += reused
        return reused, entry

    def insert(self, prompt: np.ndarray, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Caches a prompt's keys and values (compact tensors: the cache keeps them as given)."""
        length = len(prompt)
        if self.max_tokens <= 0 or length > self.max_tokens:
            return
        nbytes = sum(t.numel() * t.element_size() for t in (*keys, *values))
        if self.max_bytes is not None and nbytes > self.max_bytes:
            return
        tokens = np.array(prompt, dtype=np.int64)
        chain = _chain(tokens)
        whole = _whole(tokens, chain, length)
        known = self._wholes.get(whole)
        if known is not None and np.array_equal(self.entries[known].tokens, tokens):
            self.entries.move_to_end(known)
            return
        for shorter in [n for n in self._lengths if n <= length]:
            older = self._wholes.get(_whole(tokens, chain, shorter))
            if older is not None and np.array_equal(self.entries[older].tokens, tokens[:shorter]):
                self._remove(older)
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self.entries[entry_id] = PrefixEntry(tokens, keys, values, chain, whole, nbytes)
        for block_hash in chain:
            self._blocks.setdefault(block_hash, {})[entry_id] = None
        self._wholes[whole] = entry_id
        self._lengths[length] += 1
        self.tokens += length
        self.bytes += nbytes
        while (self.tokens > self.max_tokens or len(self.entries) > self.max_entries
               or (self.max_bytes is not None and self.bytes > self.max_bytes)):
            self._remove(next(iter(self.entries)))

    def _remove(self, entry_id: int) -> None:
        entry = self.entries.pop(entry_id)
        for block_hash in entry.chain:
            holders = self._blocks[block_hash]
            del holders[entry_id]
            if not holders:
                del self._blocks[block_hash]
        if self._wholes.get(entry.whole) == entry_id:
            del self._wholes[entry.whole]
        self._lengths[len(entry.tokens)] -= 1
        if not self._lengths[len(entry.tokens)]:
            del self._lengths[len(entry.tokens)]
        self.tokens -= len(entry.tokens)
        self.bytes -= entry.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self._blocks.clear()
        self._wholes.clear()
        self._lengths.clear()
        self.tokens = 0
        self.bytes = 0
