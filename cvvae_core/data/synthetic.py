"""Procedural videos: the training data of the built-in model, and test/demo input.

Each clip is drawn from a seed alone (no files, no downloads): a textured background seen
through a camera that pans and zooms, a few textured shapes moving over it with their own
velocities, and a global lighting change (brightness ramp/flicker, colour tint drift and a moving
light spot). These are the things a video VAE must carry through its temporal compression:
global motion, independent object motion, occlusion edges, fine texture and slow photometric
change. Output is ``[3, T, H, W]`` in [-1, 1], the model's range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SyntheticConfig:
    frames: int = 17
    height: int = 64
    width: int = 64
    max_shapes: int = 4
    max_pan: float = 0.6       # background travel over the clip, in canvas half-widths
    max_zoom: float = 0.35     # relative zoom change over the clip
    max_speed: float = 1.2     # shape travel over the clip, in frame half-widths


def _uniform(g: torch.Generator, lo: float, hi: float, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _texture(g: torch.Generator, size: int) -> torch.Tensor:
    """A [3, size, size] texture in [0, 1]: stripes, checker or smooth noise over a colour gradient."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    c0, c1 = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
    angle = float(_uniform(g, 0, math.pi))
    ramp = (xs * math.cos(angle) + ys * math.sin(angle) + 1) / 2
    base = c0 + (c1 - c0) * ramp
    kind = int(torch.randint(3, (1,), generator=g))
    freq = float(_uniform(g, 2, 10))
    if kind == 0:  # stripes at a random angle
        a2 = float(_uniform(g, 0, math.pi))
        pattern = torch.sin(freq * math.pi * (xs * math.cos(a2) + ys * math.sin(a2)))
    elif kind == 1:  # checker, softened so it is band-limited
        pattern = torch.tanh(3 * torch.sin(freq * math.pi * xs) * torch.sin(freq * math.pi * ys))
    else:  # smooth value noise
        cells = int(freq) + 2
        pattern = F.interpolate(torch.rand(1, 1, cells, cells, generator=g) * 2 - 1, size=(size, size),
                                mode="bicubic", align_corners=True)[0, 0]
    contrast = float(_uniform(g, 0.1, 0.4))
    tint = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.5
    return (base + contrast * tint * pattern).clamp(0, 1)


def generate_clip(seed: int, cfg: SyntheticConfig = SyntheticConfig()) -> torch.Tensor:
    """One clip ``[3, T, H, W]`` in [-1, 1], a pure function of ``seed`` and ``cfg``."""
    g = torch.Generator().manual_seed(int(seed))
    t_count, h, w = cfg.frames, cfg.height, cfg.width
    t = torch.linspace(0, 1, t_count).view(t_count, 1, 1)

    # Background: a large texture seen through a panning, zooming camera (grid_sample coordinates
    # are in [-1, 1] over the canvas; the view covers a fraction of it).
    canvas = _texture(g, 2 * max(h, w))
    pan = (torch.rand(2, generator=g) * 2 - 1) * cfg.max_pan
    zoom0 = float(_uniform(g, 0.45, 0.6))
    zoom1 = zoom0 * (1 + float(_uniform(g, -cfg.max_zoom, cfg.max_zoom)))
    scale = (zoom0 + (zoom1 - zoom0) * t)                       # [T, 1, 1]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    cx = (-pan[0] / 2 + pan[0] * t).clamp(-1 + scale, 1 - scale)
    cy = (-pan[1] / 2 + pan[1] * t).clamp(-1 + scale, 1 - scale)
    grid = torch.stack([cx + xs * scale, cy + ys * scale], dim=-1)  # [T, H, W, 2]
    frames = F.grid_sample(canvas.expand(t_count, -1, -1, -1), grid, mode="bilinear", align_corners=False)

    # Moving shapes, composited back to front with anti-aliased masks (signed distance -> sigmoid).
    aa = 0.5 * 2 / min(h, w)  # half a pixel in frame coordinates
    for _ in range(int(torch.randint(1, cfg.max_shapes + 1, (1,), generator=g))):
        p0 = torch.rand(2, generator=g) * 1.6 - 0.8
        vel = (torch.rand(2, generator=g) * 2 - 1) * cfg.max_speed
        px, py = p0[0] + vel[0] * (t - 0.5), p0[1] + vel[1] * (t - 0.5)
        size = float(_uniform(g, 0.15, 0.45))
        dx, dy = xs - px, ys - py
        kind = int(torch.randint(3, (1,), generator=g))
        if kind == 0:  # disc
            dist = torch.sqrt(dx ** 2 + dy ** 2) - size
        elif kind == 1:  # rotating rectangle
            rot = float(_uniform(g, 0, math.pi)) + float(_uniform(g, -1.5, 1.5)) * t
            u = dx * torch.cos(rot) + dy * torch.sin(rot)
            v = -dx * torch.sin(rot) + dy * torch.cos(rot)
            aspect = float(_uniform(g, 0.4, 1.0))
            dist = torch.maximum(u.abs() - size, v.abs() - size * aspect)
        else:  # ring
            dist = (torch.sqrt(dx ** 2 + dy ** 2) - size).abs() - size * 0.3
        mask = torch.sigmoid(-dist / aa).unsqueeze(1)          # [T, 1, H, W]
        tex = _texture(g, 32)
        # The texture moves with the shape: sample it in the shape's own coordinates.
        tex_grid = torch.stack([dx / (2 * size), dy / (2 * size)], dim=-1).clamp(-1, 1)
        fill = F.grid_sample(tex.expand(t_count, -1, -1, -1), tex_grid, mode="bilinear", align_corners=False)
        frames = frames * (1 - mask) + fill * mask

    # Lighting: brightness ramp + flicker, a drifting colour tint and a moving light spot.
    gain = 1 + float(_uniform(g, -0.35, 0.35)) * (t - 0.5) * 2
    gain = gain + float(_uniform(g, 0, 0.12)) * torch.sin(2 * math.pi * float(_uniform(g, 0.5, 3)) * t
                                                          + float(_uniform(g, 0, 2 * math.pi)))
    tint = 1 + (torch.rand(3, generator=g) * 2 - 1).view(1, 3, 1, 1) * 0.15 * t.unsqueeze(1)
    lx = float(_uniform(g, -1, 1)) + float(_uniform(g, -0.8, 0.8)) * t
    ly = float(_uniform(g, -1, 1)) + float(_uniform(g, -0.8, 0.8)) * t
    spot = float(_uniform(g, 0, 0.35)) * torch.exp(-((xs - lx) ** 2 + (ys - ly) ** 2) / 0.5)
    frames = frames * gain.unsqueeze(1) * tint + spot.unsqueeze(1)

    return (frames.clamp(0, 1) * 2 - 1).transpose(0, 1).contiguous()


def generate_batch(seed: int, batch: int, cfg: SyntheticConfig = SyntheticConfig()) -> torch.Tensor:
    """``[B, 3, T, H, W]``: clips ``seed * 1_000_003 + i`` for i < batch (distinct seeds per batch)."""
    return torch.stack([generate_clip(seed * 1_000_003 + i, cfg) for i in range(batch)])
