"""Subcommands ``train``, ``inflate``, ``compat`` and ``demo`` of ``python -m cvvae_core``.

``register(subparsers)`` adds them to the main parser; each sets ``func(args) -> int``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train an image VAE or a CV-VAE (latent regularization) from a JSON config")
    p.add_argument("config", help="training config (.json), e.g. cvvae_core/train_configs/builtin_cvvae.json")
    p.add_argument("--out", help="output folder (overrides out_dir)")
    p.add_argument("--steps", type=int, help="total steps (overrides steps)")
    p.add_argument("--image-vae", help="frozen image VAE .safetensors (overrides image_vae)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--restart", action="store_true", help="ignore an existing training_state.pt in the output folder")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("inflate", help="initialise a CV-VAE from an SD-family image VAE (2-D -> 3-D)")
    p.add_argument("image_vae", help="image VAE .safetensors in the LDM layout (prefix first_stage_model./vae. ok)")
    p.add_argument("out", help="output: a .safetensors file or a release folder")
    p.set_defaults(func=cmd_inflate)

    p = subparsers.add_parser("compat", help="the paper's compatibility measure (image decoder on the video latent)")
    p.add_argument("video_ckpt", help="CV-VAE checkpoint (folder or .safetensors), or 'builtin'")
    p.add_argument("image_ckpt", help="image VAE .safetensors, or 'builtin'")
    p.add_argument("clip", help="a video file, or synthetic:SEED for a generated clip")
    p.add_argument("--frames", type=int, default=17, help="frames to read (trimmed to 1+4k; default 17)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize frames to H W")
    p.add_argument("--device", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=cmd_compat)

    p = subparsers.add_parser("demo", help="reconstruct a generated clip with the built-in model and report PSNR/SSIM")
    p.add_argument("--out", default="out/demo", help="folder for the frames (PNG) and metrics.json")
    p.add_argument("--seed", type=int, default=7, help="seed of the generated clip")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"))
    p.set_defaults(func=cmd_demo)


def cmd_train(args) -> int:
    from .training import TrainConfig, train

    cfg = TrainConfig.from_json(args.config)
    if args.out:
        cfg.out_dir = args.out
    if args.steps:
        cfg.steps = args.steps
    if args.image_vae:
        cfg.image_vae = args.image_vae
    out = train(cfg, device=args.device, resume=not args.restart)
    print(f"saved to {out}")
    return 0


def cmd_inflate(args) -> int:
    from .checkpoint import save_model
    from .image_vae import load_image_vae
    from .inflate import default_calibration_latents, inflate, single_frame_gap
    from .synthetic import SyntheticConfig, generate_batch

    image_vae = load_image_vae(args.image_vae)
    model = inflate(image_vae, default_calibration_latents(image_vae))
    out = save_model(model, args.out)
    frames = generate_batch(123, 4, SyntheticConfig(frames=1)).squeeze(2)
    gap = single_frame_gap(model, image_vae, frames)
    print(f"wrote {out}")
    print(f"single frame vs the image VAE: latent max |diff| {gap['latent_max_abs']:.2e} "
          f"(latent max |z| {gap['latent_scale']:.2f}); reconstruction PSNR {gap['recon_psnr_vs_image_vae']:.2f} dB")
    return 0


def _load_pair(video_spec: str, image_spec: str, device):
    from .builtin import load_builtin, load_builtin_image_vae
    from .checkpoint import load_model
    from .image_vae import load_image_vae

    video = load_builtin(device, torch.float32) if video_spec == "builtin" else load_model(video_spec, device, torch.float32)
    image = load_builtin_image_vae(device) if image_spec == "builtin" else load_image_vae(image_spec, device)
    return video, image


def cmd_compat(args) -> int:
    from .compat import compat_report, format_report, load_clip

    video_vae, image_vae = _load_pair(args.video_ckpt, args.image_ckpt, args.device)
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
    from .builtin import builtin_path, load_builtin, load_builtin_image_vae
    from .compat import compat_report, format_report
    from .synthetic import SyntheticConfig, generate_clip
    from .video_io import write_png

    model, image_vae = load_builtin(dtype=torch.float32), load_builtin_image_vae()
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
