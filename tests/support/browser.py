"""Debian's headless Chromium, driven from the command line (``--dump-dom``, ``--screenshot``).

Each call starts one ``chromium`` in a session of its own with a new, empty
profile directory and no background traffic (no component updates, sync, QUIC
or first-run pages), waits for it with a deadline, and on timeout kills that
session only (by its process group, which this helper created).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from html.parser import HTMLParser

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
)


def chromium() -> str | None:
    return shutil.which("chromium")


def need_chromium() -> str | None:
    """A trial skip reason when there is no browser to drive."""
    if chromium() is None:
        return ("needs Debian's chromium for the browser test (`make test` installs it as root with "
                "`make browser`; install it with apt-get install --no-install-recommends chromium)")
    return None


def run_chromium(*args: str, timeout: float = 90) -> str:
    """Run chromium with ``args`` after the fixed flags and a fresh profile; return its stdout."""
    path = chromium()
    assert path is not None
    profile = tempfile.mkdtemp(prefix="wgkex-chromium-")
    try:
        proc = subprocess.Popen(
            [path, *FLAGS, f"--user-data-dir={profile}", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"chromium did not finish within {timeout} s: {' '.join(args)}") from None
        if proc.returncode != 0:
            raise AssertionError(f"chromium exited with {proc.returncode}: {err[-2000:]}")
        return out
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def dump_dom(url: str) -> str:
    """The DOM of ``url`` after loading, serialised by the browser."""
    return run_chromium("--dump-dom", url)


def screenshot(url: str, path: str, width: int, height: int) -> None:
    """A PNG of ``url`` at ``width`` x ``height`` CSS pixels."""
    run_chromium(f"--screenshot={path}", f"--window-size={width},{height}", url)
    if not os.path.exists(path):
        raise AssertionError(f"chromium wrote no screenshot to {path}")


class Element:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Element | None) -> None:
        self.tag = tag
        self.attrs = attrs
        self.parent = parent
        self.children: list[Element] = []
        self.text = ""

    def classes(self) -> list[str]:
        return self.attrs.get("class", "").split()

    def iter(self) -> list[Element]:
        out = [self]
        for child in self.children:
            out.extend(child.iter())
        return out

    def find_all(self, tag: str, cls: str | None = None) -> list[Element]:
        return [e for e in self.iter() if e.tag == tag and (cls is None or cls in e.classes())]


_VOID = {"meta", "link", "br", "img", "input", "hr", "area", "base", "col", "embed", "source", "track", "wbr"}


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {}, None)
        self.current = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(element)
        if tag not in _VOID:
            self.current = element

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.current.children.append(Element(tag, {k: v or "" for k, v in attrs}, self.current))

    def handle_endtag(self, tag: str) -> None:
        node: Element | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.text += data


def parse_dom(text: str) -> Element:
    """The browser's serialised DOM as a small tree of elements."""
    builder = _TreeBuilder()
    builder.feed(text)
    builder.close()
    return builder.root
