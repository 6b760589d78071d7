"""A byte-level tokenizer for tiny local models: UTF-8 bytes are ids 0..255.

Ids 256..263 hold the named special tokens of Phi-4 (`<|endoftext|>` 256, `<|fim_prefix|>`
257, `<|fim_middle|>` 258, `<|fim_suffix|>` 259, `<|im_start|>` 260, `<|im_end|>` 261,
`<|im_sep|>` 262, `<|endofprompt|>` 263) and `<|dummy_0|>`..`<|dummy_55|>` fill 264..319,
the `tiny` config's vocabulary of 320. Padding is `<|dummy_0|>` (264).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tokenmill.trainer.tokenizer.base import Tokenizer
from tokenmill.trainer.tokenizer.special import (
    BYTE_BASE_SIZE,
    BYTE_PAD_TOKEN,
    BYTE_VOCAB_SIZE,
    byte_special_tokens,
)


class ByteTokenizer(Tokenizer):
    name = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    pad_token = BYTE_PAD_TOKEN

    def __init__(self) -> None:
        self.special_tokens = byte_special_tokens()
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, alternatives)))
        super().__init__()

    @property
    def byte_ranks(self) -> dict[bytes, int]:
        return {bytes([value]): value for value in range(BYTE_BASE_SIZE)}

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        position = 0
        for match in self._special_pattern.finditer(text):
            ids += text[position : match.start()].encode("utf-8")
            ids.append(self.special_tokens[match.group()])
            position = match.end()
        ids += text[position:].encode("utf-8")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        buffer = bytearray()
        for token_id in ids:
            if 0 <= token_id < BYTE_BASE_SIZE:
                buffer.append(token_id)
            elif token_id in self._special_by_id:
                buffer += self._special_by_id[token_id].encode("utf-8")
            else:
                raise ValueError(
                    f"id {token_id} is outside the byte vocabulary of {self.vocab_size}"
                )
        return buffer.decode("utf-8", errors="replace")
