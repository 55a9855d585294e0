"""A TCP relay from ``127.0.0.1`` inside a network namespace to ``127.0.0.1`` outside it.

Processes in a lab namespace cannot reach the root namespace's loopback, and
RabbitMQ's MQTT plugin listens on TCP only (no unix socket to share, as the
lab does with mosquitto). This relay opens its listening sockets inside the
namespace (``setns`` into it, ``listen``, ``setns`` back: a socket stays in the
namespace it was made in) and connects out from the root namespace, one
outgoing connection per incoming one, with Twisted's port forwarder. Every
address stays on a loopback interface.

It keeps the failure a worker must see: when the server behind a port dies,
the relay closes the worker's connection; when nothing answers behind a port,
the relay accepts and closes at once.

Run as a process (root)::

    python -m tests.support.netns_relay /run/netns/wgkex-x-gw1 41883:127.0.0.1:41883 ...

It prints ``ready`` on stdout once every port listens.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys

CLONE_NEWNET = 0x40000000


def setns(fd: int) -> None:
    """Move this thread into the network namespace open at ``fd``."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def listen_in(netns_path: str, ports: list[int]) -> list[socket.socket]:
    """Listening sockets on ``127.0.0.1:<port>`` inside the namespace at ``netns_path``."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(netns_path, os.O_RDONLY)
    sockets = []
    try:
        setns(target)
        try:
            for port in ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen(128)
                s.setblocking(False)
                sockets.append(s)
        finally:
            setns(home)
    finally:
        os.close(home)
        os.close(target)
    return sockets


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: netns_relay NETNS_PATH LISTEN_PORT:HOST:PORT ...", file=sys.stderr)
        return 2
    netns_path, specs = argv[0], argv[1:]
    routes: list[tuple[int, str, int]] = []
    for spec in specs:
        listen, host, target = spec.split(":")
        routes.append((int(listen), host, int(target)))
    sockets = listen_in(netns_path, [r[0] for r in routes])

    from twisted.internet import reactor
    from twisted.protocols.portforward import ProxyFactory

    for sock, (_, host, port) in zip(sockets, routes):
        reactor.adoptStreamPort(sock.fileno(), socket.AF_INET, ProxyFactory(host, port))  # type: ignore[attr-defined]
        sock.close()  # the reactor holds its own duplicate
    print("ready", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
