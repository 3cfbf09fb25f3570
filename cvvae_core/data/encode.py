"""Encode a video dataset to latents: safetensors shards + a JSONL index, resumable, multi-rank.

Layout of the output folder ``OUT``::

    run.json                    the settings that decide the latents (model hash, size, frames, ...)
    shard-r<R>-<N>.safetensors  latents written by rank R, one tensor per clip, bounded in size
    index.rank<R>.jsonl         one line per clip rank R made durable (appended after its shard)
    errors.rank<R>.jsonl        one line per video rank R could not use, with the reason
    index.jsonl, errors.jsonl   all ranks' lines merged and sorted (written by rank 0 at the end,
                                or by :func:`merge`)

Nothing lost, nothing doubled: a shard is written under a temporary name, fsynced and renamed; only
then are its clips' index lines appended (and fsynced). A run killed at any moment leaves at worst
an unreferenced shard (deleted on the next start) and a torn last index line (cut off on the next
start); running again with the same arguments skips every clip already indexed.

Ranks (torchrun, ``WORLD_SIZE`` > 1) take videos ``i % world_size == rank`` of the sorted input
list, so the parts are disjoint and the same on every restart.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..devices import DTYPES, resolve_device
from ..distributed import join_ranks
from ..errors import DatasetRunMismatchError, InjectedFaultError, InputError
from ..io.video import read_video

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi")
OUTPUT_MODES = ("mean", "sample", "mean+logvar")
#: Set to N to make the run fail after encoding N clips (before they are all durable): resume tests.
FAULT_ENV = "CVVAE_FAULT_AFTER_CLIPS"
#: run.json fields that decide the latents; resuming with any of them changed is refused.
RUN_KEYS = ("model", "model_sha256", "frames", "height", "width", "frame_stride", "windows", "output", "dtype",
            "tiling")


@dataclass
class EncodeOptions:
    model: str                      # checkpoint path or "builtin"
    videos: str                     # a folder (searched recursively) or a manifest: one path per line
    out: str
    frames: int = 17                # frames per clip, 1+4k
    height: int = 256
    width: int = 256
    frame_stride: int = 1           # take every n-th source frame
    windows: str = "first"          # "first", "all" (back to back) or a count N (evenly spaced)
    dtype: str = "fp32"             # compute dtype: fp32, fp16, bf16
    batch_size: int = 4
    output: str = "mean"            # mean, sample (seeded per clip) or mean+logvar (2C channels)
    tiling: str = "none"            # none, seamless or official (the tiling engine, for large frames)
    shard_mb: float = 256.0
    num_workers: int = 2
    device: str = "auto"
    strict: bool = False
    fault_after_clips: int | None = field(default=None, repr=False)  # None: from $CVVAE_FAULT_AFTER_CLIPS

    def __post_init__(self):
        if self.frames < 1 or (self.frames - 1) % 4:
            raise InputError(f"--frames must be 1+4k (1, 5, 9, 13, 17, ...), got {self.frames}")
        if self.height % 8 or self.width % 8 or self.height < 8 or self.width < 8:
            raise InputError(f"--size must be multiples of 8 (e.g. 256x256), got {self.height}x{self.width}")
        if self.output not in OUTPUT_MODES:
            raise InputError(f"--output must be one of {', '.join(OUTPUT_MODES)}, got {self.output!r}")
        if self.windows not in ("first", "all") and not (self.windows.isdigit() and int(self.windows) >= 1):
            raise InputError(f"--windows must be first, all or a count >= 1, got {self.windows!r}")
        if self.frame_stride < 1 or self.batch_size < 1 or self.shard_mb <= 0 or self.num_workers < 0:
            raise InputError("--stride and --batch-size must be >= 1, --shard-mb > 0, --num-workers >= 0")


@dataclass
class RunSummary:
    encoded: int = 0            # clips encoded and made durable by this run (this rank)
    already_done: int = 0       # clips found in the index and skipped
    failed_videos: int = 0      # videos of this rank in the errors file (this run's and earlier ones)
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1

    @property
    def clips_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


# Inputs ------------------------------------------------------------------------------------
def list_videos(videos: str) -> list[tuple[str, str]]:
    """Sorted ``(name, path)`` pairs: ``name`` (relative to the folder or as the manifest gives it)
    identifies the video in the index, so a moved output folder still resumes."""
    root = Path(videos)
    if root.is_dir():
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        return [(p.relative_to(root).as_posix(), str(p)) for p in paths]
    if root.is_file():
        names = [line.strip() for line in root.read_text().splitlines()]
        names = sorted({n for n in names if n and not n.startswith("#")})
        return [(n, str(root.parent / n)) for n in names]  # relative entries are relative to the manifest
    raise InputError(f"--videos {videos}: no such folder or manifest file; give a folder of videos or a text file "
                     "with one video path per line")


def window_starts(available: int, frames: int, windows: str) -> list[int]:
    """Start indices (in strided frames) of the clips of ``frames`` frames taken from ``available``."""
    last = available - frames
    if last < 0:
        return []
    if windows == "first":
        return [0]
    if windows == "all":
        return list(range(0, last + 1, frames))
    count = int(windows)
    if count == 1:
        return [0]
    return sorted({round(i * last / (count - 1)) for i in range(count)})


class VideoClips(torch.utils.data.Dataset):
    """One item per video: its clips still to encode (decoded in DataLoader workers), or the error
    that made it unusable. ``done`` holds the clip ids already in the index."""

    def __init__(self, videos: list[tuple[str, str]], opts: EncodeOptions, done: set[str]):
        self.videos, self.opts, self.done = videos, opts, done

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        name, path = self.videos[i]
        o = self.opts
        try:
            max_frames = o.frames if o.windows == "first" else None  # only the first window: stop early
            strided, fps = read_video(path, max_frames, o.height, o.width, stride=o.frame_stride)
            starts = window_starts(len(strided), o.frames, o.windows)
            if not starts:
                span = (o.frames - 1) * o.frame_stride + 1
                raise InputError(f"{path} is too short: it has {len(strided)} frames at stride {o.frame_stride}; "
                                 f"a clip of {o.frames} frames needs {span} source frames")
        except InputError as e:  # VideoFileError included: the video is reported and skipped
            return {"name": name, "error": type(e).__name__, "reason": str(e), "clips": []}
        clips = []
        for s in starts:
            clip_id = f"{name}@{s * o.frame_stride}"
            if clip_id not in self.done:
                clips.append({"clip": clip_id, "source": name, "frame_start": s * o.frame_stride,
                              "frame_end": (s + o.frames - 1) * o.frame_stride + 1, "frame_stride": o.frame_stride,
                              "fps": fps / o.frame_stride, "source_fps": fps, "video_windows": len(starts),
                              "pixels": strided[s:s + o.frames]})
        return {"name": name, "error": None, "clips": clips}


def _one_video(item: dict) -> dict:
    """DataLoader collate: items are whole videos, passed on as they are."""
    return item


# Durable files ---------------------------------------------------------------------------
def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def append_lines(path: Path, records: list[dict]):
    """Append JSON lines as one write, then fsync: after this returns they survive a crash."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """Complete lines of ``path``; a torn last line (a crash mid-write) is left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            records.append(json.loads(line))
    return records


