"""Pivotal Token Search: our search against the naive one, model work per pivotal token, in one run.

The naive search is the public reference implementation's algorithm (github.com/codelion/pts,
the one the PTSJob issue names), at its cost:
- it decodes every prefix to text and re-tokenises it to roll out, and memoises estimates by
  that text; p(success | question), estimated before the search from the bare prompt, is a
  memo entry of its own besides the search's estimate of the empty prefix (the same rollouts
  drawn again);
- it splits segments at the token-count midpoint, estimating a segment's start, then its end;
- it draws an estimate's N rollouts as transformers' `generate(prompt,
  num_return_sequences=b, do_sample=True)` calls of b rows (`batch_size`, 5 by default) until N
  are drawn; generate copies the prompt into every row before its prefill, so every row of
  every batch of every estimate prefills the whole question and prefix from scratch (no KV
  shared between rows, batches, estimates or solutions); each solution is one generate call;
- it makes a pair for a pivotal token by a forward pass over its context and estimates of the
  ten most likely next tokens in turn, until one moves p the other way by pGap.
It gets the same sampler, rollout budget (the reference's is a fixed max_new_tokens, which
would only add to its work), oracle and seeds as ours. Ours keeps token ids, splits at the
cumulative log-probability midpoint, memoises estimates by token-id prefix across a
question's solutions, estimates a subdivision level's prefixes (of all its questions, run
side by side) in one engine call, lets the
torch engine's prefix cache share a solution's prefixes, counts the rollouts drawn at a shorter
prefix that went on through a prefix as samples of that prefix, and takes both tokens of a
pair from the rollouts it already sampled.

- ``planted``: the planted-pivot policy of the tests (p(success | prefix) a known step function,
  T tokens, k pivots); ours and the naive must find exactly the planted pivots (the run stops
  otherwise); work is rollout tokens (the policy is not a model), per pivotal token. Also
  shown: the naive without its memo (every prefix estimated afresh each time it is asked for).
- ``model``: a random tiny model, restricted to printable ASCII so that re-tokenising a decoded
  prefix gives back its ids; a solution succeeds when its first `--decided-by` tokens add up to
  an even number (the oracle reads the solution; rollouts still run to the end of the solution,
  as they must for a real oracle). Its default shape is the miniature Table 9's SFT policy
  (examples/pts-table9: the SFT export of each of its 3 seeds on that seed's 10 PTS problems, 16
  solutions each at temperature 1, budget 56), measured: the mean probability of a sampled token
  0.974-0.982 (96-97 % of sampled tokens above 0.9: the solution is copied and formatted with
  near certainty, the result digit is not), questions of 75 tokens in the policy's chat format,
  solutions of 44.7-45.8 tokens on average, 38-48 % of them correct, and its pivotal tokens the
  result digit after "= " (52 of the 53 pairs of its 3 seeds at solution token 16 or 17).
  Hence the defaults: head scale 1024 (mean sampled-token probability 0.984, 96 % above 0.9,
  on this benchmark's questions), 75-token questions, a 45-token budget
  (the solutions' mean length; the random model never stops early), success decided by the
  first 17 tokens (its pivot is the last uncertain token up to the 17th), and the PTSJob
  settings of that example: N = 32, pGap 0.2, query window 0.1-0.9; 8 questions x 4 solutions
  per round. `--sharpness 1 --question-chars 0 --max-tokens 32 --decided-by 12` is the earlier
  near-uniform shape (mean sampled-token probability 0.011: no real PTS policy looks like it,
  and no rollout ever goes on through a longer prefix). Both searches skip a question outside
  the query window by their own estimate of p(success | question). The naive runs three ways,
  each reported:
  * "naive, reference batches" (THE 5x TARGET IS JUDGED AGAINST THIS ONE: it computes what the
    reference's rollouts compute): the torch engine without a prefix cache, each batch of b
    rows one engine call of b one-sample requests, so each row prefills its own copy of the
    prompt (one prefill pass per batch, one decode pass per step per batch); row i draws the
    engine's sample i of that prompt's seed, so the samples are ours' and the pivots compare;
  * "naive, transformers generate": the same search on transformers' Phi3ForCausalLM built from
    the tiny model's weights, rollouts by `generate(num_return_sequences=b)` as the reference
    calls it; a logits processor makes each row draw the engine's sample (the same inverse-CDF
    draw from the same seed), so its samples are ours' too (the run says whether every estimate
    came out equal); in the first `--transformers-rounds` rounds only (none by default: it
    is the slowest side);
  * "naive, one prefill per estimate": each estimate one engine request of N samples whose rows
    share one prefill: cheaper than the reference, shown as a bound.
- ``--policy DIR``: the same comparison on a real exported policy instead of the tiny random
  model: DIR is an HF export (the miniature Table 9's SFT model, `<store>/trainingstages/sft/hf`
  of examples/pts-table9), each round `--problems` of that example's word problems (drawn with
  the round's seed) rendered in the policy's chat format, judged by the math oracle on the
  decoded solution, a budget of 56 tokens (`--policy-max-tokens`); the naive decodes prefixes
  and re-tokenises them with the policy's tokenizer. Its pivots need not be ours (the estimates
  differ where ours counted the solutions in p(success | question) or reused rollouts); the
  run says how many both found.
  Model work: tokens run through the model (prefill tokens computed, a prefix-cache hit not
  recomputed, plus tokens generated) and forward passes (every call of the model: a prefill
  pass, a decode step of a batch), counted by the engine and by a hook on the transformers
  model's forward, never computed from a formula; CPU seconds of this process (all threads) and
  wall seconds. Each figure per pivotal token found, naive against ours, with the ratio's median
  and range over rounds (each round its own sampling seed).

    python benchmarks/pts.py [--rounds 3] [--problems 8] [--solutions 4] [--samples 32]
                             [--batch-size 5] [--sharpness 1024] [--question-chars 75]
                             [--max-tokens 45] [--decided-by 17] [--transformers-rounds 0]
    python benchmarks/pts.py --policy tokenmill-runs/pts-table9/seed-0/store/trainingstages/sft/hf
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from tests.trainer.generate_fixtures import TINY_GEN, tiny_model  # noqa: E402
from tests.trainer.pts_planted import ALT_BASE, PlantedPolicy, step_values  # noqa: E402
from tokenmill.trainer.generate import GenerationRequest, SamplingParams, TorchEngine  # noqa: E402
from tokenmill.trainer.generate import torch_engine  # noqa: E402
from tokenmill.trainer.generate.interface import sample_seed  # noqa: E402
from tokenmill.trainer.generate.torch_engine import _inverse_cdf as inverse_cdf  # noqa: E402  the engine's own draw
from tokenmill.trainer.generate.loading import load_model  # noqa: E402
from tokenmill.trainer.generate.scripted_engine import correct_answer  # noqa: E402
from tokenmill.trainer.model.hf import export_hf  # noqa: E402
from tokenmill.trainer.oracles import Verdict, make_oracle  # noqa: E402
from tokenmill.trainer.pts import OracleJudge, SearchConfig, SearchProblem, search  # noqa: E402
from tokenmill.trainer.pts.engine_policy import EnginePolicy, derived_seed, solution_decoder  # noqa: E402
from tokenmill.trainer.tokenizer import get_tokenizer  # noqa: E402

TARGET = 5.0
BYTE = get_tokenizer("byte")
STOPS = (BYTE.eos_id, BYTE.eot_id)
CANDIDATES = 10  # next tokens the naive tries for a pivotal token's counterpart
QUESTION = ("the question alone",)
"""The memo key of the naive's first estimate, p(success | question), made before the search
from the bare prompt; the search's estimate of the empty prefix is another entry (the reference
keys that one by the decoded prompt), the same rollouts drawn again."""


# ---- the naive search ---------------------------------------------------------------------------

@dataclass(frozen=True)
class NaivePivot:
    position: int
    token_id: int
    p_before: float
    p_after: float


class NaiveSearch:
    """Subdivision at token-count midpoints over estimates memoised by `key(prefix ids)` (the
    decoded text for a model). `estimate(key)` rolls out from the prefix `key` names and returns
    p; `candidates(prefix ids)` lists likely next tokens, most likely first."""

    def __init__(self, key: Callable[[tuple[int, ...]], Hashable], estimate: Callable[[Hashable], float],
                 candidates: Callable[[tuple[int, ...]], list[int]], p_gap: float, memo: bool = True):
        self.key, self._estimate, self.candidates, self.p_gap = key, estimate, candidates, p_gap
        self.memo: dict[Hashable, float] | None = {} if memo else None
        self.estimates = 0

    def p(self, prefix: tuple[int, ...]) -> float:
        return self.p_of(self.key(prefix))

    def p_of(self, key: Hashable) -> float:
        if self.memo is None or key not in self.memo:
            self.estimates += 1
            p = self._estimate(key)
            if self.memo is None:
                return p
            self.memo[key] = p
        return self.memo[key]

    def segments(self, prefix: tuple[int, ...], sequence: tuple[int, ...]) -> list[tuple[int, ...]]:
        if len(sequence) <= 1:
            return [sequence]
        before = self.p(prefix)
        if abs(self.p(prefix + sequence) - before) < self.p_gap:
            return [sequence]
        middle = len(sequence) // 2
        return self.segments(prefix, sequence[:middle]) + self.segments(prefix + sequence[:middle], sequence[middle:])

    def pivots(self, solution: tuple[int, ...]) -> list[NaivePivot]:
        found, prefix = [], ()
        for segment in self.segments((), solution):
            if len(segment) == 1:
                before, after = self.p(prefix), self.p(prefix + segment)
                if abs(after - before) >= self.p_gap:
                    found.append(NaivePivot(len(prefix), segment[0], before, after))
            prefix += segment
        return found

    def question_p(self) -> float:
        return self.p_of(QUESTION)

    def pair(self, solution: tuple[int, ...], pivot: NaivePivot) -> bool:
        """Whether a counterpart token was found: the most likely next tokens in turn (each a
        fresh estimate) until one moves p the other way from p_before by pGap."""
        prefix = solution[:pivot.position]
        rise = pivot.p_after > pivot.p_before
        for token in self.candidates(prefix)[:CANDIDATES]:
            if token == pivot.token_id:
                continue
            moved = self.p(prefix + (token,)) - pivot.p_before
            if (-moved if rise else moved) >= self.p_gap:
                return True
        return False


# ---- planted pivots -------------------------------------------------------------------------------

def planted(rounds: int, length: int, count: int, samples: int, p_gap: float = 0.2) -> list[dict]:
    figures = []
    for seed in range(rounds):
        positions = sorted(random.Random(seed).sample(range(length), count))
        values = step_values(length, 0.05, {p: 0.9 / count for p in positions})
        reference = [10 + i for i in range(length)]
        config = SearchConfig(samples_per_estimate=samples, p_gap=p_gap, solutions_per_problem=1,
                              min_success=0.0, max_success=1.0)
        policy = PlantedPolicy((1, 2), reference, values, seed=seed)
        result = search([policy.problem()], policy, policy, config)
        ours = [pivot.position for pivot in result.problems[0].pivots[0]]
        ours_tokens = result.stats.tokens_generated - length  # rollouts only: the solution is given

        naive_policy = PlantedPolicy((1, 2), reference, values, seed=seed)
        generated = 0

        def estimate(prefix, naive_policy=naive_policy):
            nonlocal generated
            prefix = () if prefix == QUESTION else prefix
            continuations = naive_policy.rollout(naive_policy.question_ids, prefix, samples)
            generated += sum(len(c.token_ids) for c in continuations)
            return sum(naive_policy.check(None, prefix + c.token_ids).correct for c in continuations) / samples

        def candidates(prefix, naive_policy=naive_policy):
            j = len(prefix)
            by_chance = [(naive_policy.follow[j], naive_policy.reference[j]), (1 - naive_policy.follow[j], ALT_BASE + j)]
            return [token for _, token in sorted(by_chance, reverse=True)]

        naive = NaiveSearch(lambda prefix: prefix, estimate, candidates, p_gap)
        naive.question_p()
        found = naive.pivots(tuple(reference))
        search_tokens = generated
        naive_pairs = sum(naive.pair(tuple(reference), pivot) for pivot in found)
        generated, with_pairs = 0, generated
        unmemoised = NaiveSearch(lambda prefix: prefix, estimate, candidates, p_gap, memo=False)
        unmemoised.question_p()
        unmemoised_found = unmemoised.pivots(tuple(reference))
        sum(unmemoised.pair(tuple(reference), pivot) for pivot in unmemoised_found)
        unmemoised_tokens, generated = generated, with_pairs
        for name, pivots in (("ours", ours), ("naive", [pivot.position for pivot in found]),
                             ("naive without memo", [pivot.position for pivot in unmemoised_found])):
            if pivots != positions:
                raise SystemExit(f"planted seed {seed}: pivots {positions}, {name} found {pivots}")
        figures.append({"pivots": len(ours), "ours": ours_tokens, "ours_pairs": len(result.pairs),
                        "naive_search": search_tokens, "naive": generated, "naive_pairs": naive_pairs,
                        "unmemoised": unmemoised_tokens})
    return figures


# ---- a tiny model -------------------------------------------------------------------------------

def decided(solution_ids: Sequence[int], decided_by: int) -> bool:
    """Success: the solution's first `decided_by` tokens add up to an even number (a solution
    that stops before them fails). p(success | prefix) stays near 1/2 and jumps at token
    `decided_by - 1`: one real pivot per solution, where the split has to find it."""
    head = list(solution_ids[:decided_by])
    return len(head) == decided_by and not any(t in STOPS for t in head) and sum(head) % 2 == 0


class ParityJudge:
    def __init__(self, decided_by: int):
        self.decided_by = decided_by

    def problem_error(self, problem):
        return None

    def check(self, problem, solution_ids):
        correct = decided(solution_ids, self.decided_by)
        return Verdict(correct, "correct" if correct else "wrong-answer")


@dataclass
class Task:
    """What a model round searches: the policy (network and tokenizer), its questions and the
    judge of a complete solution's ids (ours gets it as the search's Judge, the naive applies it
    to the re-tokenised prefix and the continuation)."""

    network: torch.nn.Module
    tokenizer: Any
    questions: list[SearchProblem]
    judge: Any
    max_tokens: int

    @property
    def stops(self) -> tuple[int, ...]:
        return tuple(sorted({self.tokenizer.eos_id, self.tokenizer.eot_id}))

    @property
    def context(self) -> int:
        return self.network.max_positions


@dataclass
class Work:
    """Model work measured around one search."""

    forward_passes: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    pivots: int = 0
    pairs: int = 0
    estimates: int = 0
    found: set = field(default_factory=set)
    """(question, solution index, position) of every pivotal token."""
    estimated: dict = field(default_factory=dict)
    """The naive's estimates: memo key -> p (equal between two naive runs: they drew the same samples)."""
    extra: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.generated_tokens


