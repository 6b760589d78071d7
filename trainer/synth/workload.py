"""The SyntheticDataJob workload: `python -m tokenmill.trainer synthetic-data --spec <uri>`.

The driver reads the run spec and checks everything before the first request (`prepare`):
the dataset type and whether the workflow's steps fit it, the seed datasets (committed,
`documents/1` or `chat_samples/1`), every template against every seed, and the engine's
probe. Then the seeds, in shards of `SEEDS_PER_SHARD`, run through the workflow on Ray Data
(an actor pool: each actor loads the engine once, behind the request cache, on a thread of
its own that serves one call at a time, and runs the workflows of `CALLS_PER_ACTOR` shards at
once: while one shard's requests are in the engine, the others render, parse, vote and
commit). Each shard commits its rows and its step statistics on its own before it is
reported; the driver merges the statistics, writes progress as shards finish, adds the
actors' generation counts to its own `tokenmill_generate_*` series, stops when a budget is
spent or an actor's engine failed more samples than the failure budget allows, and at the
end writes the statistics
(`<output>/_run/synth-stats.json`), the request cache's manifest, and the dataset's
manifest last (carrying the same statistics).

A retried or resumed attempt skips committed shards and answers every request it already
paid for from the request cache (committed in the background after engine calls, and in
full before an actor's last shard in hand is reported).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenmill.api.synthetic import SyntheticDataJobSpec
from tokenmill.layout import dataset_uri, join
from tokenmill.store import (
    CHAT_SAMPLES,
    AttemptFence,
    DOCUMENTS,
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
from tokenmill.trainer.generate.interface import Engine, GenerationRequest, RequestOutput
from tokenmill.trainer.synth import steps as synth_steps
from tokenmill.trainer.synth.workflow import (
    OUTPUT_STEP,
    StepStats,
    SynthInputError,
    Workflow,
    check_templates,
    check_workflow,
    dataset_type,
    seed_from_row,
)
from tokenmill.workloads import PHASE_SUCCEEDED

if TYPE_CHECKING:
    from tokenmill.trainer.generate.cache import CachedCall, CachedEngine

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
SEEDS_PER_SHARD = 16
STATS_KEY = "_run/synth-stats.json"
SHARD_STATS_PREFIX = "_run/synth-shards"
STOP_KEY = "_run/synth-stop.json"
"""Written by the driver once a budget is spent: workers skip the shards they have not begun."""
FAILURE_BUDGET_STOP = "failureBudget"
"""`stoppedBy` when an actor's engine failed more samples than `spec.failureBudget` allows
(each failed sample is dropped and counted as `generation-failed` until then): the
shards committed so far become the dataset, the attempt fails, and a retry resumes."""
CALLS_PER_ACTOR = 3
"""Shards in hand per engine actor, their workflows running at once: the engine serves one
call at a time, and between one shard's calls (its prompts rendered, answers parsed, votes
counted, its rows committed) another shard's requests are in the engine. With two, the pair
tends to finish and commit together, the engine idle meanwhile; a third has requests ready
then (`benchmarks/synth.py` measures both). No more are queued on an actor, so the first
actor ready does not take the shards of the others."""
WORKERS_ENV = "TOKENMILL_SYNTH_WORKERS"
"""Engine actors; by default one per CPU of the Ray cluster (at most one per shard)."""


def _error(message: str) -> None:
    print(f"tokenmill synthetic-data: {message}", file=sys.stderr, flush=True)


@dataclass
class Job:
    """Everything a worker needs; pickled into each actor."""

    spec: SyntheticDataJobSpec
    output: str
    producer: Producer
    schema_name: str
    workflow: Workflow
    fence: AttemptFence | None = None
    """Checked before every commit, deletion and manifest, by the driver and every worker."""

    @property
    def step_order(self) -> list[str]:
        return [step.type for step in self.workflow.steps] + [OUTPUT_STEP]


@dataclass
class Prepared:
    job: Job
    seeds: list[dict[str, Any]]


def read_seeds(spec: SyntheticDataJobSpec) -> list[dict[str, Any]]:
    seeds: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, source in enumerate(spec.seeds):
        where = f"spec.seeds[{index}]"
        uri = str(source.uri)
        try:
            dataset = open_dataset(uri)
        except ManifestNotFoundError:
            raise SynthInputError(f"{where}: no committed dataset at {uri} (its _manifest.json is missing)") from None
        except StoreError as error:
            raise SynthInputError(f"{where}: cannot open {uri}: {error}") from None
        schema = dataset.schema.name
        if schema not in (DOCUMENTS.name, CHAT_SAMPLES.name):
            raise SynthInputError(f"{where}: dataset {uri} has schema {dataset.schema.ref}; seeds are "
                                  f"{DOCUMENTS.ref} or {CHAT_SAMPLES.ref} rows")
        for row in dataset.read_all().to_pylist():
            seed = seed_from_row(row, schema, f"{where} ({uri}) row {row['id']}")
            if len(spec.seeds) > 1:  # ids stay unique across seed datasets
                seed["id"] = f"{index}/{seed['id']}"
            if seed["id"] in seen:
                raise SynthInputError(f"{where} ({uri}): seed id {seed['id']!r} appears twice")
            seen.add(seed["id"])
            seeds.append(seed)
    if not seeds:
        raise SynthInputError("spec.seeds: the seed datasets hold no rows")
    return seeds


def prepare(doc: dict[str, Any]) -> Prepared:
    """Check and load everything the run needs; SynthInputError names the bad input."""
    try:
        spec = SyntheticDataJobSpec.model_validate(doc["spec"])
    except Exception as error:  # pydantic's message lists every field
        raise SynthInputError(f"the run spec is not a valid SyntheticDataJob spec: {error}") from None
    if any(not source.uri for source in spec.seeds):
        raise SynthInputError("spec.seeds need resolved URIs (the run spec must carry committed URIs)")
    kind = dataset_type(spec.dataset_type)
    steps = [synth_steps.build(step) for step in spec.workflow]
    check_workflow(kind, steps)
    description = [step.to_wire() for step in spec.workflow]
    workflow = Workflow(kind, steps, description)
    seeds = read_seeds(spec)
    check_templates(steps, seeds, "spec.seeds", draft=kind.draft)
    _probe(spec)
    metadata = doc.get("metadata") or {}
    producer = Producer(kind="SyntheticDataJob", name=str(metadata.get("name") or ""),
                        uid=str(metadata.get("uid") or ""), generation=int(metadata.get("generation") or 0),
                        attempt=int(doc.get("attempt") or 0))
    job = Job(spec, str(doc["output"]), producer, kind.schema.name, workflow, fence=AttemptFence.from_run_spec(doc))
    return Prepared(job, seeds)


def _probe(spec: SyntheticDataJobSpec) -> None:
    """The engine's own check (model loads, endpoint answers, key accepted) before any request."""
    from tokenmill.trainer.generate import GenerationInputError, build_engine

    generator = spec.generator
    try:
        engine = build_engine(generator.engine, model_uri=str(generator.model.uri) if generator.model else None,
                              endpoint=generator.endpoint, model_name=generator.model_name,
                              max_concurrency=generator.max_concurrency,
                              tensor_parallel_size=generator.tensor_parallel_size,
                              mistake_rate=generator.mistake_rate)
    except GenerationInputError as error:
        raise SynthInputError(str(error)) from None
    except (StoreError, OSError, ValueError) as error:
        raise SynthInputError(f"spec.generator.model: cannot load it: {error}") from None
    engine.close()


