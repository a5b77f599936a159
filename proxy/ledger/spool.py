"""The ledger's spool: the local file records wait in while the database is unusable.

A spool is JSON lines, one :class:`RequestRecord` each, appended durably (``fsync``) in the
order the writer saw them; the writer replays it in that order and, once all of it is in the
database, replaces it by an empty file (atomic rename). A crash mid-append leaves a torn last
line: the next append starts on a fresh line, and the replay drops the torn one with a
warning. A line that does not parse otherwise goes to ``<spool>.rejected`` with the reason,
as does a record the database refuses, so that neither blocks the spool nor is lost
silently.

Several writers may share one spool path (uvicorn workers, or instances started in the same
folder): each claims a spool *slot* (:meth:`Spool.claim_slot`), an exclusive ``flock`` held
until :meth:`Spool.release_slot` or process exit: slot 0 is the given path, slot k is
``<stem>-k<suffix>`` beside it. Two writers therefore never append to, replay or truncate the
same file, and a writer restarted after a crash gets a free slot back (usually its own). At
start a writer also adopts the spool of any slot no live writer holds (a worker that died and
was not replaced, or a run with more workers than now), so no spooled record is stranded.

When the writer's thread is stuck at close, what it held goes to a *side spool*
(``<spool>.side-<pid>-<ns>``) instead, which the next start merges into the spool.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path

from proxy.ledger.records import RequestRecord

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one writer per spool path, unchecked
    fcntl = None

log = logging.getLogger("cascade.ledger")
MAX_SPOOL_SLOTS = 256


class Spool:
    """One writer's spool file (its slot), the side spools and orphans it adopts, and its
    rejected file. Appends, reads and truncation of the spool file happen under
    :attr:`lock`, which callers hold around a read and what they decide from it."""

    def __init__(self, base_path: Path) -> None:
        self.base_path = base_path
        self.path = base_path  # this writer's slot, chosen by claim_slot()
        self.rejected_path = self.path.with_name(self.path.name + ".rejected")
        self.lock = threading.Lock()
        self._slot_fd: int | None = None
        self.replay_offset = 0  # bytes of the spool already in the database
        self._rejected_upto = 0  # spool bytes whose unreadable lines were already rejected

    # ------------------------------------------------------------------ slots

    def claim_slot(self) -> None:
        """Take the first spool slot no live writer holds (see the module docstring)."""
        if self._slot_fd is not None or fcntl is None:
            return
        try:
            self.base_path.parent.mkdir(parents=True, exist_ok=True)
            for slot in range(MAX_SPOOL_SLOTS):
                path = _slot_path(self.base_path, slot)
                fd = _try_lock(path)
                if fd is not None:
                    self._slot_fd = fd
                    self.path = path
                    self.rejected_path = path.with_name(path.name + ".rejected")
                    return
            log.error("ledger: every spool slot of %s is taken", self.base_path)
        except OSError:
            log.exception("ledger: cannot lock a spool slot beside %s", self.base_path)

    def release_slot(self) -> None:
        fd, self._slot_fd = self._slot_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def _adopt_orphans(self) -> None:
        """Move the spools of slots no live writer holds into this writer's spool."""
        if self._slot_fd is None:
            return
        base = self.base_path
        slot_name = re.compile(rf"{re.escape(base.stem)}-[0-9]+{re.escape(base.suffix)}")
        others = [base, *(p for p in base.parent.iterdir() if slot_name.fullmatch(p.name))]
        for other in others:
            if other == self.path:
                continue
            sides = sorted(other.parent.glob(other.name + ".side-*"))
            if not other.exists() and not sides:
                continue
            fd = _try_lock(other)
            if fd is None:
                continue  # a live writer owns it
            try:
                for path in [*sides, other]:
                    if path.exists():
                        data = path.read_bytes()
                        if data.strip():
                            _append(self.path, data if data.endswith(b"\n") else data + b"\n")
                            log.warning("ledger: adopted the orphaned spool %s", path)
                        path.unlink()  # a crash before this: replayed twice, landing once
                _fsync_dir(self.path.parent)
            finally:
                os.close(fd)

    def recover(self) -> int:
        """At start: adopt orphaned slots, merge side spools left by a stuck close; the
        number of records waiting in the spool."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            self._adopt_orphans()
            for side in sorted(self.path.parent.glob(self.path.name + ".side-*")):
                data = side.read_bytes()
                if data:
                    _append(self.path, data if data.endswith(b"\n") else data + b"\n")
                side.unlink()
                _fsync_dir(self.path.parent)
            count = 0
            if self.path.exists():
                with open(self.path, "rb") as fh:
                    count = sum(1 for line in fh if line.strip())
        return count

    # ------------------------------------------------------------------ writing

    def append(self, data: bytes) -> None:
        """Append encoded records (see :func:`encode`) to the spool; raises on I/O errors."""
        with self.lock:
            _append(self.path, data)

    def append_from_caller(self, data: bytes, side: bool) -> None:
        """Append from outside the writer's thread (it stopped, or is stuck): to the spool,
        else (``side``, or its lock not free within a second) to a side spool that the next
        start merges. Raises on I/O errors."""
        if not side and self.lock.acquire(timeout=1.0):
            try:
                _append(self.path, data)
            finally:
                self.lock.release()
        else:
            name = f"{self.path.name}.side-{os.getpid()}-{time.time_ns()}"
            _append(self.path.with_name(name), data)

    def reject(self, record: RequestRecord, exc: BaseException) -> None:
        """Keep a record the database refused in the rejected file, with the error."""
        try:
            line = {"error": str(exc)[:2000], "record": record.to_dict()}
            _append(self.rejected_path, (json.dumps(line, default=str) + "\n").encode())
        except Exception:
            log.exception("ledger: cannot write %s", self.rejected_path)

    def _reject_raw(self, text: str, exc: BaseException, at_byte: int) -> None:
        try:
            line = {"error": f"unreadable spool line at byte {at_byte}: {exc}", "raw": text}
            _append(self.rejected_path, (json.dumps(line) + "\n").encode())
        except Exception:
            log.exception("ledger: cannot write %s", self.rejected_path)

    # ------------------------------------------------------------------ replaying (under lock)

    def exists(self) -> bool:
        return self.path.exists()

    def read_chunk(self, limit: int) -> tuple[list[RequestRecord], int, int, int]:
        """Up to ``limit`` records of the spool from the replay offset: (records, the offset
        after them, spool lines read, lines rejected). A line that does not parse is rejected
        once (a torn last line, left by a crash mid-append, is dropped with a warning). The
        caller moves :attr:`replay_offset` once the records are in the database."""
        records: list[RequestRecord] = []
        offset = self.replay_offset
        lines = rejected = 0
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            for raw in fh:
                start, offset = offset, offset + len(raw)
                text = raw.strip()
                if not text:
                    continue
                lines += 1
                try:
                    records.append(RequestRecord.from_dict(json.loads(text)))
                except Exception as exc:
                    if start >= self._rejected_upto:
                        self._rejected_upto = offset
                        if raw.endswith(b"\n"):
                            self._reject_raw(text.decode("utf-8", "replace"), exc, start)
                            rejected += 1
                        else:
                            log.warning("ledger: dropping a torn last line of %s", self.path)
                    continue
                if len(records) >= limit:
                    break
        return records, offset, lines, rejected

    def truncate(self) -> None:
        """Replace the spool by an empty file (atomically), all of it being replayed."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self.rewind()

    def rewind(self) -> None:
        """Forget the replay's progress: the spool is empty or gone."""
        self.replay_offset = self._rejected_upto = 0


def encode(records: list[RequestRecord]) -> bytes:
    """Records as spool lines."""
    return "".join(
        json.dumps(r.to_dict(), separators=(",", ":"), default=str) + "\n" for r in records
    ).encode("utf-8")


def _append(path: Path, data: bytes) -> None:
    """Append ``data`` durably; start on a fresh line if a crash tore the last one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    data = b"\n" + data
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _slot_path(base: Path, slot: int) -> Path:
    """The spool file of `slot`: `base` itself for slot 0, else `<stem>-<slot><suffix>`."""
    return base if slot == 0 else base.with_name(f"{base.stem}-{slot}{base.suffix}")


def _try_lock(spool: Path) -> int | None:
    """An fd holding the exclusive flock of `spool`'s lock file, or None if another holds it.

    The lock file is never deleted: deleting it could let two writers lock two different
    files of the same name."""
    fd = os.open(spool.with_name(spool.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync_dir(path: Path) -> None:
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