class ForwardCounter:
    """Counts the torch engine's calls of the model: prefill chunks (`kv.forward_cached`) and
    decode steps (`kv.decode_step`, or `forward_cached` where the engine decodes with it)."""

    ENTRY_POINTS = ("forward_cached", "decode_step")

    def __init__(self):
        self.calls = 0
        self._originals = {name: getattr(torch_engine, name) for name in self.ENTRY_POINTS
                           if hasattr(torch_engine, name)}

    def __enter__(self):
        def counting(forward):
            def counted(*args, **kwargs):
                self.calls += 1
                return forward(*args, **kwargs)
            return counted

        for name, forward in self._originals.items():
            setattr(torch_engine, name, counting(forward))
        return self

    def __exit__(self, *exc):
        for name, forward in self._originals.items():
            setattr(torch_engine, name, forward)


class Measured:
    """An engine that counts the tokens it generates."""

    def __init__(self, engine: TorchEngine):
        self.engine, self.generated = engine, 0
        self.tokenizer = engine.tokenizer

    def generate(self, requests):
        outputs = self.engine.generate(requests)
        self.generated += sum(len(c.token_ids) for output in outputs for c in output.completions)
        return outputs

    def close(self):
        self.engine.close()


def printable_model(sharpness: float) -> torch.nn.Module:
    """The tiny random model, restricted to printable ASCII (a large negative bias on every other
    token), so decoding and re-tokenising a prefix gives back its ids: the naive's re-tokenised
    prompts are the very prefixes ours rolls out from, and both draw the same samples."""
    network = tiny_model(0, sharpness=sharpness)
    network.lm_head = printable_head(network.lm_head)
    return network