def sampling_of(spec: SyntheticDataJobSpec):
    from tokenmill.trainer.generate import sampling_from_spec

    sampling = spec.generator.sampling
    return sampling_from_spec(sampling, seed=sampling.seed if sampling.seed is not None else spec.seed)


def shard_stats_key(number: int) -> str:
    return f"{SHARD_STATS_PREFIX}/{shard_name(number)}.json"


class EngineLoop:
    """The actor's engine on a thread of its own, running the calls the shards submit one at
    a time, the oldest shard's first: of the calls waiting, the one whose shard began first
    goes next, so the oldest shard runs ahead and finishes (and commits) while younger ones
    still generate. The engine goes from one call straight to the next waiting, without
    waiting for the thread of the call that ended (or the next one's) to be scheduled."""

    def __init__(self, engine: CachedEngine) -> None:
        self.engine = engine
        self._queue: queue.PriorityQueue[tuple[int, int, CachedCall | None, futures.Future]] = queue.PriorityQueue()
        self._tickets = itertools.count()
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="engine")
        self._thread.start()

    def ticket(self) -> int:
        """A shard's place in the order, taken when it begins."""
        return next(self._tickets)

    def waiting(self) -> int:
        """Calls waiting for the engine now."""
        return self._queue.qsize()

    def submit(self, ticket: int, call: CachedCall) -> futures.Future:
        """`CachedEngine.run(call)` on the engine's thread, in turn; the future's result is the
        number of samples the call sent to the model and the error it raised, if any (what was
        sent before the error still counts)."""
        future: futures.Future = futures.Future()
        self._queue.put((ticket, next(self._order), call, future))
        return future

    def close(self) -> None:
        """Stops the thread; for after the last call (it goes ahead of any still waiting)."""
        self._queue.put((-1, -1, None, futures.Future()))
        self._thread.join()

    def _serve(self) -> None:
        while True:
            _, _, call, future = self._queue.get()
            if call is None:
                return
            attempted = self.engine.attempted
            try:
                self.engine.run(call)
            except BaseException as error:  # raised on the shard's thread, which asked
                future.set_result((self.engine.attempted - attempted, error))
            else:
                future.set_result((self.engine.attempted - attempted, None))


