"""The compatibility tables of docs/compatibility.md, regenerated: the image decoder on the video latent, per model.

    python bench/bench_compat.py                                    # shipped model, inflated start, ceiling
    python bench/bench_compat.py --noreg runs/cvvae_noreg/checkpoint   # + the no-regularization ablation
    python bench/bench_compat.py --videos ../shared/data/videos     # + windows cut from real clips

The ablation's weights do not ship; make them with (CPU, 1 thread: about 14 min on an idle 2-core CPU):

    python -m cvvae_core train cvvae_core/train_configs/builtin_cvvae_noreg.json --out runs/cvvae_noreg

Rows (every one measured here, on the same clips, with the built-in image VAE as the image decoder):
  shipped            the built-in CV-VAE (or --shipped PATH)
  no regularization  --noreg PATH: the same run with rec2d_weight 0
  inflated start     the built-in image VAE inflated (what training starts from, step 0)
  image VAE          the image VAE on the same frames 4i from its own latents (the ceiling)
  --model LABEL=PATH adds a row (e.g. an experiment's checkpoint)

Clips: generated clips ``synthetic:SEED`` for --seeds (default 0-11), --frames x --size; with
--videos, also --windows windows of --frames frames (every --stride-th frame) per video, evenly
spaced through it (or through --video-part of it), scaled to cover --size and centre-cropped; they
get their own table. Each cell is the mean over clips of ``cvvae_core.train.compatibility.compat_report``
(latent frame i against frame 4i);
"vs start" is that image-decoder PSNR minus the inflated start's, per clip: mean (min .. max);
"vs group mean" compares latent frame i >= 1 with the mean of the 4 frames it stands for instead
(what the official regularization with ``target_type: "random"`` pulls it towards).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cvvae_core.io.image_vae_file import load_image_vae  # noqa: E402
from cvvae_core.io.checkpoint import load_model  # noqa: E402
from cvvae_core.train.compatibility import compat_report, usable_frames  # noqa: E402
from cvvae_core.train.inflate import default_calibration_latents, inflate  # noqa: E402
from cvvae_core.metrics import psnr  # noqa: E402
from cvvae_core.data.synthetic import SyntheticConfig, generate_clip  # noqa: E402
from cvvae_core.data.manifest import VIDEO_SUFFIXES  # noqa: E402
from cvvae_core.io.video import read_video, to_model_range  # noqa: E402

NOREG_COMMAND = ("python -m cvvae_core train cvvae_core/train_configs/builtin_cvvae_noreg.json "
                 "--out runs/cvvae_noreg")


def seed_list(text: str) -> list[int]:
    """'0-11' or '0,3,7' or a mix ('0-3,9')."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def labelled_path(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    return label, path


def fraction_range(text: str) -> tuple[float, float]:
    """'0.6-1' -> (0.6, 1.0): a part of each video, as fractions of its frames."""
    lo, _, hi = text.partition("-")
    lo, hi = float(lo), float(hi or 1)
    if not 0 <= lo < hi <= 1:
        raise argparse.ArgumentTypeError(f"expected FROM-TO with 0 <= FROM < TO <= 1, got {text!r}")
    return lo, hi


def real_windows(folder: Path, windows: int, frames: int, stride: int, size: int,
                 part: tuple[float, float] = (0.0, 1.0)) -> dict[str, torch.Tensor]:
    """``windows`` clips of ``frames`` frames per video in ``folder``, evenly spaced through the
    ``part`` of it (fractions of its frames)."""
    clips = {}
    for video in sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES):
        all_frames = to_model_range(read_video(video, height=size, width=size, stride=stride)[0])
        first, end = (round(f * all_frames.shape[2]) for f in part)
        span = end - first - frames
        if span < 0:
            print(f"skipping {video.name}: {end - first} frames at stride {stride} in part {part} < {frames}",
                  file=sys.stderr)
            continue
        for i in range(windows):
            start = first + round(i * span / max(1, windows - 1))
            clips[f"{video.name}@frame{start * stride}"] = all_frames[:, :, start:start + frames]
    return clips


@torch.no_grad()
def group_mean_psnr(model, image_vae, clip: torch.Tensor) -> float:
    """The image decoder on the video latent against what the latent frame stands for as a whole:
    frame 0 for latent frame 0, the mean of frames 4i-3 .. 4i for latent frame i >= 1."""
    step = model.config.time_compression
    decoded = image_vae.decode_video(model.encode(clip))
    groups = clip[:, :, 1:].unflatten(2, (-1, step)).mean(3)
    return psnr(decoded, torch.cat([clip[:, :, :1], groups], dim=2))


