"""A PNG of a run's curves (``OUT/curves.png``) from ``OUT/log.jsonl``, with numpy and zlib only.

``python -m cvvae_core plot RUN_DIR`` (also written at the end of every run). Panels, each only
when the log has its values: training loss (log scale when positive), reconstruction L1 (video and
image-decoder terms), validation PSNR and SSIM. A panel's title names its curves in their colours;
the y range (min, max) and the step range are printed at the axes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..io.video import write_png

PANEL_W, PANEL_H = 560, 220
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 70, 16, 28, 24
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
AXIS, TEXT, BACKGROUND = (90, 90, 90), (30, 30, 30), (255, 255, 255)

# A 3x5 pixel font: five rows of 3 bits (4 = left pixel, 2 = middle, 1 = right).
_GLYPHS = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    "A": (2, 5, 7, 5, 5), "B": (6, 5, 6, 5, 6), "C": (3, 4, 4, 4, 3), "D": (6, 5, 5, 5, 6), "E": (7, 4, 6, 4, 7),
    "F": (7, 4, 6, 4, 4), "G": (3, 4, 5, 5, 3), "H": (5, 5, 7, 5, 5), "I": (7, 2, 2, 2, 7), "J": (1, 1, 1, 5, 2),
    "K": (5, 5, 6, 5, 5), "L": (4, 4, 4, 4, 7), "M": (5, 7, 7, 5, 5), "N": (6, 5, 5, 5, 5), "O": (2, 5, 5, 5, 2),
    "P": (6, 5, 6, 4, 4), "Q": (2, 5, 5, 6, 3), "R": (6, 5, 6, 5, 5), "S": (3, 4, 2, 1, 6), "T": (7, 2, 2, 2, 2),
    "U": (5, 5, 5, 5, 7), "V": (5, 5, 5, 5, 2), "W": (5, 5, 7, 7, 5), "X": (5, 5, 2, 5, 5), "Y": (5, 5, 2, 2, 2),
    "Z": (7, 1, 2, 4, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0), "_": (0, 0, 0, 0, 7), "/": (1, 1, 2, 4, 4),
    ":": (0, 2, 0, 2, 0), "+": (0, 2, 7, 2, 0), "(": (1, 2, 2, 2, 1), ")": (4, 2, 2, 2, 4), "=": (0, 7, 0, 7, 0),
    " ": (0, 0, 0, 0, 0),
}
SCALE = 2  # font pixels per glyph pixel


def text(img: np.ndarray, x: int, y: int, s: str, colour) -> int:
    """Draw ``s`` (upper-cased) with its top-left at (x, y); returns the x after it."""
    for ch in s.upper():
        rows = _GLYPHS.get(ch, _GLYPHS[" "])
        for r, bits in enumerate(rows):
            for c in range(3):
                if bits & (4 >> c):
                    y0, x0 = y + r * SCALE, x + c * SCALE
                    img[max(0, y0):y0 + SCALE, max(0, x0):x0 + SCALE] = colour
        x += 4 * SCALE
    return x


def polyline(img: np.ndarray, xs: np.ndarray, ys: np.ndarray, colour):
    """A 2-pixel-wide line through the points (every pixel along each segment)."""
    if len(xs) == 1:
        xs, ys = np.repeat(xs, 2), np.repeat(ys, 2)
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        px = np.round(np.linspace(x0, x1, n)).astype(int)
        py = np.round(np.linspace(y0, y1, n)).astype(int)
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            qx, qy = np.clip(px + dx, 0, img.shape[1] - 1), np.clip(py + dy, 0, img.shape[0] - 1)
            img[qy, qx] = colour


def _fmt(v: float) -> str:
    return f"{v:.4g}".replace("e+0", "e").replace("e-0", "e-")


def panel(title: str, series: dict[str, list[tuple[int, float]]], log_scale: bool = False) -> np.ndarray:
    img = np.full((PANEL_H, PANEL_W, 3), BACKGROUND, dtype=np.uint8)
    x = text(img, 8, 6, title + ":", TEXT) + 8
    for k, name in enumerate(series):
        x = text(img, x, 6, name, COLOURS[k % len(COLOURS)]) + 12
    left, right, top, bottom = MARGIN_L, PANEL_W - MARGIN_R, MARGIN_T, PANEL_H - MARGIN_B
    img[top:bottom, left] = AXIS
    img[bottom, left:right] = AXIS
    points = [p for s in series.values() for p in s]
    log_scale = log_scale and all(v > 0 for _, v in points)
    tf = (lambda v: math.log10(v)) if log_scale else (lambda v: v)
    steps = [s for s, _ in points]
    values = [tf(v) for _, v in points]
    s_lo, s_hi = min(steps), max(steps)
    v_lo, v_hi = min(values), max(values)
    if v_hi == v_lo:
        v_lo, v_hi = v_lo - 0.5, v_hi + 0.5
    if s_hi == s_lo:
        s_hi = s_lo + 1
    for k, pts in enumerate(series.values()):
        xs = left + 2 + (np.array([s for s, _ in pts]) - s_lo) / (s_hi - s_lo) * (right - left - 4)
        ys = bottom - 2 - (np.array([tf(v) for _, v in pts]) - v_lo) / (v_hi - v_lo) * (bottom - top - 4)
        polyline(img, xs, ys, COLOURS[k % len(COLOURS)])
    inverse = (lambda v: 10 ** v) if log_scale else (lambda v: v)
    text(img, 4, top, _fmt(inverse(v_hi)), TEXT)
    text(img, 4, bottom - 10, _fmt(inverse(v_lo)), TEXT)
    if log_scale:
        text(img, 4, (top + bottom) // 2 - 5, "LOG", AXIS)
    text(img, left, bottom + 6, f"STEP {s_lo}", TEXT)
    label = f"{s_hi}"
    text(img, right - 4 * SCALE * len(label), bottom + 6, label, TEXT)
    return img


def read_log(run_dir) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if Path(run_dir).is_file():
        raise InputError(f"{run_dir} is a file; give the output folder of a training run (its out_dir)")
    if not path.is_file():
        raise InputError(f"{path} does not exist; give the output folder of a training run (its out_dir)")
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line of a run still writing
    return records


def plot_run(run_dir, out=None) -> Path:
    """Write the curves of ``run_dir/log.jsonl`` to ``out`` (default ``run_dir/curves.png``)."""
    records = [r for r in read_log(run_dir) if "step" in r]

    def curve(key):
        return [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]

    panels = []
    if curve("loss"):
        panels.append(panel("loss", {"loss": curve("loss")}, log_scale=True))
    rec = {k: curve(k) for k in ("rec_l1", "rec2d_l1") if curve(k)}
    if rec:
        panels.append(panel("L1", rec))
    val_keys = sorted({k for r in records for k in r if k.startswith("val/")})
    for metric, label in (("_psnr", "val PSNR"), ("_ssim", "val SSIM")):
        val = {k[4:-len(metric)]: curve(k) for k in val_keys if k.endswith(metric)}
        if val:
            panels.append(panel(label, val))
    if not panels:
        raise InputError(f"{Path(run_dir) / 'log.jsonl'} has no logged steps yet; plot again after the first "
                         "log_every steps")
    out = Path(out) if out else Path(run_dir) / "curves.png"
    write_png(out, torch.from_numpy(np.concatenate(panels, axis=0)))
    return out
