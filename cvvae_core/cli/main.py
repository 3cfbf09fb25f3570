"""Command line: ``python -m cvvae_core {info,reconstruct,...}``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from ..devices import DTYPES, resolve_device, resolve_dtype
from .args import device_name, int_at_least
from ..errors import CVVAEError, DistributedRunError, InputError

def cmd_info(args) -> int:
    from ..io.checkpoint import build_model, read_state_dict

    sd, hints = read_state_dict(args.checkpoint, allow_pickle=args.allow_pickle)
    file_dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
    model = build_model(sd, hints, source=Path(args.checkpoint).name, dtype=torch.float32)  # raises on bad keys
    cfg = model.config
    info = {
        "variant": cfg.variant,
        "layout": {"sd": "the vae3d / vae3d_v1-1 key layout", "sd3": "the vae3d_sd3 key layout"}[cfg.variant],
        "latent_space": cfg.latent_space,
        "latent_channels": cfg.latent_channels,
        "compression": f"{cfg.time_compression}x time, {cfg.spatial_compression}x space",
        "config": cfg.to_dict(),
        "parameters": sum(v.numel() for v in sd.values()),
        "tensors": len(sd),
        "file_dtype": file_dtypes,
        "keys": "ok: every key present with the expected shape",
        "latent_scaling": {"scale": cfg.scaling_factor, "shift": cfg.shift_factor,
                           "note": "metadata only; encode/decode use raw latents"},
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:16s} {v}")
    return 0


def cmd_reconstruct(args) -> int:
    if not args.distributed:
        return _reconstruct(args, rank=0)
    from ..distributed import TileGroup, join_ranks

    if args.tiling != "seamless":
        raise InputError(f"--distributed shares the seamless engine's tiles; it does not apply to --tiling {args.tiling}")
    ranks = join_ranks(resolve_device(args.device))
    args.device = str(ranks.device)
    try:
        code = _reconstruct(args, ranks.rank, TileGroup.of(True))
    except DistributedRunError as e:
        if not ranks.owns_group:
            raise
        # Every rank got this error. Exit at once: gloo (torch 2.13) can abort with SIGABRT
        # ("terminate called without an active exception") tearing down while a peer exits.
        print(f"error: {e}", file=sys.stderr)
        code = 2
    else:
        if not ranks.owns_group:
            return code
        ranks.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # see above: no interpreter finalization with gloo's threads around


def _reconstruct(args, rank: int, group=None) -> int:
    """Every rank computes (sharing tiles when ``--distributed``); rank 0 alone prints and writes.
    With a ``group`` (:class:`~cvvae_core.distributed.TileGroup`), a failure on any rank, before,
    in or after the engine, stops every rank with DistributedRunError."""
    from ..io.checkpoint import load_model
    from ..progress import TextProgress
    from ..tiling.runner import TilingOptions
    from ..io.video import check_output_path, read_video, to_model_range

    def guarded(fn):
        if group is None:
            return fn()
        result = group.run(fn)
        group.check()
        return result

    def prepare():
        check_output_path(args.output)  # before minutes of work, not after
        model = load_model(args.checkpoint, device=device,
                           dtype=resolve_dtype(args.dtype), allow_pickle=args.allow_pickle)
        frames, fps = read_video(args.input, max_frames=args.frames, height=args.height, width=args.width)
        return model, frames, fps

    device = resolve_device(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    model, frames, fps = guarded(prepare)
    video = to_model_range(frames)
    say(f"model    {model.variant}, {model.latent_channels} latent channels, {model.dtype}, {device}")
    say(f"input    {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]} at {fps:.2f} fps")
    start = time.monotonic()

    def tiling(label: str) -> TilingOptions | None:
        if args.tiling == "none":
            return None  # untiled: the whole clip at once
        return TilingOptions(mode=args.tiling, tile_size=args.tile_size, chunk_frames=args.chunk_frames,
                             progress=TextProgress(label, percent=True) if rank == 0 else None,
                             distributed=args.distributed)
    enc = model.encode_framed(video, frame_policy="trim", tiling=tiling("encode"))
    if enc.adjustment.changed:
        a = enc.adjustment
        say(f"trimmed  {a.trimmed_frames} trailing frames, {a.trimmed_height} rows, {a.trimmed_width} columns "
              "(CV-VAE takes 1+4k frames, sizes in multiples of 8)")
    t, h, w = enc.latent.shape[2:]
    recon = model.decode(enc, tiling=tiling("decode"))
    seconds = time.monotonic() - start
    if rank == 0:
        guarded(lambda: _write_outputs(args, frames, fps, video, enc, recon, seconds))
    else:
        guarded(lambda: None)  # waits for rank 0's writing; stops with it if that fails
    return 0


def _write_outputs(args, frames, fps, video, enc, recon, seconds):
    from .. import metrics
    from ..io.video import side_by_side_strip, to_uint8, write_png, write_video

    target = video[:, :, : recon.shape[2], : recon.shape[3], : recon.shape[4]]
    out_frames = to_uint8(recon)
    write_video(args.output, out_frames, fps)
    strip = Path(args.strip) if args.strip else Path(args.output).with_suffix(".png")
    write_png(strip, side_by_side_strip(frames[: out_frames.shape[0], : out_frames.shape[1], : out_frames.shape[2]],
                                        out_frames))
    print(f"latent   {list(enc.latent.shape)}")
    print(f"time     {seconds:.1f}s ({recon.shape[2] / seconds:.2f} frames/s)")
    print(f"PSNR     {metrics.psnr(recon, target):.2f} dB")
    print(f"SSIM     {metrics.ssim(recon, target):.4f}")
    print(f"wrote    {args.output} and {strip} (top: input, bottom: reconstruction)")


def build_parser(prog: str = "cvvae") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="CV-VAE video autoencoder tools")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="describe a checkpoint: variant, config, parameters, key check")
    p.add_argument("checkpoint", help="release folder, its parent, a .safetensors file, or 'builtin'")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--allow-pickle", action="store_true", help="also read .ckpt/.pt/.bin (weights_only=True)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("reconstruct", help="encode and decode a video; print PSNR/SSIM; write MP4 + PNG strip")
    p.add_argument("checkpoint", help="release folder, its parent, a .safetensors file, or 'builtin'")
    p.add_argument("input", help="input video (anything FFmpeg reads)")
    p.add_argument("output", help="output .mp4 (or .mkv, .mov)")
    p.add_argument("--height", type=int_at_least(8), help="resize (cover + centre crop) to this height (>= 8)")
    p.add_argument("--width", type=int_at_least(8), help="resize (cover + centre crop) to this width (>= 8)")
    p.add_argument("--frames", type=int_at_least(1), help="read at most this many frames (then trimmed to 1+4k)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: fp32 on CPU, bf16/fp16 on CUDA")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--tiling", choices=["seamless", "official", "none"], default="seamless")
    p.add_argument("--tile-size", type=int_at_least(8, multiple_of=8),
                   help="spatial tile in pixels, a multiple of 8 (default: from free memory)")
    p.add_argument("--chunk-frames", type=int_at_least(1), help="frames per time chunk (default: automatic)")
    p.add_argument("--strip", help="side-by-side PNG path (default: OUTPUT with .png)")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--distributed", action="store_true",
                   help="under torchrun: share the seamless tiles of the clip among the ranks (rank 0 writes)")
    p.set_defaults(func=cmd_reconstruct)

    from . import dataset as cli_dataset
    from . import train as cli_train  # train, inflate, compat, demo; encode-dataset, merge

    cli_train.register(sub)
    cli_dataset.register(sub)
    return parser


def main(argv=None, prog: str = "cvvae") -> int:
    """The ``cvvae`` command; ``python -m cvvae_core`` calls it with its own name for usage lines."""
    args = build_parser(prog).parse_args(argv)
    try:
        return args.func(args)
    except CVVAEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # The file system refused (permissions, a full disk, a file where a folder must go): the
        # message names the path, and the fix is the user's, so no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
