"""The quality classifier and the non-STEM topic classifier, trained from LLM-written annotations.

Both are linear models over hashed word 1- and 2-grams (scikit-learn's `HashingVectorizer`,
2**20 features, and logistic regression trained with SGD): no vocabulary to store, so the
saved model is just its weights. Annotations are rows with `text` and `label` in [0, 1]
(a column, or a key of the `meta` JSON as in `documents` datasets); labels of 0.5 and above
are "good". A row's `topic` (column or meta key) trains the topic classifier. A fifth of
the rows (chosen by a hash of the text, so reruns agree) is held out to report accuracy and
F1. The model is saved as `classifier.npz` (numpy arrays only, loaded without pickle) and
`classifier.json` (settings and held-out figures) under `<output>/quality/`, and can be
reused by URI.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FEATURES = 2**20
NGRAM_RANGE = (1, 2)
HELD_OUT_FRACTION = 0.2
MODEL_NAME = "classifier.npz"
CARD_NAME = "classifier.json"
NO_TOPIC = ""


class AnnotationError(ValueError):
    """Annotations that cannot train a classifier; names the dataset and the problem."""


def _vectorizer():
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(n_features=FEATURES, ngram_range=NGRAM_RANGE, alternate_sign=False,
                             norm="l2", lowercase=True, dtype=np.float32)


def _held_out(texts: Sequence[str]) -> np.ndarray:
    digest = [hashlib.blake2b(t.encode("utf-8", "replace"), digest_size=2).digest() for t in texts]
    return np.array([int.from_bytes(d, "little") / 65536 < HELD_OUT_FRACTION for d in digest])


@dataclass
class QualityModel:
    coef: np.ndarray
    intercept: float
    topic_coef: np.ndarray | None = None
    topic_intercept: np.ndarray | None = None
    topics: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Probability that each text is good (0 to 1)."""
        features = _vectorizer().transform(texts)
        logits = features @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))

    def topic(self, texts: Sequence[str]) -> list[str]:
        """The most likely topic of each text ('' when no topic classifier was trained)."""
        if self.topic_coef is None or not self.topics:
            return [NO_TOPIC] * len(texts)
        features = _vectorizer().transform(texts)
        logits = np.asarray(features @ self.topic_coef.T) + self.topic_intercept
        if len(self.topics) == 2 and self.topic_coef.shape[0] == 1:
            return [self.topics[int(v > 0)] for v in logits[:, 0]]
        return [self.topics[i] for i in np.argmax(logits, axis=1)]

    def to_bytes(self) -> tuple[bytes, dict[str, Any]]:
        buffer = io.BytesIO()
        arrays = {"coef": self.coef, "intercept": np.array([self.intercept])}
        if self.topic_coef is not None:
            arrays |= {"topic_coef": self.topic_coef, "topic_intercept": self.topic_intercept}
        np.savez_compressed(buffer, **arrays)
        card = {"features": FEATURES, "ngramRange": list(NGRAM_RANGE), "topics": self.topics,
                "metrics": self.metrics, "model": "logistic regression (SGD) over hashed word n-grams"}
        return buffer.getvalue(), card

    @classmethod
    def from_bytes(cls, data: bytes, card: dict[str, Any]) -> QualityModel:
        arrays = np.load(io.BytesIO(data), allow_pickle=False)
        if card.get("features") != FEATURES or list(card.get("ngramRange", [])) != list(NGRAM_RANGE):
            raise AnnotationError("the saved classifier uses other features than this version")
        topic_coef = arrays["topic_coef"] if "topic_coef" in arrays else None
        return cls(arrays["coef"], float(arrays["intercept"][0]), topic_coef,
                   arrays["topic_intercept"] if topic_coef is not None else None,
                   list(card.get("topics") or []), dict(card.get("metrics") or {}))


