"""Training data: clips of real videos (PyAV, in DataLoader workers) or procedural clips.

The ``"data"`` entry of a training config chooses the source::

    {"synthetic": true}                                     procedural clips (the default)
    {"videos": "DIR or manifest", "frame_stride": 2,        real videos
     "val_split": 0.05, "workers": 4}

``videos`` is a folder or a manifest in the grammar of :mod:`cvvae_core.data.manifest` (the one
encode-dataset reads too).

Every training sample is a *key* ``(step, i)``: global step and position in the step's global
batch. The clip is a pure function of the run's seed and the key: the video (every clip position
of the data set equally likely), the first frame and the crop are drawn from a generator seeded by
them. So a run is deterministic for a given seed whatever the number of ranks, DataLoader workers
or gradient-accumulation steps that compute the batch, and a resumed run (on any number of ranks)
goes on with the step's fresh keys. Rank ``r`` of ``W``, accumulation step ``a`` of a step, holds
positions ``(a * W + r) * B .. + B - 1`` (``B`` = batch_size), the layout that makes
``W x B x A`` clips one global batch whichever way it is split.

Frames are taken every ``frame_stride`` source frames (or at ``fps``, a stride per video), scaled
so that the shorter side covers the crop (upscaling a smaller video is normal; ``resize`` sets the
shorter side explicitly), then cropped at random to ``height x width``, by the one video reader
(:func:`cvvae_core.io.video.read_frames`). A video that cannot be read
(unreadable, corrupt, shorter than one clip) is skipped with its reason, counted and logged; the
sample is drawn again from the next key attempt, so one bad file never stops a long run. Only when
no video at all is usable does the run stop, with :class:`~cvvae_core.errors.TrainingDataError`.

Validation clips are fixed: evenly spaced positions of the held-out videos (``val``: another
folder/manifest; or ``val_split``: a fraction < 1 or a count of the input videos, chosen with the
seed), centre crop.
"""
from __future__ import annotations

import bisect
import hashlib
import random
from dataclasses import dataclass, field

import torch

from ..errors import InputError, TrainConfigError, TrainingDataError, VideoFileError
from ..io.video import Crop, probe_video, read_frames, to_model_range
from .manifest import Source, list_sources
from .synthetic import SyntheticConfig, generate_clip
from .workers import leave_sigterm_to_main_process

#: Draws of one sample before the data source is declared broken (each failure is logged).
MAX_ATTEMPTS = 16


