"""SFT data: chat samples in the Phi-4 chat format, packed into rows with an assistant-only loss mask.

A `chat_samples` dataset holds conversations (role/content messages). Each is checked
(`conversation_problem`), rendered in the Phi-4 chat format
``<|im_start|>role<|im_sep|>content<|im_end|>`` with the stage's tokenizer
(`Tokenizer.encode_chat_with_mask`), and followed by end-of-text, as documents are in
pretraining. Per token, the loss mask says whether the token is a training target: the
content of every assistant turn and its closing ``<|im_end|>``; never the role headers, the
system or user turns, or the end-of-text.

Rows. A row holds ``seq_len + 1`` tokens (``input_ids = row[:-1]``, ``labels = row[1:]``) and
only whole samples: ``pack`` puts consecutive samples into a row while they fit (attention is
kept inside each sample by the end-of-text boundaries, see `packing.document_ids`), ``single``
gives every sample its own row. The rest of a row is padding (never a target). A sample
longer than a row is truncated to the row (``truncate``) or dropped (``drop``); one left with
no target inside the row is dropped. Every dropped or truncated sample is counted by reason.

The cache of a dataset is ``<output>/tokens/<dataset>/<tokenizer>-L<seq_len>/chat-<packing>-<overLong>/``:
``data/`` a `token_sequences` dataset (``tokens`` and ``loss_mask`` per row, one shard per
input shard, keyed like the pretraining cache) and ``counts/<shard>.json`` the shard's sample
counts, written before the shard commits. In memory a source returns rows with the loss mask
folded into bit `TARGET_FLAG` of each id (`split_masked_rows` takes it apart), so the mixture
sampler and its sources keep one integer array per row.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokenmill.layout import join, token_cache_uri
from tokenmill.store import (
    CHAT_SAMPLES,
    TOKEN_SEQUENCES,
    Dataset,
    DatasetWriter,
    Manifest,
    ManifestNotFoundError,
    ParquetOptions,
    Producer,
    ShardInfo,
    StoreError,
    open_dataset,
    open_store,
)
from tokenmill.trainer.data.loader import MicroBatch, MicroBatchIterator
from tokenmill.trainer.data.packing import IGNORE_INDEX, TOKEN_DTYPE, document_ids
from tokenmill.trainer.data.sources import TokenCacheSource
from tokenmill.trainer.tokenizer import Tokenizer, get_tokenizer

Packing = Literal["pack", "single"]
OverLong = Literal["truncate", "drop"]
CHAT_CACHE_FORMAT = 1
TARGET_FLAG = 1 << 30
"""Bit set on an id (in memory only) whose token is a training target."""

DROP_NO_ASSISTANT = "no assistant turn"
DROP_ROLE_ORDER = "roles out of order"
DROP_EMPTY = "no messages"
DROP_TOO_LONG = "longer than the sequence (dropped)"
DROP_NO_TARGET_LEFT = "no assistant token within the sequence"
TRUNCATED = "truncated to the sequence"
KEPT = "kept"


def conversation_problem(messages: Sequence[Mapping[str, Any]]) -> str | None:
    """Why a conversation cannot be trained on, or None.

    Accepted: an optional system message first, then user and assistant turns alternating,
    starting with user and ending with assistant.
    """
    roles = [message.get("role") for message in messages]
    if not roles:
        return DROP_EMPTY
    if "assistant" not in roles:
        return DROP_NO_ASSISTANT
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if not turns or turns != expected[: len(turns)] or turns[-1] != "assistant":
        return DROP_ROLE_ORDER
    return None


def render(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[bool]]:
    """A conversation's ids in the Phi-4 chat format and, per id, whether it is a target."""
    return tokenizer.encode_chat_with_mask(messages)


@dataclass
class PackedChats:
    rows: np.ndarray
    """int32 ``(rows, seq_len + 1)``."""
    masks: np.ndarray
    """bool ``(rows, seq_len + 1)``: True where the token is a training target."""
    counts: Counter[str]
    """Samples by outcome: `KEPT`, `TRUNCATED` (also kept) and every drop reason."""


