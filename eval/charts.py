"""Pictures drawn with Pillow alone: a grouped bar chart and a line chart with error bars, and a labelled image grid."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

# Tableau 10: distinguishable, colour-blind-aware, and what readers know from matplotlib.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")
REAL_COLOUR = "#9a9a9a"
_INK, _GRID, _BACKGROUND = "#222222", "#dddddd", "white"


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled scalable font (Pillow >= 10.1), else its bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, fnt, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=fnt) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    return [*lines, line] if line else lines


def _nice_step(span: float) -> float:
    raw = span / 5
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def bar_chart(series: dict[str, dict], labels: list[str], keys: list[str], title: str = "") -> Image.Image:
    """Grouped bars: a group per metric (`keys`, shown as `labels`), a bar per series, error bars = `sem`.

    `series` maps a name to {key: object with `.mean` and `.sem`, or None}; the series named
    "Real images" is drawn in grey.
    """
    names = list(series)
    values = [s.mean for stats in series.values() for s in stats.values() if s is not None]
    tops = [s.mean + (0 if math.isnan(s.sem) else s.sem) for st in series.values() for s in st.values() if s]
    lo = min(0.0, math.floor(min(values, default=0) * 10) / 10)
    hi = max(1.0, max(tops, default=1.0))
    bar_w, gap = 34, 40
    group_w = bar_w * len(names) + gap
    left, right, top, bottom = 70, 30 + max(140, 9 * max(len(n) for n in names)), 60, 50
    plot_w, plot_h = group_w * len(keys), 320
    image = Image.new("RGB", (left + plot_w + right, top + plot_h + bottom), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    small, normal = font(12), font(15)

    def y(value: float) -> float:
        return top + plot_h * (hi - value) / (hi - lo)

    step = _nice_step(hi - lo)
    tick = math.ceil(lo / step) * step
    while tick <= hi + 1e-9:
        draw.line([(left, y(tick)), (left + plot_w, y(tick))], fill=_GRID)
        draw.text((left - 8, y(tick)), f"{tick:.2f}", font=small, fill=_INK, anchor="rm")
        tick += step
    draw.line([(left, top), (left, top + plot_h)], fill=_INK)
    draw.line([(left, y(0)), (left + plot_w, y(0))], fill=_INK)
    draw.text((left + plot_w / 2, 20), title, font=normal, fill=_INK, anchor="mm")
    colours = {}
    palette = iter(PALETTE * 10)
    for name in names:
        colours[name] = REAL_COLOUR if name == "Real images" else next(palette)
    for g, (key, label) in enumerate(zip(keys, labels, strict=True)):
        x0 = left + g * group_w + gap / 2
        draw.text((x0 + bar_w * len(names) / 2, top + plot_h + 18), label, font=normal, fill=_INK, anchor="mm")
        for i, name in enumerate(names):
            stat = series[name].get(key)
            if stat is None:
                continue
            xa, xb = x0 + i * bar_w + 3, x0 + (i + 1) * bar_w - 3
            ya, yb = sorted((y(0), y(stat.mean)))
            draw.rectangle([xa, ya, xb, yb], fill=colours[name])
            if not math.isnan(stat.sem):
                xm = (xa + xb) / 2
                e_top, e_bottom = y(stat.mean + stat.sem), y(stat.mean - stat.sem)
                draw.line([(xm, e_top), (xm, e_bottom)], fill=_INK, width=2)
                draw.line([(xm - 5, e_top), (xm + 5, e_top)], fill=_INK, width=2)
                draw.line([(xm - 5, e_bottom), (xm + 5, e_bottom)], fill=_INK, width=2)
            label_y = min(y(stat.mean), y(stat.mean + (0 if math.isnan(stat.sem) else stat.sem))) - 4
            draw.text(((xa + xb) / 2, label_y), f"{stat.mean:.3f}", font=font(10), fill=_INK, anchor="mb")
    for i, name in enumerate(names):  # legend
        ly = top + 10 + i * 22
        lx = left + plot_w + 20
        draw.rectangle([lx, ly, lx + 14, ly + 14], fill=colours[name])
        draw.text((lx + 22, ly + 7), name, font=small, fill=_INK, anchor="lm")
    return image


def _thumbnail(path: str | Path | None, size: int) -> Image.Image:
    cell = Image.new("RGB", (size, size), "#eeeeee")
    if path is None:
        return cell
    try:
        with Image.open(path) as source:
            thumb = ImageOps.contain(source.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
    except OSError:
        return cell
    cell.paste(thumb, ((size - thumb.width) // 2, (size - thumb.height) // 2))
    return cell


def image_grid(
    rows: list[tuple[str, list[str | Path | None]]],
    columns: list[str],
    *,
    cell: int = 128,
    label_width: int = 220,
    title: str = "",
) -> Image.Image:
    """A table of images: one row per (label, image paths), one column per `columns` name; None = blank cell."""
    pad, head = 6, 48
    width = label_width + len(columns) * (cell + pad) + pad
    height = head + len(rows) * (cell + pad) + pad
    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    small, normal = font(13), font(15)
    draw.text((pad, 14), title, font=normal, fill=_INK, anchor="lm")
    for c, name in enumerate(columns):
        x = label_width + pad + c * (cell + pad)
        draw.text((x + cell / 2, head - 12), name, font=small, fill=_INK, anchor="mm")
    for r, (label, paths) in enumerate(rows):
        y = head + pad + r * (cell + pad)
        lines = _wrap(draw, label, small, label_width - 2 * pad)
        for k, line in enumerate(lines[:7]):
            draw.text((pad, y + cell / 2 + (k - (min(len(lines), 7) - 1) / 2) * 16), line, font=small, fill=_INK,
                      anchor="lm")
        for c, path in enumerate(paths):
            image.paste(_thumbnail(path, cell), (label_width + pad + c * (cell + pad), y))
    return image


def line_chart(series: dict[str, list[tuple[float, float, float]]], *, title: str = "", x_label: str = "",
               y_label: str = "", thin: dict[str, list[list[tuple[float, float]]]] | None = None) -> Image.Image:
    """Lines with error bars: `series` maps a name to its points (x, y, sem); a sem of 0 or NaN draws no bar.

    `thin` adds, per series name, extra thin lines of (x, y) points in the same colour (e.g. single
    random directions around their mean). Non-finite y values are left out.
    """
    def finite(points):
        return [p for p in points if math.isfinite(p[1])]

    lines = {name: finite(points) for name, points in series.items()}
    extra = {name: [finite(line) for line in lines_] for name, lines_ in (thin or {}).items()}
    xs = [p[0] for pts in lines.values() for p in pts] + [p[0] for ls in extra.values() for line in ls for p in line]
    ys = [p[1] + s * sign for pts in lines.values() for p in pts
          for s in ((p[2] if math.isfinite(p[2]) else 0.0),) for sign in (-1, 1)]
    ys += [p[1] for ls in extra.values() for line in ls for p in line]
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    pad = (y_hi - y_lo) * 0.05 or abs(y_hi) * 0.05 or 0.5
    y_lo, y_hi = y_lo - pad, y_hi + pad
    left, top, bottom = 80, 50, 60
    right = 40 + max([150, *(9 * len(n) for n in series)])
    plot_w, plot_h = 560, 340
    image = Image.new("RGB", (left + plot_w + right, top + plot_h + bottom), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    small, normal = font(12), font(15)

    def px(x: float) -> float:
        return left + plot_w * (x - x_lo) / (x_hi - x_lo)

    def py(y: float) -> float:
        return top + plot_h * (y_hi - y) / (y_hi - y_lo)

    for axis, lo, hi in (("y", y_lo, y_hi), ("x", x_lo, x_hi)):
        step = _nice_step(hi - lo)
        tick = math.ceil(lo / step) * step
        while tick <= hi + 1e-12:
            label = f"{tick:.4g}"
            if axis == "y":
                draw.line([(left, py(tick)), (left + plot_w, py(tick))], fill=_GRID)
                draw.text((left - 8, py(tick)), label, font=small, fill=_INK, anchor="rm")
            else:
                draw.line([(px(tick), top + plot_h), (px(tick), top + plot_h + 5)], fill=_INK)
                draw.text((px(tick), top + plot_h + 16), label, font=small, fill=_INK, anchor="mm")
            tick += step
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=_INK)
    draw.text((left + plot_w / 2, 22), title, font=normal, fill=_INK, anchor="mm")
    draw.text((left + plot_w / 2, top + plot_h + 42), x_label, font=small, fill=_INK, anchor="mm")
    draw.text((10, top - 18), y_label, font=small, fill=_INK, anchor="lm")
    colours = dict(zip(series, PALETTE * (len(series) // len(PALETTE) + 1), strict=False))
    for name, points in lines.items():
        colour = colours[name]
        for line in extra.get(name, []):
            if len(line) > 1:
                draw.line([(px(x), py(y)) for x, y in line], fill=colour, width=1)
        if len(points) > 1:
            draw.line([(px(x), py(y)) for x, y, _ in points], fill=colour, width=3)
        for x, y, sem in points:
            draw.ellipse([px(x) - 3, py(y) - 3, px(x) + 3, py(y) + 3], fill=colour)
            if math.isfinite(sem) and sem > 0:
                e_top, e_bottom = py(y + sem), py(y - sem)
                draw.line([(px(x), e_top), (px(x), e_bottom)], fill=colour, width=2)
                draw.line([(px(x) - 4, e_top), (px(x) + 4, e_top)], fill=colour, width=2)
                draw.line([(px(x) - 4, e_bottom), (px(x) + 4, e_bottom)], fill=colour, width=2)
    for i, name in enumerate(series):  # legend
        ly, lx = top + 10 + i * 22, left + plot_w + 20
        draw.rectangle([lx, ly, lx + 14, ly + 14], fill=colours[name])
        draw.text((lx + 22, ly + 7), name, font=small, fill=_INK, anchor="lm")
    return image
