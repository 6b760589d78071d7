"""The tokenizer interface and the Phi-4 chat format both tokenizers share."""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np

from tokenmill.trainer.tokenizer.special import ENDOFTEXT, IM_END, IM_SEP, IM_START

CHAT_ROLES = ("system", "user", "assistant")

# Jinja template that transformers' apply_chat_template renders exactly like ours.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

Message = Mapping[str, str]


class Tokenizer(ABC):
    """Text to ids and back, with Phi-4's special tokens and chat format.

    `encode` treats special-token strings in the text as ordinary text unless
    `allow_special=True`; chat structure therefore cannot be injected through message content.
    """

    name: str
    vocab_size: int
    special_tokens: dict[str, int]
    pad_token: str
    # The pre-tokenizer's split pattern (tiktoken's regex syntax); None splits nothing.
    pattern: str | None = None

    def __init__(self) -> None:
        self._special_by_id = {token_id: token for token, token_id in self.special_tokens.items()}

    @property
    @abstractmethod
    def byte_ranks(self) -> dict[bytes, int]:
        """The byte-level BPE vocabulary, token bytes to id, special tokens excluded."""

    @abstractmethod
    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Ids of `text`; special-token strings become their ids only with `allow_special`."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special ids decode to their names, invalid UTF-8 to U+FFFD."""

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 8) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The texts' ids concatenated (int32) and each text's length, on the calling thread."""
        token_lists = self.encode_batch(texts, num_threads=1)
        lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
        flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int32, count=int(lengths.sum()))
        return flat, lengths

    @property
    def eot_id(self) -> int:
        """`<|endoftext|>`: separates documents in pretraining data."""
        return self.special_tokens[ENDOFTEXT]

    @property
    def pad_id(self) -> int:
        """A dummy token, never `<|endoftext|>`, so masking padding never masks end-of-text."""
        return self.special_tokens[self.pad_token]

    @property
    def bos_id(self) -> int:
        return self.eot_id

    @property
    def eos_id(self) -> int:
        """End of an assistant turn: `<|im_end|>`."""
        return self.special_tokens[IM_END]

    def token_id(self, token: str) -> int:
        try:
            return self.special_tokens[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a special token of tokenizer {self.name!r}") from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_by_id

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> str:
        parts = [
            f"{IM_START}{role}{IM_SEP}{content}{IM_END}" for role, content in _turns(messages)
        ]
        if add_generation_prompt:
            parts.append(f"{IM_START}assistant{IM_SEP}")
        return "".join(parts)

    def encode_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> list[int]:
        return self.encode_chat_with_mask(messages, add_generation_prompt)[0]

    def encode_chat_with_mask(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Ids of the chat and, per id, whether it is a training target.

        Targets are the assistant turns' content and their closing `<|im_end|>`; role names,
        separators and other turns are context. Content is encoded as ordinary text.
        """
        start, sep, end = self.token_id(IM_START), self.token_id(IM_SEP), self.token_id(IM_END)
        ids: list[int] = []
        mask: list[bool] = []
        for role, content in _turns(messages):
            header = [start, *self.encode(role), sep]
            body = [*self.encode(content), end]
            ids += header + body
            mask += [False] * len(header) + [role == "assistant"] * len(body)
        if add_generation_prompt:
            prompt = [start, *self.encode("assistant"), sep]
            ids += prompt
            mask += [False] * len(prompt)
        return ids, mask


def _turns(messages: Sequence[Message]) -> list[tuple[str, str]]:
    turns = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"message {index}: role must be one of {CHAT_ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"message {index}: content must be a string")
        turns.append((role, content))
    return turns
