"""Subcommands ``encode-dataset`` and ``merge`` of ``python -m cvvae_core``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.encode import EncodeOptions, encode_dataset, merge, read_jsonl
from ..devices import DTYPES
from ..errors import CheckpointError, InputError, MemoryBudgetError, OutputPathError
from .args import SIZE_RULE, argument_errors, device_name, existing_folder, frame_count, int_at_least, size_hw
from .model import DISK_DIR_HELP, budget_advice


def windows_spec(text: str) -> str:
    if text in ("first", "all") or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"must be first, all or a count N >= 1, got {text!r}")


def register(subparsers) -> None:
    p = subparsers.add_parser("encode-dataset", help="encode a folder or manifest of videos to latent shards + index "
                                                     "(resumable; run under torchrun for several GPUs/machines)",
                              epilog=SIZE_RULE)
    p.add_argument("checkpoint", help="release folder, a .safetensors file, or 'builtin'")
    p.add_argument("--videos", required=True, metavar="FOLDER_OR_MANIFEST",
                   help="a folder of videos (searched recursively), or a manifest: .txt (one path per line), .csv or "
                        ".jsonl (a path per row, with optional start/end times or frames to take a part of a "
                        "video); relative paths are relative to the manifest")
    p.add_argument("--out", required=True, help="output folder: shards, index.jsonl, errors.jsonl, run.json")
    p.add_argument("--frames", type=frame_count(), metavar="N", default=17,
                   help="frames per clip, 1+4k (default 17)")
    p.add_argument("--size", type=size_hw, metavar="HxW", required=True,
                   help="HxW in multiples of 8 each frame is scaled (cover) and centre-cropped to, e.g. 256x256")
    p.add_argument("--stride", type=int_at_least(1), default=1, help="take every n-th source frame (default 1)")
    p.add_argument("--windows", type=windows_spec, default="first",
                   help="clips per video: first, all (back to back) or N evenly spaced (default first)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="compute dtype (latents are stored fp32)")
    p.add_argument("--batch-size", type=int_at_least(1), default=4, help="clips per model call (default 4)")
    p.add_argument("--output", choices=["mean", "sample", "mean+logvar"], default="mean",
                   help="posterior mean, a sample (seeded per clip), or mean and logvar stacked (2C channels)")
    p.add_argument("--tiling", choices=["none", "seamless", "official"], default="none",
                   help="the tiling engine for frames too large for memory (default none)")
    p.add_argument("--disk-dir", type=existing_folder, metavar="DIR", help=DISK_DIR_HELP + " (with --tiling)")
    p.add_argument("--shard-mb", type=float, default=256.0, help="start a new shard after this many MiB (default 256)")
    p.add_argument("--num-workers", type=int_at_least(0), default=2, help="video decoding processes (default 2)")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any video could not be used")
    p.set_defaults(func=cmd_encode_dataset, interrupted=encode_interrupted)

    p = subparsers.add_parser("merge", help="merge the per-rank index/errors files of an encode-dataset folder")
    p.add_argument("out", help="the encode-dataset output folder")
    p.set_defaults(func=cmd_merge)


def cmd_encode_dataset(args) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise OutputPathError(f"argument --out: {args.out} is a file; give a folder (new, or an earlier run's to "
                              "resume it)")
    if args.disk_dir and args.tiling == "none":
        raise InputError("--disk-dir is for the tiling engine: add --tiling seamless")
    opts = EncodeOptions(model=args.checkpoint, videos=args.videos, out=args.out, frames=args.frames,
                         height=args.size[0], width=args.size[1], frame_stride=args.stride, windows=args.windows,
                         dtype=args.dtype, batch_size=args.batch_size, output=args.output, tiling=args.tiling,
                         shard_mb=args.shard_mb, num_workers=args.num_workers, device=args.device, strict=args.strict,
                         disk_dir=args.disk_dir)
    try:
        with argument_errors("checkpoint", args.checkpoint, CheckpointError,
                             role="the first argument is the checkpoint, the videos go to --videos"):
            s = encode_dataset(opts)
    except MemoryBudgetError as e:
        raise budget_advice(e) from None
    rank = f"rank {s.rank}/{s.world_size} " if s.world_size > 1 else ""
    print(f"{rank}encoded  {s.encoded} clips in {s.seconds:.1f}s ({s.clips_per_second:.2f} clips/s); "
          f"{s.already_done} already in the index")
    if s.failed_videos:
        print(f"{rank}skipped  {s.failed_videos} videos that could not be used (reasons in {args.out}/errors.jsonl)")
    if s.nothing_usable:
        print(f"{rank}error: no clip was encoded from the {s.videos} videos given: none of them could be used "
              f"(reasons in {args.out}/errors.jsonl)", file=sys.stderr)
        return 1
    return 1 if args.strict and s.failed_videos else 0


def encode_interrupted(args) -> str:
    kept = sum(len(read_jsonl(part)) for part in Path(args.out).glob("index.rank*.jsonl"))
    return (f"{kept} encoded clips are kept in {args.out} (its shards and index); run the same command again to "
            "encode the rest")


def cmd_merge(args) -> int:
    with argument_errors("out", args.out, InputError):
        clips, failed = merge(args.out)
    print(f"merged   {clips} clips into {args.out}/index.jsonl, {failed} failed videos into {args.out}/errors.jsonl")
    return 0
