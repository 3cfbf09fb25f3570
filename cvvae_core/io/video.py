"""Video and image files: read/write MP4 with PyAV, write PNG strips without extra dependencies."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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
    import av

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


def read_video(path, max_frames: int | None = None, height: int | None = None, width: int | None = None,
               stride: int = 1):
    """Frames of ``path`` as uint8 ``[T, H, W, 3]`` and the frame rate. ``stride`` keeps every
    n-th frame; ``max_frames`` counts kept frames. With ``height``/``width`` the frames are scaled
    to cover that size (aspect kept, antialiased) and centre-cropped, in small groups as they are
    decoded, so a long high-resolution video never sits in memory at full size.
    Files that cannot be read raise :class:`~cvvae_core.errors.VideoFileError` saying why."""
    import av

    path = os.fspath(path)  # a string, not a Path: FFmpeg also reads URLs
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise _open_error(path, e) from None
    resized, pending, kept, decoded = [], [], 0, 0

    def resize_pending():
        group = torch.stack(pending)
        resized.append(resize_cover(group, height or group.shape[1], width or group.shape[2])
                       if height or width else group)
        pending.clear()

    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no"]
            raise VideoFileError(f"{path} has no video stream (it holds {', '.join(kinds)} streams); "
                                 "pass a file with video")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 24)
        try:
            for frame in container.decode(stream):
                decoded += 1
                if (decoded - 1) % stride:
                    continue
                pending.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
                kept += 1
                if len(pending) == 16:
                    resize_pending()
                if max_frames is not None and kept >= max_frames:
                    break
        except av.error.FFmpegError as e:
            raise VideoFileError(f"{path} is truncated or corrupt: decoding failed after {decoded} frames "
                                 f"({e.strerror}); get the file again or {_REENCODE}") from None
    if pending:
        resize_pending()
    if not resized:
        raise VideoFileError(f"{path} holds no video frames (its video stream is empty); pass another video")
    return torch.cat(resized), fps


def check_output_path(path) -> Path:
    """``path`` if ``write_video`` can write it, else :class:`VideoFileError` saying what to give
    (checked before hours of work, not after)."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise VideoFileError(f"cannot write {path}: the output video must end in {', '.join(OUTPUT_SUFFIXES)}")
    if path.is_dir():
        raise VideoFileError(f"cannot write {path}: it is a folder; give a file name such as {path / 'out.mp4'}")
    return path


def resize_cover(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [T, height, width, 3]: scale to cover, then centre-crop."""
    t, h, w, _ = video.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    out = []
    for chunk in video.split(16):  # bounded memory for long clips
        x = chunk.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - height) // 2, (nw - width) // 2
        out.append(x[:, :, top:top + height, left:left + width].round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out).permute(0, 2, 3, 1).contiguous()


def write_video(path, frames: torch.Tensor, fps: float = 24.0, crf: int = 18):
    """Write uint8 ``[T, H, W, 3]`` frames as H.264 MP4 (yuv420p, so H and W are made even)."""
    import av

    path = check_output_path(path)
    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for f in frames.numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


def write_png(path, image: torch.Tensor):
    """Write a uint8 ``[H, W, 3]`` image as PNG (zlib + struct only)."""
    arr = np.ascontiguousarray(image.cpu().numpy().astype(np.uint8))
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(png)


def side_by_side_strip(original: torch.Tensor, reconstruction: torch.Tensor, columns: int = 5) -> torch.Tensor:
    """uint8 [T, H, W, 3] pair -> one image: ``columns`` evenly spaced frames, originals on top."""
    idx = torch.linspace(0, original.shape[0] - 1, min(columns, original.shape[0])).round().long()
    top = torch.cat(list(original[idx]), dim=1)
    bottom = torch.cat(list(reconstruction[idx]), dim=1)
    return torch.cat([top, bottom], dim=0)


def to_model_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [1, 3, T, H, W] in [-1, 1] (the official scripts' x / 127.5 - 1)."""
    return frames.permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """float [1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] (clamped, rounded)."""
    return ((video[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()
