"""Seamless streaming executor: the model's own layers, run frame chunk by frame chunk and tile by
tile so that the result matches the whole-clip pass.

Why the official tiles disagree with the untiled model: besides convolutions seeing a tile edge
instead of the neighbouring pixels, every 5-D GroupNorm takes its statistics over the whole clip
(C/groups x T x H x W), so a tile or chunk normalised on its own statistics is a different
function. This executor removes both causes:

* **Convolutions.** Every 3-D convolution is a :class:`_TimeConv` that keeps, between chunks, the
  input frames its next outputs still need (the causal encoder keeps its last ``2p`` frames;
  the symmetric decoder convolutions answer one frame late and pad the end only at the last
  chunk). Time is therefore exact at any chunk length, with no re-encoded overlap. In space,
  a tile carries a halo that covers the receptive field of the tiled part of the network, and
  only its core is kept.
* **GroupNorm statistics.** :class:`StatsBook` sums the statistics of every norm over the
  voxels each tile *owns* (core only, each frame once), so the sums cover the clip exactly once.
  A first pass collects them while normalising each tile-chunk on its own statistics; a further
  gathering pass (the default when frames are split into spatial tiles) normalises with the
  previous pass's statistics, and the output pass normalises every tile with the last ones.
  They are estimates (the gathering passes' activations are themselves normalised with
  approximate statistics) that converge with the passes; see ``bench/`` for the measured effect.
* **The low-resolution middle** (encoder mid-block + output head; decoder input conv + mid-block
  with its whole-sequence temporal attention) runs on the whole latent sequence and whole frame
  with the model's own modules: it is 1/8 of the resolution, its spatial attention is global
  per frame and its temporal attention global per position, so it is exact and cheap.

The model classes stay plain ``nn.Module``: this file only reads their weights and calls their
frame-local sub-modules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CausalConv3d, Downsample, ResnetBlock, Upsample


# --------------------------------------------------------------------------------------------
# GroupNorm statistics
# --------------------------------------------------------------------------------------------
class StatsBook:
    """Clip-wide GroupNorm statistics, keyed by module name.

    ``collect`` merges per-tile (count, mean, M2) with Chan's parallel formula in float64, so the
    order and size of tiles do not matter; ``freeze`` turns the sums into (mean, var) per
    (batch, group) for the next pass.
    """

    def __init__(self):
        self._acc: dict[str, list] = {}
        self.frozen: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def collect(self, key: str, region: torch.Tensor):
        """``region``: float32 [B, G, C/G, T, h, w] voxels owned by the current tile."""
        n = region[0, 0].numel()
        if n == 0:
            return
        var, mean = torch.var_mean(region.flatten(2), dim=2, unbiased=False)
        mean, m2 = mean.double(), var.double() * n
        if key not in self._acc:
            self._acc[key] = [n, mean, m2]
            return
        na, ma, m2a = self._acc[key]
        tot = na + n
        delta = mean - ma
        self._acc[key] = [tot, ma + delta * (n / tot), m2a + m2 + delta.square() * (na * n / tot)]

    def freeze(self):
        self.frozen = {k: (m.float(), (m2 / n).float()) for k, (n, m, m2) in self._acc.items()}
        self._acc = {}


class _NormSiLU:
    """A 5-D GroupNorm followed by SiLU (always paired in CV-VAE), computed in float32.

    ``owned`` = (row0, row1, col0, col1) of the tile's core at this layer's resolution: only those
    voxels feed the clip-wide statistics. Statistics come from ``book.frozen`` when set, else from
    the tile's own core (tile-local)."""

    def __init__(self, gn: nn.GroupNorm, key: str, owned: tuple[int, int, int, int], book: StatsBook | None,
                 collect: bool):
        self.gn, self.key, self.owned, self.book, self.collect = gn, key, owned, book, collect

    def step(self, x, last):
        if x is None:
            return None
        b, c, t, h, w = x.shape
        g = self.gn.num_groups
        xf = x.float().view(b, g, c // g, t, h, w)
        r0, r1, c0, c1 = self.owned
        core = xf[..., r0:r1, c0:c1]
        if self.collect:
            self.book.collect(self.key, core)
        if self.book is not None and self.book.frozen is not None:
            mean, var = self.book.frozen[self.key]
            mean, var = mean.to(x.device), var.to(x.device)
        else:
            # The core only: the halo's outer part is corrupted by the tile-edge padding.
            var, mean = torch.var_mean(core.flatten(2), dim=2, unbiased=False)
        scale = torch.rsqrt(var + self.gn.eps)
        y = (xf - mean.view(b, g, 1, 1, 1, 1)) * scale.view(b, g, 1, 1, 1, 1)
        y = y.view(b, c, t, h, w) * self.gn.weight.float().view(c, 1, 1, 1) + self.gn.bias.float().view(c, 1, 1, 1)
        return F.silu(y).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Convolutions that stream over time
# --------------------------------------------------------------------------------------------
class _TimeConv:
    """A 3-D convolution fed a few frames at a time.

    Keeps the input frames (already padded in space) that later outputs still need, so any
    split of the clip into chunks gives the whole-clip result. ``front``/``back`` frames of time
    padding are added at the start of the stream and when ``last`` is set; ``time_zero`` pads
    with zeros instead of repeating the edge frame."""

    def __init__(self, conv: nn.Conv3d, front: int, back: int, time_zero: bool,
                 space_pad: tuple[int, int, int, int], space_mode: str, stride: tuple[int, int, int]):
        self.conv, self.front, self.back, self.time_zero = conv, front, back, time_zero
        self.space_pad, self.space_mode, self.stride = space_pad, space_mode, stride
        self.kt = conv.kernel_size[0]
        self.buf: torch.Tensor | None = None
        self.started = False

    def _edge(self, frame: torch.Tensor, n: int) -> torch.Tensor:
        return (torch.zeros_like(frame) if self.time_zero else frame).expand(-1, -1, n, -1, -1)

    def step(self, x, last):
        if x is not None:
            if any(self.space_pad):
                x = F.pad(x, (*self.space_pad, 0, 0), mode=self.space_mode)
            if not self.started and self.front:
                x = torch.cat([self._edge(x[:, :, :1], self.front), x], dim=2)
            self.started = True
            self.buf = x if self.buf is None else torch.cat([self.buf, x], dim=2)
        if last and self.back and self.buf is not None:
            self.buf = torch.cat([self.buf, self._edge(self.buf[:, :, -1:], self.back)], dim=2)
        if self.buf is None or self.buf.shape[2] < self.kt:
            return None
        st = self.stride[0]
        n = (self.buf.shape[2] - self.kt) // st + 1
        out = F.conv3d(self.buf[:, :, :(n - 1) * st + self.kt], self.conv.weight, self.conv.bias, self.stride)
        rest = self.buf[:, :, n * st:]
        # clone: a view would keep the whole chunk's storage alive until the next call
        self.buf = rest.clone() if rest.shape[2] else None
        return out


def _encoder_conv(conv: CausalConv3d) -> _TimeConv:
    p = conv.kernel_size[-1] // 2
    return _TimeConv(conv, 2 * p, 0, False, (p, p, p, p), _pad_mode(conv.space_mode), (1, 1, 1))


def _decoder_conv(conv: nn.Conv3d) -> _TimeConv:
    p = conv.padding[0]
    zero = conv.padding_mode == "zeros"
    return _TimeConv(conv, p, p, zero, (p, p, p, p), "constant" if zero else "replicate", (1, 1, 1))


def _pad_mode(space_mode: str) -> str:
    return "replicate" if space_mode == "replicate" else "constant"


class _Pointwise:
    """A frame-local module (2-D per-frame conv, 1x1x1 shortcut)."""

    def __init__(self, fn):
        self.fn = fn

    def step(self, x, last):
        return None if x is None else self.fn(x)


class _Upsample:
    """Nearest x2 in space, streamed 3x3x3 conv, time x2 by channel blocks, first frame dropped."""

    def __init__(self, up: Upsample):
        self.time_factor = up.time_factor
        self.conv = _TimeConv(up.conv, 1, 1, False, (1, 1, 1, 1), _pad_mode(up.space_mode), (1, 1, 1))
        self.dropped = False

    def step(self, x, last):
        if x is not None:
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        x = self.conv.step(x, last)
        if x is None or self.time_factor == 1:
            return x
        b, c2, t, h, w = x.shape
        x = x.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        if not self.dropped:
            self.dropped = True
            x = x[:, :, 1:]
        return x if x.shape[2] else None


class _Residual:
    """ResnetBlock: the main branch may answer frames later than it is fed (symmetric convs),
    so the skip path waits in a queue until the matching frames come out."""

    def __init__(self, main: list, shortcut):
        self.main, self.shortcut = main, shortcut
        self.queue: torch.Tensor | None = None

    def step(self, x, last):
        h = _run(self.main, x, last)
        if x is not None:
            s = x if self.shortcut is None else self.shortcut(x)
            self.queue = s if self.queue is None else torch.cat([self.queue, s], dim=2)
        if h is None:
            return None
        n = h.shape[2]
        out = self.queue[:, :, :n] + h
        rest = self.queue[:, :, n:]
        self.queue = rest.clone() if rest.shape[2] else None
        return out


def _run(ops, x, last):
    for op in ops:
        x = op.step(x, last)
    return x


# --------------------------------------------------------------------------------------------
# Spatial tiles
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """One spatial tile, in the input's units (pixels to encode, latent pixels to decode):
    the core [r0, r1) x [c0, c1) that the tile owns and writes, read with a halo around it
    (clipped at the frame edge) as [hr0, hr1) x [hc0, hc1)."""

    r0: int
    r1: int
    c0: int
    c1: int
    hr0: int
    hr1: int
    hc0: int
    hc1: int

    def owned(self, scale_num: int, scale_den: int) -> tuple[int, int, int, int]:
        """The core in the tile's own feature coordinates at a resolution of num/den input units."""
        f = lambda v: v * scale_num // scale_den  # noqa: E731
        return (f(self.r0 - self.hr0), f(self.r1 - self.hr0), f(self.c0 - self.hc0), f(self.c1 - self.hc0))


def split_axis(size: int, core: int, align: int) -> list[tuple[int, int]]:
    """Cores of at most ``core`` (a multiple of ``align``) covering [0, size), nearly equal."""
    core = max(align, core // align * align)
    n = math.ceil(size / core)
    units = size // align
    bounds = [round(units * i / n) * align for i in range(n + 1)]
    bounds[-1] = size
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def make_tiles(height: int, width: int, core: int, halo: int, align: int) -> list[Tile]:
    rows, cols = split_axis(height, core, align), split_axis(width, core, align)
    return [Tile(r0, r1, c0, c1, max(0, r0 - halo), min(height, r1 + halo), max(0, c0 - halo), min(width, c1 + halo))
            for r0, r1 in rows for c0, c1 in cols]


def encoder_halo(cfg) -> int:
    """Input pixels around a tile that cover the receptive field of the encoder's down path
    (conv_in, ResNet blocks, downsamplers; the mid-block runs on whole frames), rounded up to
    the total stride so tiles stay aligned with every downsampler."""
    r = 1  # conv_in
    for level in range(cfg.num_levels):
        s = 2 ** level
        r += 2 * cfg.blocks_per_level * s
        if level != cfg.num_levels - 1:
            r += 2 * s  # stride-2 3x3 conv: reaches up to 2 input pixels past its output
    a = cfg.spatial_compression
    return -(-r // a) * a


def decoder_halo(cfg) -> int:
    """Latent pixels around a tile that cover the receptive field of the decoder's up path
    (after the mid-block, which runs on whole frames)."""
    r = 0.0
    for i, level in enumerate(reversed(range(cfg.num_levels))):
        u = 2 ** i
        r += 2 * (cfg.blocks_per_level + 1) / u
        if level != 0:
            r += 1 / (2 * u)  # the upsampler's 3x3 conv at twice this resolution
    r += 1 / cfg.spatial_compression  # conv_out
    return math.ceil(r)


# --------------------------------------------------------------------------------------------
# The tiled parts of encoder and decoder, as streams
# --------------------------------------------------------------------------------------------
def _resnet(block: ResnetBlock, name: str, owned, book, collect, causal: bool) -> _Residual:
    conv1 = _encoder_conv(block.conv1) if causal else _decoder_conv(block.conv1)
    main = [_NormSiLU(block.norm1, f"{name}.norm1", owned, book, collect), conv1,
            _NormSiLU(block.norm2, f"{name}.norm2", owned, book, collect), _Pointwise(block.conv2)]
    return _Residual(main, block.nin_shortcut)


def encoder_stream(encoder, tile: Tile, book: StatsBook | None, collect: bool) -> list:
    """conv_in and the down path of ``encoder`` for one tile; outputs features at 1/8 resolution."""
    ops = [_encoder_conv(encoder.conv_in)]
    scale = 1
    for level, stage in enumerate(encoder.down):
        owned = tile.owned(1, scale)
        for j, block in enumerate(stage.block):
            ops.append(_resnet(block, f"encoder.down.{level}.block.{j}", owned, book, collect, causal=True))
        if hasattr(stage, "downsample"):
            ds: Downsample = stage.downsample
            ops.append(_TimeConv(ds.conv, 2, 0, False, ds.space_pad, _pad_mode(ds.space_mode), ds.conv.stride))
            scale *= 2
    return ops


def decoder_stream(decoder, tile: Tile, book: StatsBook | None, collect: bool, output: bool = True) -> list:
    """The up path, norm_out and conv_out of ``decoder`` for one tile (input: mid-block output).
    ``output=False`` stops after norm_out: a statistics pass needs no pixels."""
    ops = []
    scale = 1
    for level in reversed(range(len(decoder.up))):
        stage = decoder.up[level]
        owned = tile.owned(scale, 1)
        for j, block in enumerate(stage.block):
            ops.append(_resnet(block, f"decoder.up.{level}.block.{j}", owned, book, collect, causal=False))
        if hasattr(stage, "upsample"):
            ops.append(_Upsample(stage.upsample))
            scale *= 2
    ops.append(_NormSiLU(decoder.norm_out, "decoder.norm_out", tile.owned(scale, 1), book, collect))
    if output:
        ops.append(_decoder_conv(decoder.conv_out))
    return ops


def run_stream(ops: list, x, last: bool):
    return _run(ops, x, last)
