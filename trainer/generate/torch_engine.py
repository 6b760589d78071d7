"""The `torch` engine: our decoder (`trainer/model`) with a KV cache, for tiny models, tests and
CPU-only clusters. It is not a vLLM replacement: one process, static batches.

How a batch runs:
1. The samples of all requests become rows, in chunks of at most `max_batch_rows`.
2. Each distinct prompt of a chunk is prefilled once, however many samples it has; the
   prefix cache (`prefix_cache.py`) supplies the keys and values of the longest prefix it
   already holds (the N rollouts of one prefix, the successive prefixes of one solution), so
   only the rest is computed. Prompts the cache knows nothing of are prefilled together,
   left-padded.
3. All rows decode together, one token per step (`kv.decode_step`). When a chunk has few
   distinct prompts with several samples each, every prompt's keys and values are one shared
   segment that all its samples attend to (no per-sample copy); otherwise the prompts are
   copied, left-padded, into one per-row segment. Generated keys and values go into a
   preallocated per-row cache. Rows that finish are dropped from the batch as it goes.

Sampling: each row draws from its own `random.Random(sample_seed(seed, i))` by inverse CDF
(one uniform number per token; over the vocabulary in id order, or in order of probability
when top-p cuts the tail), so a sample depends only on its request, seed and index. All rows
of a step are sampled together, whatever their temperature, top-k and top-p.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
from tokenmill.trainer.generate.kv import (
    DecodeBatch,
    KVCache,
    PrefixSegment,
    RopeTable,
    decode_step,
    forward_cached,
    fuse_weights,
)
from tokenmill.trainer.generate.prefix_cache import DEFAULT_PREFIX_CACHE_TOKENS, PrefixCache
from tokenmill.trainer.model.transformer import Transformer
from tokenmill.trainer.tokenizer import Tokenizer

DEFAULT_MAX_BATCH_ROWS = 256
# Up to this many distinct prompts in a chunk, samples attend to their prompt as a shared segment.
DEFAULT_MAX_SHARED_PROMPTS = 8
FUSE_BELOW_PARAMETERS = 1_000_000_000

__all__ = ["PrefixCache", "TorchEngine", "prompt_ids"]


def _descending(values: torch.Tensor) -> torch.Tensor:
    """Each row's values sorted, largest first."""
    if values.device.type == "cpu":  # numpy's vectorised sort is far quicker than torch's on CPUs
        return torch.from_numpy(np.ascontiguousarray(np.sort(values.numpy(), axis=-1)[:, ::-1]))
    return values.sort(dim=-1, descending=True).values


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the first position where the cumulative mass exceeds uniform x total mass (so no
    renormalising), a position of nonzero probability since the target stays below the total."""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0]


def prompt_ids(tokenizer: Tokenizer, request: GenerationRequest) -> list[int]:
    """The prompt's token ids: chat messages with Phi-4's template and an open assistant turn."""
    if request.prompt_token_ids is not None:
        return list(request.prompt_token_ids)
    return tokenizer.encode_chat(list(request.messages or ()), add_generation_prompt=True)


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
    count: int = 0  # tokens generated once finished
    finish: str | None = None
    text: str | None = None


class _Sampler:
    """Chooses the next token of every row of a step at once, each with its own parameters."""

    def __init__(self, rows: list[_Row], vocab: int, device: torch.device) -> None:
        self.rows, self.vocab, self.device = rows, vocab, device
        params = [row.params for row in rows]
        self.greedy_only = all(p.temperature == 0 for p in params)
        self.greedy = torch.tensor([p.temperature == 0 for p in params], device=device)
        self.any_greedy = bool(self.greedy.any())
        self.temperature = torch.tensor([[p.temperature or 1.0] for p in params], device=device)
        top_k = [p.top_k if p.temperature and 0 < p.top_k < vocab else vocab for p in params]
        self.top_k = torch.tensor([[k - 1] for k in top_k], device=device)
        self.use_top_k = any(k < vocab for k in top_k)
        top_p = [p.top_p if p.temperature and p.top_p < 1.0 else 2.0 for p in params]  # 2: keep all
        self.top_p = torch.tensor([[p] for p in top_p], device=device)
        self.nucleus = torch.tensor([p < 1.0 for p in top_p], device=device)
        self.use_top_p = any(p < 1.0 for p in top_p)
        self.nucleus_only = all(p < 1.0 for p in top_p)
        self.logprobs = any(p.logprobs or p.top_logprobs for p in params)
        self.top_logprobs = max(p.top_logprobs for p in params)

    def select(self, keep: list[int]) -> _Sampler:
        return _Sampler([self.rows[k] for k in keep], self.vocab, self.device)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits[:, :self.vocab]
        best = logits.argmax(dim=-1)
        if self.greedy_only:
            return best
        scores = logits / self.temperature
        if self.use_top_k:
            kth = _descending(scores).gather(1, self.top_k)
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = scores.softmax(dim=-1)
        uniforms = torch.from_numpy(np.array([row.rng.random() for row in self.rows])[:, None]).to(self.device)
        picks = None
        if not self.nucleus_only:  # rows without top-p draw over the vocabulary in id order
            picks = _inverse_cdf(probs, uniforms)
        if self.use_top_p:
            # rows with top-p draw over the tokens in order of probability, cut where the mass
            # of the more likely tokens reaches top_p
            ordered = _descending(probs)
            ordered = ordered.masked_fill(ordered.cumsum(dim=-1) - ordered >= self.top_p, 0.0)
            value = ordered.gather(1, _inverse_cdf(ordered, uniforms)[:, None])
            in_nucleus = (probs == value).to(torch.uint8).argmax(dim=-1)  # the first token of that probability
            picks = in_nucleus if picks is None else torch.where(self.nucleus, in_nucleus, picks)
        return torch.where(self.greedy, best, picks) if self.any_greedy else picks

    def logprobs_of(self, logits: torch.Tensor, chosen: torch.Tensor):
        """The raw log-probabilities of the chosen tokens [rows], and the top-k (values, ids)."""
        raw = torch.log_softmax(logits[:, :self.vocab], dim=-1)
        picked = raw.gather(1, chosen[:, None])[:, 0]
        top = raw.topk(self.top_logprobs, dim=-1) if self.top_logprobs else None
        return picked, top


class TorchEngine(Engine):
    engine_name = "torch"
    #: called after each decode step with (request index, sample index) of the rows that go on
    #: and the token each drew (a row's last token is not reported); `tokenmill serve` streams them
    step_listener: Callable[[list[tuple[int, int]], list[int]], None] | None = None

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        identity: str = "unnamed",
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS,
        prefix_cache_bytes: int | None = None,
        max_shared_prompts: int = DEFAULT_MAX_SHARED_PROMPTS,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._identity = identity
        self.max_batch_rows = max_batch_rows
        self.prefix_cache = PrefixCache(prefix_cache_tokens, max_bytes=prefix_cache_bytes)
        self.max_shared_prompts = max_shared_prompts
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
        self.rope = RopeTable(self.model)

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
            for request_index, completion in self._run_chunk(requests, prompts, chunk):
                finished[request_index].append(completion)
        outputs = []
        for r, request in enumerate(requests):
            completions = sorted(finished[r], key=lambda c: c.index)
            outputs.append(RequestOutput(request, completions))
        if self.metrics is not None:
            self.metrics.observe_latency(time.perf_counter() - started)
        return outputs

    def _run_chunk(
        self, requests: Sequence[GenerationRequest], prompts: list[list[int]], chunk: list[tuple[int, int]]
    ) -> list[tuple[int, Completion]]:
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
        return self._decode(rows, prefilled)

    @torch.inference_mode()
    def _prefill(self, prompts: list[list[int]]) -> list[tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]]:
        """Per prompt: keys and values per layer [kv_heads, len, head_dim] and the last logits.
        Prompts with a cached prefix are computed together, and so are those without."""
        tokens = [np.asarray(prompt, dtype=np.int64) for prompt in prompts]
        found = [self.prefix_cache.lookup(t) for t in tokens]
        results: list = [None] * len(prompts)
        for hit in (True, False):
            group = [i for i, (_, entry) in enumerate(found) if (entry is not None) == hit]
            if group:
                for index, result in zip(group, self._prefill_together([tokens[i] for i in group],
                                                                       [found[i] for i in group]), strict=True):
                    results[index] = result
        return results

    def _prefill_together(self, prompts: list[np.ndarray], found: list) -> list:
        """One forward pass over the last `width` tokens of every prompt (right-aligned, left-padded),
        `width` being the most any of them lacks from the cache; whatever lies before a prompt's
        window comes from its cached prefix."""
        width = max(len(prompt) - reused for prompt, (reused, _) in zip(prompts, found, strict=True))
        longest = max(len(prompt) for prompt in prompts)
        cache = KVCache.empty(self.model, len(prompts), longest)
        ids = torch.full((len(prompts), width), self.tokenizer.pad_id, device=self.device)
        positions = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        for row, (prompt, (reused, entry)) in enumerate(zip(prompts, found, strict=True)):
            offset = longest - len(prompt)  # the column of the prompt's first token
            first = max(0, len(prompt) - width)  # its first token inside the window (<= reused)
            for layer in range(len(cache.keys)):
                if first:
                    cache.keys[layer][row, :, offset:offset + first] = entry.keys[layer][:, :first]
                    cache.values[layer][row, :, offset:offset + first] = entry.values[layer][:, :first]
            ids[row, width - (len(prompt) - first):] = torch.from_numpy(prompt[first:]).to(self.device)
            positions[row, width - (len(prompt) - first):] = torch.arange(first, len(prompt), device=self.device)
            cache.valid[row, offset:] = True
            self.prefill_tokens += len(prompt) - reused
        cache.length = longest - width
        cache.padded = any(len(prompt) != longest for prompt in prompts)
        logits = forward_cached(self.model, ids, positions, cache, fused=self.fused)
        return [self._keep(prompt, cache, row, longest - len(prompt), logits[row])
                for row, prompt in enumerate(prompts)]

    def _keep(self, tokens: np.ndarray, cache: KVCache, row: int, pad: int, logits: torch.Tensor):
        keys = [k[row, :, pad:].clone() for k in cache.keys]
        values = [v[row, :, pad:].clone() for v in cache.values]
        self.prefix_cache.insert(tokens, keys, values)
        return keys, values, logits

    def _segments(self, rows: list[_Row], prefilled: list) -> list[PrefixSegment]:
        """The rows' prompts as decode segments: shared by each prompt's samples when the chunk
        has few distinct prompts and some have several samples, else one per-row segment."""
        if len(prefilled) <= self.max_shared_prompts and len(rows) > len(prefilled):
            segments: list[PrefixSegment] = []
            for b, row in enumerate(rows):  # a chunk's rows come grouped by request
                if segments and rows[segments[-1].start].prompt == row.prompt:
                    segments[-1].stop = b + 1
                else:
                    keys, values, _ = prefilled[row.prompt]
                    segments.append(PrefixSegment(b, b + 1, keys, values, shared=True))
            return segments
        config = self.model.config
        parameter = self.model.embed.weight
        longest = max(row.prompt_len for row in rows)
        shape = (len(rows), config.num_kv_heads, longest, config.head_dim)
        # zeros, not garbage, in the padding: a masked NaN would still poison the weighted sum
        keys = [torch.zeros(shape, dtype=parameter.dtype, device=self.device) for _ in range(config.num_layers)]
        values = [torch.zeros(shape, dtype=parameter.dtype, device=self.device) for _ in range(config.num_layers)]
        mask = None
        if any(row.prompt_len != longest for row in rows):
            mask = torch.zeros((len(rows), 1, 1, longest), dtype=parameter.dtype, device=self.device)
        for b, row in enumerate(rows):
            prompt_keys, prompt_values, _ = prefilled[row.prompt]
            pad = longest - row.prompt_len
            for layer in range(config.num_layers):
                keys[layer][b, :, pad:] = prompt_keys[layer]
                values[layer][b, :, pad:] = prompt_values[layer]
            if pad and mask is not None:
                mask[b, ..., :pad] = float("-inf")
        return [PrefixSegment(0, len(rows), keys, values, shared=False, mask=mask)]

    @torch.inference_mode()
    def _decode(self, rows: list[_Row], prefilled: list) -> list[tuple[int, Completion]]:
        capacity = max(row.max_new for row in rows)
        batch = DecodeBatch.create(
            self.model, self._segments(rows, prefilled),
            torch.tensor([row.prompt_len for row in rows], device=self.device), capacity)
        if len(prefilled) == 1:
            logits = prefilled[0][2][None].expand(len(rows), -1)
        else:
            logits = torch.stack([prefilled[row.prompt][2] for row in rows])
        sampler = _Sampler(rows, self.tokenizer.vocab_size, self.device)
        tokens = np.zeros((len(rows), capacity), dtype=np.int64)
        want_logprobs, top_k = sampler.logprobs, sampler.top_logprobs
        logprobs = np.zeros((len(rows), capacity)) if want_logprobs else None
        top_values = np.zeros((len(rows), capacity, top_k)) if top_k else None
        top_ids = np.zeros((len(rows), capacity, top_k), dtype=np.int64) if top_k else None
        max_new = np.array([row.max_new for row in rows])
        stop_any = np.zeros(self.tokenizer.vocab_size, dtype=bool)  # whether some row stops at that id
        stop_any[list(set().union(*(row.stop_ids for row in rows)))] = True
        text_stops = [b for b, row in enumerate(rows) if row.params.stop]
        done = np.zeros(len(rows), dtype=bool)
        active = np.arange(len(rows))  # batch position -> row
        step = 0
        while True:
            chosen = sampler.choose(logits)
            ids = chosen.cpu().numpy()
            tokens[active, step] = ids
            if want_logprobs:
                picked, top = sampler.logprobs_of(logits, chosen)
                logprobs[active, step] = picked.cpu().numpy()
                if top is not None:
                    top_values[active, step] = top.values.cpu().numpy()
                    top_ids[active, step] = top.indices.cpu().numpy()
            ending = ~done[active] & (step + 1 >= max_new[active])
            for position in np.flatnonzero(~done[active] & stop_any[ids]):
                row = rows[active[position]]
                if int(ids[position]) in row.stop_ids:
                    row.finish, ending[position] = "stop", True
            for b in text_stops:
                row = rows[b]
                if not done[b] and row.finish is None:
                    text = self.tokenizer.decode(tokens[b, :step + 1].tolist())
                    cut = min((text.find(s) for s in row.params.stop if s in text), default=-1)
                    if cut >= 0:
                        row.finish, row.text = "stop", text[:cut]
                        done[b], row.count = True, step + 1
            for position in np.flatnonzero(ending):
                row = rows[active[position]]
                row.count, row.finish = step + 1, row.finish or "length"
            done[active[ending]] = True
            alive = np.flatnonzero(~done[active])
            if self.step_listener is not None and len(alive):
                self.step_listener([(rows[b].request_index, rows[b].sample_index) for b in active[alive]],
                                   ids[alive].tolist())
            if not len(alive):
                break
            if len(alive) <= len(active) * 3 // 4:
                keep = alive.tolist()
                batch, sampler = batch.select(keep), sampler.select(keep)
                chosen, active = chosen[torch.from_numpy(alive).to(self.device)], active[alive]
            step += 1
            logits = decode_step(self.model, chosen, batch, self.rope, fused=self.fused)
        return [(row.request_index, self._completion(row, b, tokens, logprobs, top_values, top_ids))
                for b, row in enumerate(rows)]

    def _completion(self, row: _Row, b: int, tokens: np.ndarray, logprobs: np.ndarray | None,
                    top_values: np.ndarray | None, top_ids: np.ndarray | None) -> Completion:
        """Row b's completion from the decode arrays [rows, steps(, k)]."""
        params = row.params
        ids = tokens[b, :row.count].tolist()
        tops = None
        if params.top_logprobs:
            k = params.top_logprobs
            tops = [[TopLogprob(t, v, self.tokenizer.decode([t])) for v, t in zip(values[:k], indices[:k], strict=True)]
                    for values, indices in zip(top_values[b, :row.count].tolist(), top_ids[b, :row.count].tolist(),
                                               strict=True)]
        return Completion(
            index=row.sample_index,
            token_ids=ids,
            text=row.text if row.text is not None else self._text(ids, row),
            finish_reason=row.finish or "length",
            prompt_tokens=row.prompt_len,
            logprobs=logprobs[b, :row.count].tolist() if params.logprobs or params.top_logprobs else None,
            top_logprobs=tops,
        )

    def _text(self, tokens: list[int], row: _Row) -> str:
        if tokens and row.finish == "stop" and tokens[-1] in row.stop_ids:
            tokens = tokens[:-1]
        return self.tokenizer.decode(tokens)

    def close(self) -> None:
        self.prefix_cache.clear()
