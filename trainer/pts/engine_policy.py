"""The search's Policy over a generation engine (`tokenmill.trainer.generate.Engine`).

Every request is a token-id prompt: the question's ids followed by the solution prefix exactly
as sampled. The `n` rollouts of a prefix are one request (the engine prefills the prefix once
for all of them); `rollout_batch` sends the requests of several prefixes (of one question or
of several) as one engine call (their rows decode together), `sample_solutions_batch` the
solutions of several questions, and the engine's prefix cache (torch) or vLLM's prefix caching
reuses the KV of the prefixes of one solution across calls. Each request's seed is derived
from the job's seed and the prompt's token ids, so a prefix's samples do not depend on the
calls it is batched with, and a rerun draws the same samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from tokenmill.trainer.generate.interface import (
    Engine,
    GenerationError,
    GenerationRequest,
    SamplingParams,
)
from tokenmill.trainer.pts.policy import Continuation, TokenIds


def derived_seed(seed: int | None, purpose: str, token_ids: Sequence[int]) -> int | None:
    if seed is None:
        return None
    digest = hashlib.sha256(f"tokenmill-pts:{seed}:{purpose}:{','.join(map(str, token_ids))}".encode())
    return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)


class EnginePolicy:
    """Solutions and rollouts from `engine`; a solution has at most `sampling.max_tokens` tokens,
    and a rollout from a prefix of i solution tokens at most `max_tokens - i`."""

    def __init__(self, engine: Engine, sampling: SamplingParams, *, stop_token_ids: Iterable[int],
                 vocab_size: int):
        self.engine = engine
        self.sampling = sampling
        self.stop_token_ids = frozenset(int(t) for t in (*stop_token_ids, *sampling.stop_token_ids))
        self.vocab_size = vocab_size
        self.requests = 0
        """Generation requests sent (one per prompt: the solutions of a question, the rollouts of a prefix)."""
        self.calls = 0
        """Engine calls made (a `rollout_batch` is one)."""

    def _generate_all(self, requests: list[GenerationRequest]) -> list[list]:
        outputs = self.engine.generate(requests)
        self.requests += len(requests)
        self.calls += 1
        for output in outputs:
            if not output.ok:
                raise GenerationError(f"a {len(output.request.prompt_token_ids)}-token prompt failed: {output.error}")
        return [output.completions for output in outputs]

    def sample_solutions(self, question_ids: TokenIds, n: int) -> list[Continuation]:
        return self.sample_solutions_batch([(question_ids, n)])[0]

    def sample_solutions_batch(self, wanted: Sequence[tuple[TokenIds, int]]) -> list[list[Continuation]]:
        """`sample_solutions` of each (question_ids, n), in one engine call."""
        requests = [GenerationRequest(prompt_token_ids=tuple(question_ids), n=n, sampling=replace(
            self.sampling, logprobs=True, seed=derived_seed(self.sampling.seed, "solutions", question_ids)))
            for question_ids, n in wanted]
        if not requests:
            return []
        return [[Continuation(tuple(c.token_ids), tuple(c.logprobs or ())) for c in completions]
                for completions in self._generate_all(requests)]

    def rollout(self, question_ids: TokenIds, solution_prefix: TokenIds, n: int) -> list[Continuation]:
        return self.rollout_batch([(question_ids, solution_prefix, n)])[0]

    def rollout_batch(self, wanted: Sequence[tuple[TokenIds, TokenIds, int]]) -> list[list[Continuation]]:
        """`rollout` of each (question_ids, solution_prefix, n), the prefixes that still continue
        generated in one engine call."""
        results: list[list[Continuation] | None] = []
        requests, slots = [], []
        for question_ids, solution_prefix, n in wanted:
            budget = self.sampling.max_tokens - len(solution_prefix)
            if budget <= 0 or (solution_prefix and solution_prefix[-1] in self.stop_token_ids):
                results.append([Continuation(()) for _ in range(n)])  # the solution already ended
                continue
            prompt = tuple(question_ids) + tuple(solution_prefix)
            sampling = replace(self.sampling, max_tokens=budget, logprobs=False, top_logprobs=0,
                               seed=derived_seed(self.sampling.seed, "rollout", prompt))
            slots.append(len(results))
            results.append(None)
            requests.append(GenerationRequest(prompt_token_ids=prompt, n=n, sampling=sampling))
        if requests:
            for slot, completions in zip(slots, self._generate_all(requests), strict=True):
                results[slot] = [Continuation(tuple(c.token_ids)) for c in completions]
        return results


def solution_decoder(decode: Callable[[Sequence[int]], str], stop_token_ids: Iterable[int]
                     ) -> Callable[[Sequence[int]], str]:
    """The text an oracle reads: the solution's tokens without the stop token that ended it."""
    stops = frozenset(stop_token_ids)

    def decode_solution(token_ids: Sequence[int]) -> str:
        ids = list(token_ids)
        if ids and ids[-1] in stops:
            ids.pop()
        return decode(ids)

    return decode_solution
