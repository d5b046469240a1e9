"""A directory of JSON records, one file each, written atomically and group-committed.

Layout of the directory (the relay queue and the webhook outbox are both one)::

    <key>.json        a record, human-readable JSON (the subclass's encoding)
    <key>.eml         its body, a hard link of the spool file, for records that keep one
    <key>.json.tmp    a record being written; left over only by a crash, removed by load()
    corrupt/          broken records (and their bodies) moved aside by load(), never deleted
    spare/            removed and replaced record files, reused for new ones instead of
                      freeing and allocating an inode per write (mailsrv.jsonstore.spares)

Every record is written to a temporary name and renamed over the real one, so a reader (the
CLI, a listing) sees the old record or the new one, never a part.  Two kinds of writes:

* in the committer's thread, :meth:`RecordDirectory.stage_record_blocking` links the body and
  writes the record with **no** fsync: the committer's second filesystem sync makes both durable
  before the client gets its 250, in the same sync as the Maildir links (so the directory must
  be on the spool's filesystem: all are under ``data_dir``);
* from the reactor, :meth:`~RecordDirectory.update`, :meth:`~RecordDirectory.put` and
  :meth:`~RecordDirectory.remove` are **group-committed**: every change asked for while a batch
  is being written waits for the next batch, which writes each new version to its temporary
  file, syncs them all with one ``syncfs(2)`` (the committer's syncer), renames each over its
  record, fsyncs the directory once and only then fires the Deferreds.  When a change's Deferred
  fires, the new state survives SIGKILL and power loss.  Several changes to one record in a
  batch are written once (the last wins).  One sync per batch rather than an fsync per record
  doubled the update rate with 50 concurrent writers on the development machine (about
  1,900/s against 900-1,100/s).  :meth:`~RecordDirectory.discard` is a removal with no sync of
  its own (no ``syncfs``, no directory fsync), for records whose return after a crash does no
  harm: it becomes durable with whatever syncs the filesystem next.

With :attr:`~RecordDirectory.cache_records` (the relay queue, whose scheduler holds every
unfinished record in memory anyway), the directory also keeps the current version of every
record it loaded, was told of (:meth:`~RecordDirectory.remember`, after the committer's sync)
or wrote, and serves :meth:`~RecordDirectory.get` and :meth:`~RecordDirectory.modify` from it:
there is one writer, so memory and disk agree once a batch is written, and a change costs no
read from disk (a trip to the I/O threads per delivery attempt).

A record is removed record first, then body, so a crash in between leaves only an orphan body,
which :meth:`~RecordDirectory.load` deletes; a record that no longer needs its body (see
:meth:`~RecordDirectory.needs_body`) has it removed once the new record is durable.  There is
one writer: the server while it runs, the CLI while it holds the lock instead
(:mod:`mailsrv.relay.queue_lock`).

A store is a subclass that says how its records are named, encoded and checked (the methods
marked *subclass* below) and what its log lines call them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsrv.delivery.fssync import filesystem_syncer
from mailsrv.filemodes import make_private_dirs
from mailsrv.fileops import fsync_directory, fsync_file, link_or_copy, unlink_if_present
from mailsrv.jsonstore.fields import RecordError
from mailsrv.jsonstore.files import TMP_SUFFIX, write_temporary
from mailsrv.jsonstore.spares import SparePool
from mailsrv.threads import RunInThread

R = TypeVar("R")

RECORD_SUFFIX = ".json"
BODY_SUFFIX = ".eml"
CORRUPT_DIR = "corrupt"


class StoreError(Exception):
    """An operation on a store was refused; the message is one line for the operator."""


@dataclass
class _Change(Generic[R]):
    """A write waiting for a batch: the new record, or None for removal."""

    record: R | None
    create: bool = False  # may make a record that is not on disk (put)
    lazy: bool = False  # a removal that needs no sync of its own (discard)
    waiters: list[Deferred[None]] = field(default_factory=list)


@dataclass(frozen=True)
class LoadReport:
    """What :meth:`RecordDirectory.load` found besides good records (for the log and tests)."""

    leftovers: tuple[str, ...] = ()
    orphans: tuple[str, ...] = ()
    corrupt: tuple[tuple[str, str, str], ...] = ()  # (file name, reason, moved to)


class RecordDirectory(Generic[R]):
    """Records of type ``R`` as files under ``root`` (see the module docstring).

    ``run_in_thread`` runs the blocking work; ``sync`` makes everything written under ``root``
    durable (default: ``syncfs(2)`` of its filesystem, made when first needed).
    """

    what = "record"
    """What the log lines call one record (``queue record``, ``outbox entry``)."""
    bodies_what = "bodies"
    """What the log lines call the body files."""
    orphan_note = "records already removed"
    """Why a body without a record is no loss (for the log line at load)."""
    cache_records = False
    """Keep every current record in memory and read from there (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        run_in_thread: RunInThread,
        sync: Callable[[], None] | None = None,
        log: Logger | None = None,
        body_spares: SparePool | None = None,
    ) -> None:
        self.root = root
        self.corrupt_dir = root / CORRUPT_DIR
        self.spares = SparePool(root)
        """Removed and replaced record files kept for reuse (:mod:`mailsrv.jsonstore.spares`)."""
        self.body_spares = body_spares
        """Where a body no one else holds goes when its record is done (the spool's pool, so
        the next message's spool file reuses its inode); None: removed."""
        self._run = run_in_thread
        self._sync_function = sync
        self._log = log or Logger(namespace="mailsrv")
        self._pending: dict[str, _Change[R]] = {}
        self._writing = False
        # The newest record of every key with a change pending or in flight (None: removed), so
        # reads see the changes asked for even before they are on disk.
        self._latest: dict[str, R | None] = {}
        # With cache_records: the version on disk of every record known (loaded, remembered,
        # read or written); a key missing here is read from disk.
        self._cache: dict[str, R] = {}
        # Keys changed while a read from disk was in flight (see _current).
        self._serial = 0
        self._reads = 0
        self._changed: dict[str, int] = {}
        self.batches = 0
        self.writes = 0
        self.last_load = LoadReport()

    # -- what a subclass says -------------------------------------------------------------------

    def encode(self, record: R) -> bytes:
        """*Subclass*: the stored bytes of ``record``."""
        raise NotImplementedError

    def decode(self, data: bytes, key: str) -> R:
        """*Subclass*: the record stored as ``data`` in the file of ``key`` (RecordError if bad,
        including a record that does not carry ``key``)."""
        raise NotImplementedError

    def key_of(self, record: R) -> str:
        """*Subclass*: the key (file name without suffix) of ``record``."""
        raise NotImplementedError

    def valid_key(self, key: str) -> bool:
        """*Subclass*: True when ``key`` can name a record (safe as a file name)."""
        raise NotImplementedError

    def sort_key(self, record: R) -> Any:
        """*Subclass*: the order of :meth:`load` and :meth:`records` (oldest first)."""
        raise NotImplementedError

    def needs_body(self, record: R) -> bool:
        """Whether ``record`` keeps a body file (one without it is broken); default: always."""
        return True

    def invalid_key(self, key: str) -> Exception:
        """The error for a key that cannot name a record."""
        return StoreError(f"invalid {self.what} id {key!r}")

    def missing(self, key: str) -> Exception:
        """The error for a key with no record."""
        return StoreError(f"no such {self.what} {key}")

    def loaded_line(self, records: list[R]) -> None:
        """Log the summary of a load (the subclass says what it counts)."""
        self._log.info("{what}s loaded: {count}", what=self.what, count=len(records))

    # -- paths ----------------------------------------------------------------------------------

    def checked(self, key: str) -> str:
        """``key``, or the error of :meth:`invalid_key` raised."""
        if not self.valid_key(key):
            raise self.invalid_key(key)
        return key

    def record_path(self, key: str) -> Path:
        """The record file of ``key``."""
        return self.root / f"{self.checked(key)}{RECORD_SUFFIX}"

    def body_path(self, key: str) -> Path:
        """The body file of ``key``."""
        return self.root / f"{self.checked(key)}{BODY_SUFFIX}"

    def _sync(self) -> None:
        """Make everything written under ``root`` durable (syncfs(2) of its filesystem)."""
        if self._sync_function is None:
            self._sync_function = filesystem_syncer(self.root)
        self._sync_function()

    # -- the committer's thread -----------------------------------------------------------------

    def stage_record_blocking(
        self, record: R, body_source: Path | None, durable: bool = False
    ) -> None:
        """Write a new ``record`` with a hard link of ``body_source`` as its body (blocking).

        Without ``durable``, nothing is synced: the caller makes both durable with its own
        filesystem sync.  FileExistsError if the record exists already.
        """
        key = self.key_of(record)
        path = self.record_path(key)
        if path.exists():
            raise FileExistsError(errno.EEXIST, f"{self.what} exists already", str(path))
        if body_source is not None:
            body = self.body_path(key)
            link_or_copy(body_source, body, _temporary)
            if durable:
                fsync_file(body)
        os.replace(write_temporary(path, self.encode(record), durable, self.spares), path)
        if durable:
            fsync_directory(self.root)

    def unstage_blocking(self, key: str) -> None:
        """Undo :meth:`stage_record_blocking` (blocking): remove the record and its body."""
        self.spares.keep(self.record_path(key))
        self._drop_body(key)

    def _drop_body(self, key: str) -> None:
        """Remove ``key``'s body (blocking): into the body spares if no one else holds it."""
        path = self.body_path(key)
        if self.body_spares is None or not self.body_spares.keep_if_alone(path):
            unlink_if_present(path)

    # -- recovery -------------------------------------------------------------------------------

    def load(self) -> Deferred[list[R]]:
        """At start, before anything else: recover and return every record, oldest first.

        Leftovers of interrupted writes are removed; broken records are moved aside with a log
        line, never fatal.
        """
        return _coroutine(self._load())

    async def _load(self) -> list[R]:
        loaded: tuple[list[R], LoadReport] = await self._run(self._load_blocking)
        return self._loaded(*loaded)

    def load_now(self) -> list[R]:
        """:meth:`load`, blocking: for the composition root, before the reactor runs (so that
        nothing can be staged while the recovery removes orphan bodies)."""
        return self._loaded(*self._load_blocking())

    def _loaded(self, records: list[R], report: LoadReport) -> list[R]:
        self.last_load = report
        self.remember(records)
        for name in report.leftovers:
            self._log.info("removed {file}, a record write interrupted by a crash", file=name)
        if report.orphans:
            self._log.info(
                f"removed {{count}} {self.bodies_what} without a record ({self.orphan_note})",
                count=len(report.orphans),
            )
        for name, reason, target in report.corrupt:
            self._log.warn(
                f"{self.what} {{file}} is broken ({{reason}}); moved to {{target}}",
                file=name,
                reason=reason,
                target=target,
            )
        self.loaded_line(records)
        return records

    def _load_blocking(self) -> tuple[list[R], LoadReport]:
        make_private_dirs(self.root)
        leftovers, corrupt = [], []
        keys: list[str] = []
        bodies: set[str] = set()
        for name in sorted(os.listdir(self.root)):
            if name.endswith(TMP_SUFFIX):
                (self.root / name).unlink()
                leftovers.append(name)
            elif name.endswith(RECORD_SUFFIX):
                keys.append(name[: -len(RECORD_SUFFIX)])
            elif name.endswith(BODY_SUFFIX):
                bodies.add(name[: -len(BODY_SUFFIX)])
        records = []
        for key in keys:
            try:
                record = self._read_file(self.root / f"{key}{RECORD_SUFFIX}", key)
                if key not in bodies and self.needs_body(record):
                    raise RecordError("its body is missing")
                if key in bodies and not self.needs_body(record):
                    (self.root / f"{key}{BODY_SUFFIX}").unlink()  # its removal was interrupted
                records.append(record)
            except (RecordError, OSError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                target = self._move_aside(key)
                corrupt.append((f"{key}{RECORD_SUFFIX}", reason, target))
            bodies.discard(key)
        orphans = []
        for key in sorted(bodies):
            (self.root / f"{key}{BODY_SUFFIX}").unlink()
            orphans.append(f"{key}{BODY_SUFFIX}")
        if leftovers or orphans or corrupt:
            fsync_directory(self.root)
        records.sort(key=self.sort_key)
        return records, LoadReport(tuple(leftovers), tuple(orphans), tuple(corrupt))

    def _move_aside(self, key: str) -> str:
        make_private_dirs(self.corrupt_dir)
        name = key
        for n in range(1, 10_000):
            if not (self.corrupt_dir / f"{name}{RECORD_SUFFIX}").exists():
                break
            name = f"{key}.{n}"
        for suffix in (RECORD_SUFFIX, BODY_SUFFIX):
            try:
                os.rename(self.root / f"{key}{suffix}", self.corrupt_dir / f"{name}{suffix}")
            except FileNotFoundError:
                pass
        fsync_directory(self.corrupt_dir)
        return f"{CORRUPT_DIR}/{name}{RECORD_SUFFIX}"

    # -- reads ----------------------------------------------------------------------------------

    def records(self) -> Deferred[list[R]]:
        """Every readable record now, oldest first (no recovery; broken ones are skipped)."""
        return _coroutine(self._records())

    async def _records(self) -> list[R]:
        found: dict[str, R] = await self._run(self._scan_blocking)
        for key, latest in self._latest.items():  # changes not on disk yet
            if latest is None:
                found.pop(key, None)
            elif key in found:
                found[key] = latest
        return sorted(found.values(), key=self.sort_key)

    def _scan_blocking(self) -> dict[str, R]:
        found = {}
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return {}
        for name in names:
            key = name[: -len(RECORD_SUFFIX)]
            if not name.endswith(RECORD_SUFFIX) or not self.valid_key(key):
                continue
            try:
                record = self._read_file(self.root / name, key)
            except FileNotFoundError:
                continue  # removed meanwhile
            except (RecordError, OSError) as e:
                self._log.warn(
                    f"skipping {self.what} {{file}}: {{reason}}", file=name, reason=str(e)
                )
                continue
            found[key] = record
        return found

    def remember(self, records: list[R]) -> None:
        """``records`` were just made durable by someone else (the committer's batch): with
        :attr:`cache_records`, later reads of them are served from memory."""
        if self.cache_records:
            for record in records:
                key = self.key_of(record)
                if key not in self._latest:
                    self._cache[key] = record

    def get(self, key: str) -> Deferred[R | None]:
        """The current record ``key`` (including changes still being written), or None."""
        self.checked(key)
        return _coroutine(self._current(key))

    async def _current(self, key: str) -> R | None:
        while True:
            if key in self._latest:
                return self._latest[key]
            cached = self._cache.get(key)
            if cached is not None:
                return cached
            start = self._serial
            self._reads += 1
            try:
                record: R | None = await self._run(self._read_blocking, key)
            finally:
                self._reads -= 1
                stale = self._changed.get(key, -1) > start
                if not self._reads:
                    self._changed.clear()
            if not stale:
                if record is not None and self.cache_records and key not in self._latest:
                    self._cache[key] = record
                return record
            # A change to this record was asked for (and maybe written) while we read: again.

    def _read_blocking(self, key: str) -> R | None:
        try:
            return self._read_file(self.record_path(key), key)
        except FileNotFoundError:
            return None

    def _read_file(self, path: Path, key: str) -> R:
        with open(path, "rb") as f:
            return self.decode(f.read(), key)

    # -- changes --------------------------------------------------------------------------------

    def update(self, record: R) -> Deferred[None]:
        """Replace the stored record of ``record``'s key; :meth:`missing` if it is gone."""
        return self._enqueue(self.checked(self.key_of(record)), record)

    def put(self, record: R) -> Deferred[None]:
        """Store ``record``, replacing the record of its key or making a new one (no body)."""
        return self._enqueue(self.checked(self.key_of(record)), record, create=True)

    def remove(self, key: str) -> Deferred[None]:
        """Remove the record ``key``, then its body; :meth:`missing` if it is gone."""
        return self._enqueue(self.checked(key), None)

    def discard(self, key: str) -> Deferred[None]:
        """Remove the record ``key`` and its body with no sync of their own, for a record whose
        return after a crash would do no harm (a delivered webhook event: it is sent again,
        with the same id).  The removal becomes durable with the next sync of the filesystem;
        a record already gone is no error."""
        return self._enqueue(self.checked(key), None, lazy=True)

    def modify(self, key: str, change: Callable[[R], R | None]) -> Deferred[R | None]:
        """Apply ``change`` to the current record and store the result (or remove the record if
        it returns None); fires with the result.  Changes to one record never overwrite each
        other.  :meth:`missing` if there is no record; an exception from ``change`` is passed on
        and nothing is written."""
        self.checked(key)
        return _coroutine(self._modify(key, change))

    async def _modify(self, key: str, change: Callable[[R], R | None]) -> R | None:
        current = await self._current(key)
        if current is None:
            raise self.missing(key)
        # From here to _enqueue nothing yields to the reactor: no other change can slip in.
        new = change(current)
        if new is current:
            return current  # nothing to write
        if new is not None and self.key_of(new) != key:
            raise ValueError(f"a change of {key} returned the record {self.key_of(new)}")
        await self._enqueue(key, new)
        return new

    # -- group commit ---------------------------------------------------------------------------

    def _enqueue(
        self, key: str, record: R | None, create: bool = False, lazy: bool = False
    ) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        change = self._pending.get(key)
        if change is None:
            change = self._pending[key] = _Change(record, lazy=lazy)
        change.record = record
        change.create = False if record is None else (change.create or create)
        change.lazy = change.lazy and lazy  # lazy only if every change merged here is
        change.waiters.append(done)
        self._latest[key] = record
        self._serial += 1
        if self._reads:
            self._changed[key] = self._serial
        self._start_batch()
        return done

    def _start_batch(self) -> None:
        if self._writing or not self._pending:
            return
        batch, self._pending = self._pending, {}
        self._writing = True
        items = [(key, change.record, change.create, change.lazy) for key, change in batch.items()]
        written: Deferred[dict[str, BaseException]] = self._run(self._write_batch, items)
        written.addBoth(self._batch_done, batch)

    def _write_batch(
        self, items: list[tuple[str, R | None, bool, bool]]
    ) -> dict[str, BaseException]:
        """Write one batch (in a thread): every new version to its temporary file, one sync
        for all their contents, the renames, one directory fsync (unless only discards
        succeeded); then drop removed bodies."""
        errors: dict[str, BaseException] = {}
        removed, written = [], []
        if any(create for _, _, create, _ in items):
            make_private_dirs(self.root)  # a put may be the directory's first record
        for key, record, create, lazy in items:
            try:
                if record is None:
                    if not self.spares.keep(self.record_path(key)) and not lazy:
                        raise self.missing(key)
                    removed.append(key)
                else:
                    temporary = write_temporary(
                        self.record_path(key), self.encode(record), False, self.spares
                    )
                    written.append((key, temporary, create))
                    if not self.needs_body(record):
                        removed.append(key)  # a body it may have had is not needed any more
            except Exception as e:
                errors[key] = e
        if written:
            self._sync()  # every new version's content is on disk before any rename
        for key, temporary, create in written:
            try:
                exists = self.record_path(key).exists()
                if not create and not exists:
                    temporary.unlink()
                    raise self.missing(key)  # removed meanwhile: never bring it back
                if exists:
                    self.spares.keep_link(self.record_path(key))  # the version replaced
                os.replace(temporary, self.record_path(key))
            except Exception as e:
                errors[key] = e
        if any(not lazy and key not in errors for key, _, _, lazy in items):
            fsync_directory(self.root)
        for key in removed:  # after the record's removal (or change) is durable
            if key not in errors:
                self._drop_body(key)
        return errors

    def _batch_done(
        self, outcome: dict[str, BaseException] | Failure, batch: dict[str, _Change[R]]
    ) -> None:
        self._writing = False
        self.batches += 1
        self.writes += len(batch)
        errors = {
            key: outcome.value if isinstance(outcome, Failure) else outcome.get(key)
            for key in batch
        }
        for key, change in batch.items():
            if errors[key] is None and change.record is not None and self.cache_records:
                self._cache[key] = change.record
            else:
                self._cache.pop(key, None)  # removed, or unknown after a failed write
            if key not in self._pending:
                self._latest.pop(key, None)  # the disk has the newest now
        for key, change in batch.items():
            error = errors[key]
            for waiter in change.waiters:
                if error is None:
                    waiter.callback(None)
                else:
                    waiter.errback(Failure(error))
        self._start_batch()


def _coroutine(coroutine: Coroutine[Any, Any, Any]) -> Deferred[Any]:
    return Deferred.fromCoroutine(coroutine)


def _temporary(body: Path) -> Path:
    """Where a copy of a body is written before its rename (beside it, with TMP_SUFFIX)."""
    return body.with_name(body.name + TMP_SUFFIX)
