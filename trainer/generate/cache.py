"""The request cache: no sample is paid for twice, on any node, across retries and resumes.

Every sample is keyed by a sha256 of the engine, the model's identity (checkpoint digest, or
endpoint and model name), the prompt (token ids or messages), the sampling parameters
(seed included) and the sample index. Results go to a `generations/1` dataset beside the
job's output (`<output>/generations`), written with the store's dataset writer: each
worker commits its own shards (a commit record per shard, so concurrent writers never
overwrite each other), and the driver writes the manifest last (`finalize`). A worker
starting later (a retry, a resumed job, another node) loads every committed shard first.

Commits are group commits on a background thread: `commit_soon()` (the synthetic-data
workload calls it after every engine call) hands the pending rows to the committer and
returns at once, so the upload overlaps the next engine call; rows that arrive while a
commit is in flight go into the next one, and commits start at most every
`commit_interval_seconds` (0.5 s), so a fast engine makes fewer, larger shards and a slow
teacher has each call's results on record moments after it answered. Pending rows
are also committed once there are `flush_rows` of them or `flush_seconds` have passed.
`flush()` waits for the committer and commits the rest; a commit that failed in the
background is raised there (and by the next `commit_soon()`), its rows kept for a retry.

A sample that failed after the engine's retries is recorded with its error kind and
message and counted; it is not served from the cache, so a later run tries it again. The
job stops when failures exceed its `FailureBudget`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from tokenmill.layout import join
from tokenmill.store import AttemptFence, DatasetWriter, StoreError
from tokenmill.store.dataset_reader import read_verified_shard
from tokenmill.store.schemas import GENERATIONS
from tokenmill.trainer.generate.interface import (
    Completion,
    Engine,
    GenerationError,
    GenerationRequest,
    RequestOutput,
    SampleFailure,
    SamplingParams,
    stable_hash,
)
from tokenmill.trainer.generate.metrics import GenerateMetrics

log = logging.getLogger("tokenmill.generate")
DEFAULT_FLUSH_ROWS = 1024
DEFAULT_FLUSH_SECONDS = 30.0
DEFAULT_COMMIT_INTERVAL_SECONDS = 0.5


def generations_uri(output: str) -> str:
    """Where a job keeps its request cache: beside its dataset, under its output."""
    return join(output, "generations")


def request_key(engine: str, model_identity: str, request: GenerationRequest, index: int) -> str:
    sampling = request.sampling.to_dict()
    return stable_hash({
        "engine": engine, "model": model_identity, "prompt": request.prompt_key(),
        "sampling": sampling, "seed": sampling["seed"], "sample_index": index,
    })


def request_keys(engine: str, model_identity: str, request: GenerationRequest) -> dict[int, str]:
    """`request_key` of each of the request's sample indices, serialising the request once."""
    # the sorted keys of request_key's object: engine, model, prompt, sample_index, sampling, seed
    head = f'{{"engine":{_json(engine)},"model":{_json(model_identity)},"prompt":{_json(request.prompt_key())},' \
           '"sample_index":'
    tail = _sampling_tail(request.sampling)
    return {index: hashlib.sha256(f"{head}{index}{tail}".encode()).hexdigest() for index in request.indices}


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=1024)
def _sampling_tail(sampling: SamplingParams) -> str:
    values = sampling.to_dict()
    return f',"sampling":{_json(values)},"seed":{_json(values["seed"])}}}'


def completion_json(completion: Completion) -> str:
    """`Completion.to_dict()` as JSON, without copying the token and log-prob lists first."""
    tops = completion.top_logprobs
    return json.dumps({
        "index": completion.index, "token_ids": completion.token_ids, "text": completion.text,
        "finish_reason": completion.finish_reason, "prompt_tokens": completion.prompt_tokens,
        "logprobs": completion.logprobs,
        "top_logprobs": None if tops is None else [
            [{"token_id": t.token_id, "logprob": t.logprob, "token": t.token} for t in step] for step in tops],
    })


class GenerationBudgetExceeded(GenerationError):
    """More samples failed than the job's failure budget allows."""


@dataclass(frozen=True)
class FailureBudget:
    """A job fails once failures > max_failures + max_fraction x samples attempted."""

    max_failures: int = 0
    max_fraction: float = 0.0

    def exceeded(self, failures: int, attempted: int) -> bool:
        return failures > self.max_failures + self.max_fraction * attempted


