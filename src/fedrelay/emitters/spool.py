"""The on-disk spool: unacked events that must outlive memory or the process.

Layout, one directory per producer name (the name *is* the directory name)::

    <spool_dir>/<producer>/lock                      flock held by the owning process
    <spool_dir>/<producer>/meta.json                 who wrote it, a bound on the ids sent
    <spool_dir>/<producer>/<first>-<last>-<n>.seg    n events, ids first..last, in order

A segment holds one relay frame's worth of events, one ``<id>\\t<json>`` line
each, and is written to a dot-file, fsynced, then renamed, so a reader never
sees half a segment (``meta.json`` likewise, and the directory is fsynced after
each batch of segments). A write that training waits for (``Emitter.settle``)
skips the fsyncs: renamed into place, the file survives the process; the sender
syncs it (``Spool.sync``) soon after, and ``close()`` before it returns. A
segment that is nonetheless missing, truncated or garbled (a power loss, a disk
error, a hand edit) is renamed to ``*.seg.bad`` and skipped, so that it cannot
stop delivery of the rest. Segments are always the *oldest* unacked events of
their producer; newer ones are in memory.
Several processes (Ray actors, ``fedrelay sync``) may share a spool dir: a
producer directory is only touched by whoever holds its lock, and the lock
dies with its process.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..names import RUN_ID_RE

try:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True


Entry = tuple[int, str]
"""An encoded event: its id and its JSON text."""


class DamagedSegment(ValueError):
    """A segment file whose content does not match its name: truncated, empty or garbled."""


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Segment:
    """One segment file, by name: where its directory is (and is renamed to) is the spool's business."""

    first: int
    last: int
    count: int
    name: str

    @classmethod
    def parse(cls, name: str) -> Segment | None:
        stem, dot, ext = name.rpartition(".")
        if not dot or ext != "seg":
            return None
        try:
            first, last, count = (int(part) for part in stem.split("-"))
        except ValueError:
            return None
        return cls(first, last, count, name)

    @classmethod
    def named(cls, first: int, last: int, count: int) -> Segment:
        return cls(first, last, count, f"{first:020d}-{last:020d}-{count}.seg")


def run_of(line: str) -> str | None:
    """The run id of an encoded event, without parsing it: the encoder writes ``type`` then
    ``run_id`` first, and neither can hold a quote."""
    head = line[:300]
    start = head.find('"run_id":"')
    if start < 0:
        return None
    start += len('"run_id":"')
    end = head.find('"', start)
    return head[start:end] if end > start else None


