"""The spool: publishes not yet acknowledged by the MQTT server, kept in files across restarts.

A broker answers 200 for a key it has only queued while the MQTT server is
away; the spool makes that promise survive a stop or a crash. Every publish is
appended, as one JSON line ``[topic, base64 payload, qos, retain]``, to the
current *segment* file in the state directory before it is queued or sent; when
the server acknowledges it, a line with the record's number in its segment
(``17``) is appended and the segment's count of live records drops. A segment
holds at most :data:`SEGMENT_RECORDS` records; a full one is closed and a new
one begun, and a closed segment whose records are all acknowledged is deleted.
So the directory holds about as many records as wait for the server (bounded by
the queue limit, plus one segment of acknowledged ones), and the hot path never
rewrites a file: an append per publish and one per acknowledgement, an unlink per
segment.

On start, :meth:`Spool.open` reads the segments left by an earlier run and hands
back their unacknowledged records to publish again (in order); their files are
deleted as those are acknowledged. Delivery stays at least once (a PUBACK lost
with the connection means a repeat), which the workers shrug off: a repeated key
changes nothing.

Durability: ``write(2)`` hands each line to the kernel before the publish call
returns, so a killed process (SIGKILL, OOM, a crash) loses nothing; there is no
``fsync`` per line, which would cost a disk flush per key and cap a broker at a
few hundred keys a second. What a power cut may take is the last seconds of keys,
and a router whose key was lost registers again within a minute (Gluon retries
while its uplink is down). Segments still holding records are ``fsync``'ed at shutdown.

Each segment is locked (``flock``) by the process that has it open, so two
brokers pointed at one directory never take each other's records; a segment whose
lock is free belongs to a process that is gone and is adopted by the next start.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

#: Records per segment file before a new one is begun.
SEGMENT_RECORDS = 1000
#: A current segment with at least this many records, all acknowledged, is deleted at once
#: (so that a crash replays few publishes the server already had).
EMPTY_ROTATE = 64
_PREFIX = "outbox-"
_SUFFIX = ".jsonl"


class SpoolError(Exception):
    """The spool cannot be used; ``str()`` names the directory and the problem."""


@dataclass(frozen=True)
class Record:
    """One publish read back from the spool, with its :data:`Ticket`."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    ticket: Ticket


#: Where a record lives: (segment, number of the record in its segment).
Ticket = tuple[int, int]


@dataclass
class _Segment:
    path: str
    fd: int
    #: Records written and not yet released (acknowledged).
    live: int = 0
    written: int = 0


