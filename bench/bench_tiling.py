"""Tiling engine benchmark: each mode against official mode and the untiled model, in one run.

    python bench/bench_tiling.py --model random-sd --size 192x192 --frames 17 --modes untiled official seamless-auto
    python bench/bench_tiling.py --model builtin --videos ../shared/data/videos --size 576x1024 --frames 17
    python bench/bench_tiling.py --model random-sd --size 64x64 --frames 33 --modes untiled seamless-chunk8
    python bench/bench_tiling.py --device cuda --dtype bf16 --size 576x1024 --frames 17 97
    python bench/bench_tiling.py --model random-sd --size 192x192 --frames 17 --json rows.json
                                  # the CPU targets: untiled, official, seamless-auto, seamless-lowmem

Every (clip, direction, mode) runs in a fresh child process, so peak memory, page faults and
CPU/system time belong to that mode alone. Modes:
  untiled           the whole clip at once (tiling=None), the reference
  official          the official tiled algorithm (release tile 576 px / overlap 0.2222 / 16-frame chunks)
  seamless-chunkN   the seamless engine with N-frame chunks forced
  seamless-auto     the seamless engine with its automatic plan (the default)
  seamless-budgetG  the automatic plan for a device memory budget of G GiB (TilingOptions.memory_budget;
                    on CPU too: layer outputs beyond it go to the host tier)
  seamless-budgetG-recompute   the same, ResNet intermediates recomputed (TilingOptions.recompute)
  seamless-lowmem   memory_budget 64 MiB and a host memory budget of 40% of the host peak estimated for
                    the unconstrained plan (seamless-auto's): the host budget checked against measured RSS
Columns: seconds, frames/s, throughput relative to official, user and system CPU seconds of the
pass, the system share of its CPU time, its minor page faults, the child's peak RSS during the pass
(VmHWM reset through /proc/self/clear_refs right before it: model and input included) and its growth
during the pass (the peak minus the RSS before it; a small pass of the same mode runs first, so the
libraries' one-off buffers, paid once by a long-lived process, are not counted), the device peak (CUDA: max_memory_allocated minus the model; CPU with a budget:
the engine's counted device-tier peak), the engine's host-tier peak, and PSNR against the float32
model (untiled; where that does not fit the device, the seamless engine; on CUDA computed in the
parent, TF32 off): decode outputs directly (peak-to-peak 2), encode outputs as latents (peak-to-peak
of the reference latent) and through the float32 decoder.
``random-sd`` / ``random-sd3``: release-size vae3d / vae3d_sd3 with seeded random weights.

After each clip and direction, one PASS/FAIL line per target (CPU, float32): seamless-auto >= 1.0x
official throughput with <= 0.7x its peak RSS and >= 100 dB against untiled; seamless-lowmem's RSS
growth within its host budget + 10% and >= 100 dB, its time stated against seamless-auto's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cvvae_core  # noqa: E402
from cvvae_core import tiling  # noqa: E402
from cvvae_core.errors import MemoryBudgetError  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: seamless-lowmem: its device budget, and its host budget as a share of the unconstrained plan's host peak.
LOWMEM_DEVICE_BUDGET = 64 << 20
LOWMEM_HOST_SHARE = 0.4
#: Targets (see the module docstring).
AUTO_MIN_VS_OFFICIAL = 1.0
AUTO_MAX_RSS_VS_OFFICIAL = 0.7
MIN_PSNR_DB = 100.0
RSS_SLACK = 1.1


def build_model(name: str, device: str, dtype: torch.dtype):
    if name == "builtin":
        return cvvae_core.load_model("builtin", device=device, dtype=dtype)
    from cvvae_core.spec import PRESETS
    torch.manual_seed(0)
    model = cvvae_core.CVVAE(PRESETS["vae3d" if name == "random-sd" else "vae3d_sd3"]).eval()
    with torch.no_grad():
        for p in model.parameters():  # activations keep a sane scale through 30 layers
            p.normal_(0, 1.0 / math.sqrt(max(1, p[0].numel()))) if p.dim() > 1 else p.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm) or isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1.0)
    return model.to(device, dtype)


def make_clip(spec: str, frames: int, h: int, w: int) -> torch.Tensor:
    """``smooth``: seeded noise upsampled 8x (content at several scales); else a video path."""
    if spec == "smooth":
        g = torch.Generator().manual_seed(0)
        low = torch.rand(1, 3, frames, max(1, h // 8), max(1, w // 8), generator=g) * 2 - 1
        return torch.nn.functional.interpolate(low, size=(frames, h, w), mode="trilinear").clamp(-1, 1)
    from cvvae_core.io.video import read_video, to_model_range
    clip, _ = read_video(spec, frames, h, w)
    return to_model_range(clip)


def options(mode: str, model=None, direction=None, shape=None) -> tiling.TilingOptions | None:
    """The options of ``mode``; seamless-lowmem plans its host budget from ``model``, ``direction``
    (``tiling.ENCODE``/``DECODE``) and the input ``shape``."""
    if mode == "untiled":
        return None
    if mode == "official":
        return tiling.TilingOptions(mode="official")
    if mode == "seamless-auto":
        return tiling.TilingOptions()
    if mode == "seamless-lowmem":
        unconstrained = tiling.plan_for(model, direction, shape, tiling.TilingOptions())
        host_peak = tiling.estimate_memory(model, direction, shape, unconstrained).host
        return tiling.TilingOptions(memory_budget=LOWMEM_DEVICE_BUDGET,
                                    host_memory_budget=int(LOWMEM_HOST_SHARE * host_peak))
    if mode.startswith("seamless-chunk"):
        return tiling.TilingOptions(chunk_frames=int(mode[len("seamless-chunk"):]))
    if mode.startswith("seamless-budget"):
        size, _, extra = mode[len("seamless-budget"):].partition("-")
        if extra not in ("", "recompute"):
            raise SystemExit(f"unknown mode {mode}")
        return tiling.TilingOptions(memory_budget=int(float(size) * 2 ** 30), recompute=extra == "recompute" or None)
    raise SystemExit(f"unknown mode {mode}")


def child(args):
    """One mode on one clip and direction; writes the result and its own figures."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.model, args.device, DTYPES[args.dtype])
    x = torch.load(args.input)
    direction = tiling.ENCODE if args.direction == "encode" else tiling.DECODE
    opts = options(args.mode, model, direction, x.shape)
    if opts is not None:
        try:
            tiling.plan_for(model, direction, x.shape, opts)
        except MemoryBudgetError as err:  # refused before any work: that is the row
            print(json.dumps({"refused": str(err)}))
            return
    # a small pass first: the libraries' one-off buffers and kernels (paid once by a long-lived
    # process) stay out of the figures
    frames, edge = (5, 32) if direction is tiling.ENCODE else (2, 4)
    small = x[:, :, :frames, :edge, :edge].contiguous()
    try:
        run_pass(model, direction, small, options(args.mode, model, direction, small.shape))
    except MemoryBudgetError:  # a budget sized for the small clip that nothing fits: warm up without it
        run_pass(model, direction, small, tiling.TilingOptions(memory_budget=opts.memory_budget))
    reports = []
    if opts is not None:
        opts.report = reports.append
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        model_bytes = torch.cuda.memory_allocated(device)
    reset = reset_peak_rss()
    rss_before = status_kib("VmRSS")
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    y = run_pass(model, direction, x, opts)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)  # the pass alone, not the process start
    hwm = status_kib("VmHWM")  # VmHWM, not ru_maxrss: the latter starts at the parent's RSS when forked
    torch.save(y.float().cpu(), args.output)
    if device.type == "cuda":
        device_peak = torch.cuda.max_memory_allocated(device) - model_bytes
    else:
        device_peak = reports[0].device_peak if reports and opts.memory_budget else None
    host_peak = reports[0].host_peak if reports else None
    print(json.dumps({"seconds": seconds, "device_peak": device_peak, "host_peak": host_peak,
                      "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
                      "minflt": after.ru_minflt - before.ru_minflt, "peak_rss_kib": hwm,
                      "rss_growth_kib": hwm - rss_before if reset else None,
                      "host_budget": opts.host_memory_budget if opts is not None else None,
                      "estimated_host": reports[0].estimate.host if reports else None,
                      "plan": reports[0].describe() if reports else None}))


