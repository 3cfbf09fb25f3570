"""The resize filter of the one video reader, measured: FFmpeg's area filter (``frame.reformat``,
in the decode loop) against torch's antialiased bilinear on decoded full-size frames, on real clips.

    python bench/bench_video_read.py ../shared/data/videos/pexels-19216241-1280x720-30fps.mp4

Prints, per target size: seconds to read ``--frames`` frames each way (best of --repeats), the PSNR
between the two results, and the built-in CV-VAE's reconstruction PSNR on each (what the filter
changes for the model's numbers). docs/video_reader.md has the figures and the machine they came from.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import av
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cvvae_core import load_model  # noqa: E402
from cvvae_core.io.video import read_video, to_model_range  # noqa: E402
from cvvae_core.metrics import psnr  # noqa: E402


def torch_bilinear(path: str, frames: int, size: int, stride: int) -> torch.Tensor:
    """Decode at full size, then scale to cover (antialiased bilinear) and centre-crop."""
    out = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for n, frame in enumerate(container.decode(stream)):
            if n % stride == 0:
                out.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
            if len(out) == frames:
                break
    video = torch.stack(out)
    t, h, w, _ = video.shape
    scale = max(size / h, size / w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(video.permute(0, 3, 1, 2).float(), size=(nh, nw), mode="bilinear", antialias=True,
                      align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, :, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def ffmpeg_area(path: str, frames: int, size: int, stride: int) -> torch.Tensor:
    return read_video(path, frames, size, size, stride=stride)[0]


def best_of(fn, repeats: int, *args) -> tuple[float, torch.Tensor]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times), result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="+")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    model = load_model("builtin", dtype=torch.float32)
    print("video | size | torch bilinear s | FFmpeg area s | PSNR between dB | builtin recon dB (bilinear -> area)")
    for video in args.videos:
        for size in args.sizes:
            tb, bilinear = best_of(torch_bilinear, args.repeats, video, args.frames, size, args.stride)
            ta, area = best_of(ffmpeg_area, args.repeats, video, args.frames, size, args.stride)
            between = psnr(to_model_range(area), to_model_range(bilinear))
            with torch.no_grad():
                recon = [psnr(model.decode(model.encode(to_model_range(v))), to_model_range(v)) for v in (bilinear, area)]
            print(f"{Path(video).name} | {size} | {tb:.3f} | {ta:.3f} | {between:.2f} | {recon[0]:.2f} -> {recon[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
