"""Checkpoints under `<output>/checkpoints/step-NNNNNNNN/`, each committed by a marker written last.

A checkpoint directory holds the `torch.distributed.checkpoint` files, `state.json` (step,
tokens seen, data-loader position, RNG: whatever the trainer passes) and `_COMMITTED`,
which lists every file with its size and sha256 and names the producer (kind, name, uid,
generation, attempt). Without the marker a directory is invisible.

A commit refuses a partial checkpoint: the files DCP's own `.metadata` refers to (passed by
the trainer, which can read it, as `expected_files`) must all be there with at least the
bytes it addresses, `.metadata` included. A store opened for a
producer (`for_run`) only sees that run's checkpoints (same uid and generation), so a resource
recreated under the same name, or with a changed spec, never resumes from another run's
weights; with a fence, a stale attempt can neither commit nor delete.

Saving from a single process (the trainer writes with DCP's FileSystemWriter):

    with ckpts.staging(step, state) as directory:      # a local directory
        dcp.save(state_dict, checkpoint_id=str(directory))
    # on leaving the block the files are uploaded and the marker written

Several ranks on several nodes: rank 0 calls `prepare(step)`; every rank saves into a local
directory and calls `upload_dir(step, directory)`; after a barrier rank 0 calls
`commit(step, state)`. On file:// stores `staging` hands out the final directory itself,
so nothing is copied. This module never imports torch.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.layout import COMMIT_MARKER_NAME, checkpoints_uri
from tokenmill.store.backends.base import Store
from tokenmill.store.backends.local import FileStore
from tokenmill.store.errors import CheckpointError, ObjectNotFoundError, StoreError
from tokenmill.store.manifest import Producer, utc_now
from tokenmill.store.opener import open_store
from tokenmill.store.retry import RetryPolicy
from tokenmill.store.runrecord import AttemptFence
from tokenmill.store.transfer import copy_object, download_dir, upload_dir
from tokenmill.store.uri import StoreURI

STATE_NAME = "state.json"
MARKER_FORMAT = "tokenmill.checkpoint"
DCP_METADATA = ".metadata"
# Beside a Hugging Face export's config.json: the Producer that exported it.
EXPORT_PRODUCER_NAME = "tokenmill_producer.json"
UPLOADS_DIR = "_uploads"  # one record per upload_dir call: each file's size and sha256
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_READ_CONCURRENCY = 16
_COPY_CONCURRENCY = 8


def step_dir(step: int) -> str:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"a checkpoint step is a non-negative int, not {step!r}")
    return f"step-{step:08d}"


def retention_plan(
    committed: list[int], keep_last: int, keep_every: int | None = None
) -> list[int]:
    """The committed steps to delete so that only the last `keep_last` and the multiples of
    `keep_every` remain. The newest checkpoint is always kept."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (the newest checkpoint), not {keep_last}")
    if keep_every is not None and keep_every < 1:
        raise ValueError(f"keep_every must be positive, not {keep_every}")
    ordered = sorted(set(committed))
    keep = set(ordered[-keep_last:])
    if keep_every:
        keep |= {s for s in ordered if s % keep_every == 0}
    return [s for s in ordered if s not in keep]


