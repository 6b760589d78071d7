"""A small corpus with planted problems and known answers, for the CorpusFilter's workload tests."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from tokenmill.store import DOCUMENTS, DatasetWriter, open_store

WORDS = (
    "the of and to in is was for on that with as by at from his her they have had this are were which be "
    "one all there their been has when who will more if out so said what up its about into than them can "
    "only other new some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long "
    "get here between both life being under never day same another know while last might us great old year "
    "off come since against go came right used take three states himself few house use during without again "
    "place american around however home small found thought went say part once general high upon school every "
    "river garden village market winter summer music painting harbour bridge mountain library kitchen letter"
).split()
BENCHMARK_ITEM = ("a farmer has seventeen sheep and all but nine run away how many sheep does the farmer "
                  "have left after the storm passes through the valley")
GERMAN = ("der die das und ist nicht ein eine mit auf für von dem den des sich auch noch nach wie über "
          "aber wenn oder weil schon sehr heute gestern morgen Katze Hund Garten Küche Kuchen Großmutter "
          "Stadt Fluss Brücke Sommer Winter spielt schläft backen fahren lesen schreiben Schule Kinder "
          "Bahnhof Zeitung Geschichte Wald Berg Wetter Regen Sonne").split()


def english(rng: random.Random, words: int = 140) -> str:
    sentences, left = [], words
    while left > 0:
        length = min(left, rng.randint(8, 16))
        sentence = " ".join(rng.choice(WORDS) for _ in range(length))
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        left -= length
    return " ".join(sentences)


@dataclass
class Corpus:
    dataset_rows: list[dict] = field(default_factory=list)
    jsonl_lines: list[bytes] = field(default_factory=list)
    kept: set[str] = field(default_factory=set)
    dropped: dict[str, tuple[str, str]] = field(default_factory=dict)
    """id -> (step, reason)."""
    partial: set[str] = field(default_factory=set)
    malformed_lines: int = 0


def build(seed: int = 11, documents: int = 60) -> Corpus:
    rng = random.Random(seed)
    corpus = Corpus()
    originals = [english(rng) for _ in range(documents)]
    for number, text in enumerate(originals):
        corpus.dataset_rows.append({"id": f"doc-{number:03d}", "text": text, "source": "web", "meta": "{}"})
        corpus.kept.add(f"doc-{number:03d}")
    for number in range(3):  # the same text with other white space: equal after normalisation
        identifier = f"exact-{number}"
        corpus.dataset_rows.append({"id": identifier, "text": originals[number].replace(" ", "  ") + "\n",
                                    "source": "web"})
        corpus.dropped[identifier] = ("exact-dedup", "exact-duplicate")
    for number in range(3, 5):  # two words of 140 changed: Jaccard of 5-grams 130/142
        words = originals[number].split()
        words[70:72] = ["zeppelin", "quartz"]
        identifier = f"near-{number}"
        corpus.dataset_rows.append({"id": identifier, "text": " ".join(words), "source": "web"})
        corpus.dropped[identifier] = ("near-dedup", "near-duplicate")
    item = BENCHMARK_ITEM.split()
    corpus.dataset_rows.append({"id": "contaminated-13", "source": "web",
                                "text": english(rng, 60) + " " + " ".join(item[:14]) + ". " + english(rng, 60)})
    corpus.dropped["contaminated-13"] = ("decontamination", "contaminated-13gram")
    broken = list(item)
    broken[12], broken[25] = "goats", "hill"  # 12 of the 21 7-grams, no 13-gram
    corpus.dataset_rows.append({"id": "contaminated-7", "source": "web",
                                "text": english(rng, 100) + " " + " ".join(broken) + "."})
    corpus.dropped["contaminated-7"] = ("decontamination", "contaminated-7gram")
    corpus.dataset_rows.append({"id": "partial", "source": "web",
                                "text": " ".join(item[:12]) + ". " + english(rng, 100)})  # 6/21 7-grams
    corpus.kept.add("partial")
    corpus.partial.add("partial")
    for number in range(2):
        identifier = f"german-{number}"
        text = " ".join(" ".join(rng.choice(GERMAN) for _ in range(12)) + "." for _ in range(12))
        corpus.dataset_rows.append({"id": identifier, "text": text, "source": "web"})
        corpus.dropped[identifier] = ("language", "language")
    corpus.dataset_rows.append({"id": "symbols", "source": "web",
                                "text": "".join(chr(rng.randint(0x2500, 0x25FF)) for _ in range(600))})
    corpus.dropped["symbols"] = ("outliers", "non-text")
    corpus.dataset_rows.append({"id": "tiny", "text": "Too short.", "source": "web"})
    corpus.dropped["tiny"] = ("outliers", "too-short")
    # the originals come first in input order, so they are the copies deduplication keeps
    planted = corpus.dataset_rows[documents:]
    rng.shuffle(planted)
    corpus.dataset_rows[documents:] = planted

    for number in range(4):
        identifier = f"jsonl-{number}"
        corpus.jsonl_lines.append(json.dumps({"id": identifier, "text": english(rng), "meta": {"n": number}}).encode())
        corpus.kept.add(identifier)
    corpus.jsonl_lines.insert(2, b'{"id": "broken", "text": ')
    corpus.malformed_lines = 1
    return corpus


def write(corpus: Corpus, root: str, shards: int = 4) -> dict[str, str]:
    """The corpus, benchmark and annotations under `root`; returns their URIs."""
    rows = corpus.dataset_rows
    uris = {"web": f"{root}/raw/web", "files": f"{root}/raw/files", "benchmark": f"{root}/bench",
            "annotations": f"{root}/annotations"}
    writer = DatasetWriter(uris["web"], DOCUMENTS)
    size = -(-len(rows) // shards)
    for shard in range(shards):
        writer.write_shard(shard, rows[shard * size:(shard + 1) * size])
    writer.finalize(expected=range(shards))
    open_store(uris["files"]).write_bytes("part-a.jsonl", b"\n".join(corpus.jsonl_lines) + b"\n")
    bench = DatasetWriter(uris["benchmark"], DOCUMENTS)
    bench.write_shard(0, [{"id": "farmer-sheep", "text": BENCHMARK_ITEM, "source": "bench"}])
    bench.finalize()
    rng = random.Random(5)
    annotations = DatasetWriter(uris["annotations"], DOCUMENTS)
    annotation_rows = []
    for number in range(80):
        good = number % 2 == 0
        text = english(rng, 60) if good else " ".join(rng.choice(["click", "buy", "free", "win"]) for _ in range(40))
        meta = {"label": 1.0, "topic": rng.choice(["history", "travel"])} if good else {"label": 0.0}
        annotation_rows.append({"id": f"ann-{number}", "text": text, "meta": json.dumps(meta)})
    annotations.write_shard(0, annotation_rows)
    annotations.finalize()
    return uris


def spec(uris: dict[str, str], **overrides) -> dict:
    document = {
        "inputs": [{"name": "web", "uri": uris["web"]}, {"name": "files", "uri": uris["files"]}],
        "languages": {"languages": ["en"], "threshold": 0.4},
        "quality": {"annotations": {"uri": uris["annotations"]}, "threshold": 0.0,
                    "nonStem": {"topics": ["history", "travel"], "keepFraction": 0.5}},
        "dedup": {"ngram": 5, "numPermutations": 128, "bands": 32, "jaccardThreshold": 0.6},
        "decontamination": {"benchmarks": [{"name": "riddles", "uri": uris["benchmark"]}],
                            "ngram": 13, "infoNgram": 7, "infoThreshold": 0.2, "contaminatedThreshold": 0.5},
        "outliers": {"minChars": 40},
        "keepDropped": True,
    }
    document.update(overrides)
    return document