def seed_of(*parts) -> int:
    """A 63-bit seed from ints/strings, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class DataConfig:
    synthetic: bool = False            # procedural clips (the default when no "videos" is given)
    videos: str | None = None          # folder or manifest (.txt/.csv/.jsonl)
    val: str | None = None             # held-out videos: folder or manifest
    val_split: float = 0.0             # or hold out this fraction (< 1) / count (>= 1) of "videos"
    val_clips: int = 4                 # fixed validation clips
    frame_stride: int = 1              # take every n-th source frame ...
    fps: float | None = None           # ... or sample at this frame rate (a stride per video)
    resize: int | None = None          # shorter side before the crop; None = just cover the crop
    workers: int | None = None         # DataLoader worker processes per rank; None: 2 for videos, 0 synthetic

    def __post_init__(self):

        if self.videos is None and not self.synthetic:
            self.synthetic = True
        if self.workers is None:
            self.workers = 0 if self.synthetic else 2
        if self.synthetic and self.videos is not None:
            raise TrainConfigError("data: give either 'videos' (real clips) or 'synthetic': true, not both")
        if self.frame_stride < 1 or (self.fps is not None and self.fps <= 0):
            raise TrainConfigError(f"data: frame_stride must be >= 1 and fps > 0, got {self.frame_stride}, {self.fps}")
        if self.fps is not None and self.frame_stride != 1:
            raise TrainConfigError("data: give 'frame_stride' or 'fps', not both")
        if self.val is not None and self.val_split:
            raise TrainConfigError("data: give 'val' (a separate list) or 'val_split', not both")
        if self.val_split < 0 or (self.val_split >= 1 and self.val_split != int(self.val_split)):
            raise TrainConfigError(f"data: val_split is a fraction < 1 or a whole count, got {self.val_split}")
        if self.workers < 0 or self.val_clips < 0:
            raise TrainConfigError("data: workers and val_clips must be >= 0")

    def check_crop(self, height: int, width: int):
        """A crop that cannot fit the resized frame is an error in the config, found before any work."""

        if self.resize is not None and self.resize < max(height, width):
            raise TrainConfigError(
                f"data: resize {self.resize} (the shorter side) is smaller than the {height}x{width} crop: the crop "
                f"would not fit a square video; set resize >= {max(height, width)} or leave it out (the shorter side "
                "is then scaled to cover the crop, upscaling small videos)")


# Probed videos --------------------------------------------------------------------------------

@dataclass
class Video:
    """A probed source: what sampling needs to know."""
    source: Source
    fps: float
    first: int                         # first usable frame index
    stop: int                          # one past the last usable frame index
    stride: int
    width: int
    height: int

    def positions(self, frames: int) -> int:
        """Number of clip start positions for clips of ``frames`` frames."""
        return max(0, self.stop - self.first - (frames - 1) * self.stride)


def probe(src: Source, frames: int, cfg: DataConfig) -> Video:
    """What sampling needs to know of ``src`` (no decoding); raises InputError when unusable."""
    info = probe_video(src.path)
    fps = info.fps
    first = src.start_frame if src.start_frame is not None else round((src.start or 0) * fps)
    stop = src.end_frame if src.end_frame is not None else (round(src.end * fps) if src.end is not None else info.frames)
    stop = min(stop, info.frames)
    stride = max(1, round(fps / cfg.fps)) if cfg.fps else cfg.frame_stride
    video = Video(src, fps, first, stop, stride, info.width, info.height)
    if video.positions(frames) == 0:
        need = (frames - 1) * stride + 1
        raise InputError(f"{src.path} is too short: {max(0, stop - first)} usable frames, a clip of {frames} frames "
                         f"at stride {stride} needs {need}; use shorter clips ('frames'), a smaller stride/fps, or "
                         "longer videos")
    return video


def read_clip(video: Video, start: int, frames: int, height: int, width: int, rng: random.Random | None,
              resize: int | None = None) -> torch.Tensor:
    """Frames ``start, start + stride, ...`` (``frames`` of them) of ``video``, scaled so the shorter
    side covers the crop (or is ``resize``), cropped (at random with ``rng``, else centred);
    ``[3, T, height, width]`` in [-1, 1]. Raises VideoFileError when decoding fails or ends early."""
    crop = Crop.cover(video.height, video.width, height, width, rng, resize)
    clip = read_frames(video.source.path, start, frames, video.stride, crop, video.fps)
    if len(clip) < frames:
        raise VideoFileError(f"{video.source.path} ended early: {len(clip)} of the {frames} frames from frame {start} "
                             "decoded (the file is shorter than its header says, or damaged)")
    return to_model_range(torch.stack(clip))[0]


# Datasets --------------------------------------------------------------------------------------

class SyntheticClips(torch.utils.data.Dataset):
    """Procedural clips; key ``(step, i)`` -> the clip the single-process trainer always drew
    (``generate_batch(seed * 10_000_019 + step, ...)``'s i-th)."""

    def __init__(self, seed: int, frames: int, height: int, width: int):
        self.seed, self.cfg = seed, SyntheticConfig(frames=frames, height=height, width=width)

    def __getitem__(self, key):
        step, i = key
        clip = generate_clip((self.seed * 10_000_019 + step) * 1_000_003 + i, self.cfg)
        return {"video": clip, "seed": seed_of(self.seed, step, i), "skipped": []}

    def val_clips(self, count: int) -> list[torch.Tensor]:
        return [generate_clip(seed_of(self.seed, "val", k) % 2 ** 31, self.cfg) for k in range(count)]


class RandomClips(torch.utils.data.Dataset):
    """Random clips of probed videos; key ``(step, i)`` (see the module docstring)."""

    def __init__(self, videos: list[Video], seed: int, frames: int, height: int, width: int, resize: int | None):
        self.videos, self.seed, self.frames, self.height, self.width, self.resize = \
            videos, seed, frames, height, width, resize
        self.cumulative = []
        total = 0
        for v in videos:
            total += v.positions(frames)
            self.cumulative.append(total)

    def __getitem__(self, key):
        step, i = key
        skipped = []
        for attempt in range(MAX_ATTEMPTS):
            rng = random.Random(seed_of(self.seed, step, i, attempt))
            k = rng.randrange(self.cumulative[-1])
            v = bisect.bisect_right(self.cumulative, k)
            video = self.videos[v]
            start = video.first + (k - (self.cumulative[v - 1] if v else 0))
            try:
                clip = read_clip(video, start, self.frames, self.height, self.width, rng, self.resize)
            except InputError as e:
                skipped.append({"path": video.source.name, "reason": str(e)})
                continue
            return {"video": clip, "seed": seed_of(self.seed, step, i), "skipped": skipped}
        raise TrainingDataError(f"{MAX_ATTEMPTS} clips in a row could not be read (last: {skipped[-1]['reason']}); "
                                "the data looks broken: check the videos listed in the run's log.jsonl")


def fixed_clips(videos: list[Video], count: int, frames: int, height: int, width: int,
                resize: int | None, log) -> list[torch.Tensor]:
    """``count`` validation clips: video ``k % n``, evenly spaced positions, centre crop."""
    clips = []
    per_video = [len(range(k, count, len(videos))) for k in range(len(videos))] if videos else []
    for k in range(count):
        v = videos[k % len(videos)]
        j, m = k // len(videos), per_video[k % len(videos)]
        start = v.first + (v.positions(frames) - 1) * (j + 1) // (m + 1)
        try:
            clips.append(read_clip(v, start, frames, height, width, None, resize))
        except InputError as e:
            log({"event": "skip", "path": v.source.name, "reason": str(e), "split": "val"})
    return clips


def collate(items: list[dict]) -> dict:
    return {"video": torch.stack([it["video"] for it in items]),
            "seed": [it["seed"] for it in items],
            "skipped": [s for it in items for s in it["skipped"]]}


class StepBatches(torch.utils.data.Sampler):
    """This rank's micro-batches of keys, step after step, from ``first_step`` to ``steps``."""

    def __init__(self, first_step: int, steps: int, batch_size: int, rank: int, world: int, accum: int):
        self.first_step, self.steps, self.b, self.rank, self.world, self.accum = \
            first_step, steps, batch_size, rank, world, accum

    def __iter__(self):
        for step in range(self.first_step, self.steps):
            for a in range(self.accum):
                base = (a * self.world + self.rank) * self.b
                yield [(step, base + j) for j in range(self.b)]

    def __len__(self):
        return max(0, self.steps - self.first_step) * self.accum


@dataclass
class TrainData:
    """What a run trains and validates on."""
    train: torch.utils.data.Dataset
    val: list[torch.Tensor] = field(default_factory=list)
    workers: int = 0
    description: str = ""

    def loader(self, first_step: int, steps: int, batch_size: int, rank: int, world: int, accum: int):
        sampler = StepBatches(first_step, steps, batch_size, rank, world, accum)
        return torch.utils.data.DataLoader(self.train, batch_sampler=sampler, num_workers=self.workers,
                                           collate_fn=collate, persistent_workers=False,
                                           prefetch_factor=2 if self.workers else None,
                                           worker_init_fn=leave_sigterm_to_main_process)


def split_val(sources: list[Source], val_split: float, seed: int) -> tuple[list[Source], list[Source]]:
    if not val_split:
        return sources, []
    count = int(val_split) if val_split >= 1 else max(1, round(val_split * len(sources)))
    if count >= len(sources):
        raise TrainingDataError(f"data: val_split {val_split} holds out {count} of {len(sources)} videos, leaving "
                                "none to train on; lower val_split or give a separate 'val' list")
    order = sorted(range(len(sources)), key=lambda k: seed_of(seed, "val_split", sources[k].name))
    held = set(order[:count])
    return [s for k, s in enumerate(sources) if k not in held], [s for k, s in enumerate(sources) if k in held]


def probe_all(sources: list[Source], frames: int, cfg: DataConfig, log, split: str) -> list[Video]:
    videos = []
    for src in sources:
        try:
            videos.append(probe(src, frames, cfg))
        except InputError as e:
            log({"event": "skip", "path": src.name, "reason": str(e), "split": split})
    return videos


def build_data(cfg: DataConfig, seed: int, frames: int, height: int, width: int, log) -> TrainData:
    """The run's data. ``log(record)`` receives every skipped video (path, reason)."""
    if cfg.synthetic:
        train = SyntheticClips(seed, frames, height, width)
        return TrainData(train, train.val_clips(cfg.val_clips), cfg.workers, "procedural clips")
    cfg.check_crop(height, width)
    sources, problems = list_sources(cfg.videos, "data 'videos'")
    for p in problems:
        log({"event": "skip", "split": "train", **p})
    if cfg.val is not None:
        val_sources, val_problems = list_sources(cfg.val, "data 'val'")
        for p in val_problems:
            log({"event": "skip", "split": "val", **p})
    else:
        sources, val_sources = split_val(sources, cfg.val_split, seed)
    videos = probe_all(sources, frames, cfg, log, "train")
    if not videos:
        raise TrainingDataError(
            f"data: none of the {len(sources) + len(problems)} videos in {cfg.videos} can be used (reasons in the "
            f"log above and in the run's log.jsonl); a clip needs {frames} frames at stride {cfg.frame_stride if not cfg.fps else 'from fps'}. "
            "Fix the paths, re-encode the files, or lower 'frames' / the stride")
    val_videos = probe_all(val_sources, frames, cfg, log, "val")
    if val_sources and not val_videos:
        raise TrainingDataError(f"data: none of the {len(val_sources)} validation videos can be used (reasons in the "
                                "log); fix them or drop 'val'/'val_split'")
    val = fixed_clips(val_videos, cfg.val_clips, frames, height, width, cfg.resize, log) if val_videos else []
    clips = sum(v.positions(frames) for v in videos)
    desc = f"{len(videos)} videos ({clips} clip positions), {len(val)} validation clips from {len(val_videos)} videos"
    return TrainData(RandomClips(videos, seed, frames, height, width, cfg.resize), val, cfg.workers, desc)