@dataclass
class RequestCache:
    """Completions by request key, loaded from and committed to a `generations/1` dataset."""

    uri: str
    flush_rows: int = DEFAULT_FLUSH_ROWS
    flush_seconds: float = DEFAULT_FLUSH_SECONDS
    commit_interval_seconds: float = DEFAULT_COMMIT_INTERVAL_SECONDS
    """The background committer starts a commit at most this often (`flush()` does not wait)."""
    fence: AttemptFence | None = None
    """The attempt's fence: a superseded attempt commits no shard, deletes nothing, writes no manifest."""
    completions: dict[str, Completion] = field(default_factory=dict)
    failures: dict[str, SampleFailure] = field(default_factory=dict)
    _pending: list[dict] = field(default_factory=list)
    _writer_id: str = field(default_factory=lambda: secrets.token_hex(6))
    _shards_written: int = 0
    _last_flush: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _state: threading.Condition = field(default_factory=threading.Condition)
    """Guards the commit slot (one commit at a time), the request flag and the committer's error."""
    _committing: bool = False
    _requested: bool = False
    _error: BaseException | None = None
    _committer_running: bool = False

    def __post_init__(self) -> None:
        # No producer: keys are content hashes, so results stay valid when the spec changes.
        self.writer = DatasetWriter(self.uri, GENERATIONS, fence=self.fence)

    def load(self) -> RequestCache:
        """Reads every committed shard (other workers' and earlier attempts' too)."""
        committed = self.writer.resume()
        for info in committed.values():
            table = read_verified_shard(self.writer.store, info)
            for row in table.to_pylist():
                if row["completion"] is not None:
                    completion = Completion.from_dict(json.loads(row["completion"]), cached=True)
                    self.completions[row["key"]] = completion
                    self.failures.pop(row["key"], None)
                elif row["key"] not in self.completions:
                    self.failures[row["key"]] = SampleFailure(
                        row["sample_index"], row["error_kind"] or "unknown", row["error"] or "")
        log.info("request cache %s: %d completions, %d recorded failures",
                 self.uri, len(self.completions), len(self.failures))
        return self

    def get(self, key: str) -> Completion | None:
        return self.completions.get(key)

    def put(self, key: str, request: GenerationRequest, completion: Completion | None,
            failure: SampleFailure | None = None) -> None:
        row = {"key": key, "request_id": request.id, "completion": None, "error_kind": None, "error": None}
        if completion is not None:
            row |= {"sample_index": completion.index, "completion": completion_json(completion)}
        else:
            assert failure is not None
            row |= {"sample_index": failure.index, "error_kind": failure.kind, "error": failure.message}
        with self._lock:
            if completion is not None:
                self.completions[key] = completion
                self.failures.pop(key, None)
            else:
                assert failure is not None
                self.failures[key] = failure
            self._pending.append(row)
            due = (len(self._pending) >= self.flush_rows
                   or time.monotonic() - self._last_flush >= self.flush_seconds)
        if due:
            self.commit_soon()

    def commit_soon(self) -> None:
        """Hands the pending rows to the background committer and returns at once; raises the
        error of an earlier background commit, if one failed (its rows stay pending)."""
        with self._state:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            with self._lock:
                if not self._pending:
                    return
            self._requested = True
            if not self._committer_running:
                self._committer_running = True
                threading.Thread(target=self._commit_in_background, daemon=True,
                                 name="request-cache-committer").start()
            self._state.notify_all()

    def _commit_in_background(self) -> None:
        while True:
            with self._state:
                while not self._requested:
                    if not self._state.wait(timeout=60.0):
                        self._committer_running = False  # idle: the next commit_soon() starts another
                        return
                while (wait := self._last_flush + self.commit_interval_seconds - time.monotonic()) > 0:
                    self._state.wait(timeout=wait)  # answers arriving meanwhile join this commit
                self._requested = False
            if not self._commit_pending(background=True):
                with self._state:
                    self._committer_running = False
                return

    def _commit_pending(self, *, background: bool) -> bool:
        """Commits the pending rows as one shard of this worker's, holding the commit slot.
        In the background a failure is kept for the caller (and False returned); otherwise an
        earlier background failure is cleared, since its rows are retried here."""
        with self._state:
            while self._committing:
                self._state.wait()
            self._committing = True
            if not background:
                self._error = None
        rows: list[dict] = []
        failed: BaseException | None = None
        try:
            with self._lock:
                rows, self._pending = self._pending, []
                name = f"w-{self._writer_id}-{self._shards_written:06d}"
                self._last_flush = time.monotonic()
            if rows:
                self.writer.write_shard(name, rows)
                with self._lock:
                    self._shards_written += 1
        except BaseException as error:
            with self._lock:
                self._pending[:0] = rows  # kept for the next commit
            failed = error
            if not background:
                raise
        finally:
            with self._state:
                self._committing = False
                if background and failed is not None:
                    self._error = failed
                self._state.notify_all()
        return failed is None

    def flush(self) -> None:
        """Commits every pending row before returning (after a background commit in flight)."""
        self._commit_pending(background=False)

    def finalize(self) -> None:
        """Flushes and writes the manifest over every committed shard (driver, at the end)."""
        self.flush()
        self.writer.finalize()


