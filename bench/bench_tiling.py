"""Tiling engine benchmark: seconds, frames/s, peak device memory and PSNR of each mode.

    python bench/bench_tiling.py                                  # CUDA: 576x1024, 17 and 97 frames
    python bench/bench_tiling.py --videos ../shared/data/videos   # + real clips (first N frames)
    python bench/bench_tiling.py --device cpu --size 64x112 --frames 9 17 --model builtin

Per clip and direction (encode, decode) it runs, in the same process:
  untiled  the whole clip at once in float32 (the reference; skipped where it does not fit)
  official the official tiled algorithm (release tile 576 / 0.2222 / 16 frames, or --official-tile)
  seamless the seamless engine, in --dtype (fp16/bf16 on CUDA), with --stats-passes
PSNR is over [-1, 1] (peak-to-peak 2): decode outputs directly; encode outputs through the
untiled float32 decoder. Targets (issue 4): seamless >= 2x official throughput at <= 0.5x its
peak memory; seamless peak at the longest clip <= 1.1x that at the shortest; >= 45 dB vs untiled.
Writes the rows to --json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cvvae_core  # noqa: E402
from cvvae_core import tiling  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_clip(path: Path, frames: int, h: int, w: int) -> torch.Tensor:
    import av
    with av.open(str(path)) as c:
        out = []
        for f in c.decode(video=0):
            out.append(torch.from_numpy(f.to_ndarray(format="rgb24")))
            if len(out) == frames:
                break
    x = torch.stack(out).permute(3, 0, 1, 2).float()[None] / 127.5 - 1
    return F.interpolate(x, size=(x.shape[2], h, w), mode="trilinear", antialias=False).clamp(-1, 1)


def synthetic_clip(frames: int, h: int, w: int) -> torch.Tensor:
    from cvvae_core.synthetic import SyntheticConfig, generate_clip
    return generate_clip(0, SyntheticConfig(frames=frames, height=h, width=w))[None]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).square().mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4 / mse)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sec = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
    return out, sec, peak


def run_case(name, video, models, args, device):
    ref_model, fast_model = models["fp32"], models[args.dtype]
    frames = video.shape[2]
    rows = []
    ot = args.official_tile
    official = dict(mode="official", tile_size=ot, chunk_frames=args.official_chunk)
    seamless = dict(mode="seamless", tile_size=args.tile, chunk_frames=args.chunk, stats_passes=args.stats_passes)
    with torch.no_grad():
        try:
            ref_mom, sec, peak = timed(lambda: tiling.encode_moments(ref_model, video, tiling.TilingOptions(mode="none")), device)
            rows.append(dict(case=name, op="encode", mode="untiled", dtype="fp32", sec=sec, peak_gib=peak))
        except torch.OutOfMemoryError:
            ref_mom = None
        mean_for_decode = (ref_mom if ref_mom is not None else
                           tiling.encode_moments(ref_model, video, tiling.TilingOptions(**seamless)))[:, :ref_model.latent_channels]
        try:
            ref_dec, sec, peak = timed(lambda: tiling.decode_latent(ref_model, mean_for_decode, tiling.TilingOptions(mode="none")), device)
            rows.append(dict(case=name, op="decode", mode="untiled", dtype="fp32", sec=sec, peak_gib=peak))
        except torch.OutOfMemoryError:
            ref_dec = None
        untiled_video = ref_dec

        def enc_quality(mom):
            # latents compared through the float32 untiled decoder, in video PSNR
            if untiled_video is None:
                return None
            dec = tiling.decode_latent(ref_model, mom[:, :ref_model.latent_channels].float(), tiling.TilingOptions(mode="none"))
            return psnr(dec, untiled_video)

        results = {}
        for mode, opts, model, dt in [("official", official, ref_model, "fp32"),
                                      ("official", official, fast_model, args.dtype),
                                      ("seamless", seamless, fast_model, args.dtype),
                                      ("seamless", seamless, ref_model, "fp32")]:
            key = (mode, dt)
            if key in results:
                continue
            mom, esec, epeak = timed(lambda: tiling.encode_moments(model, video, tiling.TilingOptions(**opts)), device)
            dec, dsec, dpeak = timed(lambda: tiling.decode_latent(model, mean_for_decode, tiling.TilingOptions(**opts)), device)
            results[key] = (mom, dec)
            rows.append(dict(case=name, op="encode", mode=mode, dtype=dt, sec=esec, peak_gib=epeak,
                             psnr_vs_untiled=enc_quality(mom)))
            rows.append(dict(case=name, op="decode", mode=mode, dtype=dt, sec=dsec, peak_gib=dpeak,
                             psnr_vs_untiled=None if ref_dec is None else psnr(dec, ref_dec)))
        off_dec = results[("official", "fp32")][1]
        for r in rows:
            r["frames"] = frames
            r["fps"] = frames / r["sec"]
            if r["op"] == "decode" and r["mode"] != "untiled":
                r["psnr_vs_official"] = psnr(results[(r["mode"], r["dtype"])][1], off_dec)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="builtin", help="'builtin', a checkpoint path, or 'random-sd' (release size, random)")
    ap.add_argument("--size", default="576x1024", help="HxW")
    ap.add_argument("--frames", type=int, nargs="+", default=[17, 97])
    ap.add_argument("--videos", type=Path, help="folder of .mp4 clips to add (resized to --size)")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="seamless dtype (default fp16 on CUDA, fp32 on CPU)")
    ap.add_argument("--tile", type=int, default=None, help="seamless tile size (default: automatic)")
    ap.add_argument("--chunk", type=int, default=None, help="seamless chunk frames (default: automatic)")
    ap.add_argument("--stats-passes", type=int, default=None, help="default: the engine's (1 whole frames, 2 tiled)")
    ap.add_argument("--official-tile", type=int, default=tiling.OFFICIAL_TILE)
    ap.add_argument("--official-chunk", type=int, default=tiling.OFFICIAL_CHUNK)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("bench/results_tiling.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    h, w = (int(v) for v in args.size.lower().split("x"))

    if args.model == "builtin":
        from cvvae_core.builtin import load_builtin
        base = load_builtin(device="cpu", dtype=torch.float32)
    elif args.model == "random-sd":
        torch.manual_seed(0)
        base = cvvae_core.CVVAE(cvvae_core.SD)
    else:
        base = cvvae_core.load_model(args.model, device="cpu", dtype=torch.float32)
    models = {k: type(base)(base.config).to(device, DTYPES[k]).eval() for k in {"fp32", args.dtype}}
    for m in models.values():
        m.load_state_dict(base.state_dict())

    cases = [(f"synthetic-{t}f", synthetic_clip(t, h, w)) for t in args.frames]
    if args.videos:
        for p in sorted(args.videos.glob("*.mp4")):
            for t in args.frames:
                cases.append((f"{p.stem[:20]}-{t}f", load_clip(p, t, h, w)))
    rows = []
    for name, clip in cases:
        rows += run_case(name, clip, models, args, device)
        for r in rows[-10:]:
            print(_fmt(r), flush=True)

    print(f"\ndevice: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"model {args.model}, {h}x{w}, seamless {args.dtype}, stats passes {args.stats_passes}")
    print(f"{'case':24} {'op':6} {'mode':8} {'dtype':5} {'sec':>8} {'fps':>7} {'peak GiB':>8} {'dB vs untiled':>13} {'dB vs official':>14}")
    for r in rows:
        print(_fmt(r))
    summary = _ratios(rows)
    for line in summary:
        print(line)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": str(device), "size": [h, w], "model": args.model,
                                     "dtype": args.dtype, "rows": rows, "summary": summary}, indent=1))
    print(f"wrote {args.json}")


def _fmt(r):
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    return (f"{r['case']:24} {r['op']:6} {r['mode']:8} {r['dtype']:5} {r['sec']:8.2f} {r['fps']:7.2f} "
            f"{f(r['peak_gib'], '8.2f')} {f(r.get('psnr_vs_untiled'), '13.1f')} {f(r.get('psnr_vs_official'), '14.1f')}")


def _ratios(rows):
    """Throughput and memory of seamless (fast dtype) against official (fp32 and same dtype)."""
    out = []
    get = lambda c, op, mode, dt: next((r for r in rows if (r["case"], r["op"], r["mode"], r["dtype"]) == (c, op, mode, dt)), None)  # noqa: E731,E501
    fast = next((r["dtype"] for r in rows if r["mode"] == "seamless" and r["dtype"] != "fp32"), "fp32")
    for c in dict.fromkeys(r["case"] for r in rows):
        for op in ("encode", "decode"):
            s = get(c, op, "seamless", fast)
            for dt in dict.fromkeys(("fp32", fast)):
                o = get(c, op, "official", dt)
                mem = (f", peak {s['peak_gib'] / o['peak_gib']:.2f}x" if s["peak_gib"] and o["peak_gib"] else "")
                out.append(f"{c} {op}: seamless {fast} vs official {dt}: throughput {o['sec'] / s['sec']:.2f}x{mem}")
    return out


if __name__ == "__main__":
    main()
