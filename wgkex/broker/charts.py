"""Inline SVG charts for the status page, drawn on the server from the history data.

Plain functions from data to an ``<svg>`` string: no scripts, no fonts or files
from elsewhere. Each chart scales to the width of its container (``viewBox``),
so one drawing serves a laptop and a phone. Every drawn value is also in
``data-`` attributes (what the browser test reads back from the DOM) and in a
``<title>``, which browsers show as a tooltip. Names come from the bus: all
text is escaped.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from typing import Any

from wgkex.broker.history import MINUTE, REASONS

#: Colours of gateways, in name order (cycled beyond eight).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")

#: Colours of request outcomes: accepted green, refusals warm or grey.
OUTCOME_COLORS = {
    "ok": "#2e8b57",
    "bad_request": "#f4a582",
    "bad_key": "#d6604d",
    "bad_domain": "#fdb863",
    "key_list": "#b2182b",
    "rate_limited": "#8073ac",
    "no_worker": "#e08214",
    "queue_full": "#542788",
    "publish_failed": "#67001f",
    "too_large": "#999999",
}

_W, _H = 500, 170
_LEFT, _RIGHT, _TOP, _BOTTOM = 40, 8, 8, 22
_PLOT_W = _W - _LEFT - _RIGHT
_PLOT_H = _H - _TOP - _BOTTOM

esc = html.escape


def outcome_css() -> str:
    """The fill of each outcome's bars, once for the page (not repeated on every bar)."""
    return "".join(f"svg rect.{name}{{fill:{color}}}" for name, color in OUTCOME_COLORS.items())


def nice_ceiling(value: float) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is >= ``value`` (at least 1)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def _clock(start: int) -> str:
    return time.strftime("%H:%M", time.gmtime(start))


def _frame(kind: str, label: str, ymax: int, starts: Sequence[int], body: list[str]) -> str:
    """An ``<svg>`` with y gridlines (0, half, max), time labels and ``body`` drawn inside."""
    parts = [
        f'<svg class="chart {kind}" viewBox="0 0 {_W} {_H}" role="img" aria-label="{esc(label)}" '
        f'data-ymax="{ymax}" xmlns="http://www.w3.org/2000/svg">',
    ]
    for value in (0, ymax / 2, ymax):
        y = _TOP + _PLOT_H - value / ymax * _PLOT_H
        text = f"{value:g}"
        parts.append(
            f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd" stroke-width="1"/>'
            f'<text x="{_LEFT - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="12" fill="#555">{text}</text>'
        )
    if starts:
        ticks = ((0, "start", _clock(starts[0]) + " UTC"), (len(starts) // 2, "middle", _clock(starts[len(starts) // 2])),
                 (len(starts) - 1, "end", "now"))
        for index, anchor, text in ticks:
            x = _LEFT + (index + 0.5) * _PLOT_W / len(starts)
            parts.append(
                f'<text x="{x:.1f}" y="{_H - 6}" text-anchor="{anchor}" font-size="12" fill="#555">{esc(text)}</text>'
            )
    parts.extend(body)
    parts.append("</svg>")
    return "".join(parts)


def registrations_chart(minutes: Sequence[Mapping[str, Any]]) -> str:
    """Stacked bars per minute: accepted at the bottom, refusals by reason on top."""
    totals = [m["ok"] + sum(m["refused"].values()) for m in minutes]
    ymax = nice_ceiling(max(totals, default=0))
    width = _PLOT_W / max(len(minutes), 1)
    bar_width = f"{max(width - 1, 0.5):.1f}"
    body = []
    for i, (minute, total) in enumerate(zip(minutes, totals)):
        refused = minute["refused"]
        detail = ", ".join(f"{reason} {refused[reason]}" for reason in REASONS if refused.get(reason))
        title = f"{_clock(minute['start'])} UTC: {minute['ok']} accepted, {total - minute['ok']} refused"
        title += f" ({detail})" if detail else ""
        body.append(
            f'<g class="minute" data-start="{int(minute["start"])}" data-ok="{int(minute["ok"])}" '
            f'data-refused="{total - minute["ok"]}"><title>{esc(title)}</title>'
        )
        x = _LEFT + i * width
        y = _TOP + _PLOT_H
        for outcome, count in (("ok", minute["ok"]), *((r, refused.get(r, 0)) for r in REASONS)):
            if not count:
                continue
            h = count / ymax * _PLOT_H
            y -= h
            body.append(
                f'<rect class="{outcome}" x="{x + 0.5:.1f}" y="{y:.1f}" width="{bar_width}" '
                f'height="{h:.1f}" data-count="{int(count)}"/>'
            )
        body.append("</g>")
    return _frame("registrations", "key exchange requests per minute, last hour", ymax,
                  [int(m["start"]) for m in minutes], body)


def peers_chart(series: Mapping[str, Sequence[Mapping[str, int]]], starts: Sequence[int],
                colors: Mapping[str, str]) -> str:
    """A line per gateway: its reported connected peers per minute (a -1 report breaks the line).

    Every point is in the gateway's ``data-points`` (``start:peers`` pairs); a dot
    with a tooltip marks its newest report and any point no line reaches. (A dot
    per point would make the page several times larger with many gateways.)
    """
    values = [p["peers"] for points in series.values() for p in points]
    ymax = nice_ceiling(max(values, default=0))
    width = _PLOT_W / max(len(starts), 1)
    first = starts[0] if starts else 0
    body = []
    for name, points in series.items():
        color = colors.get(name, PALETTE[-1])
        listed = " ".join(f"{int(p['start'])}:{int(p['peers'])}" for p in points)
        body.append(f'<g class="gateway" data-worker="{esc(name)}" data-points="{listed}">')
        segments: list[list[tuple[float, float, Mapping[str, int]]]] = [[]]
        for point in points:
            if point["peers"] < 0:
                segments.append([])
                continue
            x = _LEFT + ((point["start"] - first) // MINUTE + 0.5) * width
            y = _TOP + _PLOT_H - point["peers"] / ymax * _PLOT_H
            segments[-1].append((x, y, point))
        dots = [part[0] for part in segments if len(part) == 1]
        for part in segments:
            if len(part) > 1:
                coordinates = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in part)
                body.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coordinates}"/>')
        if segments[-1] and segments[-1][-1] not in dots:
            dots.append(segments[-1][-1])
        for x, y, point in dots:
            body.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}" data-start="{int(point["start"])}" '
                f'data-peers="{int(point["peers"])}"><title>{esc(name)} {_clock(point["start"])} UTC: '
                f'{int(point["peers"])} peers</title></circle>'
            )
        body.append("</g>")
    return _frame("peers", "connected peers per gateway, last hour", ymax, starts, body)


