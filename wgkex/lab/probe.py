"""``python -m wgkex.lab.probe URL [TIMEOUT]``: one HTTP GET, printed as a JSON line.

Run inside a router's namespace (``ip netns exec``) for Gluon's connectivity
check ``http://[<gateway lladdr>%<wg iface>]/``: the zone index after ``%``
picks the interface, which ``getaddrinfo`` understands but URL parsers do not,
so the host is taken apart here by hand.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from urllib.parse import urlsplit


def get(url: str, timeout: float) -> dict[str, object]:
    """GET ``url``; ``{"status": int, "ms": float}`` or ``{"error": str, "ms": float}``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 80
    else:
        host, _, p = netloc.partition(":")
        port = int(p) if p else 80
    start = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/", headers={"User-Agent": "Wget"})
        resp = conn.getresponse()
        resp.read()
        return {"status": resp.status, "ms": round((time.monotonic() - start) * 1000, 2)}
    except OSError as exc:
        return {"error": str(exc) or type(exc).__name__, "ms": round((time.monotonic() - start) * 1000, 2)}
    finally:
        conn.close()


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: python -m wgkex.lab.probe URL [TIMEOUT]", file=sys.stderr)
        return 2
    result = get(argv[0], float(argv[1]) if len(argv) > 1 else 5.0)
    print(json.dumps(result))
    return 0 if result.get("status") == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