def train(texts: Sequence[str], labels: Sequence[float], topics: Sequence[str] | None = None,
          where: str = "annotations") -> QualityModel:
    """Train on the annotations; held-out accuracy and F1 go to `metrics`."""
    from sklearn.linear_model import SGDClassifier
    from sklearn.metrics import accuracy_score, f1_score

    good = np.asarray(labels, dtype=np.float64) >= 0.5
    if len(texts) < 10:
        raise AnnotationError(f"{where}: {len(texts)} labelled documents; at least 10 are needed")
    if good.all() or not good.any():
        raise AnnotationError(f"{where}: every label is on the same side of 0.5; a classifier needs both")
    held = _held_out(texts)
    if held.all() or not held.any() or len(set(good[~held])) < 2:
        held = np.arange(len(texts)) % 5 == 0
    features = _vectorizer().transform(texts)
    model = SGDClassifier(loss="log_loss", alpha=1e-5, max_iter=50, tol=1e-4, random_state=0)
    model.fit(features[~held], good[~held])
    predicted = model.predict(features[held])
    metrics = {"heldOutAccuracy": round(float(accuracy_score(good[held], predicted)), 4),
               "heldOutF1": round(float(f1_score(good[held], predicted, zero_division=0)), 4),
               "trainDocuments": float((~held).sum()), "heldOutDocuments": float(held.sum())}
    result = QualityModel(model.coef_[0].astype(np.float32), float(model.intercept_[0]), metrics=metrics)
    if topics is not None:
        named = np.array([t or NO_TOPIC for t in topics], dtype=object)
        has_topic = named != NO_TOPIC
        classes = sorted(set(named[has_topic]))
        if len(classes) >= 2:
            topic_model = SGDClassifier(loss="log_loss", alpha=1e-5, max_iter=50, tol=1e-4, random_state=0)
            topic_model.fit(features[has_topic & ~held], named[has_topic & ~held])
            test = has_topic & held
            if test.any():
                metrics["topicHeldOutAccuracy"] = round(float(accuracy_score(
                    named[test], topic_model.predict(features[test]))), 4)
            result.topic_coef = topic_model.coef_.astype(np.float32)
            result.topic_intercept = topic_model.intercept_.astype(np.float64)
            result.topics = [str(c) for c in topic_model.classes_]
    return result


def labelled_rows(rows: Sequence[dict[str, Any]], where: str) -> tuple[list[str], list[float], list[str]]:
    """(texts, labels, topics) from annotation rows; an error names the first unlabelled row."""
    texts, labels, topics = [], [], []
    for number, row in enumerate(rows):
        meta = row.get("meta")
        extra = {}
        if isinstance(meta, str) and meta:
            try:
                extra = json.loads(meta)
            except ValueError:
                extra = {}
        label = row.get("label", extra.get("label") if isinstance(extra, dict) else None)
        try:
            value = float(label)
        except (TypeError, ValueError):
            raise AnnotationError(f"{where}: row {number} (id {row.get('id')!r}) has no numeric label "
                                  f"(a label column or meta.label in [0, 1])") from None
        if not 0.0 <= value <= 1.0 or not isinstance(row.get("text"), str):
            raise AnnotationError(f"{where}: row {number} (id {row.get('id')!r}) needs text and a label in [0, 1]")
        texts.append(row["text"])
        labels.append(value)
        topic = row.get("topic", extra.get("topic") if isinstance(extra, dict) else None)
        topics.append(str(topic) if topic else NO_TOPIC)
    return texts, labels, topics


def save(model: QualityModel, uri: str) -> str:
    from tokenmill.store import open_store

    store = open_store(uri)
    data, card = model.to_bytes()
    store.write_bytes(MODEL_NAME, data)
    store.write_json(CARD_NAME, card)  # last: the card marks the model complete
    return store.uri


def load(uri: str) -> QualityModel:
    from tokenmill.store import open_store

    store = open_store(uri)
    return QualityModel.from_bytes(store.read_bytes(MODEL_NAME), store.read_json(CARD_NAME))
