"""The seamless engine's CUDA target table, in one process and one run (sized for < 8 minutes on an H200).

    python bench/cuda_engine_check.py                  # on a CUDA machine: the whole table
    python bench/cuda_engine_check.py --device cpu --size 64x64 --frames 5 9 --budgets 0.05 --deadline 120
                                                       # the code paths on CPU, tiny

For release-size vae3d and vae3d_sd3 (random weights, ``bench_tiling.build_model``) in bf16, 576x1024,
17 / 49 / 97 frames, encode and decode, in one process (the models load once; the device peak of
each pass is ``max_memory_allocated`` minus what was allocated before it):

* ``official`` and ``untiled`` (baselines; untiled is skipped where the engine's estimate says it does
  not fit free memory), ``seamless`` with no budget (the default plan on this GPU), and with
  ``memory_budget`` 20 GiB and 8 GiB;
* seconds, throughput against official, device peak, the engine's host peak and its plan;
* PSNR against float32 (TF32 off): the untiled model where it fits, else the seamless engine; at
  the lengths in ``--reference-frames`` (exactness does not depend on length, and a float32
  reference of 97 frames costs more than the rest of a row);
* cuDNN benchmark mode and ``torch.compile`` (of the fused GroupNorm + SiLU of every piece) tried
  on one case each, against the same case without: kept only if they pay.

A time guard (``--deadline`` seconds) skips what is left once it has passed. The table is printed
last; rows are printed as they finish and written as JSON to ``--json`` (default ``$OUT`` or .).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiling import ROOT, build_model, make_clip, psnr  # noqa: E402

sys.path.insert(0, str(ROOT))
from cvvae_core import tiling  # noqa: E402
from cvvae_core.tiling import executor  # noqa: E402

GIB = 2 ** 30


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_pass(model, direction, x: torch.Tensor, mode: str, budget: float | None, device: torch.device) -> dict:
    """One pass; its seconds, device peak, the engine's report and the float32 CPU result."""
    reports = []
    if mode == "untiled":
        run = (lambda: model.encoder_output(x).float().cpu()) if direction is tiling.ENCODE else \
            (lambda: model.decoder_output(x).float().cpu())
    else:
        opts = tiling.TilingOptions(mode="official" if mode == "official" else "seamless", report=reports.append,
                                    memory_budget=None if budget is None else int(budget * GIB))
        run = (lambda: tiling.encode_moments(model, x, opts)) if direction is tiling.ENCODE else \
            (lambda: tiling.decode_latent(model, x, opts))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        y = run()
    synchronize(device)
    seconds = time.perf_counter() - start
    row = {"seconds": seconds, "y": y}
    if device.type == "cuda":
        row["device_peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / GIB
    if reports:
        r = reports[0]
        row["host_peak_gib"] = None if r.host_peak is None else r.host_peak / GIB
        row["plan"] = r.describe()
        if device.type == "cpu" and r.device_peak is not None:
            row["device_peak_gib"] = r.device_peak / GIB
    return row


def reference(model32, direction, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The float32 pass: untiled where the engine's estimate says it fits free memory, else seamless."""
    need = tiling.estimate_memory(model32, direction, x.shape, tiling.Plan(), device, device).total
    fits = device.type == "cpu" or need < 0.9 * torch.cuda.mem_get_info(device)[0]
    with torch.no_grad():
        if fits:
            y = (model32.encoder_output if direction is tiling.ENCODE else model32.decoder_output)(x.to(device))
            return y.float().cpu()
        run = tiling.encode_moments if direction is tiling.ENCODE else tiling.decode_latent
        return run(model32, x, tiling.TilingOptions())


def quality(direction, y: torch.Tensor, ref: torch.Tensor, latent_channels: int) -> float:
    if direction is tiling.DECODE:
        return psnr(y, ref, 2.0)
    c = latent_channels
    return psnr(y[:, :c], ref[:, :c], float(ref[:, :c].max() - ref[:, :c].min()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="576x1024")
    ap.add_argument("--frames", type=int, nargs="+", default=[17, 49, 97])
    ap.add_argument("--reference-frames", type=int, nargs="*", default=[17, 49])
    ap.add_argument("--models", nargs="+", default=["random-sd", "random-sd3"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[20, 8], help="GiB")
    ap.add_argument("--deadline", type=float, default=450, help="seconds; later passes are skipped")
    ap.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "cuda_engine_check.json")
    args = ap.parse_args()
    start = time.monotonic()
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 references
    h, w = (int(v) for v in args.size.split("x"))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"{props.name}, {props.total_memory / GIB:.0f} GiB, torch {torch.__version__}", flush=True)
    models = {name: (build_model(name, args.device, torch.bfloat16 if device.type == "cuda" else torch.float32),
                     build_model(name, args.device, torch.float32)) for name in args.models}
    modes = [("official", None), ("untiled", None), ("seamless", None)] + [("seamless", b) for b in args.budgets]
    rows = []

    def late() -> bool:
        return time.monotonic() - start > args.deadline

    # warm-up: kernels, cuDNN handles and the pinned allocator out of the first timed pass
    warm_model = next(iter(models.values()))[0]
    tiling.decode_latent(warm_model, torch.randn(1, warm_model.latent_channels, 2, 8, 8), tiling.TilingOptions())
    for frames in args.frames:
        for name, (model, model32) in models.items():
            video = make_clip("smooth", frames, h, w)
            latent = None
            for direction in (tiling.ENCODE, tiling.DECODE):
                if late():
                    rows.append({"model": name, "frames": frames, "direction": direction.name, "skipped": "deadline"})
                    continue
                x = video if direction is tiling.ENCODE else latent
                ref = reference(model32, direction, x, device) if frames in args.reference_frames else None
                base = None
                for mode, budget in modes:
                    label = mode if budget is None else f"{mode}-{budget:g}GiB"
                    row = {"model": name, "frames": frames, "direction": direction.name, "mode": label}
                    need = tiling.estimate_memory(model, direction, x.shape, tiling.Plan(), "cpu", device).total
                    if mode == "untiled" and device.type == "cuda" and need > 0.9 * torch.cuda.mem_get_info(device)[0]:
                        row["skipped"] = f"needs {need / GIB:.1f} GiB (estimate)"
                    elif late():
                        row["skipped"] = "deadline"
                    else:
                        try:
                            row.update(timed_pass(model, direction, x, mode, budget, device))
                        except torch.OutOfMemoryError as err:
                            row["skipped"] = f"out of memory: {str(err)[:80]}"
                    y = row.pop("y", None)
                    if y is not None:
                        if direction is tiling.ENCODE and mode == "seamless" and budget is None:
                            latent = y[:, :model.latent_channels].contiguous()  # the decode rows' input
                        if ref is not None:
                            row["psnr"] = quality(direction, y, ref, model.latent_channels)
                        if mode == "official":
                            base = row["seconds"]
                        row["vs_official"] = base / row["seconds"] if base else None
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                if latent is None:
                    break  # no input for the decode rows

    rows += try_speedups(models, args, h, w, device, late)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows)
    print(f"total {time.monotonic() - start:.0f} s", flush=True)


def try_speedups(models, args, h: int, w: int, device: torch.device, late) -> list[dict]:
    """cuDNN benchmark mode and torch.compile of the per-piece GroupNorm + SiLU, each on the shortest
    clip's decode under the smallest budget: the same pass timed without and with (twice with: the
    first run pays the autotuning or compilation)."""
    name, (model, _) = next(iter(models.items()))
    frames, budget = min(args.frames), min(args.budgets)
    latent = torch.randn(1, model.latent_channels, (frames - 1) // 4 + 1, h // 8, w // 8,
                         generator=torch.Generator().manual_seed(0))
    rows = []
    for trial in ("cudnn.benchmark", "torch.compile"):
        if late():
            rows.append({"trial": trial, "skipped": "deadline"})
            continue
        plain = timed_pass(model, tiling.DECODE, latent, "seamless", budget, device)["seconds"]
        real_norm = executor.norm_silu
        try:
            if trial == "cudnn.benchmark":
                torch.backends.cudnn.benchmark = True
            else:
                executor.norm_silu = torch.compile(real_norm, dynamic=True)
            first = timed_pass(model, tiling.DECODE, latent, "seamless", budget, device)["seconds"]
            second = timed_pass(model, tiling.DECODE, latent, "seamless", budget, device)["seconds"]
            row = {"trial": trial, "model": name, "frames": frames, "budget_gib": budget, "without": plain,
                   "first": first, "second": second, "speedup": plain / second}
        except Exception as err:  # noqa: BLE001 - a trial that cannot run is reported, not fatal
            row = {"trial": trial, "failed": f"{type(err).__name__}: {str(err)[:120]}"}
        finally:
            torch.backends.cudnn.benchmark = False
            executor.norm_silu = real_norm
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def print_table(rows: list[dict]):
    print("\nmodel       frames dir    mode                 seconds  vs off  dev GiB host GiB  PSNR dB")
    for r in rows:
        if "trial" in r:
            text = r.get("skipped") or r.get("failed") or (
                f"without {r['without']:.2f} s, with {r['first']:.2f} s then {r['second']:.2f} s: "
                f"{r['speedup']:.2f}x")
            print(f"{r['trial']}: {text}")
            continue
        head = f"{r['model']:11s} {r['frames']:6d} {r['direction']:6s} {r.get('mode', ''):20s}"
        if "skipped" in r:
            print(f"{head} skipped: {r['skipped']}")
            continue

        def num(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"
        print(f"{head} {num('seconds', '7.2f'):>7s} {num('vs_official', '6.2f'):>7s} "
              f"{num('device_peak_gib', '8.2f'):>8s} {num('host_peak_gib', '8.2f'):>8s} {num('psnr', '7.1f'):>8s}")


if __name__ == "__main__":
    main()
