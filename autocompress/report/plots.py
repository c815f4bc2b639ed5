"""Inline SVG figures for the HTML report, written by hand so the report opens offline with no plotting library.

Three figure kinds cover the report: `Axes` (scatter and line plots with ticks, grid and labels),
`heatmap` (a labelled matrix of values with a colour bar) and `bars` (paired horizontal bars).
Every mark carries a <title>, which browsers show as a tooltip without any script.
"""
from __future__ import annotations

import math
from html import escape

FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif"
VIRIDIS = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values spanning [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def fmt(v: float) -> str:
    """A short human number: 0.9815, 12.5, 1.2e+08."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v == 0:
        return "0"
    return f"{v:.4g}" if 1e-3 <= abs(v) < 1e6 else f"{v:.2e}"


def padded(lo: float, hi: float, pad: float = 0.06) -> tuple[float, float]:
    """A range around [lo, hi] with a margin, never empty."""
    if hi <= lo:
        span = abs(lo) * 0.1 or 1.0
        return lo - span, hi + span
    span = hi - lo
    return lo - pad * span, hi + pad * span


class Axes:
    """One panel: data ranges mapped to an SVG box, with marks added by method calls and rendered by `svg()`."""

    def __init__(self, xlim, ylim, xlabel: str, ylabel: str, width: int = 460, height: int = 330,
                 margin=(72, 18, 16, 70)):
        self.xlim, self.ylim = xlim, ylim
        self.xlabel, self.ylabel = xlabel, ylabel
        self.width, self.height = width, height
        self.left, self.right, self.top, self.bottom = margin
        self.marks: list[str] = []

    def x(self, v: float) -> float:
        lo, hi = self.xlim
        return self.left + (v - lo) / (hi - lo) * (self.width - self.left - self.right)

    def y(self, v: float) -> float:
        lo, hi = self.ylim
        return self.height - self.bottom - (v - lo) / (hi - lo) * (self.height - self.top - self.bottom)

    def points(self, xs, ys, titles, shape: str = "circle", color: str = "#9aa0a6", size: float = 4.5,
               css: str = "") -> None:
        for xv, yv, title in zip(xs, ys, titles):
            self.marks.append(_marker(shape, self.x(xv), self.y(yv), size, color, escape(title), css))

    def line(self, xs, ys, color: str, width: float = 1.6, step: bool = False) -> None:
        pts = []
        for i, (xv, yv) in enumerate(zip(xs, ys)):
            if step and i:
                pts.append(f"{self.x(xv):.1f},{self.y(ys[i - 1]):.1f}")
            pts.append(f"{self.x(xv):.1f},{self.y(yv):.1f}")
        self.marks.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" stroke-width="{width}"/>')

    def vline(self, xv: float, label: str, color: str = "#e8710a") -> None:
        px = self.x(xv)
        self._dashed(px, self.top, px, self.height - self.bottom, px - 4, self.top + 11, label, color)

    def hline(self, yv: float, label: str, color: str = "#e8710a") -> None:
        py = self.y(yv)
        self._dashed(self.left, py, self.width - self.right, py, self.width - self.right - 4, py - 4, label, color)

    def _dashed(self, x1, y1, x2, y2, tx, ty, label: str, color: str) -> None:
        """A dashed budget line from (x1, y1) to (x2, y2), its label right-aligned at (tx, ty)."""
        self.marks.append(f'<line x1="{_px(x1)}" y1="{_px(y1)}" x2="{_px(x2)}" y2="{_px(y2)}" '
                          f'stroke="{color}" stroke-width="1.4" stroke-dasharray="5 4"/>'
                          f'<text x="{_px(tx)}" y="{_px(ty)}" text-anchor="end" font-size="11" '
                          f'fill="{color}">{escape(label)}</text>')

    def label(self, xv: float, yv: float, text: str, color: str = "#1a4d8f") -> None:
        self.marks.append(f'<text x="{self.x(xv) + 6:.1f}" y="{self.y(yv) - 6:.1f}" font-size="10.5" '
                          f'fill="{color}">{escape(text)}</text>')

    def strip(self, label: str) -> float:
        """A band under the x axis for values that have an x but no y (e.g. never-evaluated candidates)."""
        py = self.height - self.bottom + 30
        self.marks.append(f'<text x="{self.left - 6}" y="{py + 4:.1f}" text-anchor="end" font-size="10" '
                          f'fill="#5f6368">{escape(label)}</text>')
        return py

    def strip_points(self, xs, py: float, titles, color: str = "#d93025") -> None:
        for xv, title in zip(xs, titles):
            self.marks.append(_marker("cross", self.x(xv), py, 4.5, color, escape(title), "infeasible"))

    def svg(self) -> str:
        w, h, l, r, t, b = self.width, self.height, self.left, self.right, self.top, self.bottom
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
                 f'style="{FONT}" role="img">',
                 f'<rect x="{l}" y="{t}" width="{w - l - r}" height="{h - t - b}" fill="#fbfbfc" stroke="#dadce0"/>']
        for tick in nice_ticks(*self.xlim):
            px = self.x(tick)
            parts.append(f'<line x1="{px:.1f}" y1="{t}" x2="{px:.1f}" y2="{h - b}" stroke="#eceff1"/>'
                         f'<text x="{px:.1f}" y="{h - b + 15}" text-anchor="middle" font-size="11" '
                         f'fill="#5f6368">{fmt(tick)}</text>')
        for tick in nice_ticks(*self.ylim):
            py = self.y(tick)
            parts.append(f'<line x1="{l}" y1="{py:.1f}" x2="{w - r}" y2="{py:.1f}" stroke="#eceff1"/>'
                         f'<text x="{l - 6}" y="{py + 4:.1f}" text-anchor="end" font-size="11" '
                         f'fill="#5f6368">{fmt(tick)}</text>')
        parts.append(f'<text x="{(l + w - r) / 2:.1f}" y="{h - b + 52}" text-anchor="middle" font-size="12.5" '
                     f'fill="#202124">{escape(self.xlabel)}</text>'
                     f'<text transform="translate(15,{(t + h - b) / 2:.1f}) rotate(-90)" text-anchor="middle" '
                     f'font-size="12.5" fill="#202124">{escape(self.ylabel)}</text>')
        parts.extend(self.marks)
        parts.append("</svg>")
        return "".join(parts)


def _marker(shape: str, px: float, py: float, size: float, color: str, title: str, css: str) -> str:
    cls = f' class="{css}"' if css else ""
    tip = f"<title>{title}</title>"
    if shape == "star":
        pts = " ".join(f"{px + (size * 2 if i % 2 == 0 else size * 0.9) * math.sin(i * math.pi / 5):.1f},"
                       f"{py - (size * 2 if i % 2 == 0 else size * 0.9) * math.cos(i * math.pi / 5):.1f}"
                       for i in range(10))
        return f'<polygon{cls} points="{pts}" fill="{color}" stroke="#202124" stroke-width="0.8">{tip}</polygon>'
    if shape == "cross":
        d = size
        return (f'<path{cls} d="M{px - d:.1f},{py - d:.1f}L{px + d:.1f},{py + d:.1f}M{px - d:.1f},{py + d:.1f}'
                f'L{px + d:.1f},{py - d:.1f}" stroke="{color}" stroke-width="2" fill="none">{tip}</path>')
    stroke = ' stroke="#0b2e59" stroke-width="1"' if css == "pareto" else ' stroke="#ffffff" stroke-width="0.6"'
    return f'<circle{cls} cx="{px:.1f}" cy="{py:.1f}" r="{size}" fill="{color}"{stroke}>{tip}</circle>'


def colour(t: float) -> str:
    """Viridis at t in [0, 1] (0 dark purple, 1 yellow), by linear interpolation between five stops."""
    t = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    a, b = VIRIDIS[i], VIRIDIS[i + 1]
    mix = [round(int(a[k:k + 2], 16) + (t - i) * (int(b[k:k + 2], 16) - int(a[k:k + 2], 16))) for k in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in mix)


def heatmap(rows: list[str], cols: list[str], values, scale, legend: tuple, cell: int = 26) -> str:
    """A matrix of values (None = not set) coloured by `scale(v) -> [0, 1]`, each cell labelled with its value;
    `legend` = (title, label of the low end, label of the high end) for the colour bar."""
    label_w = 8 + 7 * max((len(r) for r in rows), default=4)
    top = 12 + int(6.2 * max((len(c) for c in cols), default=4) * 0.72)
    bar_h = min(max(cell * len(rows), 90), 160)
    w, h = label_w + cell * len(cols) + 170, top + max(cell * len(rows), bar_h) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
             f'style="{FONT}" role="img">']
    for j, col in enumerate(cols):
        cx = label_w + cell * j + cell / 2
        parts.append(f'<text transform="translate({cx + 4:.1f},{top - 6}) rotate(-45)" font-size="10.5" '
                     f'fill="#3c4043">{escape(col)}</text>')
    for i, row in enumerate(rows):
        y0 = top + cell * i
        parts.append(f'<text x="{label_w - 6}" y="{y0 + cell / 2 + 4:.1f}" text-anchor="end" font-size="11" '
                     f'fill="#202124">{escape(row)}</text>')
        for j, col in enumerate(cols):
            v = values[i][j]
            x0 = label_w + cell * j
            if v is None:
                parts.append(f'<rect x="{x0}" y="{y0}" width="{cell - 1}" height="{cell - 1}" fill="#f1f3f4">'
                             f'<title>{escape(row)} / {escape(col)}: not set</title></rect>')
                continue
            t = scale(v)
            parts.append(f'<rect x="{x0}" y="{y0}" width="{cell - 1}" height="{cell - 1}" fill="{colour(t)}">'
                         f'<title>{escape(row)} / {escape(col)}: {fmt(v)}</title></rect>'
                         f'<text x="{x0 + (cell - 1) / 2:.1f}" y="{y0 + cell / 2 + 3.5:.1f}" text-anchor="middle" '
                         f'font-size="9.5" fill="{"#ffffff" if t < 0.55 else "#202124"}" pointer-events="none">'
                         f'{_short(v)}</text>')
    parts.append(_colour_bar(label_w + cell * len(cols) + 24, top, bar_h, legend))
    parts.append("</svg>")
    return "".join(parts)


def _short(v: float) -> str:
    return f"{v:g}" if float(v).is_integer() else f"{v:.2f}".lstrip("0")


def _colour_bar(x0: float, y0: float, height: float, legend) -> str:
    """A vertical gradient, high end on top, with the legend's title and end labels."""
    title, lo_text, hi_text = legend
    stops = "".join(f'<stop offset="{k / (len(VIRIDIS) - 1):.2f}" stop-color="{c}"/>'
                    for k, c in enumerate(reversed(VIRIDIS)))
    gid = f"cb-{escape(title)}-{int(x0)}-{int(y0)}"  # identical ids would only share identical gradients
    return (f'<defs><linearGradient id="{gid}" x1="0" y1="0" x2="0" y2="1">{stops}</linearGradient></defs>'
            f'<text x="{x0}" y="{y0 - 8}" font-size="11" fill="#202124">{escape(title)}</text>'
            f'<rect x="{x0}" y="{y0}" width="14" height="{height}" fill="url(#{gid})" stroke="#dadce0"/>'
            f'<text x="{x0 + 20}" y="{y0 + 10}" font-size="10.5" fill="#3c4043">{escape(hi_text)}</text>'
            f'<text x="{x0 + 20}" y="{y0 + height}" font-size="10.5" fill="#3c4043">{escape(lo_text)}</text>')


def bars(labels: list[str], base: list[float], chosen: list[float], unit: str, width: int = 560,
         row: int = 16) -> str:
    """Paired horizontal bars per row: the baseline (grey, behind) and the chosen model (blue, in front)."""
    top = max(max(base, default=0), max(chosen, default=0)) or 1.0
    label_w = 10 + int(6.3 * max((len(n) for n in labels), default=4))
    h = row * len(labels) + 26
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {h}" width="{width}" height="{h}" '
             f'style="{FONT}" role="img">']
    scale = (width - label_w - 56) / top
    for i, (name, b, c) in enumerate(zip(labels, base, chosen)):
        y0 = i * row + 2
        parts.append(f'<text x="{label_w - 6}" y="{y0 + row - 5}" text-anchor="end" font-size="10.5" '
                     f'fill="#3c4043">{escape(name)}</text>'
                     f'<rect x="{label_w}" y="{y0}" width="{b * scale:.1f}" height="{row - 3}" fill="#dadce0">'
                     f'<title>{escape(name)} uncompressed: {fmt(b)} {unit}</title></rect>'
                     f'<rect x="{label_w}" y="{y0 + 3}" width="{c * scale:.1f}" height="{row - 9}" fill="#1a73e8">'
                     f'<title>{escape(name)} this model: {fmt(c)} {unit}</title></rect>'
                     f'<text x="{label_w + max(b, c) * scale + 4:.1f}" y="{y0 + row - 5}" font-size="10" '
                     f'fill="#3c4043">{fmt(c)}</text>')
    parts.append(f'<text x="{label_w}" y="{h - 5}" font-size="11" fill="#5f6368">{escape(unit)} per layer: '
                 f'grey = uncompressed model, blue = this model</text></svg>')
    return "".join(parts)


def _px(v) -> str:
    """An SVG coordinate: a computed (float) one to a tenth of a pixel, a margin (int) as it is."""
    return f"{v:.1f}" if isinstance(v, float) else str(v)
