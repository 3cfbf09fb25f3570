"""Subcommands ``inflate``, ``compat`` and ``demo``: a CV-VAE from an image VAE, the paper's
compatibility measure, and a first run on a generated clip."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..data.synthetic import SyntheticConfig, generate_batch, generate_clip
from ..devices import resolve_device
from ..errors import CheckpointError, OutputPathError, UnknownImageFamilyError, VideoFileError
from ..io.builtin import builtin_path
from ..io.checkpoint import WEIGHTS_NAME, load_model, save_model
from ..io.image_vae_file import image_family, load_image_vae
from ..io.video import read_video, to_model_range, to_uint8, write_png
from ..model.frames import conform
from ..spec import IMAGE_FAMILIES, family_of, same_shape_twins
from ..train.compatibility import compat_report, format_report, load_clip
from ..train.inflate import default_calibration_latents, inflate, single_frame_gap
from .args import SIZE_RULE, argument_errors, describe_crop, device_name, frame_count, int_at_least, size_hw
from .outputs import OVERWRITE_HELP, check_output_folder, check_outputs, same_path
from .train import FAMILY_HELP

#: The files ``demo`` writes into its folder.
DEMO_FILES = ("input.png", "reconstruction.png", "image_decoder.png", "metrics.json")

#: The compatibility measure and the demo need at least one latent step: 1+4k frames, k >= 1.
MIN_CLIP_FRAMES = 5


def clip_spec(text: str) -> str:
    """An argparse ``type``: a video path, or ``synthetic:SEED`` with an integer seed >= 0."""
    if text.startswith("synthetic"):
        seed = text.partition(":")[2] or "0"
        if not seed.isdigit():
            raise argparse.ArgumentTypeError(f"a generated clip is synthetic:SEED with an integer SEED >= 0, "
                                             f"got {text!r}")
    return text


def register(subparsers) -> None:
    p = subparsers.add_parser("inflate", help="initialise a CV-VAE from an SD-family image VAE (2-D -> 3-D)")
    p.add_argument("image_vae", help="image VAE: .safetensors in the LDM layout (prefix first_stage_model./vae. ok) "
                                     "or the diffusers layout, a diffusers VAE folder, or 'builtin'")
    p.add_argument("out", help="output: a .safetensors file, or a release folder (a name without suffix)")
    p.add_argument("--family", choices=sorted(IMAGE_FAMILIES), help=FAMILY_HELP)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_inflate)

    p = subparsers.add_parser("compat", help="the paper's compatibility measure (image decoder on the video latent)",
                              epilog=SIZE_RULE)
    p.add_argument("video_ckpt", help="CV-VAE checkpoint (folder or .safetensors), or 'builtin'")
    p.add_argument("image_ckpt", help="image VAE .safetensors, or 'builtin'")
    p.add_argument("clip", type=clip_spec, help="a video file, or synthetic:SEED for a generated clip")
    p.add_argument("--frames", type=frame_count(MIN_CLIP_FRAMES), metavar="N", default=17,
                   help=f"frames to read, 1+4k, at least {MIN_CLIP_FRAMES} (default 17)")
    p.add_argument("--size", type=size_hw, metavar="HxW",
                   help="resize to HxW, multiples of 8, e.g. 64x64 (default: a video's own size cropped to "
                        "multiples of 8; 64x64 for synthetic:SEED)")
    p.add_argument("--device", type=device_name, help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=cmd_compat)

    p = subparsers.add_parser("demo", help="reconstruct a generated clip with the built-in model and report PSNR/SSIM",
                              epilog=SIZE_RULE)
    p.add_argument("--out", default="out/demo", help="folder for the frames (PNG) and metrics.json (default: out/demo)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier demo in --out")
    p.add_argument("--seed", type=int_at_least(0), default=7, help="seed of the generated clip (>= 0)")
    p.add_argument("--frames", type=frame_count(MIN_CLIP_FRAMES), metavar="N", default=17,
                   help=f"frames, 1+4k, at least {MIN_CLIP_FRAMES} (default 17)")
    p.add_argument("--size", type=size_hw, metavar="HxW", default=(64, 64),
                   help="frame size HxW, multiples of 8 (default 64x64)")
    p.set_defaults(func=cmd_demo)


def load_image_vae_arg(name: str, spec: str, device=None, family: str | None = None):
    """The image VAE named by argument ``name``: 'builtin' (the built-in image VAE, whose latent
    space the built-in CV-VAE shares) or a file; a CV-VAE file is refused with what to give."""
    with argument_errors(name, spec, CheckpointError, role=f"{name} is the image VAE"):
        return load_image_vae(spec, device, family=family)


def cmd_inflate(args) -> int:
    if args.family and args.image_vae == "builtin":
        raise UnknownImageFamilyError("--family is for an image VAE file; the built-in image VAE has its own "
                                      "latent space (drop --family)")
    check_inflate_output(args)
    image_vae = load_image_vae_arg("image_vae", args.image_vae, family=args.family)
    cfg = image_vae.config
    print(f"image VAE: {cfg.latent_channels} latent channels, widths {list(cfg.level_channels)}, "
          f"{'with' if cfg.quant_conv else 'no'} quant convs; family {image_family(cfg)}")
    family = family_of(cfg.scaling_factor, cfg.shift_factor)
    if args.family is None and family is not None and IMAGE_FAMILIES[family].assumed:
        for twin in same_shape_twins(family):
            print(f"  (a {twin.description} has the same shapes: if it is one, pass --family {twin.name})")
    model = inflate(image_vae, default_calibration_latents(image_vae))
    out = save_model(model, args.out)
    frames = generate_batch(123, 4, SyntheticConfig(frames=1)).squeeze(2)
    gap = single_frame_gap(model, image_vae, frames)
    print(f"wrote {out} (latent scale/shift recorded in its metadata: {model.config.latent_space})")
    print(f"single frame vs the image VAE: latent max |diff| {gap['latent_max_abs']:.2e} "
          f"(latent max |z| {gap['latent_scale']:.2f}); reconstruction PSNR {gap['recon_psnr_vs_image_vae']:.2f} dB")
    return 0


def check_inflate_output(args):
    """``inflate``'s output: a .safetensors file, or a folder (no suffix) for the release layout."""
    out = Path(args.out)
    if out.suffix and out.suffix.lower() != ".safetensors":
        raise OutputPathError(f"argument out: {out} must end in .safetensors, or be a folder name without suffix "
                              "(the release layout)")
    if out.suffix:
        check_outputs({"out": out}, {"image_vae": args.image_vae}, args.overwrite)
    else:
        if out.exists() and not out.is_dir():
            raise OutputPathError(f"argument out: {out} is a file; give a folder name or a .safetensors file")
        if same_path(out, args.image_vae):
            raise OutputPathError(f"argument out: {out} is the image_vae argument; give another output folder")
        check_output_folder("out", out, ["config.json", WEIGHTS_NAME], args.overwrite)


