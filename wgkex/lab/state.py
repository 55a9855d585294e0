"""The lab's state directory: a record of everything it made, written as it is made.

``state.json`` lists processes (PID + start time), namespaces and paths in the
order they were created, plus free-form ``info`` (ports, keys, addresses) for
``status`` and the demo. Because each resource is recorded right after it
exists, ``down`` can undo a lab whose ``up`` crashed half-way, from another
process, and it never touches anything the record does not name.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from wgkex.lab.netns import Namespace
from wgkex.lab.proc import LabError, Proc

STATE_FILE = "state.json"


class Ledger:
    """What one lab made, persisted in ``directory/state.json``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, STATE_FILE)
        self.resources: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}
        #: Process objects started by this Python process (so they can be reaped), by PID.
        self.live: dict[int, Proc] = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                data = json.load(f)
            self.resources = list(data.get("resources", []))
            self.info = dict(data.get("info", {}))

    @property
    def exists(self) -> bool:
        return os.path.exists(self.path)

    def save(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"info": self.info, "resources": self.resources}, f, indent=1)
        os.replace(tmp, self.path)

    def add_proc(self, proc: Proc) -> Proc:
        self.live[proc.pid] = proc
        self.resources.append({"kind": "proc", **proc.record()})
        self.save()
        return proc

    def forget_proc(self, proc: Proc) -> None:
        """Drop a process that was stopped on purpose (e.g. a restarted server)."""
        self.resources = [
            r for r in self.resources
            if not (r["kind"] == "proc" and r["pid"] == proc.pid and r["start_time"] == proc.start_time)
        ]
        self.live.pop(proc.pid, None)
        self.save()

    def add_netns(self, ns: Namespace) -> Namespace:
        self.resources.append({"kind": "netns", "name": ns.name})
        self.save()
        return ns

    def add_path(self, path: str) -> str:
        self.resources.append({"kind": "path", "path": path})
        self.save()
        return path

    def set_info(self, key: str, value: Any) -> None:
        self.info[key] = value
        self.save()

    def procs(self) -> list[Proc]:
        """Every recorded process (the live object where this process started it)."""
        out = []
        for r in self.resources:
            if r["kind"] == "proc":
                rec = Proc.from_record(r)
                live = self.live.get(rec.pid)
                out.append(live if live is not None and live.start_time == rec.start_time else rec)
        return out

    def namespaces(self) -> list[Namespace]:
        return [Namespace(r["name"]) for r in self.resources if r["kind"] == "netns"]

    def teardown(self) -> list[str]:
        """Stop every recorded process, delete namespaces and paths, then the directory.

        Returns what could not be removed (empty when all went). Processes go
        first and newest first (routers, workers, daemons, broker, mosquitto).
        """
        problems: list[str] = []
        for proc in reversed(self.procs()):
            try:
                proc.stop(timeout=10.0)
            except LabError as exc:
                problems.append(str(exc))
        for ns in reversed(self.namespaces()):
            ns.delete()
            if ns.exists():
                problems.append(f"namespace {ns.name} is still there")
        for r in reversed(self.resources):
            if r["kind"] == "path":
                path = r["path"]
                try:
                    if os.path.isdir(path) and not os.path.islink(path):
                        os.rmdir(path)  # only if empty: never delete what we did not make
                    elif os.path.lexists(path):
                        os.unlink(path)
                except OSError as exc:
                    problems.append(f"{path}: {exc.strerror}")
        if not problems:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.resources, self.info, self.live = [], {}, {}
        else:
            self.save()
        return problems
