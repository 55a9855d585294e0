"""Key block list and allow list: plain files, one key a line, re-read on SIGHUP.

``broker.key_blocklist`` names keys that are refused; with
``broker.key_allowlist`` set, only keys on it are accepted. Both are refused
with 403 before anything is published. File format::

    # comment lines and blank lines are ignored
    o52Ge+Rpj4CUSitVag9mS7pSXUesNM0ESnvj/wwehkg=   # a trailing comment too

A line that is not a valid key is logged (with file and line number) and
skipped. The files are read in :meth:`KeyListService.startService` and again
whenever the process gets SIGHUP; a file that cannot be read on a reload
leaves the previous list in force. If a configured file cannot be read at
start there is no previous list: the broker then refuses every key with a
403 that says so, because silently accepting keys an operator meant to
restrict would be worse.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from wgkex.keys import key_problem


class ListUnreadable(Exception):
    """A key list file could not be read; the text says which and why."""


def parse_key_list(text: str, path: str, log: Logger | None = None) -> frozenset[str]:
    """The keys in a list file's text; bad lines are logged and skipped."""
    keys: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        problem = key_problem(entry)
        if problem is not None:
            if log is not None:
                log.warn(
                    "{path} line {line}: {problem}; line ignored", path=path, line=number, problem=problem
                )
            continue
        keys.add(entry)
    return frozenset(keys)


def read_key_list(path: str, log: Logger | None = None) -> frozenset[str]:
    """Read and parse a key list file; raise :class:`ListUnreadable` with a reason."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ListUnreadable(f"key list {path} does not exist") from None
    except UnicodeDecodeError:
        raise ListUnreadable(f"key list {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ListUnreadable(f"key list {path} cannot be read: {exc.strerror}") from None
    return parse_key_list(text, path, log)


class KeyLists:
    """The block list and allow list in force; :meth:`refusal` is the check."""

    log = Logger()

    def __init__(
        self,
        blocklist_path: str | None,
        allowlist_path: str | None,
        reader: Callable[[str, Logger | None], frozenset[str]] = read_key_list,
    ) -> None:
        self.blocklist_path = blocklist_path
        self.allowlist_path = allowlist_path
        self._read = reader
        self.blocked: frozenset[str] = frozenset()
        self.allowed: frozenset[str] | None = None
        #: Why every key is refused (a list configured but never loaded), or None.
        self.broken: str | None = None
        self._loaded: set[str] = set()

    def load(self) -> None:
        """(Re-)read both files; a file that fails keeps its previous contents."""
        errors: dict[str, str] = {}
        for which, path in (("block", self.blocklist_path), ("allow", self.allowlist_path)):
            if path is None:
                continue
            try:
                keys = self._read(path, self.log)
            except ListUnreadable as exc:
                errors[which] = str(exc)
                if which in self._loaded:
                    self.log.error("{reason}; keeping the previous {which} list", reason=exc, which=which)
                else:
                    self.log.critical(
                        "{reason}; every key is refused until it is fixed (then send SIGHUP)", reason=exc
                    )
                continue
            if which == "block":
                self.blocked = keys
            else:
                self.allowed = keys
            self._loaded.add(which)
        never = [reason for which, reason in errors.items() if which not in self._loaded]
        self.broken = "; ".join(never) if never else None
        if self._loaded:
            self.log.info(
                "Key lists in force: {blocked} blocked keys, allow list {allowed}",
                blocked=len(self.blocked),
                allowed="off" if self.allowed is None else f"with {len(self.allowed)} keys",
            )

    def refusal(self, key: str) -> str | None:
        """Why ``key`` is refused by the lists, or None if it may pass."""
        if self.broken is not None:
            return f"the broker cannot check keys: {self.broken}"
        if key in self.blocked:
            return "public_key is on this broker's block list"
        if self.allowed is not None and key not in self.allowed:
            return "public_key is not on this broker's allow list"
        return None


class _Signals(Protocol):
    def signal(self, signalnum: int, handler: Any) -> Any: ...


_Handler = Callable[[int, FrameType | None], Any] | int | None


class KeyListService(Service):
    """Loads the key lists at start and again on SIGHUP (restoring the old handler at stop).

    The handler is installed even without configured lists: SIGHUP's default action
    would otherwise end the broker silently when an operator sends the reload signal.
    """

    name = "keylists"
    log = Logger()

    def __init__(self, lists: KeyLists, reactor: IReactorFromThreads, signals: _Signals = signal) -> None:
        self.lists = lists
        self._reactor = reactor
        self._signals = signals
        self._previous: _Handler = None
        self._installed = False

    def startService(self) -> None:
        super().startService()
        self.lists.load()
        self._previous = self._signals.signal(signal.SIGHUP, self._hangup)
        self._installed = True

    def _hangup(self, signum: int, frame: FrameType | None) -> None:
        # Signal handlers interrupt whatever the reactor thread was doing; do the work
        # from the reactor loop instead.
        self._reactor.callFromThread(self._reload)

    def _reload(self) -> None:
        if self.lists.blocklist_path is None and self.lists.allowlist_path is None:
            self.log.info(
                "SIGHUP: no key lists are configured (broker.key_blocklist, broker.key_allowlist); nothing to reload"
            )
            return
        self.lists.load()

    def stopService(self) -> None:
        if self._installed:
            self._signals.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
        super().stopService()
