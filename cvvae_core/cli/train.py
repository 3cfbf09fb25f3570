"""Subcommands ``train``, ``plot``, ``inflate``, ``compat`` and ``demo`` of ``python -m cvvae_core``.

``register(subparsers)`` adds them to the main parser; each sets ``func(args) -> int``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ..devices import resolve_device
from .args import device_name, int_at_least
from ..spec import IMAGE_FAMILIES, family_of
from ..errors import CVVAEError, UnknownImageFamilyError

FAMILY_HELP = ("the image VAE's family, for its latent scale/shift: needed for an SDXL or FLUX.1 VAE file without "
               "a config (their shapes are those of SD1.x and SD3); default: from the file, else sd1 for 4 "
               "latent channels and sd3 for 16")

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
    p = subparsers.add_parser("train", help="train an image VAE or a CV-VAE (latent regularization) from a JSON config; "
                                            "under torchrun: data-parallel over the ranks")
    p.add_argument("config", help="training config (.json), e.g. cvvae_core/train_configs/builtin_cvvae.json")
    p.add_argument("--out", help="output folder (overrides out_dir)")
    p.add_argument("--steps", type=int_at_least(1), help="total steps (overrides steps)")
    p.add_argument("--image-vae", help="frozen image VAE .safetensors (overrides image_vae)")
    p.add_argument("--family", choices=sorted(IMAGE_FAMILIES), help=FAMILY_HELP + " (overrides image_vae_family)")
    p.add_argument("--device", type=device_name, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--restart", action="store_true", help="ignore an existing training_state.pt in the output folder")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("plot", help="draw a training run's loss and validation curves (RUN_DIR/curves.png)")
    p.add_argument("run_dir", help="the run's output folder (holds log.jsonl)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(func=cmd_plot)

    p = subparsers.add_parser("inflate", help="initialise a CV-VAE from an SD-family image VAE (2-D -> 3-D)")
    p.add_argument("image_vae", help="image VAE: .safetensors in the LDM layout (prefix first_stage_model./vae. ok) "
                                     "or the diffusers layout, a diffusers VAE folder, or 'builtin'")
    p.add_argument("out", help="output: a .safetensors file or a release folder")
    p.add_argument("--family", choices=sorted(IMAGE_FAMILIES), help=FAMILY_HELP)
    p.set_defaults(func=cmd_inflate)

    p = subparsers.add_parser("compat", help="the paper's compatibility measure (image decoder on the video latent)")
    p.add_argument("video_ckpt", help="CV-VAE checkpoint (folder or .safetensors), or 'builtin'")
    p.add_argument("image_ckpt", help="image VAE .safetensors, or 'builtin'")
    p.add_argument("clip", type=clip_spec, help="a video file, or synthetic:SEED for a generated clip")
    p.add_argument("--frames", type=int_at_least(MIN_CLIP_FRAMES), default=17,
                   help=f"frames to read, at least {MIN_CLIP_FRAMES} (trimmed to 1+4k; default 17)")
    p.add_argument("--size", type=int_at_least(8, multiple_of=8), nargs=2, metavar=("H", "W"),
                   help="resize frames to H W (multiples of 8)")
    p.add_argument("--device", type=device_name, help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=cmd_compat)

    p = subparsers.add_parser("demo", help="reconstruct a generated clip with the built-in model and report PSNR/SSIM")
    p.add_argument("--out", default="out/demo", help="folder for the frames (PNG) and metrics.json")
    p.add_argument("--seed", type=int_at_least(0), default=7, help="seed of the generated clip (>= 0)")
    p.add_argument("--frames", type=int_at_least(MIN_CLIP_FRAMES), default=17,
                   help=f"frames, at least {MIN_CLIP_FRAMES} (trimmed to 1+4k; default 17)")
    p.add_argument("--size", type=int_at_least(8, multiple_of=8), nargs=2, default=(64, 64), metavar=("H", "W"),
                   help="frame size H W (multiples of 8; default 64 64)")
    p.set_defaults(func=cmd_demo)


def cmd_train(args) -> int:
    from ..train.config import TrainConfig
    from ..train.run import train

    cfg = TrainConfig.from_json(args.config, {"out_dir": args.out, "steps": args.steps, "image_vae": args.image_vae,
                                              "image_vae_family": args.family})
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        out = train(cfg, device=resolve_device(args.device) if args.device else None, resume=not args.restart)
        print(f"saved to {out}")
        return 0
    # A rank of a torchrun group: the group is joined in train(). Exit without tearing it down:
    # gloo (torch 2.13) can abort with SIGABRT at teardown while a peer exits.
    code = 0
    try:
        out = train(cfg, device=resolve_device(args.device) if args.device else None, resume=not args.restart)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"saved to {out}")
    except CVVAEError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_plot(args) -> int:
    from ..train.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def load_image_vae_arg(spec: str, device=None, family: str | None = None):
    """The image VAE named on the command line: 'builtin' (the built-in image VAE, whose latent
    space the built-in CV-VAE shares) or a file; a CV-VAE file is refused with what to give."""
    from ..io.image_vae_file import load_image_vae

    return load_image_vae(spec, device, family=family)


def cmd_inflate(args) -> int:
    from ..io.checkpoint import save_model
    from ..io.image_vae_file import image_family
    from ..train.inflate import default_calibration_latents, inflate, single_frame_gap
    from ..data.synthetic import SyntheticConfig, generate_batch

    if args.family and args.image_vae == "builtin":
        raise UnknownImageFamilyError("--family is for an image VAE file; the built-in image VAE has its own "
                                      "latent space (drop --family)")
    image_vae = load_image_vae_arg(args.image_vae, family=args.family)
    cfg = image_vae.config
    print(f"image VAE: {cfg.latent_channels} latent channels, widths {list(cfg.level_channels)}, "
          f"{'with' if cfg.quant_conv else 'no'} quant convs; family {image_family(cfg)}")
    same_shapes = {"sd1": "sdxl", "sd3": "flux"}.get(family_of(cfg.scaling_factor, cfg.shift_factor))
    if args.family is None and same_shapes:
        print(f"  (a {IMAGE_FAMILIES[same_shapes].description} has the same shapes: if it is one, "
              f"pass --family {same_shapes})")
    model = inflate(image_vae, default_calibration_latents(image_vae))
    out = save_model(model, args.out)
    frames = generate_batch(123, 4, SyntheticConfig(frames=1)).squeeze(2)
    gap = single_frame_gap(model, image_vae, frames)
    print(f"wrote {out} (latent scale/shift recorded in its metadata: {model.config.latent_space})")
    print(f"single frame vs the image VAE: latent max |diff| {gap['latent_max_abs']:.2e} "
          f"(latent max |z| {gap['latent_scale']:.2f}); reconstruction PSNR {gap['recon_psnr_vs_image_vae']:.2f} dB")
    return 0


def cmd_compat(args) -> int:
    from ..io.checkpoint import load_model
    from ..train.compatibility import compat_report, format_report, load_clip

    device = resolve_device(args.device) if args.device else None
    video_vae = load_model(args.video_ckpt, device, torch.float32)
    image_vae = load_image_vae_arg(args.image_ckpt, device)
    clip = load_clip(args.clip, args.frames, tuple(args.size) if args.size else None)
    report = compat_report(video_vae, image_vae, clip)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def clip_strip(video: torch.Tensor) -> torch.Tensor:
    """A ``[3, T, H, W]`` clip in [-1, 1] as one uint8 ``[H, T*W, 3]`` image, frames side by side."""
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().byte()
    c, t, h, w = frames.shape
    return frames.permute(2, 1, 3, 0).reshape(h, t * w, c)


def cmd_demo(args) -> int:
    from ..io.builtin import builtin_path
    from ..io.checkpoint import load_model
    from ..io.image_vae_file import load_image_vae
    from ..train.compatibility import compat_report, format_report
    from ..data.synthetic import SyntheticConfig, generate_clip
    from ..io.video import write_png

    model, image_vae = load_model("builtin", dtype=torch.float32), load_image_vae("builtin")
    h, w = args.size
    clip = generate_clip(args.seed, SyntheticConfig(frames=args.frames, height=h, width=w)).unsqueeze(0)
    report = compat_report(model, image_vae, clip)
    clip = clip[:, :, : report["frames"]]
    latent = model.encode(clip)
    out = Path(args.out)
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
