"""The lab's own pieces that need no root: the router's request, reply parsing, the state ledger."""

from __future__ import annotations

import io
import os
import socket
import tempfile
import threading
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from wgkex.lab import demo
from wgkex.lab.proc import LabError, Proc, spawn
from wgkex.lab.router import parse_v2, post_key
from wgkex.lab.state import Ledger

KEY = "o52Ge+Rpj4CUSitVag9mS7pSXUesNM0ESnvj/wwehkg="
REPLY = (b'{"Endpoint": {"Address": "2001:db8::1", "Port": "51820", '
         b'"AllowedIPs": ["fe80::2a6:8fff:fe21:5465"], "PublicKey": "' + KEY.encode() + b'"}}')


class OneShotServer:
    """A TCP server on 127.0.0.1 that records one raw request and answers with ``reply``."""

    def __init__(self, reply: bytes) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.request = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(5)
            while not self.request.endswith(b"0\r\n\r\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                self.request += chunk
            conn.sendall(self.reply)
        self.sock.close()


class RouterRequestTests(SynchronousTestCase):
    def test_post_like_uclient_fetch(self) -> None:
        """The key goes out chunked, form-urlencoded, with Gluon headers and checkuplink's exact body."""
        server = OneShotServer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                               + str(len(REPLY)).encode() + b"\r\nConnection: close\r\n\r\n" + REPLY)
        status, headers, body, _ = post_key(f"http://127.0.0.1:{server.port}/api/v2/wg/key/exchange",
                                            "ffmuc_welt", KEY, board="node7")
        server.thread.join(5)
        head, _, payload = server.request.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.assertEqual(lines[0], "POST /api/v2/wg/key/exchange HTTP/1.1")
        fields = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        self.assertEqual(fields["content-type"], "application/x-www-form-urlencoded")
        self.assertEqual(fields["transfer-encoding"], "chunked")
        self.assertTrue(fields["user-agent"].startswith("gluon/"))
        self.assertIn("x-gluon-version", fields)
        self.assertEqual(fields["x-board-name"], "node7")
        expected = b'{"domain": "ffmuc_welt","public_key": "' + KEY.encode() + b'"}'
        self.assertEqual(payload, b"%x\r\n%s\r\n0\r\n\r\n" % (len(expected), expected))
        self.assertEqual((status, body), (200, REPLY))
        self.assertEqual(headers["content-type"], "application/json")

    def test_parse_v2(self) -> None:
        """Address, Port (a string), PublicKey and AllowedIPs[0] are read; the endpoint is bracketed."""
        reg = parse_v2(200, REPLY, 1.0)
        self.assertEqual((reg.address, reg.port, reg.public_key), ("2001:db8::1", 51820, KEY))
        self.assertEqual(reg.link_address, "fe80::2a6:8fff:fe21:5465")
        self.assertEqual(reg.endpoint, "[2001:db8::1]:51820")

    def test_parse_v2_numeric_port_and_ipv4(self) -> None:
        """A numeric Port and an IPv4 Address work too (no brackets then)."""
        body = REPLY.replace(b'"51820"', b"51820").replace(b"2001:db8::1", b"192.0.2.1")
        self.assertEqual(parse_v2(200, body, 1.0).endpoint, "192.0.2.1:51820")

    def test_parse_v2_refuses(self) -> None:
        """A non-200 answer or one without Endpoint is an error naming what came back."""
        exc = self.assertRaises(LabError, parse_v2, 503, b'{"error": {"message": "no worker"}}', 1.0)
        self.assertIn("503", str(exc))
        self.assertIn("no worker", str(exc))
        self.assertRaises(LabError, parse_v2, 200, b'{"Message": "OK"}', 1.0)


class LedgerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.join(tempfile.mkdtemp(prefix="wgkex-ledger-"), "lab")

        def remove() -> None:
            if os.path.isdir(os.path.dirname(self.dir)):
                os.rmdir(os.path.dirname(self.dir))

        self.addCleanup(remove)

    def test_teardown_from_another_process_view(self) -> None:
        """A second Ledger read from disk stops the recorded process and removes the recorded files."""
        ledger = Ledger(self.dir)
        ledger.save()
        proc = ledger.add_proc(spawn("sleeper", ["sleep", "60"], os.path.join(self.dir, "sleep.log")))
        made = ledger.add_path(os.path.join(self.dir, "made.txt"))
        with open(made, "w") as f:
            f.write("x")
        again = Ledger(self.dir)  # as `python -m wgkex.lab down` sees it: no Popen objects
        self.assertEqual([p.pid for p in again.procs()], [proc.pid])
        self.assertEqual(again.teardown(), [])
        self.assertTrue(proc.wait_gone(5))
        self.assertFalse(os.path.exists(self.dir))

    def test_recycled_pid_is_not_ours(self) -> None:
        """A record whose start time does not match the PID's process is never signalled."""
        proc = spawn("sleeper", ["sleep", "60"], os.devnull)
        self.addCleanup(proc.stop)
        impostor = Proc("impostor", proc.pid, proc.start_time + 1, ["sleep"])
        self.assertFalse(impostor.send(15))
        self.assertTrue(proc.is_ours())

    def test_dead_process_is_not_ours(self) -> None:
        """Once the process exited (even as an unreaped zombie) it no longer counts as running."""
        proc = spawn("quick", ["true"], os.devnull)
        self.assertTrue(proc.wait_gone(5))
        self.assertFalse(proc.send(15))


class DemoOutcomeTests(SynchronousTestCase):
    def test_keep_after_failed_start_promises_nothing(self) -> None:
        """KEEP=1 when the lab could not even start: exit 1 and no "keeps running" (up already removed it)."""

        state = self.mktemp()  # never created: nothing of the lab is left after its failed start

        class FailingLab:
            directory = state
            gateways: dict[str, Any] = {}

            def __init__(self, lab_id: str) -> None:
                self.ledger = Ledger(state)

            def up(self) -> None:
                raise LabError("mosquitto exited: port in use")

            def down(self) -> list[str]:
                return []

        self.patch(demo, "Lab", FailingLab)
        out = io.StringIO()
        self.assertEqual(demo.run_demo(True, out=out), 1)
        text = out.getvalue()
        self.assertIn("FAILED: mosquitto exited: port in use", text)
        self.assertNotIn("keeps running", text)
        self.assertNotIn("make lab-down", text)