class Spool:
    """Append-only segment files of unacknowledged publishes in ``directory``.

    Everything happens on the caller's thread (the reactor's): :meth:`append` is
    one ``write(2)`` of about 100 bytes, :meth:`release_all` one of a few bytes per
    record and segment, or now
    and then an ``unlink(2)``; only :meth:`open` and :meth:`close` (once per run)
    read or sync.
    """

    def __init__(self, directory: str, segment_records: int = SEGMENT_RECORDS, label: str = "spool") -> None:
        self.directory = directory
        #: What error messages start with (the broker names its file and ``broker.state_dir``).
        self.label = label
        self.segment_records = segment_records
        self._segments: dict[int, _Segment] = {}
        self._current: int | None = None
        self._next_id = 0
        self._name = uuid.uuid4().hex[:12]
        self._serial = 0
        #: Lines of adopted segments that could not be read (a torn last line, say).
        self.skipped = 0
        #: Topics as JSON strings (the broker publishes on a handful of topics).
        self._quoted: dict[str, str] = {}

    # -- start and stop ---------------------------------------------------------------------

    def open(self) -> list[Record]:
        """Create the directory if needed; adopt what earlier runs left; their records, in order."""
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            names = sorted(os.listdir(self.directory))  # names begin with their creation time
        except OSError as exc:
            raise self._error(self.directory, "cannot use the directory", exc) from None
        records: list[Record] = []
        for name in names:
            if name.startswith(_PREFIX) and name.endswith(_SUFFIX):
                records += self._adopt(os.path.join(self.directory, name))
        return records

    def close(self) -> int:
        """Flush to disk and close every segment (records stay for the next start); how many live."""
        live = 0
        for segment in self._segments.values():
            live += segment.live
            if segment.live == 0:
                self._delete(segment)
            else:
                self._sync(segment)
            os.close(segment.fd)
        self._segments.clear()
        self._current = None
        return live

    # -- the hot path -----------------------------------------------------------------------

    def append(self, topic: str, payload: bytes, qos: int, retain: bool) -> Ticket:
        """Write one record; its ticket for :meth:`release`. Raises :class:`SpoolError`."""
        quoted = self._quoted.get(topic)
        if quoted is None:
            quoted = self._quoted[topic] = json.dumps(topic)
        # The JSON array [topic, payload, qos, retain], written by hand: json.dumps per key
        # costs three times the write(2) itself.
        line = f'[{quoted}, "{base64.b64encode(payload).decode("ascii")}", {qos}, {"true" if retain else "false"}]\n'
        sid = self._writable()
        segment = self._segments[sid]
        try:
            os.write(segment.fd, line.encode("utf-8"))
        except OSError as exc:
            raise self._error(segment.path, "cannot write", exc) from None
        segment.live += 1
        segment.written += 1
        return sid, segment.written - 1

    def release(self, ticket: Ticket) -> None:
        """The record is acknowledged: note it (a segment left empty and done is deleted instead)."""
        self.release_all((ticket,))

    def release_all(self, tickets: Iterable[Ticket]) -> None:
        """Several records are acknowledged (the PUBACKs of one read): one ``write(2)`` per segment."""
        lines: dict[int, list[bytes]] = {}
        for sid, number in tickets:
            segment = self._segments.get(sid)
            if segment is None:
                continue
            segment.live -= 1
            if segment.live <= 0 and (sid != self._current or segment.written >= EMPTY_ROTATE):
                if sid == self._current:
                    self._current = None
                self._drop(sid)
                lines.pop(sid, None)
                continue
            lines.setdefault(sid, []).append(b"%d\n" % number)
        for sid, numbers in lines.items():
            try:
                os.write(self._segments[sid].fd, b"".join(numbers))
            except OSError:
                pass  # only costs a repeat of these publishes after a crash

    @property
    def live(self) -> int:
        """Records written and not yet acknowledged."""
        return sum(s.live for s in self._segments.values())

    # -- inside -------------------------------------------------------------------------------

    def _writable(self) -> int:
        """The segment to append to, begun anew when there is none or the current one is full."""
        sid = self._current
        if sid is not None and self._segments[sid].written < self.segment_records:
            return sid
        if sid is not None:
            # Full: no more writes; deleted once its last record is acknowledged.
            self._current = None
            if self._segments[sid].live <= 0:
                self._drop(sid)
        self._serial += 1
        name = f"{_PREFIX}{time.time_ns():020d}-{self._name}-{self._serial:06d}{_SUFFIX}"
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self._error(path, "cannot create", exc) from None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh name: nobody else holds it
        sid = self._new_id()
        self._segments[sid] = _Segment(path, fd)
        self._current = sid
        return sid

    def _drop(self, sid: int) -> None:
        """Delete segment ``sid``: every record in it is acknowledged."""
        segment = self._segments.pop(sid)
        self._delete(segment)
        os.close(segment.fd)

    def _adopt(self, path: str) -> list[Record]:
        """Take over a segment whose owner is gone (its lock is free); its records."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            return []  # deleted meanwhile by its owner
        except OSError as exc:
            raise self._error(path, "cannot open", exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return []  # a running process owns it
        if not self._still_linked(path, fd):
            os.close(fd)
            return []  # its owner deleted it between our open and our lock
        with os.fdopen(os.dup(fd), "rb") as f:
            f.seek(0)
            data = f.read()
        sid = self._new_id()
        written: list[Record] = []
        acknowledged: set[int] = set()
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            if raw.strip().isdigit():
                acknowledged.add(int(raw))
                continue
            record = self._parse(raw, (sid, len(written)))
            if record is None:
                self.skipped += 1
            else:
                written.append(record)
        records = [r for r in written if r.ticket[1] not in acknowledged]
        segment = _Segment(path, fd, live=len(records), written=len(written))
        self._segments[sid] = segment
        if not records:
            self._drop(sid)
        return records

    @staticmethod
    def _parse(raw: bytes, ticket: Ticket) -> Record | None:
        try:
            topic, payload, qos, retain = json.loads(raw)
            data = base64.b64decode(payload, validate=True)
        except (ValueError, TypeError, binascii.Error):
            return None
        if not isinstance(topic, str) or qos not in (0, 1) or not isinstance(retain, bool):
            return None
        return Record(topic, data, qos, retain, ticket)

    @staticmethod
    def _still_linked(path: str, fd: int) -> bool:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def _error(self, path: str, what: str, exc: OSError) -> SpoolError:
        return SpoolError(f"{self.label}: {path}: {what}: {exc.strerror or exc}")

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    @staticmethod
    def _delete(segment: _Segment) -> None:
        try:
            os.unlink(segment.path)
        except FileNotFoundError:
            pass

    @staticmethod
    def _sync(segment: _Segment) -> None:
        try:
            os.fsync(segment.fd)
        except OSError:
            pass
