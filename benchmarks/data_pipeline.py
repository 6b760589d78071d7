"""Benchmark 2: a token-cache task end to end against raw tiktoken over the same Parquet input.

Input: a committed ``documents`` dataset of a few MB of generated text (prose, code, tables,
several languages) in several Parquet shards. Ours is `build_token_cache` as a stage's driver
runs it on each shard (here in-process, no Ray): read the shard's Parquet through the store,
tokenize (`Phi4Tokenizer`), join documents with end-of-text, cut rows of seq_len + 1, build
the Arrow table and write and commit the ``token_sequences`` shard and the manifest. Raw is
the same Parquet read with pyarrow and ``tiktoken.Encoding.encode_ordinary_batch`` on one
thread, nothing written. Both run on one thread in one process, alternating, timed in
process CPU seconds; the figure is the median of the per-round ratios with its range.
The target is at least 85% of raw.

    python benchmarks/data_pipeline.py [--megabytes 4] [--shards 4] [--seq-len 4096] [--rounds 5]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from tokenmill.store import DOCUMENTS, DatasetWriter, open_dataset
from tokenmill.trainer.data.cache import CacheSpec, build_token_cache
from tokenmill.trainer.data.midtrain import ALL_LENGTHS
from tokenmill.trainer.tokenizer import get_tokenizer

TARGET_RATIO = 0.85

WORDS = {
    "en": "the of and to in is that for it as was with be by on not he this are or his from at which "
    "model training data token sequence gradient learning rate batch layer attention memory network "
    "history travel culture river mountain village market season harvest library museum orchestra".split(),
    "de": "der die das und ist nicht mit für auf eine Straße Mädchen größer über Wissenschaft Zeitung "
    "Universität Forschung Geschichte Bahnhof Frühstück".split(),
    "fr": "le la les et est une pour dans avec être été déjà très où garçon français société "
    "économie théâtre hôpital château".split(),
    "pt": "o a os as e é um uma para com não são informação ciência coração ação também região".split(),
    "vi": "và của là có không người một những được trong cho này với các đã Việt Nam học".split(),
    "zh": "的 一 是 在 不 了 有 和 人 这 中 大 为 上 个 国 我 以 要 他 数据 模型 训练 语言 学习".split(),
    "ja": "の に は を た が で て と し れ さ ある いる 東京 日本語 学習 モデル".split(),
    "hi": "और के है में की को से यह एक पर भारत भाषा".split(),
}
IDENTIFIERS = "x y i j n count total index value result items data config batch tokens".split()


def prose(rng: random.Random, language: str, words: int) -> str:
    vocabulary = WORDS[language]
    joiner = "" if language in ("zh", "ja") else " "
    sentences, left = [], words
    while left > 0:
        length = min(left, rng.randint(5, 25))
        sentence = joiner.join(rng.choice(vocabulary) for _ in range(length))
        sentences.append(sentence[:1].upper() + sentence[1:] + rng.choice([".", ".", "?", "!", ";"]))
        left -= length
    paragraphs = [" ".join(sentences[i : i + 5]) for i in range(0, len(sentences), 5)]
    return "\n\n".join(paragraphs)


def code(rng: random.Random, functions: int) -> str:
    lines = []
    for f in range(functions):
        a, b = rng.sample(IDENTIFIERS, 2)
        lines += [
            f"def compute_{a}_{f}({a}: int, {b}: list[int]) -> int:",
            f'    """Return the {a} of {b} after {rng.randint(2, 99)} passes."""',
            f"    {a} = sum({b}[:{rng.randint(1, 64)}]) * {rng.random():.4f}",
            f"    for i in range({rng.randint(1, 1000)}):",
            f"        if i % {rng.randint(2, 9)} == 0:",
            f"            {a} += {b}[i % len({b})] ** 2  # {rng.choice(WORDS['en'])}",
            f"    return int({a})",
            "",
        ]
    return "\n".join(lines)


def table(rng: random.Random, rows: int) -> str:
    header = "| year | city | population | growth % | note |\n| --- | --- | --- | --- | --- |"
    body = [
        f"| {rng.randint(1900, 2024)} | {rng.choice(WORDS['en']).title()} | {rng.randint(1000, 9_999_999):,} | "
        f"{rng.uniform(-5, 5):+.2f} | {rng.choice(WORDS['fr'])} |"
        for _ in range(rows)
    ]
    return "\n".join([header, *body])


def make_corpus(megabytes: float, seed: int = 0) -> list[str]:
    """Documents of varied kinds and lengths, about ``megabytes`` of UTF-8 in all."""
    rng = random.Random(seed)
    documents, size = [], 0
    while size < megabytes * 1_000_000:
        kind = rng.random()
        if kind < 0.55:
            text = prose(rng, "en", rng.randint(50, 3000))
        elif kind < 0.75:
            text = prose(rng, rng.choice(sorted(set(WORDS) - {"en"})), rng.randint(50, 2000))
        elif kind < 0.92:
            text = code(rng, rng.randint(1, 30))
        else:
            text = table(rng, rng.randint(3, 200))
        documents.append(text)
        size += len(text.encode("utf-8"))
    return documents


def cpu_seconds(run: Callable[[], int]) -> tuple[float, int]:
    """Process CPU seconds (all threads) of one call of ``run``, and the tokens it returned."""
    start = time.process_time()
    tokens = run()
    return time.process_time() - start, tokens


def write_corpus(uri: str, documents: list[str], shards: int) -> None:
    writer = DatasetWriter(uri, DOCUMENTS)
    per_shard = -(-len(documents) // shards)
    for shard in range(shards):
        texts = documents[shard * per_shard : (shard + 1) * per_shard]
        writer.write_shard(shard, {"id": [f"{shard}-{i}" for i in range(len(texts))], "text": texts})
    writer.finalize(expected=range(shards))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=4.0)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    encoding = get_tokenizer("phi-4").encoding
    documents = make_corpus(args.megabytes)
    work = Path(tempfile.mkdtemp(prefix="tokenmill-bench-"))
    try:
        corpus_uri = (work / "docs").as_uri()
        write_corpus(corpus_uri, documents, args.shards)
        corpus = open_dataset(corpus_uri)
        files = [work / "docs" / shard.path for shard in corpus.shards]
        spec = CacheSpec(tokenizer="phi-4", seq_len=args.seq_len, name="bench")
        batch_rows = spec.documents_per_batch

        def raw() -> int:
            tokens = 0
            for path in files:
                table = pq.read_table(path, columns=["text"])
                for batch in table.to_batches(max_chunksize=batch_rows):
                    tokens += sum(map(len, encoding.encode_ordinary_batch(batch.column(0).to_pylist(), num_threads=1)))
            return tokens

        outputs = iter(range(10**6))

        def ours() -> int:
            """Text tokens in the committed cache (its manifest's count minus one EOT per document)."""
            output = (work / f"cache-{next(outputs)}").as_uri()
            manifests = build_token_cache(corpus_uri, output, spec, use_ray=False)
            return int(manifests[ALL_LENGTHS.label].summary.tokens) - len(documents)

        raw_tokens, our_tokens = raw(), ours()  # warm-up (tokenizer caches, allocator) and a check
        if raw_tokens != our_tokens:
            raise SystemExit(f"the cache lost or added tokens: raw {raw_tokens:,}, cached {our_tokens:,}")
        raw_seconds, our_seconds = [], []
        for round_index in range(args.rounds):  # alternate, so drift in machine load hits both sides
            sides = [(raw, raw_seconds), (ours, our_seconds)]
            for run, seconds in sides if round_index % 2 == 0 else sides[::-1]:
                seconds.append(cpu_seconds(run)[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratios = [r / o for r, o in zip(raw_seconds, our_seconds, strict=True)]
    ratio = statistics.median(ratios)
    megabytes = sum(len(d.encode("utf-8")) for d in documents) / 1e6
    print(
        f"corpus: {len(documents):,} documents, {megabytes:.1f} MB in {args.shards} Parquet shards, "
        f"{raw_tokens:,} tokens, seq_len {args.seq_len}, 1 thread, {args.rounds} alternating rounds"
    )
    print(f"raw (Parquet read + tiktoken encode_ordinary_batch): "
          f"{raw_tokens / statistics.median(raw_seconds) / 1e6:.3f} M tokens per CPU-second")
    print(f"build_token_cache end to end (ours):                  "
          f"{raw_tokens / statistics.median(our_seconds) / 1e6:.3f} M tokens per CPU-second")
    print(f"ratio: {ratio:.1%} (range {min(ratios):.1%}-{max(ratios):.1%}; target >= {TARGET_RATIO:.0%}) -> "
          f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'}")
    if ratio < TARGET_RATIO:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
