"""The broker's status: one snapshot, shown as JSON (``/api/v1/status``) and HTML (``/``).

Per configured domain, every worker that has published data or a metric for
it: online state, peers (over all its domains, as the v2 rule counts them),
weight, target share among the workers eligible now, when it was last heard
from, and which one v2 would choose next. The HTML page is self-contained
(inline CSS, no scripts or external assets) and refreshes itself; every name
on it comes from the bus and is escaped.
"""

from __future__ import annotations

import html
import time
from typing import Any

from wgkex.broker.selection import assess
from wgkex.broker.workers import WorkerPicture

REFRESH_SECONDS = 10


def snapshot(picture: WorkerPicture, connected: bool, reconnects: int, pending: int, now: float) -> dict[str, Any]:
    """The status as plain JSON-able data."""
    domains: dict[str, Any] = {}
    for domain in sorted(picture.domains):
        shares = {a.name: a for a in assess(picture.candidates(domain))}
        chosen = picture.next_choice(domain)
        rows = []
        for name in sorted(picture.workers):
            state = picture.workers[name]
            if domain not in state.data and domain not in state.peers:
                continue
            a = shares.get(name)
            rows.append(
                {
                    "name": name,
                    "online": state.online,
                    "eligible": state.eligible(domain),
                    "peers": state.total_peers(),
                    "domain_peers": state.peers.get(domain),
                    "weight": picture.weight(name),
                    "target_share": round(a.target_share, 4) if a is not None else None,
                    "last_seen": state.last_seen,
                    "last_seen_seconds_ago": round(now - state.last_seen, 1) if state.last_seen is not None else None,
                    "next": name == chosen,
                    "endpoint": state.data[domain].reply()["Endpoint"] if domain in state.data else None,
                }
            )
        domains[domain] = {"next": chosen, "online": sum(1 for r in rows if r["eligible"]), "workers": rows}
    return {
        "mqtt": {"connected": connected, "reconnects": reconnects, "pending": pending},
        "domains": domains,
        "time": now,
    }


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;min-width:40em}
th,td{border:1px solid #ccc;padding:.3em .7em;text-align:left}
th{background:#eee}td.n{text-align:right}
.ok{color:#070}.bad{color:#b00}.next{background:#e6f4e6;font-weight:bold}
.muted{color:#777}
"""


def _when(seconds_ago: float | None, at: float | None) -> str:
    if seconds_ago is None or at is None:
        return '<span class="muted">never</span>'
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
    return f'{html.escape(stamp)} <span class="muted">({seconds_ago:.0f} s ago)</span>'


def render_html(status: dict[str, Any]) -> bytes:
    """The status page as self-contained HTML."""
    esc = html.escape
    mqtt = status["mqtt"]
    state = (
        '<span class="ok">connected</span>' if mqtt["connected"] else '<span class="bad">disconnected</span>'
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>wgkex broker</title><style>{_CSS}</style></head><body>",
        "<h1>wgkex broker</h1>",
        f"<p>MQTT: {state}; reconnects: {int(mqtt['reconnects'])}; keys pending: {int(mqtt['pending'])}</p>",
    ]
    for domain, info in status["domains"].items():
        parts.append(f"<h2>Domain {esc(domain)}</h2>")
        if info["next"] is None:
            parts.append('<p class="bad">No worker online for this domain: v2 answers 503.</p>')
        else:
            parts.append(f"<p>Next v2 choice: <b>{esc(info['next'])}</b></p>")
        if not info["workers"]:
            parts.append('<p class="muted">No worker has reported for this domain.</p>')
            continue
        parts.append(
            "<table><tr><th>worker</th><th>online</th><th>peers</th><th>weight</th>"
            "<th>target share</th><th>last seen</th><th>next</th></tr>"
        )
        for row in info["workers"]:
            online = (
                '<span class="ok">yes</span>'
                if row["eligible"]
                else ('<span class="bad">no</span>' if not row["online"] else '<span class="bad">no data/metric</span>')
            )
            share = "&ndash;" if row["target_share"] is None else f"{row['target_share'] * 100:.1f}%"
            css = ' class="next"' if row["next"] else ""
            parts.append(
                f"<tr{css}>"
                f"<td>{esc(row['name'])}</td><td>{online}</td>"
                f'<td class="n">{int(row["peers"])}</td><td class="n">{int(row["weight"])}</td>'
                f'<td class="n">{share}</td><td>{_when(row["last_seen_seconds_ago"], row["last_seen"])}</td>'
                f"<td>{'&#10003;' if row['next'] else ''}</td></tr>"
            )
        parts.append("</table>")
    parts.append(f'<p class="muted">Refreshes every {REFRESH_SECONDS} s. JSON: <a href="/api/v1/status">'
                 "/api/v1/status</a>, metrics: <a href=\"/metrics\">/metrics</a></p></body></html>")
    return "\n".join(parts).encode("utf-8")