def printable_head(head: torch.nn.Linear) -> torch.nn.Linear:
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.fill_(-1e4)
        biased.bias[32:127] = 0.0
    return biased


def ours_on_model(task: Task, sampling: SamplingParams, config: SearchConfig, counter: ForwardCounter) -> Work:
    engine = Measured(TorchEngine(task.network, task.tokenizer))
    policy = EnginePolicy(engine, sampling, stop_token_ids=task.stops, vocab_size=task.tokenizer.vocab_size)
    calls, cpu, wall = counter.calls, time.process_time(), time.perf_counter()
    result = search(task.questions, policy, task.judge, config, vocab_size=task.tokenizer.vocab_size)
    work = Work(counter.calls - calls, engine.engine.prefill_tokens, engine.generated, time.process_time() - cpu,
                time.perf_counter() - wall, result.stats.pivotal_tokens, len(result.pairs), result.stats.estimates)
    work.found = {(problem.problem_id, index, pivot.position) for problem in result.problems
                  for index, pivots in enumerate(problem.pivots) for pivot in pivots}
    work.extra["reused"] = result.stats.rollouts_reused
    return work


# -- the naive search's model backends: how its rollouts are computed

class EngineRollouts:
    """The naive's rollouts in the torch engine without a prefix cache. `batch_size` None: an
    estimate's n rollouts are one request, whose rows share one prefill of the prompt. Else the
    reference's cost: the n rollouts are drawn in engine calls of `batch_size` rows (the
    solutions one row a call), each row its own one-sample request, so each row prefills its
    own copy of the prompt, in every batch; a row draws the sample of its index (the engine
    seeds sample i of a request from the request's seed and i), so the samples are those of one
    n-sample request: ours'."""

    def __init__(self, task: Task, batch_size: int | None, counter: ForwardCounter):
        self.engine = Measured(TorchEngine(task.network, task.tokenizer, prefix_cache_tokens=0))
        self.batch_size, self.counter, self.calls = batch_size, counter, counter.calls

    def draw(self, prompt: tuple[int, ...], n: int, max_tokens: int, seed: int | None,
             batch_size: int | None) -> list[tuple[int, ...]]:
        sampling = SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed)
        if batch_size is None:
            (output,) = self.engine.generate([GenerationRequest(prompt_token_ids=prompt, n=n, sampling=sampling)])
            return [tuple(c.token_ids) for c in output.completions]
        drawn = []
        for start in range(0, n, batch_size):
            outputs = self.engine.generate([
                GenerationRequest(prompt_token_ids=prompt, n=n, sampling=sampling, sample_indices=(i,))
                for i in range(start, min(n, start + batch_size))])
            drawn += [tuple(c.token_ids) for output in outputs for c in output.completions]
        return drawn

    def solutions(self, question: tuple[int, ...], n: int, max_tokens: int, seed: int | None):
        return self.draw(question, n, max_tokens, seed, None if self.batch_size is None else 1)

    def rollouts(self, prompt: tuple[int, ...], n: int, max_tokens: int, seed: int | None):
        return self.draw(prompt, n, max_tokens, seed, self.batch_size)

    def next_tokens(self, prompt: tuple[int, ...], k: int) -> list[int]:
        """The k most likely next tokens: one forward pass over the whole prompt."""
        request = GenerationRequest(prompt_token_ids=prompt, n=1, sampling=SamplingParams(
            max_tokens=1, top_logprobs=k, seed=0))
        (output,) = self.engine.generate([request])
        return [top.token_id for top in output.completions[0].top_logprobs[0]]

    def counts(self) -> tuple[int, int, int]:
        """(forward passes, prefill tokens, generated tokens) so far."""
        return self.counter.calls - self.calls, self.engine.engine.prefill_tokens, self.engine.generated


