"""Training throughput on real video clips, 1 rank vs N ranks (torchrun, gloo on CPU / nccl on CUDA).

    python bench/bench_train.py VIDEO_DIR                     # 17 frames 64x64, built-in image VAE, 1 and 2 ranks
    python bench/bench_train.py VIDEO_DIR --size 128 --ranks 1 2 --steps 30 --threads 1

Each configuration is a fresh ``torchrun --nproc_per_node=N -m cvvae_core train`` run (batch 1 per
rank, so the global batch grows with N) on random 17-frame windows of the videos (PyAV decoding in
one DataLoader worker per rank). Steps/s is taken from log.jsonl between step ``--warmup`` and the
last step (start-up and the first steps excluded); clips/s = steps/s x global batch; scaling = clips/s
at N ranks / clips/s at 1 rank. Prints one JSON line per configuration and the load average.
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

ROOT = Path(__file__).resolve().parents[1]


def run(videos: str, ranks: int, args, work: Path) -> dict:
    out = work / f"run{ranks}"
    cfg = {"model": "cvvae", "out_dir": str(out), "image_vae": "cvvae_core/weights/builtin_image_vae.safetensors",
           "steps": args.steps, "batch_size": 1, "frames": args.frames, "height": args.size, "width": args.size,
           "warmup_steps": 5, "log_every": 1, "save_every": 10_000, "threads": args.threads,
           "activation_checkpointing": args.checkpointing, "tensorboard": False,
           "data": {"videos": videos, "frame_stride": args.stride, "workers": args.workers}}
    path = work / f"cfg{ranks}.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                           "-m", "cvvae_core", "train", str(path), "--device", args.device],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{ranks} ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    logs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    t = {r["step"]: r["seconds"] for r in logs if "loss" in r}
    steps_s = (args.steps - args.warmup) / (t[args.steps] - t[args.warmup])
    return {"ranks": ranks, "threads_per_rank": args.threads, "frames": args.frames, "size": args.size,
            "steps_per_s": round(steps_s, 3), "clips_per_s": round(steps_s * ranks, 3),
            "wall_s": round(time.time() - start, 1), "load": os.getloadavg()}


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
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for n in args.ranks:
            r = run(args.videos, n, args, Path(tmp))
            base = base or r["clips_per_s"] / n
            r["scaling_vs_1_rank"] = round(r["clips_per_s"] / base, 2)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
