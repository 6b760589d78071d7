"""The PTSJob workload: `python -m tokenmill.trainer pts --spec <uri>`.

Reads the run spec; loads the policy into its engine; reads the problems (`chat_samples`: the
conversation before the answer is the question; or `documents`: the text is the question;
`meta` holds the oracle's fields: `answer`, `tests`, `choices`) and renders each question in
the policy's chat format as token ids; checks every input (spec, oracle, problems, the
resolution of `samplesPerEstimate`) before the first sample. Then it searches the problems in
shards of `PROBLEMS_PER_SHARD`, committing each shard's pairs (`preference_pairs/2`, token
form) and its statistics, so a retried attempt skips committed shards and reproduces the
rest (every request is seeded from the spec's seed and its prompt's token ids).

The policy's engine sits behind the request cache (`tokenmill.trainer.generate.cache`): the
samples answered for the shard being searched are committed in the background after every
engine call to `<output>/_run/pts-requests/<shard>`, so an attempt killed in the middle of a
shard leaves them on record and the next attempt, searching that shard again, is answered
from the record (same prompt token ids, sampling parameters and seed: the same samples)
and asks the engine only for the rest. A shard's record is deleted once its pairs are
committed; what is left of the records (an attempt stopped between the two) goes before the
output's manifest.

The output dataset (`<output>/data`, what a DPO stage reads) holds the one-token pairs; the
full-solution pairs, for comparison, are a dataset of their own at
`<output>/full-solution-pairs`. The merged statistics go to `<output>/_run/pts-stats.json`
and the progress record (and so to the metrics endpoint); the output's manifest, written
last with the same statistics, makes the pairs visible.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenmill.api.pts import PTSJobSpec
from tokenmill.layout import dataset_uri, join
from tokenmill.store import (
    CHAT_SAMPLES,
    DOCUMENTS,
    PREFERENCE_PAIRS,
    AttemptFence,
    DatasetWriter,
    ManifestNotFoundError,
    Producer,
    Progress,
    StoreError,
    open_dataset,
    open_store,
    read_run_spec_at,
    shard_name,
    write_progress,
)
from tokenmill.trainer.generate.cache import CachedEngine, FailureBudget, RequestCache
from tokenmill.trainer.generate.interface import Completion, GenerationRequest, RequestOutput, SampleFailure
from tokenmill.trainer.oracles import OracleInputError, make_oracle
from tokenmill.trainer.pts.metrics import progress_figures
from tokenmill.trainer.pts.search import PTSInputError, SearchConfig, check_problems, search
from tokenmill.trainer.pts.policy import OracleJudge, SearchProblem
from tokenmill.trainer.pts.stats import SearchStats
from tokenmill.workloads import PHASE_SUCCEEDED

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
PROBLEMS_PER_SHARD = 32
STATS_KEY = "_run/pts-stats.json"
FULL_SOLUTION_PAIRS = "full-solution-pairs"
SHARD_STATS_PREFIX = "_run/pts-shards"
REQUESTS_PREFIX = "_run/pts-requests"
"""The request cache of each shard being searched: `<output>/_run/pts-requests/<shard>`."""


def _error(message: str) -> None:
    print(f"tokenmill pts: {message}", file=sys.stderr, flush=True)


@dataclass
class Prepared:
    spec: PTSJobSpec
    output: str
    producer: Producer
    problems: list[SearchProblem]
    policy: Any
    judge: OracleJudge
    config: SearchConfig
    fence: AttemptFence | None = None
    """The attempt this run spec starts: a stale attempt commits nothing once the next has begun."""
    engine: RecordedEngine | None = None
    """The policy's engine behind the request cache of the shard being searched."""
    warnings: list[str] = field(default_factory=list)
    """What the job prints and writes into its statistics: settings too weak for pGap, what the
    platform's code sandbox cannot enforce."""


def _meta(value: Any, where: str) -> dict[str, Any]:
    if value in (None, ""):
        return {}
    try:
        meta = json.loads(value)
    except ValueError as error:
        raise PTSInputError(f"{where}.meta: not JSON ({error})") from None
    if not isinstance(meta, dict):
        raise PTSInputError(f"{where}.meta: must be a JSON object")
    return meta


