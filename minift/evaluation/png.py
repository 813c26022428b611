"""Small PNG charts without a plotting library: a heatmap and a line plot, drawn on a numpy canvas
and written as an 8-bit RGB PNG with zlib and struct.

The format (PNG spec, ISO/IEC 15948): the 8-byte signature, then chunks of
``length (4 bytes, big-endian) | type (4 ASCII) | data | CRC-32 of type + data``: IHDR (width,
height, bit depth 8, colour type 2 = RGB, compression 0, filter 0, interlace 0), one IDAT holding
the zlib stream of the rows, each row a filter byte (0: none) and its pixels, and IEND.

Labels are minimal: a 3x5 pixel font (digits, capital letters, a few signs) drawn at twice its
size; lower-case letters are drawn as capitals.
"""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

from minift.files import atomic_write

SIGNATURE = b"\x89PNG\r\n\x1a\n"
WHITE, BLACK, GRAY = (255, 255, 255), (0, 0, 0), (160, 160, 160)
# line colours, one per series (the Tableau 10 palette's first six)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]

# 3 x 5 glyphs, rows top to bottom, "1" = ink
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001010010",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111", "J": "001001001101010",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    ".": "000000000000010", "%": "101001010100101", "-": "000000111000000", ":": "000010000010000",
    "(": "001010010010001", ")": "100010010010100", "/": "001001010100100", "=": "000111000111000",
    " ": "000000000000000", "X_": "000101010101000",
}
GLYPH_W, GLYPH_H, SCALE = 3, 5, 2
ADVANCE = (GLYPH_W + 1) * SCALE  # pixels per character


