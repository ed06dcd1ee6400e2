"""Pictures drawn with Pillow alone: a grouped bar chart with error bars, and a labelled image grid."""

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