def cut_torn_line(path: Path):
    """Drop a partial last line so the next append starts on a line of its own."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
                os.fsync(f.fileno())


def write_shard(path: Path, tensors: dict, metadata: dict):
    """Write a safetensors shard under a temporary name, fsync it and rename it into place."""
    from ..io.files import write_safetensors

    tmp = path.with_name(f".{path.name}.tmp")
    write_safetensors(tensors, tmp, metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# Merge -----------------------------------------------------------------------------------
def _sort_key(record: dict):
    return record.get("source", ""), record.get("frame_start", 0)


def merge(out) -> tuple[int, int]:
    """Merge every rank's ``index.rank*.jsonl`` / ``errors.rank*.jsonl`` into ``index.jsonl`` /
    ``errors.jsonl``, sorted by source and frame (the same whatever the number of ranks); each
    clip once. Returns (clips, failed videos). Safe to run again at any time."""
    out = Path(out)
    clips = {}
    for part in sorted(out.glob("index.rank*.jsonl")):
        for r in read_jsonl(part):
            clips.setdefault(r["clip"], r)
    errors = {}
    for part in sorted(out.glob("errors.rank*.jsonl")):
        for r in read_jsonl(part):
            errors.setdefault(r["source"], r)
    for name, records in (("index.jsonl", clips), ("errors.jsonl", errors)):
        lines = sorted(records.values(), key=_sort_key)
        write_atomic_text(out / name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))
    return len(clips), len(errors)


# Run settings ----------------------------------------------------------------------------
def weights_sha256(sd: dict) -> str:
    """A hash of the weights themselves (names, dtypes, shapes, bytes), whatever file holds them."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_run_settings(out: Path, settings: dict):
    """Refuse to mix latents of different settings in one folder, saying which differ."""
    path = out / "run.json"
    if not path.exists():
        return
    previous = json.loads(path.read_text())
    differ = [f"{k}: {previous.get(k)!r} there, {settings[k]!r} now" for k in RUN_KEYS if previous.get(k) != settings[k]]
    if differ:
        raise DatasetRunMismatchError(f"{out} holds latents made with other settings ({'; '.join(differ)}); "
                                      "run with the same arguments to resume, or give a new --out")


