"""Video and image files: read/write MP4 with PyAV, write PNG strips without extra dependencies."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError


def read_video(path, max_frames: int | None = None, height: int | None = None, width: int | None = None):
    """Frames of ``path`` as uint8 ``[T, H, W, 3]`` and the frame rate. With ``height``/``width``
    the frames are scaled to cover that size (aspect kept, antialiased) and centre-cropped."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise InputError(f"cannot open video {path}: {e}") from None
    with container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 24)
        frames = []
        for frame in container.decode(stream):
            frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise InputError(f"{path} holds no video frames")
    video = torch.stack(frames)
    if height or width:
        video = resize_cover(video, height or video.shape[1], width or video.shape[2])
    return video, fps


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

    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
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
