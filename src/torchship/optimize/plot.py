"""Accuracy against latency, one point per variant, as a PNG drawn with Pillow.

Pillow is already a torchship dependency, so the plot needs no plotting library. x is
the p50 latency at batch 1 (ms; a log scale when the latencies span more than 10x),
y the top-1 accuracy (agreement with the parent when there are no labels). The parent
is drawn as a square, the picked variant in green; labels are placed where they do
not overlap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from torchship.optimize.report import OptimizeReport, VariantRow

WIDTH, HEIGHT = 1000, 660
LEFT, RIGHT, TOP, BOTTOM = 90, 40, 60, 80
PALETTE = {
    "parent": (40, 40, 40),
    "quantize": (31, 119, 180),
    "onnxruntime": (255, 127, 14),
    "prune": (148, 103, 189),
    "distill": (214, 39, 40),
    "precision": (140, 86, 75),
    "cuda": (23, 190, 207),
}
PICKED = (44, 160, 44)
Box = tuple[float, float, float, float]


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _linear_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / count)) if span > 0 else 1.0
    for mult in (1, 2, 2.5, 5, 10):
        if span / (step * mult) <= count:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    ticks = []
    for exp in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for mult in (1, 2, 5):
            value = mult * 10.0**exp
            if lo <= value <= hi:
                ticks.append(value)
    return ticks


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _x_scale(
    latency: list[float], plot_w: float
) -> tuple[Callable[[float], float], list[float], bool]:
    lo, hi = min(latency, default=1.0), max(latency, default=1.0)
    if lo > 0 and hi / lo > 10:
        log_lo, log_hi = math.log10(lo) - 0.1, math.log10(hi) + 0.1

        def to_px(v: float) -> float:
            return LEFT + (math.log10(v) - log_lo) / (log_hi - log_lo) * plot_w

        return to_px, _log_ticks(10**log_lo, 10**log_hi), True
    top = hi * 1.15 if hi > 0 else 1.0

    def to_px_linear(v: float) -> float:
        return LEFT + v / top * plot_w

    return to_px_linear, _linear_ticks(0.0, top), False


def plot_tradeoff(report: OptimizeReport, path: str | Path) -> Path:
    """Draw the measured variants of ``report`` into a PNG at ``path``."""
    rows = [r for r in report.rows if r.measured and r.p50_ms is not None and r.p50_ms > 0]
    accuracy = [100 * ((r.top1 if report.labelled else r.agreement) or 0.0) for r in rows]
    latency = [r.p50_ms or 0.0 for r in rows]
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    small, normal, big = _font(13), _font(15), _font(18)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    x_px, x_ticks, log_scale = _x_scale(latency, plot_w)
    y_min = min(accuracy, default=90.0)
    y_lo = max(0.0, math.floor(y_min - max(0.5, (100 - y_min) * 0.2)))
    y_hi = 100.0 + (100.0 - y_lo) * 0.04

    def y_px(v: float) -> float:
        return TOP + (1 - (v - y_lo) / (y_hi - y_lo)) * plot_h

    for tick in x_ticks:
        x = x_px(tick)
        draw.line([(x, TOP), (x, TOP + plot_h)], fill=(232, 232, 232))
        draw.text((x, TOP + plot_h + 8), f"{tick:g}", fill="black", font=small, anchor="mt")
    for tick in _linear_ticks(y_lo, 100.0):
        y = y_px(tick)
        draw.line([(LEFT, y), (LEFT + plot_w, y)], fill=(232, 232, 232))
        draw.text((LEFT - 8, y), f"{tick:g}%", fill="black", font=small, anchor="rm")
    draw.rectangle([LEFT, TOP, LEFT + plot_w, TOP + plot_h], outline="black")
    what = "top-1 accuracy" if report.labelled else "agreement with the parent"
    draw.text(
        (WIDTH / 2, 26),
        f"{report.parent}: {what} vs latency ({report.device}, {report.threads} "
        f"thread{'' if report.threads == 1 else 's'})",
        fill="black",
        font=big,
        anchor="mm",
    )
    draw.text(
        (LEFT + plot_w / 2, HEIGHT - 28),
        "p50 latency at batch 1, ms" + (" (log scale)" if log_scale else ""),
        fill="black",
        font=normal,
        anchor="mm",
    )
    _vertical_text(image, what, (24, TOP + plot_h / 2), normal)

    points = [(x_px(lat), y_px(acc)) for lat, acc in zip(latency, accuracy, strict=True)]
    taken: list[Box] = [(x - 7, y - 7, x + 7, y + 7) for x, y in points]
    for row, (x, y) in zip(rows, points, strict=True):
        colour = _colour(row, report)
        if row.status == "parent":
            draw.rectangle([x - 6, y - 6, x + 6, y + 6], fill=colour)
        else:
            draw.ellipse([x - 6, y - 6, x + 6, y + 6], fill=colour)
    placed = []
    for row, (x, y) in zip(rows, points, strict=True):
        label = row.method + (" (picked)" if report.picked and row.ref == report.picked else "")
        box = _place(draw, label, small, x, y, taken)
        taken.append(box)
        placed.append((row, label, box, x, y))
    for _row, _label, box, x, y in placed:  # leader lines first, so labels cover them
        if abs((box[0] + box[2]) / 2 - x) > 40 or abs((box[1] + box[3]) / 2 - y) > 22:
            near_x = min(max(x, box[0]), box[2])
            near_y = min(max(y, box[1]), box[3])
            draw.line([(x, y), (near_x, near_y)], fill=(170, 170, 170))
    for row, label, box, _x, _y in placed:
        draw.rectangle(box, fill="white")
        draw.text((box[0] + 2, box[1] + 1), label, fill=_colour(row, report), font=small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def _colour(row: VariantRow, report: OptimizeReport) -> tuple[int, int, int]:
    if report.picked and row.ref == report.picked:
        return PICKED
    return PALETTE.get("parent" if row.status == "parent" else row.family, (0, 0, 0))


def _place(
    draw: ImageDraw.ImageDraw, text: str, font: Any, x: float, y: float, taken: list[Box]
) -> Box:
    """The first label position around (x, y) that overlaps no point and no label."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 4
    candidates = []
    for step in range(8):
        dy = step * (h + 2)
        candidates += [(x + 9, y - h / 2 - dy), (x + 9, y - h / 2 + dy)]
        candidates += [(x - 9 - w, y - h / 2 - dy), (x - 9 - w, y - h / 2 + dy)]
    for cx, cy in candidates:
        box = (cx, cy, cx + w, cy + h)
        inside = box[0] >= LEFT + 1 and box[2] <= WIDTH - RIGHT - 1
        inside = inside and box[1] >= TOP + 1 and box[3] <= HEIGHT - BOTTOM - 1
        if inside and not any(_overlaps(box, other) for other in taken):
            return box
    return (x + 9, y - h / 2, x + 9 + w, y + h / 2)


def _vertical_text(image: Image.Image, text: str, centre: tuple[float, float], font: Any) -> None:
    left, top, right, bottom = font.getbbox(text)
    label = Image.new("RGBA", (int(right - left) + 4, int(bottom - top) + 4), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((2 - left, 2 - top), text, fill="black", font=font)
    rotated = label.rotate(90, expand=True)
    image.paste(
        rotated,
        (int(centre[0] - rotated.width / 2), int(centre[1] - rotated.height / 2)),
        rotated,
    )
