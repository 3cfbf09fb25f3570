"""Video and image files: the one video reader (PyAV: seek, decode, FFmpeg's area filter to
scale, crop) that encoding, training and the command line share; MP4 writing; PNG strips without
extra dependencies; uint8 frames <-> the model's [-1, 1] range."""
from __future__ import annotations

import os
import random
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from ..errors import VideoFileError, VideoNotFoundError

#: Containers ``write_video`` writes (H.264 in MP4, Matroska or QuickTime).
OUTPUT_SUFFIXES = (".mp4", ".mkv", ".mov")

#: The first bytes of common video containers, to tell a damaged video from a file that is no
#: video at all when FFmpeg refuses both with the same "invalid data" error.
_SIGNATURES = {"MP4/MOV": lambda b: b[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"),
               "Matroska/WebM": lambda b: b[:4] == b"\x1aE\xdf\xa3",
               "AVI": lambda b: b[:4] == b"RIFF" and b[8:12] == b"AVI ",
               "MPEG-TS": lambda b: b[:1] == b[188:189] == b"\x47",  # a sync byte every 188-byte packet
               "FLV": lambda b: b[:3] == b"FLV",
               "Ogg": lambda b: b[:4] == b"OggS"}

_REENCODE = "re-encode it (e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`)"


def _container_guess(head: bytes) -> str | None:
    return next((name for name, matches in _SIGNATURES.items() if matches(head)), None)


def _open_error(path: str, err: Exception) -> VideoFileError:
    """The typed error for a video that PyAV cannot open, saying what the file is and what to do
    (PyAV's own message carries FFmpeg's negative error code as an errno, which helps nobody)."""
    if isinstance(err, FileNotFoundError):
        return VideoNotFoundError(f"video file {path} does not exist; check the path")
    if isinstance(err, IsADirectoryError):
        return VideoFileError(f"{path} is a folder; pass one video file")
    if isinstance(err, PermissionError):
        return VideoFileError(f"cannot read {path}: permission denied")
    if isinstance(err, av.error.InvalidDataError) and os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(189)
        if not head:
            return VideoFileError(f"{path} is empty (0 bytes); copy or download the video again")
        container = _container_guess(head)
        if container:
            return VideoFileError(f"{path} looks like a video ({container} container), but PyAV/FFmpeg cannot "
                                  "read it: it is probably truncated or corrupt (an interrupted download or copy?); "
                                  f"get the file again or {_REENCODE}")
        return VideoFileError(f"{path} is not a video file PyAV can read (FFmpeg recognises no video format in it); "
                              "pass a video such as .mp4, .mkv, .mov or .webm")
    reason = getattr(err, "strerror", None) or str(err)
    return VideoFileError(f"cannot open video {path}: {reason}; check that it is a video file PyAV/FFmpeg can read")


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video's first video stream, without decoding it."""

    fps: float
    frames: int
    width: int
    height: int


@dataclass(frozen=True)
class Crop:
    """Scale every frame to ``scaled_height x scaled_width`` with FFmpeg's area filter, then cut
    ``height x width`` at (``top``, ``left``)."""

    scaled_height: int
    scaled_width: int
    top: int
    left: int
    height: int
    width: int

    @classmethod
    def cover(cls, source_height: int, source_width: int, height: int, width: int,
              rng: random.Random | None = None, shorter_side: int | None = None) -> "Crop":
        """Scaled (aspect kept) so the frame covers ``height x width`` (or so its shorter side is
        ``shorter_side``), cut at random with ``rng``, else centred."""
        scale = max(height / source_height, width / source_width)
        if shorter_side is not None:
            scale = shorter_side / min(source_height, source_width)
        sh, sw = max(height, round(source_height * scale)), max(width, round(source_width * scale))
        top = rng.randint(0, sh - height) if rng else (sh - height) // 2
        left = rng.randint(0, sw - width) if rng else (sw - width) // 2
        return cls(sh, sw, top, left, height, width)

    def apply(self, frame: av.VideoFrame) -> torch.Tensor:
        img = frame.reformat(width=self.scaled_width, height=self.scaled_height, format="rgb24",
                             interpolation="AREA").to_ndarray()
        return torch.from_numpy(img[self.top:self.top + self.height, self.left:self.left + self.width])


def _open(path: str) -> av.container.InputContainer:
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise _open_error(path, e) from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no"]
        container.close()
        raise VideoFileError(f"{path} has no video stream (it holds {', '.join(kinds)} streams); pass a file with video")
    return container


def probe_video(path) -> VideoInfo:
    """Frame rate, frame count and size from the container's headers (no decoding; where no header
    gives the count, the packets are counted)."""
    path = os.fspath(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 24.0
        count = stream.frames
        if not count and stream.duration and stream.time_base:
            count = int(stream.duration * stream.time_base * fps)
        if not count and container.duration:
            count = int(container.duration / 1e6 * fps)
        if not count:
            count = sum(1 for p in container.demux(stream) if p.size)
        width, height = stream.codec_context.width, stream.codec_context.height
    if not width or not height:
        raise VideoFileError(f"{path}: the video stream has no frame size; {_REENCODE}")
    return VideoInfo(fps, count, width, height)


def read_frames(path, start: int = 0, count: int | None = None, stride: int = 1, crop: Crop | None = None,
                fps: float | None = None) -> list[torch.Tensor]:
    """Frames ``start, start + stride, ...`` (``count`` of them, or to the end) of ``path``: uint8
    ``[H, W, 3]`` each, through ``crop`` when given (so a long high-resolution video never sits in
    memory at full size). A ``start`` after the first frame seeks (``fps`` turns frame numbers into
    times); where a seek lands past ``start``, decoding restarts from the top. Fewer frames than
    asked come back when the video ends first."""
    path = os.fspath(path)  # a string, not a Path: FFmpeg also reads URLs
    last = None if count is None else start + (count - 1) * stride
    frames = _decode(path, start, last, stride, crop, fps, seek=start > 0)
    if frames is None:
        frames = _decode(path, start, last, stride, crop, fps, seek=False)
    return frames


def _decode(path, start, last, stride, crop, fps, seek) -> list[torch.Tensor] | None:
    """None when a seek landed after ``start`` (the caller then decodes from the top). Frame
    threading stays off: with it FFmpeg reports a truncated file as a short one."""
    out, decoded = [], 0
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = fps or float(stream.average_rate or 24)
        t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        if seek:
            container.seek(int((t0 + start / fps) / stream.time_base), stream=stream, backward=True)
        index = -1
        try:
            for frame in container.decode(stream):
                decoded += 1
                # After a seek only the timestamps say where we are; from the top, counting does.
                index = round((frame.time - t0) * fps) if seek and frame.time is not None else index + 1
                if seek and not out and index > start:
                    return None
                if index >= start and (index - start) % stride == 0:
                    out.append(crop.apply(frame) if crop else torch.from_numpy(frame.to_ndarray(format="rgb24")))
                if last is not None and index >= last:
                    break
        except av.error.FFmpegError as e:
            raise VideoFileError(f"{path} is truncated or corrupt: decoding failed after {decoded} frames "
                                 f"({e.strerror}); get the file again or {_REENCODE}") from None
    return out


def read_video(path, max_frames: int | None = None, height: int | None = None, width: int | None = None,
               stride: int = 1):
    """Frames of ``path`` as uint8 ``[T, H, W, 3]`` and the frame rate. ``stride`` keeps every
    n-th frame; ``max_frames`` counts kept frames. With ``height``/``width`` the frames are scaled
    to cover that size (aspect kept, FFmpeg's area filter) and centre-cropped as they are decoded.
    Files that cannot be read raise :class:`~cvvae_core.errors.VideoFileError` saying why."""
    info = probe_video(path)
    crop = None
    if height or width:
        crop = Crop.cover(info.height, info.width, height or info.height, width or info.width)
    frames = read_frames(path, 0, max_frames, stride, crop, info.fps)
    if not frames:
        raise VideoFileError(f"{path} holds no video frames (its video stream is empty); pass another video")
    return torch.stack(frames), info.fps


def check_output_path(path) -> Path:
    """``path`` if ``write_video`` can write it, else :class:`VideoFileError` saying what to give
    (checked before hours of work, not after)."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise VideoFileError(f"cannot write {path}: the output video must end in {', '.join(OUTPUT_SUFFIXES)}")
    if path.is_dir():
        raise VideoFileError(f"cannot write {path}: it is a folder; give a file name such as {path / 'out.mp4'}")
    return path


def frame_rate(fps: float) -> Fraction:
    """The exact rate behind a float frame rate: 30000/1001 for 29.97, 24 for 24.0 (the NTSC
    rates have denominator 1001)."""
    return Fraction(fps).limit_denominator(1001)


@contextmanager
def _replaced_on_success(path: Path):
    """A temporary name next to ``path`` (same suffix) that replaces ``path`` once the block
    ends without error; on any error or interrupt it is removed and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_video(path, frames: torch.Tensor, fps: float = 24.0, crf: int = 18):
    """Write uint8 ``[T, H, W, 3]`` frames as H.264 MP4 (yuv420p, so H and W are made even) at
    the exact rate of ``fps`` (:func:`frame_rate`). ``path`` appears complete or not at all."""
    path = check_output_path(path)
    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    with _replaced_on_success(path) as tmp, av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=frame_rate(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for f in frames.numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


def write_png(path, image: torch.Tensor):
    """Write a uint8 ``[H, W, 3]`` image as PNG (zlib + struct only); ``path`` appears complete or not at all."""
    arr = np.ascontiguousarray(image.cpu().numpy().astype(np.uint8))
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    with _replaced_on_success(Path(path)) as tmp:
        tmp.write_bytes(png)


def side_by_side_strip(original: torch.Tensor, reconstruction: torch.Tensor, columns: int = 5) -> torch.Tensor:
    """uint8 [T, H, W, 3] pair -> one image: ``columns`` evenly spaced frames, originals on top."""
    idx = torch.linspace(0, original.shape[0] - 1, min(columns, original.shape[0])).round().long()
    top = torch.cat(list(original[idx]), dim=1)
    bottom = torch.cat(list(reconstruction[idx]), dim=1)
    return torch.cat([top, bottom], dim=0)


def to_model_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] (or a batch [B, T, H, W, 3]) -> float [B, 3, T, H, W] in [-1, 1] (the
    official scripts' x / 127.5 - 1)."""
    batch = frames if frames.dim() == 5 else frames.unsqueeze(0)
    return batch.permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """float [1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] (clamped, rounded)."""
    return ((video[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()