class ChatPacker:
    """Whole rendered samples into rows of ``seq_len + 1`` (see the module docstring)."""

    def __init__(self, seq_len: int, eot_id: int, pad_id: int, *, packing: Packing = "pack",
                 over_long: OverLong = "truncate") -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.width = seq_len + 1
        self.eot_id, self.pad_id = eot_id, pad_id
        self.packing, self.over_long = packing, over_long
        self.counts: Counter[str] = Counter()
        self._rows: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._ids: list[int] = []
        self._mask: list[bool] = []

    def drop(self, reason: str) -> None:
        self.counts[reason] += 1

    def add(self, ids: Sequence[int], mask: Sequence[bool]) -> None:
        ids, mask = [*ids, self.eot_id], [*mask, False]
        if len(ids) > self.width:
            if self.over_long == "drop":
                self.drop(DROP_TOO_LONG)
                return
            ids, mask = ids[: self.width], mask[: self.width]
            if not any(mask[1:]):  # the first token of a row is never a label
                self.drop(DROP_NO_TARGET_LEFT)
                return
            self.counts[TRUNCATED] += 1
        self.counts[KEPT] += 1
        if self.packing == "single" or len(self._ids) + len(ids) > self.width:
            self._flush()
        self._ids += ids
        self._mask += mask

    def _flush(self) -> None:
        if not self._ids:
            return
        row = np.full(self.width, self.pad_id, dtype=TOKEN_DTYPE)
        row[: len(self._ids)] = self._ids
        mask = np.zeros(self.width, dtype=bool)
        mask[: len(self._mask)] = self._mask
        self._rows.append(row)
        self._masks.append(mask)
        self._ids, self._mask = [], []

    def finish(self) -> PackedChats:
        self._flush()
        width = self.width
        rows = np.stack(self._rows) if self._rows else np.empty((0, width), dtype=TOKEN_DTYPE)
        masks = np.stack(self._masks) if self._masks else np.empty((0, width), dtype=bool)
        self._rows, self._masks = [], []
        return PackedChats(rows, masks, self.counts)


def pack_conversations(
    conversations: Iterable[Sequence[Mapping[str, str]]], tokenizer: Tokenizer, seq_len: int, *,
    packing: Packing = "pack", over_long: OverLong = "truncate",
) -> PackedChats:
    """Check, render and pack conversations (in order)."""
    packer = ChatPacker(seq_len, tokenizer.eot_id, tokenizer.pad_id, packing=packing, over_long=over_long)
    for messages in conversations:
        problem = conversation_problem(messages)
        if problem:
            packer.drop(problem)
            continue
        packer.add(*render(tokenizer, messages))
    return packer.finish()


# -- the cache in the store ---------------------------------------------------------------


@dataclass(frozen=True)
class ChatCacheSpec:
    tokenizer: str
    seq_len: int
    packing: Packing = "pack"
    over_long: OverLong = "truncate"
    name: str = ""
    row_group_rows: int = 64

    @property
    def label(self) -> str:
        return f"chat-{self.packing}-{self.over_long}"


def chat_cache_uri(output: str, spec: ChatCacheSpec) -> str:
    return join(token_cache_uri(output, spec.name, spec.tokenizer, spec.seq_len), spec.label)