class ShardEngine(Engine):
    """The actor's engine as one shard's workflow sees it. A call looks up its keys in the
    request cache on the shard's thread; the rest goes to the engine's thread, which serves
    one call at a time, whichever shard asks (a torch engine is not thread-safe, a teacher's
    throughput is what it is, and two overlapping calls on one `CachedEngine` could each pay
    for a sample neither had; a sample another shard answered since the lookup is served
    from the cache). `sent` counts the samples this shard's calls sent to the model (the
    engine's own count is the whole actor's)."""

    def __init__(self, engine: CachedEngine, loop: EngineLoop) -> None:
        self.engine = engine
        self.engine_name = engine.engine_name
        self.loop = loop
        self.ticket = loop.ticket()
        self.sent = 0

    @property
    def model_identity(self) -> str:
        return self.engine.model_identity

    def check_requests(self, requests: Sequence[GenerationRequest]) -> None:
        self.engine.check_requests(requests)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[RequestOutput]:
        call = self.engine.plan(requests)
        sent, error = self.loop.submit(self.ticket, call).result()
        self.sent += sent
        if error is not None:
            raise error
        return self.engine.finish(call)


class ShardWorker:
    """One Ray Data actor: the engine behind the request cache, and the workflow over shards."""

    def __init__(self, job: Job) -> None:
        from tokenmill.trainer.generate import FailureBudget, engine_from_generator
        from tokenmill.trainer.generate.metrics import GenerationTally

        self.job = job
        self.engine = engine_from_generator(
            job.spec.generator, output=job.output,
            budget=FailureBudget(job.spec.failure_budget.max_failures, job.spec.failure_budget.max_fraction),
            fence=job.fence)
        # nobody scrapes an actor: its counts go back with each result, to the driver's series
        self.tally = GenerationTally(self.engine.engine_name)
        self.engine.metrics = self.engine.engine.metrics = self.tally
        self.sampling = sampling_of(job.spec)
        self.engine_loop = EngineLoop(self.engine)
        self.writer = DatasetWriter(dataset_uri(job.output), self.job.workflow.kind.schema, producer=job.producer,
                                    fence=job.fence)
        self.store = open_store(job.output)
        self._in_hand = 0
        """Shards `run_shard` is working on now."""
        self._in_hand_lock = threading.Lock()
        self._side_writes = futures.ThreadPoolExecutor(max_workers=2 * CALLS_PER_ACTOR,
                                                       thread_name_prefix="shard-commit")

    def close(self) -> None:
        """Stops the engine's thread and the commit threads (Ray ends an actor's process anyway)."""
        self.engine_loop.close()
        self._side_writes.shutdown()

    def shard_engine(self) -> ShardEngine:
        return ShardEngine(self.engine, self.engine_loop)

    def context(self, engine: ShardEngine) -> synth_steps.Context:
        """A workflow's own context (its step counts are its shard's) over its shard's engine."""
        return synth_steps.Context(engine, self.sampling, after_call=self._after_call)

    def _after_call(self) -> None:
        if self.engine.cache is not None:
            self.engine.cache.commit_soon()  # in the background, while the next call runs

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        results = []
        for payload in batch["shard"]:
            unit = json.loads(payload)
            results.append(json.dumps(self.run_shard(unit["shard"], unit["seeds"])))
        return {"result": results}

    def run_shard(self, number: int, seeds: list[dict[str, Any]]) -> dict[str, Any]:
        """The workflow over one shard's seeds, its rows committed before it returns; or, when
        the engine failed more samples than the failure budget allows, nothing committed but
        the request cache; or, once the driver wrote the stop marker, nothing at all.

        Safe to call from `CALLS_PER_ACTOR` threads at once: each shard's workflow has its own
        context and counts, and only the engine calls take turns, so one shard's work between
        its calls and its commit overlap the others' calls. A shard's rows, statistics and
        cache records do not depend on how the shards interleave (each sample is seeded by
        its request and index alone); a prompt that two shards both ask is generated once,
        counted in the `sent` of whichever asked first. Commits run as workflows finish, in
        any order (the driver trims and lists shards in shard order).

        The request cache commits in the background after engine calls; the last shard in
        hand commits the rest before it returns, so once every shard has been reported every
        answer is on record. A shard that returns while others are in hand leaves its last
        answers to them (a committed shard is never asked again, so they matter only as far
        as the other shards ask the same)."""
        from tokenmill.trainer.generate import GenerationBudgetExceeded

        with self._shard_in_hand():
            if self.store.exists(STOP_KEY):
                return {"shard": number, "skipped": True}
            engine = self.shard_engine()
            try:
                rows, stats = self.job.workflow.run(seeds, self.context(engine))
            except GenerationBudgetExceeded as error:
                return {"shard": number, "failed": str(error), "sent": engine.sent, "generation": self.tally.take()}
            result = {"shard": number, "stats": stats.to_data(), "sent": engine.sent}
            self._commit(number, rows, result)
            return {**result, "generation": self.tally.take()}

    @contextlib.contextmanager
    def _shard_in_hand(self) -> Iterator[None]:
        with self._in_hand_lock:
            self._in_hand += 1
        try:
            yield
        finally:
            with self._in_hand_lock:
                self._in_hand -= 1
                last = not self._in_hand
            if last and self.engine.cache is not None:
                self.engine.cache.flush()  # after a commit that flushed alongside, nothing is left

    def _commit(self, number: int, rows: list[dict[str, Any]], result: dict[str, Any]) -> None:
        """The shard's statistics and its dataset shard, and when no other shard is in hand the
        request cache's pending answers; the writes run at once, and the shard's commit record
        comes after its statistics and its data."""
        _check_fence(self.job, f"commit shard {shard_name(number)} of {self.writer.uri}")
        side = [self._side_writes.submit(self.store.write_json, shard_stats_key(number), result)]
        with self._in_hand_lock:
            alone = self._in_hand == 1
        if alone and self.engine.cache is not None:
            side.append(self._side_writes.submit(self.engine.cache.flush))
        try:
            staged = self.writer.stage(number, rows or self.job.workflow.kind.schema.arrow.empty_table())
            side[0].result()  # the statistics, before the shard's commit record
            self.writer.commit(staged)
        finally:
            futures.wait(side)  # nothing of this shard is still being written once it returns or fails
        for write in side:
            write.result()


