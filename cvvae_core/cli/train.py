"""Subcommands ``train`` and ``plot``: a training run and its curves."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..devices import resolve_device
from ..errors import CheckpointError, CVVAEError, InputError, OutputPathError, TrainConfigError
from ..spec import IMAGE_FAMILIES
from ..train.config import TrainConfig, shipped_configs
from ..train.plot import plot_run
from ..train.run import train
from .args import argument_errors, device_name, int_at_least
from .outputs import check_outputs

FAMILY_HELP = ("the image VAE's family, for its latent scale/shift: needed for an SDXL or FLUX.1 VAE file without "
               "a config (their shapes are those of SD1.x and SD3); default: from the file, else sd1 for 4 "
               "latent channels and sd3 for 16")
STATE_FILE = "training_state.pt"
CONFIG_HELP = (f"training config: a .json file, or the name of a shipped config ({', '.join(shipped_configs())}), "
               "from any folder")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train an image VAE or a CV-VAE (latent regularization) from a JSON config; "
                                            "under torchrun: data-parallel over the ranks")
    p.add_argument("config", nargs="?", help=CONFIG_HELP)
    p.add_argument("--config", dest="config_option", metavar="CONFIG", help="the same as the CONFIG argument")
    p.add_argument("--out", help="output folder (overrides out_dir)")
    p.add_argument("--steps", type=int_at_least(1), help="total steps (overrides steps)")
    p.add_argument("--image-vae", help="frozen image VAE .safetensors (overrides image_vae)")
    p.add_argument("--family", choices=sorted(IMAGE_FAMILIES), help=FAMILY_HELP + " (overrides image_vae_family)")
    p.add_argument("--device", type=device_name, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--restart", action="store_true", help=f"ignore an existing {STATE_FILE} in the output folder")
    p.set_defaults(func=cmd_train, interrupted=train_interrupted)

    p = subparsers.add_parser("plot", help="draw a training run's loss and validation curves (RUN_DIR/curves.png)")
    p.add_argument("run_dir", help="the run's output folder (holds log.jsonl)")
    p.add_argument("--out", metavar="PNG", help="a .png path (default RUN_DIR/curves.png, redrawn each time)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_plot)


def cmd_train(args) -> int:
    if bool(args.config) == bool(args.config_option):
        raise TrainConfigError("give the training config once: cvvae train CONFIG, or cvvae train --config CONFIG "
                               f"(shipped: {', '.join(shipped_configs())})")
    name = "config" if args.config else "--config"
    args.config = args.config or args.config_option
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise OutputPathError(f"argument --out: {args.out} is a file; give a folder (new, or a run's to resume it)")
    with argument_errors(name, args.config, TrainConfigError):
        cfg = TrainConfig.from_json(args.config, {"out_dir": args.out, "steps": args.steps,
                                                  "image_vae": args.image_vae, "image_vae_family": args.family})
    args.out = cfg.out_dir  # the folder a Ctrl-C message speaks of
    device = resolve_device(args.device) if args.device else None
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        with argument_errors("--image-vae" if args.image_vae else "config", args.image_vae or args.config,
                             CheckpointError, role="--image-vae takes the frozen image VAE"):
            out = train(cfg, device=device, resume=not args.restart)
        print(f"saved to {out}")
        return 0
    # A rank of a torchrun group: the group is joined in train(). Exit without tearing it down:
    # gloo (torch 2.13) can abort with SIGABRT at teardown while a peer exits.
    code = 0
    try:
        out = train(cfg, device=device, resume=not args.restart)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"saved to {out}")
    except CVVAEError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def train_interrupted(args) -> str:
    if args.out is None:  # stopped while reading the config
        return "nothing was kept; run the same command again"
    state = Path(args.out) / STATE_FILE
    if not state.is_file():
        return "nothing was kept (stopped before the first step ended); run the same command again"
    # mmap: only the step number is read, not the weights and optimizer state
    step = torch.load(state, map_location="cpu", weights_only=True, mmap=True)["step"]
    again = "the same command without --restart" if args.restart else "the same command again"
    return f"kept {state} at step {step}, the last finished step; run {again} to resume from there"


def cmd_plot(args) -> int:
    if args.out:
        if Path(args.out).suffix.lower() != ".png":
            raise OutputPathError(f"argument --out: {args.out} must end in .png (the curves are written as PNG)")
        check_outputs({"--out": Path(args.out)}, {"run_dir": args.run_dir}, args.overwrite)
    with argument_errors("run_dir", args.run_dir, InputError):
        print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0