def _question(row: dict[str, Any], schema_name: str, where: str) -> list[dict[str, str]]:
    if schema_name == DOCUMENTS.name:
        return [{"role": "user", "content": row["text"]}]
    messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    while messages and messages[-1]["role"] == "assistant":  # a worked solution: not part of the question
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise PTSInputError(f"{where}.messages: no user turn to answer")
    return messages


def read_problems(uri: str, tokenizer: Any) -> list[SearchProblem]:
    """Every problem of the dataset at `uri`, its question rendered as the policy's token ids."""
    try:
        dataset = open_dataset(uri)
    except ManifestNotFoundError:
        raise PTSInputError(f"problems: no committed dataset at {uri} (its _manifest.json is missing)") from None
    except StoreError as error:
        raise PTSInputError(f"problems: cannot open {uri}: {error}") from None
    schema = dataset.schema.name
    if schema not in (CHAT_SAMPLES.name, DOCUMENTS.name):
        raise PTSInputError(f"problems: dataset {uri} has schema {schema!r}; problems are "
                            f"{CHAT_SAMPLES.name} or {DOCUMENTS.name} rows with the ground truth in meta")
    problems = []
    for row in dataset.read_all().to_pylist():
        where = f"problems[{row['id']}]"
        data = _meta(row.get("meta"), where)
        messages = _question(row, schema, where)
        data.setdefault("prompt", messages[-1]["content"])
        question_ids = tuple(tokenizer.encode_chat(messages, add_generation_prompt=True))
        problems.append(SearchProblem(str(row["id"]), question_ids, data))
    if not problems:
        raise PTSInputError(f"problems: dataset {uri} holds no problems")
    return problems


def requests_uri(output: str, number: int) -> str:
    """Where the samples answered for shard `number` are kept until its pairs are committed."""
    return join(output, REQUESTS_PREFIX, shard_name(number))


class RecordedEngine(CachedEngine):
    """The policy's engine behind a request cache; each call's answers go to the store in the
    background while the search goes on (the search asks one request at a time)."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[RequestOutput]:
        outputs = super().generate(requests)
        if self.cache is not None:
            self.cache.commit_soon()
        return outputs


class ShardRequests(RequestCache):
    """The request cache of one shard. Answers loaded from an earlier attempt stay in memory to
    be served; this attempt's own answers are only committed, since the search memoises every
    estimate and never asks for a sample twice (memory stays one earlier attempt's answers for
    one shard, however long the search)."""

    def put(self, key: str, request: GenerationRequest, completion: Completion | None,
            failure: SampleFailure | None = None) -> None:
        super().put(key, request, completion, failure)
        with self._lock:
            self.completions.pop(key, None)


def _engine(spec: PTSJobSpec):
    """The policy's engine (torch, or vLLM where it is installed), checked before any request."""
    from tokenmill.trainer.generate import GenerationInputError, build_engine

    if spec.engine == "vllm" and importlib.util.find_spec("vllm") is not None:
        import ray

        if not ray.is_initialized():  # vLLM's engines become actors on the cluster's GPU workers
            ray.init(log_to_driver=True)
    try:
        return build_engine(spec.engine, model_uri=str(spec.model.uri), field="spec")
    except GenerationInputError as error:
        raise PTSInputError(str(error)) from None
    except (StoreError, OSError, ValueError) as error:
        raise PTSInputError(f"spec.model: cannot load {spec.model.uri}: {error}") from None