class EngineDraws(LogitsProcessor):
    """Makes `generate` draw what the torch engine draws: row r's next token by the engine's
    inverse-CDF sampler from `random.Random(seeds[r])` (one uniform number per step, over the
    vocabulary in id order, temperature 1), every other token masked; transformers then
    samples that one token. The model's forward passes are generate's own."""

    def __init__(self, seeds: Sequence[int], vocab: int):
        self.rngs, self.vocab = [random.Random(seed) for seed in seeds], vocab

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores[:, :self.vocab].float().softmax(dim=-1)
        uniforms = torch.tensor([[rng.random()] for rng in self.rngs], dtype=torch.float64)
        picks = inverse_cdf(probs, uniforms)
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(len(picks)), picks] = 0.0
        return forced


class TransformersModel:
    """The tiny model as transformers' `Phi3ForCausalLM` (our weights exported, the same
    printable head), with a hook counting every forward pass and the tokens it computes."""

    def __init__(self, sharpness: float):
        from transformers import Phi3ForCausalLM

        with tempfile.TemporaryDirectory() as directory:
            export_hf(tiny_model(0, sharpness=sharpness), TINY_GEN, Path(directory), dtype="float32")
            self.model = Phi3ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        self.model.lm_head = printable_head(self.model.lm_head)
        self.forward_passes = self.prefill_tokens = 0
        self.in_prefill = False
        self.model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        self.forward_passes += 1
        if self.in_prefill:  # generate's first pass (the prompt, one copy per row) or a plain forward
            self.prefill_tokens += ids.numel()
            self.in_prefill = False


