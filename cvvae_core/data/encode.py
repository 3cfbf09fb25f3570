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

Inputs: a folder or manifest in the grammar training reads (:mod:`cvvae_core.data.manifest`), time
ranges included; each video is read by the one video reader (:func:`cvvae_core.io.video.read_frames`).
A clip's id is ``KEY@FRAME`` (the source's key, the first source frame).

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
from ..distributed import Ranks, ranks_of
from ..errors import DatasetRunMismatchError, InjectedFaultError, InputError
from ..io.checkpoint import build_model, read_state_dict
from ..io.files import write_safetensors
from ..io.video import Crop, probe_video, read_frames, to_model_range
from ..model.cvvae import CVVAE, sample_posterior
from ..progress import TextProgress
from ..spec import CVVAEConfig
from ..tiling.runner import TilingOptions
from .latent_dataset import shard_problem
from .manifest import Source, list_sources
from .workers import leave_sigterm_to_main_process

OUTPUT_MODES = ("mean", "sample", "mean+logvar")
#: Set to N to make the run fail after encoding N clips (before they are all durable): resume tests.
FAULT_ENV = "CVVAE_FAULT_AFTER_CLIPS"
#: run.json fields that decide the latents; resuming with any of them changed is refused.
RUN_KEYS = ("model", "model_sha256", "frames", "height", "width", "frame_stride", "windows", "output", "dtype",
            "tiling")


@dataclass
class EncodeOptions:
    model: str                      # checkpoint path or "builtin"
    videos: str                     # a folder or manifest (cvvae_core.data.manifest)
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
    disk_dir: str | None = None     # the tiling engine's disk tier (TilingOptions.disk_dir)
    fault_after_clips: int | None = field(default=None, repr=False)  # None: from $CVVAE_FAULT_AFTER_CLIPS

    def __post_init__(self):
        if self.output not in OUTPUT_MODES:
            raise InputError(f"output must be one of {', '.join(OUTPUT_MODES)}, got {self.output!r}")
        if self.windows not in ("first", "all") and not (self.windows.isdigit() and int(self.windows) >= 1):
            raise InputError(f"windows must be first, all or a count >= 1, got {self.windows!r}")
        if self.frame_stride < 1 or self.batch_size < 1 or self.shard_mb <= 0 or self.num_workers < 0:
            raise InputError("frame_stride and batch_size must be >= 1, shard_mb > 0, num_workers >= 0")


@dataclass
class RunSummary:
    encoded: int = 0            # clips encoded and made durable by this run (this rank)
    already_done: int = 0       # clips found in the index and skipped
    failed_videos: int = 0      # videos of this rank in the errors file (this run's and earlier ones)
    videos: int = 0             # the inputs this rank was given
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1

    @property
    def clips_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    @property
    def nothing_usable(self) -> bool:
        """This rank had inputs and none of them gave a clip, in this run or before: a failed run."""
        return self.videos > 0 and self.encoded + self.already_done == 0


# Inputs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Input:
    """One video to encode (``source``), or a manifest line that names no file (``problem``)."""
    key: str                        # names the video in the index and in clip ids
    source: Source | None = None
    problem: str | None = None


def list_inputs(videos: str) -> list[Input]:
    """Every input of a folder or manifest, sorted by key: the order ranks split (the same on every restart)."""
    sources, problems = list_sources(videos, "--videos")
    inputs = [Input(s.key, s) for s in sources] + [Input(p["path"], problem=p["reason"]) for p in problems]
    return sorted(inputs, key=lambda i: i.key)


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


