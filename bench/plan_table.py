"""What the exact engine plans on GPUs of common sizes, computed on any machine (no GPU, no weights).

    python bench/plan_table.py [--host-gib 64]

Release-size vae3d in bf16 at 576x1024, result to host memory; the device budget is 70% of the card
(what the nodes' automatic plan takes of an empty card); prints a markdown table of the planner's
choice and its estimated device and host peaks. Estimates, not measurements.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cvvae_core import SD, CVVAE, tiling  # noqa: E402
from cvvae_core.tiling.planner import FREE_MEMORY_SHARE  # noqa: E402

GiB = 2 ** 30


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host-gib", type=float, default=64, help="host memory budget of the plans (GiB)")
    args = parser.parse_args()
    with torch.device("meta"):
        model = CVVAE(SD).to(torch.bfloat16)
    device, host = torch.device("cuda"), int(args.host_gib * GiB)
    cfg = model.config
    print("| card | clip | untiled estimate | layer outputs in RAM | recomputed | GPU peak | RAM peak |")
    print("|---|---|---|---|---|---|---|")
    for card_gb in (24, 16, 12, 8):
        budget = int(card_gb * 1e9 * FREE_MEMORY_SHARE)
        for direction in (tiling.DECODE, tiling.ENCODE):
            for frames in (17, 49, 97):
                if direction is tiling.DECODE:
                    s = cfg.spatial_compression
                    shape = (1, cfg.latent_channels, cfg.latent_frames(frames), 576 // s, 1024 // s)
                else:
                    shape = (1, cfg.in_channels, frames, 576, 1024)
                opts = tiling.TilingOptions(memory_budget=budget, host_memory_budget=host)
                whole = tiling.estimate_memory(model, direction, shape, tiling.Plan(), "cpu", device, torch.bfloat16)
                plan = tiling.plan_for(model, direction, shape, opts, budget=budget, device=device)
                est = tiling.estimate_memory(model, direction, shape, plan, "cpu", device, torch.bfloat16)
                print(f"| {card_gb} GB | {direction.name} {frames} frames | {whole.total / GiB:.1f} GiB | "
                      f"{len(plan.host)} | {len(plan.recompute)} | {est.total / GiB:.1f} GiB | {est.host / GiB:.1f} GiB |")


if __name__ == "__main__":
    main()
