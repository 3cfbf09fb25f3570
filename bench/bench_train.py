"""Training throughput on real video clips, 1 rank vs N ranks (torchrun, gloo on CPU / nccl on CUDA).

    python bench/bench_train.py VIDEO_DIR                     # 17 frames 64x64, built-in image VAE, 1 and 2 ranks
    python bench/bench_train.py VIDEO_DIR --size 128 --ranks 1 2 --steps 30 --threads 1
    python bench/bench_train.py VIDEO_DIR --device cuda --image-vae release --size 256 --ranks 1 --workers 6
    python bench/bench_train.py VIDEO_DIR --device cuda --image-vae release --size 256 --ranks 1 --checkpointing

Each configuration is a fresh ``torchrun --nproc_per_node=N -m cvvae_core train`` run (batch 1 per
rank, so the global batch grows with N) on random 17-frame windows of the videos (PyAV decoding in
one DataLoader worker per rank). Steps/s is taken from log.jsonl between step ``--warmup`` and the
last step (start-up and the first steps excluded); clips/s = steps/s x global batch; scaling = clips/s
at N ranks / clips/s at 1 rank. Prints one JSON line per configuration and the load average; on
CUDA also the peak memory the training step allocated (rank 0's ``torch.cuda.max_memory_allocated``).

``--image-vae release`` trains against a release-size SD image VAE (128 base channels, 4 levels,
4 latent channels, the shape of SD1.x/SDXL's VAE) with seeded random weights, written for the run:
the CV-VAE inflated from it has the release configuration. The default is the built-in image VAE.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def release_image_vae(path: Path) -> str:
    """A release-size SD image VAE with seeded random weights (the speed and memory do not depend on them)."""
    sys.path.insert(0, str(ROOT))
    from cvvae_core.io.image_vae_file import save_image_vae
    from cvvae_core.model.image_vae import ImageVAE, ImageVAEConfig

    torch.manual_seed(0)
    save_image_vae(ImageVAE(ImageVAEConfig()), path)
    return str(path)


def run(videos: str, ranks: int, args, work: Path, image_vae: str) -> dict:
    out = work / f"run{ranks}"
    cfg = {"model": "cvvae", "out_dir": str(out), "image_vae": image_vae,
           "steps": args.steps, "batch_size": 1, "frames": args.frames, "height": args.size, "width": args.size,
           "warmup_steps": 5, "log_every": 1, "save_every": 10_000, "threads": args.threads,
           "activation_checkpointing": args.checkpointing, "precision": args.precision, "tensorboard": False,
           "data": {"videos": videos, "frame_stride": args.stride, "workers": args.workers}}
    path = work / f"cfg{ranks}.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                           "-m", "cvvae_core", "train", str(path), "--device", args.device],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{ranks} ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    logs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    t = {r["step"]: r["seconds"] for r in logs if "loss" in r}
    steps_s = (args.steps - args.warmup) / (t[args.steps] - t[args.warmup])
    row = {"ranks": ranks, "threads_per_rank": args.threads, "frames": args.frames, "size": args.size,
           "image_vae": args.image_vae, "device": args.device, "checkpointing": args.checkpointing,
           "steps_per_s": round(steps_s, 3), "clips_per_s": round(steps_s * ranks, 3),
           "wall_s": round(time.time() - start, 1), "load": os.getloadavg()}
    if args.device.startswith("cuda"):
        row.update(precision=args.precision, peak_gib=max(r.get("peak_gib", 0) for r in logs))
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("videos", help="folder or manifest of videos")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="CUDA autocast (default bf16)")
    p.add_argument("--image-vae", default="builtin", help="'builtin', 'release' (random release-size SD VAE) or a path")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.image_vae == "release":
            image_vae = release_image_vae(Path(tmp) / "release_image_vae.safetensors")
        elif args.image_vae == "builtin":
            image_vae = "cvvae_core/weights/builtin_image_vae.safetensors"
        else:
            image_vae = args.image_vae
        base = None
        for n in args.ranks:
            r = run(args.videos, n, args, Path(tmp), image_vae)
            base = base or r["clips_per_s"] / n
            r["scaling_vs_1_rank"] = round(r["clips_per_s"] / base, 2)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
