"""The CorpusFilter's steps on crafted documents with known answers."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pytest

from tokenmill.api.corpus import OutlierFilter
from tokenmill.store import DOCUMENTS, DatasetWriter
from tokenmill.trainer.curate import dedup, quality, steps
from tokenmill.trainer.curate.decontaminate import (
    BenchmarkError,
    BenchmarkItem,
    Thresholds,
    allow_list_hashes,
    build_index,
    decontaminate,
)
from tokenmill.trainer.curate.inputs import InputError, plan_inputs, read_unit
from tokenmill.trainer.curate.langid import load_identifier
from tokenmill.trainer.curate.text import split_words

ENGLISH = ("The museum opened a new gallery about the history of sailing ships, with models, maps and "
           "letters written by sailors who crossed the ocean two centuries ago. ")
ITEM = ("natalia sold clips to forty eight of her friends in april and then she sold half as many "
        "clips in may how many clips did natalia sell altogether")
OTHER_ITEM = "which of the following best describes the function of the mitochondria in a eukaryotic cell"


# -- outliers -------------------------------------------------------------------------------

def test_outliers_drop_each_kind_of_junk_with_its_reason():
    rng = random.Random(0)
    texts = {
        "good": " ".join(rng.choice(ENGLISH.split()) + rng.choice(["", "s", "ed"]) for _ in range(120)),
        "short": "Too short.",
        "symbols": "".join(chr(rng.randint(0x2500, 0x25FF)) for _ in range(400)),
        "repeated": "buy cheap pills now " * 40,
        "random": "".join(chr(rng.randint(33, 126)) for _ in range(600)),
    }
    spec = OutlierFilter(min_chars=100, max_top_ngram_fraction=0.3)
    verdicts = steps.outliers(steps.normalise_documents(pa.array(list(texts.values()))), spec)
    reasons = dict(zip(texts, verdicts.reasons))
    assert reasons == {"good": "", "short": "too-short", "symbols": "non-text", "repeated": "repetition",
                       "random": "low-compression-ratio"}
    evidence = dict(zip(texts, verdicts.evidence))
    assert evidence["short"] == {"chars": 10}
    assert evidence["repeated"]["topNgramFraction"] > 0.3


def test_top_ngram_fraction_is_the_share_covered_by_the_most_frequent_trigram():
    # "a b c" appears twice in 8 one-letter words: 2 * 3 characters of 8
    fraction = steps.top_ngram_fraction(pa.array(["a b c a b c d e", "one two three four"]))
    assert fraction[0] == pytest.approx(6 / 8)
    assert fraction[1] == 0.0


def test_normalisation_unifies_unicode_and_white_space():
    text = "Cafe\u0301 \u200bmenu\r\nline two   \n\n\n\nend  "
    assert steps.normalise_documents(pa.array([text])).to_pylist() == ["Café menu\nline two\n\nend"]
    assert steps.normalise_documents(pa.array([text]), "plain").to_pylist() == ["Café menu line two end"]


# -- language -------------------------------------------------------------------------------

def test_language_identification_with_the_bundled_lid176_model():
    texts = [ENGLISH,
             "Die Katze schläft auf dem Sofa, während der Hund im Garten mit einem roten Ball spielt.",
             "Le chat dort sur le canapé pendant que le chien joue dans le jardin avec une balle rouge.",
             "El gato duerme en el sofá mientras el perro juega en el jardín con una pelota roja.",
             "猫はソファで寝ていて、犬は庭で赤いボールで遊んでいます。"]
    verdicts = steps.language(texts, load_identifier(), ["en", "de"], threshold=0.5)
    assert list(verdicts.recorded["lang"]) == ["en", "de", "fr", "es", "ja"]
    assert verdicts.reasons == ["", "", "language", "language", "language"]
    assert all(score > 0.5 for score in verdicts.recorded["lang_score"])
    strict = steps.language(texts[:1], load_identifier(), ["en"], threshold=1.0)
    assert strict.reasons == ["low-language-score"]


# -- deduplication --------------------------------------------------------------------------

def shingles(words: list[str], n: int = 5) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: list[str], b: list[str]) -> float:
    return len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))


def test_near_duplicates_are_clustered_by_jaccard_on_both_sides_of_the_threshold():
    base = [f"w{i}" for i in range(300)]
    close = base[:285] + [f"x{i}" for i in range(15)]     # Jaccard ~0.88: a duplicate at 0.8
    far = base[:230] + [f"y{i}" for i in range(70)]       # Jaccard ~0.59: not one
    unrelated = [f"z{i}" for i in range(300)]
    close_of_close = close[:295] + ["q1", "q2", "q3", "q4", "q5"]  # near `close`, joins its cluster
    documents = [base, close, far, unrelated, close_of_close]
    assert jaccard(base, close) > 0.85 and jaccard(base, far) < 0.65
    words = split_words(pa.array([" ".join(d) for d in documents]))
    signature, has = dedup.signatures(words, 5, 128)
    assert has.all()
    duplicates = dedup.near_duplicates(signature, bands=16, threshold=0.8)
    assert {(d.index, d.kept) for d in duplicates} == {(1, 0), (4, 0)}
    assert all(0.8 <= d.similarity <= 1.0 for d in duplicates)


def test_signatures_do_not_depend_on_how_documents_are_batched():
    texts = [" ".join(f"t{(i * 7 + j) % 97}" for j in range(50 + i)) for i in range(20)]
    together, _ = dedup.signatures(split_words(pa.array(texts)), 5, 64)
    apart = np.vstack([dedup.signatures(split_words(pa.array([t])), 5, 64)[0] for t in texts])
    assert (together == apart).all()


def test_exact_duplicates_keep_the_first_copy():
    hashes = np.array([dedup.content_hash(t) for t in ["a", "b", "a", "c", "b", "a"]], dtype=np.uint64)
    assert {(d.index, d.kept) for d in dedup.exact_duplicates(hashes)} == {(2, 0), (4, 1), (5, 0)}


# -- decontamination ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def benchmark_index():
    return build_index([BenchmarkItem("gsm8k", "q1", ITEM), BenchmarkItem("mmlu", "q2", OTHER_ITEM)], 13, 7)


FILLER = " ".join(f"filler{i}" for i in range(40))


def test_contamination_levels_of_the_hybrid_rule(benchmark_index):
    words = ITEM.split()  # 28 words: 22 distinct 7-grams
    broken = list(words)
    broken[12], broken[25] = "zebra", "yak"  # no 13 item words in a row are left
    documents = {
        # 13 consecutive item words (punctuation and case do not matter)
        "13-gram": "Homework: " + " ".join(words[:13]).upper() + "! " + FILLER,
        # 12 of the item's 22 7-grams but no 13-gram: ratio 12/22
        "7-gram contaminated": " ".join(broken),
        # 5 of the item's 7-grams in a document of 11: ratio 5/11 -> partial
        "7-gram partial": " ".join(words[:11]) + " lorem ipsum dolor sit amet consectetur",
        "clean": "unrelated text about rivers and mountains " + FILLER,
    }
    verdicts = decontaminate(pa.array(list(documents.values())), benchmark_index, Thresholds(0.2, 0.5))
    by_name = dict(zip(documents, verdicts))
    assert by_name["13-gram"][0] == "contaminated-13gram"
    assert by_name["13-gram"][1] == {"benchmark": "gsm8k", "item": "q1", "ngram": " ".join(words[:13])}
    assert by_name["7-gram contaminated"][0] == "contaminated-7gram"
    assert by_name["7-gram contaminated"][1]["ratio"] == pytest.approx(12 / 22, abs=1e-4)
    verdict, evidence = by_name["7-gram partial"]
    assert verdict == "partial" and evidence["item"] == "q1" and 0.2 < evidence["ratio"] < 0.5
    assert evidence["ratio"] == pytest.approx(5 / 11, abs=1e-4)
    assert by_name["clean"] == ("clean", None)


def test_an_allow_listed_13gram_falls_through_to_the_7gram_test(benchmark_index):
    words = ITEM.split()
    boilerplate = " ".join(words[:13])
    document = f"{boilerplate} " + FILLER  # one shared 13-gram; 7 shared 7-grams, min(47, 22) = 22
    allow = allow_list_hashes([boilerplate], 13, "test")
    assert decontaminate(pa.array([document]), benchmark_index, Thresholds(0.2, 0.5))[0][0] == "contaminated-13gram"
    verdict, evidence = decontaminate(pa.array([document]), benchmark_index, Thresholds(0.2, 0.5), allow=allow)[0]
    assert verdict == "partial" and evidence["ratio"] == pytest.approx(7 / 22, abs=1e-4)
    assert decontaminate(pa.array([document]), benchmark_index, Thresholds(0.4, 0.5), allow=allow)[0] == ("clean", None)


def test_benchmark_13grams_common_in_the_input_are_allow_listed(benchmark_index):
    words = ITEM.split()
    common = " ".join(words[:13])
    documents = [f"{common} {FILLER} {i}" for i in range(3)] + [" ".join(words[5:18]) + " " + FILLER]
    verdicts = decontaminate(pa.array(documents), benchmark_index, Thresholds(0.5, 0.9), allow_min_documents=3)
    assert [v for v, _ in verdicts] == ["clean", "clean", "clean", "contaminated-13gram"]


def test_a_benchmark_item_too_short_for_the_ngram_test_is_an_error():
    with pytest.raises(BenchmarkError, match="'arc' item 'a7' has 3 words"):
        build_index([BenchmarkItem("arc", "a7", "blue green red")], 13, 7)


# -- quality --------------------------------------------------------------------------------

def annotation_rows(count: int = 200) -> list[dict]:
    rng = random.Random(3)
    topics = {"math": "prime numbers divide evenly and the proof uses induction on the exponent",
              "history": "the empire built roads and the senate debated the new taxes of the provinces",
              "travel": "the coastal path follows the cliffs to a harbour full of fishing boats"}
    rows = []
    for i in range(count):
        topic = rng.choice(sorted(topics))
        if i % 2:
            text = " ".join(rng.sample(topics[topic].split(), 10)) + " " + topics[topic]
            meta = {"label": 0.8 + 0.2 * rng.random(), "topic": topic}
        else:
            text = " ".join(rng.choice(["click", "buy", "now", "free", "win", "deal"]) for _ in range(30))
            meta = {"label": 0.2 * rng.random()}
        rows.append({"id": f"a{i}", "text": text, "meta": json.dumps(meta)})
    return rows


def test_the_quality_classifier_learns_the_annotations_and_round_trips_through_the_store(tmp_path):
    texts, labels, topics = quality.labelled_rows(annotation_rows(), "annotations")
    model = quality.train(texts, labels, topics)
    assert model.metrics["heldOutAccuracy"] >= 0.95 and model.metrics["heldOutF1"] >= 0.95
    assert set(model.topics) == {"math", "history", "travel"}
    probe = ["the senate debated taxes and the empire built roads across the provinces",
             "free deal click now win buy"]
    uri = quality.save(model, (tmp_path / "quality").as_uri())
    loaded = quality.load(uri)
    assert np.allclose(loaded.score(probe), model.score(probe))
    assert loaded.score(probe)[0] > 0.5 > loaded.score(probe)[1]
    assert loaded.topic(probe[:1]) == ["history"]


def test_annotations_without_labels_are_an_error_naming_the_row():
    with pytest.raises(quality.AnnotationError, match="row 1 .*'b'.* no numeric label"):
        quality.labelled_rows([{"id": "a", "text": "x", "meta": '{"label": 1}'}, {"id": "b", "text": "y"}],
                              "annotations")


# -- inputs ---------------------------------------------------------------------------------

def test_jsonl_and_parquet_files_under_a_prefix_and_malformed_lines(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(b'{"id": "1", "text": "hello"}\n{not json\n{"id": "3", "text": 5}\n'
                                     b'{"id": "4", "text": "caf\\ud800"}\n\xff\xfe\n')
    pa.parquet.write_table(pa.table({"text": ["from parquet"]}), folder / "b.parquet")
    units = plan_inputs([("raw", folder.as_uri())])
    assert [u.kind for u in units] == ["jsonl", "parquet"]
    table, reasons = read_unit(units[0])
    assert reasons == ["", "invalid-json", "text-not-a-string", "invalid-utf8", "invalid-utf8"]
    assert table.column("text").to_pylist()[0] == "hello"
    table, reasons = read_unit(units[1])
    assert table.column("text").to_pylist() == ["from parquet"] and reasons == [""]


def test_bad_inputs_are_errors_before_any_work(tmp_path):
    with pytest.raises(InputError, match="neither a committed dataset"):
        plan_inputs([("missing", (tmp_path / "nothing").as_uri())])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="x.parquet is not a readable Parquet file"):
        plan_inputs([("broken", (tmp_path / "broken").as_uri())])
    empty = DatasetWriter((tmp_path / "empty").as_uri(), DOCUMENTS)
    empty.write_shard(0, DOCUMENTS.arrow.empty_table())
    empty.finalize()
    with pytest.raises(InputError, match="hold no documents"):
        plan_inputs([("empty", (tmp_path / "empty").as_uri())])
    lost = DatasetWriter((tmp_path / "lost").as_uri(), DOCUMENTS)
    info = lost.write_shard(0, [{"id": "1", "text": "x"}])
    lost.finalize()
    (tmp_path / "lost" / info.path).unlink()
    with pytest.raises(InputError, match="shard part-000000 .* is missing"):
        plan_inputs([("lost", (tmp_path / "lost").as_uri())])
