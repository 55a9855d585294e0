"""The spool on a real temporary directory: what a restart (clean or after a kill) finds again."""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from wgkex.mqtt.spool import EMPTY_ROTATE, Record, Spool, SpoolError


class SpoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="wgkex-spool-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.state = os.path.join(self.dir, "state")

    def spool(self, segment_records: int = 1000) -> Spool:
        spool = Spool(self.state, segment_records)
        self.addCleanup(spool.close)
        return spool

    def files(self) -> list[str]:
        return sorted(os.listdir(self.state))

    def keys(self, records: list[Record]) -> list[bytes]:
        return [r.payload for r in records]

    def test_killed_process_leaves_everything_for_the_next_start(self) -> None:
        """Records appended and never acknowledged are read back, in order, by a new start (no close)."""
        first = Spool(self.state)
        self.assertEqual(first.open(), [])
        for i in range(5):
            first.append("wireguard/ffmuc_welt/all", b"key%d" % i, 1, False)
        # No close(): the process was killed. Its lock dies with its descriptors.
        first_fds = [s.fd for s in first._segments.values()]
        for fd in first_fds:
            os.close(fd)
        records = self.spool().open()
        self.assertEqual(self.keys(records), [b"key%d" % i for i in range(5)])
        self.assertEqual({(r.topic, r.qos, r.retain) for r in records}, {("wireguard/ffmuc_welt/all", 1, False)})

    def test_acknowledged_records_are_not_replayed_after_a_clean_stop(self) -> None:
        """close() deletes segments whose records were all acknowledged and keeps the others."""
        first = Spool(self.state, segment_records=3)
        first.open()
        tickets = [first.append("t", b"k%d" % i, 1, False) for i in range(5)]
        for ticket in tickets[:3]:  # the whole first segment
            first.release(ticket)
        self.assertEqual(len(self.files()), 1)
        self.assertEqual(first.close(), 2)
        self.assertEqual(self.keys(self.spool().open()), [b"k3", b"k4"])

    def test_empty_spool_leaves_no_files(self) -> None:
        """A stop with everything acknowledged leaves the directory empty."""
        spool = Spool(self.state)
        spool.open()
        ticket = spool.append("t", b"k", 1, False)
        spool.release(ticket)
        self.assertEqual(spool.close(), 0)
        self.assertEqual(self.files(), [])

    def test_current_segment_deleted_once_drained(self) -> None:
        """A segment holding many records, all acknowledged, is deleted without waiting to fill up."""
        spool = self.spool()
        spool.open()
        tickets = [spool.append("t", b"k", 1, False) for _ in range(EMPTY_ROTATE)]
        for ticket in tickets:
            spool.release(ticket)
        self.assertEqual(self.files(), [])
        spool.append("t", b"next", 1, False)
        self.assertEqual(len(self.files()), 1)

    def test_adopted_segment_deleted_when_replayed_records_are_acknowledged(self) -> None:
        """Records replayed from an earlier run remove their file once all are acknowledged."""
        first = Spool(self.state)
        first.open()
        first.append("t", b"a", 1, False)
        first.append("t", b"b", 1, False)
        first.close()
        second = self.spool()
        records = second.open()
        self.assertEqual(len(self.files()), 1)
        second.release(records[0].ticket)
        self.assertEqual(len(self.files()), 1)
        second.release(records[1].ticket)
        self.assertEqual(self.files(), [])

    def test_acknowledgements_survive_a_kill(self) -> None:
        """Records acknowledged before a kill are not replayed; the others are, in order."""
        first = Spool(self.state)
        first.open()
        tickets = [first.append("t", b"k%d" % i, 1, False) for i in range(4)]
        first.release(tickets[0])
        first.release(tickets[2])
        for segment in first._segments.values():
            os.close(segment.fd)  # killed: no close()
        second = self.spool()
        records = second.open()
        self.assertEqual(self.keys(records), [b"k1", b"k3"])
        for record in records:
            second.release(record.ticket)
        self.assertEqual(self.files(), [])

    def test_acknowledgements_released_together_survive_a_kill(self) -> None:
        """Records acknowledged in one batch across segments are not replayed after a kill; the others are."""
        first = Spool(self.state, segment_records=3)
        first.open()
        tickets = [first.append("t", b"k%d" % i, 1, False) for i in range(6)]
        first.release_all([tickets[1], tickets[3], tickets[4], tickets[0]])
        for segment in first._segments.values():
            os.close(segment.fd)  # killed: no close()
        second = self.spool()
        self.assertEqual(self.keys(second.open()), [b"k2", b"k5"])

    def test_running_owner_keeps_its_records(self) -> None:
        """A second spool on the same directory does not take segments another process has open."""
        first = self.spool()
        first.open()
        first.append("t", b"mine", 1, False)
        self.assertEqual(self.spool().open(), [])
        self.assertEqual(first.live, 1)

    def test_torn_line_is_skipped_and_counted(self) -> None:
        """A half-written last line (a crash mid-write) is skipped; the lines before it are kept."""
        first = Spool(self.state)
        first.open()
        first.append("t", b"whole", 1, False)
        (segment,) = first._segments.values()
        os.write(segment.fd, b'["t", "aGFs')
        first.close()
        second = self.spool()
        self.assertEqual(self.keys(second.open()), [b"whole"])
        self.assertEqual(second.skipped, 1)

    def test_unusable_directory_is_one_line(self) -> None:
        """A state directory that cannot be created raises SpoolError naming it."""
        blocker = os.path.join(self.dir, "file")
        with open(blocker, "w"):
            pass
        spool = Spool(os.path.join(blocker, "state"))
        with self.assertRaises(SpoolError) as ctx:
            spool.open()
        self.assertIn(blocker, str(ctx.exception))
        self.assertNotIn("\n", str(ctx.exception))


class StateDirConfigTests(SynchronousTestCase):
    def parse(self, broker: object) -> str:
        from wgkex.config import parse_config

        data = {"domains": ["ffmuc_welt"], "domain_prefixes": ["ffmuc_"], "broker": broker}
        return parse_config(data, "wgkex.yaml", hostname=lambda: "testhost").broker.state_dir

    def test_default_and_given(self) -> None:
        """broker.state_dir defaults to /var/lib/wgkex and takes an absolute path."""
        self.assertEqual(self.parse({}), "/var/lib/wgkex")
        self.assertEqual(self.parse({"state_dir": "/srv/wgkex"}), "/srv/wgkex")

    def test_bad_values_are_one_line(self) -> None:
        """A relative path, a non-string or a file stops with one line naming broker.state_dir."""
        from wgkex.config import ConfigError

        with tempfile.NamedTemporaryFile() as f:
            cases = [("state", "must be an absolute path"), (123, "must be a directory path (quoted)"),
                     (f.name, "exists and is not a directory")]
            for value, problem in cases:
                with self.assertRaises(ConfigError) as ctx:
                    self.parse({"state_dir": value})
                self.assertIn("wgkex.yaml: broker.state_dir: ", str(ctx.exception))
                self.assertIn(problem, str(ctx.exception))