class TransformersRollouts:
    """The reference's generation, as it calls it: `generate(prompt, num_return_sequences=b,
    do_sample=True)` in batches of b = `batch_size` until n are drawn (generate copies the prompt
    into every row before its prefill), a solution one generate call, the next tokens of a
    context one forward pass over it. Row j of a batch draws sample `start + j` with the engine's
    seed for it (`EngineDraws`)."""

    def __init__(self, hf: TransformersModel, batch_size: int):
        self.hf, self.batch_size, self.generated = hf, batch_size, 0
        self.start = (hf.forward_passes, hf.prefill_tokens)

    @torch.inference_mode()
    def draw(self, prompt: tuple[int, ...], n: int, max_tokens: int, seed: int | None, batch_size: int):
        ids = torch.tensor([prompt])
        drawn = []
        for start in range(0, n, batch_size):
            rows = list(range(start, min(n, start + batch_size)))
            self.hf.in_prefill = True
            output = self.hf.model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True, num_return_sequences=len(rows),
                max_new_tokens=max_tokens, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=BYTE.pad_id,
                eos_token_id=list(STOPS),
                logits_processor=LogitsProcessorList([EngineDraws([sample_seed(seed, i) for i in rows],
                                                                   BYTE.vocab_size)]))
            for row in output[:, len(prompt):].tolist():
                tokens = []
                for token in row:  # up to and with the stop token, as the engine returns them
                    tokens.append(token)
                    if token in STOPS:
                        break
                drawn.append(tuple(tokens))
            self.generated += sum(len(tokens) for tokens in drawn[-len(rows):])
        return drawn

    def solutions(self, question: tuple[int, ...], n: int, max_tokens: int, seed: int | None):
        return self.draw(question, n, max_tokens, seed, 1)

    def rollouts(self, prompt: tuple[int, ...], n: int, max_tokens: int, seed: int | None):
        return self.draw(prompt, n, max_tokens, seed, self.batch_size)

    @torch.inference_mode()
    def next_tokens(self, prompt: tuple[int, ...], k: int) -> list[int]:
        self.hf.in_prefill = True
        logits = self.hf.model(torch.tensor([prompt])).logits[0, -1, :BYTE.vocab_size]
        return logits.topk(k).indices.tolist()

    def counts(self) -> tuple[int, int, int]:
        return (self.hf.forward_passes - self.start[0], self.hf.prefill_tokens - self.start[1], self.generated)


