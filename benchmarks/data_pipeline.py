"""Benchmark 2: packed tokens/s per core through our tokenize+pack path against raw tiktoken.

Both sides run on one thread (tiktoken's batch encoder with ``num_threads=1``), on the same few
MB of generated text (prose, code, tables, several languages), in the same process, best of
several alternating rounds, timed in process CPU seconds. Ours is exactly what a token-cache
task runs on a shard: `cache.text_batches` (`Phi4Tokenizer.encode_batch`, flattened to numpy)
and `cache.pack_token_batches` (documents joined with end-of-text, cut into rows of
seq_len + 1, the last row padded). Raw is ``tiktoken.Encoding.encode_ordinary_batch`` alone.
The target is at least 80% of raw.

    python benchmarks/data_pipeline.py [--megabytes 4] [--seq-len 4096] [--rounds 5]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence

from tokenmill.trainer.data.cache import CacheSpec, pack_token_batches, text_batches
from tokenmill.trainer.data.midtrain import ALL_LENGTHS
from tokenmill.trainer.tokenizer import get_tokenizer

TARGET_RATIO = 0.8
BATCH_DOCUMENTS = 256

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


def rate(run: Callable[[], int]) -> float:
    """Tokens per CPU-second of one call of ``run`` (which returns the tokens it processed).

    Process CPU time (all threads) is what "per core" means, and unlike wall time it does not
    count the time other processes on a shared machine take the core away.
    """
    start = time.process_time()
    tokens = run()
    return tokens / (time.process_time() - start)


def batches(documents: Sequence[str]) -> list[Sequence[str]]:
    return [documents[i : i + BATCH_DOCUMENTS] for i in range(0, len(documents), BATCH_DOCUMENTS)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=4.0)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    tokenizer = get_tokenizer("phi-4")
    encoding = tokenizer.encoding
    documents = make_corpus(args.megabytes)
    chunks = batches(documents)
    spec = CacheSpec(tokenizer="phi-4", seq_len=args.seq_len)

    def raw() -> int:
        return sum(len(ids) for chunk in chunks for ids in encoding.encode_ordinary_batch(list(chunk), num_threads=1))

    def ours() -> int:
        """Text tokens that reached packed rows (counted from the rows, so nothing is skipped)."""
        packed = pack_token_batches(text_batches(chunks, tokenizer), tokenizer.eot_id, tokenizer.pad_id, spec)
        return packed[ALL_LENGTHS.label].tokens - len(documents)  # minus one EOT per document

    raw_tokens, our_tokens = raw(), ours()  # warm-up (tokenizer caches, allocator) and a check
    if raw_tokens != our_tokens:
        raise SystemExit(f"packing lost or added tokens: raw {raw_tokens:,}, packed {our_tokens:,}")
    raw_rates, our_rates = [], []
    for _ in range(args.rounds):  # alternate, so drift in machine load hits both sides
        raw_rates.append(rate(raw))
        our_rates.append(rate(ours))
    raw_rate, our_rate = max(raw_rates), max(our_rates)
    ratio = our_rate / raw_rate
    megabytes = sum(len(d.encode("utf-8")) for d in documents) / 1e6
    print(
        f"corpus: {len(documents):,} documents, {megabytes:.1f} MB, {raw_tokens:,} tokens, "
        f"seq_len {args.seq_len}, 1 thread"
    )
    print(f"raw tiktoken encode_ordinary_batch: {raw_rate / 1e6:.3f} M tokens/s per core")
    print(f"tokenize + pack (ours):             {our_rate / 1e6:.3f} M tokens/s per core")
    print(f"ratio: {ratio:.1%} (target >= {TARGET_RATIO:.0%}) -> {'PASS' if ratio >= TARGET_RATIO else 'FAIL'}")
    if ratio < TARGET_RATIO:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