def _workers(pending: int) -> int:
    import ray

    configured = int(os.environ.get(WORKERS_ENV) or 0)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(pending, configured or cpus))


@dataclass
class Outcome:
    stats: StepStats
    shards: list[int]
    stopped_by: str | None
    sent: int
    failure: str | None = None
    """Why the engine's failures stopped the job (`stopped_by` is then FAILURE_BUDGET_STOP)."""


def add_generation_counts(result: dict[str, Any]) -> None:
    """An actor's generation counts, added to this process's `tokenmill_generate_*` series."""
    from tokenmill.trainer.generate.metrics import GenerateMetrics

    counts = result.get("generation")
    if counts:
        GenerateMetrics(str(counts["engine"])).add(counts)


def execute(job: Job, seeds: list[dict[str, Any]]) -> Outcome:
    import ray
    import ray.data

    from tokenmill.trainer.generate import RequestCache, generations_uri

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    units = [seeds[start:start + SEEDS_PER_SHARD] for start in range(0, len(seeds), SEEDS_PER_SHARD)]
    writer = DatasetWriter(dataset_uri(job.output), job.workflow.kind.schema, producer=job.producer,
                           fence=job.fence)
    committed = set(writer.resume())
    store = open_store(job.output)
    total, sent, done = StepStats(), 0, []
    failure: str | None = None
    budgets = job.spec.budgets
    for number in range(len(units)):
        if shard_name(number) in committed and store.exists(shard_stats_key(number)):
            result = store.read_json(shard_stats_key(number))
            total.merge(StepStats.from_data(result["stats"]))
            sent += int(result["sent"])
            done.append(number)
    pending = [number for number in range(len(units)) if number not in done]
    if done:
        print(f"tokenmill synthetic-data: resuming; {len(done)} of {len(units)} shards already committed", flush=True)
    if store.exists(STOP_KEY):
        _check_fence(job, f"delete {STOP_KEY} under {job.output}")
        store.delete(STOP_KEY)
    stopped_by = _spent(total, budgets)
    # seedSelection keeps the top fraction of the whole job's passages: a scoring pass first
    from tokenmill.trainer.synth.selection import select_job_wide

    sent += select_job_wide(job, units, score=bool(pending) and stopped_by is None)
    if pending and stopped_by is None:
        items = [{"shard": json.dumps({"shard": n, "seeds": units[n]})} for n in pending]
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        mapped = dataset.map_batches(ShardWorker, fn_constructor_kwargs={"job": job}, batch_size=1,
                                     batch_format="numpy", num_cpus=1,
                                     compute=ray.data.ActorPoolStrategy(
                                         size=_workers(len(pending)), max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                                         max_tasks_in_flight_per_actor=CALLS_PER_ACTOR,
                                         enable_true_multi_threading=True))
        # Every shard comes back (skipped ones at once after a stop), so no worker is still
        # writing when the driver trims and commits the manifest.
        for row in mapped.iter_rows():
            result = json.loads(row["result"])
            add_generation_counts(result)
            if result.get("skipped"):
                continue
            sent += int(result["sent"])
            if result.get("failed"):
                failure = failure or str(result["failed"])
                _error(f"shard {shard_name(int(result['shard']))} stopped: {result['failed']}")
                if stopped_by is None:
                    stopped_by = FAILURE_BUDGET_STOP
                    store.write_json(STOP_KEY, {"stoppedBy": stopped_by})
                continue
            total.merge(StepStats.from_data(result["stats"]))
            done.append(int(result["shard"]))
            write_progress(job.output, Progress(phase="generating", done=total.seeds, total=len(seeds), unit="seeds",
                                                metrics=progress_metrics(total)))
            if stopped_by is None and (stopped_by := _spent(total, budgets)) is not None:
                store.write_json(STOP_KEY, {"stoppedBy": stopped_by})
    shards = sorted(set(writer.resume()) & {shard_name(n) for n in done})
    if budgets.max_samples is not None and total.written > budgets.max_samples:
        _check_fence(job, f"trim the shards of {writer.uri}")
        _trim(writer, shards, budgets.max_samples, total)
    _check_fence(job, f"write {STATS_KEY} under {job.output}")
    stats = {**total.to_dict(job.step_order), "stoppedBy": stopped_by, "workflowVersion": job.workflow.version,
             "templates": job.workflow.template_versions, "requestsSent": sent}
    if failure is not None:
        stats["failure"] = failure[:1000]
    store.write_json(STATS_KEY, stats)
    RequestCache(generations_uri(job.output), fence=job.fence).finalize()
    writer.finalize(expected=shards, stats=stats)  # last: the dataset becomes visible
    return Outcome(total, [int(s.split("-")[-1]) for s in shards], stopped_by, sent, failure)