# Distributed -----------------------------------------------------------------------------
def _barrier(world: int):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _clip_generator(clip_id: str) -> torch.Generator:
    """The noise of ``--output sample`` depends on the clip alone: a resumed or multi-rank run
    draws the same samples as one uninterrupted run."""
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:8], "little"))


# The run ---------------------------------------------------------------------------------
class _ShardWriter:
    """Collects encoded clips and writes a shard when it reaches ``shard_mb``; index lines follow."""

    def __init__(self, out: Path, rank: int, shard_bytes: float, common: dict):
        self.out, self.rank, self.shard_bytes, self.common = out, rank, shard_bytes, common
        self.index = out / f"index.rank{rank}.jsonl"
        taken = [int(m.group(1)) for p in out.glob(f"shard-r{rank:03d}-*.safetensors")
                 if (m := re.fullmatch(rf"shard-r{rank:03d}-(\d+)\.safetensors", p.name))]
        self.next_number = max(taken, default=-1) + 1
        self.tensors, self.records, self.bytes = {}, [], 0

    def add(self, record: dict, latent: torch.Tensor) -> int:
        """Queue one clip; returns how many clips became durable (0 unless a shard was written)."""
        key = f"clip{len(self.records):06d}"
        self.tensors[key] = latent.contiguous()
        self.records.append({**record, **self.common, "key": key, "latent_shape": list(latent.shape),
                             "latent_dtype": str(latent.dtype).replace("torch.", "")})
        self.bytes += latent.numel() * latent.element_size()
        return self.flush() if self.bytes >= self.shard_bytes else 0

    def flush(self) -> int:
        if not self.records:
            return 0
        name = f"shard-r{self.rank:03d}-{self.next_number:06d}.safetensors"
        write_shard(self.out / name, self.tensors, {"format": "cvvae_core latents", "clips": str(len(self.records))})
        append_lines(self.index, [{**r, "shard": name} for r in self.records])  # only now: the shard is durable
        count = len(self.records)
        self.next_number += 1
        self.tensors, self.records, self.bytes = {}, [], 0
        return count


def _remove_unreferenced_shards(out: Path, rank: int):
    """A crash between a shard's rename and its index lines leaves a shard nobody refers to; its
    clips are encoded again, so the file is only dead weight. Each rank cleans its own."""
    referenced = {r["shard"] for part in out.glob("index.rank*.jsonl") for r in read_jsonl(part)}
    for p in out.glob(f"shard-r{rank:03d}-*.safetensors"):
        if p.name not in referenced:
            p.unlink()
    for p in out.glob(f".shard-r{rank:03d}-*.tmp"):
        p.unlink()


