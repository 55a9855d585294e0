"""Key block/allow lists: file format, refusals, reload on SIGHUP, failures."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import ILogObserver, LogEvent, Logger, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.support.broker_fakes import KEY, KEY2
from wgkex.broker.keylists import KeyLists, KeyListService, ListUnreadable, parse_key_list, read_key_list

KEY3 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


class FakeFiles:
    """A reader over an in-memory dict of path -> text (missing path: unreadable)."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def __call__(self, path: str, log: Logger | None) -> frozenset[str]:
        if path not in self.files:
            raise ListUnreadable(f"key list {path} does not exist")
        return parse_key_list(self.files[path], path, log)


class FakeSignals:
    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {signal.SIGHUP: "previous"}

    def signal(self, signum: int, handler: Any) -> Any:
        old = self.handlers.get(signum)
        self.handlers[signum] = handler
        return old


@implementer(IReactorFromThreads)
class ImmediateReactor:
    def callFromThread(self, callable: Callable[..., object], *args: object, **kwargs: object) -> None:
        callable(*args, **kwargs)


class ParseTests(SynchronousTestCase):
    def test_format(self) -> None:
        """One key a line; comments, trailing comments and blank lines are ignored."""
        text = f"# blocked routers\n\n{KEY}\n  {KEY2}   # abuse 2024-01\n#{KEY3}\n"
        self.assertEqual(parse_key_list(text, "x"), frozenset({KEY, KEY2}))

    def test_bad_lines_skipped(self) -> None:
        """A line that is not a valid key is skipped, the rest still counts."""
        self.assertEqual(parse_key_list(f"garbage\n{KEY}\n", "x"), frozenset({KEY}))

    def test_read_missing_file(self) -> None:
        """A missing file raises ListUnreadable naming it."""
        path = self.mktemp()
        with self.assertRaises(ListUnreadable) as cm:
            read_key_list(path)
        self.assertIn(path, str(cm.exception))

    def test_read_real_file(self) -> None:
        """A real file is read and parsed."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(KEY + "\n")
        self.assertEqual(read_key_list(path), frozenset({KEY}))


class RefusalTests(SynchronousTestCase):
    def test_no_lists(self) -> None:
        """Without lists every key passes."""
        lists = KeyLists(None, None)
        lists.load()
        self.assertIsNone(lists.refusal(KEY))

    def test_blocklist(self) -> None:
        """A key on the block list is refused, others pass."""
        lists = KeyLists("block", None, reader=FakeFiles({"block": KEY}))
        lists.load()
        self.assertIn("block list", lists.refusal(KEY) or "")
        self.assertIsNone(lists.refusal(KEY2))

    def test_allowlist(self) -> None:
        """With an allow list, only keys on it pass."""
        lists = KeyLists(None, "allow", reader=FakeFiles({"allow": KEY}))
        lists.load()
        self.assertIsNone(lists.refusal(KEY))
        self.assertIn("allow list", lists.refusal(KEY2) or "")

    def test_block_beats_allow(self) -> None:
        """A key on both lists is refused."""
        lists = KeyLists("block", "allow", reader=FakeFiles({"block": KEY, "allow": f"{KEY}\n{KEY2}"}))
        lists.load()
        self.assertIsNotNone(lists.refusal(KEY))
        self.assertIsNone(lists.refusal(KEY2))

    def test_unreadable_at_start_refuses_everything(self) -> None:
        """A configured list that could never be read refuses every key, saying why."""
        lists = KeyLists("missing", None, reader=FakeFiles({}))
        lists.load()
        refusal = lists.refusal(KEY2)
        self.assertIsNotNone(refusal)
        self.assertIn("missing", refusal or "")

    def test_unreadable_on_reload_keeps_previous(self) -> None:
        """A list that fails on reload keeps the contents it had."""
        files = FakeFiles({"block": KEY})
        lists = KeyLists("block", None, reader=files)
        lists.load()
        del files.files["block"]
        lists.load()
        self.assertIsNotNone(lists.refusal(KEY))
        self.assertIsNone(lists.refusal(KEY2))

    def test_failed_reload_not_reported_as_loaded(self) -> None:
        """After a reload that failed, the log says which lists stay in force, not that they were loaded."""
        files = FakeFiles({"block": KEY})
        lists = KeyLists("block", None, reader=files)
        lists.load()
        del files.files["block"]
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        lists.load()
        texts = [formatEvent(e) for e in events]
        self.assertFalse([t for t in texts if "loaded" in t], texts)
        self.assertTrue([t for t in texts if "keeping the previous block list" in t], texts)
        self.assertTrue([t for t in texts if "1 blocked keys" in t], texts)

    def test_fixed_file_recovers(self) -> None:
        """Once the file is readable, a reload lifts the refuse-everything state."""
        files = FakeFiles({})
        lists = KeyLists(None, "allow", reader=files)
        lists.load()
        self.assertIsNotNone(lists.refusal(KEY))
        files.files["allow"] = KEY
        lists.load()
        self.assertIsNone(lists.refusal(KEY))


class ServiceTests(SynchronousTestCase):
    def test_sighup_reloads(self) -> None:
        """startService loads the lists and installs a SIGHUP handler that re-reads them."""
        files = FakeFiles({"block": KEY})
        lists = KeyLists("block", None, reader=files)
        signals = FakeSignals()
        service = KeyListService(lists, ImmediateReactor(), signals)
        service.startService()
        self.assertIsNotNone(lists.refusal(KEY))
        files.files["block"] = KEY2
        signals.handlers[signal.SIGHUP](signal.SIGHUP, None)
        self.assertIsNone(lists.refusal(KEY))
        self.assertIsNotNone(lists.refusal(KEY2))

    def test_stop_restores_previous_handler(self) -> None:
        """stopService puts back the SIGHUP handler that was there before."""
        lists = KeyLists("block", None, reader=FakeFiles({"block": KEY}))
        signals = FakeSignals()
        service = KeyListService(lists, ImmediateReactor(), signals)
        service.startService()
        self.assertNotEqual(signals.handlers[signal.SIGHUP], "previous")
        service.stopService()
        self.assertEqual(signals.handlers[signal.SIGHUP], "previous")

    def test_no_lists_sighup_is_harmless(self) -> None:
        """Without configured lists SIGHUP is still caught (its default action would kill the broker) and logged."""
        signals = FakeSignals()
        service = KeyListService(KeyLists(None, None), ImmediateReactor(), signals)
        service.startService()
        handler = signals.handlers[signal.SIGHUP]
        self.assertTrue(callable(handler))
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        handler(signal.SIGHUP, None)
        self.assertTrue(any("no key lists" in formatEvent(e) for e in events), events)
        service.stopService()
        self.assertEqual(signals.handlers[signal.SIGHUP], "previous")