def _check_fence(job: Job, doing: str) -> None:
    if job.fence is not None:  # for the files beside the datasets; the writers fence their own
        job.fence.check(doing)


def _spent(stats: StepStats, budgets: Any) -> str | None:
    if budgets.max_samples is not None and stats.written >= budgets.max_samples:
        return "maxSamples"
    if budgets.max_generated_tokens is not None and stats.tokens_generated >= budgets.max_generated_tokens:
        return "maxGeneratedTokens"
    return None


def _trim(writer: DatasetWriter, shards: list[str], limit: int, total: StepStats) -> None:
    """Keeps exactly the first `limit` rows in shard order (shards finish out of order)."""
    from tokenmill.store.dataset_reader import read_verified_shard

    committed = writer.resume()
    remaining = limit
    for name in shards:
        info = committed[name]
        if info.rows <= remaining:
            remaining -= info.rows
            continue
        table = read_verified_shard(writer.store, info).slice(0, remaining)
        cut = info.rows - table.num_rows
        writer.write_shard(name, table)
        total.records[(OUTPUT_STEP, "kept", "written")] -= cut
        total.records[(OUTPUT_STEP, "dropped", "budget")] += cut
        remaining -= table.num_rows


def progress_metrics(stats: StepStats) -> dict[str, float]:
    """Flat figures for the progress record (and so for the metrics endpoint)."""
    out: dict[str, float] = {"seeds": float(stats.seeds), "records_written": float(stats.written),
                             "tokens_generated": float(stats.tokens_generated)}
    for (step, verdict, reason), count in stats.records.items():
        out[f"records|{step}|{verdict}|{reason}"] = float(count)
    for step, count in stats.requests.items():
        out[f"requests|{step}"] = float(count)
    for step, count in stats.tokens.items():
        out[f"tokens|{step}"] = float(count)
    return out