def measure(models: dict, image_vae, clips: dict[str, torch.Tensor]) -> dict:
    """{label: [report per clip]}: compat_report plus ``group_mean_psnr``."""
    results = {}
    for label, model in models.items():
        results[label] = [dict(compat_report(model, image_vae, clip),
                               image_decoder_vs_group_mean_psnr=group_mean_psnr(model, image_vae, clip))
                          for clip in clips.values()]
        print(f"  measured {label}", file=sys.stderr)
    return results


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def table(results: dict, start_label: str) -> str:
    start = [r["image_decoder_psnr"] for r in results[start_label]]
    lines = ["| model | video recon PSNR / SSIM | image decoder on video latent PSNR / SSIM | vs start, dB "
             "| same, vs group mean, PSNR |", "|---|---|---|---|---|"]
    for label, reports in results.items():
        delta = [r["image_decoder_psnr"] - s for r, s in zip(reports, start)]
        vs = "0" if label == start_label else f"{mean(delta):+.2f} ({min(delta):+.2f} .. {max(delta):+.2f})"
        lines.append(f"| {label} | {mean(r['video_recon_psnr'] for r in reports):.2f} / "
                     f"{mean(r['video_recon_ssim'] for r in reports):.3f} | "
                     f"**{mean(r['image_decoder_psnr'] for r in reports):.2f} / "
                     f"{mean(r['image_decoder_ssim'] for r in reports):.3f}** | {vs} | "
                     f"{mean(r['image_decoder_vs_group_mean_psnr'] for r in reports):.2f} |")
    reports = next(iter(results.values()))
    delta = [r["image_vae_psnr"] - s for r, s in zip(reports, start)]
    lines.append(f"| image VAE alone (ceiling) | | {mean(r['image_vae_psnr'] for r in reports):.2f} / "
                 f"{mean(r['image_vae_ssim'] for r in reports):.3f} | {mean(delta):+.2f} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shipped", default="builtin", help="the shipped CV-VAE (default: builtin)")
    p.add_argument("--noreg", help=f"the no-regularization ablation's checkpoint (make it with: {NOREG_COMMAND})")
    p.add_argument("--model", type=labelled_path, action="append", default=[], metavar="LABEL=PATH",
                   help="another CV-VAE row (repeatable)")
    p.add_argument("--seeds", type=seed_list, default=seed_list("0-11"), help="generated clips (default 0-11)")
    p.add_argument("--frames", type=int, default=17, help="frames per clip (1+4k; default 17)")
    p.add_argument("--size", type=int, default=64, help="clip height = width (multiple of 8; default 64)")
    p.add_argument("--videos", type=Path, help="folder of real videos to cut windows from (optional)")
    p.add_argument("--windows", type=int, default=6, help="windows per real video (default 6)")
    p.add_argument("--video-part", type=fraction_range, default=(0.0, 1.0), metavar="FROM-TO",
                   help="cut the windows from this part of each video, as fractions (e.g. 0.6-1: the last 40%%, "
                        "held out from a run trained on the first 60%%; default 0-1)")
    p.add_argument("--stride", type=int, default=2, help="keep every n-th frame of a real video (default 2)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, help="also write every per-clip report here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.time()
    image_vae = load_image_vae("builtin")
    models = {"shipped": load_model("builtin", dtype=torch.float32) if args.shipped == "builtin"
              else load_model(args.shipped, dtype=torch.float32)}
    if args.noreg:
        models["no regularization"] = load_model(args.noreg, dtype=torch.float32)
    for label, path in args.model:
        models[label] = load_model(path, dtype=torch.float32)
    models["inflated start (step 0)"] = inflate(image_vae, default_calibration_latents(image_vae))

    sets = {f"generated clips, seeds {','.join(map(str, args.seeds))}": {
        f"synthetic:{s}": generate_clip(s, SyntheticConfig(frames=args.frames, height=args.size,
                                                           width=args.size)).unsqueeze(0)
        for s in args.seeds}}
    if args.videos:
        part = "" if args.video_part == (0.0, 1.0) else f" (part {args.video_part[0]:g}-{args.video_part[1]:g})"
        sets[f"real windows from {args.videos}{part}"] = real_windows(args.videos, args.windows, args.frames,
                                                                      args.stride, args.size, args.video_part)
    out = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "frames": args.frames, "size": args.size, "sets": {}}
    for name, clips in sets.items():
        clips = {k: usable_frames(v, models["shipped"].config) for k, v in clips.items()}
        print(f"{name}: {len(clips)} clips", file=sys.stderr)
        results = measure(models, image_vae, clips)
        print(f"\n{name} ({len(clips)} clips, {args.frames} frames, {args.size}x{args.size}; "
              f"mean over clips; CPU, {torch.get_num_threads()} threads)\n")
        print(table(results, "inflated start (step 0)"))
        out["sets"][name] = {"clips": list(clips), "reports": results}
    if "no regularization" not in models:
        print(f"\n(no-regularization row: pass --noreg CHECKPOINT; make it with: {NOREG_COMMAND})")
    print(f"\n{time.time() - t0:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