def naive_on_model(backend, task: Task, sampling: SamplingParams, config: SearchConfig) -> Work:
    work = Work()
    cpu, wall = time.process_time(), time.perf_counter()
    overflowed = 0
    tokenizer, stops = task.tokenizer, task.stops
    for question in task.questions:
        solutions = backend.solutions(question.question_ids, config.solutions_per_problem, sampling.max_tokens,
                                      derived_seed(sampling.seed, "solutions", question.question_ids))

        def key(prefix: tuple[int, ...]) -> tuple[str, bool]:
            # the text, and whether the solution has ended (its stop token decodes to nothing)
            return tokenizer.decode([t for t in prefix if t not in stops]), bool(prefix) and prefix[-1] in stops

        def succeeds(solution_ids: tuple[int, ...], question: SearchProblem = question) -> bool:
            try:
                return task.judge.check(question, solution_ids).correct
            except Exception:  # noqa: BLE001 - a crashing check is a failure, as in ours
                return False

        def prompt_of(text: str, question: SearchProblem = question) -> tuple[int, ...]:
            # the question as rendered for the policy, then the prefix's text re-tokenised
            return question.question_ids + tuple(tokenizer.encode(text))

        def estimate(prefix_key: Hashable) -> float:
            nonlocal overflowed
            text, ended = ("", False) if prefix_key == QUESTION else prefix_key
            retokenised = tuple(tokenizer.encode(text))  # not the sampled ids
            budget = sampling.max_tokens - len(retokenised)
            if ended or budget <= 0:
                return float(succeeds(retokenised))
            prompt = prompt_of(text)
            if len(prompt) >= task.context:  # re-tokenising grew it past the context
                overflowed += 1
                return 0.0
            continuations = backend.rollouts(prompt, config.samples_per_estimate, budget,
                                             derived_seed(sampling.seed, "rollout", prompt))
            return sum(succeeds(retokenised + c) for c in continuations) / len(continuations)

        def candidates(prefix: tuple[int, ...]) -> list[int]:
            prompt = prompt_of(key(prefix)[0])
            if len(prompt) >= task.context:
                return []
            return backend.next_tokens(prompt, CANDIDATES)

        naive = NaiveSearch(key, estimate, candidates, config.p_gap)
        p_question = naive.question_p()
        if config.min_success <= p_question <= config.max_success:  # the report's query window
            for index, solution in enumerate(solutions):
                found = naive.pivots(solution)
                work.pivots += len(found)
                work.found |= {(question.id, index, pivot.position) for pivot in found}
                work.pairs += sum(naive.pair(solution, pivot) for pivot in found)
        work.estimates += naive.estimates
        work.estimated |= {(question.id, k): p for k, p in naive.memo.items()}
    work.cpu_seconds, work.wall_seconds = time.process_time() - cpu, time.perf_counter() - wall
    work.forward_passes, work.prefill_tokens, work.generated_tokens = backend.counts()
    work.extra["overflowed"] = overflowed
    return work


# The naive's model backends, in the order they are reported; the 5x target is judged against
# REFERENCE: it computes what the reference's rollouts compute and draws ours' samples.
REFERENCE = "naive, reference batches"
TRANSFORMERS = "naive, transformers generate"
SHARED_PREFILL = "naive, one prefill per estimate"


PREAMBLE = ("A farmer has some hens and some goats in a field, and counts their heads and their legs "
            "before he sells half of them at the market. ")