def cmd_compat(args) -> int:
    device = resolve_device(args.device) if args.device else None
    with argument_errors("video_ckpt", args.video_ckpt, CheckpointError,
                         role="the first argument is the CV-VAE, then the image VAE, then the clip"):
        video_vae = load_model(args.video_ckpt, device, torch.float32)
    image_vae = load_image_vae_arg("image_ckpt", args.image_ckpt, device)
    if args.clip.startswith("synthetic"):
        clip = load_clip(args.clip, args.frames, args.size)  # generated at a valid size and length
    else:
        h, w = args.size or (None, None)
        with argument_errors("clip", args.clip, VideoFileError):
            frames, _ = read_video(args.clip, max_frames=args.frames, height=h, width=w)
        clip, adjustment = conform(to_model_range(frames), video_vae.config, "trim")
        if cropped := describe_crop(adjustment, video_vae.config):
            print(cropped, file=sys.stderr if args.json else sys.stdout)  # --json: stdout is the JSON alone
    report = compat_report(video_vae, image_vae, clip)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def clip_strip(video: torch.Tensor) -> torch.Tensor:
    """A ``[3, T, H, W]`` clip in [-1, 1] as one uint8 ``[H, T*W, 3]`` image, frames side by side."""
    frames = to_uint8(video.unsqueeze(0))  # [T, H, W, 3]
    t, h, w, c = frames.shape
    return frames.permute(1, 0, 2, 3).reshape(h, t * w, c)


def cmd_demo(args) -> int:
    out = Path(args.out)
    check_output_folder("--out", out, list(DEMO_FILES), args.overwrite)
    model, image_vae = load_model("builtin", dtype=torch.float32), load_image_vae("builtin")
    h, w = args.size
    clip = generate_clip(args.seed, SyntheticConfig(frames=args.frames, height=h, width=w)).unsqueeze(0)
    report = compat_report(model, image_vae, clip)
    latent = model.encode(clip)
    out.mkdir(parents=True, exist_ok=True)
    write_png(out / "input.png", clip_strip(clip[0]))
    write_png(out / "reconstruction.png", clip_strip(model.decode(latent)[0]))
    write_png(out / "image_decoder.png", clip_strip(image_vae.decode_video(latent)[0]))
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    print(f"built-in model {builtin_path().name}: generated clip seed {args.seed}")
    print(format_report(report))
    print(f"wrote {out}/input.png, reconstruction.png, image_decoder.png (latent frame i decoded by the image "
          "decoder), metrics.json")
    return 0