def encode_dataset(opts: EncodeOptions, progress_stream=None) -> RunSummary:
    """Encode ``opts.videos`` into ``opts.out`` (see the module docstring); resumes what is there."""
    from ..io.checkpoint import build_model, read_state_dict
    from ..model.cvvae import sample_posterior
    from ..progress import TextProgress
    from ..tiling.runner import TilingOptions, encode_moments

    out = Path(opts.out)
    fault_after = opts.fault_after_clips
    if fault_after is None and os.environ.get(FAULT_ENV):
        fault_after = int(os.environ[FAULT_ENV])
    ranks = join_ranks(resolve_device(opts.device))
    rank, world, device = ranks.rank, ranks.world, ranks.device
    try:
        sd, hints = read_state_dict(opts.model)
        settings = {"model": "builtin" if opts.model == "builtin" else Path(opts.model).name,
                    "model_sha256": weights_sha256(sd), "frames": opts.frames, "height": opts.height,
                    "width": opts.width, "frame_stride": opts.frame_stride, "windows": opts.windows,
                    "output": opts.output, "dtype": opts.dtype, "tiling": opts.tiling}
        model = build_model(sd, hints, source=settings["model"], device=device, dtype=DTYPES[opts.dtype])
        del sd
        check_run_settings(out, settings)  # every rank checks before anyone writes
        _barrier(world)
        out.mkdir(parents=True, exist_ok=True)
        if rank == 0 and not (out / "run.json").exists():
            write_atomic_text(out / "run.json", json.dumps({**settings, "started": time.time(),
                                                             "options": {k: v for k, v in asdict(opts).items()
                                                                         if k != "fault_after_clips"}}, indent=2))
        common = {"model": settings["model"], "model_sha256": settings["model_sha256"],
                  "size": [opts.height, opts.width], "frames": opts.frames, "output": opts.output,
                  "scaling_factor": model.scaling_factor, "shift_factor": model.shift_factor}

        cut_torn_line(out / f"index.rank{rank}.jsonl")
        cut_torn_line(out / f"errors.rank{rank}.jsonl")
        _remove_unreferenced_shards(out, rank)
        _barrier(world)  # no rank reads the index files while another still cuts or cleans its own
        indexed = [r for part in out.glob("index.rank*.jsonl") for r in read_jsonl(part)]
        done = {r["clip"] for r in indexed}
        failed = {r["source"] for part in out.glob("errors.rank*.jsonl") for r in read_jsonl(part)}
        done_per_video: dict[str, int] = {}
        for r in indexed:
            done_per_video[r["source"]] = done_per_video.get(r["source"], 0) + 1
        complete = {r["source"] for r in indexed if done_per_video[r["source"]] >= r["video_windows"]}
        mine = list_videos(opts.videos)[rank::world]  # disjoint, and the same on every restart
        # Failures recorded by an earlier run count too: --strict judges the whole output.
        summary = RunSummary(already_done=sum(done_per_video.get(n, 0) for n, _ in mine),
                             failed_videos=sum(n in failed for n, _ in mine), rank=rank, world_size=world)
        # Videos complete in the index, or reported bad before (delete errors.rank*.jsonl to retry
        # them), are not decoded again.
        todo = [(n, p) for n, p in mine
                if n not in failed and n not in complete]

        loader = torch.utils.data.DataLoader(VideoClips(todo, opts, done), batch_size=None, shuffle=False,
                                             num_workers=opts.num_workers, collate_fn=_one_video,
                                             prefetch_factor=2 if opts.num_workers else None)
        writer = _ShardWriter(out, rank, opts.shard_mb * 2**20, common)
        tiling = None if opts.tiling == "none" else TilingOptions(mode=opts.tiling, output_device=device)
        bar = TextProgress(f"rank {rank}" if world > 1 else "encode", stream=progress_stream)
        start = time.monotonic()
        pending: list[dict] = []
        encoded = 0

        def encode_pending():
            nonlocal encoded
            video = torch.stack([c.pop("pixels") for c in pending]).permute(0, 4, 1, 2, 3)
            video = (video.to(device).float() / 127.5 - 1)  # the model's [-1, 1] range
            with torch.no_grad():
                moments = model.encode_moments(video) if tiling is None else encode_moments(model, video, tiling)
                mean, logvar = model.split_moments(moments.float())
            for i, record in enumerate(pending):
                if opts.output == "mean":
                    latent = mean[i]
                elif opts.output == "sample":
                    latent = sample_posterior(mean[i].cpu(), logvar[i].cpu(), _clip_generator(record["clip"]))
                else:
                    latent = torch.cat([mean[i], logvar[i]])
                summary.encoded += writer.add(record, latent.cpu())
                encoded += 1
                if fault_after is not None and encoded >= fault_after:
                    raise InjectedFaultError(f"fault injected after {encoded} clips (${FAULT_ENV} / "
                                             "fault_after_clips); run again to resume")
            pending.clear()

        for n, item in enumerate(loader, 1):
            if item["error"]:
                append_lines(out / f"errors.rank{rank}.jsonl",
                             [{"source": item["name"], "error": item["error"], "reason": item["reason"]}])
                summary.failed_videos += 1
            for clip in item["clips"]:
                pending.append(clip)
                if len(pending) == opts.batch_size:
                    encode_pending()
            elapsed = time.monotonic() - start
            rate = encoded / elapsed if elapsed > 0 else 0.0
            eta = elapsed / n * (len(todo) - n)
            bar(n, len(todo), f"videos, {encoded} clips, {rate:.2f} clips/s, ETA {eta:.0f}s")
        if pending:
            encode_pending()
        summary.encoded += writer.flush()
        bar.close()
        summary.seconds = time.monotonic() - start
        _barrier(world)  # every rank's index is complete before the merge reads it
        if rank == 0:
            merge(out)
        _barrier(world)
        return summary
    finally:
        ranks.close()