def chat_cache_key(manifest: Manifest, spec: ChatCacheSpec) -> str:
    key = {
        "format": CHAT_CACHE_FORMAT, "schema": manifest.schema_ref,
        "input": [[s.shard, s.sha256] for s in manifest.shards],
        "tokenizer": spec.tokenizer, "seq_len": spec.seq_len, "packing": spec.packing, "over_long": spec.over_long,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def masked_rows_table(packed: PackedChats, shard: str, source: str) -> pa.Table:
    count, width = packed.rows.shape
    offsets = pa.array(np.arange(count + 1, dtype=np.int32) * width, type=pa.int32())
    tokens = pa.ListArray.from_arrays(offsets, pa.array(packed.rows.reshape(-1), type=pa.int32()),
                                      type=TOKEN_SEQUENCES.arrow.field("tokens").type)
    masks = pa.ListArray.from_arrays(offsets, pa.array(packed.masks.reshape(-1), type=pa.bool_()),
                                     type=TOKEN_SEQUENCES.arrow.field("loss_mask").type)
    return pa.table({
        "id": pa.array([f"{shard}:{i}" for i in range(count)], type=pa.string()),
        "tokens": tokens, "loss_mask": masks, "source": pa.array([source] * count, type=pa.string()),
    })


def cache_chat_shard(chats_uri: str, shard: Mapping[str, Any], spec: ChatCacheSpec, writer: DatasetWriter,
                     counts_uri: str) -> dict[str, int]:
    """Render, pack and commit one input shard; its counts are written first."""
    info = ShardInfo.from_dict(shard, chats_uri)
    dataset = Dataset(open_store(chats_uri), Manifest(CHAT_SAMPLES.name, CHAT_SAMPLES.version, (info,)))
    table = dataset.read_shard(info, columns=["messages"])
    packed = pack_conversations(table.column("messages").to_pylist(), get_tokenizer(spec.tokenizer),
                                spec.seq_len, packing=spec.packing, over_long=spec.over_long)
    counts = dict(packed.counts)
    open_store(counts_uri).write_json(f"{info.shard}.json", counts)
    tokens = int(np.count_nonzero(packed.rows != get_tokenizer(spec.tokenizer).pad_id))
    writer.write_shard(info.shard, masked_rows_table(packed, info.shard, spec.name), tokens=tokens)
    return counts


def build_chat_cache(chats_uri: str, output_uri: str, spec: ChatCacheSpec, *, use_ray: bool = True) -> Counter[str]:
    """Build (or finish) the cache of a committed `chat_samples` dataset; returns the sample counts."""
    chats = open_dataset(chats_uri).expect_schema(CHAT_SAMPLES)
    producer = Producer(kind="ChatTokenCache", name=spec.name, uid=chat_cache_key(chats.manifest, spec))
    writer = DatasetWriter(join(output_uri, "data"), TOKEN_SEQUENCES, producer=producer,
                           options=ParquetOptions(row_group_rows=spec.row_group_rows))
    counts_uri = join(output_uri, "counts")
    done = set(writer.resume())
    todo = [s for s in chats.shards if s.shard not in done]
    args = [(chats.uri, s.to_dict(), spec, writer, counts_uri) for s in todo]
    if use_ray and args:
        import ray

        if not ray.is_initialized():
            ray.init()
        remote = ray.remote(num_cpus=1, num_gpus=0)(cache_chat_shard)
        ray.get([remote.remote(*arg) for arg in args])
    else:
        for arg in args:
            cache_chat_shard(*arg)
    writer.finalize(expected=[s.shard for s in chats.shards])
    return read_chat_counts(output_uri, [s.shard for s in chats.shards])


def read_chat_counts(output_uri: str, shards: Sequence[str]) -> Counter[str]:
    store = open_store(join(output_uri, "counts"))
    total: Counter[str] = Counter()
    for shard in shards:
        total.update(store.read_json(f"{shard}.json"))
    return total


class ChatCacheMismatchError(StoreError):
    """A committed chat cache that was not built from the stage's data and settings."""


def open_chat_cache(
    chats_uri: str, output_uri: str, spec: ChatCacheSpec
) -> tuple[MaskedTokenCacheSource, Counter[str]]:
    """The committed cache of a chat dataset as a source, after checking it matches the data."""
    key = chat_cache_key(open_dataset(chats_uri).manifest, spec)
    uri = join(output_uri, "data")
    try:
        committed = open_dataset(uri)
    except ManifestNotFoundError:
        raise ChatCacheMismatchError(f"the chat cache of dataset {spec.name!r} is not built at {uri}", uri) from None
    if committed.manifest.producer is None or committed.manifest.producer.uid != key:
        raise ChatCacheMismatchError(
            f"the chat cache at {uri} was built from other data or settings than dataset {spec.name!r} "
            f"at {chats_uri} (did the dataset change during the run?)", uri)
    counts = read_chat_counts(output_uri, [s.shard for s in committed.shards])
    return MaskedTokenCacheSource(committed, spec.seq_len), counts


class MaskedTokenCacheSource(TokenCacheSource):
    """A `TokenCacheSource` whose rows carry the loss mask as `TARGET_FLAG` on target ids."""

    def _load_shard(self, shard: int) -> np.ndarray:
        return self._decode(self.dataset.read_shard(self._shards[shard], ["tokens", "loss_mask"]), shard)

    def _load_group(self, shard: int, group: int) -> np.ndarray:
        table = self._parquet(shard).read_row_group(group, columns=["tokens", "loss_mask"])
        return self._decode(table, shard)

    def _decode(self, table: pa.Table, shard: int) -> np.ndarray:
        tokens = super()._decode(table, shard)
        column = table.column("loss_mask")
        if column.null_count:
            raise StoreError(f"shard {self._shards[shard].shard!r} of {self.dataset.uri} has rows without a loss mask",
                             self.dataset.uri)
        mask = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(bool).reshape(tokens.shape)
        return np.where(mask, tokens | TARGET_FLAG, tokens).astype(TOKEN_DTYPE, copy=False)


def split_masked_rows(rows: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, labels)`` of rows with `TARGET_FLAG` targets: labels are the targets only."""
    rows = np.asarray(rows, dtype=np.int64)
    target = (rows & TARGET_FLAG) != 0
    tokens = rows & ~TARGET_FLAG
    inputs = tokens[..., :-1]
    labels = np.where(target[..., 1:], tokens[..., 1:], IGNORE_INDEX)
    return inputs, labels


class ChatMicroBatchIterator(MicroBatchIterator):
    """`MicroBatchIterator` over masked chat rows: labels only on assistant tokens."""

    def __next__(self) -> MicroBatch:
        plan = self.sampler.plan
        if self._index >= self.sampler.total:
            raise StopIteration
        start, stop = self._block()
        rows = self._read(start, stop)
        step = self._index // plan.global_batch_size
        micro_step = self._index % plan.global_batch_size // (self.world_size * self.micro_batch_size)
        self._index += self.world_size * self.micro_batch_size
        inputs, labels = split_masked_rows(rows, self.pad_id)
        doc_ids = document_ids(inputs, self.eot_id, self.pad_id).astype(np.int64)
        return MicroBatch(torch_tensor(inputs), torch_tensor(labels), torch_tensor(doc_ids), step, micro_step,
                          self.accumulation_steps)

    def _block(self) -> tuple[int, int]:
        from tokenmill.trainer.data.sampler import rank_block

        return rank_block(self._index, self.rank, self.world_size, self.micro_batch_size)


def torch_tensor(array: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))


def describe_counts(name: str, counts: Mapping[str, int]) -> str:
    """One log line: kept samples and every other outcome by count."""
    others = ", ".join(f"{reason}: {count}" for reason, count in sorted(counts.items()) if reason != KEPT)
    return f"  {name}: {counts.get(KEPT, 0)} samples kept" + (f" ({others})" if others else "")

