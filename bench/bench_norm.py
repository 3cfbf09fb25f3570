"""GroupNorm + SiLU on one piece in fp16/bf16: the engine's fused pass (float32 arithmetic, result in
the compute dtype, no float32 copy of the activation) against normalising a float32 copy.

    python bench/bench_norm.py [--device cuda] [--shape 1 128 6 130 130]

Prints seconds per call, peak extra memory (CUDA) and the max error of each against a float64
reference, for both dtypes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cvvae_core.model.layers import GroupNormSiLU  # noqa: E402
from cvvae_core.tiling.executor import GroupMoments, norm_silu  # noqa: E402


def float32_copy(x, norm, mean, var):
    """The previous engine's way: the whole piece in float32, normalised, cast back."""
    b, c = x.shape[:2]
    g = norm.num_groups
    xf = x.float().view(b, g, c // g, *x.shape[2:])
    y = (xf - mean.view(b, g, 1, 1, 1, 1)) * torch.rsqrt(var + norm.eps).view(b, g, 1, 1, 1, 1)
    y = y.view(x.shape) * norm.weight.float().view(c, 1, 1, 1) + norm.bias.float().view(c, 1, 1, 1)
    return F.silu(y).to(x.dtype)


def timed(fn, device, reps=5):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
    return out, (time.perf_counter() - t) / reps, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", type=int, nargs=5, default=[1, 128, 6, 130, 130])
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    norm = GroupNormSiLU(32, args.shape[1], eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=None)
        norm.bias.uniform_(-0.5, 0.5)
        x64 = (torch.randn(args.shape, generator=g, dtype=torch.float64) * 3 + 1).to(device)
        ref = F.silu(F.group_norm(x64, 32, norm.weight.double(), norm.bias.double(), 1e-6))
        for dtype in (torch.bfloat16, torch.float16):
            x = x64.to(dtype)
            moments = GroupMoments(32)
            moments.add(x)
            mean, var = moments.mean_var()
            for name, fn in (("fused (engine)", norm_silu), ("float32 copy", float32_copy)):
                y, sec, peak = timed(lambda: fn(x, norm, mean, var), device)
                err = (y.double() - ref).abs().max().item()
                print(f"{str(dtype):15s} {name:15s} {sec * 1e3:8.1f} ms  peak +{peak:7.1f} MiB  max err {err:.2e}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
