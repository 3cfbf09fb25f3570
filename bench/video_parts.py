"""Small copies of a part of each video: training data that decodes fast, with a held-out rest.

    python bench/video_parts.py ../shared/data/videos runs/real_train --part 0-0.6 --height 64

Writes OUT/NAME.mp4 for every video in SRC: the frames in the ``--part`` of it (fractions of its
frames; 0-0.6 is the first 60%), scaled to ``--height`` (aspect kept, width made even), H.264 at
``--crf`` (default 12, near lossless at this size), the source frame rate. Decoding a 720p video for
every 64x64 training sample is what makes real-video training slow on a CPU; the copy is the same
picture at the scale the crops are taken at. ``bench/bench_compat.py --video-part 0.6-1`` then
measures on windows of the part no run trained on.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compat import fraction_range  # noqa: E402
from cvvae_core.data.manifest import VIDEO_SUFFIXES  # noqa: E402
from cvvae_core.io.video import read_video, write_video  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="folder of videos")
    p.add_argument("out", type=Path, help="folder for the copies")
    p.add_argument("--part", type=fraction_range, default=(0.0, 1.0), metavar="FROM-TO",
                   help="fractions of each video's frames (default 0-1)")
    p.add_argument("--height", type=int, default=64, help="height of the copies (default 64)")
    p.add_argument("--crf", type=int, default=12, help="H.264 quality, lower is better (default 12)")
    args = p.parse_args(argv)
    lo, hi = args.part
    for video in sorted(v for v in args.src.iterdir() if v.suffix.lower() in VIDEO_SUFFIXES):
        with av.open(str(video)) as container:
            codec = container.streams.video[0].codec_context
            width = round(codec.width * args.height / codec.height / 2) * 2
        frames, fps = read_video(video, height=args.height, width=width)
        first, end = round(lo * len(frames)), round(hi * len(frames))
        write_video(args.out / f"{video.stem}.mp4", frames[first:end], fps=fps, crf=args.crf)
        print(f"{video.name}: frames {first}..{end - 1} of {len(frames)} -> {args.out / video.stem}.mp4 "
              f"({width}x{args.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