def prepare(doc: dict[str, Any]) -> Prepared:
    """Check and load everything the search needs; PTSInputError names the bad input."""
    try:
        spec = PTSJobSpec.model_validate(doc["spec"])
    except Exception as error:  # pydantic's message lists every field
        raise PTSInputError(f"the run spec is not a valid PTSJob spec: {error}") from None
    if not spec.model.uri or not spec.problems.uri:
        raise PTSInputError("model and problems need resolved URIs (the run spec must carry committed URIs)")
    config = SearchConfig.from_spec(spec)
    config.check()
    try:
        oracle = make_oracle(spec.oracle.kind, timeout_seconds=spec.oracle.timeout_seconds,
                             memory_mb=spec.oracle.memory_mb)
    except OracleInputError as error:
        raise PTSInputError(str(error)) from None
    if spec.oracle.kind == "code":  # sandboxed runs are subprocesses: judge a few at once
        config = SearchConfig(**{**vars(config), "judge_workers": max(1, min(8, os.cpu_count() or 1))})

    engine = _engine(spec)
    from tokenmill.trainer.generate import SamplingParams
    from tokenmill.trainer.pts.engine_policy import EnginePolicy, solution_decoder

    tokenizer = engine.tokenizer
    stops = sorted({tokenizer.eos_id, tokenizer.eot_id})
    problems = read_problems(str(spec.problems.uri), tokenizer)
    judge = OracleJudge(oracle, solution_decoder(tokenizer.decode, stops))
    check_problems(problems, judge, tokenizer.vocab_size)
    rollout = spec.rollout
    sampling = SamplingParams(temperature=rollout.temperature, top_p=rollout.top_p, max_tokens=rollout.max_tokens,
                              seed=rollout.seed if rollout.seed is not None else spec.seed)
    recorded = RecordedEngine(engine, None, FailureBudget(), engine.metrics)
    policy = EnginePolicy(recorded, sampling, stop_token_ids=stops, vocab_size=tokenizer.vocab_size)
    metadata = doc.get("metadata") or {}
    producer = Producer(kind="PTSJob", name=str(metadata.get("name") or ""), uid=str(metadata.get("uid") or ""),
                        generation=int(metadata.get("generation") or 0), attempt=int(doc.get("attempt") or 0))
    warnings = config.warnings()
    if spec.oracle.kind == "code":
        from tokenmill.trainer.oracles.code import sandbox_warnings

        warnings += sandbox_warnings()
    return Prepared(spec, str(doc["output"]), producer, problems, policy, judge, config,
                    fence=AttemptFence.from_run_spec(doc), engine=recorded, warnings=warnings)


def progress_metrics(stats: SearchStats) -> dict[str, float]:
    """Flat figures for the progress record (and so for the metrics endpoint)."""
    figures = {
        "problems": stats.problems, "problems_searched": stats.problems_searched,
        "problems_skipped_too_hard": stats.problems_skipped_too_hard,
        "problems_skipped_too_easy": stats.problems_skipped_too_easy,
        "estimates": stats.estimates, "rollouts": stats.rollouts, "tokens_generated": stats.tokens_generated,
        "pivotal_tokens": stats.pivotal_tokens,
        "pairs_pivotal": stats.pairs["pivotal"], "pairs_full_solution": stats.pairs["full-solution"],
    }
    return {**{key: float(value) for key, value in figures.items()}, **progress_figures(stats)}


def _stats_from(data: dict[str, Any]) -> SearchStats:
    from collections import Counter

    stats = SearchStats()
    for name, value in data.items():
        setattr(stats, name, Counter({_key(k): v for k, v in value.items()}) if isinstance(value, dict) else value)
    return stats


def _key(key: str) -> Any:
    return int(key) if key.isdigit() else key


def _stats_data(stats: SearchStats) -> dict[str, Any]:
    return {name: (dict(value) if isinstance(value, dict) else value) for name, value in vars(stats).items()}


