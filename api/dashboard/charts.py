"""Charts as inline SVG, drawn on the server: a bar chart (jobs finished per minute), line charts
(latency percentiles per 5 minutes, a training job's loss). No chart library and no script: the
page carries the picture, and the markup is escaped like any other template text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from markupsafe import Markup, escape

WIDTH, HEIGHT, PAD = 600, 160, 28
COLOURS = ("#2563eb", "#dc2626", "#059669", "#d97706")


def _frame(body: str, label: str, y_max: float, unit: str) -> Markup:
    top = f"{y_max:.3g}{unit}"
    svg = (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">'
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - 4}" y2="{HEIGHT - PAD}" class="axis"/>'
        f'<line x1="{PAD}" y1="6" x2="{PAD}" y2="{HEIGHT - PAD}" class="axis"/>'
        f'<text x="2" y="14" class="tick">{escape(top)}</text>'
        f'<text x="2" y="{HEIGHT - PAD}" class="tick">0</text>'
        f"{body}</svg>"
    )
    return Markup(svg)


def bars(values: Sequence[float], label: str, *, x_labels: tuple[str, str] = ("", "")) -> Markup:
    """One bar per value, left to right."""
    y_max = max(max(values, default=0), 1)
    inner_w, inner_h = WIDTH - PAD - 6, HEIGHT - PAD - 8
    step = inner_w / max(len(values), 1)
    parts = []
    for i, value in enumerate(values):
        h = inner_h * value / y_max
        x = PAD + 1 + i * step
        parts.append(
            f'<rect x="{x:.1f}" y="{HEIGHT - PAD - h:.1f}" width="{max(step - 1, 1):.1f}" '
            f'height="{h:.1f}" class="bar"><title>{value:g}</title></rect>'
        )
    parts.append(f'<text x="{PAD}" y="{HEIGHT - 8}" class="tick">{escape(x_labels[0])}</text>')
    parts.append(
        f'<text x="{WIDTH - 4}" y="{HEIGHT - 8}" class="tick" text-anchor="end">'
        f"{escape(x_labels[1])}</text>"
    )
    return _frame("".join(parts), label, y_max, "")


def lines(
    series: Mapping[str, Sequence[tuple[float, float]]],
    label: str,
    *,
    unit: str = "",
    x_range: tuple[float, float] | None = None,
    x_labels: tuple[str, str] | None = None,
) -> Markup:
    """One polyline per named series of (x, y) points, with a dot at each point (a lone point
    is still seen) and a legend. `x_range` fixes the x axis (e.g. the last hour)."""
    points = [p for s in series.values() for p in s]
    if not points:
        return Markup('<p class="muted">no data yet</p>')
    x_min, x_max = x_range or (min(x for x, _ in points), max(x for x, _ in points))
    x_max = max(x_max, x_min + 1e-9)
    y_max = max(max(y for _, y in points), 1e-9)
    inner_w, inner_h = WIDTH - PAD - 6, HEIGHT - PAD - 8
    parts = []
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(
            f"{PAD + 1 + inner_w * (x - x_min) / (x_max - x_min):.1f},"
            f"{HEIGHT - PAD - inner_h * y / y_max:.1f}"
            for x, y in pts
        )
        parts.append(
            f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"/>'
        )
        for pair in coords.split():
            cx, cy = pair.split(",")
            parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{colour}"/>')
        parts.append(
            f'<text x="{WIDTH - 8}" y="{16 + 14 * i}" class="legend" fill="{colour}" '
            f'text-anchor="end">{escape(name)}</text>'
        )
    left, right = x_labels or (f"{x_min:g}", f"{x_max:g}")
    parts.append(f'<text x="{PAD}" y="{HEIGHT - 8}" class="tick">{escape(left)}</text>')
    parts.append(
        f'<text x="{WIDTH - 4}" y="{HEIGHT - 8}" class="tick" text-anchor="end">'
        f"{escape(right)}</text>"
    )
    return _frame("".join(parts), label, y_max, unit)
