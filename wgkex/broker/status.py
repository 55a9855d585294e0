"""The broker's status: one snapshot, shown as JSON (``/api/v1/status``) and HTML (``/``).

Per configured domain, every worker that has published data or a metric for
it: online state, peers (over all its domains, as the v2 rule counts them),
weight, target share among the workers eligible now, when it was last heard
from, and which one v2 would choose next; with a :class:`~wgkex.broker.history.History`
also the last hour (``history``). The HTML page is self-contained (inline CSS,
charts as inline SVG drawn here, no scripts or external assets: it works on a
gateway network without Internet) and refreshes itself; every name on it comes
from the bus and is escaped. Each chart element carries its numbers in
``data-`` attributes and a ``<title>`` (a tooltip without JavaScript).
"""

from __future__ import annotations

import html
import time
from typing import Any

from wgkex.broker import charts
from wgkex.broker.history import REASONS, History
from wgkex.broker.selection import assess
from wgkex.broker.workers import WorkerPicture

REFRESH_SECONDS = 10


def snapshot(
    picture: WorkerPicture, connected: bool, reconnects: int, pending: int, now: float,
    history: History | None = None,
) -> dict[str, Any]:
    """The status as plain JSON-able data."""
    domains: dict[str, Any] = {}
    for domain in sorted(picture.domains):
        shares = {a.name: a for a in assess(picture.candidates(domain))}
        total = sum(max(a.peers, 0) for a in shares.values())
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
                    "share": round(max(a.peers, 0) / total, 4) if a is not None and total > 0 else None,
                    "last_seen": state.last_seen,
                    "last_seen_seconds_ago": round(now - state.last_seen, 1) if state.last_seen is not None else None,
                    "next": name == chosen,
                    "endpoint": state.data[domain].reply()["Endpoint"] if domain in state.data else None,
                }
            )
        domains[domain] = {"next": chosen, "online": sum(1 for r in rows if r["eligible"]), "workers": rows}
    result: dict[str, Any] = {
        "mqtt": {"connected": connected, "reconnects": reconnects, "pending": pending},
        "domains": domains,
        "time": now,
    }
    if history is not None:
        result["history"] = history.snapshot()
    return result


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;min-width:40em}
th,td{border:1px solid #ccc;padding:.3em .7em;text-align:left}
th{background:#eee}td.n{text-align:right}
.ok{color:#070}.bad{color:#b00}.next{background:#e6f4e6;font-weight:bold}
.muted{color:#777}
.wrap{overflow-x:auto}
svg.chart{display:block;width:100%;max-width:40em;height:auto;background:#fff;border:1px solid #ddd;margin:.3em 0}
h3{font-size:.95em;margin:1em 0 .2em}
.legend{font-size:.85em;margin:.2em 0}.sw{display:inline-block;width:.8em;height:.8em;margin:0 .3em 0 .6em}
@media (max-width:40em){body{margin:.6em}table{min-width:0;font-size:.85em}th,td{padding:.2em .3em}}
"""


def _when(seconds_ago: float | None, at: float | None) -> str:
    if seconds_ago is None or at is None:
        return '<span class="muted">never</span>'
    # The date only when it is not today's: the column stays narrow on a phone.
    stamp = time.strftime("%H:%M:%S UTC" if seconds_ago < 12 * 3600 else "%Y-%m-%d %H:%M UTC", time.gmtime(at))
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
        f"<title>wgkex broker</title><style>{_CSS}{charts.outcome_css()}</style></head><body>",
        "<h1>wgkex broker</h1>",
        f"<p>MQTT: {state}; reconnects: {int(mqtt['reconnects'])}; keys pending: {int(mqtt['pending'])}</p>",
    ]
    history = status.get("history")
    for domain, info in status["domains"].items():
        parts.append(f'<section class="domain" data-domain="{esc(domain)}"><h2>Domain {esc(domain)}</h2>')
        if info["next"] is None:
            parts.append('<p class="bad">No worker online for this domain: v2 answers 503.</p>')
        else:
            parts.append(f"<p>Next v2 choice: <b>{esc(info['next'])}</b></p>")
        charts_html = _domain_charts(history["domains"].get(domain), info["workers"]) if history else ""
        if not info["workers"]:
            parts.append('<p class="muted">No worker has reported for this domain.</p>')
            parts.append(charts_html + "</section>")
            continue
        parts.append(
            "<div class=\"wrap\"><table><tr><th>worker</th><th>online</th><th>peers</th><th>weight</th>"
            "<th>share / target</th><th>last seen</th><th>next</th></tr>"
        )
        for row in info["workers"]:
            online = (
                '<span class="ok">yes</span>'
                if row["eligible"]
                else ('<span class="bad">no</span>' if not row["online"] else '<span class="bad">no data/metric</span>')
            )
            share = "&ndash;" if row["target_share"] is None else (
                f"{(row['share'] or 0) * 100:.1f}% / {row['target_share'] * 100:.1f}%"
            )
            css = ' class="next"' if row["next"] else ""
            parts.append(
                f"<tr{css}>"
                f"<td>{esc(row['name'])}</td><td>{online}</td>"
                f'<td class="n">{int(row["peers"])}</td><td class="n">{int(row["weight"])}</td>'
                f'<td class="n">{share}</td><td>{_when(row["last_seen_seconds_ago"], row["last_seen"])}</td>'
                f"<td>{'&#10003;' if row['next'] else ''}</td></tr>"
            )
        parts.append("</table></div>")
        parts.append(charts_html + "</section>")
    if history is not None and any(m["ok"] or m["refused"] for m in history["no_domain"]):
        parts.append('<section class="no-domain"><h2>Requests without a configured domain</h2>')
        parts.append(_registrations(history["no_domain"]) + "</section>")
    parts.append(f'<p class="muted">Refreshes every {REFRESH_SECONDS} s. JSON: <a href="/api/v1/status">'
                 "/api/v1/status</a>, metrics: <a href=\"/metrics\">/metrics</a></p></body></html>")
    return "\n".join(parts).encode("utf-8")


def _registrations(minutes: list[dict[str, Any]]) -> str:
    seen = [r for r in REASONS if any(m["refused"].get(r) for m in minutes)]
    items = [("accepted", charts.OUTCOME_COLORS["ok"])] + [(r, charts.OUTCOME_COLORS[r]) for r in seen]
    return charts.registrations_chart(minutes) + charts.legend(items)


def _domain_charts(history: dict[str, Any] | None, workers: list[dict[str, Any]]) -> str:
    """The last hour of one domain: requests per minute, peers per gateway, shares against targets."""
    if history is None:
        return ""
    minutes = history["registrations"]
    peers = history["peers"]
    colors = charts.gateway_colors([*peers, *(w["name"] for w in workers)])
    parts = ["<h3>Key exchange requests per minute (last hour)</h3>", _registrations(minutes)]
    parts.append("<h3>Connected peers per gateway (last hour, from their reports)</h3>")
    if peers:
        parts.append(charts.peers_chart(peers, [m["start"] for m in minutes], colors))
        parts.append(charts.legend([(name, colors[name]) for name in peers]))
    else:
        parts.append('<p class="muted">No peer reports in the last hour.</p>')
    eligible = [w for w in workers if w["target_share"] is not None]
    if eligible:
        parts.append("<h3>Share of peers (bar) against target share (mark)</h3>")
        parts.append(charts.share_chart(eligible, colors))
    return "".join(parts)
