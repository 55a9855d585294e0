"""When each VXLAN FDB destination appeared, seen from the kernel's own notifications.

:class:`FdbWatch` runs ``bridge monitor fdb`` inside a namespace and notes the
monotonic time at which each all-zero FDB destination of one VXLAN device was
announced. The worker adds a key's FDB entry last (after its peer and route),
so that time is when the key was installed, measured without asking the worker
anything (polling its ``/metrics`` would cost the very CPU a benchmark measures).
"""

from __future__ import annotations

import ipaddress
import subprocess
import threading
import time

from tests.support.processes import terminate


class FdbWatch:
    """``bridge monitor fdb`` in namespace ``netns``: first-seen time of every destination on ``dev``."""

    def __init__(self, netns: str, dev: str) -> None:
        self.dev = dev
        #: normalised destination address -> time.monotonic() when its entry was announced
        self.seen: dict[str, float] = {}
        self._changed = threading.Condition()
        self._proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "bridge", "monitor", "fdb"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self._thread = threading.Thread(target=self._read, name=f"fdb-watch-{dev}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            now = time.monotonic()
            words = line.split()
            # "00:00:00:00:00:00 dev vx-x dst fe80::... self permanent"; "Deleted ..." lines are skipped.
            if not words or words[0] != "00:00:00:00:00:00" or "dst" not in words:
                continue
            if "dev" not in words or words[words.index("dev") + 1] != self.dev:
                continue
            address = str(ipaddress.ip_address(words[words.index("dst") + 1]))
            with self._changed:
                self.seen.setdefault(address, now)
                self._changed.notify_all()

    def wait_for(self, addresses: set[str], timeout: float) -> bool:
        """Wait until every address (normalised) was announced; False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not addresses.issubset(self.seen.keys()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.5))
        return True

    def close(self) -> None:
        terminate(self._proc, 5)
        self._thread.join(5)