class Spool:
    """One producer's spool directory, locked by this process while open.

    File operations only: which segments exist, in what order they are sent and when they
    may go is the emitter core's (``core.EmitterCore``) state. ``found`` lists the segments
    that were already there when the directory was adopted.
    """

    def __init__(self, path: Path, lock_fd: int, meta: dict[str, Any], found: list[Segment]):
        self.path = path
        self._lock_fd: int | None = lock_fd
        self._guard = threading.Lock()
        self.meta = meta
        self.found = found
        self.unsynced: list[str] = []
        """Files renamed into place without an fsync (``append(..., sync=False)``); ``..`` for the
        directory's own rename into place."""

    # -- opening ---------------------------------------------------------

    @classmethod
    def create(cls, root: Path, producer: str, meta: dict[str, Any], *, sync: bool = True) -> Spool | None:
        """A new, locked directory for ``producer``; None if the name is taken.

        Built under a dot-name and renamed into place with the lock already
        held, so that a scanning process never adopts a half-made directory.
        """
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".new-{uuid.uuid4().hex}"
        tmp.mkdir()
        fd = os.open(tmp / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        _try_lock(fd)
        spool = cls(tmp, fd, {**meta, "producer": producer}, [])
        spool.write_meta(sync=sync)
        try:
            os.rename(tmp, root / producer)
        except OSError:
            spool.release()
            return None
        spool.path = root / producer
        if sync:
            _fsync_dir(root)  # the rename into place, else a power loss leaves only the dot-name
        else:
            spool.unsynced.append("..")
        return spool

    @classmethod
    def adopt(cls, path: Path) -> Spool | None:
        """Lock an existing producer directory; None when its owner is alive."""
        try:
            fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
        if not _try_lock(fd):
            os.close(fd)
            return None
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
        meta["producer"] = path.name
        try:
            names = [p.name for p in path.glob("*.seg")]
        except OSError:
            names = []
        segments = sorted(
            (seg for seg in map(Segment.parse, names) if seg is not None), key=lambda s: s.first
        )
        for tmp in path.glob(".*.tmp"):  # a write its process did not finish: never a whole segment
            with contextlib.suppress(OSError):
                tmp.unlink()
        return cls(path, fd, meta, segments)

    # -- reading and writing ---------------------------------------------

    @property
    def producer(self) -> str:
        return self.path.name

    def append(self, entries: list[Entry], *, sync: bool = True) -> Segment:
        """Write ``entries`` (newer than everything already here) as one segment.

        ``sync=False``: no fsync now (the file survives the process, not yet a power loss);
        :meth:`sync` does it later.
        """
        segment = Segment.named(entries[0][0], entries[-1][0], len(entries))
        tmp = self.path / f".{segment.name}.tmp"
        try:
            with open(tmp, "w", encoding="ascii") as fh:
                fh.writelines(f"{event_id}\t{line}\n" for event_id, line in entries)
                fh.flush()
                if sync:
                    os.fsync(fh.fileno())  # else a power loss can leave an empty file under the new name
            os.replace(tmp, self.path / segment.name)
            if not sync:
                self.unsynced.append(segment.name)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()  # a full disk: give the space back
            raise
        return segment

    def read(self, segment: Segment) -> list[Entry]:
        """The segment's events; OSError when unreadable, DamagedSegment when not what its name says.

        Checked: every line complete (newline-terminated), ``<id>\\t{...}``, ids increasing from
        ``first`` to ``last``, ``count`` of them. Event JSON is produced by the emitter as ASCII
        objects, so a line that is not one (zeroed blocks, a cut) is damage.
        """
        with open(self.path / segment.name, "rb") as fh:
            raw = fh.read()
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise DamagedSegment(f"{segment.name}: not ASCII") from None
        if not text.endswith("\n"):
            raise DamagedSegment(f"{segment.name}: {'empty' if not text else 'truncated'}")
        entries: list[Entry] = []
        previous = segment.first - 1
        for line in text[:-1].split("\n"):
            event_id, _, body = line.partition("\t")
            try:
                number = int(event_id)
            except ValueError:
                raise DamagedSegment(f"{segment.name}: bad id {event_id[:20]!r}") from None
            if number <= previous or not (body.startswith("{") and body.endswith("}")):
                raise DamagedSegment(f"{segment.name}: bad line for id {number}")
            entries.append((number, body))
            previous = number
        if len(entries) != segment.count or entries[0][0] != segment.first or previous != segment.last:
            raise DamagedSegment(f"{segment.name}: {len(entries)} events, not {segment.count}")
        return entries

    def quarantine(self, segment: Segment) -> Path | None:
        """Set a segment that cannot be read aside (``*.seg.bad``); where it went, if anywhere."""
        target = self.path / (segment.name + ".bad")
        try:
            os.replace(self.path / segment.name, target)
        except OSError:
            return None
        return target

    def remove(self, segments: list[Segment]) -> None:
        """Delete segments an ack covered."""
        for segment in segments:
            with contextlib.suppress(FileNotFoundError):
                (self.path / segment.name).unlink()

    def write_meta(self, *, sync: bool = True, **changes: Any) -> None:
        """Update ``meta.json`` durably; also makes the segments renamed into place before durable.

        ``sync=False``: renamed into place without fsyncs, left for :meth:`sync`.
        """
        self.meta.update(changes)
        tmp = self.path / ".meta.json.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(self.meta))
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        os.replace(tmp, self.path / "meta.json")
        if sync:
            _fsync_dir(self.path)
        elif "meta.json" not in self.unsynced:
            self.unsynced.append("meta.json")

    def sync(self) -> None:
        """Make what was written with ``sync=False`` durable: each file, then the directory."""
        if not self.unsynced:
            return
        names, self.unsynced = self.unsynced, []
        for name in names:
            if name == "..":
                _fsync_dir(self.path.parent)
                continue
            try:
                fd = os.open(self.path / name, os.O_RDONLY)
            except FileNotFoundError:  # acked and deleted meanwhile
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(self.path)

    def rename(self, producer: str) -> bool:
        """Move to a new producer name (the relay knows the old one from elsewhere)."""
        target = self.path.parent / producer
        try:
            os.rename(self.path, target)
        except OSError:
            return False
        self.path = target
        self.write_meta(producer=producer)
        return True

    def release(self) -> None:
        """Unlock; an emptied directory is removed, a non-empty one left for sync."""
        with self._guard:
            fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            empty = not any(self.path.glob("*.seg"))
        except OSError:
            empty = False
        if empty:
            for name in ("meta.json", "lock"):
                with contextlib.suppress(OSError):
                    (self.path / name).unlink()
            with contextlib.suppress(OSError):
                self.path.rmdir()
        with contextlib.suppress(OSError):
            os.close(fd)

    def forget_lock(self) -> None:
        """In a forked child: drop our copy of the fd; the parent keeps the lock."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None


def producer_dirs(root: Path, exclude: str | None = None) -> Iterator[Path]:
    """Producer directories under ``root`` (oldest first), whoever owns them."""
    try:
        dirs = [p for p in root.iterdir() if RUN_ID_RE.fullmatch(p.name) and not p.name.startswith(".")]
        dirs = [p for p in dirs if p.is_dir()]
    except OSError:
        return
    dirs.sort(key=lambda p: _mtime(p))
    for path in dirs:
        if path.name != exclude:
            yield path


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def spooled_events(path: Path) -> int:
    """How many events a producer directory holds, without locking it."""
    try:
        segments = (Segment.parse(p.name) for p in path.glob("*.seg"))
        return sum(seg.count for seg in segments if seg is not None)
    except OSError:
        return 0
