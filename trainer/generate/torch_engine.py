"""The `torch` engine: our decoder (`trainer/model`) with a KV cache, for tiny models, tests and
CPU-only clusters. It is not a vLLM replacement: one process, static batches.

How a batch runs:
1. The samples of all requests become rows, in chunks of at most `max_batch_rows`.
2. Each distinct prompt of a chunk is prefilled once, however many samples it has; the
   prefix cache supplies the keys and values of the longest prefix it already holds (the N
   rollouts of one prefix, the successive prefixes of one solution), so only the rest is
   computed. Prompts the cache knows nothing of are prefilled together, left-padded.
3. Every row's prompt cache is copied, left-padded, into one batch cache and all rows decode
   together, one token per step; rows that finish are dropped from the batch as it goes.

Sampling: each row draws from its own `random.Random(sample_seed(seed, i))` by inverse CDF
(one uniform number per token), so a sample depends only on its request, seed and index.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tokenmill.trainer.generate.interface import (
    Completion,
    Engine,
    GenerationInputError,
    GenerationRequest,
    RequestOutput,
    SamplingParams,
    TopLogprob,
    sample_seed,
)
from tokenmill.trainer.generate.kv import KVCache, forward_cached, fuse_weights
from tokenmill.trainer.model.transformer import Transformer
from tokenmill.trainer.tokenizer import Tokenizer

DEFAULT_MAX_BATCH_ROWS = 256
DEFAULT_PREFIX_CACHE_TOKENS = 65_536
DEFAULT_PREFIX_CACHE_ENTRIES = 256
FUSE_BELOW_PARAMETERS = 1_000_000_000


def prompt_ids(tokenizer: Tokenizer, request: GenerationRequest) -> list[int]:
    """The prompt's token ids: chat messages with Phi-4's template and an open assistant turn."""
    if request.prompt_token_ids is not None:
        return list(request.prompt_token_ids)
    return tokenizer.encode_chat(list(request.messages or ()), add_generation_prompt=True)


@dataclass
class _PrefixEntry:
    tokens: np.ndarray
    keys: list[torch.Tensor]  # per layer [kv_heads, length, head_dim]
    values: list[torch.Tensor]


class PrefixCache:
    """Keys and values of recent prompts, reused for any prompt that shares a prefix.

    Least recently used entries go first once the cache holds more than `max_tokens` tokens
    or `max_entries` prompts (a lookup compares against every entry). An entry that is a
    prefix of a newer one is dropped: the newer one serves it too.
    """

    def __init__(self, max_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS,
                 max_entries: int = DEFAULT_PREFIX_CACHE_ENTRIES) -> None:
        self.max_tokens = max_tokens
        self.max_entries = max_entries
        self.entries: OrderedDict[int, _PrefixEntry] = OrderedDict()
        self.tokens = 0
        self.hits = 0
        self.reused_tokens = 0
        self._next_id = 0

    def lookup(self, prompt: np.ndarray) -> tuple[int, _PrefixEntry | None]:
        """The longest cached prefix of `prompt`, at most len(prompt) - 1 tokens (the last
        prompt token is always computed: its logits start the completion)."""
        best, best_entry, best_id = 0, None, None
        limit = len(prompt) - 1
        for entry_id, entry in self.entries.items():
            length = min(limit, len(entry.tokens))
            if length <= best:
                continue
            same = prompt[:length] == entry.tokens[:length]
            common = length if same.all() else int(same.argmin())
            if common > best:
                best, best_entry, best_id = common, entry, entry_id
        if best_id is not None:
            self.entries.move_to_end(best_id)
            self.hits += 1
            self.reused_tokens += best
        return best, best_entry

    def insert(self, prompt: np.ndarray, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        if self.max_tokens <= 0 or len(prompt) > self.max_tokens:
            return
        for entry_id, entry in list(self.entries.items()):
            if len(entry.tokens) <= len(prompt) and np.array_equal(entry.tokens, prompt[:len(entry.tokens)]):
                self.tokens -= len(entry.tokens)
                del self.entries[entry_id]
        self.entries[self._next_id] = _PrefixEntry(prompt.copy(), keys, values)
        self._next_id += 1
        self.tokens += len(prompt)
        while self.tokens > self.max_tokens or len(self.entries) > self.max_entries:
            _, evicted = self.entries.popitem(last=False)
            self.tokens -= len(evicted.tokens)

    def clear(self) -> None:
        self.entries.clear()
        self.tokens = 0


@dataclass
class _Row:
    request_index: int
    sample_index: int
    prompt: int  # index into the chunk's distinct prompts
    prompt_len: int
    max_new: int
    params: SamplingParams
    rng: random.Random
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[TopLogprob]] = field(default_factory=list)
    finish: str | None = None
    text: str | None = None


class TorchEngine(Engine):
    engine_name = "torch"

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        identity: str = "unnamed",
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._identity = identity
        self.max_batch_rows = max_batch_rows
        self.prefix_cache = PrefixCache(prefix_cache_tokens)
        self.device = model.embed.weight.device
        self.default_stop_ids = frozenset({tokenizer.eos_id, tokenizer.eot_id})
        if tokenizer.vocab_size > model.config.vocab_size:
            raise GenerationInputError(
                f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids but the model only "
                f"{model.config.vocab_size} embeddings: the model and tokenizer do not match")
        self.prefill_tokens = 0
        # A second copy of the attention and MLP input matrices: worth it for small models only.
        small = model.num_parameters() < FUSE_BELOW_PARAMETERS
        self.fused = fuse_weights(self.model) if small else None

    @property
    def model_identity(self) -> str:
        return self._identity

    @property
    def context_length(self) -> int:
        return self.model.max_positions

    # -- checks ------------------------------------------------------------------------

    def check_requests(self, requests: Sequence[GenerationRequest]) -> None:
        super().check_requests(requests)
        vocab = self.tokenizer.vocab_size
        for index, request in enumerate(requests):
            where = f"requests[{index}]"
            ids = prompt_ids(self.tokenizer, request)
            if len(ids) >= self.context_length:
                raise GenerationInputError(
                    f"{where}: the prompt has {len(ids)} tokens, the model's context is "
                    f"{self.context_length}: no room to generate")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise GenerationInputError(
                    f"{where}.promptTokenIds: id {bad[0]} is outside the tokenizer's vocabulary of {vocab}")
            bad_stop = [t for t in request.sampling.stop_token_ids if not 0 <= t < vocab]
            if bad_stop:
                raise GenerationInputError(
                    f"{where}.sampling.stopTokenIds: id {bad_stop[0]} is outside the vocabulary of {vocab}")

    # -- generation --------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[RequestOutput]:
        self.check_requests(requests)
        prompts = [prompt_ids(self.tokenizer, request) for request in requests]
        started = time.perf_counter()
        tasks = [(r, i) for r, request in enumerate(requests) for i in request.indices]
        finished: dict[int, list[Completion]] = {r: [] for r in range(len(requests))}
        for start in range(0, len(tasks), self.max_batch_rows):
            chunk = tasks[start:start + self.max_batch_rows]
            for row in self._run_chunk(requests, prompts, chunk):
                finished[row.request_index].append(self._completion(row))
        outputs = []
        for r, request in enumerate(requests):
            completions = sorted(finished[r], key=lambda c: c.index)
            outputs.append(RequestOutput(request, completions))
        if self.metrics is not None:
            self.metrics.observe_latency(time.perf_counter() - started)
        return outputs

    def _completion(self, row: _Row) -> Completion:
        params = row.params
        return Completion(
            index=row.sample_index,
            token_ids=row.tokens,
            text=row.text if row.text is not None else self._text(row.tokens, row),
            finish_reason=row.finish or "length",
            prompt_tokens=row.prompt_len,
            logprobs=row.logprobs if params.logprobs or params.top_logprobs else None,
            top_logprobs=row.tops if params.top_logprobs else None,
        )

    def _text(self, tokens: list[int], row: _Row) -> str:
        if tokens and row.finish == "stop" and tokens[-1] in row.stop_ids:
            tokens = tokens[:-1]
        return self.tokenizer.decode(tokens)

    def _run_chunk(
        self, requests: Sequence[GenerationRequest], prompts: list[list[int]], chunk: list[tuple[int, int]]
    ) -> list[_Row]:
        distinct = list(dict.fromkeys(r for r, _ in chunk))
        slot = {r: position for position, r in enumerate(distinct)}
        prefilled = self._prefill([prompts[r] for r in distinct])
        rows = []
        for r, i in chunk:
            params = requests[r].sampling
            prompt_len = len(prompts[r])
            seed = sample_seed(params.seed, i)
            rows.append(_Row(
                request_index=r, sample_index=i, prompt=slot[r], prompt_len=prompt_len,
                max_new=min(params.max_tokens, self.context_length - prompt_len), params=params,
                rng=random.Random(seed if seed is not None else random.SystemRandom().getrandbits(63)),
                stop_ids=self.default_stop_ids | frozenset(params.stop_token_ids),
            ))
        self._decode(rows, prefilled)
        return rows

    @torch.inference_mode()
    def _prefill(self, prompts: list[list[int]]) -> list[tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]]:
        """Per prompt: keys and values per layer [kv_heads, len, head_dim] and the last logits."""
        results: list = [None] * len(prompts)
        misses = []
        for index, prompt in enumerate(prompts):
            tokens = np.asarray(prompt, dtype=np.int64)
            reused, entry = self.prefix_cache.lookup(tokens)
            if entry is None:
                misses.append(index)
                continue
            cache = KVCache.empty(self.model, 1, len(prompt))
            for layer in range(len(cache.keys)):
                cache.keys[layer][0, :, :reused] = entry.keys[layer][:, :reused]
                cache.values[layer][0, :, :reused] = entry.values[layer][:, :reused]
            cache.valid[:] = True
            cache.length, cache.padded = reused, False
            ids = torch.tensor([prompt[reused:]], device=self.device)
            positions = torch.arange(reused, len(prompt), device=self.device)[None]
            logits = forward_cached(self.model, ids, positions, cache, fused=self.fused)[0]
            self.prefill_tokens += len(prompt) - reused
            results[index] = self._keep(tokens, cache, 0, 0, logits)
        if misses:
            longest = max(len(prompts[i]) for i in misses)
            cache = KVCache.empty(self.model, len(misses), longest)
            ids = torch.full((len(misses), longest), self.tokenizer.pad_id, device=self.device)
            positions = torch.zeros((len(misses), longest), dtype=torch.long, device=self.device)
            for row, index in enumerate(misses):
                prompt = prompts[index]
                pad = longest - len(prompt)
                ids[row, pad:] = torch.tensor(prompt, device=self.device)
                positions[row, pad:] = torch.arange(len(prompt), device=self.device)
                cache.valid[row, pad:] = True
            cache.padded = any(len(prompts[i]) != longest for i in misses)
            logits = forward_cached(self.model, ids, positions, cache, fused=self.fused)
            self.prefill_tokens += sum(len(prompts[i]) for i in misses)
            for row, index in enumerate(misses):
                tokens = np.asarray(prompts[index], dtype=np.int64)
                results[index] = self._keep(tokens, cache, row, longest - len(tokens), logits[row])
        return results

    def _keep(self, tokens: np.ndarray, cache: KVCache, row: int, pad: int, logits: torch.Tensor):
        keys = [k[row, :, pad:].clone() for k in cache.keys]
        values = [v[row, :, pad:].clone() for v in cache.values]
        self.prefix_cache.insert(tokens, keys, values)
        return keys, values, logits

    @torch.inference_mode()
    def _decode(self, rows: list[_Row], prefilled: list) -> None:
        longest = max(row.prompt_len for row in rows)
        capacity = longest + max(row.max_new for row in rows)
        cache = KVCache.empty(self.model, len(rows), capacity)
        for b, row in enumerate(rows):
            keys, values, _ = prefilled[row.prompt]
            pad = longest - row.prompt_len
            for layer in range(len(keys)):
                cache.keys[layer][b, :, pad:longest] = keys[layer]
                cache.values[layer][b, :, pad:longest] = values[layer]
            cache.valid[b, pad:longest] = True
        cache.length = longest
        cache.padded = any(row.prompt_len != longest for row in rows)
        logits = torch.stack([prefilled[row.prompt][2] for row in rows])
        active = list(range(len(rows)))  # batch position -> index into rows
        lengths = torch.tensor([row.prompt_len for row in rows], device=self.device)
        step = 0
        while True:
            chosen = self._choose(logits, [rows[a] for a in active])
            still = []
            for position, a in enumerate(active):
                row = rows[a]
                if row.finish is None:
                    self._append(row, chosen, position)
                if row.finish is None:
                    still.append(position)
            if not still:
                return
            step += 1
            if len(still) <= len(active) * 3 // 4:
                keep = torch.tensor(still, device=self.device)
                cache = cache.select(keep)
                chosen_ids, lengths = chosen[0][keep], lengths[keep]
                active = [active[p] for p in still]
            else:
                chosen_ids = chosen[0]
            positions = (lengths + (step - 1))[:, None]
            cache.valid[:, cache.length] = True
            logits = forward_cached(self.model, chosen_ids[:, None], positions, cache, fused=self.fused)

    def _append(self, row: _Row, chosen: tuple, position: int) -> None:
        _, ids, logprobs, tops = chosen
        token = ids[position]
        row.tokens.append(token)
        params = row.params
        if params.logprobs or params.top_logprobs:
            row.logprobs.append(float(logprobs[position]))
        if params.top_logprobs:
            values, indices = tops
            row.tops.append([
                TopLogprob(t, v, self.tokenizer.decode([t]))
                for v, t in zip(values[position][:params.top_logprobs],
                                indices[position][:params.top_logprobs], strict=True)
            ])
        if token in row.stop_ids:
            row.finish = "stop"
        elif params.stop:
            text = self.tokenizer.decode(row.tokens)
            cut = min((text.find(s) for s in params.stop if s in text), default=-1)
            if cut >= 0:
                row.finish, row.text = "stop", text[:cut]
        if row.finish is None and len(row.tokens) >= row.max_new:
            row.finish = "length"

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> tuple:
        """The next token of every row, its raw log-probability, and the top-k when asked."""
        vocab = self.tokenizer.vocab_size
        if logits.shape[1] > vocab:
            logits = logits.clone()
            logits[:, vocab:] = float("-inf")
        chosen = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        groups: dict[tuple, list[int]] = {}
        for position, row in enumerate(rows):
            p = row.params
            key = (0.0, 0, 1.0) if p.temperature == 0 else (p.temperature, p.top_k, p.top_p)
            groups.setdefault(key, []).append(position)
        for (temperature, top_k, top_p), positions in groups.items():
            index = torch.tensor(positions, device=logits.device)
            if temperature == 0:
                chosen[index] = logits[index].argmax(dim=-1)
                continue
            uniforms = torch.tensor([rows[p].rng.random() for p in positions], dtype=torch.float64)
            chosen[index] = _sample(logits[index], temperature, top_k, top_p, uniforms.to(logits.device))
        picked, tops = None, None
        if any(row.params.logprobs or row.params.top_logprobs for row in rows):
            raw = torch.log_softmax(logits, dim=-1)
            picked = raw.gather(1, chosen[:, None])[:, 0].tolist()
            want_top = max(row.params.top_logprobs for row in rows)
            if want_top:
                top = raw.topk(want_top, dim=-1)
                tops = (top.values.tolist(), top.indices.tolist())
        return chosen, chosen.tolist(), picked, tops

    def close(self) -> None:
        self.prefix_cache.clear()


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling of each row with its own uniform number in [0, 1)."""
    scores = logits / temperature
    order = None
    if top_k and top_k < scores.shape[1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(dim=-1)
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before >= top_p, 0.0)
    # no need to renormalise what is left: the uniform number is scaled to the total instead
    probs = probs.double()
    cdf = probs.cumsum(dim=-1)
    picks = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)[:, 0]
    picks = picks.clamp(max=probs.shape[1] - 1)
    # a token of probability zero is never drawn: step back past any run of them
    zero = probs.gather(1, picks[:, None])[:, 0] == 0
    if zero.any():
        nonzero_upto = torch.where(probs > 0, torch.arange(probs.shape[1], device=probs.device), -1).cummax(dim=-1).values
        picks = torch.where(zero, nonzero_upto.gather(1, picks[:, None])[:, 0], picks)
    return order.gather(1, picks[:, None])[:, 0] if order is not None else picks
