"""Streaming executor: runs the encoder's or decoder's own layer list (``Encoder.layers()``,
``Decoder.layers()``) over a clip piece by piece, time chunks x spatial tiles, and gives the
whole-clip result to float rounding.

Why pieces of a CV-VAE are not independent: convolutions see their neighbours in time and
space, and every 5-D GroupNorm takes its statistics over the whole clip (C/groups x T x H x W).
So the network is run *step by step*: a step is one layer (a convolution together with the
GroupNorm + SiLU in front of it, an upsampler, an attention part) over its whole output, piece by
piece, and each step's output is kept whole (a *store*) until the steps that read it are done.

* A piece reads from the previous store exactly the region its receptive field needs (the halo),
  so a convolution sees what it sees in the whole-clip pass; padding is added only where the
  piece reaches the clip's edge, by the layer's own :class:`~cvvae_core.model.layers.ClipPadding`.
  No state is carried between pieces.
* A store that feeds a GroupNorm sums its statistics (count, mean, M2 per batch x group; float64,
  Chan's merge) while it is written, so every norm normalises with the exact clip-wide statistics.
* Attention is frame-local in space and position-local in time (see ``SpaceTimeAttention``): its
  spatial part runs on time chunks of whole frames, its temporal part on tiles of whole sequences.

Each store lives in a tier, the compute device, host memory or disk (:mod:`.tiers`), in the compute
dtype, or is not stored at all: the output of any convolution or upsampler can be *recomputed* by
the steps that read it, from the regions of its own inputs they need (recursively, when those are
recomputed too), which keeps those inputs alive until its last reader (:meth:`Program.frees`; the
plan decides: :mod:`.planner`). A residual add writes its output over the residual's store when
that store is read for the last time there (:meth:`Program.overwrites`), so a ResNet block holds two
stores of its size, not three. The working memory beyond the stores is bounded by the piece size.
Adding a layer type means one handler here (``_BUILDERS``); a layer without one is refused when the
program is built, never run wrongly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedLayerError
from ..model.layers import (ClipPadding, FrameConv2d, GroupNormSiLU, ResnetBlock, SpaceTimeAttention, Upsample,
                            WindowConv3d)
from .tiers import DEVICE, DISK, HOST, HostLink, HostStore, Ledger, StorePool

Range = tuple[int, int]
Box = tuple[Range, Range, Range]  # a piece: half-open frames, rows, columns
Shape = tuple[int, int, int, int, int]  # B, C, T, H, W


# --------------------------------------------------------------------------------------------
# GroupNorm statistics and the fused GroupNorm + SiLU
# --------------------------------------------------------------------------------------------
class GroupMoments:
    """Count, mean and M2 per (batch, group) of everything written into a store: per piece in
    float32, merged in float64 with Chan's parallel formula, so order and piece sizes do not matter."""

    def __init__(self, groups: int):
        self.groups, self.n = groups, 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, y: torch.Tensor):
        # Per channel first, then channels into groups (equal counts, so Chan's merge is a mean and a
        # spread term). Per channel: the mean from a float32 sum, then the squared deviations from it
        # summed slab by slab (frames, or rows of a one-frame piece; a float32 temporary of one slab):
        # as exact as a Welford pass (``var_mean``) and several times faster on channels-last pieces.
        b = y.shape[0]
        n = math.prod(y.shape[2:])
        dims = (2, 3, 4)
        mean = y.sum(dims, dtype=torch.float32) / n
        centre = mean[..., None, None, None]
        m2 = torch.zeros(mean.shape, dtype=torch.float64, device=y.device)
        axis = 2 if y.shape[2] > 1 else 3
        for slab in y.split(1, axis):
            m2 += torch.sub(slab, centre).square_().sum(dims).double()
        mean, m2 = mean.double().view(b, self.groups, -1), m2.view(b, self.groups, -1)
        group_mean = mean.mean(2)
        spread = (mean - group_mean.unsqueeze(2)).square().sum(2) * n
        self.merge(n * mean.shape[2], group_mean, m2.sum(2) + spread)

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor):
        if n == 0:
            return
        if self.n == 0:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean.to(self.mean.device) - self.mean
        self.m2 = self.m2 + m2.to(self.m2.device) + delta.square() * (self.n * n / total)
        self.mean = self.mean + delta * (n / total)
        self.n = total

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean.float(), (self.m2 / self.n).float()