@torch.no_grad()
def run_pass(model, direction, x: torch.Tensor, opts: tiling.TilingOptions | None) -> torch.Tensor:
    """One pass: untiled where ``opts`` is None, else the engine."""
    if opts is None:
        y = direction.untiled(model, x)
    else:
        y = (tiling.encode_moments if direction is tiling.ENCODE else tiling.decode_latent)(model, x, opts)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return y


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_child(args, mode: str, direction: str, inp: Path, out: Path, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--direction", direction, "--input", str(inp),
           "--output", str(out), "--model", args.model, "--device", args.device, "--dtype", dtype,
           "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    _, status, _ = os.wait4(proc.pid, 0)
    result = json.loads(proc.stdout.read().strip().splitlines()[-1]) if os.waitstatus_to_exitcode(status) == 0 else {}
    proc.stdout.close()
    if not result:
        return {"mode": mode, "failed": True}
    if "refused" in result:
        return {"mode": mode, "refused": result["refused"]}
    cpu = result["user"] + result["sys"]
    return {"mode": mode, "seconds": result["seconds"], "user": result["user"], "sys": result["sys"],
            "sys_share": result["sys"] / cpu if cpu else 0.0, "minflt": result["minflt"],
            "peak_rss_mib": result["peak_rss_kib"] / 1024,
            "rss_growth_mib": None if result["rss_growth_kib"] is None else result["rss_growth_kib"] / 1024,
            "host_budget_mib": None if result["host_budget"] is None else result["host_budget"] / 2**20,
            "estimated_host_mib": None if result["estimated_host"] is None else result["estimated_host"] / 2**20,
            "plan": result["plan"],
            **{f"{k}_gib": None if result[k] is None else result[k] / 2**30 for k in ("device_peak", "host_peak")}}


def psnr(a: torch.Tensor, ref: torch.Tensor, peak: float) -> float:
    mse = (a - ref).square().mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-sd", choices=["random-sd", "random-sd3", "builtin"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--frames", type=int, nargs="+", default=[17])
    ap.add_argument("--videos", type=Path, help="a folder of clips (default: one smooth synthetic clip)")
    ap.add_argument("--modes", nargs="+", default=["untiled", "official", "seamless-auto", "seamless-lowmem"])
    ap.add_argument("--directions", nargs="+", default=["encode", "decode"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("mode", "direction", "input", "output"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    h, w = (int(v) for v in args.size.split("x"))
    clips = sorted(args.videos.iterdir()) if args.videos else ["smooth"]
    rows = []
    # The float32 reference runs where the modes run; on CUDA without TF32, so it is float32 throughout.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    ref_device = torch.device(args.device)
    ref_model = build_model(args.model, ref_device, torch.float32)

    def reference(fn, x: torch.Tensor) -> torch.Tensor:
        """``fn`` ("encode": the posterior mean, or "decode") of the float32 model: untiled where the
        engine's estimate says it fits the device, else the seamless engine."""
        direction = tiling.DECODE if fn == "decode" else tiling.ENCODE
        need = tiling.estimate_memory(ref_model, direction, x.shape, tiling.Plan(), ref_device, ref_device).total
        fits = ref_device.type == "cpu" or need < torch.cuda.mem_get_info(ref_device)[0]
        with torch.no_grad():
            y = getattr(ref_model, fn)(x.to(ref_device), **({} if fits else {"tiling": tiling.TilingOptions()}))
            y = y.cpu()
        if ref_device.type == "cuda":
            torch.cuda.empty_cache()  # the children measure their own peak: leave them the memory
        return y
    print(f"model {args.model}, {args.device} {args.dtype}, {args.threads} threads, load {os.getloadavg()[0]:.1f}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for clip_spec in clips:
            for frames in args.frames:
                video = make_clip(str(clip_spec), frames, h, w)
                ref_latent = reference("encode", video)
                inputs = {"encode": video, "decode": ref_latent}
                for direction in args.directions:
                    inp = tmp / f"{direction}_in.pt"
                    torch.save(inputs[direction], inp)
                    results = {}
                    for mode in args.modes:
                        dtype = "fp32" if mode == "untiled" and args.device == "cpu" else args.dtype
                        out = tmp / f"{direction}_{mode}.pt"
                        results[mode] = run_child(args, mode, direction, inp, out, dtype)
                        results[mode]["out"] = out
                    if ref_device.type == "cuda":  # the untiled child ran in --dtype: the reference is this one
                        ref = reference(direction, inputs[direction])  # encode: the mean, compared below
                    elif "untiled" in results and not results["untiled"].get("failed"):
                        ref = torch.load(results["untiled"]["out"])
                    else:
                        ref = None
                    base = results.get("official", {}).get("seconds")
                    group = []
                    for mode, r in results.items():
                        row = {"clip": Path(str(clip_spec)).name, "frames": frames, "size": args.size,
                               "direction": direction, **{k: v for k, v in r.items() if k != "out"}}
                        if "seconds" in r:
                            row["fps"] = frames / r["seconds"]
                            row["vs_official"] = base / r["seconds"] if base else None
                            y = torch.load(r["out"])
                            if ref is not None and direction == "decode":
                                row["psnr"] = psnr(y, ref, 2.0)
                            elif ref is not None:
                                c = ref_model.latent_channels
                                row["psnr"] = psnr(y[:, :c], ref[:, :c], float(ref[:, :c].max() - ref[:, :c].min()))
                                row["psnr_decoded"] = psnr(reference("decode", y[:, :c]),
                                                           reference("decode", ref[:, :c]), 2.0)
                        rows.append(row)
                        group.append(row)
                        print(format_row(row), flush=True)
                    for target in targets(group):
                        rows.append(target)
                        print(f"{target['status']:4s} {target['target']}: {target['detail']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def targets(group: list[dict]) -> list[dict]:
    """PASS/FAIL of the CPU targets on one clip and direction's rows (those of the modes that ran)."""
    by_mode = {r["mode"]: r for r in group if "seconds" in r}
    refused = {r["mode"]: r["refused"] for r in group if "refused" in r}
    official, auto, low = by_mode.get("official"), by_mode.get("seamless-auto"), by_mode.get("seamless-lowmem")
    head = {k: group[0][k] for k in ("clip", "frames", "size", "direction")} if group else {}
    out = []

    def add(name: str, ok: bool, detail: str):
        out.append({**head, "section": "target", "target": name, "status": "PASS" if ok else "FAIL",
                    "detail": detail})

    def quality(r) -> tuple[bool, str]:
        value = r.get("psnr")
        return value is not None and value >= MIN_PSNR_DB, "no untiled reference" if value is None else \
            f"{value:.1f} dB against untiled"

    if official and auto:
        rss = auto["peak_rss_mib"] / official["peak_rss_mib"]
        good, text = quality(auto)
        add(f"seamless-auto: >= {AUTO_MIN_VS_OFFICIAL}x official throughput, <= {AUTO_MAX_RSS_VS_OFFICIAL}x its peak "
            f"RSS, >= {MIN_PSNR_DB:.0f} dB", auto["vs_official"] >= AUTO_MIN_VS_OFFICIAL
            and rss <= AUTO_MAX_RSS_VS_OFFICIAL and good,
            f"{auto['vs_official']:.2f}x official, peak RSS {auto['peak_rss_mib']:.0f} MiB = {rss:.2f}x official's "
            f"{official['peak_rss_mib']:.0f} MiB, {text}")
    if "seamless-lowmem" in refused:
        add(f"seamless-lowmem: RSS growth <= host budget + {100 * (RSS_SLACK - 1):.0f}%, >= {MIN_PSNR_DB:.0f} dB",
            False, f"refused before any work: {refused['seamless-lowmem']}")
    if low:
        budget, growth = low["host_budget_mib"], low["rss_growth_mib"]
        good, text = quality(low)
        fits = growth is not None and growth <= RSS_SLACK * budget
        vs_auto = f", {low['seconds'] / auto['seconds']:.2f}x seamless-auto's time" if auto else ""
        add(f"seamless-lowmem: RSS growth <= host budget + {100 * (RSS_SLACK - 1):.0f}%, >= {MIN_PSNR_DB:.0f} dB",
            fits and good, f"RSS growth {'not measured' if growth is None else f'{growth:.0f} MiB'} against a "
            f"{budget:.0f} MiB host budget (plan's estimate {low['estimated_host_mib']:.0f} MiB), {text}{vs_auto}")
    return out


def format_row(r: dict) -> str:
    head = f"{r['clip'][:18]:18s} {r['frames']:3d}f {r['size']:>9s} {r['direction']:6s} {r['mode']:16s}"
    if r.get("failed"):
        return head + " FAILED (see its error above)"
    if "refused" in r:
        return f"{head} REFUSED: {r['refused']}"
    vs = f"{r['vs_official']:.2f}x" if r.get("vs_official") else "  -  "
    q = ""
    if "psnr" in r:
        q = f" psnr {r['psnr']:6.1f} dB" + (f" (decoded {r['psnr_decoded']:.1f})" if "psnr_decoded" in r else "")
    mem = f"rss {r['peak_rss_mib']:6.0f} MiB"
    mem += f" (+{r['rss_growth_mib']:.0f})" if r.get("rss_growth_mib") is not None else ""
    mem += f" host budget {r['host_budget_mib']:.0f} MiB" if r.get("host_budget_mib") is not None else ""
    mem += f" device {r['device_peak_gib']:.3f} GiB" if r["device_peak_gib"] is not None else ""
    mem += f" host {r['host_peak_gib']:.3f} GiB" if r["host_peak_gib"] is not None else ""
    return (f"{head} {r['seconds']:7.1f}s {r['fps']:6.2f} f/s {vs:>6s}  user {r['user']:6.1f} sys {r['sys']:5.1f} "
            f"({100 * r['sys_share']:4.1f}%) faults {r['minflt']:9d} {mem}{q}")


if __name__ == "__main__":
    main()
