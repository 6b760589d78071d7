"""The token shard cache through the store (file:// and S3), on a local Ray, and reading it back."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.s3 import S3Bucket
from tokenmill.layout import token_cache_uri
from tokenmill.store import (
    CHAT_SAMPLES,
    DOCUMENTS,
    TOKEN_SEQUENCES,
    DatasetWriter,
    SchemaValidationError,
    open_dataset,
    open_store,
)
from tokenmill.api.training import TrainingStageSpec
from tokenmill.trainer.data.cache import (
    CacheSpec,
    FilteredCounts,
    bucket_uri,
    build_token_cache,
    cache_key,
    filtered_counts,
)
from tokenmill.trainer.data.loader import MicroBatchIterator
from tokenmill.trainer.data.midtrain import ALL_LENGTHS, LengthBucket, plan_for_stage
from tokenmill.trainer.data.plan import plan_mixture
from tokenmill.trainer.data.sampler import MixtureSampler
from tokenmill.trainer.data.sources import TokenCacheSource, cache_sizes, open_token_cache
from tokenmill.trainer.data.stage import (
    build_stage_caches,
    cache_spec,
    filter_report,
    open_stage_sources,
    stage_tokens,
)
from tokenmill.trainer.train.prepare import dataset_names, stage_datasets
from tokenmill.trainer.tokenizer import get_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while data flows into packed sequences über naïve 数据".split()


def make_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120))) for _ in range(count)]
    texts[count // 2] = ""  # an empty document is skipped
    return texts


def write_documents(uri: str, shards: list[list[str]]) -> None:
    writer = DatasetWriter(uri, DOCUMENTS)
    for n, texts in enumerate(shards):
        writer.write_shard(n, {"id": [f"{n}-{i}" for i in range(len(texts))], "text": texts})
    writer.finalize(expected=range(len(shards)))


def stream_of(rows: np.ndarray, pad_id: int) -> list[int]:
    if rows.shape[0] == 0:
        return []
    stream = np.concatenate([rows[0, :1], rows[:, 1:].reshape(-1)])
    return stream[stream != pad_id].tolist()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[str, list[list[str]]]:
    shards = [make_texts(seed, 40) for seed in range(4)]
    uri = (tmp_path / "docs").as_uri()
    write_documents(uri, shards)
    return uri, shards


def test_cache_on_ray_holds_every_document_once_with_eot_and_counts_tokens(
    local_ray: None, corpus: tuple[str, list[list[str]]], tmp_path: Path
) -> None:
    documents, shards = corpus
    tokenizer = get_tokenizer("phi-4")
    output = (tmp_path / "cache").as_uri()
    spec = CacheSpec(tokenizer="phi-4", seq_len=32, name="web")
    manifests = build_token_cache(documents, output, spec)
    manifest = manifests[ALL_LENGTHS.label]
    assert manifest.schema_ref == TOKEN_SEQUENCES.ref
    dataset = open_dataset(bucket_uri(output, ALL_LENGTHS))
    total = 0
    for n, texts in enumerate(shards):
        table = dataset.read_shard(n)
        rows = np.array(table.column("tokens").to_pylist(), dtype=np.int64)
        assert rows.shape[1] == 33
        expected = [t for text in texts if text for t in [*tokenizer.encode(text), tokenizer.eot_id]]
        assert stream_of(rows, tokenizer.pad_id) == expected
        assert dataset.manifest.shard(n).tokens == len(expected)
        assert set(table.column("source").to_pylist()) == {"web"}
        assert table.column("id").to_pylist()[:2] == [f"part-{n:06d}:0", f"part-{n:06d}:1"]
        total += len(expected)
    assert manifest.summary.tokens == total
    assert manifest.producer is not None and manifest.producer.uid == cache_key(open_dataset(documents).manifest, spec)


def test_a_resumed_build_skips_committed_shards(corpus: tuple[str, list[list[str]]], tmp_path: Path) -> None:
    documents, _ = corpus
    output = (tmp_path / "cache").as_uri()
    spec = CacheSpec(tokenizer="byte", seq_len=64)
    first = build_token_cache(documents, output, spec, use_ray=False)[ALL_LENGTHS.label]
    store = open_store(bucket_uri(output, ALL_LENGTHS))
    # A crash after shard 2 was written but before it was committed, and before the manifest.
    store.delete("_commits/part-000002.json")
    store.delete("_manifest.json")
    again = build_token_cache(documents, output, spec, use_ray=False)[ALL_LENGTHS.label]
    paths = {s.shard: s.path for s in first.shards}
    redone = {s.shard for s in again.shards if paths[s.shard] != s.path}
    assert redone == {"part-000002"}
    assert [s.rows for s in again.shards] == [s.rows for s in first.shards]
    # Nothing left to do: a third call rewrites nothing.
    third = build_token_cache(documents, output, spec, use_ray=False)[ALL_LENGTHS.label]
    assert [s.path for s in third.shards] == [s.path for s in again.shards]
    # Other settings at the same place: the old cache is discarded, not mixed in.
    other = build_token_cache(documents, output, CacheSpec(tokenizer="byte", seq_len=48), use_ray=False)
    rows = open_dataset(bucket_uri(output, ALL_LENGTHS)).read_all().column("tokens").to_pylist()
    assert {len(r) for r in rows} == {49}
    assert other[ALL_LENGTHS.label].producer.uid != first.producer.uid  # type: ignore[union-attr]


def test_length_buckets_pack_each_document_into_its_own_bucket(
    corpus: tuple[str, list[list[str]]], tmp_path: Path
) -> None:
    documents, shards = corpus
    buckets = (LengthBucket(40, 300), LengthBucket(300, None))
    output = (tmp_path / "cache").as_uri()
    build_token_cache(documents, output, CacheSpec(tokenizer="byte", seq_len=16, buckets=buckets), use_ray=False)
    tokenizer = get_tokenizer("byte")
    for bucket in buckets:
        dataset = open_dataset(bucket_uri(output, bucket))
        for n, texts in enumerate(shards):
            rows = np.array(dataset.read_shard(n).column("tokens").to_pylist(), dtype=np.int64).reshape(-1, 17)
            ids = [tokenizer.encode(t) for t in texts]
            expected = [t for doc in ids if doc and bucket.contains(len(doc)) for t in [*doc, tokenizer.eot_id]]
            assert stream_of(rows, tokenizer.pad_id) == expected
    # Documents under 40 bytes are in no bucket: dropped.
    sizes = cache_sizes(open_token_cache(output, 16, buckets))
    assert set(sizes) == {"len-40-299", "len-300-up"} and all(v > 0 for v in sizes.values())


@pytest.mark.parametrize("granularity", ["shard", "row_group"])
def test_token_cache_source_reads_the_rows_at_any_index(
    corpus: tuple[str, list[list[str]]], tmp_path: Path, granularity: str
) -> None:
    documents, _ = corpus
    output = (tmp_path / "cache").as_uri()
    build_token_cache(documents, output, CacheSpec(tokenizer="byte", seq_len=16, row_group_rows=7), use_ray=False)
    uri = bucket_uri(output, ALL_LENGTHS)
    everything = np.array(open_dataset(uri).read_all().column("tokens").to_pylist(), dtype=np.int32)
    source = TokenCacheSource(uri, 16, granularity=granularity, max_cached=2)  # type: ignore[arg-type]
    assert source.num_sequences == everything.shape[0]
    assert source.unique_tokens == open_dataset(uri).manifest.summary.tokens
    picks = np.random.default_rng(0).integers(0, source.num_sequences, size=300)
    np.testing.assert_array_equal(source.read(picks), everything[picks])
    with pytest.raises(IndexError):
        source.read(np.array([source.num_sequences]))
    with pytest.raises(Exception, match="expects seq_len"):
        TokenCacheSource(uri, 15).read(np.array([0]))


def test_cache_and_training_iterator_on_s3(s3_bucket: S3Bucket) -> None:
    documents = f"{s3_bucket.uri}/docs"
    output = f"{s3_bucket.uri}/cache"
    write_documents(documents, [make_texts(seed, 30) for seed in range(3)])
    spec = CacheSpec(tokenizer="phi-4", seq_len=24, row_group_rows=5, name="web")
    manifest = build_token_cache(documents, output, spec, use_ray=False)[ALL_LENGTHS.label]
    assert build_token_cache(documents, output, spec, use_ray=False)[ALL_LENGTHS.label].shards == manifest.shards
    tokenizer = get_tokenizer("phi-4")
    sources = {
        name: TokenCacheSource(bucket_uri(output, ALL_LENGTHS), 24, granularity=granularity)  # type: ignore[arg-type]
        for name, granularity in (("by-shard", "shard"), ("by-row-group", "row_group"))
    }
    plan = plan_mixture(
        [{"name": name, "weight": 1, "num_sequences": s.num_sequences, "epochs": 2} for name, s in sources.items()],
        seq_len=24,
        global_batch_size=4,
    )
    batches = MicroBatchIterator(
        MixtureSampler(plan, seed=0),
        sources,
        rank=0,
        world_size=1,
        micro_batch_size=4,
        eot_id=tokenizer.eot_id,
        pad_id=tokenizer.pad_id,
    )
    count = 0
    for batch in batches:
        assert batch.input_ids.shape == (4, 24)
        count += 1
    assert count == plan.num_steps and count * 4 == plan.total_sequences


def midtrain_spec(documents: str, **optimization: int) -> TrainingStageSpec:
    return TrainingStageSpec.model_validate({
        "stage": "midtrain",
        "model": {"parent": {"uri": "file:///pretrain/checkpoints/step-00000001"}},
        "datasets": [
            {"uri": documents, "name": "long", "weight": 0.3, "epochs": 50.0, "role": "new", "minDocumentTokens": 16},
            {"uri": documents, "name": "replay", "weight": 0.7, "epochs": 50.0, "role": "replay"},
        ],
        "longDocumentBoost": [{"minTokens": 64, "factor": 3.0}],
        "sequenceLength": 32,
        "ropeBase": 250000,
        "optimization": {"globalBatchSequences": 8, "peakLearningRate": 1e-4, "totalTokens": 80 * 32,
                         **optimization},
    })


def test_stage_sources_feed_the_plan_and_the_iterator(corpus: tuple[str, list[list[str]]], tmp_path: Path) -> None:
    documents, shards = corpus
    spec = midtrain_spec(documents)
    names = dataset_names(spec)
    datasets = stage_datasets(spec, names)
    output = (tmp_path / "stage").as_uri()
    build_stage_caches(datasets, output=output, tokenizer="byte", seq_len=32, use_ray=False)
    sources, sizes = open_stage_sources(datasets, output=output, tokenizer="byte", seq_len=32)
    assert set(sizes["long"]) == {"len-16-63", "len-64-up"}  # type: ignore[arg-type]
    assert set(sources) == {"long/len-16-63", "long/len-64-up", "replay"}
    assert token_cache_uri(output, "long", "byte", 32).endswith("/tokens/long/byte-L32")

    # The length filter left out the short documents, and says how many tokens they held.
    short = [t.encode() for shard in shards for t in shard if 0 < len(t.encode()) < 16]
    assert short
    cache = token_cache_uri(output, "long", "byte", 32)
    left_out = filtered_counts(documents, cache, cache_spec(datasets[0], "byte", 32))
    assert left_out == FilteredCounts(len(short), sum(len(t) + 1 for t in short))
    assert filtered_counts(documents, token_cache_uri(output, "replay", "byte", 32),
                           cache_spec(datasets[1], "byte", 32)) is None
    report = filter_report(datasets, output=output, tokenizer="byte", seq_len=32)
    assert len(report) == 1 and f"filtered out {len(short):,} documents" in report[0]

    tokens = stage_tokens(sources, sizes)
    plan = plan_for_stage(spec, sizes, names, tokens)
    tokenizer = get_tokenizer("byte")
    batches = list(
        MicroBatchIterator(
            MixtureSampler(plan, seed=0), sources, rank=1, world_size=2, micro_batch_size=2,
            eot_id=tokenizer.eot_id, pad_id=tokenizer.pad_id,
        )
    )
    assert len(batches) == plan.total_sequences // 4 == 20
    trained = {s.name: s.trained_tokens for s in plan.sources}
    assert trained["replay"] / sum(trained.values()) == pytest.approx(0.7, abs=0.02)


def test_token_shares_hold_over_many_small_shards_at_a_long_sequence_length(tmp_path: Path) -> None:
    """Each small shard ends in a padded row, so at 4K one source's rows are mostly padding.

    The planner weighs by the caches' real tokens: the tokens actually drawn keep the weights.
    """
    seq_len = 4096
    rng = random.Random(5)
    small = [[" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120))) for _ in range(3)]
             for _ in range(40)]  # 40 shards of roughly 1,500 bytes
    big = [[" ".join(rng.choice(WORDS) for _ in range(8000)) for _ in range(6)]]
    write_documents((tmp_path / "small").as_uri(), small)
    write_documents((tmp_path / "big").as_uri(), big)
    spec = TrainingStageSpec.model_validate({
        "stage": "pretrain", "model": {"config": "tiny"},
        "datasets": [{"uri": (tmp_path / "small").as_uri(), "name": "small", "weight": 0.5, "epochs": 100},
                     {"uri": (tmp_path / "big").as_uri(), "name": "big", "weight": 0.5, "epochs": 100}],
        "sequenceLength": seq_len,
        "optimization": {"globalBatchSequences": 10, "peakLearningRate": 1e-4, "totalTokens": 400 * seq_len},
    })
    names = dataset_names(spec)
    datasets = stage_datasets(spec, names)
    output = (tmp_path / "stage").as_uri()
    build_stage_caches(datasets, output=output, tokenizer="byte", seq_len=seq_len, use_ray=False)
    sources, sizes = open_stage_sources(datasets, output=output, tokenizer="byte", seq_len=seq_len)
    assert sizes["small"] == 40  # one padded row per shard
    pad_id = get_tokenizer("byte").pad_id

    def drawn_token_share(plan) -> float:
        source_ids, sequence_ids = MixtureSampler(plan, seed=0).draws(0, plan.total_sequences)
        real = {}
        for index, name in enumerate(plan.names):
            rows = sources[name].read(sequence_ids[source_ids == index])
            real[name] = int(np.count_nonzero(rows[:, 1:] != pad_id))
        return real["small"] / sum(real.values())

    assert drawn_token_share(plan_for_stage(spec, sizes, names, stage_tokens(sources, sizes))) == pytest.approx(
        0.5, abs=0.02
    )
    assert drawn_token_share(plan_for_stage(spec, sizes, names)) < 0.35  # weighing sequences drifts


def test_pretokenized_documents_are_packed_without_the_tokenizer(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 256, size=int(n)).tolist() for n in rng.integers(0, 50, size=60)]
    uri = (tmp_path / "tokens").as_uri()
    writer = DatasetWriter(uri, TOKEN_SEQUENCES)
    writer.write_shard(0, {"id": [str(i) for i in range(len(docs))], "tokens": docs})
    writer.finalize()
    output = (tmp_path / "cache").as_uri()
    manifest = build_token_cache(uri, output, CacheSpec(tokenizer="byte", seq_len=20), use_ray=False)
    tokenizer = get_tokenizer("byte")
    rows = np.array(open_dataset(bucket_uri(output, ALL_LENGTHS)).read_all().column("tokens").to_pylist())
    assert stream_of(rows, tokenizer.pad_id) == [t for d in docs if d for t in [*d, tokenizer.eot_id]]
    assert manifest[ALL_LENGTHS.label].summary.tokens == sum(len(d) + 1 for d in docs if d)


def test_a_dataset_of_another_schema_is_refused(tmp_path: Path) -> None:
    uri = (tmp_path / "chat").as_uri()
    writer = DatasetWriter(uri, CHAT_SAMPLES)
    writer.write_shard(0, {"id": ["a"], "messages": [[{"role": "user", "content": "hi"}]]})
    writer.finalize()
    with pytest.raises(SchemaValidationError, match="a token cache reads documents or token_sequences"):
        build_token_cache(uri, (tmp_path / "cache").as_uri(), CacheSpec(tokenizer="byte", seq_len=8), use_ray=False)