class CachedEngine(Engine):
    """An engine behind the request cache: only samples without a cached completion are
    generated; every result is recorded; failures are counted against the budget."""

    def __init__(self, engine: Engine, cache: RequestCache | None,
                 budget: FailureBudget | None = None, metrics: GenerateMetrics | None = None) -> None:
        self.engine = engine
        self.engine_name = engine.engine_name
        self.cache = cache
        self.budget = budget or FailureBudget()
        self.metrics = metrics
        self.attempted = 0
        self.failed = 0
        self.hits = 0

    @property
    def model_identity(self) -> str:
        return self.engine.model_identity

    def check(self) -> None:
        self.engine.check()

    def check_requests(self, requests: Sequence[GenerationRequest]) -> None:
        self.engine.check_requests(requests)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[RequestOutput]:
        self.engine.check_requests(requests)
        outputs = [RequestOutput(request) for request in requests]
        keys: list[dict[int, str]] = []
        todo: list[tuple[int, GenerationRequest]] = []
        asked: set[str] = set()
        repeats: list[tuple[int, str]] = []  # samples of this call equal to an earlier one: answered once
        for position, request in enumerate(requests):
            by_index = request_keys(self.engine_name, self.model_identity, request)
            keys.append(by_index)
            missing = []
            for index, key in by_index.items():
                hit = self.cache.get(key) if self.cache is not None else None
                if hit is not None:
                    outputs[position].completions.append(hit)
                elif key in asked:
                    repeats.append((position, key))
                else:
                    asked.add(key)
                    missing.append(index)
            self.hits += len(by_index) - len(missing)
            if self.metrics is not None and len(by_index) > len(missing):
                self.metrics.cache_hits(len(by_index) - len(missing))
            if missing:
                todo.append((position, request.with_indices(missing)))
        results: dict[str, Completion | SampleFailure] = {}
        if todo:
            generated = self.engine.generate([request for _, request in todo])
            for (position, request), result in zip(todo, generated, strict=True):
                for completion in result.completions:
                    outputs[position].completions.append(completion)
                    results[keys[position][completion.index]] = completion
                    if self.metrics is not None:
                        self.metrics.sample_ok(completion.prompt_tokens, completion.completion_tokens)
                    if self.cache is not None:
                        self.cache.put(keys[position][completion.index], request, completion)
                for failure in result.failures:
                    outputs[position].failures.append(failure)
                    results[keys[position][failure.index]] = failure
                    if self.metrics is not None:
                        self.metrics.sample_failed(failure.kind)
                    if self.cache is not None:
                        self.cache.put(keys[position][failure.index], request, None, failure)
                self.attempted += len(request.indices)
                self.failed += len(result.failures)
        for position, key in repeats:
            answer = results[key]
            if isinstance(answer, Completion):
                outputs[position].completions.append(replace(answer, cached=True))
            else:
                outputs[position].failures.append(answer)
        for output in outputs:
            output.completions.sort(key=lambda c: c.index)
        if self.budget.exceeded(self.failed, self.attempted):
            if self.cache is not None:
                self._flush_quietly()
            raise GenerationBudgetExceeded(
                f"{self.failed} of {self.attempted} samples failed, more than the failure budget "
                f"({self.budget.max_failures} + {self.budget.max_fraction:g} x samples); "
                f"last error: {_last_error(outputs)}")
        return outputs

    def _flush_quietly(self) -> None:
        try:
            self.cache.flush()
        except StoreError as error:
            log.error("could not commit the request cache: %s", error)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.flush()
        self.engine.close()


def _last_error(outputs: list[RequestOutput]) -> str:
    for output in reversed(outputs):
        if output.failures:
            failure = output.failures[-1]
            return f"{failure.kind}: {failure.message}"
    return "none in this batch"
