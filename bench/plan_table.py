"""What the exact engine plans for an SVD-length clip on common GPUs and RAM sizes (no GPU, no weights).

    python bench/plan_table.py [--disk FOLDER] [--frames 97] [--size 576x1024]

Release-size vae3d in bf16, 97 frames at 576x1024 (25 latent frames: what an SVD graph gives),
result to host memory, planned for a CUDA device on a meta-device model. Each cell is one
``plan_for`` call with a device budget of card x FREE_MEMORY_SHARE (what the automatic plan takes
of an empty card) and a host budget of RAM x HOST_MEMORY_SHARE (the default share of available RAM);
cards and RAM in GB of 10^9 bytes, which is below what a card or machine of that size has free
after the desktop and the operating system. ``--disk`` names a folder for the disk tier (planning
only: nothing is written; its free space is the disk budget), so cells that host memory cannot hold
may use it. A cell shows the plan's estimated device and host peaks, how many layer outputs live in
host memory / on disk / are recomputed, and the estimated time relative to the untiled pass, or
"refused" (``MemoryBudgetError``: the engine refuses before any work, and the nodes' ``auto`` then
runs official mode). Estimates, not measurements. Last, one PASS/FAIL line per direction for the
target: with 32 GB RAM every card gets an exact plan whose estimated cost is <= 2x untiled.

Cost model (``cvvae_core.tiling.planner``): time = max(multiply-adds / device rate, host traffic /
host link bandwidth) + disk traffic / disk bandwidth + pieces x seconds per piece, relative to the
untiled pass's multiply-adds at the same device rate. Recomputation adds the recomputed layers'
multiply-adds over every reader's regions (halos included); the host and disk tiers add their bytes,
written once and read by every reader. Rates on CUDA (``planner.RATES["cuda"]``, defaults, not
measurements): 80e12 multiply-adds/s, 20e9 B/s host link each way, 1.5e9 B/s disk, 50 us per piece.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cvvae_core import SD, CVVAE, tiling  # noqa: E402
from cvvae_core.errors import MemoryBudgetError  # noqa: E402
from cvvae_core.tiling.planner import FREE_MEMORY_SHARE, HOST_MEMORY_SHARE, RATES  # noqa: E402

GiB = 2 ** 30
GB = 10 ** 9
CARDS_GB = (8, 12, 16, 24)
RAM_GB = (16, 32, 64)
#: Target: with this much RAM every card gets an exact plan of at most this estimated cost.
TARGET_RAM_GB = 32
TARGET_COST = 2.0


def input_shape(model, direction, frames: int, height: int, width: int) -> tuple[int, ...]:
    cfg = model.config
    if direction is tiling.DECODE:
        s = cfg.spatial_compression
        return 1, cfg.latent_channels, cfg.latent_frames(frames), height // s, width // s
    return 1, cfg.in_channels, frames, height, width


def cell(model, direction, shape, card_gb: int, ram_gb: int, disk) -> tuple[str, float | None]:
    """The cell's text and the plan's estimated cost relative to untiled (None: refused)."""
    device = torch.device("cuda")
    budget, host = int(card_gb * GB * FREE_MEMORY_SHARE), int(ram_gb * GB * HOST_MEMORY_SHARE)
    opts = tiling.TilingOptions(memory_budget=budget, host_memory_budget=host, disk_dir=disk)
    try:
        plan = tiling.plan_for(model, direction, shape, opts, budget=budget, device=device)
    except MemoryBudgetError as err:
        return f"refused (needs {err.device_needed / GiB:.1f} / {err.host_needed / GiB:.1f} GiB)", None
    est = tiling.estimate_memory(model, direction, shape, plan, "cpu", device, torch.bfloat16)
    assert est.total <= budget and est.host <= host, "the planner returned a plan over its budgets"
    where = "untiled" if plan.whole else f"{len(plan.host)}/{len(plan.disk)}/{len(plan.recompute)}"
    disk_peak = f", disk {est.disk / GiB:.1f}" if est.disk else ""
    return (f"{est.total / GiB:.1f} / {est.host / GiB:.1f} GiB{disk_peak}; {where}; "
            f"{est.relative_cost:.2f}x"), est.relative_cost


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--disk", default=None, help="a folder the plans may use as disk tier (planning only)")
    parser.add_argument("--frames", type=int, default=97)
    parser.add_argument("--size", default="576x1024", help="HxW pixels")
    args = parser.parse_args()
    height, width = map(int, args.size.split("x"))
    with torch.device("meta"):
        model = CVVAE(SD).to(torch.bfloat16)
    r = RATES["cuda"]
    print(f"Exact plans, release-size vae3d bf16 on CUDA, {args.frames} frames {height}x{width}, result in host "
          f"memory; device budget = card x {FREE_MEMORY_SHARE}, host budget = RAM x {HOST_MEMORY_SHARE} "
          f"(GB = 10^9 B); disk tier: {'a named folder' if args.disk else 'none'}.")
    print(f"Cost model: time = max(MACs / {r.macs_per_s:.0e} MAC/s, host traffic / {r.host_bytes_per_s:.0e} B/s) "
          f"+ disk traffic / {r.disk_bytes_per_s:.1e} B/s + pieces x {r.piece_s * 1e6:.0f} us, "
          "relative to the untiled pass's MACs at the same rate (recomputation adds its MACs over every reader's "
          "regions; host/disk tiers add bytes written once and read by every reader).")
    print("Cell: device peak / host peak (estimated); layer outputs in host memory/on disk/recomputed; "
          "estimated time vs untiled. \"refused\": no exact plan fits (smallest device / host peak found); "
          "the nodes' auto then runs official mode.")
    print()
    verdicts = []
    for direction in (tiling.ENCODE, tiling.DECODE):
        shape = input_shape(model, direction, args.frames, height, width)
        whole = tiling.estimate_memory(model, direction, shape, tiling.Plan(), "cpu", torch.device("cuda"),
                                       torch.bfloat16)
        print(f"{direction.name} {list(shape)} (untiled: {whole.total / GiB:.1f} GiB device, "
              f"{whole.host / GiB:.1f} GiB host)")
        print()
        print("| card | " + " | ".join(f"RAM {ram} GB" for ram in RAM_GB) + " |")
        print("|---|" + "---|" * len(RAM_GB))
        costs = []
        for card in CARDS_GB:
            cells = [cell(model, direction, shape, card, ram, args.disk) for ram in RAM_GB]
            costs.append(cells[RAM_GB.index(TARGET_RAM_GB)][1])
            print(f"| {card} GB | " + " | ".join(text for text, _ in cells) + " |")
        print()
        ok = all(c is not None and c <= TARGET_COST for c in costs)
        verdicts.append(f"{'PASS' if ok else 'FAIL'} {direction.name}: with {TARGET_RAM_GB} GB RAM every card gets an "
                        f"exact plan of estimated cost <= {TARGET_COST:g}x untiled: "
                        + ", ".join(f"{card} GB {'refused' if c is None else f'{c:.2f}x'}"
                                    for card, c in zip(CARDS_GB, costs)))
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
