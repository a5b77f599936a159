"""Hot reload of policy artifacts: on `POST /admin/reload` or when an artifact file changes.

With `cascade serve --workers N` the endpoint reaches one worker; that worker then bumps a
shared signal file (ReloadSignal) that every worker polls, so all of them reload.

A reload never drops or fails a request: every artifact is read and checked against its
cascade first, and only if all pass is each engine's policy swapped, in one assignment per
cascade; a request in flight finishes with the policy it started with (engine.run takes a
snapshot), and every ledger row carries the hash of the policy that decided it. A bad file
changes nothing: the endpoint answers with an error naming it, the watcher logs it and keeps
serving the old policy until the file is fixed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

from policies.artifact import ArtifactError, PolicyArtifact, parse_artifact
from policies.errors import InvalidInput
from proxy.engine.cascade import CascadeEngine, LoadedPolicy

log = logging.getLogger("cascade.reload")


class ReloadError(InvalidInput):
    """An artifact could not be read or does not fit its cascade; nothing was changed."""


def read_policy(path: str) -> PolicyArtifact:
    """The policy artifact file at `path`, read and checked (policies/artifact.py's loader);
    ArtifactError names what is wrong (missing, unreadable, or the bad key)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ArtifactError(
            f"policy artifact {path} does not exist (create one with `cascade fit`)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"policy artifact {path} cannot be read: {exc}") from None
    return parse_artifact(text, path)


@dataclass
class PolicyFiles:
    """The cascades whose policy comes from a file, and what each file looked like when
    last loaded (mtime and size: a changed file is reloaded by the watcher)."""

    engines: dict[str, CascadeEngine]
    paths: dict[str, str]  # cascade -> artifact path
    seen: dict[str, tuple[float, int] | None]

    @classmethod
    def of(cls, engines: dict[str, CascadeEngine], paths: dict[str, str | None]) -> PolicyFiles:
        files = {name: p for name, p in paths.items() if p}
        return cls(engines, files, {name: _stamp(p) for name, p in files.items()})

    def reload(self, names: list[str] | None = None) -> dict[str, dict]:
        """Reload the artifacts of `names` (default: every cascade with a policy file), all
        or nothing. Returns per cascade the old and new hash."""
        names = list(self.paths) if names is None else names
        prepared: dict[str, tuple[LoadedPolicy, tuple[float, int] | None]] = {}
        for name in names:
            path = self.paths[name]
            stamp = _stamp(path)
            try:
                prepared[name] = (self.engines[name].prepare(read_policy(path)), stamp)
            except ArtifactError as exc:
                raise ReloadError(f"cascade {name}: {exc}") from None
        out = {}
        for name, (loaded, stamp) in prepared.items():
            engine = self.engines[name]
            old = engine.policy_hash
            engine.current = loaded
            self.seen[name] = stamp
            out[name] = {"old_hash": old, "policy_hash": loaded.policy_hash}
        return out

    def changed(self) -> list[str]:
        """Cascades whose artifact file differs from the one last loaded."""
        return [name for name, path in self.paths.items() if _stamp(path) != self.seen[name]]

    async def watch(self, interval_s: float) -> None:
        """Poll the artifact files; reload a cascade whose file changed (and parses)."""
        failed: dict[str, tuple[float, int] | None] = {}
        while True:
            await asyncio.sleep(interval_s)
            for name in self.changed():
                stamp = _stamp(self.paths[name])
                if failed.get(name) == stamp:
                    continue  # already reported this broken version
                try:
                    done = self.reload([name])[name]
                except ReloadError as exc:
                    failed[name] = stamp
                    log.warning("policy reload skipped, still serving the old policy: %s", exc)
                    continue
                failed.pop(name, None)
                log.info("policy reloaded (its file changed): %s", describe({name: done}))


def describe(done: dict[str, dict]) -> str:
    """What a reload did, for its log line: `cascade qa sha256:... -> sha256:...` each."""
    if not done:
        return "no cascade has a policy file"
    return ", ".join(
        f"cascade {name} {(d['old_hash'] or 'none')[:19]} -> {(d['policy_hash'] or 'none')[:19]}"
        + (" (unchanged)" if d["old_hash"] == d["policy_hash"] else "")
        for name, d in done.items()
    )


RELOAD_SIGNAL_ENV = "CASCADE_RELOAD_SIGNAL"  # set by `cascade serve --workers N`
SIGNAL_POLL_S = 0.5


@dataclass
class ReloadSignal:
    """A file the workers of one `cascade serve --workers N` share: the worker that served
    `POST /admin/reload` rewrites it, and every worker that sees it change reloads its
    policies (a worker holds its own engines: nothing else crosses processes)."""

    path: str
    seen: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.seen = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        """Inode and mtime: every bump renames a new file over the old, so the inode alone
        tells two bumps apart, even within one clock tick."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def bump(self) -> None:
        """Tell the other workers to reload (this one already has)."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {time.time_ns()}\n")
        os.replace(tmp, self.path)  # atomic: a poller sees the old file or the new one
        self.seen = self._stamp()

    async def follow(self, files: PolicyFiles, interval_s: float = SIGNAL_POLL_S) -> None:
        """Poll the signal file; when another worker has bumped it, reload every policy."""
        while True:
            await asyncio.sleep(interval_s)
            stamp = self._stamp()
            if stamp == self.seen:
                continue
            self.seen = stamp
            try:
                done = await asyncio.to_thread(files.reload)
            except ReloadError as exc:
                log.warning("reload asked by another worker failed, old policy kept: %s", exc)
                continue
            log.info("policy reloaded (another worker was asked to): %s", describe(done))


def _stamp(path: str) -> tuple[float, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size