def read_windows(source: Source, opts: EncodeOptions) -> tuple[list[int], torch.Tensor, int, float]:
    """(window starts, strided frames [T, H, W, 3] uint8, first source frame, source fps) of ``source``:
    frames every ``frame_stride`` from its start to its end, scaled to cover the size, centre-cropped."""
    info = probe_video(source.path)
    first = source.start_frame if source.start_frame is not None else round((source.start or 0) * info.fps)
    stop = source.end_frame if source.end_frame is not None else (
        round(source.end * info.fps) if source.end is not None else None)
    count = None if stop is None else max(0, -(-(stop - first) // opts.frame_stride))
    if opts.windows == "first":
        count = opts.frames if count is None else min(count, opts.frames)  # only the first window: stop early
    crop = Crop.cover(info.height, info.width, opts.height, opts.width)
    frames = read_frames(source.path, first, count, opts.frame_stride, crop, info.fps)
    starts = window_starts(len(frames), opts.frames, opts.windows)
    if not starts:
        span = (opts.frames - 1) * opts.frame_stride + 1
        raise InputError(f"{source.path} is too short: it has {len(frames)} frames at stride {opts.frame_stride}; "
                         f"a clip of {opts.frames} frames needs {span} source frames")
    return starts, torch.stack(frames), first, info.fps


class VideoWindows(torch.utils.data.Dataset):
    """One item per input video: its clip windows still to encode (decoded in DataLoader workers),
    or the error that made it unusable. ``done`` holds the clip ids already in the index."""

    def __init__(self, inputs: list[Input], opts: EncodeOptions, done: set[str]):
        self.inputs, self.opts, self.done = inputs, opts, done

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict:
        item, o = self.inputs[i], self.opts
        if item.problem:
            return {"name": item.key, "error": "VideoNotFoundError", "reason": item.problem, "clips": []}
        try:
            starts, strided, first, fps = read_windows(item.source, o)
        except InputError as e:  # VideoFileError included: the video is reported and skipped
            return {"name": item.key, "error": type(e).__name__, "reason": str(e), "clips": []}
        clips = []
        for s in starts:
            frame = first + s * o.frame_stride
            clip_id = f"{item.key}@{frame}"
            if clip_id not in self.done:
                clips.append({"clip": clip_id, "source": item.key, "frame_start": frame,
                              "frame_end": frame + (o.frames - 1) * o.frame_stride + 1, "frame_stride": o.frame_stride,
                              "fps": fps / o.frame_stride, "source_fps": fps, "video_windows": len(starts),
                              "pixels": strided[s:s + o.frames]})
        return {"name": item.key, "error": None, "clips": clips}


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
    clip once. Returns (clips, failed videos). Safe to run again at any time. A folder that
    encode-dataset did not make is refused, and nothing is written into it."""
    out = Path(out)
    if not out.is_dir():
        raise InputError(f"{out} is not a folder; give the --out folder of an encode-dataset run")
    if not (out / "run.json").is_file() and not any(out.glob("index.rank*.jsonl")):
        raise InputError(f"{out} is not an encode-dataset output folder (it has no run.json and no "
                         "index.rank*.jsonl); give the --out folder of an encode-dataset run")
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


def holds_latents(out: Path) -> bool:
    """Whether ``out`` has any index line or shard: latents that later runs must match."""
    return any(out.glob("shard-r*.safetensors")) or any(read_jsonl(p) for p in out.glob("index*.jsonl"))


def check_run_settings(out: Path, settings: dict):
    """Refuse to mix latents of different settings in one folder, saying which differ."""
    path = out / "run.json"
    if not path.exists() or not holds_latents(out):
        return  # a run that stopped before encoding anything leaves settings nobody depends on
    previous = json.loads(path.read_text())
    differ = [f"{k}: {previous.get(k)!r} there, {settings[k]!r} now" for k in RUN_KEYS if previous.get(k) != settings[k]]
    if differ:
        raise DatasetRunMismatchError(f"{out} holds latents made with other settings ({'; '.join(differ)}); "
                                      "run with the same arguments to resume, or give a new --out")


# Clips -----------------------------------------------------------------------------------
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
        """Write the queued clips as a shard, then their index lines; returns how many. Called again
        after an interrupt inside it, it writes nothing twice: the queue is emptied first (a shard
        cut short is removed, and its clips encoded again, by the next run)."""
        if not self.records:
            return 0
        name = f"shard-r{self.rank:03d}-{self.next_number:06d}.safetensors"
        tensors, records = self.tensors, self.records
        self.next_number += 1
        self.tensors, self.records, self.bytes = {}, [], 0
        write_shard(self.out / name, tensors, {"format": "cvvae_core latents", "clips": str(len(records)),
                                               "shard": name})
        append_lines(self.index, [{**r, "shard": name} for r in records])  # only now: the shard is durable
        return len(records)


def _drop_lost_shards(out: Path, ranks: Ranks):
    """Index lines whose shard is missing, truncated or replaced are dropped (and a damaged shard
    deleted), so this run encodes those clips again. Each rank repairs the index files
    ``index.rank<k>`` with ``k % world == rank`` (those of an earlier run on more ranks too)."""
    for part in sorted(out.glob("index.rank*.jsonl")):
        k = int(re.fullmatch(r"index\.rank(\d+)\.jsonl", part.name).group(1))
        if k % ranks.world != ranks.rank:
            continue
        records = read_jsonl(part)
        by_shard: dict[str, list[dict]] = {}
        for r in records:
            by_shard.setdefault(r["shard"], []).append(r)
        lost = {name for name, rs in by_shard.items() if shard_problem(out, name, rs)}
        if lost:
            kept = [r for r in records if r["shard"] not in lost]
            write_atomic_text(part, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
            for name in lost:
                (out / name).unlink(missing_ok=True)


def _remove_unreferenced_shards(out: Path, rank: int):
    """A crash between a shard's rename and its index lines leaves a shard nobody refers to; its
    clips are encoded again, so the file is only dead weight. Each rank cleans its own."""
    referenced = {r["shard"] for part in out.glob("index.rank*.jsonl") for r in read_jsonl(part)}
    for p in out.glob(f"shard-r{rank:03d}-*.safetensors"):
        if p.name not in referenced:
            p.unlink()
    for p in out.glob(f".shard-r{rank:03d}-*.tmp"):
        p.unlink()


class _BatchEncoder:
    """Encodes queued clips ``batch_size`` at a time and hands each latent to the shard writer."""

    def __init__(self, model: CVVAE, opts: EncodeOptions, device: torch.device, writer: _ShardWriter,
                 fault_after: int | None):
        self.model, self.opts, self.device, self.writer, self.fault_after = model, opts, device, writer, fault_after
        self.tiling = None if opts.tiling == "none" else TilingOptions(mode=opts.tiling, output_device=device,
                                                                           disk_dir=opts.disk_dir)
        self.pending: list[dict] = []
        self.encoded = 0                # clips encoded by this run
        self.durable = 0                # ... and written with their index lines

    def add(self, clip: dict):
        self.pending.append(clip)
        if len(self.pending) == self.opts.batch_size:
            self._encode()

    def finish(self):
        if self.pending:
            self._encode()
        self.durable += self.writer.flush()

    @torch.no_grad()
    def _encode(self):
        video = to_model_range(torch.stack([c.pop("pixels") for c in self.pending])).to(self.device)
        moments = self.model.encoder_output(video) if self.tiling is None else \
            self.tiling.encode_moments(self.model, video)
        mean, logvar = self.model.split_moments(moments.float())
        for i, record in enumerate(self.pending):
            self.durable += self.writer.add(record, self._latent(record["clip"], mean[i], logvar[i]).cpu())
            self.encoded += 1
            if self.fault_after is not None and self.encoded >= self.fault_after:
                raise InjectedFaultError(f"fault injected after {self.encoded} clips (${FAULT_ENV} / "
                                         "fault_after_clips); run again to resume")
        self.pending.clear()

    def _latent(self, clip_id: str, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        if self.opts.output == "mean":
            return mean
        if self.opts.output == "sample":
            return sample_posterior(mean.cpu(), logvar.cpu(), _clip_generator(clip_id))
        return torch.cat([mean, logvar])


def _load(opts: EncodeOptions, device: torch.device) -> tuple[CVVAE, dict]:
    """The model and the run settings that decide its latents."""
    sd, hints = read_state_dict(opts.model)
    settings = {"model": "builtin" if opts.model == "builtin" else Path(opts.model).name,
                "model_sha256": weights_sha256(sd), "frames": opts.frames, "height": opts.height,
                "width": opts.width, "frame_stride": opts.frame_stride, "windows": opts.windows,
                "output": opts.output, "dtype": opts.dtype, "tiling": opts.tiling}
    model = build_model(sd, hints, source=settings["model"], device=device, dtype=DTYPES[opts.dtype])
    check_clip_shape(opts, model.config)
    return model, settings


def check_clip_shape(opts: EncodeOptions, cfg: CVVAEConfig):
    """Clips the model encodes exactly: 1 + (time compression) * k frames, sizes multiples of the
    spatial compression (1+4k and 8 for the released models)."""
    tc, sc = cfg.time_compression, cfg.spatial_compression
    if opts.frames < 1 or (opts.frames - 1) % tc:
        counts = ", ".join(str(1 + tc * k) for k in range(5))
        raise InputError(f"frames must be 1+{tc}k ({counts}, ...) for this model, got {opts.frames}")
    if opts.height % sc or opts.width % sc or min(opts.height, opts.width) < sc:
        raise InputError(f"height and width must be multiples of {sc} (e.g. {32 * sc}) for this model, "
                         f"got {opts.height}x{opts.width}")


def _start_folder(out: Path, opts: EncodeOptions, settings: dict, ranks: Ranks):
    """Create ``out`` and its run.json (rank 0), then each rank repairs what a crash left of its own
    files. Called once the inputs, the model and the settings are known to be good."""
    out.mkdir(parents=True, exist_ok=True)
    if ranks.rank == 0 and not holds_latents(out):
        options = {k: v for k, v in asdict(opts).items() if k != "fault_after_clips"}
        write_atomic_text(out / "run.json", json.dumps({**settings, "started": time.time(), "options": options},
                                                       indent=2))
    cut_torn_line(out / f"index.rank{ranks.rank}.jsonl")
    cut_torn_line(out / f"errors.rank{ranks.rank}.jsonl")
    ranks.barrier()  # every torn line is cut before any rank reads another's index
    _drop_lost_shards(out, ranks)
    ranks.barrier()
    _remove_unreferenced_shards(out, ranks.rank)
    ranks.barrier()  # no rank reads the index files while another still cuts or cleans its own


def _plan(out: Path, inputs: list[Input], ranks: Ranks) -> tuple[list[Input], set[str], RunSummary]:
    """(this rank's inputs still to decode, the clip ids already indexed, the summary so far).
    Videos complete in the index, or reported bad before (delete errors.rank*.jsonl to retry them),
    are not decoded again; failures of an earlier run count too (--strict judges the whole output)."""
    indexed = [r for part in out.glob("index.rank*.jsonl") for r in read_jsonl(part)]
    failed = {r["source"] for part in out.glob("errors.rank*.jsonl") for r in read_jsonl(part)}
    done_per_video: dict[str, int] = {}
    for r in indexed:
        done_per_video[r["source"]] = done_per_video.get(r["source"], 0) + 1
    complete = {r["source"] for r in indexed if done_per_video[r["source"]] >= r["video_windows"]}
    mine = inputs[ranks.rank::ranks.world]  # disjoint, and the same on every restart
    summary = RunSummary(already_done=sum(done_per_video.get(i.key, 0) for i in mine),
                         failed_videos=sum(i.key in failed for i in mine), videos=len(mine),
                         rank=ranks.rank, world_size=ranks.world)
    todo = [i for i in mine if i.key not in failed and i.key not in complete]
    return todo, {r["clip"] for r in indexed}, summary


def encode_dataset(opts: EncodeOptions, progress_stream=None) -> RunSummary:
    """Encode ``opts.videos`` into ``opts.out`` (see the module docstring); resumes what is there.
    Nothing is written before the inputs, the model and the settings are checked. The summary is
    this rank's; :attr:`RunSummary.nothing_usable` marks a run in which no input gave a clip."""
    out = Path(opts.out)
    fault_after = opts.fault_after_clips
    if fault_after is None and os.environ.get(FAULT_ENV):
        fault_after = int(os.environ[FAULT_ENV])
    inputs = list_inputs(opts.videos)
    with ranks_of(resolve_device(opts.device)) as ranks:
        model, settings = _load(opts, ranks.device)
        check_run_settings(out, settings)  # every rank checks before anyone writes
        ranks.barrier()
        _start_folder(out, opts, settings, ranks)
        todo, done, summary = _plan(out, inputs, ranks)
        common = {"model": settings["model"], "model_sha256": settings["model_sha256"],
                  "size": [opts.height, opts.width], "frames": opts.frames, "output": opts.output,
                  "scaling_factor": model.scaling_factor, "shift_factor": model.shift_factor}
        encoder = _BatchEncoder(model, opts, ranks.device, _ShardWriter(out, ranks.rank, opts.shard_mb * 2**20, common),
                                fault_after)
        loader = torch.utils.data.DataLoader(VideoWindows(todo, opts, done), batch_size=None, shuffle=False,
                                             num_workers=opts.num_workers, collate_fn=_one_video,
                                             prefetch_factor=2 if opts.num_workers else None,
                                             worker_init_fn=leave_sigterm_to_main_process)
        bar = TextProgress(f"rank {ranks.rank}" if ranks.world > 1 else "encode", stream=progress_stream)
        start = time.monotonic()

        def report(n: int, eta: str):
            elapsed = time.monotonic() - start
            rate = encoder.encoded / elapsed if elapsed > 0 else 0.0
            bar(n, len(todo), f"videos, {encoder.encoded} clips, {rate:.2f} clips/s{eta}")

        try:
            for n, item in enumerate(loader, 1):
                if item["error"]:
                    append_lines(out / f"errors.rank{ranks.rank}.jsonl",
                                 [{"source": item["name"], "error": item["error"], "reason": item["reason"]}])
                    summary.failed_videos += 1
                for clip in item["clips"]:
                    encoder.add(clip)
                report(n, f", ETA {(time.monotonic() - start) / n * (len(todo) - n):.0f}s")
        except KeyboardInterrupt:
            # Ctrl-C / SIGTERM: the clips encoded so far go to a shard of their own, so a run
            # started again goes on from here; the batch being encoded is done again then.
            bar.close()
            encoder.writer.flush()
            if ranks.world == 1:
                merge(out)
            raise
        encoder.finish()
        report(len(todo), "")  # the final counts, the last batch included
        bar.close()
        summary.encoded = encoder.durable
        summary.seconds = time.monotonic() - start
        ranks.barrier()  # every rank's index is complete before the merge reads it
        if ranks.rank == 0:
            merge(out)
        ranks.barrier()
        return summary