def question_text(index: int, chars: int) -> str:
    """Question `index`, lengthened to about `chars` bytes (tokens) by a word problem's preamble."""
    question = f"Question {index}: what is {index} + {index}? Answer:"
    preamble = (PREAMBLE * (1 + chars // len(PREAMBLE)))[:max(0, chars - len(question))]
    return preamble + question


def toy_task(network: torch.nn.Module, problems: int, question_chars: int, max_tokens: int, decided_by: int,
             round_: int) -> Task:
    questions = [SearchProblem(f"q{i}", tuple(BYTE.encode(question_text(i, question_chars)))) for i in range(problems)]
    return Task(network, BYTE, questions, ParityJudge(decided_by), max_tokens)


def table9_problem_texts() -> list[tuple[str, str]]:
    """Every (question, answer) of the miniature Table 9 (examples/pts-table9/run.py's problems)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pts_table9", ROOT / "examples" / "pts-table9" / "run.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # type: ignore[union-attr]
    texts = [example.problem_text(*problem) for problem in example.PROBLEMS]
    return [(text, correct_answer(text)) for text in texts]


def policy_tasks(policy: str, problems: int, max_tokens: int) -> Callable[[int], Task]:
    """Round r: `problems` questions of the miniature Table 9 (drawn with seed r) in the exported
    policy's chat format, judged by the math oracle on the decoded solution."""
    loaded = load_model(Path(policy).resolve().as_uri(), device="cpu", field="--policy")
    tokenizer = loaded.tokenizer
    stops = sorted({tokenizer.eos_id, tokenizer.eot_id})
    judge = OracleJudge(make_oracle("math"), solution_decoder(tokenizer.decode, stops))
    pool = table9_problem_texts()

    def task(round_: int) -> Task:
        drawn = random.Random(round_).sample(pool, problems)
        questions = [SearchProblem(f"p{index}", tuple(tokenizer.encode_chat(
            [{"role": "user", "content": text}], add_generation_prompt=True)), {"answer": answer})
            for index, (text, answer) in enumerate(drawn)]
        return Task(loaded.model, tokenizer, questions, judge, max_tokens)

    return task


def model(tasks: Callable[[int], Task], rounds: int, config: SearchConfig, batch_size: int,
          hf: TransformersModel | None, transformers_rounds: int) -> list[dict[str, Work]]:
    """Each round: ours and the naive's ways on round r's task, sampling seeded by r."""
    figures = []
    with ForwardCounter() as counter:
        for seed in range(rounds):
            task = tasks(seed)
            sampling = SamplingParams(temperature=1.0, max_tokens=task.max_tokens, seed=seed)
            sides = [("ours", lambda: ours_on_model(task, sampling, config, counter)),
                     (REFERENCE, lambda: naive_on_model(EngineRollouts(task, batch_size, counter), task,
                                                        sampling, config)),
                     (SHARED_PREFILL, lambda: naive_on_model(EngineRollouts(task, None, counter), task,
                                                             sampling, config))]
            if hf is not None and seed < transformers_rounds:
                sides.append((TRANSFORMERS, lambda: naive_on_model(TransformersRollouts(hf, batch_size), task,
                                                                   sampling, config)))
            # rotate which side runs first, so none always meets a warm process
            shift = seed % len(sides)
            figures.append(dict(sides[shift:] + sides[:shift]))
            figures[-1] = {name: run() for name, run in figures[-1].items()}
            print(f"  round {seed}: " + "; ".join(
                f"{name} {work.pivots} pivots, {work.tokens:,} tokens, {work.forward_passes:,} forwards, "
                f"{work.cpu_seconds:.1f} CPU s, {work.wall_seconds:.1f} wall s" for name, work in figures[-1].items()),
                flush=True)
    return figures


def sampled_token_probability(task: Task) -> float:
    """The mean probability of the tokens the policy samples (how often a rollout repeats a
    solution's next token), over 16 solutions to each of (up to) 8 of the task's questions."""
    engine = TorchEngine(task.network, task.tokenizer)
    values = []
    for question in task.questions[:8]:
        request = GenerationRequest(prompt_token_ids=question.question_ids, n=16, sampling=SamplingParams(
            temperature=1.0, max_tokens=task.max_tokens, seed=1, logprobs=True))
        (output,) = engine.generate([request])
        values += [math.exp(v) for c in output.completions for v in c.logprobs]
    return sum(values) / len(values)


# ---- report -------------------------------------------------------------------------------------

def spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.1f}x (range {min(values):.1f}-{max(values):.1f}x over {len(values)})"


def per(total: float, pivots: int) -> float:
    return total / pivots if pivots else float("nan")


NAIVES = (REFERENCE, TRANSFORMERS, SHARED_PREFILL)
MEASURES = (("model tokens", lambda w: w.tokens), ("forward passes", lambda w: w.forward_passes),
            ("CPU time", lambda w: w.cpu_seconds), ("wall time", lambda w: w.wall_seconds))


def report_model(figures: list[dict[str, Work]]) -> None:
    names = [name for name in ("ours", *NAIVES) if any(name in round_ for round_ in figures)]
    for name in names:
        works = [round_[name] for round_ in figures if name in round_]
        found = sum(w.pivots for w in works)
        print(f"  {name:32s} {len(works)} rounds  pivotal tokens {found:3d}  pairs {sum(w.pairs for w in works):3d}  "
              f"estimates {sum(w.estimates for w in works):4d}  per pivotal token: "
              f"model tokens {per(sum(w.tokens for w in works), found):8,.0f} "
              f"(prefill {per(sum(w.prefill_tokens for w in works), found):7,.0f})  "
              f"forward passes {per(sum(w.forward_passes for w in works), found):6,.0f}  "
              f"CPU s {per(sum(w.cpu_seconds for w in works), found):5.2f}  "
              f"wall s {per(sum(w.wall_seconds for w in works), found):5.2f}")
    ours_found = sum(len(r["ours"].found) for r in figures)
    naive_found = sum(len(r[REFERENCE].found) for r in figures)
    both = sum(len(r["ours"].found & r[REFERENCE].found) for r in figures)
    print(f"  pivotal tokens found by both ours and the naive: {both} (ours {ours_found}, naive {naive_found}); "
          f"rollouts ours took from longer-lived ones: {sum(r['ours'].extra['reused'] for r in figures):,}")
    for name in names[2:]:
        rounds = [r for r in figures if name in r]
        keys = sum(len(r[REFERENCE].estimated) for r in rounds)
        differ = sum(r[name].estimated.get(key) != p for r in rounds for key, p in r[REFERENCE].estimated.items())
        differ += sum(len(set(r[name].estimated) - set(r[REFERENCE].estimated)) for r in rounds)
        if differ:
            print(f"  {name}: {differ} of its {keys} estimates differ from the reference batches' (its samples "
                  "differ): its pivotal tokens are not comparable, its work per pivotal token is its own")
        else:
            print(f"  {name}: the same {keys} estimates as the reference batches' in its {len(rounds)} rounds "
                  "(the same samples), so the same pivotal tokens")
    overflowed = sum(round_[REFERENCE].extra["overflowed"] for round_ in figures)
    if overflowed:
        print(f"  naive: {overflowed} re-tokenised prompts outgrew the model's context (each invalid "
              "UTF-8 byte decodes to a 3-byte replacement character); their estimates count as p = 0")
    for name in names[1:]:
        rounds = [r for r in figures if name in r]
        usable = [r for r in rounds if r[name].pivots and r["ours"].pivots]
        judged = " (the 5x target is judged here: the reference's own rollout cost)" if name == REFERENCE else ""
        print(f"  per pivotal token, {name} / ours{judged}:")
        for label, measure in MEASURES:
            ratios = [per(measure(r[name]), r[name].pivots) / per(measure(r["ours"]), r["ours"].pivots)
                      for r in usable]
            if ratios:
                verdict = ""
                if name == REFERENCE:
                    verdict = f"  target >= {TARGET:.0f}x: {'met' if statistics.median(ratios) >= TARGET else 'NOT met'}"
                print(f"    {label:15s} {spread(ratios)}{verdict}")
        if len(usable) < len(rounds):
            print(f"    {len(rounds) - len(usable)} rounds found no pivotal token on one side; left out of the ratios")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="tiny-model rounds (sampling seeds)")
    parser.add_argument("--samples", type=int, default=32,
                        help="rollouts per estimate (model part; the miniature Table 9's samplesPerEstimate)")
    parser.add_argument("--batch-size", type=int, default=5,
                        help="rows per generate call of the reference batches (the reference's batch_size is 5)")
    parser.add_argument("--transformers-rounds", type=int, default=0,
                        help="rounds that also run the naive on transformers' generate (the slowest side; it "
                             "draws the same samples as the reference batches, so its model work is theirs)")
    parser.add_argument("--question-chars", type=int, default=75,
                        help="each question's length in tokens (bytes), lengthened by a word problem's preamble "
                             "(75: the miniature Table 9's questions in the chat format; 0: the bare 34-token "
                             "question)")
    parser.add_argument("--problems", type=int, default=8, help="questions per round (model part)")
    parser.add_argument("--solutions", type=int, default=4, help="solutions sampled per question")
    parser.add_argument("--max-tokens", type=int, default=45,
                        help="solution budget in tokens (45: the Table 9 SFT policy's mean solution length)")
    parser.add_argument("--decided-by", type=int, default=17,
                        help="tokens whose sum decides success (17: the Table 9 pivots sit at solution token 16-17)")
    parser.add_argument("--p-gap", type=float, default=0.2)
    parser.add_argument("--min-success", type=float, default=0.1)
    parser.add_argument("--max-success", type=float, default=0.9)
    parser.add_argument("--sharpness", type=float, nargs="+", default=[1024.0],
                        help="the tiny model's head scale (higher: peaked next-token distributions; 1024 gives "
                             "the Table 9 SFT policy's mean sampled-token probability, 1 a near-uniform model)")
    parser.add_argument("--planted-only", action="store_true")
    parser.add_argument("--policy", help="an exported HF policy directory (the miniature Table 9's SFT export, "
                        "<store>/trainingstages/sft/hf): search it on that example's problems with the math "
                        "oracle instead of the tiny random model")
    parser.add_argument("--policy-max-tokens", type=int, default=56,
                        help="solution budget with --policy (the miniature Table 9's rollout maxTokens)")
    args = parser.parse_args()
    if args.batch_size < 1:
        parser.error("--batch-size: must be at least 1")
    transformers_logging.set_verbosity_error()

    rounds = planted(rounds=5, length=256, count=2, samples=400)
    print("planted pivots (T=256, k=2, N=400, 5 seeds; both find exactly the planted pivots)")
    pivots = sum(r["pivots"] for r in rounds)
    for name, label in (("ours", "ours"), ("naive_search", "naive, search only"), ("naive", "naive, with pairs"),
                        ("unmemoised", "naive without memo")):
        total = sum(r[name] for r in rounds)
        print(f"  {label:20s} rollout tokens per pivotal token {total / pivots:9,.0f}")
    print(f"  pairs made: ours {sum(r['ours_pairs'] for r in rounds)}, naive {sum(r['naive_pairs'] for r in rounds)}"
          f" of {pivots} pivotal tokens")
    print(f"  naive / ours, search only: {spread([r['naive_search'] / r['ours'] for r in rounds])}")
    print(f"  naive / ours, with pairs:  {spread([r['naive'] / r['ours'] for r in rounds])}")
    print(f"  naive without its memo / ours: {spread([r['unmemoised'] / r['ours'] for r in rounds])}")
    if args.planted_only:
        return 0

    config = SearchConfig(samples_per_estimate=args.samples, p_gap=args.p_gap,
                          solutions_per_problem=args.solutions, min_success=args.min_success,
                          max_success=args.max_success)
    config.check()
    settings = (f"{args.solutions} solutions per question, N={args.samples}, pGap {args.p_gap:g}, query window "
                f"{args.min_success:g}-{args.max_success:g}, reference batches of {args.batch_size} rows")
    if args.policy:
        tasks = policy_tasks(args.policy, args.problems, args.policy_max_tokens)
        first = tasks(0)
        print(f"policy {args.policy} (mean probability of a sampled token {sampled_token_probability(first):.3f}); "
              f"{args.problems} miniature Table 9 questions per round (the first round's "
              f"{min(len(q.question_ids) for q in first.questions)}-{max(len(q.question_ids) for q in first.questions)}"
              f" tokens), math oracle, up to {args.policy_max_tokens} tokens, {settings}; "
              f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
        report_model(model(tasks, args.rounds, config, args.batch_size, None, 0))
        print(f"  load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        return 0
    for sharpness in args.sharpness:
        network = printable_model(sharpness)

        def tasks(round_: int, network=network) -> Task:
            return toy_task(network, args.problems, args.question_chars, args.max_tokens, args.decided_by, round_)

        print(f"tiny model, head scale {sharpness:g} (mean probability of a sampled token "
              f"{sampled_token_probability(tasks(0)):.3f}); {args.problems} questions of "
              f"{len(question_text(0, args.question_chars))} tokens per round, up to {args.max_tokens} tokens, "
              f"success decided by the first {args.decided_by}, {settings}; "
              f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
        hf = TransformersModel(sharpness) if args.transformers_rounds else None
        report_model(model(tasks, args.rounds, config, args.batch_size, hf, args.transformers_rounds))
        print(f"  load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