def run(spec_uri: str) -> int:
    try:
        doc = read_run_spec_at(spec_uri)
    except StoreError as error:
        _error(f"cannot read the run spec {spec_uri}: {error}")
        return EXIT_BAD_INPUT
    started = time.monotonic()
    try:
        prepared = prepare(doc)
    except SynthInputError as error:
        _error(f"{error}; nothing was generated")
        return EXIT_BAD_INPUT
    job = prepared.job
    print(f"tokenmill synthetic-data: {len(prepared.seeds)} seeds, {len(job.workflow.steps)} steps, "
          f"{job.spec.generator.engine} engine, writing {dataset_uri(job.output)}", flush=True)
    write_progress(job.output, Progress(phase="generating", done=0, total=len(prepared.seeds), unit="seeds"))
    try:
        outcome = execute(job, prepared.seeds)
    except Exception as error:  # an engine or store failure: the next attempt resumes
        _error(f"generation failed: {error}")
        write_progress(job.output, Progress(phase="failed", message=str(error)[:500]))
        return EXIT_FAILED
    seconds = time.monotonic() - started
    stats = outcome.stats
    if outcome.failure is not None:
        message = (f"generation stopped: {outcome.failure}; the {stats.written:,} records of the "
                   f"{len(outcome.shards):,} shards finished before are committed at {dataset_uri(job.output)}, "
                   f"and a retry resumes from them")
        _error(message)
        write_progress(job.output, Progress(phase="failed", done=stats.seeds, total=len(prepared.seeds),
                                            unit="seeds", message=message[:1000], metrics=progress_metrics(stats)))
        return EXIT_FAILED
    stop = f"; stopped by budget {outcome.stopped_by}" if outcome.stopped_by else ""
    write_progress(job.output, Progress(
        phase=PHASE_SUCCEEDED, done=stats.seeds, total=len(prepared.seeds), unit="seeds",
        message=(f"wrote {stats.written:,} records from {stats.seeds:,} seeds, {stats.tokens_generated:,} tokens "
                 f"generated in {seconds:.0f} s{stop}; dataset at {dataset_uri(job.output)}"),
        metrics=progress_metrics(stats)))
    return 0


def stats_uri(output: str) -> str:
    return join(output, STATS_KEY)