def execute(job: Prepared) -> SearchStats:
    shards = [job.problems[start:start + PROBLEMS_PER_SHARD]
              for start in range(0, len(job.problems), PROBLEMS_PER_SHARD)]
    writer = DatasetWriter(dataset_uri(job.output), PREFERENCE_PAIRS, producer=job.producer, fence=job.fence)
    full_writer = DatasetWriter(full_solution_pairs_uri(job.output), PREFERENCE_PAIRS, producer=job.producer,
                                fence=job.fence)
    committed = set(writer.resume()) & set(full_writer.resume())
    store = open_store(job.output)
    total = SearchStats()
    done = 0
    for number, problems in enumerate(shards):
        stats_key = f"{SHARD_STATS_PREFIX}/{shard_name(number)}.json"
        if shard_name(number) in committed and store.exists(stats_key):
            total.merge(_stats_from(store.read_json(stats_key)))
            done += len(problems)
            continue
        result = _search_shard(job, number, problems)
        if job.fence is not None:  # the statistics beside the shards; the writers fence their own commits
            job.fence.check(f"commit shard {shard_name(number)} of {dataset_uri(job.output)}")
        store.write_json(stats_key, _stats_data(result.stats))  # before the shards' commit records
        full_writer.write_shard(number, _table([pair.to_row() for pair in result.full_pairs]))
        writer.write_shard(number, _table([pair.to_row() for pair in result.pairs]))
        ShardRequests(requests_uri(job.output, number), fence=job.fence).writer.reset()  # never asked again
        total.merge(result.stats)
        done += len(problems)
        write_progress(job.output, Progress(phase="searching", done=done, total=len(job.problems), unit="problems",
                                            metrics=progress_metrics(total)))
    if job.fence is not None:
        job.fence.check(f"write {STATS_KEY} under {job.output}")
    store.delete_prefix(f"{REQUESTS_PREFIX}/")  # records of shards committed by an attempt stopped before deleting them
    warnings = job.warnings
    store.write_json(STATS_KEY, {"stats": total.to_dict(), "warnings": warnings})
    full_writer.finalize(expected=range(len(shards)))
    # last: the output becomes visible, its figures (flat, so status can show the counts) in the manifest
    writer.finalize(expected=range(len(shards)), stats={**total.to_dict(), "warnings": warnings})
    return total


def _search_shard(job: Prepared, number: int, problems: list[SearchProblem]) -> Any:
    """The search over one shard, its engine's answers recorded (and served when an earlier
    attempt recorded them) in the shard's request cache."""
    if job.engine is None:
        return search(problems, job.policy, job.judge, job.config)
    cache = ShardRequests(requests_uri(job.output, number), fence=job.fence).load()
    if cache.completions:
        print(f"tokenmill pts: shard {shard_name(number)}: {len(cache.completions)} samples answered by an "
              f"earlier attempt are served from its record", flush=True)
    job.engine.cache = cache
    try:
        result = search(problems, job.policy, job.judge, job.config)
    except BaseException:
        with contextlib.suppress(Exception):  # what was answered stays on record for the next attempt
            cache.flush()
        raise
    finally:
        job.engine.cache = None
    cache.flush()
    return result


def full_solution_pairs_uri(output: str) -> str:
    return join(output, FULL_SOLUTION_PAIRS)


def _table(rows: list[dict[str, Any]]) -> Any:
    return rows or PREFERENCE_PAIRS.arrow.empty_table()


def run(spec_uri: str) -> int:
    try:
        doc = read_run_spec_at(spec_uri)
    except StoreError as error:
        _error(f"cannot read the run spec {spec_uri}: {error}")
        return EXIT_BAD_INPUT
    started = time.monotonic()
    try:
        job = prepare(doc)
    except PTSInputError as error:
        _error(f"{error}; nothing was sampled")
        return EXIT_BAD_INPUT
    for warning in job.warnings:
        print(f"tokenmill pts: warning: {warning}", flush=True)
    print(f"tokenmill pts: {len(job.problems)} problems, {job.spec.oracle.kind} oracle, writing "
          f"{dataset_uri(job.output)}", flush=True)
    write_progress(job.output, Progress(phase="searching", done=0, total=len(job.problems), unit="problems"))
    try:
        stats = execute(job)
    except Exception as error:  # an engine or store failure: the next attempt resumes
        _error(f"the search failed: {error}")
        write_progress(job.output, Progress(phase="failed", message=str(error)[:500]))
        return EXIT_FAILED
    finally:
        job.policy.engine.close()
    seconds = time.monotonic() - started
    write_progress(job.output, Progress(
        phase=PHASE_SUCCEEDED, done=len(job.problems), total=len(job.problems), unit="problems",
        message=(f"searched {stats.problems_searched} of {stats.problems} problems, {stats.pivotal_tokens} pivotal "
                 f"tokens, {sum(stats.pairs.values())} pairs in {seconds:.0f} s; pairs at {dataset_uri(job.output)}"),
        metrics=progress_metrics(stats)))
    return 0