def norm_silu(x: torch.Tensor, norm: GroupNormSiLU, mean: torch.Tensor, var: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm with the given (clip-wide) statistics, then SiLU, as one multiply-add pass: the
    arithmetic is float32, the result in ``x``'s dtype, written into ``out`` (x-shaped; e.g. the
    interior of a padded buffer) or a new tensor."""
    b, c = x.shape[:2]
    per_group = c // norm.num_groups
    scale = torch.rsqrt(var.to(x.device) + norm.eps).repeat_interleave(per_group, 1) * norm.weight.float()
    shift = norm.bias.float() - mean.to(x.device).repeat_interleave(per_group, 1) * scale
    out = torch.empty_like(x) if out is None else out
    torch.addcmul(shift.view(b, c, 1, 1, 1), x, scale.view(b, c, 1, 1, 1), out=out)
    return F.silu(out, inplace=True)


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------
def _window(out: Range, kernel: int, stride: int, before: int, size: int) -> tuple[Range, Range]:
    """Input range an output range reads through a (kernel, stride, padding-before) window, clipped
    to [0, size), and the padding still needed at each end (non-zero only at the clip's edges)."""
    a = out[0] * stride - before
    z = (out[1] - 1) * stride - before + kernel
    return (max(a, 0), min(z, size)), (max(0, -a), max(0, z - size))


@dataclass
class Step:
    """One layer over its whole output. ``src``/``out`` (and ``residual``) are store slots;
    ``norm`` is the GroupNorm + SiLU applied to ``src`` first; ``split`` says which axes of the
    output (T, H, W) pieces may divide. ``recomputable``: any region of the output can be computed
    from regions of the step's inputs (convolutions, upsamplers; not attention, which needs whole
    frames or sequences), so readers may recompute it instead of reading a store."""

    name: str
    src: int
    out: int = -1
    norm: GroupNormSiLU | None = None
    residual: int | None = None
    split: tuple[bool, bool, bool] = (True, True, True)
    recomputable = False

    def out_shape(self, src: Shape) -> Shape:
        raise NotImplementedError

    def run(self, read: Callable, box: Box) -> torch.Tensor:
        raise NotImplementedError

    def macs(self, src: Shape, box: Box) -> int:
        """Multiply-adds of one piece per batch element (the progress bar's weights)."""
        raise NotImplementedError

    def region_voxels(self, piece: tuple[int, int, int]) -> int:
        """Input voxels one piece of this size reads (with its halo)."""
        return math.prod(piece)

    def scores(self, src: Shape, piece: tuple[int, int, int]) -> int:
        """Attention score elements one piece holds at once."""
        return 0


@dataclass
class ConvStep(Step):
    """A convolution (``WindowConv3d``, ``FrameConv2d``), with ``norm`` in front and an optional
    residual added (through ``shortcut`` when channels change): a ResNet block's second half."""

    conv: nn.Module = None
    shortcut: nn.Module | None = None
    recomputable = True

    def out_shape(self, src):
        (b, _, *sizes), pad = src, self.conv.clip_padding
        return (b, self.conv.out_channels, *[(n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in
                                              zip(sizes, pad.amounts, self.conv.kernel3, self.conv.stride3)])

    def run(self, read, box):
        pad: ClipPadding = self.conv.clip_padding
        src_sizes = read.shape(self.src)[2:]
        region, amounts = zip(*(_window(o, k, s, lo, n) for o, k, s, (lo, _), n in
                                zip(box, self.conv.kernel3, self.conv.stride3, pad.amounts, src_sizes)))
        y = self.conv.conv_padded(read(self.src, region, self.norm, pad, amounts))
        if self.residual is not None:
            r = read(self.residual, box, None)
            y += r if self.shortcut is None else self.shortcut(r)
        return y

    def region_voxels(self, piece):
        return math.prod((p - 1) * s + k for p, k, s in zip(piece, self.conv.kernel3, self.conv.stride3))

    def macs(self, src, box):
        shortcut = 0 if self.shortcut is None else self.shortcut.in_channels
        per_voxel = self.conv.out_channels * (self.conv.in_channels * math.prod(self.conv.kernel3) + shortcut)
        return per_voxel * math.prod(b - a for a, b in box)


@dataclass
class UpsampleStep(Step):
    """Nearest x2 in space, the 3x3x3 convolution, time doubled by channel blocks (first frame dropped)."""

    up: Upsample = None
    recomputable = True

    def out_shape(self, src):
        b, c, t, h, w = src
        return (b, c, 2 * t - 1 if self.up.time_factor == 2 else t, 2 * h, 2 * w)

    def run(self, read, box):
        conv, pad = self.up.conv, self.up.conv.clip_padding
        t_in, h_in, w_in = read.shape(self.src)[2:]
        (t0, t1), rows, cols = box
        conv_frames = self._conv_frames((t0, t1))
        frames, t_pad = _window(conv_frames, 3, 1, 1, t_in)
        src_box, crops, space_pad = [frames], [], []
        for (o0, o1), n in zip((rows, cols), (h_in, w_in)):
            # the convolution reads upsampled positions [o0 - 1, o1 + 1), i.e. source pixels:
            s0, s1 = max((o0 - 1) // 2, 0), min(o1 // 2 + 1, n)
            lo, hi = (o0 - 1) - 2 * s0, (o1 + 1) - 2 * s1  # offsets into the upsampled source
            src_box.append((s0, s1))
            crops.append((max(lo, 0), 2 * (s1 - s0) + min(hi, 0)))
            space_pad.append((max(-lo, 0), max(hi, 0)))
        x = F.interpolate(read(self.src, tuple(src_box), None), scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        x = x[:, :, :, crops[0][0]:crops[0][1], crops[1][0]:crops[1][1]]
        y = self.up.unfold_time(conv.conv_padded(pad.apply(x, (t_pad, *space_pad))))
        if self.up.time_factor == 2:
            first = t0 + 1 - 2 * conv_frames[0]
            y = y[:, :, first:first + t1 - t0]
        return y

    def region_voxels(self, piece):
        t, h, w = piece
        return (t // self.up.time_factor + 3) * (h + 2) * (w + 2)  # upsampled, as the convolution reads it

    def _conv_frames(self, frames: Range) -> Range:
        """The convolution frames output frames [t0, t1) come from: output frame f is frame f + 1 of
        the doubled sequence, i.e. block (f + 1) % 2 of convolution frame (f + 1) // 2."""
        t0, t1 = frames
        return ((t0 + 1) // 2, t1 // 2 + 1) if self.up.time_factor == 2 else (t0, t1)

    def macs(self, src, box):
        (j0, j1), (r0, r1), (c0, c1) = self._conv_frames(box[0]), box[1], box[2]
        conv = self.up.conv
        return conv.out_channels * conv.in_channels * 27 * (j1 - j0) * (r1 - r0) * (c1 - c0)


@dataclass
class AttentionSpatialStep(Step):
    """``S(x)`` of a ``SpaceTimeAttention`` on time chunks of whole frames (plus ``x`` when the
    block has no temporal part)."""

    attn: SpaceTimeAttention = None

    def out_shape(self, src):
        return src

    def run(self, read, box):
        x = read(self.src, box, None)
        s = self.attn.spatial_part(x)
        return s if self.attn.temporal else s.add_(x)

    def scores(self, src, piece):
        return min(piece[0], self.attn.frames_per_call) * (src[3] * src[4]) ** 2

    def macs(self, src, box):
        _, c, _, h, w = src  # q, k, v, proj_out; scores and weighted sum over the frame
        return (box[0][1] - box[0][0]) * h * w * (4 * c * c + 2 * h * w * c)


@dataclass
class AttentionTemporalStep(Step):
    """``x + T(S(x))`` on spatial tiles of whole sequences: ``src`` holds S(x), ``residual`` x."""

    attn: SpaceTimeAttention = None

    def out_shape(self, src):
        return src

    def run(self, read, box):
        return self.attn.temporal_part(read(self.src, box, None)).add_(read(self.residual, box, None))

    def scores(self, src, piece):
        return piece[1] * piece[2] * src[2] ** 2

    def macs(self, src, box):
        _, c, t, _, _ = src
        return (box[1][1] - box[1][0]) * (box[2][1] - box[2][0]) * t * (4 * c * c + 2 * t * c)


# --------------------------------------------------------------------------------------------
# From a layer list to a program of steps
# --------------------------------------------------------------------------------------------
class Program:
    """The steps of one pass of ``layers`` (``Encoder.layers()`` or ``Decoder.layers()``) over an
    input of shape ``input_shape``; slot 0 is the input, the last step's output the result."""

    def __init__(self, layers, input_shape: Shape):
        self.steps: list[Step] = []
        self.shapes: dict[int, Shape] = {0: tuple(input_shape)}
        self.current = 0
        self._pending_norm: tuple[str, GroupNormSiLU] | None = None
        for name, layer in layers:
            builder = _BUILDERS.get(type(layer))
            if builder is None:
                raise UnsupportedLayerError(
                    f"layer {name!r} ({type(layer).__name__}) has no handler in the streaming engine: add one to "
                    "cvvae_core.tiling.executor._BUILDERS, or run untiled (tiling=None)")
            if self._pending_norm is not None and builder is not _build_conv:
                raise UnsupportedLayerError(f"{self._pending_norm[0]!r} (GroupNorm + SiLU) must be followed by a "
                                            f"convolution, got {name!r} ({type(layer).__name__})")
            builder(self, name, layer)
        if self._pending_norm is not None:
            raise UnsupportedLayerError(f"{self._pending_norm[0]!r} (GroupNorm + SiLU) ends the network")
        # Which stores feed a GroupNorm (their writers sum statistics).
        self.norm_of = {s.src: s.norm for s in self.steps if s.norm is not None}
        self._producers = {s.out: s for s in self.steps}
        self.readers: dict[int, list[Step]] = {}
        for s in self.steps:
            for slot in (s.src, s.residual):
                if slot is not None:
                    self.readers.setdefault(slot, []).append(s)

    def producer(self, slot: int) -> Step | None:
        """The step that writes ``slot`` (None for the input)."""
        return self._producers.get(slot)

    def frees(self, recompute: frozenset[str] = frozenset()) -> list[list[int]]:
        """The slots each step reads for the last time, when the steps named in ``recompute`` are
        recomputed by their readers (a reader of a recomputed output reads that step's inputs too)."""
        recomputed = {s.out: s for s in self.steps if s.name in recompute}
        last: dict[int, int] = {}

        def reads(slot: int, i: int):
            last[slot] = i
            producer = recomputed.get(slot)
            if producer is not None:
                for inner in (producer.src, producer.residual):
                    if inner is not None:
                        reads(inner, i)

        for i, s in enumerate(self.steps):
            for slot in (s.src, s.residual):
                if slot is not None:
                    reads(slot, i)
        frees: list[list[int]] = [[] for _ in self.steps]
        for slot, i in last.items():
            frees[i].append(slot)
        return frees

    def overwrites(self, recompute: frozenset[str] = frozenset()) -> dict[int, int]:
        """``{out: residual}`` for steps whose output may be written over their residual store, piece
        by piece in place (the pointwise add reads each residual piece only for the output piece at
        the same place): the residual is a store of the same shape, not the input, and read for the
        last time by this step, which does not also read it through a recomputed input (a halo there
        would read pieces already overwritten). Whether both live in the same tier is the plan's."""
        recomputed = {s.out: s for s in self.steps if s.name in recompute}

        def through(slot: int) -> set[int]:
            producer = recomputed.get(slot)
            inner = [] if producer is None else [x for x in (producer.src, producer.residual) if x is not None]
            return {slot}.union(*(through(x) for x in inner))

        last_reader = {slot: i for i, slots in enumerate(self.frees(recompute)) for slot in slots}
        found = {}
        for i, s in enumerate(self.steps[:-1]):
            r = s.residual
            if (r is not None and r != 0 and r not in recomputed and s.name not in recompute
                    and self.shapes[r] == self.shapes[s.out] and last_reader[r] == i and r not in through(s.src)):
                found[s.out] = r
        return found

    def free_to_recompute(self, step: Step) -> bool:
        """Whether recomputing ``step`` keeps no input alive longer: its one reader reads the step's
        own input too (a ResNet block's first convolution, whose input the residual keeps)."""
        readers = self.readers.get(step.out, [])
        return (step.recomputable and len(readers) == 1
                and step.src in (readers[0].src, readers[0].residual) and step is not self.steps[-1])

    def runs(self, step: Step, recompute: frozenset[str]) -> bool:
        """Whether ``step`` runs over its whole output in its turn: always, unless it is recomputed and
        no GroupNorm needs the statistics of its output."""
        return step.name not in recompute or step.out in self.norm_of

    @property
    def output_shape(self) -> Shape:
        return self.shapes[self.steps[-1].out]

    def add(self, step: Step) -> int:
        step.out = len(self.shapes)
        self.shapes[step.out] = step.out_shape(self.shapes[step.src])
        self.steps.append(step)
        self.current = step.out
        return step.out

    def take_norm(self) -> GroupNormSiLU | None:
        norm, self._pending_norm = (self._pending_norm or (None, None))[1], None
        return norm


def _check_conv(name: str, layer: nn.Module):
    if type(layer) not in (WindowConv3d, FrameConv2d):
        raise UnsupportedLayerError(f"{name!r} ({type(layer).__name__}) is not a convolution the streaming "
                                    "engine knows (WindowConv3d, FrameConv2d)")


def _build_conv(prog: Program, name: str, conv: nn.Module):
    _check_conv(name, conv)
    prog.add(ConvStep(name, prog.current, norm=prog.take_norm(), conv=conv))


def _build_norm(prog: Program, name: str, norm: GroupNormSiLU):
    prog._pending_norm = (name, norm)  # fused into the next step, which must be a convolution


def _build_resnet(prog: Program, name: str, block: ResnetBlock):
    for part in ("conv1", "conv2"):
        _check_conv(f"{name}.{part}", getattr(block, part))
    x = prog.current
    h = prog.add(ConvStep(f"{name}.conv1", x, norm=block.norm1, conv=block.conv1))
    prog.add(ConvStep(f"{name}.conv2", h, norm=block.norm2, conv=block.conv2, residual=x, shortcut=block.nin_shortcut))


def _build_upsample(prog: Program, name: str, up: Upsample):
    prog.add(UpsampleStep(name, prog.current, up=up))


def _build_attention(prog: Program, name: str, attn: SpaceTimeAttention):
    x = prog.current
    prog.add(AttentionSpatialStep(f"{name}.spatial", x, attn=attn, split=(True, False, False)))
    if attn.temporal:
        prog.add(AttentionTemporalStep(f"{name}.temporal", prog.current, attn=attn, residual=x,
                                       split=(False, True, True)))


_BUILDERS: dict[type, Callable] = {
    WindowConv3d: _build_conv,
    FrameConv2d: _build_conv,
    GroupNormSiLU: _build_norm,
    ResnetBlock: _build_resnet,
    Upsample: _build_upsample,
    SpaceTimeAttention: _build_attention,
}


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------
def split_range(size: int, piece: int) -> list[Range]:
    """[0, size) in nearly equal parts of at most ``piece``."""
    n = math.ceil(size / max(1, piece))
    bounds = [round(size * i / n) for i in range(n + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def pieces(shape: Shape, piece: tuple[int, int, int]) -> list[Box]:
    """Boxes covering a store of ``shape`` once; time-major, so stores fill in frame order."""
    t, h, w = (split_range(n, p) for n, p in zip(shape[2:], piece))
    return [(a, b, c) for a in t for b in h for c in w]


def _slices(box: Box) -> tuple:
    return (slice(None), slice(None), *(slice(a, z) for a, z in box))


# --------------------------------------------------------------------------------------------
# Memory model (used by the planner's estimate)
# --------------------------------------------------------------------------------------------
def work_bytes(step: Step, src: Shape, out: Shape, piece: tuple[int, int, int], elem: int, read_copy: bool = False,
               write_copy: int = 0) -> int:
    """Temporaries of one piece: the input region (read, normalised, padded: up to three copies;
    a fourth when it arrives from host memory or disk), the output piece and the residual next to it,
    a reordered copy of the output of ``write_copy`` bytes per element when it leaves the device,
    and attention scores."""
    batch = out[0]
    region = step.region_voxels(piece)
    return (elem * batch * ((3 + read_copy) * src[1] * region + 2 * out[1] * math.prod(piece) + step.scores(src, piece))
            + write_copy * batch * out[1] * math.prod(piece))


# --------------------------------------------------------------------------------------------
# Running a program
# --------------------------------------------------------------------------------------------
class _Reader:
    """The stores of a running program, their tiers and statistics; called to read a piece's input."""

    def __init__(self, shapes: dict[int, Shape], device: torch.device, dtype: torch.dtype, link: HostLink):
        self.shapes, self.device, self.dtype, self.link = shapes, device, dtype, link
        self.stores: dict[int, torch.Tensor | HostStore] = {}
        self.recomputed: dict[int, Step] = {}
        self.moments: dict[int, GroupMoments] = {}
        self._stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def shape(self, slot: int) -> Shape:
        return self.shapes[slot]

    def region(self, slot: int, box: Box) -> torch.Tensor:
        """Region ``box`` of store ``slot`` on the compute device in the compute dtype."""
        if slot in self.recomputed:
            return self.recomputed[slot].run(self, box)
        store = self.stores[slot]
        if isinstance(store, HostStore):
            return self.link.read(store, box, self.dtype)
        return store[_slices(box)].to(self.device, self.dtype)

    def __call__(self, slot: int, box: Box, norm: GroupNormSiLU | None, padding: ClipPadding | None = None,
                 amounts=((0, 0), (0, 0), (0, 0))) -> torch.Tensor:
        """:meth:`region`, normalised (+ SiLU) with the store's clip-wide statistics when ``norm`` is
        given; padded by ``amounts`` of ``padding`` when given (a normalised region is written straight
        into the padded buffer)."""
        x = self.region(slot, box)
        if norm is None:
            return x if padding is None else padding.apply(x, amounts)
        if slot not in self._stats:
            self._stats[slot] = tuple(t.to(self.device) for t in self.moments[slot].mean_var())
        if padding is None or not any(sum(amounts, ())):
            return norm_silu(x, norm, *self._stats[slot])
        padded, interior = padding.buffer(x, amounts)
        norm_silu(x, norm, *self._stats[slot], out=interior)
        return padding.fill_border(padded, amounts)

    def drop(self, slot: int):
        self.moments.pop(slot, None)
        self._stats.pop(slot, None)
        self.recomputed.pop(slot, None)
        return self.stores.pop(slot, None)


@dataclass
class Placement:
    """Where a program's stores live: ``tiers`` maps a step's name to ``device``, ``host``, ``disk``
    or ``recompute``; ``offsets`` gives each host or disk store its byte offset in its tier's arena
    (:class:`~cvvae_core.tiling.tiers.Arena`); ``frees`` the slots each step reads last;
    ``overwrites`` the outputs written over their residual store (:meth:`Program.overwrites`)."""

    tiers: dict[str, str]
    offsets: dict[int, int]
    frees: list[list[int]]
    overwrites: dict[int, int]

    @property
    def recompute(self) -> frozenset[str]:
        return frozenset(n for n, t in self.tiers.items() if t == "recompute")


def run_program(prog: Program, x: torch.Tensor, output, *, device: torch.device, dtype: torch.dtype,
                placement: Placement, link: HostLink, ledger: Ledger, arenas: dict, work: list[int],
                piece_of: Callable[[Step, Shape], tuple], check: Callable[[], None],
                done: Callable[[Step, Box], None], group=None,
                memory_format: torch.memory_format = torch.contiguous_format):
    """Run ``prog`` on ``x`` (slot 0, any device), writing the result into ``output`` (a device tensor or
    a :class:`~cvvae_core.tiling.tiers.HostStore`).

    Each step's output goes to the tier ``placement`` gives it: a device store from the pool (back
    to it after its last reader), a store of the host or disk arena in ``arenas``, or none
    (recomputed by its readers; the step itself runs only when a GroupNorm needs its statistics).
    The ``ledger`` counts the stores and, per step, the working memory ``work[i]`` of its largest
    piece. ``piece_of(step, out_shape)`` gives the piece size (T, H, W) of a step; ``check()`` is
    called before each piece (cancellation) and ``done(step, box)`` after it (progress; other ranks'
    pieces count too). Device stores are kept in ``memory_format`` (pieces inherit it:
    ``channels_last_3d`` speeds up CPU convolutions). With a
    :class:`~cvvae_core.distributed.TileGroup` each rank runs the pieces ``k % world == rank`` of every
    step, and the stores (zero elsewhere) and statistics are summed across ranks after each step."""
    pool = StorePool(device, dtype, memory_format, ledger)
    read = _Reader(prog.shapes, device, dtype, link)
    read.stores[0] = x if x.device == device else HostStore(x, (0, 1, 2, 3, 4), HOST)
    recompute = placement.recompute
    last = len(prog.steps) - 1
    for i, step in enumerate(prog.steps):
        shape = prog.shapes[step.out]
        tier = "output" if i == last else placement.tiers.get(step.name, DEVICE)
        overwritten = placement.overwrites.get(step.out)
        if tier == "output":
            dest = output
        elif overwritten is not None:
            dest = read.stores[overwritten]
        elif tier == DEVICE:
            dest = pool.take(shape)
        elif tier in (HOST, DISK):
            dest = arenas[tier].store(placement.offsets[step.out], shape, dtype)
        else:
            dest = None
        ledger.piece(work[i])
        if group is not None and dest is not None and overwritten is None:
            (dest.mem if isinstance(dest, HostStore) else dest).zero_()
        norm = prog.norm_of.get(step.out)
        moments = GroupMoments(norm.num_groups) if norm is not None else None

        def run_step():
            fresh = True
            for k, box in enumerate(pieces(shape, piece_of(step, shape))):
                check()
                if group is None or group.mine(k):
                    y = step.run(read, box)
                    if moments is not None:
                        moments.add(y)
                    if isinstance(dest, HostStore):
                        link.write(dest, box, y, fresh=fresh and tier != "output")
                        fresh = False
                    elif dest is not None:
                        dest[_slices(box)].copy_(y)
                elif overwritten is not None:  # another rank's piece: zero here, as in a fresh store
                    (dest.view if isinstance(dest, HostStore) else dest)[_slices(box)].zero_()
                done(step, box)

        if prog.runs(step, recompute):
            if group is None:
                run_step()
            else:
                group.run(run_step)
                if dest is not None:
                    if isinstance(dest, HostStore):
                        link.settle(dest)
                        group.all_sum(dest.mem)
                    else:
                        group.all_sum(dest)
                if moments is not None:
                    group.merge_moments(moments)
        if dest is None:
            read.recomputed[step.out] = step
        elif i != last:
            read.stores[step.out] = dest
        if moments is not None:
            read.moments[step.out] = moments
        for slot in placement.frees[i]:
            if slot != 0:
                store = read.drop(slot)
                if isinstance(store, torch.Tensor) and slot != overwritten:
                    pool.give(store)
    link.finish()
    pool.release()
    return output