# ---- the file ----------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(rgb: np.ndarray) -> bytes:
    """The PNG file of an (H, W, 3) uint8 image."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape[:2]:
        raise ValueError(f"encode_png: image must be a non-empty (H, W, 3) uint8 array, "
                         f"got {rgb.dtype} {rgb.shape}")
    h, w, _ = rgb.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, 3 * w)], axis=1)  # filter 0
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + _chunk(b"IEND", b""))


def write_png(path, rgb: np.ndarray) -> Path:
    """Write ``rgb`` as a PNG file at ``path`` (atomically); returns the path."""
    data, path = encode_png(rgb), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path


# ---- drawing -----------------------------------------------------------------------------
class Canvas:
    """A white (H, W, 3) uint8 image with rectangles, lines and text; out-of-range ink is clipped."""

    def __init__(self, width: int, height: int):
        self.rgb = np.full((height, width, 3), 255, np.uint8)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        """Fill [x0, x1) x [y0, y1)."""
        h, w, _ = self.rgb.shape
        self.rgb[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color, width: int = 1) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for t in np.linspace(0.0, 1.0, steps + 1):
            x, y = round(x0 + t * (x1 - x0)), round(y0 + t * (y1 - y0))
            self.rect(x - width // 2, y - width // 2, x - width // 2 + width, y - width // 2 + width, color)

    def text(self, x: int, y: int, s: str, color=BLACK) -> None:
        """``s`` with its top-left corner at (x, y); characters without a glyph are left blank."""
        for i, ch in enumerate(str(s)):
            glyph = _FONT.get("X_" if ch == "x" else ch.upper(), _FONT[" "])
            for k, bit in enumerate(glyph):
                if bit == "1":
                    gx, gy = x + i * ADVANCE + (k % GLYPH_W) * SCALE, y + (k // GLYPH_W) * SCALE
                    self.rect(gx, gy, gx + SCALE, gy + SCALE, color)

    def save(self, path) -> Path:
        return write_png(path, self.rgb)


def text_width(s: str) -> int:
    return len(str(s)) * ADVANCE


def accuracy_color(value: float) -> tuple:
    """Red (0) through yellow (0.5) to green (1); gray for NaN (no trials)."""
    if value is None or math.isnan(value):
        return GRAY
    stops = [(0.0, (215, 48, 39)), (0.5, (254, 224, 139)), (1.0, (26, 152, 80))]
    v = min(max(float(value), 0.0), 1.0)
    (a, ca), (b, cb) = (stops[0], stops[1]) if v <= 0.5 else (stops[1], stops[2])
    f = (v - a) / (b - a)
    return tuple(round(p + f * (q - p)) for p, q in zip(ca, cb))


# ---- charts ------------------------------------------------------------------------------
CELL_W, CELL_H = 48, 28


def heatmap(values, row_labels, col_labels, title: str, x_title: str, y_title: str) -> Canvas:
    """A grid of coloured cells (``accuracy_color``) with each value in percent written in it.

    Args:
        values: (rows, cols) numbers in [0, 1] (NaN: gray, no number).
        row_labels, col_labels: the texts left of each row and above each column.
        title, x_title, y_title: the title above; the column axis's name below; the row axis's
            name above the row labels.
    """
    values = np.asarray(values, dtype=float)
    rows, cols = values.shape
    left = max(text_width(t) for t in [*map(str, row_labels), y_title]) + 12
    top = 2 * 16 + 8
    width = max(left + cols * CELL_W + 8, text_width(title) + 16, text_width(x_title) + left + 8)
    canvas = Canvas(width, top + rows * CELL_H + 28)
    canvas.text(8, 6, title)
    canvas.text(8, 6 + 16, y_title)
    for j, label in enumerate(col_labels):
        x = left + j * CELL_W + (CELL_W - text_width(label)) // 2
        canvas.text(x, top - 14, str(label))
    for i, label in enumerate(row_labels):
        y = top + i * CELL_H
        canvas.text(left - 6 - text_width(label), y + (CELL_H - GLYPH_H * SCALE) // 2, str(label))
        for j in range(cols):
            x, v = left + j * CELL_W, values[i, j]
            canvas.rect(x + 1, y + 1, x + CELL_W - 1, y + CELL_H - 1, accuracy_color(v))
            if not math.isnan(v):
                s = f"{100 * v:.0f}"
                canvas.text(x + (CELL_W - text_width(s)) // 2, y + (CELL_H - GLYPH_H * SCALE) // 2, s)
    canvas.text(left, top + rows * CELL_H + 10, x_title)
    return canvas


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * k / n for k in range(n + 1)]


def _label(v: float) -> str:
    if abs(v) >= 1000:
        return f"{v / 1000:.1f}K".replace(".0K", "K")
    return f"{v:.0f}" if abs(v) >= 10 or v == int(v) else f"{v:.1f}"


def line_plot(series: dict, title: str, x_title: str, y_title: str, width: int = 520,
              height: int = 340, log_y: bool = False) -> Canvas:
    """Lines through (x, y) points, one colour per series (``PALETTE``), axes with 5 ticks each
    and a legend of the series names at the top right.

    Args:
        series: {name: (xs, ys)}; points with a non-finite y (or y <= 0 with log_y) are skipped.
        title, x_title, y_title: the title, the x axis's name (below) and the y axis's (above it).
        log_y: a logarithmic y axis (ticks still say the values).
    """
    def tf(y):  # the drawn y
        return (math.log10(y) if y > 0 else math.nan) if log_y else y

    series = {name: (xs, [tf(y) for y in ys]) for name, (xs, ys) in series.items()}
    finite = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(y)]
    if not finite:
        raise ValueError("line_plot: no finite points to draw")
    x_lo, x_hi = min(p[0] for p in finite), max(p[0] for p in finite)
    y_lo, y_hi = min(p[1] for p in finite), max(p[1] for p in finite)
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 1, y_hi + 1
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_ticks = _ticks(y_lo, y_hi)
    shown = [_label(10 ** t if log_y else t) for t in y_ticks]
    left = max(text_width(s) for s in shown) + 16
    top, right, bottom = 44, 16, 40
    canvas = Canvas(max(width, text_width(title) + 16), height)
    pw, ph = canvas.rgb.shape[1] - left - right, height - top - bottom

    def px(x, y):
        return left + (x - x_lo) / (x_hi - x_lo) * pw, top + ph - (y - y_lo) / (y_hi - y_lo) * ph

    canvas.text(8, 6, title)
    canvas.text(8, 24, y_title)
    for t, s in zip(y_ticks, shown):
        _, y = px(x_lo, t)
        canvas.line(left - 4, y, left, y, BLACK)
        canvas.text(left - 6 - text_width(s), round(y) - GLYPH_H, s)
    for t in _ticks(x_lo, x_hi):
        x, _ = px(t, y_lo)
        canvas.line(x, top + ph, x, top + ph + 4, BLACK)
        canvas.text(round(x) - text_width(_label(t)) // 2, top + ph + 8, _label(t))
    canvas.line(left, top, left, top + ph, BLACK)
    canvas.line(left, top + ph, left + pw, top + ph, BLACK)
    canvas.text(left + pw - text_width(x_title), height - 14, x_title)
    for k, (name, (xs, ys)) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        points = [px(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        for (a, b), (c, d) in zip(points, points[1:]):
            canvas.line(a, b, c, d, color, width=2)
        for a, b in points:
            canvas.rect(round(a) - 2, round(b) - 2, round(a) + 3, round(b) + 3, color)
        lx, ly = left + pw - text_width(str(name)) - 16, top + 4 + 14 * k
        canvas.rect(lx, ly, lx + 10, ly + 10, color)
        canvas.text(lx + 14, ly, str(name))
    return canvas
