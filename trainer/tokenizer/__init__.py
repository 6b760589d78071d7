"""Tokenizers by name: `phi-4` (cl100k_base + Phi-4 specials) and `byte` (tiny models)."""

from __future__ import annotations

from functools import cache

from tokenmill.trainer.tokenizer.base import CHAT_TEMPLATE, Tokenizer
from tokenmill.trainer.tokenizer.byte import ByteTokenizer
from tokenmill.trainer.tokenizer.hf_files import save_hf_tokenizer
from tokenmill.trainer.tokenizer.phi4 import Phi4Tokenizer

TOKENIZER_CLASSES: dict[str, type[Tokenizer]] = {"phi-4": Phi4Tokenizer, "byte": ByteTokenizer}


@cache
def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called `name` (cached: building phi-4's takes about half a second)."""
    try:
        cls = TOKENIZER_CLASSES[name]
    except KeyError:
        known = ", ".join(sorted(TOKENIZER_CLASSES))
        raise KeyError(f"unknown tokenizer {name!r}; known tokenizers: {known}") from None
    return cls()


__all__ = [
    "CHAT_TEMPLATE",
    "ByteTokenizer",
    "Phi4Tokenizer",
    "Tokenizer",
    "get_tokenizer",
    "save_hf_tokenizer",
]
