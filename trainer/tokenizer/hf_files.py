"""Writes a tokenizer in the files `transformers` loads offline.

`tokenizer.json` is the `tokenizers` library's serialisation of a byte-level BPE:
- phi-4: cl100k_base's ranks as the vocabulary, tiktoken's split pattern as a pre-tokenizer,
  and as merges every split (a, b) of a token whose halves are tokens too, ordered by the
  rank of the merged token. With `ignore_merges` (a whole pre-token that is a token is taken
  as is) this reproduces tiktoken's rule "merge the adjacent pair whose concatenation has the
  lowest rank".
- byte: the same format with the 256 single bytes as vocabulary and no merges, so every byte
  is its own id; no pattern.
Both list every special token (named and dummy) as added special tokens at its id.
`tokenizer_config.json` names the special tokens, carries the chat template, and turns off
adding BOS/EOS, so `transformers` encodes text exactly as `Tokenizer.encode` does.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from tokenmill.trainer.tokenizer.base import CHAT_TEMPLATE, Tokenizer
from tokenmill.trainer.tokenizer.special import ENDOFTEXT, IM_END

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte-to-character map used by byte-level BPE vocabularies.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in order, to U+0100 on.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _as_unicode(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[byte] for byte in token)


def oniguruma_pattern(pattern: str) -> str:
    """tiktoken's pattern for the `tokenizers` library's regex engine (Oniguruma, Ruby syntax).

    Ruby reads `{n,m}+` as "one or more runs of {n,m}", not as a possessive interval, which
    would keep `\\p{N}{1,3}+` from splitting long numbers into groups of three digits. A
    possessive interval is the same as the greedy one there, so the `+` is dropped.
    """
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """All (left, right) splits of each token into two tokens, by (rank of token, left, right)."""
    keyed = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                keyed.append(((rank, ranks[left], ranks[right]), left, right))
    keyed.sort(key=lambda entry: entry[0])
    return [(left, right) for _, left, right in keyed]


def tokenizer_json(tokenizer: Tokenizer) -> dict:
    ranks = tokenizer.byte_ranks
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": False}
    if tokenizer.pattern is None:
        pre_tokenizer: dict = byte_level
    else:
        split = {"type": "Split", "pattern": {"Regex": oniguruma_pattern(tokenizer.pattern)},
                 "behavior": "Isolated", "invert": False}
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [split, byte_level]}
    added = [
        {"id": token_id, "content": token, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for token, token_id in tokenizer.special_tokens.items()
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False,
                           "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {_as_unicode(token): rank for token, rank in ranks.items()},
            "merges": [[_as_unicode(a), _as_unicode(b)] for a, b in bpe_merges(ranks)],
        },
    }


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int | None = None) -> dict:
    added = {
        str(token_id): {"content": token, "lstrip": False, "normalized": False,
                        "rstrip": False, "single_word": False, "special": True}
        for token, token_id in tokenizer.special_tokens.items()
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "tokenmill_tokenizer": tokenizer.name,
        "bos_token": ENDOFTEXT,
        "eos_token": IM_END,
        "pad_token": tokenizer.pad_token,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def save_hf_tokenizer(
    tokenizer: Tokenizer, out_dir: str | Path, model_max_length: int | None = None
) -> list[Path]:
    """Writes tokenizer.json and tokenizer_config.json into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        out / TOKENIZER_FILE: tokenizer_json(tokenizer),
        out / TOKENIZER_CONFIG_FILE: tokenizer_config(tokenizer, model_max_length),
    }
    for path, content in files.items():
        indent = None if path.name == TOKENIZER_FILE else 2
        path.write_text(json.dumps(content, ensure_ascii=False, indent=indent), encoding="utf-8")
    return list(files)
