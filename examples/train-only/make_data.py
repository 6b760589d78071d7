"""Writes the example's document dataset: varied English text composed from templates.

Deterministic (a fixed seed): `python examples/train-only/make_data.py` rewrites
`examples/train-only/data/docs/` with the same documents (shard file names carry a write id). About 3 MB (10,000 documents) of text in a committed
`documents` dataset (Parquet shards and `_manifest.json`).
"""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

from tokenmill.store import DOCUMENTS, DatasetWriter

HERE = Path(__file__).resolve().parent
SEED = 4
DOCUMENTS_PER_SHARD = 500

PEOPLE = ["Ada", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
          "Kamala", "Luis", "Mei", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Sven", "Tamar"]
PLACES = ["the harbour", "the old library", "the mountain village", "the river market", "the train station",
          "the university garden", "the bakery on the corner", "the quiet museum", "the city park", "the lighthouse"]
THINGS = ["a red bicycle", "an old map", "a wooden box", "a brass key", "a small notebook", "a paper lantern",
          "a blue umbrella", "a silver watch", "a basket of apples", "a letter without a stamp"]
FEELINGS = ["curious", "tired", "hopeful", "nervous", "cheerful", "thoughtful", "surprised", "calm"]
WEATHER = ["It was raining softly", "The sun was warm", "A cold wind blew from the sea", "Snow covered the roofs",
           "The sky was grey and still", "Fog hid the end of the street"]
VERBS = ["found", "carried", "repaired", "painted", "lost", "opened", "borrowed", "returned"]
SUBJECTS = ["water", "light", "sound", "plants", "bridges", "bees", "clouds", "magnets", "volcanoes", "rivers"]
FACTS = {
    "water": ["Water boils at one hundred degrees Celsius at sea level.", "Ice floats because it is less dense than liquid water."],
    "light": ["Light travels faster than anything else we know.", "A prism splits white light into many colours."],
    "sound": ["Sound needs air, water or another material to travel.", "Sound moves faster in water than in air."],
    "plants": ["Plants use sunlight to turn water and air into sugar.", "Roots take water and minerals from the soil."],
    "bridges": ["An arch bridge pushes its weight outwards into the banks.", "A suspension bridge hangs from long steel cables."],
    "bees": ["Bees carry pollen from flower to flower.", "A honey bee dances to tell others where food is."],
    "clouds": ["Clouds are made of tiny drops of water or ice.", "Dark clouds are thick enough to block the sunlight."],
    "magnets": ["Every magnet has a north pole and a south pole.", "Opposite poles attract and like poles repel."],
    "volcanoes": ["A volcano is an opening where melted rock reaches the surface.", "Some volcanoes sleep for thousands of years."],
    "rivers": ["Rivers carry sand and stones down to the sea.", "A river bends more as the land becomes flat."],
}


def story(rng: random.Random) -> str:
    name, friend = rng.sample(PEOPLE, 2)
    place, thing = rng.choice(PLACES), rng.choice(THINGS)
    sentences = [f"{rng.choice(WEATHER)} when {name} walked to {place}."]
    for _ in range(rng.randint(4, 9)):
        sentences.append(rng.choice([
            f"{name} {rng.choice(VERBS)} {thing} and felt {rng.choice(FEELINGS)}.",
            f"{friend} asked, \"Where did you get {thing}?\"",
            f"\"I {rng.choice(VERBS)} it near {rng.choice(PLACES)},\" said {name}.",
            f"Later that day {friend} {rng.choice(VERBS)} {rng.choice(THINGS)} at {rng.choice(PLACES)}.",
            f"They were {rng.choice(FEELINGS)}, so they sat down and talked for a while.",
        ]))
    sentences.append(f"In the evening {name} and {friend} went home, {rng.choice(FEELINGS)} and happy.")
    return " ".join(sentences)


def lesson(rng: random.Random) -> str:
    subject = rng.choice(SUBJECTS)
    facts = list(FACTS[subject])
    rng.shuffle(facts)
    lines = [f"Lesson: {subject.capitalize()}", "", f"Today we learn about {subject}."]
    lines += facts
    lines.append(f"Question: what did you learn about {subject}? Answer: {facts[0]}")
    return "\n".join(lines)


def arithmetic(rng: random.Random) -> str:
    lines = ["Practice sums:"]
    for _ in range(rng.randint(5, 12)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"{a} + {b} = {a + b}")
    return "\n".join(lines)


def recipe(rng: random.Random) -> str:
    fruit = rng.choice(["apple", "pear", "plum", "cherry", "lemon"])
    minutes = rng.choice([20, 25, 30, 40])
    return (f"How to bake a {fruit} cake. Mix flour, sugar and two eggs. Add the chopped {fruit}. "
            f"Pour the batter into a tin and bake for {minutes} minutes. Let it cool before you cut it.")


def documents(count: int, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    makers = [story, story, lesson, arithmetic, recipe]
    return [rng.choice(makers)(rng) for _ in range(count)]


def write(target: Path, count: int) -> int:
    if target.exists():
        shutil.rmtree(target)
    texts = documents(count)
    writer = DatasetWriter(target.as_uri(), DOCUMENTS)
    for shard, start in enumerate(range(0, len(texts), DOCUMENTS_PER_SHARD)):
        rows = [{"id": f"doc-{i:06d}", "text": text, "source": "train-only-example", "lang": "en", "meta": "{}"}
                for i, text in enumerate(texts[start:start + DOCUMENTS_PER_SHARD], start=start)]
        writer.write_shard(shard, rows, tokens=sum(len(r["text"].encode()) for r in rows))
    writer.finalize()
    return sum(len(t.encode()) for t in texts)


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    size = write(HERE / "data" / "docs", count)
    print(f"wrote {count} documents, {size:,} bytes of text, to {HERE / 'data' / 'docs'}")
