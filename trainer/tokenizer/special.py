"""Special-token names and ids shared by the Phi-4 and byte tokenizers.

Phi-4 (RECIPE.md) keeps cl100k_base's 100,256 BPE tokens at ids 0..100255 and fills ids
100256..100351 with eight named special tokens and `<|dummy_N|>` placeholders, numbered in id
order: `<|dummy_0|>` is 100256, `<|dummy_1|>` 100261, ..., `<|dummy_87|>` 100351. Padding uses
`<|dummy_85|>` (100349), as the released Phi-4 tokenizer does, so that end-of-text is never a
padding id.
"""

from __future__ import annotations

ENDOFTEXT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IM_SEP = "<|im_sep|>"
ENDOFPROMPT = "<|endofprompt|>"

NAMED_SPECIAL_TOKENS = (
    ENDOFTEXT,
    FIM_PREFIX,
    FIM_MIDDLE,
    FIM_SUFFIX,
    IM_START,
    IM_END,
    IM_SEP,
    ENDOFPROMPT,
)

PHI4_NAMED_IDS: dict[str, int] = {
    ENDOFTEXT: 100257,
    FIM_PREFIX: 100258,
    FIM_MIDDLE: 100259,
    FIM_SUFFIX: 100260,
    IM_START: 100264,
    IM_END: 100265,
    IM_SEP: 100266,
    ENDOFPROMPT: 100276,
}
PHI4_BPE_SIZE = 100_256
PHI4_VOCAB_SIZE = 100_352
PHI4_PAD_TOKEN = "<|dummy_85|>"

BYTE_BASE_SIZE = 256
BYTE_VOCAB_SIZE = 320
BYTE_PAD_TOKEN = "<|dummy_0|>"


def dummy_token(index: int) -> str:
    return f"<|dummy_{index}|>"


def fill_special_tokens(named: dict[str, int], first_id: int, vocab_size: int) -> dict[str, int]:
    """The named tokens plus `<|dummy_N|>` on every free id in [first_id, vocab_size), by id."""
    taken = set(named.values())
    if len(taken) != len(named):
        raise ValueError("special-token ids must be distinct")
    if any(not first_id <= token_id < vocab_size for token_id in taken):
        raise ValueError(f"special-token ids must lie in [{first_id}, {vocab_size})")
    tokens = dict(named)
    free_ids = (token_id for token_id in range(first_id, vocab_size) if token_id not in taken)
    for index, token_id in enumerate(free_ids):
        tokens[dummy_token(index)] = token_id
    return dict(sorted(tokens.items(), key=lambda item: item[1]))


def phi4_special_tokens() -> dict[str, int]:
    return fill_special_tokens(PHI4_NAMED_IDS, PHI4_BPE_SIZE, PHI4_VOCAB_SIZE)


def byte_special_tokens() -> dict[str, int]:
    """The named tokens at 256..263 in RECIPE.md's order, then `<|dummy_0..55|>` to 319."""
    named = {name: BYTE_BASE_SIZE + index for index, name in enumerate(NAMED_SPECIAL_TOKENS)}
    return fill_special_tokens(named, BYTE_BASE_SIZE, BYTE_VOCAB_SIZE)