def share_chart(rows: Sequence[Mapping[str, Any]], colors: Mapping[str, str]) -> str:
    """Per eligible gateway: its share of the peers (bar) against its target share (black mark)."""
    shown = [r for r in rows if r["target_share"] is not None]
    bar, gap, label_w = 18, 8, 110
    height = max(len(shown), 1) * (bar + gap) + 6
    plot_w = _W - label_w - 90
    parts = [
        f'<svg class="chart shares" viewBox="0 0 {_W} {height}" role="img" '
        'aria-label="share of peers against target share" xmlns="http://www.w3.org/2000/svg">',
    ]
    for i, row in enumerate(shown):
        share = row["share"] or 0.0
        target = row["target_share"]
        y = 4 + i * (bar + gap)
        name = str(row["name"])
        color = colors.get(name, PALETTE[-1])
        title = f"{name}: {share * 100:.1f}% of the peers, target {target * 100:.1f}%"
        parts.append(
            f'<g class="share" data-worker="{esc(name)}" data-share="{share:.4f}" data-target="{target:.4f}">'
            f"<title>{esc(title)}</title>"
            f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" font-size="12">{esc(name[:20])}</text>'
            f'<rect x="{label_w}" y="{y}" width="{plot_w}" height="{bar}" fill="#eee"/>'
            f'<rect x="{label_w}" y="{y}" width="{share * plot_w:.1f}" height="{bar}" fill="{color}"/>'
            f'<line x1="{label_w + target * plot_w:.1f}" x2="{label_w + target * plot_w:.1f}" y1="{y - 2}" '
            f'y2="{y + bar + 2}" stroke="#000" stroke-width="2"/>'
            f'<text x="{label_w + plot_w + 6}" y="{y + 13}" font-size="12">{share * 100:.0f}% / '
            f"{target * 100:.0f}%</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def legend(items: Sequence[tuple[str, str]]) -> str:
    """Colour swatches with names, as HTML."""
    return '<p class="legend">' + " ".join(
        f'<span class="sw" style="background:{color}"></span>{esc(name)}' for name, color in items
    ) + "</p>"


def gateway_colors(names: Sequence[str]) -> dict[str, str]:
    """One colour per gateway name, stable for a given set of names (sorted order)."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sorted(set(names)))}
