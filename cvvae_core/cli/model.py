"""Subcommands ``info`` and ``reconstruct``: one checkpoint, one video."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from .. import metrics
from ..devices import DTYPES, resolve_device, resolve_dtype
from ..distributed import TileGroup, join_ranks
from ..errors import (CheckpointError, DistributedRunError, InputError, MemoryBudgetError, OutOfMemoryError,
                      OutputPathError, VideoFileError)
from ..io.checkpoint import build_model, load_model, read_state_dict
from ..io.video import (check_output_path, read_video, side_by_side_strip, to_model_range, to_uint8, write_png,
                        write_video)
from ..progress import TextProgress
from ..tiling import TilingOptions
from .args import (argument_errors, describe_crop, device_name, existing_folder, frame_count, int_at_least,
                   side, size_hw, size_rule)
from .outputs import OVERWRITE_HELP, check_outputs

CHECKPOINT_HELP = "release folder, its parent, a .safetensors file, or 'builtin'"
DISK_DIR_HELP = ("an existing folder for layer outputs that fit neither device nor host memory (memory-mapped "
                 "files, removed after the pass); without it such a clip is refused before any work")
CHECKPOINT_FIRST = "the first argument is the checkpoint, the input video comes second"


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="describe a checkpoint: variant, config, parameters, key check")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--allow-pickle", action="store_true", help="also read .ckpt/.pt/.bin (weights_only=True)")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser("reconstruct", help="encode and decode a video; print PSNR/SSIM; write MP4 + PNG strip",
                              epilog=size_rule("--size, --height, --width or --frames"))
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("input", help="input video (anything FFmpeg reads)")
    p.add_argument("output", help="output .mp4 (or .mkv, .mov)")
    p.add_argument("--size", type=size_hw, metavar="HxW",
                   help="resize to HxW (cover + centre crop), multiples of 8, e.g. 576x1024 (default: the "
                        "video's own size, cropped to multiples of 8)")
    p.add_argument("--height", type=side, metavar="H", help="the H of --size alone (the width stays the video's)")
    p.add_argument("--width", type=side, metavar="W", help="the W of --size alone (the height stays the video's)")
    p.add_argument("--frames", type=frame_count(), metavar="N",
                   help="frames to read, 1+4k (default: all, cropped to 1+4k)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: fp32 on CPU, bf16/fp16 on CUDA")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--tiling", choices=["seamless", "official", "none"], default="seamless",
                   help="seamless (default): pieces sized to free memory, equal to untiled; official: the release's "
                        "tiles and blending; none: the whole clip at once")
    p.add_argument("--tile-size", type=int_at_least(8, multiple_of=8),
                   help="spatial tile in pixels, a multiple of 8 (default: from free memory)")
    p.add_argument("--chunk-frames", type=int_at_least(1), help="frames per time chunk (default: automatic)")
    p.add_argument("--disk-dir", type=existing_folder, metavar="DIR", help=DISK_DIR_HELP)
    p.add_argument("--strip", metavar="PNG", help="side-by-side .png path (default: OUTPUT with .png)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--allow-pickle", action="store_true", help="also read .ckpt/.pt/.bin (weights_only=True)")
    p.add_argument("--distributed", action="store_true",
                   help="under torchrun: share the seamless tiles of the clip among the ranks (rank 0 writes)")
    p.set_defaults(func=cmd_reconstruct, interrupted=reconstruct_interrupted)


def cmd_info(args) -> int:
    with argument_errors("checkpoint", args.checkpoint, CheckpointError, pickle_flag=True,
                         role="to reconstruct a video: reconstruct CHECKPOINT INPUT OUTPUT"):
        sd, hints = read_state_dict(args.checkpoint, allow_pickle=args.allow_pickle)
        model = build_model(sd, hints, source=Path(args.checkpoint).name, dtype=torch.float32)  # raises on bad keys
    file_dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
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
    if args.size and (args.height or args.width):
        raise InputError("give the size once: --size HxW, or the older --height/--width")
    if args.size:
        args.height, args.width = args.size
    if not args.distributed:
        return _reconstruct(args, rank=0)
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
    def guarded(fn):
        if group is None:
            return fn()
        result = group.run(fn)
        group.check()
        return result

    def prepare():
        with argument_errors("output", args.output, VideoFileError):
            check_output_path(args.output)  # before minutes of work, not after
        check_outputs({"output": Path(args.output), "--strip": strip_path(args)},
                      {"checkpoint": args.checkpoint, "input": args.input}, args.overwrite)
        with argument_errors("checkpoint", args.checkpoint, CheckpointError, pickle_flag=True, role=CHECKPOINT_FIRST):
            model = load_model(args.checkpoint, device=device,
                               dtype=resolve_dtype(args.dtype), allow_pickle=args.allow_pickle)
        with argument_errors("input", args.input, VideoFileError):
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
                             distributed=args.distributed, disk_dir=args.disk_dir)
    try:
        enc = model.encode_framed(video, frame_policy="trim", tiling=tiling("encode"))
        if cropped := describe_crop(enc.adjustment, model.config):
            say(cropped)
        recon = model.decode(enc, tiling=tiling("decode"))
    except (OutOfMemoryError, torch.OutOfMemoryError):
        raise OutOfMemoryError(out_of_memory_advice(args.tiling)) from None
    except MemoryBudgetError as e:
        raise budget_advice(e) from None
    seconds = time.monotonic() - start
    if rank == 0:
        guarded(lambda: _write_outputs(args, frames, fps, video, enc, recon, seconds))
    else:
        guarded(lambda: None)  # waits for rank 0's writing; stops with it if that fails
    return 0


def _write_outputs(args, frames, fps, video, enc, recon, seconds):
    print(f"latent   {list(enc.latent.shape)}")
    print(f"time     {seconds:.1f}s encode+decode ({recon.shape[2] / seconds:.2f} frames/s)")
    start = time.monotonic()
    target = video[:, :, : recon.shape[2], : recon.shape[3], : recon.shape[4]]
    print(f"PSNR     {metrics.psnr(recon, target):.2f} dB")
    print(f"SSIM     {metrics.ssim(recon, target):.4f}")
    metrics_seconds, start = time.monotonic() - start, time.monotonic()
    out_frames = to_uint8(recon)
    strip = strip_path(args)
    try:
        write_video(args.output, out_frames, fps)
        write_png(strip, side_by_side_strip(frames[: out_frames.shape[0], : out_frames.shape[1],
                                                   : out_frames.shape[2]], out_frames))
    except KeyboardInterrupt:
        for path in (Path(args.output), strip):  # a half-written file is no result: keep none
            path.unlink(missing_ok=True)
        raise
    print(f"time     {metrics_seconds:.1f}s PSNR+SSIM, {time.monotonic() - start:.1f}s writing")
    print(f"wrote    {args.output} and {strip} (top: input, bottom: reconstruction)")


def strip_path(args) -> Path:
    """The side-by-side PNG of ``reconstruct``: ``--strip``, which must end in .png, or OUTPUT with .png."""
    if not args.strip:
        return Path(args.output).with_suffix(".png")
    if Path(args.strip).suffix.lower() != ".png":
        raise OutputPathError(f"argument --strip: {args.strip} must end in .png (the strip is written as PNG)")
    return Path(args.strip)


def budget_advice(error: MemoryBudgetError) -> MemoryBudgetError:
    """The engine's refusal of a plan that fits no memory budget, with the command line's ways out."""
    found = str(error).split(" Use ")[0]
    return MemoryBudgetError(f"{found} Use --disk-dir DIR (a folder for layer outputs), --tiling official (the "
                             "release's tiles: seams), or a smaller --size / --frames",
                             device_needed=error.device_needed, host_needed=error.host_needed,
                             device_budget=error.device_budget, host_budget=error.host_budget)


def out_of_memory_advice(tiling: str) -> str:
    """What to change on the command line when the device ran out of memory with ``--tiling``."""
    if tiling == "none":
        return ("out of device memory with --tiling none (the whole clip at once); use --tiling seamless, which "
                "splits the work into pieces that fit")
    if tiling == "official":
        return ("out of device memory with --tiling official, which keeps the release's tile sizes; use --tiling "
                "seamless, or lower --tile-size / --chunk-frames (results then differ from the release), or use "
                "--dtype fp16 or bf16")
    return ("out of device memory even with the smallest pieces --tiling seamless tries; give a smaller --size, use "
            "--dtype fp16 or bf16, or free device memory used by other programs")


def reconstruct_interrupted(args) -> str:
    return (f"nothing was kept ({args.output} is written only at the end); run the same command again to "
            "start over")