@dataclass(frozen=True)
class CheckpointFile:
    path: str
    bytes: int
    sha256: str | None = None


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as its marker describes it."""

    step: int
    uri: str
    committed_at: str
    files: tuple[CheckpointFile, ...]
    producer: Producer | None = None

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)


class CheckpointStore:
    """The checkpoints of one resource: `CheckpointStore.for_output(output)`."""

    def __init__(self, uri: str | StoreURI | Store, *, retry: RetryPolicy | None = None,
                 producer: Producer | None = None, fence: AttemptFence | None = None) -> None:
        self.store = open_store(uri, retry=retry)
        self.producer = producer
        """Stamped on commits; reading sees only checkpoints of the same run (uid, generation)."""
        self.fence = fence
        """Checked before every commit and deletion."""

    @classmethod
    def for_output(cls, output: str, *, retry: RetryPolicy | None = None, producer: Producer | None = None,
                   fence: AttemptFence | None = None) -> CheckpointStore:
        return cls(checkpoints_uri(output), retry=retry, producer=producer, fence=fence)

    @classmethod
    def for_run(cls, run: Mapping[str, Any], *, retry: RetryPolicy | None = None) -> CheckpointStore:
        """The checkpoints of the run a run spec starts: stamped with its producer, fenced by its attempt.

        A run without a uid (the local runner's) is identified by a digest of its spec, so a
        changed spec is another run there too."""
        meta = run.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        if not uid:
            uid = "spec-" + hashlib.sha256(json.dumps(run.get("spec"), sort_keys=True).encode()).hexdigest()[:16]
        producer = Producer(kind=str(run.get("kind", "")), name=str(meta.get("name", "")), uid=uid,
                            generation=int(meta.get("generation") or 0), attempt=int(run.get("attempt") or 0))
        return cls.for_output(str(run["output"]), retry=retry, producer=producer,
                              fence=AttemptFence.from_run_spec(run))

    def _visible(self, info: CheckpointInfo | None) -> CheckpointInfo | None:
        if info is None or self.producer is None:
            return info
        if info.producer is None or not self.producer.same_run(info.producer):
            return None  # another run's (or an unstamped) checkpoint: never resumed from
        return info

    @property
    def uri(self) -> str:
        return self.store.uri

    def uri_for(self, step: int) -> str:
        return self.store.uri_of(step_dir(step))

    # -- reading -------------------------------------------------------------------------

    def steps(self, *, include_uncommitted: bool = False) -> builtins.list[int]:
        """Steps with a directory here, ascending; only committed ones unless asked."""
        found = sorted(int(m.group(1)) for m in map(_STEP_DIR.match, self.store.list_dirs()) if m)
        if include_uncommitted:
            return found
        return [info.step for info in map(self._visible, self._infos(found)) if info is not None]

    def list(self) -> builtins.list[CheckpointInfo]:
        """Every committed checkpoint, oldest first."""
        return [i for i in map(self._visible, self._infos(self.steps(include_uncommitted=True))) if i is not None]

    def latest(self) -> CheckpointInfo | None:
        """The committed checkpoint with the highest step; uncommitted ones are ignored."""
        for step in reversed(self.steps(include_uncommitted=True)):
            info = self._visible(self._info(step))
            if info is not None:
                return info
        return None

    def get(self, step: int) -> CheckpointInfo:
        info = self._visible(self._info(step))
        if info is None:
            raise CheckpointError(
                f"checkpoint {self.uri_for(step)} is not committed", self.uri_for(step)
            )
        return info

    def is_committed(self, step: int) -> bool:
        return self.store.exists(f"{step_dir(step)}/{COMMIT_MARKER_NAME}")

    def read_state(self, step: int) -> dict[str, Any]:
        self.get(step)
        return self.store.read_json(f"{step_dir(step)}/{STATE_NAME}")

    def verify(self, step: int, *, checksums: bool = False) -> CheckpointInfo:
        """Check that every file the marker lists is there with its size, and with `checksums`
        that its bytes hash to the sha256 the marker records (this reads every file)."""
        info = self.get(step)
        directory = step_dir(step)
        present = {o.key: o.size for o in self.store.list(directory)}
        for entry in info.files:
            key = f"{directory}/{entry.path}"
            if present.get(key) != entry.bytes:
                problem = "is missing" if key not in present else f"has {present[key]} bytes"
                raise CheckpointError(
                    f"checkpoint {info.uri}: {entry.path} {problem}, the marker says {entry.bytes}",
                    info.uri,
                )
            if checksums and entry.sha256 is not None:
                digest = self._sha256(directory, entry.path, entry.bytes, None)
                if digest != entry.sha256:
                    raise CheckpointError(
                        f"checkpoint {info.uri}: {entry.path} does not match the sha256 its marker records",
                        info.uri,
                    )
        return info

    def download(self, step: int, dest: str | Path) -> Path:
        """Copy a committed checkpoint's files (as its marker lists them) into `dest`."""
        info = self.get(step)
        download_dir(self.store.child(step_dir(step)), dest, keys=[f.path for f in info.files])
        return Path(dest)

    # -- writing -------------------------------------------------------------------------

    def prepare(self, step: int, *, overwrite: bool = False) -> None:
        """Clear what a crashed attempt left at `step`; refuse a committed step unless
        `overwrite`, in which case its marker goes first."""
        if self.fence is not None:
            self.fence.check(f"clear {self.uri_for(step)}")
        if self.is_committed(step):
            if not overwrite:
                raise CheckpointError(
                    f"checkpoint {self.uri_for(step)} is already committed", self.uri_for(step)
                )
            self.store.delete(f"{step_dir(step)}/{COMMIT_MARKER_NAME}")
        self.store.delete_prefix(step_dir(step))

    def local_dir(self, step: int) -> Path | None:
        """The checkpoint's final directory when the store is a local one, else None."""
        if isinstance(self.store, FileStore):
            return Path(self.store.local_path(step_dir(step)))
        return None

    def upload_dir(self, step: int, local_dir: str | Path) -> builtins.list[str]:
        """Upload a directory of checkpoint files (one rank's share) and a record of each file's
        size and sha256, written after them; commits nothing."""
        root = Path(local_dir)
        sums = {str(path.relative_to(root)): (path.stat().st_size, _sha256_file(path))
                for path in sorted(root.rglob("*")) if path.is_file()}
        keys = upload_dir(local_dir, self.store.child(step_dir(step)))
        record = {"files": [{"path": name, "bytes": size, "sha256": digest} for name, (size, digest) in sums.items()]}
        self.store.write_json(f"{step_dir(step)}/{UPLOADS_DIR}/{secrets.token_hex(8)}.json", record)
        return keys

    def commit(self, step: int, state: Mapping[str, Any], *,
               expected_files: Mapping[str, int] | None = None) -> CheckpointInfo:
        """Write `state.json`, then the marker listing every file with its size and sha256: the
        checkpoint exists now.

        `expected_files` (relative path -> the bytes a reader needs, from DCP's `.metadata`)
        must all be present and long enough, or CheckpointError is raised and nothing is
        committed: a rank that failed to upload never yields a committed partial checkpoint.
        """
        directory = step_dir(step)
        if self.fence is not None:
            self.fence.check(f"commit checkpoint {self.uri_for(step)}")
        listing = {o.key[len(directory) + 1:]: o.size for o in self.store.list(directory)}
        listing.pop(COMMIT_MARKER_NAME, None)
        self._check_complete(step, listing, expected_files)
        self.store.write_json(f"{directory}/{STATE_NAME}", {**state, "step": step})
        listing[STATE_NAME] = self.store.size(f"{directory}/{STATE_NAME}")
        uploaded: dict[str, tuple[int, str]] = {}
        for name in [key for key in listing if key.startswith(f"{UPLOADS_DIR}/")]:
            for entry in self.store.read_json(f"{directory}/{name}").get("files") or ():
                uploaded[str(entry["path"])] = (int(entry["bytes"]), str(entry["sha256"]))
        files = tuple(
            CheckpointFile(name, size, self._sha256(directory, name, size, uploaded.get(name)))
            for name, size in sorted(listing.items())
            if not name.startswith(f"{UPLOADS_DIR}/")
        )
        committed_at = utc_now()
        marker: dict[str, Any] = {
            "format": MARKER_FORMAT,
            "format_version": 1,
            "step": step,
            "committed_at": committed_at,
            "state": STATE_NAME,
            "files": [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in files],
        }
        if self.producer is not None:
            marker["producer"] = self.producer.to_dict()
        if self.fence is not None:
            self.fence.check(f"commit checkpoint {self.uri_for(step)}")
        self.store.write_json(f"{directory}/{COMMIT_MARKER_NAME}", marker)
        return CheckpointInfo(step, self.uri_for(step), committed_at, files, self.producer)

    def _check_complete(self, step: int, listing: Mapping[str, int],
                        expected_files: Mapping[str, int] | None) -> None:
        uri = self.uri_for(step)
        if expected_files is not None and DCP_METADATA not in listing:
            raise CheckpointError(f"checkpoint {uri}: {DCP_METADATA} is missing; not committing a partial "
                                  "distributed checkpoint", uri)
        problems = []
        for name, needed in sorted((expected_files or {}).items()):
            size = listing.get(name)
            if size is None:
                problems.append(f"{name} is missing")
            elif size < needed:
                problems.append(f"{name} has {size} bytes, {DCP_METADATA} addresses {needed}")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise CheckpointError(f"checkpoint {uri} is incomplete, not committing it: {shown}", uri)

    def _sha256(self, directory: str, name: str, size: int, uploaded: tuple[int, str] | None) -> str:
        if uploaded is not None and uploaded[0] == size:
            return uploaded[1]
        if isinstance(self.store, FileStore):
            return _sha256_file(Path(self.store.local_path(f"{directory}/{name}")))
        return hashlib.sha256(self.store.read_bytes(f"{directory}/{name}")).hexdigest()

    @contextmanager
    def staging(
        self, step: int, state: Mapping[str, Any], *, overwrite: bool = False
    ) -> Iterator[Path]:
        """A directory to save the checkpoint into; committed when the block ends cleanly."""
        self.prepare(step, overwrite=overwrite)
        final = self.local_dir(step)
        if final is not None:
            final.mkdir(parents=True, exist_ok=True)
            yield final
            self.commit(step, state)
            return
        tmp = Path(tempfile.mkdtemp(prefix=f"tokenmill-{step_dir(step)}-"))
        try:
            yield tmp
            self.upload_dir(step, tmp)
            self.commit(step, state)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def save_dir(
        self, step: int, local_dir: str | Path, state: Mapping[str, Any], *, overwrite: bool = False
    ) -> CheckpointInfo:
        """prepare + upload_dir + commit, for a checkpoint already written to `local_dir`."""
        self.prepare(step, overwrite=overwrite)
        self.upload_dir(step, local_dir)
        return self.commit(step, state)

    # -- removing and copying ------------------------------------------------------------

    def delete(self, step: int) -> None:
        """Remove a checkpoint, its marker first so it is never seen half-deleted."""
        if self.fence is not None:
            self.fence.check(f"delete {self.uri_for(step)}")
        self.store.delete(f"{step_dir(step)}/{COMMIT_MARKER_NAME}")
        self.store.delete_prefix(step_dir(step))

    def apply_retention(self, keep_last: int, keep_every: int | None = None) -> builtins.list[int]:
        """Delete committed checkpoints outside the policy (see retention_plan) and the
        uncommitted leftovers older than the newest committed one; returns deleted steps."""
        if self.fence is not None:
            self.fence.check(f"apply retention under {self.uri}")
        every = self.steps(include_uncommitted=True)
        committed = [i.step for i in self._infos(every) if i is not None]
        doomed = retention_plan(committed, keep_last, keep_every)
        if committed:
            doomed += [s for s in every if s not in committed and s < committed[-1]]
        for step in sorted(doomed):
            self.delete(step)
        return sorted(doomed)

    def copy_to(
        self, dst: str | StoreURI | Store | CheckpointStore, steps: builtins.list[int] | None = None
    ) -> builtins.list[int]:
        """Copy committed checkpoints (all, or `steps`) to another checkpoint store, marker
        last; steps already committed there are skipped. Returns the steps copied."""
        target = (
            dst
            if isinstance(dst, CheckpointStore)
            else CheckpointStore(dst, retry=self.store.retry)
        )
        copied = []
        for step in steps if steps is not None else self.steps():
            info = self.get(step)
            if not target.is_committed(step):
                self._copy_one(info, target)
                copied.append(step)
        return copied

    # -- internals -----------------------------------------------------------------------

    def _copy_one(self, info: CheckpointInfo, target: CheckpointStore) -> None:
        target.prepare(info.step)
        source = self.store.child(step_dir(info.step))
        destination = target.store.child(step_dir(info.step))

        def copy(key: str) -> None:
            copy_object(source, key, destination, key)

        with ThreadPoolExecutor(max_workers=_COPY_CONCURRENCY) as pool:
            list(pool.map(copy, [f.path for f in info.files]))
        copy(COMMIT_MARKER_NAME)

    def _info(self, step: int) -> CheckpointInfo | None:
        key = f"{step_dir(step)}/{COMMIT_MARKER_NAME}"
        try:
            marker = self.store.read_json(key)
        except ObjectNotFoundError:
            return None
        try:
            files = tuple(CheckpointFile(str(f["path"]), int(f["bytes"]), f.get("sha256")) for f in marker["files"])
            if marker.get("format") != MARKER_FORMAT or int(marker["step"]) != step:
                raise ValueError("wrong format or step")
            producer = Producer.from_dict(marker["producer"]) if isinstance(marker.get("producer"), dict) else None
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(
                f"malformed commit marker {self.store.uri_of(key)}: {exc}", self.store.uri_of(key)
            ) from exc
        return CheckpointInfo(step, self.uri_for(step), str(marker.get("committed_at", "")), files, producer)

    def _infos(self, steps: builtins.list[int]) -> builtins.list[CheckpointInfo | None]:
        if len(steps) <= 1:
            return [self._info(s) for s in steps]
        with ThreadPoolExecutor(max_workers=min(_READ_CONCURRENCY, len(steps))) as pool:
            return list(pool.map(self._info, steps))


def _sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
