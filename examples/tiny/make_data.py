"""Writes the tiny recipe's input datasets into data/ as committed tokenmill datasets.

Deterministic: rerunning it produces the same documents. The corpus deliberately holds
what the CorpusFilter must catch: other languages, binary junk, near-duplicates, and a
few documents that quote items of the held-out evaluation set.

    python examples/tiny/make_data.py
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from tokenmill.store import DOCUMENTS, DatasetWriter

HERE = Path(__file__).resolve().parent
TOPICS = {
    "math": ["a prime number has exactly two divisors", "the sum of two even numbers is even",
             "a right triangle satisfies the theorem of Pythagoras", "multiplying by zero gives zero"],
    "science": ["water boils at one hundred degrees at sea level", "plants turn light into sugar",
                "the moon orbits the earth about once a month", "sound travels faster in water than in air"],
    "history": ["the printing press spread books across Europe", "ancient Rome built roads and aqueducts",
                "the silk road linked China with the Mediterranean", "the first railways carried coal"],
    "travel": ["the old town has narrow streets and a busy market", "the coastal path follows the cliffs",
               "trains cross the mountains through long tunnels", "the harbour fills with boats at dawn"],
}
CONNECTIVES = ["In other words,", "For example,", "This means that", "Students often learn that",
               "It is worth noting that", "A simple check shows that"]
NAMES = ["Sam", "Mia", "Leo", "Ava", "Noah", "Zoe"]
OBJECTS = ["apples", "pens", "cards", "shells", "stamps", "marbles"]
# Single-digit sums: the (a, b) pairs of the held-out evaluation never occur in training.
PAIRS = [(a, b) for a in range(1, 10) for b in range(1, 10)]
EVAL_PAIRS = set(random.Random(99).sample(PAIRS, 20))
GERMAN = "Die Katze schläft auf dem Sofa und der Hund spielt im Garten mit dem Ball. "
FRENCH = "Le chat dort sur le canapé et le chien joue dans le jardin avec la balle. "


def english_document(rng: random.Random, topic: str) -> str:
    facts = TOPICS[topic]
    sentences = []
    for _ in range(rng.randint(8, 20)):
        fact = rng.choice(facts)
        sentences.append(f"{rng.choice(CONNECTIVES)} {fact}.")
    return " ".join(sentences)


def raw_documents(rng: random.Random) -> list[dict]:
    documents = []
    for index in range(600):
        topic = rng.choice(sorted(TOPICS))
        documents.append({"text": english_document(rng, topic), "source": "web", "lang": "en",
                          "meta": json.dumps({"topic": topic})})
    documents += [{"text": GERMAN * 12, "source": "web", "lang": "de", "meta": "{}"} for _ in range(20)]
    documents += [{"text": FRENCH * 12, "source": "web", "lang": "fr", "meta": "{}"} for _ in range(20)]
    junk = ["".join(chr(rng.randint(0x2500, 0x25FF)) for _ in range(800)) for _ in range(15)]
    documents += [{"text": text, "source": "web", "lang": "und", "meta": "{}"} for text in junk]
    documents += [dict(documents[i]) for i in range(0, 60, 3)]  # exact duplicates
    # Web pages that quote evaluation items: decontamination must drop them.
    leak_rng = random.Random(5)
    documents += [
        {"text": f"{english_document(leak_rng, 'math')} {row['text']} {english_document(leak_rng, 'math')}",
         "source": "web", "lang": "en", "meta": "{}"}
        for row in evaluation_set()[:4]
    ]
    rng.shuffle(documents)
    return [{"id": f"raw-{i:05d}", **doc} for i, doc in enumerate(documents)]


def annotations(rng: random.Random) -> list[dict]:
    rows = []
    for index in range(200):
        topic = rng.choice(sorted(TOPICS))
        good = rng.random() < 0.5
        text = english_document(rng, topic) if good else " ".join(rng.choice(["click", "buy", "now", "free"])
                                                                  for _ in range(60))
        label = {"label": 1.0, "topic": topic} if good else {"label": 0.0}
        rows.append({"id": f"ann-{index:04d}", "text": text, "source": "annotations", "lang": "en",
                     "meta": json.dumps(label)})
    return rows


def word_problem(rng: random.Random, a: int, b: int) -> str:
    name, thing = rng.choice(NAMES), rng.choice(OBJECTS)
    return f"{name} has {a} {thing} and buys {b} more {thing} at the market. How many {thing} does {name} have now?"


def word_problems(rng: random.Random, pairs: list[tuple[int, int]], prefix: str) -> list[dict]:
    """Math problems as documents; the oracle's ground truth is meta.answer."""
    return [{"id": f"{prefix}-{i:03d}", "text": word_problem(rng, a, b), "source": prefix, "lang": "en",
             "meta": json.dumps({"answer": str(a + b)})}
            for i, (a, b) in enumerate(pairs)]


def evaluation_set() -> list[dict]:
    return word_problems(random.Random(7), sorted(EVAL_PAIRS), "eval")


def training_pairs(rng: random.Random, count: int) -> list[tuple[int, int]]:
    pool = [pair for pair in PAIRS if pair not in EVAL_PAIRS]
    return [rng.choice(pool) for _ in range(count)]


def write(name: str, rows: list[dict], shard_rows: int = 256) -> None:
    target = HERE / "data" / name
    shutil.rmtree(target, ignore_errors=True)
    writer = DatasetWriter(target.as_uri(), DOCUMENTS)
    shards = range(0, len(rows), shard_rows)
    for number, start in enumerate(shards):
        writer.write_shard(number, rows[start:start + shard_rows])
    writer.finalize(expected=range(len(shards)))
    print(f"wrote {len(rows)} documents to {target}")


def main() -> None:
    rng = random.Random(1234)
    write("raw", raw_documents(rng))
    write("annotations", annotations(rng))
    # Seeds of the synthetic math data (the teacher's worked solutions become the SFT set), and
    # the problems Pivotal Token Search searches on.
    write("seeds", word_problems(rng, training_pairs(rng, 480), "seed"))
    write("problems", word_problems(rng, training_pairs(rng, 32), "prob"))
    # The held-out evaluation set; the CorpusFilter decontaminates the corpus against it.
    write("eval", evaluation_set())


if __name__ == "__main__":
    main()
